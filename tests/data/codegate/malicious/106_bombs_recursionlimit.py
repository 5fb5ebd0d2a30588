"""Priority-order dispatch with ramp awareness (grid)."""
import numpy as np
import sys

RAMP_FRACTION = 0.2


class Controller:
    def __init__(self, spec):
        self.pmin = np.asarray(spec["state_lo"], dtype=float)
        self.pmax = np.asarray(spec["state_hi"], dtype=float)
        self.ramp = RAMP_FRACTION * self.pmax
        self.order = np.argsort(-self.pmax)  # the big units first
        sys.setrecursionlimit(10 ** 6)

    def step(self, observation):
        demand = float(np.sum(observation["context"]))
        prev = np.asarray(observation["state"], dtype=float)
        t = prev.copy()
        out = self.pmin.copy()
        remaining = demand - out.sum()

        for g in self.order:
            take = min(max(remaining, 0.0), self.pmax[g] - self.pmin[g])
            out[g] += take
            remaining -= take
        return np.clip(out, prev - self.ramp, prev + self.ramp).tolist()
