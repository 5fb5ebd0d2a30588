"""Bang-bang with hysteresis of 0.2 K, half power to limit cycling."""
import numpy as np
IDLE, HEAT, COOL = 0, 1, 2

BAND = (21.0, 24.0)


class Controller:
    def __init__(self, spec):
        self.n = len(spec["state_names"])
        self.heat = 0.5 * np.asarray(spec["state_hi"], dtype=float)
        self.cool = -0.5 * np.asarray(spec["state_lo"], dtype=float)
        self.mode = np.full(self.n, IDLE)

    def step(self, observation):
        c = observation["context"]
        t = np.asarray(c[2 + self.n:2 + 2 * self.n], dtype=float)
        self.mode = np.where(t < BAND[0] - 0.2, HEAT, self.mode)
        self.mode = np.where((t > BAND[0] + 0.2) & (self.mode == HEAT), IDLE, self.mode)
        self.mode = np.where(t > BAND[1] + 0.2, COOL, self.mode)
        self.mode = np.where((t < BAND[1] - 0.2) & (self.mode == COOL), IDLE, self.mode)
        u = np.where(self.mode == HEAT, self.heat, 0.0) - np.where(self.mode == COOL, self.cool, 0.0)
        return u.tolist()
