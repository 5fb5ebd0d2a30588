"""Cheapest first, but no unit above 85% of Pmax: spinning reserve."""
import heapq
import math

import numpy as np

RESERVE = 0.15


class Controller:
    def __init__(self, spec):
        self.pmin = np.asarray(spec["pmin"], dtype=float)
        self.cap = np.asarray(spec["pmax"], dtype=float) * (1 - RESERVE)
        costs = spec["marginal_cost"]
        heap = [(float(c), g) for g, c in enumerate(costs)]
        heapq.heapify(heap)
        self.order = [heapq.heappop(heap)[1] for _ in range(len(heap))]

    def step(self, observation):
        demand = np.asarray(observation["demand"], dtype=float)
        out = np.tile(self.pmin, (demand.shape[0], 1))
        left = demand - out.sum(axis=1)
        for g in self.order:
            room = max(self.cap[g] - self.pmin[g], 0.0)
            if math.isclose(room, 0.0):
                continue
            add = np.clip(left, 0.0, room)
            out[:, g] += add
            left = left - add
        return out
