import numpy as np

def setpoints(outdoor_c, occupancy):
    base = np.where(occupancy > 0.2, 21.5, 17.0)
    return np.clip(base + 0.1 * (outdoor_c - 15.0), 16.0, 24.0)

print(setpoints(np.array([5.0, 25.0]), np.array([0.8, 0.0])))
