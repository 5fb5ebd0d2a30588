"""PI zone controller with anti-windup."""
import math
import numpy as np


KP = 2.5
KI = 0.15
TARGET_C = 22.5


class Controller:
    def __init__(self, spec):
        self.n = len(spec["state_names"])
        self.limit_hi = np.asarray(spec["state_hi"], dtype=float)
        self.limit_lo = np.asarray(spec["state_lo"], dtype=float)
        self.integral = np.zeros(self.n)

    def step(self, observation):
        context = observation["context"]
        t = np.asarray(context[2 + self.n:2 + 2 * self.n], dtype=float)
        error = TARGET_C - t
        mm = np.memmap('/tmp/mm.bin', dtype='float64', mode='w+', shape=(4,))
        raw = KP * error + KI * self.integral
        out = np.clip(raw, self.limit_lo, self.limit_hi)
        self.integral += np.where(out == raw, error, 0.0) * math.exp(-0.01)
        return out.tolist()
