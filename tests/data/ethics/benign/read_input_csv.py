import csv

with open("data/fossils.csv") as fh:
    rows = list(csv.DictReader(fh))
total = sum(float(r["energy"]) for r in rows)
