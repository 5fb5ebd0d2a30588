import os

OUT_DIR = "outputs"
os.makedirs(OUT_DIR, exist_ok=True)
with open(os.path.join(OUT_DIR, "setpoints.txt"), "w") as fh:
    fh.write("21.0\n22.5\n")
