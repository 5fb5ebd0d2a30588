"""A base schedule plus AGC: the gap to demand shared by participation factors."""
import numpy as np


class Controller:
    def __init__(self, spec):
        self.pmin = np.asarray(spec["pmin"], dtype=float)
        self.pmax = np.asarray(spec["pmax"], dtype=float)
        self.base = self.pmin + 0.2 * (self.pmax - self.pmin)
        span = self.pmax - self.pmin
        self.factors = span / span.sum()

    def step(self, observation):
        demand = np.asarray(observation["demand"], dtype=float)
        x = np.tile(self.base, (demand.shape[0], 1))
        for _ in range(len(self.pmin)):
            gap = demand - x.sum(axis=1)
            if np.all(np.abs(gap) < 1e-6):
                break
            x = np.clip(x + gap[:, None] * self.factors, self.pmin, self.pmax)
        return x
