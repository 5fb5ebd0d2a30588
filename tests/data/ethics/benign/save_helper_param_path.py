import numpy as np


def save(path, array):
    # the caller passes a path inside the sandbox
    np.save(path, array)


save("out/result.npy", np.arange(4))
