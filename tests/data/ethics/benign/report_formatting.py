def report(name, saved_kwh, baseline_kwh):
    pct = 100.0 * saved_kwh / baseline_kwh if baseline_kwh else 0.0
    return "{:<20} saved {:>10.1f} kWh ({:.1f}%)".format(name, saved_kwh, pct)


lines = [report(n, s, b) for n, s, b in [("office3", 120.5, 900.0), ("plant", 40.0, 300.0)]]
print("\n".join(lines))
