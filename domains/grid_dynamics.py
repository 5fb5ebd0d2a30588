"""A power network of domains/grid.py in time: dispatch over a stochastic load trajectory
with ramp limits, and the system's frequency after its largest generator trips.

Two time scales, batched over scenarios:

* **Dispatch** (5-minute steps, hours): bus loads = nominal x a daily profile x (1 + a
  system-wide OU, std 3 %, correlation 2 h) x (1 + a per-bus OU, std 2 %, correlation 1 h).
  A controller chooses setpoints (`opf`: the domain's DC-OPF on the forecast load each
  step, the deviation from the forecast shared by participation factors as AGC would;
  `prorata`: the status quo, every unit at the same fraction of its range; or a decision
  file); the plant moves each unit toward its setpoint within its ramp rate and limits
  (`GridPlant.step`). Measured: cost, imbalance, line loading, and the N-1 reserve
  shortfall (the largest unit's output beyond the primary reserve of the others).
* **Frequency** (seconds, after a contingency): at a random step of each scenario the
  unit with the largest output trips. The rest respond as Anderson & Mirheydar's system
  frequency response (SFR) model (IEEE Trans. Power Systems 5(3), 1990): the aggregated
  swing equation with load damping and reheat-steam governors with droop,

      2H dw/dt = dPm - dPd - D w,   x = min(-(Km/R) w, reserve),
      T_R dy/dt = x - y,            dPm = F_H x + (1 - F_H) y,

  in per unit of the remaining units' capacity, with the governors' output capped at the
  primary reserve they hold (headroom, at most `reserve_fraction` of each unit's Pmax),
  and load noise (OU, std 0.2 % of demand, correlation 5 s) on top of the trip. Integrated
  with scipy's solve_ivp (RK45, every scenario in one vectorised system). MATPOWER cases
  carry no dynamic data: every unit gets the paper's typical parameters
  (`FrequencyParams`), so the system's H and R are those and the scenario sets the size of
  the trip, the reserve and the load.

Outputs per scenario: cost, energy, imbalance, reserve shortfall, line loading; frequency
nadir, RoCoF (steepest 500 ms slope), settling time (into ±20 mHz of the settled value),
settled frequency, load shed by under-frequency load shedding (three stages), and whether
the nadir falls below 57.5 Hz (`collapsed`: generator protection would act; the model ends there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.integrate import solve_ivp

from scf.domains.base import Infeasible
from scf.domains.dynamics import OrnsteinUhlenbeck, SimResult, SimulationError, load_decision, scenario_normals, scenario_uniforms
from scf.domains.grid import GridDomain

SYSTEM_LOAD = OrnsteinUhlenbeck.from_std(0.03, 2.0)  # relative, hours
BUS_LOAD = OrnsteinUhlenbeck.from_std(0.02, 1.0)


@dataclass(frozen=True)
class FrequencyParams:
    """Per-unit SFR parameters: Anderson & Mirheydar's typical reheat-steam values."""

    h_s: float = 4.0  # inertia constant (s) on the unit's rating
    r: float = 0.05  # droop (pu)
    f_h: float = 0.3  # high-pressure turbine fraction
    t_r: float = 8.0  # reheat time constant (s)
    km: float = 0.95  # mechanical power gain factor
    d: float = 1.0  # load damping (pu power / pu frequency, on the load)
    f0_hz: float = 60.0  # the IEEE cases are North American
    reserve_fraction: float = 0.1  # primary reserve a unit can deliver, of its Pmax
    ufls_stages: tuple[tuple[float, float], ...] = ((59.3, 0.05), (58.9, 0.10), (58.5, 0.10))  # (Hz, share of demand shed)
    collapse_hz: float = 57.5  # below this, generators' own under-frequency protection would trip them: the model no longer holds
    window_s: float = 60.0
    dt_s: float = 0.1  # output and load-noise sample step
    load_noise_std: float = 0.002  # of demand
    load_noise_tau_s: float = 5.0
    settle_band_hz: float = 0.02
    rocof_window_s: float = 0.5


# --------------------------------------------------------------------------- frequency


def sfr_closed_form(h: float, r: float, f_h: float, t_r: float, km: float, d: float, p_step: float) -> dict[str, float]:
    """Anderson & Mirheydar (1990) closed form of the SFR model's response to a step
    `p_step` (pu, lost generation > 0) without limits: steady-state deviation, nadir and
    its time (w in pu of nominal frequency, negative for a loss).

        w(s) = -(R wn^2 / (DR + Km)) (1 + T_R s) / (s^2 + 2 zeta wn s + wn^2) P(s)
        wn^2 = (DR + Km) / (2 H R T_R),  zeta = wn (2HR + (DR + Km F_H) T_R) / (2 (DR + Km))
        w(t) = -(R P / (DR + Km)) (1 + alpha e^(-zeta wn t) sin(wr t + phi))
    """
    wn = np.sqrt((d * r + km) / (2 * h * r * t_r))
    zeta = wn * (2 * h * r + (d * r + km * f_h) * t_r) / (2 * (d * r + km))
    wr = wn * np.sqrt(1 - zeta**2)
    alpha = np.sqrt((1 - 2 * t_r * zeta * wn + t_r**2 * wn**2) / (1 - zeta**2))
    phi = np.arctan2(wr * t_r, 1 - zeta * wn * t_r) - np.arctan2(np.sqrt(1 - zeta**2), -zeta)
    t_nadir = np.arctan2(wr * t_r, zeta * wn * t_r - 1) / wr
    ss = -r * p_step / (d * r + km)
    response = lambda t: ss * (1 + alpha * np.exp(-zeta * wn * t) * np.sin(wr * t + phi))
    return {"steady_state": float(ss), "nadir": float(response(t_nadir)), "t_nadir": float(t_nadir), "wn": float(wn), "zeta": float(zeta)}


def sfr_response(
    t_eval: np.ndarray,
    p_step: np.ndarray,
    *,
    h: np.ndarray | float,
    r: np.ndarray | float,
    f_h: np.ndarray | float,
    t_r: np.ndarray | float,
    km: np.ndarray | float,
    d: np.ndarray | float,
    reserve: np.ndarray | float = np.inf,
    shed_at: np.ndarray | None = None,
    shed: np.ndarray | None = None,
    load_noise: np.ndarray | None = None,
    noise_dt: float = 0.1,
    rtol: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:
    """Frequency deviation w (pu) at `t_eval` (s) for n scenarios at once: each a step
    `p_step` (pu, > 0 a loss) at t = 0, governors capped at `reserve` (pu), plus a load
    noise path (n, M) sampled every `noise_dt` s (linear between samples). Under-frequency
    load shedding: once w has fallen below `shed_at[i]` (pu, (S,)), load `shed[:, i]` (pu,
    (n, S)) is disconnected for good (a running-minimum state latches it). Every argument
    broadcasts over the n scenarios. Returns w (n, len(t_eval)) and the lowest w reached
    (n,), which is the latch state (the minimum between output samples included)."""
    p_step = np.atleast_1d(np.asarray(p_step, dtype=float))
    n = p_step.shape[0]
    h, r, f_h, t_r, km, d, reserve = (np.broadcast_to(np.asarray(v, dtype=float), (n,)) for v in (h, r, f_h, t_r, km, d, reserve))
    gain = km / r
    if load_noise is not None:
        load_noise = np.asarray(load_noise, dtype=float)
        last = load_noise.shape[1] - 1

    def noise(t: float) -> np.ndarray:
        if load_noise is None:
            return 0.0  # type: ignore[return-value]
        pos = min(max(t / noise_dt, 0.0), last)
        i = min(int(pos), last - 1) if last > 0 else 0
        w = pos - i
        return load_noise[:, i] * (1 - w) + load_noise[:, min(i + 1, last)] * w

    stages = np.zeros(0) if shed_at is None else np.asarray(shed_at, dtype=float)
    shed_pu = np.zeros((n, 0)) if shed is None else np.broadcast_to(np.asarray(shed, dtype=float), (n, len(stages)))

    def rhs(t: float, s: np.ndarray) -> np.ndarray:
        w, y, low = s[:n], s[n : 2 * n], s[2 * n :]
        x = np.minimum(-gain * w, reserve)
        shed_now = (shed_pu * (low[:, None] < stages)).sum(1)
        dw = (f_h * x + (1 - f_h) * y - p_step + shed_now - noise(t) - d * w) / (2 * h)
        return np.concatenate([dw, (x - y) / t_r, np.where(w <= low, np.minimum(dw, 0.0), 0.0)])

    t_eval = np.asarray(t_eval, dtype=float)
    max_step = noise_dt if load_noise is not None else np.inf
    sol = solve_ivp(rhs, (0.0, float(t_eval[-1])), np.zeros(3 * n), method="RK45", t_eval=t_eval, rtol=rtol, atol=1e-10, max_step=max_step)
    if not sol.success:  # pragma: no cover - RK45 on this smooth, bounded system does not fail
        raise SimulationError(f"frequency integration failed: {sol.message}")
    return sol.y[:n], np.minimum(sol.y[2 * n :, -1], sol.y[:n].min(1))


def frequency_metrics(t: np.ndarray, f_hz: np.ndarray, p: FrequencyParams) -> dict[str, np.ndarray]:
    """Nadir, steepest RoCoF over a `rocof_window_s` window, settled frequency (mean of the
    last 10 s), settling time into ±`settle_band_hz` of it (NaN: not settled in the window)."""
    dt = t[1] - t[0]
    lag = max(1, round(p.rocof_window_s / dt))
    rocof = np.abs(f_hz[:, lag:] - f_hz[:, :-lag]).max(1) / (lag * dt)
    settled = f_hz[:, t >= t[-1] - 10.0].mean(1)
    outside = np.abs(f_hz - settled[:, None]) > p.settle_band_hz
    last_out = np.where(outside.any(1), len(t) - 1 - np.argmax(outside[:, ::-1], axis=1), -1)
    settling = np.where(last_out >= len(t) - 1, np.nan, t[np.minimum(last_out + 1, len(t) - 1)])
    settling = np.where(last_out < 0, 0.0, settling)
    return {"nadir_hz": f_hz.min(1), "rocof_hz_s": rocof, "steady_state_hz": settled, "settling_s": settling}


# --------------------------------------------------------------------------- dispatch


@dataclass(frozen=True)
class GridMeasurement:
    pg: np.ndarray  # (n, G) MW applied over the step
    demand_mw: np.ndarray  # (n,)
    imbalance_mw: np.ndarray  # (n,) generation - demand
    cost_per_h: np.ndarray  # (n,) $/h
    reserve_mw: np.ndarray  # (n,) primary reserve held (sum of capped headroom)
    shortfall_mw: np.ndarray  # (n,) N-1: largest output beyond the others' reserve (0 when covered)
    max_loading: np.ndarray  # (n,) max |flow| / rateA over limited branches


class GridPlant:
    """The units of `domain` moving toward setpoints within ramp rates, `dt_h` hours a step."""

    def __init__(self, domain: GridDomain, dt_h: float = 5.0 / 60.0, params: FrequencyParams = FrequencyParams()) -> None:
        if not (1.0 / 3600.0 - 1e-12 <= dt_h <= 1.0):
            raise SimulationError(f"dispatch step {dt_h * 60:g} min: use a step between 1 second and 60 minutes")
        self.domain, self.dt_h, self.params = domain, dt_h, params
        interval_h = domain.sample_interval.total_seconds() / 3600.0
        self.ramp_per_step = domain.ramp * dt_h / interval_h  # the domain's ramp is per sample interval
        self.reserve_cap = params.reserve_fraction * domain.pmax

    def limit(self, pg_prev: np.ndarray, setpoint: np.ndarray) -> np.ndarray:
        d = self.domain
        pg = np.clip(setpoint, pg_prev - self.ramp_per_step, pg_prev + self.ramp_per_step)
        return np.clip(pg, d.pmin, d.pmax)

    def measure(self, pg: np.ndarray, loads: np.ndarray) -> GridMeasurement:
        d = self.domain
        demand = d.demand(loads)
        headroom = np.minimum(d.pmax - pg, self.reserve_cap)
        need = pg - (headroom.sum(1, keepdims=True) - headroom)  # unit g trips: its output vs the others' reserve
        flows = d.flows(loads, pg)
        rated = np.flatnonzero(np.isfinite(d.rate))
        loading = (np.abs(flows[:, rated]) / d.rate[rated]).max(1) if len(rated) else np.zeros(len(pg))
        return GridMeasurement(pg, demand, pg.sum(1) - demand, d.costs(pg), headroom.sum(1),
                               np.maximum(need.max(1), 0.0), loading)  # fmt: skip

    def step(self, pg_prev: np.ndarray, setpoint: np.ndarray, loads: np.ndarray) -> GridMeasurement:
        """Move to `setpoint` as far as ramps and limits allow; measure against `loads` (n, L)."""
        return self.measure(self.limit(pg_prev, np.asarray(setpoint, dtype=float)), loads)


def load_trajectory(domain: GridDomain, *, scenarios: int, steps: int, dt_h: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(actual (n, K, L), forecast (K, L)) bus loads in MW at each step (see the module doc)."""
    hours = dt_h * np.arange(steps)
    forecast = domain.nominal_load * daily_profile(hours)[:, None]
    system = SYSTEM_LOAD.paths(scenario_normals(seed, scenarios, (steps,), stream=20), dt_h)  # (n, K)
    bus = BUS_LOAD.paths(scenario_normals(seed, scenarios, (len(domain.nominal_load), steps), stream=21), dt_h)  # (n, L, K)
    actual = forecast[None] * (1 + system[:, :, None]) * (1 + bus.transpose(0, 2, 1))
    return np.clip(actual, 0.0, None), forecast


def daily_profile(hours: np.ndarray) -> np.ndarray:
    """Load relative to the case's nominal: 0.9 at 4 h, 1.1 at 16 h."""
    return 1.0 + 0.1 * np.sin(2 * np.pi * (np.asarray(hours) - 10.0) / 24.0)


Controller = Callable[[int, np.ndarray, np.ndarray], np.ndarray]  # (step, pg_prev (n, G), loads (n, L)) -> setpoint (n, G)


def participation(domain: GridDomain, base: np.ndarray, demand: np.ndarray) -> np.ndarray:
    """`base` (.., G) plus the gap to `demand` shared in proportion to each unit's range,
    among the units not yet at a limit (what a unit cannot take passes to the others)."""
    return share_within(domain.pmin, domain.pmax, base, demand)


def share_within(lo: np.ndarray, hi: np.ndarray, base: np.ndarray, demand: np.ndarray) -> np.ndarray:
    """`participation` within bounds `lo`, `hi` (a step's ramp window, an outage's zero)."""
    x = np.clip(base, lo, hi)
    for _ in range(len(lo)):
        gap = demand - x.sum(-1)
        free = np.where(gap[..., None] > 0, x < hi - 1e-9, x > lo + 1e-9)
        weight = (hi - lo) * free
        total = weight.sum(-1, keepdims=True)
        x = np.clip(x + gap[..., None] * np.divide(weight, total, out=np.zeros_like(weight), where=total > 0), lo, hi)
        if np.all(np.abs(demand - x.sum(-1)) < 1e-9):
            break
    return x


def prorata(plant: GridPlant, forecast: np.ndarray) -> Controller:
    """The status quo: every unit at the same fraction of its range, meeting the demand."""
    d = plant.domain
    return lambda k, pg_prev, loads: participation(d, np.broadcast_to(d.pmin, pg_prev.shape), d.demand(loads))


def opf(plant: GridPlant, forecast: np.ndarray) -> Controller:
    """The domain's DC-OPF (HiGHS) on the forecast load of each step (one solve per step,
    shared by every scenario), the deviation of the actual demand from the forecast shared
    by participation factors (AGC); a step whose OPF is infeasible falls back to pro rata."""
    d = plant.domain
    cache: dict[int, np.ndarray] = {}

    def decide(k: int, pg_prev: np.ndarray, loads: np.ndarray) -> np.ndarray:
        if k not in cache:
            try:
                cache[k] = d.reference_solution(forecast[k])
            except Infeasible:
                cache[k] = participation(d, d.pmin, d.demand(forecast[k]))
        return participation(d, np.broadcast_to(cache[k], pg_prev.shape), d.demand(loads))

    return decide


def scheduled(plant: GridPlant, schedule: np.ndarray) -> Controller:
    """A decision: a dispatch (MW per unit) per hour (last row held), deviations shared by participation."""
    d = plant.domain
    per_hour = max(1, round(1.0 / plant.dt_h))
    return lambda k, pg_prev, loads: participation(d, np.broadcast_to(schedule[min(k // per_hour, len(schedule) - 1)], pg_prev.shape), d.demand(loads))


CONTROLLERS: dict[str, Callable[[GridPlant, np.ndarray], Controller]] = {"opf": opf, "prorata": prorata}


@dataclass(frozen=True)
class GridRun:
    loads: np.ndarray  # (n, K, L)
    pg: np.ndarray  # (n, K, G)
    demand_mw: np.ndarray  # (n, K)
    imbalance_mw: np.ndarray
    cost_per_h: np.ndarray
    reserve_mw: np.ndarray
    shortfall_mw: np.ndarray
    max_loading: np.ndarray


def run_dispatch(plant: GridPlant, loads: np.ndarray, controller: Controller) -> GridRun:
    d = plant.domain
    n = loads.shape[0]
    pg = np.clip(controller(0, np.tile(d.pmin, (n, 1)), loads[:, 0]), d.pmin, d.pmax)  # start balanced, no ramp
    ms = []
    for k in range(loads.shape[1]):
        m = plant.step(pg, controller(k, pg, loads[:, k]), loads[:, k]) if k else plant.measure(pg, loads[:, 0])
        pg = m.pg
        ms.append(m)
    stack = lambda name: np.stack([getattr(m, name) for m in ms], axis=1)
    return GridRun(loads, stack("pg"), stack("demand_mw"), stack("imbalance_mw"), stack("cost_per_h"), stack("reserve_mw"),
                   stack("shortfall_mw"), stack("max_loading"))  # fmt: skip


@dataclass(frozen=True)
class Contingency:
    step: np.ndarray  # (n,) dispatch step at which the unit trips
    unit: np.ndarray  # (n,) index of the tripped unit
    tripped_mw: np.ndarray
    reserve_mw: np.ndarray  # primary reserve of the remaining units
    shed_mw: np.ndarray  # load disconnected by under-frequency load shedding
    nadir_hz: np.ndarray  # the lowest frequency, between output samples included
    t_s: np.ndarray  # (T,)
    f_hz: np.ndarray  # (n, T)


def contingency(plant: GridPlant, r: GridRun, *, seed: int) -> Contingency:
    """The largest unit (by output) trips at a random step of each scenario; the SFR model
    of the remaining units gives the frequency over `params.window_s` seconds."""
    d, p = plant.domain, plant.params
    n, steps = r.pg.shape[0], r.pg.shape[1]
    k = np.minimum((scenario_uniforms(seed, n, (1,), stream=22)[:, 0] * steps).astype(int), steps - 1)
    pg = r.pg[np.arange(n), k]  # (n, G)
    demand = r.demand_mw[np.arange(n), k]
    unit = pg.argmax(1)
    online = np.ones_like(pg, dtype=bool)
    online[np.arange(n), unit] = False
    base = (d.pmax * online).sum(1)  # MW: capacity of the remaining units, the per-unit base
    reserve = (np.minimum(d.pmax - pg, plant.reserve_cap) * online).sum(1)
    tripped = pg[np.arange(n), unit]
    t = np.arange(0.0, p.window_s + p.dt_s / 2, p.dt_s)
    noise = OrnsteinUhlenbeck.from_std(p.load_noise_std, p.load_noise_tau_s).paths(scenario_normals(seed, n, (len(t),), stream=23), p.dt_s)
    thresholds = np.array([hz for hz, _ in p.ufls_stages]) / p.f0_hz - 1.0
    shares = np.array([share for _, share in p.ufls_stages])
    w, lowest = sfr_response(t, tripped / base, h=p.h_s, r=p.r, f_h=p.f_h, t_r=p.t_r, km=p.km, d=p.d * demand / base, reserve=reserve / base,
                     shed_at=thresholds, shed=shares[None, :] * (demand / base)[:, None],
                     load_noise=noise * demand[:, None] / base[:, None], noise_dt=p.dt_s)  # fmt: skip
    shed_mw = ((lowest[:, None] < thresholds) * shares).sum(1) * demand
    return Contingency(k, unit, tripped, reserve, shed_mw, p.f0_hz * (1.0 + lowest), t, p.f0_hz * (1.0 + w))


def run(
    domain: GridDomain,
    *,
    scenarios: int,
    hours: float,
    seed: int,
    controller: str | None = None,
    decision: Path | str | None = None,
    step_minutes: float | None = None,
    params: FrequencyParams = FrequencyParams(),
) -> SimResult:
    import pyarrow as pa

    dt_h = (5.0 if step_minutes is None else step_minutes) / 60.0
    plant = GridPlant(domain, dt_h, params)
    steps = max(1, round(hours / dt_h))
    loads, forecast = load_trajectory(domain, scenarios=scenarios, steps=steps, dt_h=dt_h, seed=seed)
    if decision is not None:
        schedule = load_decision(decision, len(domain.pmax), domain.state_names)
        name, ctrl = f"decision:{Path(decision).name}", scheduled(plant, schedule)
    else:
        name = controller or "opf"
        if name not in CONTROLLERS:
            raise SimulationError(f"unknown controller {name!r} for {domain.name}: use one of {', '.join(CONTROLLERS)}")
        ctrl = CONTROLLERS[name](plant, forecast)
    r = run_dispatch(plant, loads, ctrl)
    c = contingency(plant, r, seed=seed)
    fm = frequency_metrics(c.t_s, c.f_hz, params)
    fm["nadir_hz"] = np.minimum(fm["nadir_hz"], c.nadir_hz)
    n = scenarios

    cols: dict[str, np.ndarray] = {
        "scenario": np.repeat(np.arange(n, dtype=np.int32), steps),
        "t_h": np.tile(dt_h * np.arange(steps), n),
        "demand_mw": r.demand_mw.ravel(),
    }
    for g, gname in enumerate(domain.state_names):
        cols[gname] = r.pg[:, :, g].ravel()
    cols.update({"imbalance_mw": r.imbalance_mw.ravel(), "cost_per_h": r.cost_per_h.ravel(), "reserve_mw": r.reserve_mw.ravel(),
                 "shortfall_mw": r.shortfall_mw.ravel(), "max_loading": r.max_loading.ravel()})  # fmt: skip
    trajectories = pa.table(cols)
    frequency = pa.table({
        "scenario": np.repeat(np.arange(n, dtype=np.int32), len(c.t_s)),
        "t_s": np.tile(c.t_s, n),
        "f_hz": c.f_hz.ravel(),
    })  # fmt: skip
    metrics = pa.table({
        "scenario": np.arange(n, dtype=np.int32),
        "cost_usd": r.cost_per_h.sum(1) * dt_h,
        "energy_mwh": r.demand_mw.sum(1) * dt_h,
        "unbalanced_mwh": np.abs(r.imbalance_mw).sum(1) * dt_h,
        "max_imbalance_mw": np.abs(r.imbalance_mw).max(1),
        "reserve_shortfall_mw": r.shortfall_mw.max(1),
        "max_line_loading": r.max_loading.max(1),
        "trip_hour": c.step * dt_h,
        "tripped_mw": c.tripped_mw,
        "reserve_at_trip_mw": c.reserve_mw,
        "shortfall_at_trip_mw": np.maximum(c.tripped_mw - c.reserve_mw, 0.0),
        **fm,
        "load_shed_mw": c.shed_mw,
        "collapsed": (fm["nadir_hz"] < params.collapse_hz).astype(np.int8),
    })  # fmt: skip
    return SimResult(domain.name, name, scenarios, steps * dt_h, seed, trajectories, metrics, {"frequency": frequency})


# --------------------------------------------------------------------------- one site in time (the edge's grid plant)


NO_LOAD_SHARE = 0.05  # a unit's no-load fuel, of its fuel at Pmax (a nominal figure the site's `no_load` factor scales)
FUEL_FACTORS = ("heat_rate", "no_load")  # what a grid site's M&V calibration fits (docs/mv.md)


def window(plant: GridPlant, pg_prev: np.ndarray, available: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The outputs reachable in one step from `pg_prev`: the ramp and the unit's limits; a
    unit out of service (`available` False) at 0."""
    d = plant.domain
    avail = np.asarray(available, dtype=bool)
    lo = np.maximum(d.pmin, pg_prev - plant.ramp_per_step)
    hi = np.minimum(d.pmax, pg_prev + plant.ramp_per_step)
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    return np.where(avail, lo, 0.0), np.where(avail, hi, 0.0)


def status_quo_setpoint(plant: GridPlant, pg_prev: np.ndarray, available: np.ndarray, loads: np.ndarray) -> np.ndarray:
    """The status quo of a grid site (`prorata`): every available unit at the same fraction
    of its range meeting the measured demand, within the step's ramp window."""
    lo, hi = window(plant, pg_prev, available)
    d = plant.domain
    return share_within(lo, hi, np.where(np.asarray(available, bool), d.pmin, 0.0), d.demand(loads))


def agc_step(plant: GridPlant, pg_prev: np.ndarray, available: np.ndarray, setpoint: np.ndarray, loads_next: np.ndarray) -> np.ndarray:
    """What a site does with a setpoint over one step: each unit moves toward it within its
    ramp (a unit out of service drops to 0), and automatic generation control shares the
    gap between the setpoints and the demand met at the step's end (`loads_next`) in
    proportion to the units' ranges, within the same window."""
    lo, hi = window(plant, pg_prev, available)
    return share_within(lo, hi, np.clip(np.asarray(setpoint, float), lo, hi), plant.domain.demand(loads_next))


def fuel_rates(domain: GridDomain, pg: np.ndarray, factors: dict[str, float] | None = None, fuel_price: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(variable, no-load) fuel input, MW of fuel (thermal), of dispatch `pg` (.., G): the
    cost curves read as heat-rate curves times one fuel price (USD per MWh of fuel) — how
    MATPOWER's polynomial costs were made — and a no-load fuel of `NO_LOAD_SHARE` of each
    running unit's fuel at Pmax; each scaled by the site's factor (`heat_rate`, `no_load`)."""
    f = factors or {}
    pg = np.asarray(pg, dtype=float)
    variable = domain.costs(pg) / fuel_price
    at_max = np.asarray(domain.separable_cost.terms(domain.pmax), float)  # (G,) each unit's cost at its Pmax
    running = pg > 1e-6
    no_load = (running * (NO_LOAD_SHARE * at_max / fuel_price)).sum(-1)
    return f.get("heat_rate", 1.0) * variable, f.get("no_load", 1.0) * no_load


def n1_nadir_hz(plant: GridPlant, pg: np.ndarray, available: np.ndarray, demand_mw: float, window_s: float = 20.0) -> float:
    """The frequency nadir (Hz) if the largest running unit tripped now: the SFR model of
    the others (module doc), their primary reserve capped as in `GridPlant.measure`."""
    p = plant.params
    pg = np.asarray(pg, float)
    avail = np.asarray(available, bool)
    unit = int(np.argmax(pg))
    others = avail.copy()
    others[unit] = False
    base = float((plant.domain.pmax * others).sum())
    if pg[unit] <= 1e-6:
        return p.f0_hz
    if base <= 0:
        return 0.0
    reserve = float((np.minimum(plant.domain.pmax - pg, plant.reserve_cap) * others).sum())
    t = np.arange(0.0, window_s + p.dt_s / 2, p.dt_s)
    _, lowest = sfr_response(t, np.array([pg[unit] / base]), h=p.h_s, r=p.r, f_h=p.f_h, t_r=p.t_r, km=p.km,
                             d=p.d * demand_mw / base, reserve=reserve / base)
    return float(p.f0_hz * (1.0 + lowest[0]))
