"""Exact fractions for the sharing weights (no float drift), then numpy."""
from fractions import Fraction
from functools import reduce

import numpy as np


class Controller:
    def __init__(self, spec):
        self.pmin = np.asarray(spec["state_lo"], dtype=float)
        self.pmax = np.asarray(spec["state_hi"], dtype=float)
        spans = [Fraction(round(h - l, 3)).limit_denominator(10 * 100) for l, h in zip(spec["state_lo"], spec["state_hi"])]
        total = reduce(lambda a, b: a + b, spans, Fraction(0))
        self.weights = np.array([float(s / total) if total else 0.0 for s in spans])

    def step(self, observation):
        extra = max(float(np.sum(observation["context"])) - self.pmin.sum(), 0.0)
        return np.minimum(self.pmin + extra * self.weights, self.pmax).tolist()
