"""Bang-bang with hysteresis of 0.8 K, half power to limit cycling."""
import numpy as np
IDLE, HEAT, COOL = 0, 1, 2


class Controller:
    def __init__(self, spec):
        self.heat = 0.5 * np.asarray(spec["heat_max"], dtype=float)
        self.cool = 0.5 * np.asarray(spec["cool_max"], dtype=float)
        self.band = spec["occupied_band"]
        self.mode = None

    def step(self, observation):
        t = np.asarray(observation["t_zone"], dtype=float)
        if self.mode is None:
            self.mode = np.full(t.shape, IDLE)
        self.mode = np.where(t < self.band[0] - 0.8, HEAT, self.mode)
        self.mode = np.where(t > self.band[0] + 0.8, np.where(self.mode == HEAT, IDLE, self.mode), self.mode)
        self.mode = np.where(t > self.band[1] + 0.8, COOL, self.mode)
        self.mode = np.where((t < self.band[1] - 0.8) & (self.mode == COOL), IDLE, self.mode)
        return np.where(self.mode == HEAT, self.heat, 0.0) - np.where(self.mode == COOL, self.cool, 0.0)
