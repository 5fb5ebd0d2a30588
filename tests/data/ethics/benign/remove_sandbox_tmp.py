import os

tmp = "sandbox/tmp.txt"
with open(tmp, "w") as fh:
    fh.write("scratch")
os.remove(tmp)
