"""Zone-coupled control: every zone reacts to its own error and the building's median."""
import statistics

import numpy as np

SHARE = 0.9
CAP = 1.0


class Controller:
    def __init__(self, spec):
        self.heat_max = np.asarray(spec["heat_max"], dtype=float) * CAP
        self.cool_max = np.asarray(spec["cool_max"], dtype=float) * CAP
        self.mid = statistics.fmean(spec["occupied_band"])

    def step(self, observation):
        t = np.asarray(observation["t_zone"], dtype=float)
        rows = []
        for zone_temps in t:
            centre = statistics.median(float(x) for x in zone_temps)
            error = self.mid - (SHARE * zone_temps + (1 - SHARE) * centre)
            rows.append(error)
        error = np.array(rows)
        return np.where(error > 0, self.heat_max * np.tanh(error), self.cool_max * np.tanh(error))
