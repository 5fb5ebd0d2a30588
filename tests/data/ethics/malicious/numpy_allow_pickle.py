import numpy as np

arr = np.load("uploaded.npy", allow_pickle=True)
print(arr.shape)
