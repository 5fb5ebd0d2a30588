"""Zone-coupled control: every zone reacts to its own error and the building's median."""
import statistics

import numpy as np

SHARE = 0.95
CAP = 0.7
MID = statistics.fmean([21.0, 24.0])


class Controller:
    def __init__(self, spec):
        self.n = len(spec["state_names"])
        self.heat_max = np.asarray(spec["state_hi"], dtype=float) * CAP
        self.cool_max = -np.asarray(spec["state_lo"], dtype=float) * CAP

    def step(self, observation):
        temps = [float(x) for x in observation["context"][2 + self.n:2 + 2 * self.n]]
        centre = statistics.median(temps)
        error = MID - (SHARE * np.array(temps) + (1 - SHARE) * centre)
        u = np.where(error > 0, self.heat_max * np.tanh(error), self.cool_max * np.tanh(error))
        return [float(x) for x in u]
