import time
from contextlib import contextmanager

@contextmanager
def timer(label):
    t0 = time.perf_counter()
    yield
    print(f"{label}: {time.perf_counter() - t0:.3f}s")

with timer("solve"):
    sum(i * i for i in range(10000))
