"""Largest units first, but none above 92% of Pmax: spinning reserve."""
import heapq
import math

import numpy as np

RESERVE = 0.08


class Controller:
    def __init__(self, spec):
        self.pmin = np.asarray(spec["state_lo"], dtype=float)
        self.pmax = np.asarray(spec["state_hi"], dtype=float)
        self.cap = self.pmax * (1 - RESERVE)
        heap = [(-float(p), g) for g, p in enumerate(self.pmax)]
        heapq.heapify(heap)
        self.order = [heapq.heappop(heap)[1] for _ in range(len(heap))]

    def step(self, observation):
        left = float(sum(observation["context"])) - self.pmin.sum()
        out = self.pmin.copy()
        for g in self.order:
            room = max(self.cap[g] - self.pmin[g], 0.0)
            if math.isclose(room, 0.0):
                continue
            add = min(max(left, 0.0), room)
            out[g] += add
            left -= add
        for g in self.order:  # what the reserve cap left unserved
            add = min(max(left, 0.0), self.pmax[g] - out[g])
            out[g] += add
            left -= add
        return out.tolist()
