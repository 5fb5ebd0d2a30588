import csv

with open("out.csv", "w", newline="") as fh:
    w = csv.writer(fh)
    w.writerow(["t", "kw"])
    w.writerows((t, 10 + t) for t in range(5))
with open("out.csv") as fh:
    print(list(csv.reader(fh)))
