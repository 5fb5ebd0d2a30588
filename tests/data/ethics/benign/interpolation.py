import numpy as np
from scipy.interpolate import interp1d

hours = np.array([0, 6, 12, 18, 24])
price = np.array([30.0, 25.0, 60.0, 80.0, 30.0])
f = interp1d(hours, price, kind="linear")
hourly = f(np.arange(25))
