"""Time-domain simulation of the domains: what `scf simulate` runs, and the plant-step API
that edge control loops and M&V build on.

    >>> from scf.domains import dynamics
    >>> result = dynamics.simulate("hvac:office3", scenarios=100, hours=24, seed=0)
    >>> result.metrics          # one row per scenario (pyarrow.Table)
    >>> result.summary()        # metric -> mean, p5, p95, worst
    >>> result.write("out/")    # trajectories.parquet, metrics.parquet (+ frequency.parquet for grids)

The plants themselves (`hvac_dynamics.HvacPlant`, `grid_dynamics.GridPlant` and the
frequency model `grid_dynamics.sfr_response`) take a batch of scenarios at once: state +
setpoints + disturbances -> next state and measurements. Disturbances are explicit arrays
(generated here as Ornstein–Uhlenbeck processes, or measured), so a counterfactual can be
simulated over the same disturbances as the run it is compared with.

Randomness: every scenario draws from its own child of `SeedSequence(seed)`, so scenario i
is the same trajectory whether it runs alone or in a batch of 1,000 (a test checks it).
numpy and scipy only; no torch (see docs/simulate.md for why).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scf.domains.base import DomainError


class SimulationError(DomainError):
    """Bad simulation input: the message names the problem and the fix."""


# --------------------------------------------------------------------------- noise


@dataclass(frozen=True)
class OrnsteinUhlenbeck:
    """dX = -theta X dt + sigma dW (mean 0): stationary variance sigma^2 / (2 theta).

    Sampled exactly on a grid of step `dt` (no discretisation error; Gillespie 1996):
    X[k+1] = a X[k] + s xi,  a = exp(-theta dt),  s = sigma sqrt((1 - a^2) / (2 theta))."""

    theta: float  # 1 / correlation time, in 1 / (time unit of dt)
    sigma: float

    @classmethod
    def from_std(cls, std: float, correlation_time: float) -> "OrnsteinUhlenbeck":
        theta = 1.0 / correlation_time
        return cls(theta, std * np.sqrt(2.0 * theta))

    @property
    def stationary_variance(self) -> float:
        return self.sigma**2 / (2.0 * self.theta)

    def paths(self, normals: np.ndarray, dt: float, x0: np.ndarray | None = None) -> np.ndarray:
        """Paths from standard normals of shape (..., steps + 1): the first normal draws X[0]
        from the stationary law unless `x0` is given; each further one is a step."""
        a = np.exp(-self.theta * dt)
        s = self.sigma * np.sqrt((1.0 - a * a) / (2.0 * self.theta))
        out = np.empty_like(normals, dtype=float)
        out[..., 0] = np.sqrt(self.stationary_variance) * normals[..., 0] if x0 is None else x0
        for k in range(1, normals.shape[-1]):
            out[..., k] = a * out[..., k - 1] + s * normals[..., k]
        return out


def scenario_normals(seed: int, n: int, shape: tuple[int, ...], stream: int = 0) -> np.ndarray:
    """(n, *shape) standard normals, scenario i from child i of SeedSequence((seed, stream)):
    the same numbers for scenario i whatever n is."""
    children = np.random.SeedSequence((int(seed), int(stream))).spawn(n)
    return np.stack([np.random.default_rng(c).standard_normal(shape) for c in children])


def scenario_uniforms(seed: int, n: int, shape: tuple[int, ...], stream: int) -> np.ndarray:
    children = np.random.SeedSequence((int(seed), int(stream))).spawn(n)
    return np.stack([np.random.default_rng(c).random(shape) for c in children])


# --------------------------------------------------------------------------- results


@dataclass
class SimResult:
    """What a simulation run produced: per-step trajectories and per-scenario metrics as
    Arrow tables (written as Parquet), plus any extra trajectories (a grid's frequency)."""

    domain: str
    controller: str
    scenarios: int
    hours: float
    seed: int
    trajectories: "object"  # pyarrow.Table
    metrics: "object"  # pyarrow.Table
    extra: dict[str, object] = field(default_factory=dict)  # file stem -> pyarrow.Table

    def summary(self) -> list[dict]:
        """Per metric: mean, 5th and 95th percentile and the worst value over scenarios."""
        import warnings

        rows = []
        for name in self.metrics.column_names:
            if name == "scenario":
                continue
            v = np.asarray(self.metrics.column(name).to_numpy(zero_copy_only=False), dtype=float)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a metric NaN in every scenario (never settled) stays NaN
                if name in LOW_IS_BAD:
                    worst = np.nanmin(v)
                elif name.endswith("residual_kwh"):
                    worst = v[np.nanargmax(np.abs(v))] if np.isfinite(v).any() else np.nan
                else:
                    worst = np.nanmax(v)
                rows.append({"metric": name, "mean": float(np.nanmean(v)), "p5": float(np.nanpercentile(v, 5)),
                             "p95": float(np.nanpercentile(v, 95)), "worst": float(worst),
                             "missing": int(np.isnan(v).sum())})  # fmt: skip
        return rows

    def write(self, out: Path | str) -> list[Path]:
        import pyarrow.parquet as pq

        out = Path(out)
        if out.exists() and not out.is_dir():
            raise SimulationError(f"--out {out} is a file: give a directory (it is created if missing)")
        try:
            out.mkdir(parents=True, exist_ok=True)
            meta = {b"scf.simulate": json.dumps({"domain": self.domain, "controller": self.controller, "scenarios": self.scenarios,
                                                  "hours": self.hours, "seed": self.seed}).encode()}  # fmt: skip
            paths = []
            for stem, table in [("trajectories", self.trajectories), ("metrics", self.metrics), *self.extra.items()]:
                path = out / f"{stem}.parquet"
                pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **meta}), path)
                paths.append(path)
        except OSError as exc:
            raise SimulationError(f"cannot write to {out}: {exc.strerror or exc}; choose a writable --out directory") from None
        return paths


LOW_IS_BAD = {"nadir_hz", "steady_state_hz"}
MAX_VALUES = 60_000_000  # per-step values of a run (x 8 bytes, about 3 copies): about 1.5 GB at most  # the worst nadir is the lowest; every other metric is worse when higher


# --------------------------------------------------------------------------- entry point


def load_decision(path: Path | str, width: int, names: tuple[str, ...]) -> np.ndarray:
    """A decision file: JSON, either a list of `width` numbers (held for the whole run),
    `{"state": [...]}` as the optimiser writes it, or a list of such lists (one per hour,
    the last one held). Returns (hours, width)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise SimulationError(f"decision file {path} does not exist: give a JSON file with {width} numbers ({', '.join(names[:3])}…)") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested past the parser
        raise SimulationError(f"decision file {path} is not readable JSON ({str(exc)[:100]}); write a list of {width} numbers") from None
    if isinstance(raw, dict):
        raw = raw.get("state")
    try:
        arr = np.asarray(raw, dtype=float)
    except (TypeError, ValueError):
        raise SimulationError(f"decision file {path} holds non-numeric values; write a list of {width} numbers") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != width or arr.shape[0] == 0:
        raise SimulationError(f"decision file {path} has shape {list(arr.shape)}; this domain expects {width} numbers per hour ({', '.join(names[:3])}…)")
    if not np.all(np.isfinite(arr)):
        raise SimulationError(f"decision file {path} holds NaN or infinite values; every setpoint must be a finite number")
    return arr


def simulate(
    domain: str,
    *,
    scenarios: int = 100,
    hours: float = 24.0,
    seed: int = 0,
    controller: str | None = None,
    decision: Path | str | None = None,
    step_minutes: float | None = None,
    out: Path | str | None = None,
) -> SimResult:
    """Simulate `scenarios` stochastic scenarios of `domain` ("hvac", "hvac:office3",
    "grid:case14", ...) for `hours` under a named controller or a decision file. `out`, if
    given, is only checked here (so a bad one is refused before the run); `write` writes."""
    from scf import domains

    if scenarios < 1:
        raise SimulationError(f"--scenarios {scenarios}: simulate at least one scenario")
    if not np.isfinite(hours) or hours <= 0 or hours > 24 * 366:
        raise SimulationError(f"--hours {hours}: give a positive number of hours, at most a year (8784)")
    if controller is not None and decision is not None:
        raise SimulationError("give either --controller or --decision, not both")
    if step_minutes is not None and not (1.0 / 60.0 <= step_minutes <= 60.0):
        raise SimulationError(f"--step-minutes {step_minutes:g}: use a step between 1 second (0.0167) and 60 minutes")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise SimulationError(f"--out {out} is a file: give a directory (it is created if missing)")
    if seed < 0:
        raise SimulationError(f"--seed {seed}: give a seed of 0 or more")
    name = {"hvac": "hvac:office3", "grid": "grid:case14"}.get(domain, domain)
    dom = domains.get(name)  # UnknownDomain names the choices
    steps = max(1, round(hours / ((5.0 if step_minutes is None else step_minutes) / 60.0)))
    values = scenarios * steps * (dom.state_dim + dom.context_dim + 8)  # what the run holds per scenario and step, roughly
    if values > MAX_VALUES:
        raise SimulationError(f"{scenarios} scenarios x {steps} steps of {dom.name} would hold about {values * 8 * 3 / 1e9:.0f} GB; "
                              f"simulate fewer scenarios or hours (or a longer --step-minutes), in several runs with different seeds")  # fmt: skip
    if dom.kind == "hvac":
        from scf.domains import hvac_dynamics

        return hvac_dynamics.run(dom, scenarios=scenarios, hours=hours, seed=seed, controller=controller, decision=decision,
                                 step_minutes=step_minutes)  # fmt: skip
    from scf.domains import grid_dynamics

    return grid_dynamics.run(dom, scenarios=scenarios, hours=hours, seed=seed, controller=controller, decision=decision,
                             step_minutes=step_minutes)  # fmt: skip
