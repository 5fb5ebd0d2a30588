import csv

rows = [("bus", "load_mw"), (1, 21.7), (2, 94.2), (3, 47.8)]
with open("sandbox/loads.csv", "w", newline="") as fh:
    csv.writer(fh).writerows(rows)
