"""Fits a one-step linear model of each zone by least squares and inverts it."""
import numpy as np

WEIGHT = 0.3
TARGET = 22.5


class Controller:
    def __init__(self, spec):
        self.n = len(spec["state_names"])
        self.lo = np.asarray(spec["state_lo"], dtype=float)
        self.hi = np.asarray(spec["state_hi"], dtype=float)
        self.rows = []
        self.prev = None
        self.gain = np.full(self.n, 0.1)

    def step(self, observation):
        t = np.asarray(observation["context"][2 + self.n:2 + 2 * self.n], dtype=float)
        u_prev = np.asarray(observation["state"], dtype=float)
        if self.prev is not None:
            self.rows.append((u_prev, t - self.prev))
        if len(self.rows) > 6:
            x = np.array([r[0] for r in self.rows[-24:]])
            y = np.array([r[1] for r in self.rows[-24:]])
            for z in range(self.n):
                a = np.vstack([x[:, z], np.ones(len(x))]).T
                coef, *_ = np.linalg.lstsq(a, y[:, z], rcond=None)
                if coef[0] > 1e-4:
                    self.gain[z] = (1 - WEIGHT) * self.gain[z] + WEIGHT * coef[0]
        self.prev = t
        u = (TARGET - t) / np.maximum(self.gain, 1e-3) * 0.2
        return np.clip(u, self.lo, self.hi).tolist()
