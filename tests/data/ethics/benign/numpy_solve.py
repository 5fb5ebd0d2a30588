import numpy as np

A = np.array([[4.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 4.0]])
b = np.array([15.0, 10.0, 10.0])
x = np.linalg.solve(A, b)
assert np.allclose(A @ x, b)
