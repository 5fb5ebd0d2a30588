import numpy as np

K = np.array([[2.0, -1.0], [-1.0, 2.0]])
w, v = np.linalg.eigh(K)
print(np.sqrt(w))
