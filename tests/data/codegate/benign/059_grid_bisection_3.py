"""Finds the common loading level that meets demand by bisection (units saturate)."""
import numpy as np

ITERATIONS = 40


class Controller:
    def __init__(self, spec):
        self.pmin = np.asarray(spec["state_lo"], dtype=float)
        self.pmax = np.asarray(spec["state_hi"], dtype=float)

    def dispatch(self, level):
        return np.clip(self.pmin + level * self.pmax, self.pmin, self.pmax)

    def step(self, observation):
        demand = float(np.sum(observation["context"]))
        low, high = 0.0, 1.0
        for _ in range(ITERATIONS):
            mid = 0.5 * (low + high)
            if self.dispatch(mid).sum() > demand:
                high = mid
            else:
                low = mid
        return self.dispatch(0.5 * (low + high)).tolist()
