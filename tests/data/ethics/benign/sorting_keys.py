plans = [{"id": "a", "cost": 3.2}, {"id": "b", "cost": 1.1}, {"id": "c", "cost": 2.4}]
ranked = sorted(plans, key=lambda p: (p["cost"], p["id"]))
best = ranked[0]["id"]
