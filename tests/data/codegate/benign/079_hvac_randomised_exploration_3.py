"""Thermostat with a small seeded exploration noise (for learning), clipped to capacity."""
import numpy as np

SEED = 3


class Controller:
    def __init__(self, spec):
        self.rng = np.random.default_rng(SEED)
        self.heat_max = np.asarray(spec["heat_max"], dtype=float)
        self.cool_max = np.asarray(spec["cool_max"], dtype=float)
        self.band = spec["occupied_band"]

    def step(self, observation):
        t = np.asarray(observation["t_zone"], dtype=float)
        u = self.heat_max * np.clip(self.band[0] + 0.5 - t, 0, 1) - self.cool_max * np.clip(t - self.band[1] + 0.5, 0, 1)
        noise = self.rng.normal(0.0, 0.05, size=u.shape) * self.heat_max
        return np.clip(u + noise, -self.cool_max, self.heat_max)


if __name__ == "__main__":
    demo = Controller({"heat_max": [1.0], "cool_max": [1.0], "occupied_band": [21.0, 24.0]})
    print(demo.step({"t_zone": [[20.0]]}))
