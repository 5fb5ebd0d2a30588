"""PI control of each zone toward the middle of its band, with conditional integration."""
from __future__ import annotations

import numpy as np

BANDS = {"occupied": (21.0, 24.0), "unoccupied": (16.0, 28.0)}


class Controller:
    def __init__(self, spec: dict) -> None:
        self.kp, self.ki, self.leak = 2.0, 0.1, 0.98
        self.n = len(spec["state_names"])
        self.hi = np.asarray(spec["state_hi"], dtype=float)
        self.lo = np.asarray(spec["state_lo"], dtype=float)
        self.integral = np.zeros(self.n)

    def _target(self, occupancy: np.ndarray) -> np.ndarray:
        mid_occ = sum(BANDS["occupied"]) / 2
        mid_free = sum(BANDS["unoccupied"]) / 2
        return np.where(occupancy > 0.05, mid_occ, mid_free)

    def step(self, observation: dict) -> list[float]:
        c = observation["context"]
        occupancy = np.asarray(c[2:2 + self.n], dtype=float)
        t = np.asarray(c[2 + self.n:2 + 2 * self.n], dtype=float)
        error = self._target(occupancy) - t
        raw = self.kp * error + self.ki * self.integral
        out = np.clip(raw, self.lo, self.hi)
        saturated = out != raw
        self.integral = self.leak * self.integral + np.where(saturated, 0.0, error)
        return out.tolist()
