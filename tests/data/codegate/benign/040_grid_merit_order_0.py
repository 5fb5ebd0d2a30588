"""Merit order: the cheapest units first, within ramp limits."""
import numpy as np

SMOOTH = 1.0


class Controller:
    def __init__(self, spec):
        self.pmin = np.asarray(spec["pmin"], dtype=float)
        self.pmax = np.asarray(spec["pmax"], dtype=float)
        self.ramp = np.asarray(spec["ramp_per_step"], dtype=float)
        self.order = np.argsort(np.asarray(spec["marginal_cost"], dtype=float))

    def step(self, observation):
        demand = np.asarray(observation["demand"], dtype=float)
        prev = np.asarray(observation["pg"], dtype=float)
        out = np.tile(self.pmin, (demand.shape[0], 1))
        remaining = demand - out.sum(axis=1)
        for g in self.order:
            take = np.clip(remaining, 0.0, self.pmax[g] - self.pmin[g])
            out[:, g] += take
            remaining = remaining - take
        target = SMOOTH * out + (1 - SMOOTH) * prev
        return np.clip(target, prev - self.ramp, prev + self.ramp)
