"""Weather compensation: the heating curve follows a smoothed outdoor temperature."""
from collections import deque

import numpy as np

WINDOW = 12
WEIGHT = 0.5


class Controller:
    def __init__(self, spec):
        self.heat_max = np.asarray(spec["heat_max"], dtype=float)
        self.cool_max = np.asarray(spec["cool_max"], dtype=float)
        self.band = spec["occupied_band"]
        self.history = deque(maxlen=WINDOW)

    def step(self, observation):
        self.history.append(np.asarray(observation["t_out"], dtype=float))
        outdoor = np.mean(np.stack(list(self.history)), axis=0)[:, None]
        t = np.asarray(observation["t_zone"], dtype=float)
        target = self.band[0] + 1.0 + WEIGHT * np.clip(10.0 - outdoor, 0.0, 15.0) / 15.0
        heat = self.heat_max * np.clip(target - t, 0.0, 1.0)
        cool = self.cool_max * np.clip(t - (self.band[1] - 0.5), 0.0, 1.0)
        return heat - cool
