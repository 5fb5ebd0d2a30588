"""The control loop on a grid plant (docs/plants.md, "Grid plants"): the edge agent runs the
deployed dispatch decision on a power network, checks its envelope, measures the fuel it
saved (IPMVP Option D, domains/mv.py) and reverts on a breach.

Every control period: read the telemetry (loads, outages, the dispatch applied); decide —
the status quo (`prorata`: every available unit at the same fraction of its range), or the
deployed model's proposal made feasible by the domain's repair step (domains/repair.py)
within the step's window (each unit's ramp from its measured output, 0 for a unit out of
service); check the envelope (the window, every line within rateA plus `line_margin`, the
N-1 reserve shortfall within `max_shortfall_mw`); write the setpoints. While a model runs
the monitor watches the measured N-1 shortfall and frequency nadir; a breach reverts at
once to the previous model (else the status quo), publishes `deploy.rolled_back`, and the
breached checkpoint is never run again on this node (`<dir>/control/breached.json`).

Deployable models (numpy, a safetensors file): `decision` — MW per unit, (G,) held or
(H, G) one row per hour of the day; `policy.N.weight`/`policy.N.bias` — an MLP from the
loads (scaled to [-1, 1] by the domain's context bounds) to the dispatch (tanh, scaled to
the units' limits); or a learned optimiser of the site's domain — `scf-opt/1` or its
ternary student — run by consumers/edge/learned.py as its torch model decides (proposal
network from the loads, balance layer, merit order of its learned marginal costs), with
the step's window as the bounds its repair keeps. Every model's dispatch then meets the
same envelope.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from scf.bus import events as ev
from scf.consumers.edge.grid_plant import GRID_STATUS_QUO, GridSetpoint, GridSettings, GridTelemetry
from scf.consumers.edge.loop import ControlCycle, Publish
from scf.consumers.edge.plant import PlantError
from scf.consumers.edge.store import Installed

log = logging.getLogger("scf.edge.grid")


class GridControlError(PlantError):
    """A grid model or loop that cannot run: the message names the problem and the fix."""


def is_grid(domain_name: str) -> bool:
    return domain_name.split(":", 1)[0] == "grid"


class GridPolicy:
    """A deployed dispatch model run with numpy: (loads (L,), hour) -> MW per unit (G,)."""

    def __init__(self, tensors: dict[str, np.ndarray], domain, origin: str, runtime=None) -> None:
        g, n_load = len(domain.state_names), len(domain.context_names)
        self.domain = domain
        if runtime is not None:  # a learned optimiser (scf-opt/1 or its ternary student): consumers/edge/learned.py
            if runtime.domain_name != domain.name or (runtime.d, runtime.m) != (g, n_load):
                raise GridControlError(f"{origin} is a learned optimiser of {runtime.domain_name or 'an unstated domain'} "
                                       f"({runtime.m} loads → {runtime.d} units); this loop runs {domain.name}: deploy one of {domain.name}")
            self.kind, self.runtime = "learned", runtime
            return
        if "decision" in tensors:
            d = np.asarray(tensors["decision"], dtype=float)
            d = d[None, :] if d.ndim == 1 else d
            if d.ndim != 2 or d.shape[1] != g or not np.isfinite(d).all():
                raise GridControlError(f"{origin}: `decision` has shape {list(d.shape)}; {domain.name} needs (G,) or (hours, G) finite MW with G = {g}")
            self.kind, self.decision = "decision", d
            return
        layers, i = [], 0
        while f"policy.{i}.weight" in tensors:
            w = np.asarray(tensors[f"policy.{i}.weight"], dtype=float)
            layers.append((w, np.asarray(tensors.get(f"policy.{i}.bias", np.zeros(w.shape[0])), dtype=float)))
            i += 1
        if not layers:
            raise GridControlError(f"{origin} holds neither a `decision` tensor nor `policy.N.weight` layers: the grid loop cannot run it "
                                   "(docs/plants.md, grid plants); the status quo keeps running")
        if layers[0][0].shape[1] != n_load or layers[-1][0].shape[0] != g:
            raise GridControlError(f"{origin}: the policy maps {layers[0][0].shape[1]} inputs to {layers[-1][0].shape[0]} outputs; {domain.name} needs {n_load} → {g}")
        self.kind, self.layers = "policy", layers
        self.ctx_lo, self.ctx_hi = (np.asarray(x, float) for x in domain.context_bounds)
        self.lo, self.hi = (np.asarray(x, float) for x in domain.state_bounds)

    def __call__(self, loads: np.ndarray, hour: float) -> np.ndarray:
        """The proposal (G,) before the step's repair."""
        if self.kind == "learned":
            return self.runtime.propose_raw(self.domain, loads[None, :])[0]
        if self.kind == "decision":
            return self.decision[int(hour) % len(self.decision)]
        x = 2.0 * (loads - self.ctx_lo) / np.maximum(self.ctx_hi - self.ctx_lo, 1e-9) - 1.0
        for i, (w, b) in enumerate(self.layers):
            x = w @ x + b
            x = np.tanh(x) if i == len(self.layers) - 1 else np.maximum(x, 0.0)
        return self.lo + (x + 1.0) / 2.0 * (self.hi - self.lo)


def load_grid_policy(path: Path, domain) -> GridPolicy:
    from safetensors import safe_open

    from scf.consumers.edge.learned import LearnedError, LearnedRuntime, is_learned
    from scf.consumers.edge.tensors import load_tensors

    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
        runtime = LearnedRuntime.load(path) if is_learned(meta) else None
        tensors = {} if runtime is not None else load_tensors(path)
    except LearnedError as exc:
        raise GridControlError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any failure to load is one line
        raise GridControlError(f"{path} does not load: {type(exc).__name__}: {exc}") from None
    return GridPolicy(tensors, domain, path.name, runtime)


@dataclass(frozen=True)
class GridRecord:
    tel: GridTelemetry
    controller: str  # who decided the setpoint the step ending at `tel` held
    deployment_id: str | None = None


def grid_history(records: list[GridRecord], start: int, end: int, dt_h: float):
    from scf.domains.mv import GridHistory

    tels = [r.tel for r in records[start : end + 1]]
    return GridHistory(dt_h=dt_h, loads=np.array([t.load_mw for t in tels]), available=np.array([t.available for t in tels], dtype=bool),
                       pg0=np.asarray(tels[0].pg_mw, dtype=float), fuel_kwh=np.array([t.fuel_kwh for t in tels[1:]]),
                       fuel_price=tels[-1].fuel_price_usd_mwh)


class GridControlLoop(ControlCycle):
    """The grid loop (module doc) through the shared cycle (consumers/edge/loop.py):
    `settings` are `[edge.control]` (domain, report_hours, min_history_hours, confidence),
    `grid` `[edge.grid]` (the envelope, the meter)."""

    log = log
    status_quo_name = GRID_STATUS_QUO
    record_type = GridRecord
    loop_name = "grid control loop"
    telemetry_name = "grid telemetry"
    decision_error = GridControlError

    def __init__(self, plant, node: str, directory: Path, settings, grid: GridSettings = GridSettings(), *,
                 current: Callable[[], Installed | None], previous: Callable[[Installed | None], Installed | None] = lambda _: None,
                 publish: Publish | None = None, source: str = "", model_path: Callable[[Installed], Path] | None = None) -> None:
        from scf.consumers.edge.grid_plant import grid_domain

        self._init_cycle(plant, node, directory, settings, current=current, previous=previous, publish=publish, source=source,
                         model_path=model_path)
        self.grid = grid
        try:
            self.domain = grid_domain(settings.domain)
        except PlantError as exc:
            raise GridControlError(f"[edge.control] domain: {exc}") from None
        self.gplant = None
        self.active: Installed | None = None  # None: the status quo
        self.policy: GridPolicy | None = None
        self.dir.mkdir(parents=True, exist_ok=True)
        self.breached: dict[str, str] = self._load_breached()
        self._failed: set[str] = set()
        self._strikes = {"shortfall": 0, "nadir": 0}

    @property
    def active_name(self) -> str:
        return self.active.checkpoint_id if self.active is not None else GRID_STATUS_QUO

    @property
    def running(self) -> Installed | None:
        return self.active

    def _begin(self, tel: GridTelemetry) -> None:
        from scf.domains.grid_dynamics import GridPlant

        if self.gplant is None:
            self.dt_h = tel.period_s / 3600.0
            self.gplant = GridPlant(self.domain, self.dt_h)

    # ------------------------------------------------------------------ checks
    def telemetry_problem(self, tel: GridTelemetry) -> str | None:
        d = self.domain
        if list(tel.units) != list(d.state_names):
            return f"units {tel.units} are not {d.name}'s ({', '.join(d.state_names)})"
        for name, values, n in (("load_mw", tel.load_mw, len(d.context_names)), ("pg_mw", tel.pg_mw, len(d.state_names)),
                                ("available", tel.available, len(d.state_names))):
            if len(values) != n:
                return f"{name} has {len(values)} values; {d.name} has {n}"
        numbers = [tel.period_s, tel.fuel_kwh, tel.fuel_price_usd_mwh, *tel.load_mw, *tel.pg_mw]
        if not all(math.isfinite(x) for x in numbers):
            return "a value is NaN or infinite"
        if tel.period_s <= 0 or tel.fuel_kwh < 0 or tel.fuel_price_usd_mwh <= 0:
            return f"period_s {tel.period_s} and fuel_price_usd_mwh {tel.fuel_price_usd_mwh} must be positive, fuel_kwh {tel.fuel_kwh} not negative"
        if self.dt_h and abs(tel.period_s / 3600.0 - self.dt_h) > 1e-9:
            return f"period_s changed from {self.dt_h * 3600:g} to {tel.period_s:g}: restart the loop to change the control period"
        return None

    def envelope_problem(self, u: np.ndarray, tel: GridTelemetry) -> str | None:
        """Why setpoints `u` break the envelope (the step's window, line limits, N-1 reserve), or None."""
        from scf.domains.grid_dynamics import window

        d = self.domain
        lo, hi = window(self.gplant, np.asarray(tel.pg_mw, float), np.asarray(tel.available, bool))
        tol = 1e-3
        for g, name in enumerate(d.state_names):
            if not tel.available[g] and abs(u[g]) > tol:
                return f"{name} is out of service but set to {u[g]:.2f} MW"
            if u[g] > hi[g] + tol or u[g] < lo[g] - tol:
                return f"{name} set to {u[g]:.2f} MW, outside its window {lo[g]:.2f}-{hi[g]:.2f} MW (ramp {self.gplant.ramp_per_step[g]:.2f} MW a step from {tel.pg_mw[g]:.2f} MW)"
        loads = np.asarray(tel.load_mw, float)
        flows = np.abs(d.flows(loads, u))
        limit = d.rate * (1.0 + self.grid.line_margin)
        over = np.flatnonzero(flows > limit + tol)
        if len(over):
            k = int(over[np.argmax(flows[over] / d.rate[over])])
            return f"line {d.branch_labels[k]} at {flows[k]:.1f} MW, {flows[k] / d.rate[k]:.0%} of its rateA {d.rate[k]:.1f} MW (margin {self.grid.line_margin:.0%})"
        if self.grid.max_shortfall_mw is not None:
            short = float(self.gplant.measure(u[None, :], loads[None, :]).shortfall_mw[0])
            if short > self.grid.max_shortfall_mw + tol:
                return f"N-1 reserve shortfall {short:.2f} MW above the envelope's {self.grid.max_shortfall_mw:.2f} MW"
        return None

    def observe(self, tel: GridTelemetry) -> str | None:
        """The monitor while a model runs: the measured N-1 shortfall and nadir."""
        g = self.grid
        checks = (("shortfall", g.max_shortfall_mw is not None and tel.shortfall_mw > g.max_shortfall_mw + 1e-3,
                   f"N-1 reserve shortfall {tel.shortfall_mw:.2f} MW above {g.max_shortfall_mw} MW"),
                  ("nadir", g.min_nadir_hz is not None and tel.nadir_hz < g.min_nadir_hz,
                   f"N-1 frequency nadir {tel.nadir_hz:.2f} Hz below {g.min_nadir_hz} Hz"))
        for key, bad, text in checks:
            self._strikes[key] = self._strikes[key] + 1 if bad else 0
            if self._strikes[key] >= g.breach_periods:
                return f"{text} for {self._strikes[key]} periods"
        return None

    # ------------------------------------------------------------------ deciding
    def decide_status_quo(self, tel: GridTelemetry) -> np.ndarray:
        from scf.domains.grid_dynamics import status_quo_setpoint

        return status_quo_setpoint(self.gplant, np.asarray(tel.pg_mw, float), np.asarray(tel.available, bool), np.asarray(tel.load_mw, float))

    def decide_model(self, tel: GridTelemetry) -> np.ndarray:
        from scf.domains.grid_dynamics import window
        from scf.domains.repair import repair

        loads = np.asarray(tel.load_mw, float)
        lo, hi = window(self.gplant, np.asarray(tel.pg_mw, float), np.asarray(tel.available, bool))
        dom = copy.copy(self.domain)  # the step's window as the bounds the repair keeps
        dom.__dict__.pop("_projection_lp", None)
        dom.state_bounds = (lo, hi)
        if self.policy.kind == "learned":
            # the model decides as its torch model does: its proposal, balanced, repaired in the
            # merit order of its learned marginal costs — within this step's window
            from scf.consumers.edge.learned import LearnedError

            try:
                _, fixed = self.policy.runtime.decide(dom, loads[None, :])
            except LearnedError as exc:
                raise GridControlError(f"model {self.active_name}: {exc}") from None
            u = np.asarray(fixed.states[0], dtype=float)
            if not np.isfinite(u).all():
                raise GridControlError(f"model {self.active_name} decided non-finite setpoints")
            return u
        proposal = np.asarray(self.policy(loads, tel.hour()), dtype=float)
        if not np.isfinite(proposal).all():
            raise GridControlError(f"model {self.active_name} proposed non-finite setpoints")
        return repair(dom, loads[None, :], np.clip(proposal, lo, hi)[None, :])[0]

    def _wanted(self) -> Installed | None:
        item = self.current()
        for _ in range(16):
            if item is None or item.checkpoint_id not in self.breached:
                break
            item = self.previous(item)
        if item is None or item.checkpoint_id in self.breached or item.checkpoint_id in self._failed:
            return None
        return item

    def _switch(self, item: Installed | None) -> bool:
        if (item.checkpoint_id if item else None) == (self.active.checkpoint_id if self.active else None):
            return True
        if item is not None:
            try:
                policy = load_grid_policy(self.model_path(item), self.domain)
            except GridControlError as exc:
                self._failed.add(item.checkpoint_id)
                log.warning("%s: %s", self.node, exc)
                return False
            self.policy = policy
        log.info("%s: grid control passes from %s to %s", self.node, self.active_name, item.checkpoint_id if item else GRID_STATUS_QUO)
        self.active = item
        self._strikes = {k: 0 for k in self._strikes}
        self._report_from = len(self.records) - 1 if item is not None else None
        return True

    def _fall_back(self, bad: Installed) -> str:
        fallback = self._wanted()
        if fallback is not None and not self._switch(fallback):
            fallback = None
        if fallback is None:
            self._switch(None)
        return self.active_name

    def _follow(self) -> list[ev.Event]:
        out: list[ev.Event] = []
        wanted = self._wanted() if self._history_ready() else None
        if (wanted.checkpoint_id if wanted else None) != (self.active.checkpoint_id if self.active else None):
            if self.active is not None:
                out += self._close_period(len(self.records) - 1, cut=True)
            self._switch(wanted)
        return out

    def setpoint(self, tel: GridTelemetry, u: np.ndarray) -> GridSetpoint:
        return GridSetpoint(seq=tel.seq, pg_mw=[float(x) for x in u], controller=self.active_name)

    # ------------------------------------------------------------------ M&V
    def calibrate(self):
        from scf.domains import mv

        if self.calibration is None:
            self.calibration = mv.calibrate_grid(self.domain, grid_history(self.records, 0, self._history_steps(), self.dt_h))
            c = self.calibration
            log.info("%s: grid baseline calibrated on %d h of fuel: CV(RMSE) %.2f %%, NMBE %+.2f %%; factors %s", self.node, c.points,
                     100 * c.cv_rmse, 100 * c.nmbe, ", ".join(f"{k} {v:.3f}" for k, v in c.parameters.items()))
        return self.calibration

    def measure(self, start: int, end: int) -> ev.EnergyMeasured:
        from scf.consumers.energy import measurement_event
        from scf.domains import mv

        cal = self.calibrate()
        rec = self.records[end]
        s = mv.counterfactual_grid(self.domain, cal, grid_history(self.records, start, end, self.dt_h), confidence=self.settings.confidence)
        unc = s.uncertainty_kwh if math.isfinite(s.uncertainty_kwh) else None
        price = rec.tel.fuel_price_usd_mwh
        event = measurement_event(
            self.node, period_start=self.records[start].tel.time, period_end=rec.tel.time,
            baseline_kwh=max(0.0, s.baseline_kwh), actual_kwh=max(0.0, s.actual_kwh), method=mv.GRID_METHOD,
            deployment_id=rec.deployment_id, domain=self.domain.name, meter=self.grid.meter, source=self.source,
            calibration=ev.Calibration(interval=cal.interval, points=cal.points, cv_rmse=cal.cv_rmse, nmbe=cal.nmbe, model=cal.model,
                                       parameters=cal.parameters),
            uncertainty_kwh=unc, confidence=self.settings.confidence,
            unit="kwh-fuel")  # kWh of fuel, not of electricity: the ledger mints it as its own instrument
        self.measured.append(event.data)
        log.info("%s: measured %s: fuel baseline %.0f kWh, actual %.0f kWh, saved %.0f ± %s kWh (USD %.2f at %g USD/MWh) (%s)", self.node,
                 rec.controller, s.baseline_kwh, s.actual_kwh, s.saved_kwh, f"{unc:.0f}" if unc is not None else "n/a",
                 s.saved_kwh / 1000.0 * price, price, "calibrated" if cal.problem() is None else cal.problem())
        return event
