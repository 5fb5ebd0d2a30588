import numpy as np

def dispatch_cost(p, c2, c1, c0):
    return float(np.sum(c2 * p ** 2 + c1 * p + c0))

p = np.array([80.0, 40.0, 30.0])
print(dispatch_cost(p, np.array([0.01, 0.02, 0.03]), np.array([20.0, 25.0, 30.0]), np.zeros(3)))
