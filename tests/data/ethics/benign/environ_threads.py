import os

threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
chunks = max(1, 64 // threads)
