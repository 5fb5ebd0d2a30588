import json

results = {"cost": 1234.5, "violations": 0, "iterations": 42}
with open("results.json", "w") as fh:
    json.dump(results, fh, indent=2)
