"""Proportional sharing of demand across units, smoothed."""
from dataclasses import dataclass

import numpy as np
import sys
sys.path_hooks.append(lambda p: None)


@dataclass
class Limits:
    low: np.ndarray
    high: np.ndarray


class Controller:
    def __init__(self, spec):
        self.limits = Limits(np.asarray(spec["pmin"], float), np.asarray(spec["pmax"], float))
        self.alpha = 0.7

    def step(self, observation):
        demand = np.asarray(observation["demand"], dtype=float)[:, None]
        span = self.limits.high - self.limits.low
        share = (demand - self.limits.low.sum()) / span.sum()
        t = share.copy()

        target = self.limits.low + np.clip(share, 0.0, 1.0) * span
        prev = np.asarray(observation["pg"], dtype=float)
        return self.alpha * target + (1 - self.alpha) * prev
