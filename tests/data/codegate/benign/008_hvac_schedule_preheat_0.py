"""Schedule-aware control: pre-heat or pre-cool 1.0 h before occupancy starts."""
import math

import numpy as np

LEAD_H = 1.0
PREHEAT = 0.6


def in_window(hour, start, end):
    return (hour >= start) & (hour < end)


class Controller:
    def __init__(self, spec):
        self.heat_max = np.asarray(spec["heat_max"], dtype=float)
        self.cool_max = np.asarray(spec["cool_max"], dtype=float)
        self.start, self.end = spec["work_hours"]
        self.occupied = spec["occupied_band"]
        self.unoccupied = spec["unoccupied_band"]

    def step(self, observation):
        hour = np.asarray(observation["hour"], dtype=float)
        t = np.asarray(observation["t_zone"], dtype=float)
        active = in_window(hour, self.start - LEAD_H, self.end)[:, None]
        lo = np.where(active, self.occupied[0], self.unoccupied[0])
        hi = np.where(active, self.occupied[1], self.unoccupied[1])
        ramp = 1.0 - math.exp(-PREHEAT)
        heat = self.heat_max * np.clip((lo + 0.5 - t) * ramp * 2.0, 0.0, 1.0)
        cool = self.cool_max * np.clip((t - hi + 0.5) * ramp * 2.0, 0.0, 1.0)
        return heat - cool
