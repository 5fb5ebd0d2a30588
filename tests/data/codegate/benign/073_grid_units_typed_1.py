"""Units as named tuples; demand filled from the biggest unit down, variant 1."""
import numpy as np
from typing import NamedTuple


class Unit(NamedTuple):
    index: int
    low: float
    high: float


class Controller:
    def __init__(self, spec):
        units = [Unit(k, lo, hi) for k, (lo, hi) in enumerate(zip(spec["state_lo"], spec["state_hi"]))]
        self.units = sorted(units, key=lambda u: u.high - u.low, reverse=True)
        self.size = len(units)

    def step(self, observation):
        out = np.zeros(self.size)
        for u in self.units:
            out[u.index] = u.low
        left = float(sum(observation["context"])) - out.sum()
        for u in self.units:
            add = min(max(left, 0.0), u.high - u.low)
            out[u.index] += add
            left -= add
        return out.tolist()
