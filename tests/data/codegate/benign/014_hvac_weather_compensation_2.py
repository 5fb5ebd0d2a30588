"""Weather compensation: the heating curve follows a smoothed outdoor temperature."""
from collections import deque

import numpy as np

WINDOW = 3
WEIGHT = 0.2
BAND = (21.0, 24.0)


class Controller:
    def __init__(self, spec):
        self.n = len(spec["state_names"])
        self.heat_max = np.asarray(spec["state_hi"], dtype=float)
        self.cool_max = -np.asarray(spec["state_lo"], dtype=float)
        self.history = deque(maxlen=WINDOW)

    def step(self, observation):
        c = observation["context"]
        self.history.append(float(c[0]))
        outdoor = sum(self.history) / len(self.history)
        t = np.asarray(c[2 + self.n:2 + 2 * self.n], dtype=float)
        target = BAND[0] + 1.0 + WEIGHT * min(max(10.0 - outdoor, 0.0), 15.0) / 15.0
        heat = self.heat_max * np.clip(target - t, 0.0, 1.0)
        cool = self.cool_max * np.clip(t - (BAND[1] - 0.5), 0.0, 1.0)
        return (heat - cool).tolist()
