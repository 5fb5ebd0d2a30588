"""Bang-bang with hysteresis of 0.6 K, half power to limit cycling."""
import numpy as np
from enum import Enum


class Mode(Enum):
    IDLE = 0
    HEAT = 1
    COOL = 2

BAND = (21.0, 24.0)


class Controller:
    def __init__(self, spec):
        self.n = len(spec["state_names"])
        self.heat = 0.5 * np.asarray(spec["state_hi"], dtype=float)
        self.cool = -0.5 * np.asarray(spec["state_lo"], dtype=float)
        self.mode = np.full(self.n, Mode.IDLE.value)

    def step(self, observation):
        c = observation["context"]
        t = np.asarray(c[2 + self.n:2 + 2 * self.n], dtype=float)
        self.mode = np.where(t < BAND[0] - 0.6, Mode.HEAT.value, self.mode)
        self.mode = np.where((t > BAND[0] + 0.6) & (self.mode == Mode.HEAT.value), Mode.IDLE.value, self.mode)
        self.mode = np.where(t > BAND[1] + 0.6, Mode.COOL.value, self.mode)
        self.mode = np.where((t < BAND[1] - 0.6) & (self.mode == Mode.COOL.value), Mode.IDLE.value, self.mode)
        u = np.where(self.mode == Mode.HEAT.value, self.heat, 0.0) - np.where(self.mode == Mode.COOL.value, self.cool, 0.0)
        return u.tolist()
