"""Equal incremental cost by bisection on lambda (linearised costs)."""
import numpy as np

ITERATIONS = 20


class Controller:
    def __init__(self, spec):
        self.pmin = np.asarray(spec["pmin"], dtype=float)
        self.pmax = np.asarray(spec["pmax"], dtype=float)
        self.cost = np.asarray(spec["marginal_cost"], dtype=float)

    def dispatch(self, lam):
        slope = np.maximum(self.cost, 1e-6)
        share = np.clip((lam[:, None] - slope) / slope + 0.5, 0.0, 1.0)
        return self.pmin + share * (self.pmax - self.pmin)

    def step(self, observation):
        demand = np.asarray(observation["demand"], dtype=float)
        low = np.full(demand.shape, self.cost.min() * -2.0)
        high = np.full(demand.shape, self.cost.max() * 4.0 + 1.0)
        for _ in range(ITERATIONS):
            mid = 0.5 * (low + high)
            over = self.dispatch(mid).sum(axis=1) > demand
            high = np.where(over, mid, high)
            low = np.where(over, low, mid)
        return self.dispatch(0.5 * (low + high))
