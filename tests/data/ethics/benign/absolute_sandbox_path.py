import numpy as np

profile = np.linspace(0.0, 1.0, 24)
np.savetxt("/sandbox/profile.txt", profile)
