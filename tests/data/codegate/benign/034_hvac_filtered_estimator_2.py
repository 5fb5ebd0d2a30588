"""Exponentially filtered temperature estimate drives a proportional law."""
import numpy as np

ALPHA = 0.35


class Controller:
    """Filters the measurement, then acts in proportion to the filtered error."""

    def __init__(self, spec):
        self.estimate = None
        self.heat_max = np.asarray(spec["heat_max"], dtype=float)
        self.cool_max = np.asarray(spec["cool_max"], dtype=float)
        self.low, self.high = spec["occupied_band"]

    def step(self, observation):
        t = np.asarray(observation["t_zone"], dtype=float)
        self.estimate = t if self.estimate is None else ALPHA * t + (1 - ALPHA) * self.estimate
        heat = np.interp(self.estimate, [self.low - 1.0, self.low + 0.5], [1.0, 0.0])
        cool = np.interp(self.estimate, [self.high - 0.5, self.high + 1.0], [0.0, 1.0])
        return heat * self.heat_max - cool * self.cool_max
