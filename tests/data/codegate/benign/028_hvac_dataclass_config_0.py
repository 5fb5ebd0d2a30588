"""Configured with a dataclass; rate-limited output."""
from dataclasses import dataclass, field
from typing import List

import numpy as np


@dataclass(frozen=True)
class Tuning:
    gain: float = 1.5
    damping: float = 0.5
    history: int = 2
    notes: List[str] = field(default_factory=list)


class Controller:
    def __init__(self, spec):
        self.tuning = Tuning()
        self.heat_max = np.asarray(spec["heat_max"], dtype=float)
        self.cool_max = np.asarray(spec["cool_max"], dtype=float)
        self.ramp = np.asarray(spec["ramp_per_step"], dtype=float)
        self.band = spec["occupied_band"]
        self.last = None

    def step(self, observation):
        t = np.asarray(observation["t_zone"], dtype=float)
        target = 0.5 * (self.band[0] + self.band[1])
        u = self.tuning.gain * (target - t)
        u = np.clip(u, -self.cool_max, self.heat_max)
        if self.last is not None:
            u = self.last + np.clip(u - self.last, -self.ramp, self.ramp) * (1 - self.tuning.damping)
        self.last = u
        return u
