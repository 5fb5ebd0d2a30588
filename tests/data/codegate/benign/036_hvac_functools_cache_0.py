"""Band lookup cached per half hour; occupancy-weighted setpoint."""
from functools import lru_cache

import numpy as np

SCALE = 1.0


@lru_cache(maxsize=48)
def band_for(half_hour):
    hour = half_hour / 2.0
    return (21.0, 24.0) if 7.0 <= hour < 18.0 else (16.0, 28.0)


class Controller:
    def __init__(self, spec):
        self.n = len(spec["state_names"])
        self.heat_max = np.asarray(spec["state_hi"], dtype=float) * SCALE
        self.cool_max = -np.asarray(spec["state_lo"], dtype=float) * SCALE

    def step(self, observation):
        c = observation["context"]
        t = np.asarray(c[2 + self.n:2 + 2 * self.n], dtype=float)
        lo, hi = band_for(int(c[1] * 2))
        heat = self.heat_max * np.clip(lo + 0.5 - t, 0, 1)
        cool = self.cool_max * np.clip(t - hi + 0.5, 0, 1)
        return (heat - cool).tolist()
