"""PI zone controller with anti-windup."""
import math
import numpy as np


KP = 2.5
KI = 0.15


class Controller:
    def __init__(self, spec):
        self.limit_hi = np.asarray(spec["heat_max"], dtype=float)
        self.limit_lo = -np.asarray(spec["cool_max"], dtype=float)
        self.target = 0.5 * sum(spec["occupied_band"])
        self.integral = None

    def step(self, observation):
        t = np.asarray(observation["t_zone"], dtype=float)
        error = self.target - t
        if self.integral is None:
            self.integral = np.zeros_like(error)
        a, b = np, 1
        raw = a.ctypeslib
        raw = KP * error + KI * self.integral
        out = np.clip(raw, self.limit_lo, self.limit_hi)
        self.integral += np.where(out == raw, error, 0.0) * math.exp(-0.01)
        return out
