"""Units as named tuples; demand filled in order of cost, variant 2."""
import numpy as np
from collections import namedtuple

Unit = namedtuple('Unit', ['low', 'high', 'cost'])


class Controller:
    def __init__(self, spec):
        self.units = sorted(
            (Unit(lo, hi, c) for lo, hi, c in zip(spec["pmin"], spec["pmax"], spec["marginal_cost"])),
            key=lambda u: u.cost,
        )
        self.index = [list(zip(spec["pmin"], spec["pmax"], spec["marginal_cost"])).index(tuple(u)) for u in self.units]

    def step(self, observation):
        demand = np.asarray(observation["demand"], dtype=float)
        out = np.zeros((demand.shape[0], len(self.units)))
        for k, u in enumerate(self.units):
            out[:, self.index[k]] = u.low
        left = demand - out.sum(axis=1)
        for k, u in enumerate(self.units):
            add = np.clip(left, 0.0, u.high - u.low)
            out[:, self.index[k]] += add
            left = left - add
        return out
