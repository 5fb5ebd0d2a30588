import numpy as np

x = np.load("data/states.npy")
print(x.mean(axis=0))
