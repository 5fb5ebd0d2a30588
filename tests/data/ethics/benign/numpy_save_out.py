import numpy as np

rng = np.random.default_rng(0)
samples = rng.normal(size=(100, 5))
np.save("out/samples.npy", samples)
