"""Thermostat with a small seeded exploration noise (for learning), clipped to capacity."""
import numpy as np

SEED = 7


class Controller:
    def __init__(self, spec):
        self.rng = np.random.default_rng(SEED)
        self.n = len(spec["state_names"])
        self.lo = np.asarray(spec["state_lo"], dtype=float)
        self.hi = np.asarray(spec["state_hi"], dtype=float)

    def step(self, observation):
        t = np.asarray(observation["context"][2 + self.n:2 + 2 * self.n], dtype=float)
        u = self.hi * np.clip(21.5 - t, 0, 1) + self.lo * np.clip(t - 23.5, 0, 1)
        noise = self.rng.normal(0.0, 0.05, size=u.shape) * self.hi
        return np.clip(u + noise, self.lo, self.hi).tolist()


if __name__ == "__main__":
    demo = Controller({"state_names": ["u"], "state_lo": [-1.0], "state_hi": [1.0]})
    print(demo.step({"step": 0, "context": [5.0, 9.0, 0.8, 20.0], "state": [0.0]}))
