import hashlib

h = hashlib.sha256()
with open("sandbox/artifact.bin", "rb") as fh:
    for chunk in iter(lambda: fh.read(65536), b""):
        h.update(chunk)
print(h.hexdigest())
