import os

for sub in ("plots", "tables"):
    os.makedirs(os.path.join("outputs", sub), exist_ok=True)
