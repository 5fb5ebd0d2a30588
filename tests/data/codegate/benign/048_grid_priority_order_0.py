"""Priority order: the largest units first (cheapest per MW in most cases), ramp-limited."""
import numpy as np

SMOOTH = 1.0
RAMP = 0.25  # of Pmax per step


class Controller:
    def __init__(self, spec):
        self.pmin = np.asarray(spec["state_lo"], dtype=float)
        self.pmax = np.asarray(spec["state_hi"], dtype=float)
        self.order = np.argsort(-(self.pmax - self.pmin))

    def step(self, observation):
        demand = float(sum(observation["context"]))
        prev = np.asarray(observation["state"], dtype=float)
        out = self.pmin.copy()
        remaining = demand - out.sum()
        for g in self.order:
            take = min(max(remaining, 0.0), self.pmax[g] - self.pmin[g])
            out[g] += take
            remaining -= take
        target = SMOOTH * out + (1 - SMOOTH) * prev
        if observation["step"] == 0:
            return out.tolist()
        return np.clip(target, prev - RAMP * self.pmax, prev + RAMP * self.pmax).tolist()
