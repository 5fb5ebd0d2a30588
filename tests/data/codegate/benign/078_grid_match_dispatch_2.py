"""Chooses a policy by the size of the step in demand (match statement)."""
import numpy as np

POLICY = 1


class Controller:
    def __init__(self, spec):
        self.pmin = np.asarray(spec["state_lo"], dtype=float)
        self.pmax = np.asarray(spec["state_hi"], dtype=float)
        self.prev_demand = None

    def share(self, demand):
        span = self.pmax - self.pmin
        f = np.clip((demand - self.pmin.sum()) / span.sum(), 0.0, 1.0)
        return (self.pmin + f * span).tolist()

    def step(self, observation):
        demand = float(np.sum(observation["context"]))
        jump = 0.0 if self.prev_demand is None else abs(demand - self.prev_demand)
        self.prev_demand = demand
        match POLICY:
            case 1:
                return self.share(demand)
            case 2 if jump > 5.0:
                return self.share(demand * 1.01)
            case {"mode": mode}:
                return self.share(demand * mode)
            case _:
                return self.share(demand)
