import math
import random

def anneal(cost, x0, steps=2000, t0=1.0, seed=0):
    rng = random.Random(seed)
    x, c = x0, cost(x0)
    for k in range(steps):
        t = t0 * (1 - k / steps) + 1e-9
        y = [xi + rng.gauss(0, 0.1) for xi in x]
        cy = cost(y)
        if cy < c or rng.random() < math.exp((c - cy) / t):
            x, c = y, cy
    return x, c
