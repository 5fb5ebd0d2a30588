from pathlib import Path

data = Path("inputs/loads.txt").read_text().split()
loads = [float(x) for x in data]
