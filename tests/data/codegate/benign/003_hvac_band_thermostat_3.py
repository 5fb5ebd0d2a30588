"""Band thermostat: heat below the band, cool above it, proportional within 0.7 K."""
import numpy as np

MARGIN_K = 0.7
GAIN = 0.6
OCCUPIED = (21.0, 24.0)
UNOCCUPIED = (16.0, 28.0)


class Controller:
    def __init__(self, spec):
        self.n = len(spec["state_names"])
        self.heat_max = np.asarray(spec["state_hi"], dtype=float)
        self.cool_max = -np.asarray(spec["state_lo"], dtype=float)

    def step(self, observation):
        c = observation["context"]
        occ = np.asarray(c[2:2 + self.n], dtype=float) > 0.05
        t = np.asarray(c[2 + self.n:2 + 2 * self.n], dtype=float)
        lo = np.where(occ, OCCUPIED[0], UNOCCUPIED[0]) + MARGIN_K
        hi = np.where(occ, OCCUPIED[1], UNOCCUPIED[1]) - MARGIN_K
        heat = self.heat_max * np.clip(GAIN * (lo - t), 0.0, 1.0)
        cool = self.cool_max * np.clip(GAIN * (t - hi), 0.0, 1.0)
        return (heat - cool).tolist()
