"""One-zone lookahead: predict the drift with a first-order model and act early."""
import numpy as np

HORIZON = 4
RATE = 0.35  # 1/h, how fast a zone drifts toward the outdoor temperature


class Controller:
    def __init__(self, spec):
        self.dt = float(spec["dt_h"])
        self.heat_max = np.asarray(spec["heat_max"], dtype=float)
        self.cool_max = np.asarray(spec["cool_max"], dtype=float)
        self.band = np.asarray(spec["occupied_band"], dtype=float)

    def predict(self, t, t_out):
        decay = np.exp(-RATE * self.dt * HORIZON)
        return t_out[:, None] + (t - t_out[:, None]) * decay

    def step(self, observation):
        t = np.asarray(observation["t_zone"], dtype=float)
        future = self.predict(t, np.asarray(observation["t_out"], dtype=float))
        need_heat = np.clip(self.band[0] + 0.5 - future, 0.0, None)
        need_cool = np.clip(future - self.band[1] + 0.5, 0.0, None)
        return np.minimum(need_heat, 1.0) * self.heat_max - np.minimum(need_cool, 1.0) * self.cool_max
