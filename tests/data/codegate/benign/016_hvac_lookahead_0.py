"""Lookahead: predict each zone's drift with a first-order model and act early."""
import numpy as np

HORIZON = 3
RATE = 0.4  # 1/h, how fast a zone drifts toward the outdoor temperature
BAND = np.array([21.0, 24.0])


class Controller:
    def __init__(self, spec):
        self.dt = float(spec["dt_h"])
        self.n = len(spec["state_names"])
        self.heat_max = np.asarray(spec["state_hi"], dtype=float)
        self.cool_max = -np.asarray(spec["state_lo"], dtype=float)

    def predict(self, t, t_out):
        decay = np.exp(-RATE * self.dt * HORIZON)
        return t_out + (t - t_out) * decay

    def step(self, observation):
        c = observation["context"]
        t = np.asarray(c[2 + self.n:2 + 2 * self.n], dtype=float)
        future = self.predict(t, float(c[0]))
        need_heat = np.clip(BAND[0] + 0.5 - future, 0.0, None)
        need_cool = np.clip(future - BAND[1] + 0.5, 0.0, None)
        u = np.minimum(need_heat, 1.0) * self.heat_max - np.minimum(need_cool, 1.0) * self.cool_max
        return u.tolist()
