"""Configured with a dataclass; rate-limited output."""
from dataclasses import dataclass, field
from typing import List

import numpy as np


@dataclass(frozen=True)
class Tuning:
    gain: float = 1.5
    damping: float = 0.3
    max_step_kw: float = 4.0
    band: tuple = (21.0, 24.0)
    notes: List[str] = field(default_factory=list)


class Controller:
    def __init__(self, spec):
        self.tuning = Tuning()
        self.n = len(spec["state_names"])
        self.lo = np.asarray(spec["state_lo"], dtype=float)
        self.hi = np.asarray(spec["state_hi"], dtype=float)

    def step(self, observation):
        c = observation["context"]
        t = np.asarray(c[2 + self.n:2 + 2 * self.n], dtype=float)
        last = np.asarray(observation["state"], dtype=float)
        target = 0.5 * (self.tuning.band[0] + self.tuning.band[1])
        u = np.clip(self.tuning.gain * (target - t), self.lo, self.hi)
        move = np.clip(u - last, -self.tuning.max_step_kw, self.tuning.max_step_kw)
        return (last + move * (1 - self.tuning.damping)).tolist()
