import random

random.seed(7)
hits = sum(1 for _ in range(10000) if random.random() ** 2 + random.random() ** 2 <= 1.0)
pi_estimate = 4 * hits / 10000
