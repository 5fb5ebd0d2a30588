"""Every unit at the same fraction of its range, keeping 0% headroom."""
import numpy as np

HEADROOM = 0.0


class Controller:
    def __init__(self, spec):
        self.lo = np.asarray(spec["state_lo"], dtype=float)
        self.hi = np.asarray(spec["state_hi"], dtype=float) * (1 - HEADROOM)

    def step(self, observation):
        demand = float(np.sum(observation["context"]))
        span = np.maximum(self.hi - self.lo, 0.0)
        fraction = min(max((demand - self.lo.sum()) / max(span.sum(), 1e-9), 0.0), 1.0)
        return (self.lo + fraction * span).tolist()
