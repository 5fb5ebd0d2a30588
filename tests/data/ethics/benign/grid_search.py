import itertools

def cost(kp, ki):
    return (kp - 1.2) ** 2 + (ki - 0.3) ** 2

best = min(itertools.product([0.5, 1.0, 1.5], [0.1, 0.3, 0.5]), key=lambda p: cost(*p))
