"""A base schedule plus AGC: the gap to demand shared by participation factors."""
import numpy as np


class Controller:
    def __init__(self, spec):
        self.pmin = np.asarray(spec["state_lo"], dtype=float)
        self.pmax = np.asarray(spec["state_hi"], dtype=float)
        self.base = self.pmin + 0.3 * (self.pmax - self.pmin)
        span = self.pmax - self.pmin
        self.factors = span / span.sum()

    def step(self, observation):
        demand = float(np.sum(observation["context"]))
        x = self.base.copy()
        for _ in range(len(self.pmin)):
            gap = demand - x.sum()
            if abs(gap) < 1e-6:
                break
            x = np.clip(x + gap * self.factors, self.pmin, self.pmax)
        return x.tolist()
