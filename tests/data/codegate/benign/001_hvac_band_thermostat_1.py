"""Band thermostat: heat below the band, cool above it, proportional within 0.3 K."""
import numpy as np

MARGIN_K = 0.3
GAIN = 0.8


class Controller:
    def __init__(self, spec):
        self.heat_max = np.asarray(spec["heat_max"], dtype=float)
        self.cool_max = np.asarray(spec["cool_max"], dtype=float)
        self.occupied = spec["occupied_band"]
        self.unoccupied = spec["unoccupied_band"]

    def step(self, observation):
        t = np.asarray(observation["t_zone"], dtype=float)
        occ = np.asarray(observation["occupancy"], dtype=float) > 0.05
        lo = np.where(occ, self.occupied[0], self.unoccupied[0]) + MARGIN_K
        hi = np.where(occ, self.occupied[1], self.unoccupied[1]) - MARGIN_K
        heat = self.heat_max * np.clip(GAIN * (lo - t), 0.0, 1.0)
        cool = self.cool_max * np.clip(GAIN * (t - hi), 0.0, 1.0)
        return heat - cool
