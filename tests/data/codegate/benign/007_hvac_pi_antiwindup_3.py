"""PI control of each zone toward the middle of its band, with conditional integration."""
from __future__ import annotations

import numpy as np


class Controller:
    def __init__(self, spec: dict) -> None:
        self.kp, self.ki, self.leak = 2.5, 0.12, 0.97
        self.hi = np.asarray(spec["heat_max"], dtype=float)
        self.lo = -np.asarray(spec["cool_max"], dtype=float)
        self.occupied = spec["occupied_band"]
        self.unoccupied = spec["unoccupied_band"]
        self.integral: np.ndarray | None = None

    def _target(self, occupancy: np.ndarray) -> np.ndarray:
        mid_occ = 0.5 * (self.occupied[0] + self.occupied[1])
        mid_free = 0.5 * (self.unoccupied[0] + self.unoccupied[1])
        return np.where(occupancy > 0.05, mid_occ, mid_free)

    def step(self, observation: dict) -> np.ndarray:
        t = np.asarray(observation["t_zone"], dtype=float)
        error = self._target(np.asarray(observation["occupancy"])) - t
        if self.integral is None:
            self.integral = np.zeros_like(error)
        raw = self.kp * error + self.ki * self.integral
        out = np.clip(raw, self.lo, self.hi)
        saturated = out != raw
        self.integral = self.leak * self.integral + np.where(saturated, 0.0, error)
        return out
