"""Bang-bang with hysteresis of 0.4 K, half power to limit cycling."""
import numpy as np
from enum import Enum


class Mode(Enum):
    IDLE = 0
    HEAT = 1
    COOL = 2


class Controller:
    def __init__(self, spec):
        self.heat = 0.5 * np.asarray(spec["heat_max"], dtype=float)
        self.cool = 0.5 * np.asarray(spec["cool_max"], dtype=float)
        self.band = spec["occupied_band"]
        self.mode = None

    def step(self, observation):
        t = np.asarray(observation["t_zone"], dtype=float)
        if self.mode is None:
            self.mode = np.full(t.shape, Mode.IDLE.value)
        self.mode = np.where(t < self.band[0] - 0.4, Mode.HEAT.value, self.mode)
        self.mode = np.where(t > self.band[0] + 0.4, np.where(self.mode == Mode.HEAT.value, Mode.IDLE.value, self.mode), self.mode)
        self.mode = np.where(t > self.band[1] + 0.4, Mode.COOL.value, self.mode)
        self.mode = np.where((t < self.band[1] - 0.4) & (self.mode == Mode.COOL.value), Mode.IDLE.value, self.mode)
        return np.where(self.mode == Mode.HEAT.value, self.heat, 0.0) - np.where(self.mode == Mode.COOL.value, self.cool, 0.0)
