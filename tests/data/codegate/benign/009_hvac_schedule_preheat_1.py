"""Schedule-aware control: pre-heat or pre-cool 1.5 h before occupancy starts."""
import math

import numpy as np

LEAD_H = 1.5
PREHEAT = 0.8
WORK_HOURS = (8.0, 18.0)


def in_window(hour, start, end):
    return start <= hour < end


class Controller:
    def __init__(self, spec):
        self.n = len(spec["state_names"])
        self.heat_max = np.asarray(spec["state_hi"], dtype=float)
        self.cool_max = -np.asarray(spec["state_lo"], dtype=float)

    def step(self, observation):
        c = observation["context"]
        hour = c[1]
        t = np.asarray(c[2 + self.n:2 + 2 * self.n], dtype=float)
        active = in_window(hour, WORK_HOURS[0] - LEAD_H, WORK_HOURS[1])
        lo, hi = (21.0, 24.0) if active else (16.0, 28.0)
        ramp = 1.0 - math.exp(-PREHEAT)
        heat = self.heat_max * np.clip((lo + 0.5 - t) * ramp * 2.0, 0.0, 1.0)
        cool = self.cool_max * np.clip((t - hi + 0.5) * ramp * 2.0, 0.0, 1.0)
        return list(heat - cool)
