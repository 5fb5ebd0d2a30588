"""Band lookup cached per hour; occupancy-weighted setpoint."""
from functools import lru_cache

import numpy as np

SCALE = 0.8


@lru_cache(maxsize=48)
def band_for(hour_index, occupied_band, unoccupied_band, start, end):
    hour = hour_index / 2.0
    return occupied_band if start - 1 <= hour < end else unoccupied_band


class Controller:
    def __init__(self, spec):
        self.spec = spec
        self.heat_max = np.asarray(spec["heat_max"], dtype=float) * SCALE
        self.cool_max = np.asarray(spec["cool_max"], dtype=float) * SCALE

    def step(self, observation):
        hours = np.asarray(observation["hour"], dtype=float)
        t = np.asarray(observation["t_zone"], dtype=float)
        s = self.spec
        bands = np.array([band_for(int(h * 2), tuple(s["occupied_band"]), tuple(s["unoccupied_band"]), *s["work_hours"]) for h in hours])
        lo, hi = bands[:, :1] + 0.5, bands[:, 1:] - 0.5
        return self.heat_max * np.clip(lo - t, 0, 1) - self.cool_max * np.clip(t - hi, 0, 1)
