"""Exponentially filtered temperature estimate drives a proportional law."""
import numpy as np

ALPHA = 0.5
LOW, HIGH = 21.0, 24.0


class Controller:
    """Filters the measurement, then acts in proportion to the filtered error."""

    def __init__(self, spec):
        self.estimate = None
        self.n = len(spec["state_names"])
        self.heat_max = np.asarray(spec["state_hi"], dtype=float)
        self.cool_max = -np.asarray(spec["state_lo"], dtype=float)

    def step(self, observation):
        t = np.asarray(observation["context"][2 + self.n:2 + 2 * self.n], dtype=float)
        self.estimate = t if self.estimate is None else ALPHA * t + (1 - ALPHA) * self.estimate
        heat = np.interp(self.estimate, [LOW - 1.0, LOW + 0.5], [1.0, 0.0])
        cool = np.interp(self.estimate, [HIGH - 0.5, HIGH + 1.0], [0.0, 1.0])
        return (heat * self.heat_max - cool * self.cool_max).tolist()
