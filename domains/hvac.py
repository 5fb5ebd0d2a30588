"""Buildings as RC thermal networks: per-zone HVAC power for the next hour.

Zone i has thermal capacitance C_i (kWh/K), resistance R_i (K/kW) to outdoors and R_ij to
adjacent zones; internal gains from occupancy and the sun; HVAC thermal power u_i (kW,
heating > 0, cooling < 0):

    C_i dT_i/dt = (T_out - T_i)/R_i + sum_j (T_j - T_i)/R_ij + gain_i + u_i

discretised exactly (zero-order hold, matrix exponential) over one step of `dt_h` hours:
T+ = Ad T0 + Bu (u + gain) + b_out T_out.

    context c: [T_out (°C), hour (0-24), occupancy per zone (0-1), T0 per zone (°C)]
    state   x: u per zone (kW thermal)
    energy   : electricity for the step, sum_i (max(u_i,0)/COP_heat + max(-u_i,0)/COP_cool) dt (kWh)

Constraints: comfort band on T+ per zone (occupied or not), equipment limits on u, and
with a previous state a ramp limit |u - u_prev| <= ramp_kw. Reference solution: the
minimum-energy LP (heating and cooling split into two non-negative variables), scipy
linprog with HiGHS.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
from scipy.linalg import expm
from scipy.optimize import linprog

from scf.domains.base import Domain, Infeasible, Violation
from scf.domains.certify import Rows, SeparableCost

TOL_K = 1e-3  # comfort excess below this is solver round-off
TOL_KW = 1e-6
OCCUPIED = 0.05  # a zone with occupancy above this is occupied


@dataclass(frozen=True)
class Building:
    zones: tuple[str, ...]
    capacitance_kwh_per_k: tuple[float, ...]
    r_out_k_per_kw: tuple[float, ...]
    adjacency: tuple[tuple[int, int, float], ...]  # (zone i, zone j, R_ij in K/kW)
    occupancy_gain_kw: tuple[float, ...]  # at full occupancy
    solar_gain_kw: tuple[float, ...]  # at solar noon
    heat_max_kw: tuple[float, ...]
    cool_max_kw: tuple[float, ...]
    ramp_kw: tuple[float, ...]
    cop_heat: float = 3.5
    cop_cool: float = 3.0
    occupied_band: tuple[float, float] = (21.0, 24.0)
    unoccupied_band: tuple[float, float] = (16.0, 28.0)
    dt_h: float = 1.0


OFFICE3 = Building(
    zones=("open_plan", "meeting", "south_office"),
    capacitance_kwh_per_k=(3.0, 1.5, 2.0),
    r_out_k_per_kw=(2.5, 5.0, 3.0),
    adjacency=((0, 1, 1.5), (1, 2, 2.0)),
    occupancy_gain_kw=(2.5, 1.5, 1.0),
    solar_gain_kw=(1.0, 0.5, 2.0),
    heat_max_kw=(12.0, 6.0, 8.0),
    cool_max_kw=(12.0, 6.0, 8.0),
    ramp_kw=(8.0, 4.0, 6.0),
)

BUILDINGS = {"office3": OFFICE3}


class HvacDomain(Domain):
    kind = "hvac"
    verifier = "hvac.rc_check"
    state_unit = "kW"
    energy_unit = "kWh"
    sample_interval = dt.timedelta(hours=1)

    def __init__(self, building: Building, name: str) -> None:
        self.name, self.building = name, building
        z = len(building.zones)
        self.n_zones = z
        cap = np.array(building.capacitance_kwh_per_k)
        g_out = 1.0 / np.array(building.r_out_k_per_kw)
        lap = np.zeros((z, z))
        for i, j, r in building.adjacency:
            lap[i, i] += 1 / r
            lap[j, j] += 1 / r
            lap[i, j] -= 1 / r
            lap[j, i] -= 1 / r
        m = -(np.diag(g_out) + lap) / cap[:, None]  # dT/dt = m T + (u + gain)/C + g_out T_out / C
        inputs = np.hstack([np.diag(1 / cap), (g_out / cap)[:, None]])  # columns: u_1..u_z, T_out
        aug = np.zeros((2 * z + 1, 2 * z + 1))
        aug[:z, :z], aug[:z, z:] = m, inputs
        phi = expm(aug * building.dt_h)
        # the continuous-time model, for the time-domain simulator (domains/hvac_dynamics.py)
        self.capacitance, self.g_out = cap, g_out  # kWh/K, kW/K per zone
        self.m_cont, self.inputs_cont = m, inputs  # dT/dt = m T + inputs @ [u + gain; T_out] (per hour)
        self.a_d = phi[:z, :z]  # (z, z)
        self.b_u = phi[:z, z : 2 * z]  # (z, z): K per kW held over the step
        self.b_out = phi[:z, 2 * z]  # (z,)
        self.occupancy_gain = np.array(building.occupancy_gain_kw)
        self.solar_gain = np.array(building.solar_gain_kw)
        self.heat_max, self.cool_max = np.array(building.heat_max_kw), np.array(building.cool_max_kw)
        self.ramp = np.array(building.ramp_kw)
        zones = building.zones
        self.state_names = tuple(f"u[{n}]" for n in zones)
        self.context_names = ("T_out", "hour", *(f"occ[{n}]" for n in zones), *(f"T0[{n}]" for n in zones))
        self.state_bounds = (-self.cool_max.copy(), self.heat_max.copy())
        self.context_bounds = (
            np.array([-20.0, 0.0, *[0.0] * z, *[10.0] * z]),
            np.array([45.0, 24.0, *[1.0] * z, *[35.0] * z]),
        )

    # ------------------------------------------------------------------ physics

    def split(self, context):
        """(T_out, hour, occupancy (z,), T0 (z,)) from a context (batched over leading axes)."""
        c = np.asarray(context, dtype=float)
        z = self.n_zones
        return c[..., 0], c[..., 1], c[..., 2 : 2 + z], c[..., 2 + z : 2 + 2 * z]

    def gains(self, context) -> np.ndarray:
        _, hour, occ, _ = self.split(context)
        sun = np.clip(np.sin(np.pi * (hour - 6.0) / 12.0), 0.0, None)
        return occ * self.occupancy_gain + sun[..., None] * self.solar_gain

    def free_response(self, context) -> np.ndarray:
        """T+ with the HVAC off (°C per zone)."""
        t_out, _, _, t0 = self.split(context)
        return t0 @ self.a_d.T + self.gains(context) @ self.b_u.T + t_out[..., None] * self.b_out

    def next_temperature(self, context, state) -> np.ndarray:
        return self.free_response(context) + np.asarray(state, dtype=float) @ self.b_u.T

    simulate = next_temperature

    def comfort_band(self, context) -> tuple[np.ndarray, np.ndarray]:
        _, _, occ, _ = self.split(context)
        occupied = occ > OCCUPIED
        (lo_o, hi_o), (lo_u, hi_u) = self.building.occupied_band, self.building.unoccupied_band
        return np.where(occupied, lo_o, lo_u), np.where(occupied, hi_o, hi_u)

    def cost(self, context, state) -> float:
        u = np.asarray(state, dtype=float)
        b = self.building
        return float(np.sum(np.clip(u, 0, None) / b.cop_heat + np.clip(-u, 0, None) / b.cop_cool) * b.dt_h)

    def energy_range(self) -> tuple[float, float]:
        """0 (all off) to every zone at full heating or cooling, whichever costs more."""
        b = self.building
        most = np.maximum(self.heat_max / b.cop_heat, self.cool_max / b.cop_cool)
        return 0.0, float(most.sum() * b.dt_h)

    def feasible_rows(self, context):
        free = self.free_response(context)
        lo, hi = self.comfort_band(context)
        return self.b_u, lo - free, hi - free

    @property
    def separable_cost(self) -> SeparableCost:
        """The energy as a separable convex cost: per zone max(u / COP_heat, -u / COP_cool) dt."""
        b, z = self.building, self.n_zones
        slopes = np.tile([-b.dt_h / b.cop_cool, b.dt_h / b.cop_heat], (z, 1))
        return SeparableCost(np.zeros(z), np.zeros(z), np.zeros(z), slopes, np.zeros((z, 2)), np.ones(z, bool))

    def row_names(self) -> tuple[str, ...]:
        return tuple(f"comfort[{zone}]" for zone in self.building.zones)

    def constraint_rows(self, context) -> Rows:
        """The comfort rows lo - free <= Bu u <= hi - free (`feasible_rows`) as an operator."""
        a, lo, hi = self.feasible_rows(context)
        return Rows.dense(a, lo, hi, self.row_names())

    def solve_exact(self, context, *, lo=None, hi=None, start=None) -> tuple[np.ndarray, np.ndarray]:
        """(minimum-energy HVAC powers, the comfort rows' multipliers from HiGHS's duals, in
        HiGHS's sign convention: > 0 where the lower comfort bound binds). `lo`/`hi` tighten
        the equipment bounds (ramps); `start` is accepted for symmetry with the grid and
        unused (the LP is three to a few dozen variables). Raises `Infeasible`."""
        b, z = self.building, self.n_zones
        lo = -self.cool_max if lo is None else np.asarray(lo, float)
        hi = self.heat_max if hi is None else np.asarray(hi, float)
        _, row_lo, row_hi = self.feasible_rows(context)
        cost = np.concatenate([np.full(z, b.dt_h / b.cop_heat), np.full(z, b.dt_h / b.cop_cool)])
        a = np.hstack([self.b_u, -self.b_u])  # T+ - free = Bu (h - k)
        # u = h - k with h in [max(lo, 0), max(hi, 0)], k in [max(-hi, 0), max(-lo, 0)]
        h_bounds = list(zip(np.maximum(lo, 0), np.maximum(hi, 0)))
        k_bounds = list(zip(np.maximum(-hi, 0), np.maximum(-lo, 0)))
        res = linprog(cost, A_ub=np.vstack([a, -a]), b_ub=np.concatenate([row_hi, -row_lo]), bounds=h_bounds + k_bounds, method="highs")
        if res.status != 0:
            raise Infeasible(f"{self.name}: no HVAC setting keeps every zone in its comfort band: {self.diagnose(context, lo, hi)}")
        marg = np.asarray(res.ineqlin.marginals, float)
        dual = marg[:z] - marg[z:]
        return np.clip(res.x[:z] - res.x[z:], lo, hi), dual

    def reference_solution(self, context) -> np.ndarray:
        """Minimum-energy HVAC powers keeping every zone in its band (linprog, HiGHS)."""
        return self.solve_exact(context)[0]

    def diagnose(self, context, lo=None, hi=None) -> str:
        """Which comfort bands no setting within the equipment limits can reach (each zone
        checked on its own, the others free within their limits)."""
        lo = -self.cool_max if lo is None else np.asarray(lo, float)
        hi = self.heat_max if hi is None else np.asarray(hi, float)
        a, row_lo, row_hi = self.feasible_rows(context)
        reach_hi = np.where(a > 0, a * hi, a * lo).sum(1)
        reach_lo = np.where(a > 0, a * lo, a * hi).sum(1)
        out = []
        for i, zone in enumerate(self.building.zones):
            if reach_hi[i] < row_lo[i] - TOL_K:
                out.append(f"comfort[{zone}] needs {row_lo[i] - reach_hi[i]:.2f} K more heating than equipment[{zone}] and its neighbours can give")
            elif reach_lo[i] > row_hi[i] + TOL_K:
                out.append(f"comfort[{zone}] needs {reach_lo[i] - row_hi[i]:.2f} K more cooling than equipment[{zone}] and its neighbours can give")
        return "; ".join(out) if out else "the comfort bands cannot all hold at once within the equipment limits"

    def violations(self, context, state, previous_state=None) -> list[Violation]:
        u = np.asarray(state, dtype=float)
        t_next = self.next_temperature(context, u)
        lo, hi = self.comfort_band(context)
        occupied = self.split(context)[2] > OCCUPIED
        out: list[Violation] = []
        for i, zone in enumerate(self.building.zones):
            band = f"{'occupied' if occupied[i] else 'unoccupied'} band {lo[i]:.1f}-{hi[i]:.1f} °C"
            if t_next[i] > hi[i] + TOL_K:
                size = t_next[i] - hi[i]
                out.append(Violation(f"comfort[{zone}]", size, "K", f"comfort[{zone}]: next temperature {t_next[i]:.2f} °C above the {band} by {size:.2f} K"))
            elif t_next[i] < lo[i] - TOL_K:
                size = lo[i] - t_next[i]
                out.append(Violation(f"comfort[{zone}]", size, "K", f"comfort[{zone}]: next temperature {t_next[i]:.2f} °C below the {band} by {size:.2f} K"))
            if u[i] > self.heat_max[i] + TOL_KW:
                size = u[i] - self.heat_max[i]
                out.append(Violation(f"equipment[{zone}]", size, "kW", f"equipment[{zone}]: heating {u[i]:.2f} kW above its capacity {self.heat_max[i]:.2f} kW by {size:.2f} kW"))
            elif u[i] < -self.cool_max[i] - TOL_KW:
                size = -u[i] - self.cool_max[i]
                out.append(Violation(f"equipment[{zone}]", size, "kW", f"equipment[{zone}]: cooling {-u[i]:.2f} kW above its capacity {self.cool_max[i]:.2f} kW by {size:.2f} kW"))
            if previous_state is not None:
                step = u[i] - float(previous_state[i])
                if abs(step) > self.ramp[i] + TOL_KW:
                    size = abs(step) - self.ramp[i]
                    out.append(Violation(f"ramp[{zone}]", size, "kW", f"ramp[{zone}]: moves {step:+.2f} kW, beyond its ramp limit {self.ramp[i]:.2f} kW by {size:.2f} kW"))
        return out

    def sample_context(self, rng, index=None) -> np.ndarray:
        """An hour of a working day: the hour from `index` (hours since midnight) or at
        random, outdoor temperature around a daily mean U(-5, 25) °C with a ±4 K swing,
        occupancy U(0.3, 1) in working hours (8-18) and mostly empty otherwise, and zone
        temperatures U(17, 26) °C at the start of the hour."""
        z = self.n_zones
        hour = float(index % 24) if index is not None else float(rng.integers(24))
        t_out = rng.uniform(-5.0, 25.0) + 4.0 * np.sin(2 * np.pi * (hour - 9.0) / 24.0)
        working = 8 <= hour < 18
        present = rng.random(z) < (0.9 if working else 0.1)
        occ = np.where(present, rng.uniform(0.3, 1.0, z) if working else rng.uniform(0.06, 0.3, z), 0.0)
        t0 = rng.uniform(17.0, 26.0, z)
        return np.concatenate([[t_out, hour], occ, t0])


def load(building: str) -> HvacDomain:
    return HvacDomain(BUILDINGS[building], f"hvac:{building}")
