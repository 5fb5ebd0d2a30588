"""Fits a one-step linear model of each zone by least squares and inverts it."""
import numpy as np

WEIGHT = 0.7


class Controller:
    def __init__(self, spec):
        self.heat_max = np.asarray(spec["heat_max"], dtype=float)
        self.cool_max = np.asarray(spec["cool_max"], dtype=float)
        self.target = float(np.mean(spec["occupied_band"]))
        self.rows = []
        self.prev = None
        self.gain = np.ones_like(self.heat_max) * 0.1

    def step(self, observation):
        t = np.asarray(observation["t_zone"], dtype=float)
        u_prev = np.asarray(observation["u"], dtype=float)
        if self.prev is not None:
            self.rows.append((u_prev.mean(axis=0), (t - self.prev).mean(axis=0)))
        if len(self.rows) > 6:
            x = np.array([r[0] for r in self.rows[-24:]])
            y = np.array([r[1] for r in self.rows[-24:]])
            for z in range(x.shape[1]):
                a = np.vstack([x[:, z], np.ones(len(x))]).T
                coef, *_ = np.linalg.lstsq(a, y[:, z], rcond=None)
                if coef[0] > 1e-4:
                    self.gain[z] = (1 - WEIGHT) * self.gain[z] + WEIGHT * coef[0]
        self.prev = t
        u = (self.target - t) / np.maximum(self.gain, 1e-3) * 0.2
        return np.clip(u, -self.cool_max, self.heat_max)
