"""The control loop: the edge agent runs the deployed decision on a plant (docs/plants.md).

Every control period: read the plant's telemetry (the context), decide (the deployed
model or decision, then the domain's repair step, `domains/repair.py`), check the local
safety envelope (bounds, ramp), write the setpoints. A runtime monitor watches the live
telemetry against the envelope (the comfort band) and the expected energy (the metered
energy against what the applied thermal power implies at the equipment's efficiency): on a
breach the loop reverts at once to the previous controller (the previously deployed model,
else the status quo) and reports why (`deploy.rolled_back`, reason `envelope breach: …`);
the breached checkpoint is remembered (`<dir>/control/breached.json`) and never run again
on this node. numpy only (no torch): a deployed model is a safetensors file holding

* a learned optimiser — format `scf-opt/1` (ml/optimize.py) or its ternary student
  (`scf-ternary/1`, model `optimiser`): run by consumers/edge/learned.py exactly as its
  torch model decides (proposal network, merit-ordered repair, polish on its learned
  cost), against the calibrated domain; the models the loop (`scf train-optimiser`,
  `scf distill`) and the demo deploy; or
* `decision` — HVAC powers per zone (kW), shape (z,) held, or (H, z) one row per hour of
  the day (row = hour mod H); or
* `policy.0.weight`, `policy.0.bias`, `policy.1.weight`, … — a small MLP run with numpy:
  the domain's context scaled to [-1, 1] by its bounds, ReLU between layers, tanh out,
  scaled to the state bounds.

Its safetensors metadata may carry `scf.envelope` (JSON of `Envelope`): the deployment's
own envelope over the node's `[edge.control.envelope]`.

M&V (IPMVP Option D, domains/mv.py): the steps run under the status quo before any model
form the site's measured history; every `report_hours` of a model's run (or the part run
before a revert, at least an hour) the loop calibrates the baseline model to that history
(once), simulates the status quo over the period's measured disturbances and publishes a
signed `energy.measured` with the saving, the calibration figures and the uncertainty.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import msgspec
import numpy as np

from scf.bus import events as ev
from scf.consumers.edge.loop import ControlCycle, Publish
from scf.consumers.edge.plant import Plant, PlantError, Setpoint, SiteOptions, Telemetry
from scf.consumers.edge.store import Installed

log = logging.getLogger("scf.edge.control")
STATUS_QUO = "status-quo:thermostat"


class ControlError(PlantError):
    """A deployed model the control loop cannot run: the message names the problem and the fix."""


class Envelope(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The local safety envelope (per node in `[edge.control.envelope]`, per deployment in
    the model's `scf.envelope` metadata)."""

    u_min_kw: list[float] | None = None  # per zone; default the equipment's cooling capacity (negative)
    u_max_kw: list[float] | None = None  # per zone; default the equipment's heating capacity
    ramp_kw: list[float] | None = None  # largest setpoint move between two periods; default the domain's ramp per step
    comfort_tol_k: float = 1.5  # a zone this far outside the band in force ...
    comfort_periods: int = 4  # ... for this many periods in a row is a breach
    energy_margin: float = 0.3  # metered energy above expected by more than this fraction ...
    energy_floor_kwh: float = 0.5  # ... and more than this, over ...
    energy_window: int = 4  # ... this many periods, is a breach


class ControlSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[edge.control]` in scf.toml; the loop runs when `[edge] plant` is set."""

    domain: str = "hvac:office3"
    envelope: Envelope = Envelope()
    report_hours: float = 24.0  # a measurement every this many hours of a model's run
    min_history_hours: float = 24.0  # status-quo history needed before a saving is measured
    confidence: float = 0.9  # of the stated savings uncertainty
    # the site's scheduled working hours [start, end) (hours of day as the telemetry's time says, UTC): a learned
    # optimiser deciding in the hour before they start sees the zones as occupied (`lookahead`)
    occupied_hours: tuple[float, float] = (8.0, 18.0)
    # the in-process simulated site (`plant = "sim"`): its seed, horizon, step and true factors
    sim_seed: int = 10  # a mild heating season (daily mean 9.7 °C): office3 holds its band under the status quo
    sim_hours: float = 96.0
    sim_step_minutes: float = 15.0
    sim_factors: str = "envelope_ua=1.2,internal_gains=0.85,efficiency=0.9"
    # demos and tests: once the status-quo history is long enough, stop the plant's clock
    # (write no setpoint) until a model is installed. Never for a real plant: time runs on.
    hold_for_model: bool = False

    def __post_init__(self) -> None:
        start, stop = self.occupied_hours
        if not (0.0 <= start < stop <= 24.0):
            raise ValueError(f"[edge.control] occupied_hours = {list(self.occupied_hours)}: give [start, end) hours of the day, "
                             "0 <= start < end <= 24, e.g. [8, 18]")

    def site(self) -> SiteOptions:
        from scf.consumers.edge.plant import parse_factors

        return SiteOptions(domain=self.domain, seed=self.sim_seed, hours=self.sim_hours, step_minutes=self.sim_step_minutes,
                           factors=parse_factors(self.sim_factors))


# --------------------------------------------------------------------------- runtimes


def _context(tel: Telemetry) -> np.ndarray:
    return np.concatenate([[tel.t_out_c, tel.hour()], tel.occupancy, tel.t_zone_c])


class Policy:
    """A deployed model, run with numpy: context (c,) -> proposal (z,)."""

    def __init__(self, tensors: dict[str, np.ndarray], domain, origin: str, runtime=None) -> None:
        self.domain, self.origin = domain, origin
        z = domain.n_zones
        if runtime is not None:  # a learned optimiser (scf-opt/1 or its ternary student): consumers/edge/learned.py
            if runtime.domain_name != domain.name or (runtime.d, runtime.m) != (z, len(domain.context_names)):
                raise ControlError(f"{origin} is a learned optimiser of {runtime.domain_name or 'an unstated domain'} "
                                   f"({runtime.m} context → {runtime.d} state values); this loop runs {domain.name}: deploy one of {domain.name}")
            self.kind, self.runtime = "learned", runtime
            return
        if "decision" in tensors:
            d = np.asarray(tensors["decision"], dtype=float)
            d = d[None, :] if d.ndim == 1 else d
            if d.ndim != 2 or d.shape[1] != z or not np.isfinite(d).all():
                raise ControlError(f"{origin}: `decision` has shape {list(d.shape)}; {domain.name} needs (z,) or (hours, z) finite kW with z = {z}")
            self.kind, self.decision = "decision", d
            return
        layers = []
        i = 0
        while f"policy.{i}.weight" in tensors:
            w = np.asarray(tensors[f"policy.{i}.weight"], dtype=float)
            b = np.asarray(tensors.get(f"policy.{i}.bias", np.zeros(w.shape[0])), dtype=float)
            layers.append((w, b))
            i += 1
        if not layers:
            raise ControlError(f"{origin} holds neither a `decision` tensor nor `policy.N.weight` layers: the control loop "
                               "cannot run it (docs/plants.md, deployable models); the status quo keeps running")
        c = len(domain.context_names)
        if layers[0][0].shape[1] != c or layers[-1][0].shape[0] != z:
            raise ControlError(f"{origin}: the policy maps {layers[0][0].shape[1]} inputs to {layers[-1][0].shape[0]} outputs; "
                               f"{domain.name} needs {c} → {z}")
        self.kind, self.layers = "policy", layers
        self.ctx_lo, self.ctx_hi = (np.asarray(x, float) for x in domain.context_bounds)
        self.lo, self.hi = (np.asarray(x, float) for x in domain.state_bounds)

    def __call__(self, context: np.ndarray) -> np.ndarray:
        if self.kind == "learned":
            return self.runtime.propose_raw(self.domain, context[None, :])[0]
        if self.kind == "decision":
            return self.decision[int(context[1]) % len(self.decision)]
        x = 2.0 * (context - self.ctx_lo) / (self.ctx_hi - self.ctx_lo) - 1.0
        for i, (w, b) in enumerate(self.layers):
            x = w @ x + b
            x = np.tanh(x) if i == len(self.layers) - 1 else np.maximum(x, 0.0)
        return self.lo + (x + 1.0) / 2.0 * (self.hi - self.lo)

    def decide(self, domain, context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(proposal, its repair against `domain`) (z,) each: a learned optimiser decides as
        its torch model does (merit-ordered repair, then the polish on its learned cost);
        the others are repaired by the domain's repair step."""
        from scf.domains.repair import repair

        if self.kind == "learned":
            raw, fixed = self.runtime.decide(domain, context[None, :])
            return raw[0], fixed.states[0]
        proposal = np.asarray(self(context), dtype=float)
        if not np.isfinite(proposal).all():
            return proposal, proposal
        return proposal, repair(domain, context[None, :], proposal[None, :])[0]


def load_policy(path: Path, domain) -> tuple[Policy, Envelope | None]:
    """The model at `path` and its deployment envelope (None when it carries none)."""
    from safetensors import safe_open

    from scf.consumers.edge.learned import LearnedError, LearnedRuntime, is_learned
    from scf.consumers.edge.tensors import load_tensors

    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
        runtime = LearnedRuntime.load(path) if is_learned(meta) else None
        tensors = {} if runtime is not None else load_tensors(path)
    except LearnedError as exc:
        raise ControlError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any failure to load is one line
        raise ControlError(f"{path} does not load: {type(exc).__name__}: {exc}") from None
    envelope = None
    if "scf.envelope" in meta:
        try:
            envelope = msgspec.json.decode(meta["scf.envelope"].encode(), type=Envelope)
        except msgspec.DecodeError as exc:
            raise ControlError(f"{path}: its scf.envelope metadata is not a valid envelope ({exc})") from None
    return Policy(tensors, domain, path.name, runtime), envelope


class Controller:
    """Decides setpoints (z,) from telemetry; `name` is a checkpoint id or the status quo."""

    name: str = STATUS_QUO
    checkpoint: Installed | None = None

    def decide(self, tel: Telemetry) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class StatusQuo(Controller):
    """The site's previous controller: the scheduled proportional thermostat of
    domains/hvac_dynamics.py (the M&V baseline runs the same one)."""

    def __init__(self, plant) -> None:
        from scf.domains.hvac_dynamics import thermostat

        self.rule = thermostat(plant)

    def decide(self, tel: Telemetry) -> np.ndarray:
        from scf.domains.hvac_dynamics import HvacInputs, HvacState

        t = np.asarray([tel.t_zone_c])
        state = HvacState(t, np.asarray([tel.u_kw or [0.0] * t.shape[1]]))
        now = HvacInputs(np.array([tel.hour()]), np.array([tel.t_out_c]), np.asarray([tel.occupancy]), np.array([tel.clearness]))
        return self.rule(0, state, now)[0]


def lookahead(domain, ctx: np.ndarray, hours: tuple[float, float] = (8.0, 18.0)) -> np.ndarray:
    """The context a one-step optimiser decides on: the domain's band holds the temperature
    at the END of the step (T+) to the band of the context's occupancy, so a zone empty now
    but scheduled occupied when the step ends (the site's working hours `[edge.control]
    occupied_hours`; the simulated site's and its status-quo thermostat's are 8-18 h,
    domains/hvac_dynamics.py) is given a token occupancy just above the threshold: the
    occupied band then binds T+, and the learned optimiser preheats in the hour before
    people arrive instead of meeting them cold."""
    from scf.domains.hvac import OCCUPIED

    z = domain.n_zones
    start, stop = hours
    end = (float(ctx[1]) + domain.building.dt_h) % 24.0
    if not (start <= end < stop):
        return ctx
    out = np.array(ctx, dtype=float)
    out[2 : 2 + z] = np.maximum(out[2 : 2 + z], 2 * OCCUPIED)
    return out


class ModelController(Controller):
    """A deployed model: its proposal at each decision boundary (the domain's step, an
    hour), made feasible by the domain's repair step, within the domain's ramp of the last
    decision, held until the next."""

    def __init__(self, domain, policy: Policy, item: Installed, steps_per_decision: int) -> None:
        self.domain, self.policy, self.checkpoint = domain, policy, item
        self.name = item.checkpoint_id
        self.every = max(1, steps_per_decision)
        self.k = 0
        self.held: np.ndarray | None = None
        self.last: np.ndarray | None = None  # the last setpoint written, whoever decided it (the loop sets it)
        self.occupied_hours: tuple[float, float] = (8.0, 18.0)  # the loop sets the site's

    def decide(self, tel: Telemetry) -> np.ndarray:
        if self.held is None or self.k % self.every == 0:
            ctx = _context(tel)
            if self.policy.kind == "learned":
                ctx = lookahead(self.domain, ctx, self.occupied_hours)
            try:
                proposal, fixed = self.policy.decide(self.domain, ctx)
            except Exception as exc:  # noqa: BLE001 - a model that cannot decide is a breach: revert, never stop the loop
                raise ControlError(f"model {self.name} could not decide: {type(exc).__name__}: {exc}") from None
            if not (np.isfinite(proposal).all() and np.isfinite(fixed).all()):
                raise ControlError(f"model {self.name} proposed non-finite setpoints")
            if self.last is not None:  # the domain's ramp from the last setpoint written (repair does not see it)
                fixed = np.clip(fixed, self.last - self.domain.ramp, self.last + self.domain.ramp)
            self.held = fixed
        self.k += 1
        return self.held


# --------------------------------------------------------------------------- the envelope and the monitor


@dataclass
class Monitor:
    """The envelope's checks: `setpoint` before writing, `observe` on each telemetry."""

    domain: object
    envelope: Envelope
    per_step_h: float
    efficiency: float = 1.0  # the calibrated equipment efficiency (1 until calibrated)
    outside: np.ndarray | None = None
    energy: list[tuple[float, float]] = field(default_factory=list)  # (metered, expected) per period

    def reset(self) -> None:
        self.outside, self.energy = None, []

    def bounds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d, e = self.domain, self.envelope
        lo = np.asarray(e.u_min_kw if e.u_min_kw is not None else -d.cool_max, float)
        hi = np.asarray(e.u_max_kw if e.u_max_kw is not None else d.heat_max, float)
        ramp = np.asarray(e.ramp_kw if e.ramp_kw is not None else d.ramp, float)  # per decision (the domain's step)
        return lo, hi, ramp

    def setpoint(self, u: np.ndarray, u_prev: np.ndarray | None) -> str | None:
        """Why setpoints `u` break the envelope, or None (bounds, then the ramp)."""
        lo, hi, ramp = self.bounds()
        zones = self.domain.building.zones
        tol = 1e-6
        for i, zone in enumerate(zones):
            if u[i] > hi[i] + tol:
                return f"u[{zone}] {u[i]:.2f} kW above the envelope's {hi[i]:.2f} kW"
            if u[i] < lo[i] - tol:
                return f"u[{zone}] {u[i]:.2f} kW below the envelope's {lo[i]:.2f} kW"
        if u_prev is not None:
            for i, zone in enumerate(zones):
                if abs(u[i] - u_prev[i]) > ramp[i] + tol:
                    return f"u[{zone}] moves {u[i] - u_prev[i]:+.2f} kW in one period, beyond the envelope's ramp {ramp[i]:.2f} kW"
        return None

    def observe(self, tel: Telemetry) -> str | None:
        """Why the live telemetry breaches the envelope, or None."""
        from scf.domains.hvac import OCCUPIED

        d, e = self.domain, self.envelope
        b = d.building
        t, occ = np.asarray(tel.t_zone_c), np.asarray(tel.occupancy)
        occupied = occ > OCCUPIED
        lo = np.where(occupied, b.occupied_band[0], b.unoccupied_band[0])
        hi = np.where(occupied, b.occupied_band[1], b.unoccupied_band[1])
        dev = np.maximum(lo - t, 0.0) + np.maximum(t - hi, 0.0)
        # a zone the equipment already drives at full power the right way is not the
        # decision's fault (an undersized plant): it does not count
        u_now = np.asarray(tel.u_kw or [0.0] * len(t))
        saturated = np.where(t < lo, u_now >= d.heat_max - 1e-6, u_now <= -d.cool_max + 1e-6)
        over = (dev > e.comfort_tol_k) & ~saturated
        self.outside = np.where(over, (self.outside if self.outside is not None else 0) + 1, 0)
        worst = int(np.argmax(self.outside))
        if self.outside[worst] >= e.comfort_periods:
            return (f"comfort: {b.zones[worst]} at {t[worst]:.2f} °C, {dev[worst]:.2f} K outside its band {lo[worst]:.0f}-{hi[worst]:.0f} °C "
                    f"for {int(self.outside[worst])} periods (tolerance {e.comfort_tol_k:g} K for {e.comfort_periods})")
        u = np.asarray(tel.u_kw or [0.0] * len(t))
        expected = float((np.clip(u, 0, None) / b.cop_heat + np.clip(-u, 0, None) / b.cop_cool).sum()) * self.per_step_h / self.efficiency
        self.energy = (self.energy + [(tel.energy_kwh, expected)])[-e.energy_window:]
        if len(self.energy) == e.energy_window:
            metered, exp = (sum(x) for x in zip(*self.energy))
            if metered > exp * (1.0 + e.energy_margin) + e.energy_floor_kwh:
                return (f"energy: {metered:.2f} kWh metered over {e.energy_window} periods against {exp:.2f} kWh expected "
                        f"from the applied power (margin {e.energy_margin:.0%} + {e.energy_floor_kwh:g} kWh)")
        return None


# --------------------------------------------------------------------------- M&V over the loop's records


@dataclass(frozen=True)
class Record:
    tel: Telemetry
    controller: str  # who decided the setpoint the step ending at `tel` held (STATUS_QUO, a checkpoint id)
    deployment_id: str | None = None


def history(records: list[Record], start: int, end: int, dt_h: float):
    """An `HvacHistory` over steps records[start+1 .. end] (records[start] is the state before)."""
    from scf.domains.mv import HvacHistory

    tels = [r.tel for r in records[start : end + 1]]
    return HvacHistory(
        dt_h=dt_h,
        start_hour=tels[0].hour(),
        t_out=np.array([t.t_out_c for t in tels]),
        occupancy=np.array([t.occupancy for t in tels]),
        clearness=np.array([t.clearness for t in tels]),
        t_zone0=np.asarray(tels[0].t_zone_c, dtype=float),
        energy_kwh=np.array([t.energy_kwh for t in tels[1:]]),
    )


# --------------------------------------------------------------------------- the loop


class ControlLoop(ControlCycle):
    """Runs the deployed model on `plant` (module doc) through the shared cycle
    (consumers/edge/loop.py). `current()` says what is installed (the agent's version
    store); `previous(item)` the one before; `publish` sends events (signed by the node's
    bus), or None to only collect them in `events`."""

    log = log
    status_quo_name = STATUS_QUO
    record_type = Record
    decision_error = ControlError

    def __init__(self, plant: Plant, node: str, directory: Path, settings: ControlSettings, *,
                 current: Callable[[], Installed | None], previous: Callable[[Installed | None], Installed | None] = lambda _: None,
                 publish: Publish | None = None, source: str = "", model_path: Callable[[Installed], Path] | None = None) -> None:
        from scf import domains
        from scf.domains.hvac_dynamics import HvacPlant

        self._init_cycle(plant, node, directory, settings, current=current, previous=previous, publish=publish, source=source,
                         model_path=model_path)
        try:
            self.domain = domains.get(settings.domain)
        except Exception as exc:  # noqa: BLE001
            raise ControlError(f"[edge.control] domain {settings.domain!r} is unknown ({exc})") from None
        if getattr(self.domain, "kind", "") != "hvac":
            raise ControlError(f"[edge.control] domain {settings.domain}: the control loop runs hvac domains; grid plants are not wired yet")
        self._hvac_plant = HvacPlant
        self.status_quo: Controller | None = None
        self.active: Controller | None = None
        self.u_prev: np.ndarray | None = None
        self.dir.mkdir(parents=True, exist_ok=True)
        self.breached: dict[str, str] = self._load_breached()
        self._failed_load: set[str] = set()

    # ------------------------------------------------------------------ controllers
    def _setup(self, tel: Telemetry) -> None:
        self.dt_h = tel.period_s / 3600.0
        plant = self._hvac_plant(self.domain, self.dt_h)
        self.status_quo = StatusQuo(plant)
        self.monitor = Monitor(self.domain, self.settings.envelope, self.dt_h)
        self.active = self.status_quo

    def _controller_for(self, item: Installed | None) -> Controller:
        """The controller that should run `item` (the status quo for none, a breached or an unloadable one)."""
        assert self.status_quo is not None
        for _ in range(16):  # a breached model gives way to the one before it
            if item is None or item.checkpoint_id not in self.breached:
                break
            item = self.previous(item)
        if item is None or item.checkpoint_id in self.breached:
            return self.status_quo
        if self.active is not None and self.active.name == item.checkpoint_id:
            return self.active
        if item.checkpoint_id in self._failed_load:
            return self.status_quo
        try:
            policy, envelope = load_policy(self.model_path(item), self.domain)
        except ControlError as exc:
            self._failed_load.add(item.checkpoint_id)
            log.warning("%s: %s", self.node, exc)
            return self.status_quo
        per = round(self.domain.building.dt_h / self.dt_h)
        ctl = ModelController(self.model_domain(), policy, item, per)
        ctl.envelope = envelope  # type: ignore[attr-defined]
        ctl.occupied_hours = tuple(self.settings.occupied_hours)  # type: ignore[assignment]
        return ctl

    def _switch(self, ctl: Controller) -> None:
        if self.active is ctl:
            return
        log.info("%s: control passes from %s to %s", self.node, self.active.name if self.active else "nothing", ctl.name)
        self.active = ctl
        self.monitor.envelope = getattr(ctl, "envelope", None) or self.settings.envelope
        self.monitor.reset()

    @property
    def running(self) -> Installed | None:
        return self.active.checkpoint if self.active is not None else None

    @property
    def active_name(self) -> str:
        return self.active.name if self.active is not None else STATUS_QUO

    def _begin(self, tel: Telemetry) -> None:
        if self.status_quo is None:
            self._setup(tel)

    def _fall_back(self, bad: Installed) -> str:
        fallback = self._controller_for(bad)
        self._switch(fallback)
        if fallback.checkpoint is not None:
            self._report_from = len(self.records) - 1
        return fallback.name

    def _follow(self) -> list[ev.Event]:
        out: list[ev.Event] = []
        item = self.current()
        # no model before the baseline history is long enough (nor loaded: it would be discarded)
        wanted = self._controller_for(item) if item is None or self._history_ready() else self.status_quo
        if wanted is not self.active:
            if self.active.checkpoint is not None:
                out += self._close_period(len(self.records) - 1, cut=True)
            if wanted is not self.active:
                self._switch(wanted)
                if wanted.checkpoint is not None:
                    self._report_from = len(self.records) - 1
        if isinstance(self.active, ModelController):  # it decides within its ramp of the last setpoint written
            self.active.last = self.u_prev
        return out

    # ------------------------------------------------------------------ M&V
    def calibrate(self):
        """The baseline model calibrated to the status-quo history (once; domains/mv.py)."""
        from scf.domains import mv

        if self.calibration is None:
            self.calibration = mv.calibrate_hvac(self.domain, history(self.records, 0, self._history_steps(), self.dt_h))
            self.monitor.efficiency = self.calibration.parameters.get("efficiency", 1.0)
            log.info("%s: baseline calibrated on %d h: CV(RMSE) %.1f %%, NMBE %+.1f %%; factors %s", self.node, self.calibration.points,
                     100 * self.calibration.cv_rmse, 100 * self.calibration.nmbe,
                     ", ".join(f"{k} {v:.3f}" for k, v in self.calibration.parameters.items()))
        return self.calibration

    def model_domain(self):
        """The domain a model's decisions are repaired against: the calibrated one once the
        history allows (the site's own envelope, gains and efficiency), else the nominal."""
        from scf.domains import mv

        if self.calibration is None and not self._history_ready():
            return self.domain
        return mv.calibrated_domain(self.domain, self.calibrate().parameters)

    def measure(self, start: int, end: int) -> ev.EnergyMeasured:
        from scf.consumers.energy import measurement_event
        from scf.domains import mv

        rec = self.records[end]
        cal = self.calibrate()
        saving = mv.counterfactual_hvac(self.domain, cal, history(self.records, start, end, self.dt_h), confidence=self.settings.confidence)
        unc = saving.uncertainty_kwh if math.isfinite(saving.uncertainty_kwh) else None
        event = measurement_event(
            self.node,
            period_start=self.records[start].tel.time,
            period_end=rec.tel.time,
            baseline_kwh=max(0.0, saving.baseline_kwh),
            actual_kwh=max(0.0, saving.actual_kwh),
            method=mv.METHOD,
            deployment_id=rec.deployment_id,
            domain=self.domain.name,
            source=self.source,
            calibration=ev.Calibration(interval=cal.interval, points=cal.points, cv_rmse=cal.cv_rmse, nmbe=cal.nmbe,
                                       model=cal.model, parameters=cal.parameters),
            uncertainty_kwh=unc,
            confidence=self.settings.confidence,
        )
        self.measured.append(event.data)
        log.info("%s: measured %s: baseline %.2f kWh, actual %.2f kWh, saved %.2f ± %s kWh (%s)", self.node, rec.controller,
                 saving.baseline_kwh, saving.actual_kwh, saving.saved_kwh, f"{unc:.2f}" if unc is not None else "n/a",
                 "calibrated" if cal.problem() is None else cal.problem())
        return event

    # ------------------------------------------------------------------ one period
    def observe(self, tel: Telemetry) -> str | None:
        return self.monitor.observe(tel)

    def decide_status_quo(self, tel: Telemetry) -> np.ndarray:
        return np.asarray(self.active.decide(tel), dtype=float)

    decide_model = decide_status_quo  # the active controller decides: the status quo or a ModelController

    def envelope_problem(self, u: np.ndarray, tel: Telemetry) -> str | None:
        return self.monitor.setpoint(u, self.u_prev)

    def setpoint(self, tel: Telemetry, u: np.ndarray) -> Setpoint:
        self.u_prev = u
        return Setpoint(seq=tel.seq, u_kw=[float(x) for x in u], controller=self.active.name)

    def telemetry_problem(self, tel: Telemetry) -> str | None:
        """Why `tel` cannot be acted on, or None (one line, for the bridge's integrator)."""
        z = self.domain.n_zones
        for name, values in (("t_zone_c", tel.t_zone_c), ("occupancy", tel.occupancy)):
            if len(values) != z:
                return f"{name} has {len(values)} values; {self.domain.name} has {z} zones ({', '.join(self.domain.building.zones)})"
        if tel.u_kw and len(tel.u_kw) != z:
            return f"u_kw has {len(tel.u_kw)} values; {self.domain.name} has {z} zones"
        numbers = [tel.t_out_c, tel.clearness, tel.energy_kwh, tel.period_s, *tel.t_zone_c, *tel.occupancy, *tel.u_kw]
        if not all(math.isfinite(x) for x in numbers):
            return "a value is NaN or infinite"
        if tel.period_s <= 0 or tel.energy_kwh < 0:
            return f"period_s {tel.period_s} must be positive and energy_kwh {tel.energy_kwh} not negative"
        if self.dt_h and abs(tel.period_s / 3600.0 - self.dt_h) > 1e-9:
            return f"period_s changed from {self.dt_h * 3600:g} to {tel.period_s:g}: restart the loop to change the control period"
        return None

    async def _model_or_stop(self, stop: asyncio.Event) -> bool:
        """`hold_for_model`: wait while the history is complete, no model has run yet and
        none is installed; False when `stop` came first."""
        # the telemetry in hand completes step len(records): hold before acting on it
        while (self.status_quo is not None and len(self.records) * self.dt_h >= self.settings.min_history_hours - 1e-9
               and self.current() is None and all(r.controller == STATUS_QUO for r in self.records) and not stop.is_set()):
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
        return not stop.is_set()

    async def _may_act(self, stop: asyncio.Event) -> bool:
        return not self.settings.hold_for_model or await self._model_or_stop(stop)
