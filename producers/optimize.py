"""Decisions for contexts: exact (HiGHS) or learned, each with a duality certificate.

    >>> from scf.producers import optimize as opt
    >>> target = opt.target(domain="grid:case14")            # or case="path/to/case.m"
    >>> problem = opt.problem(target, {"loads": {"5": 9.0}})  # a contract's constraints
    >>> [d] = opt.optimize(target, [problem], method="exact")
    >>> d.cost, d.certificate.lower_bound, d.certificate.rel_gap, d.slacks

The library behind `scf optimize`; numpy/scipy/highspy only. Methods:

- ``exact``: HiGHS on the exact problem; the certificate's multipliers are HiGHS's duals.
- ``learned``: candidates from a trained model (``scf.ml.optimize``, see `LearnedHook`),
  repaired to feasibility, certified with multipliers recovered from each candidate
  (`certify.recover_dual`); the best certified candidate is returned. With ``max_gap``,
  a decision whose certified gap exceeds it (or that stays infeasible after repair) falls
  back to an exact solve warm-started from the best candidate: its `fallback` is True.
- ``auto``: learned where a checkpoint is given and the learned optimiser is installed,
  exact otherwise.

A problem is a domain plus one context and what a contract adds to it (`problem`): loads,
outages and derates, previous state (ramps), comfort bands, an energy budget.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from scf.domains.base import Domain, DomainError, Infeasible
from scf.domains.certify import Certificate, make_certificate, recover_dual, tighten_equalities

METHODS = ("exact", "learned", "auto")


class OptimizeError(DomainError):
    """Bad input to the optimiser: the message names the problem and the fix."""


# --------------------------------------------------------------------------- the learned hook


class LearnedHook(Protocol):
    """What `scf.ml.optimize` provides for ``method="learned"`` (torch lives there only):

    ``propose(domain, contexts, checkpoint) -> states | (states, model_id) | obj``
        contexts (B, context_dim) float64; states (B, state_dim) or (B, K, state_dim): K
        candidates per context. An object may carry ``.states``, ``.model_id`` and
        ``.duals`` (B, n_rows) predicted row multipliers (HiGHS's sign convention, rows of
        ``domain.constraint_rows``): where given, they are tried beside recovered ones.
    ``repair(domain, contexts, states) -> states``
        the same shape, made feasible for ``domain.violations`` (1 kW / 1 mK), in batch.
        Optional: without it each candidate goes through ``domain.project``.
    """

    def propose(self, domain: Domain, contexts: np.ndarray, checkpoint: str | Path) -> Any: ...


def learned_hook() -> Any:
    """The learned optimiser module, or an `OptimizeError` saying it is not there."""
    try:
        module = importlib.import_module("scf.ml.optimize")
    except ImportError as exc:
        raise OptimizeError(
            f"method 'learned' needs scf.ml.optimize (the learned optimiser; it needs the train extra): {exc}; use --method exact"
        ) from None
    if not callable(getattr(module, "propose", None)):
        raise OptimizeError("scf.ml.optimize has no propose(domain, contexts, checkpoint) yet; use --method exact")
    return module


# --------------------------------------------------------------------------- targets and problems


def target(domain: str | None = None, case: str | Path | None = None) -> Domain:
    """The domain to optimise: a registered name (``grid:case14``, ``hvac:office3``) or any
    MATPOWER case file."""
    from scf import domains

    if (domain is None) == (case is None):
        raise OptimizeError("give either a domain (e.g. grid:case14) or a MATPOWER case file, not both or neither")
    if case is not None:
        from scf.domains import matpower as mp
        from scf.domains.grid import GridDomain

        c = mp.load_case(case)
        return GridDomain(c, name=f"grid:{c.name}")
    return domains.get(domain)


@dataclass
class Problem:
    """One instance: a domain (possibly changed by outages or comfort bands), a context, and
    the state bounds after ramps, generator outages and derates."""

    domain: Domain
    context: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    previous: np.ndarray | None = None
    budget: float | None = None
    spec: dict = field(default_factory=dict)


_SPEC_KEYS = {
    "grid": {"context", "loads", "load_scale", "outages", "derates", "previous", "budget"},
    "hvac": {"context", "T_out", "hour", "occupancy", "T0", "comfort", "previous", "budget"},
}


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptimizeError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _vector(values: Any, n: int, what: str, names: tuple[str, ...]) -> np.ndarray:
    if isinstance(values, dict):
        out = np.full(n, np.nan)
        index = {name: i for i, name in enumerate(names)}
        for key, v in values.items():
            if key not in index:
                raise OptimizeError(f"{what}: unknown name {key!r}; use one of {', '.join(names[:6])}{'…' if len(names) > 6 else ''}")
            out[index[key]] = _number(v, f"{what}[{key}]")
        if np.isnan(out).any():
            raise OptimizeError(f"{what}: {names[int(np.argmax(np.isnan(out)))]!r} is missing; give all {n} values")
        return out
    if not isinstance(values, (list, tuple, np.ndarray)) or len(values) != n:
        raise OptimizeError(f"{what} needs {n} values ({', '.join(names[:4])}…), got {values!r:.60}")
    return np.array([_number(v, f"{what}[{names[i]}]") for i, v in enumerate(values)])


def problem(domain: Domain, spec: dict | None = None) -> Problem:
    """A `Problem` from a contract's constraints (all keys optional; nominal otherwise).

    grid: ``context`` (all loads, a list or {"Pd@busN": MW}), ``loads`` ({bus: MW} over the
    nominal loads), ``load_scale``, ``outages`` ({"branches": ["f-t", ...], "generators":
    ["Pg1@bus1" | 1-based index, ...]}), ``derates`` ({"branches": {"f-t": fraction of
    rateA}, "generators": {name: fraction of Pmax}}), ``previous`` (the dispatch now: ramp
    limits), ``budget`` ($/h the decision may cost at most).
    hvac: ``context`` (the full vector or by name), or ``T_out``, ``hour``, ``occupancy``
    and ``T0`` (lists or {zone: value}), ``comfort`` ({"occupied": [lo, hi], "unoccupied":
    [lo, hi]} °C), ``previous`` (HVAC powers now: ramps), ``budget`` (kWh at most).
    """
    spec = dict(spec or {})
    if not isinstance(spec, dict):
        raise OptimizeError(f"a context must be a JSON object, got {type(spec).__name__}")
    allowed = _SPEC_KEYS.get(domain.kind, {"context", "previous", "budget"})
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise OptimizeError(f"unknown constraint {unknown[0]!r} for {domain.name}; use {', '.join(sorted(allowed))}")
    if domain.kind == "grid":
        domain, context, lo, hi = _grid_problem(domain, spec)
    elif domain.kind == "hvac":
        domain, context, lo, hi = _hvac_problem(domain, spec)
    else:  # pragma: no cover - every domain here is grid or hvac
        context = _vector(spec["context"], domain.context_dim, "context", domain.context_names)
        lo, hi = (np.asarray(b, float).copy() for b in domain.state_bounds)
    previous = None
    if spec.get("previous") is not None:
        previous = _vector(spec["previous"], domain.state_dim, "previous", domain.state_names)
        ramp = np.asarray(domain.ramp, float)
        lo, hi = np.maximum(lo, previous - ramp), np.minimum(hi, previous + ramp)
        if np.any(lo > hi + 1e-9):
            j = int(np.argmax(lo > hi))
            raise OptimizeError(f"previous[{domain.state_names[j]}] = {previous[j]:g} is outside its limits by more than its ramp {ramp[j]:g}; fix the previous state")
        hi = np.maximum(hi, lo)
    budget = None if spec.get("budget") is None else _number(spec["budget"], "budget")
    return Problem(domain, context, lo, hi, previous, budget, spec)


def _grid_problem(grid, spec: dict):
    from scf.domains import matpower as mp
    from scf.domains.grid import GridDomain

    outages, derates = spec.get("outages") or {}, spec.get("derates") or {}
    for what, value, keys in (("outages", outages, {"branches", "generators"}), ("derates", derates, {"branches", "generators"})):
        if not isinstance(value, dict) or set(value) - keys:
            raise OptimizeError(f"{what} must be an object with 'branches' and/or 'generators', got {value!r:.80}")
    for what, value, kind in (
        ("outages.branches", outages.get("branches"), list), ("outages.generators", outages.get("generators"), list),
        ("derates.branches", derates.get("branches"), dict), ("derates.generators", derates.get("generators"), dict),
    ):  # fmt: skip
        if value is not None and not isinstance(value, kind):
            shape = '["from-to", ...]' if kind is list else '{"name": fraction}'
            raise OptimizeError(f"{what} must be {'a list' if kind is list else 'an object'} like {shape}, got {value!r:.60}")
    out_br = list(outages.get("branches") or [])
    der_br = dict(derates.get("branches") or {})
    if out_br or der_br:  # a changed network: a domain of its own (same state and context)
        case = grid.case
        branch = case.branch.copy()
        labels = [f"{int(a)}-{int(b)}" for a, b in branch[:, [mp.F_BUS, mp.T_BUS]]]

        def rows_of(label: Any) -> np.ndarray:
            hits = np.flatnonzero(np.array(labels) == str(label))
            if not len(hits):
                raise OptimizeError(f"unknown branch {label!r} in {grid.name}: name a branch as 'from-to' bus numbers, e.g. {labels[0]!r}")
            return hits

        for label in out_br:
            branch[rows_of(label), mp.BR_STATUS] = 0
        for label, frac in der_br.items():
            frac = _number(frac, f"derates.branches[{label}]")
            if not 0 <= frac <= 1:
                raise OptimizeError(f"derates.branches[{label}] = {frac:g}: a derate is a fraction of rateA between 0 and 1")
            r = rows_of(label)
            if np.any(branch[r, mp.RATE_A] <= 0):
                raise OptimizeError(f"branch {label} has no rating (rateA 0 = unlimited) to derate; give it an outage or leave it")
            branch[r, mp.RATE_A] *= frac
        changed = GridDomain(dataclasses.replace(case, branch=branch), name=f"{grid.name}+changes", formulation=grid.formulation)
        if changed.state_names != grid.state_names or changed.context_names != grid.context_names:
            raise OptimizeError(f"these branch outages split off buses of {grid.name} (islands dropped: {'; '.join(changed.notes)}); the decision's variables would change: outage fewer branches")
        grid = changed
    # the context: nominal, or given whole, or loads set per bus, times a scale
    if spec.get("context") is not None:
        context = _vector(spec["context"], grid.context_dim, "context", grid.context_names)
    else:
        context = grid.nominal_load.copy()
    loads = spec.get("loads") or {}
    if not isinstance(loads, dict):
        raise OptimizeError(f"loads must be an object {{bus number: MW}}, got {loads!r:.60}")
    position = {int(grid.bus[i, mp.BUS_I]): j for j, i in enumerate(grid.load_buses)}
    for key, mw in loads.items():
        try:
            bus_id = int(str(key).removeprefix("Pd@bus").removeprefix("bus"))
        except ValueError:
            raise OptimizeError(f"loads: {key!r} is not a bus number; use e.g. {{\"{next(iter(position), 1)}\": 12.5}}") from None
        if bus_id not in position:
            known = bus_id in grid.bus_index
            why = "has no load in the case (the context holds the buses with a nominal load)" if known else "is not a bus of the case"
            raise OptimizeError(f"loads: bus {bus_id} {why}; loads may be set at buses {', '.join(map(str, list(position)[:8]))}…")
        context[position[bus_id]] = _number(mw, f"loads[{key}]")
    if spec.get("load_scale") is not None:
        scale = _number(spec["load_scale"], "load_scale")
        if scale < 0:
            raise OptimizeError(f"load_scale = {scale:g} is negative; loads scale by a factor >= 0")
        context = context * scale
    neg = np.flatnonzero((context < 0) & (grid.nominal_load >= 0))
    if len(neg):
        j = int(neg[0])
        raise OptimizeError(f"negative load {context[j]:g} MW at {grid.context_names[j]}, a bus that consumes in the case; give a load >= 0")
    lo, hi = grid.pmin.copy(), grid.pmax.copy()
    for gen in outages.get("generators") or []:
        j = _state_index(grid, gen)
        lo[j] = hi[j] = 0.0
    for gen, frac in (derates.get("generators") or {}).items():
        j = _state_index(grid, gen)
        frac = _number(frac, f"derates.generators[{gen}]")
        if not 0 <= frac <= 1:
            raise OptimizeError(f"derates.generators[{gen}] = {frac:g}: a derate is a fraction of Pmax between 0 and 1")
        hi[j] = max(lo[j], hi[j] * frac)
    return grid, context, lo, hi


def _state_index(domain: Domain, key: Any) -> int:
    if isinstance(key, str) and key.isdigit():  # JSON object keys are strings
        key = int(key)
    if isinstance(key, int) and not isinstance(key, bool):
        if 1 <= key <= domain.state_dim:
            return key - 1
    elif key in domain.state_names:
        return domain.state_names.index(key)
    raise OptimizeError(f"unknown generator {key!r}: use a 1-based index up to {domain.state_dim} or a name like {domain.state_names[0]!r}")


def _hvac_problem(hvac, spec: dict):
    from scf.domains.hvac import HvacDomain

    zones = hvac.building.zones
    if spec.get("comfort") is not None:
        comfort = spec["comfort"]
        if not isinstance(comfort, dict) or set(comfort) - {"occupied", "unoccupied"}:
            raise OptimizeError(f"comfort must be {{\"occupied\": [lo, hi], \"unoccupied\": [lo, hi]}} in °C, got {comfort!r:.80}")
        bands = {}
        for key in ("occupied", "unoccupied"):
            band = comfort.get(key, getattr(hvac.building, f"{key}_band"))
            if not isinstance(band, (list, tuple)) or len(band) != 2:
                raise OptimizeError(f"comfort.{key} must be [low, high] in °C, got {band!r}")
            low, high = _number(band[0], f"comfort.{key}[0]"), _number(band[1], f"comfort.{key}[1]")
            if low > high:
                raise OptimizeError(f"comfort.{key} = [{low:g}, {high:g}]: the low end is above the high end")
            bands[f"{key}_band"] = (low, high)
        hvac = HvacDomain(dataclasses.replace(hvac.building, **bands), hvac.name + "+comfort")
    if spec.get("context") is not None:
        context = _vector(spec["context"], hvac.context_dim, "context", hvac.context_names)
    else:
        parts = []
        for key in ("T_out", "hour"):
            if key not in spec:
                raise OptimizeError(f"hvac context: give 'context' (all {hvac.context_dim} values) or T_out, hour, occupancy and T0")
            parts.append(_number(spec[key], key))
        for key in ("occupancy", "T0"):
            if key not in spec:
                raise OptimizeError(f"hvac context: {key} is missing; give one value per zone ({', '.join(zones)})")
            parts.extend(_vector(spec[key], len(zones), key, zones))
        context = np.array(parts)
    reason = hvac.in_bounds(context, np.zeros(hvac.state_dim))
    if reason:
        raise OptimizeError(f"{hvac.name}: {reason}; give a context within the domain's bounds")
    lo, hi = (np.asarray(b, float).copy() for b in hvac.state_bounds)
    return hvac, context, lo, hi


# --------------------------------------------------------------------------- decisions


@dataclass
class Decision:
    """One context's decision and everything said about it."""

    state: np.ndarray | None
    cost: float | None
    certificate: Certificate | None
    method: str  # "exact" or "learned"
    model_id: str | None
    fallback: bool  # a learned decision replaced by an exact solve (max_gap)
    status: str  # "optimal" (certified within max_gap or exact), "uncertified", "infeasible"
    message: str
    slacks: dict[str, float]
    violations: list[str]
    timings: dict[str, float]
    state_names: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        cert = self.certificate
        return {
            "status": self.status,
            "message": self.message,
            "method": self.method,
            "model_id": self.model_id,
            "fallback": self.fallback,
            "decision": None if self.state is None else dict(zip(self.state_names, map(float, self.state))),
            "cost": self.cost,
            "lower_bound": None if cert is None else cert.lower_bound,
            "gap": None if cert is None else cert.gap,
            "rel_gap": None if cert is None else cert.rel_gap,
            "dual_source": None if cert is None else cert.source,
            "violations": self.violations,
            "slack": self.slacks,
            "timings": self.timings,
        }


def slacks(problem: Problem, state: np.ndarray) -> dict[str, float]:
    """Every constraint's slack (>= 0 holds, < 0 broken by that much; equalities: minus the
    mismatch): the domain's rows, then each state variable's bounds."""
    d, x = problem.domain, np.asarray(state, float)
    rows = d.constraint_rows(problem.context)
    act = rows.matvec(x)
    out: dict[str, float] = {}
    for name, a, lo, hi in zip(rows.names, act, rows.lo, rows.hi):
        out[name] = float(-abs(a - lo) if lo == hi else min(hi - a, a - lo))
    for name, v, lo, hi in zip(d.state_names, x, problem.lo, problem.hi):
        out[f"limit[{name}]"] = float(min(hi - v, v - lo))
    if problem.budget is not None:
        out["budget"] = float(problem.budget - d.cost(problem.context, x))
    return out


def _violations(problem: Problem, x: np.ndarray) -> list[str]:
    d = problem.domain
    found = [v.message for v in d.violations(problem.context, x, problem.previous)]
    tol = 1e-3 if d.kind == "grid" else 1e-6
    for j in np.flatnonzero((x < problem.lo - tol) | (x > problem.hi + tol)):
        found.append(f"limit[{d.state_names[j]}]: {x[j]:.4g} outside [{problem.lo[j]:.4g}, {problem.hi[j]:.4g}] (outage, derate or ramp)")
    if problem.budget is not None and d.cost(problem.context, x) > problem.budget * (1 + 1e-9) + 1e-9:
        found.append(f"budget: cost {d.cost(problem.context, x):.6g} {d.energy_unit} exceeds the budget {problem.budget:.6g} {d.energy_unit}")
    return found


def certify(problem: Problem, state: np.ndarray, dual: np.ndarray | None = None, source: str = "recovered") -> Certificate:
    """The certificate of `state`: given multipliers (checked as they are, then tightened
    along the equality rows) or, without them, multipliers recovered from the state."""
    d = problem.domain
    rows = d.constraint_rows(problem.context)
    cost = d.separable_cost
    if dual is None:
        y = recover_dual(cost, rows, problem.lo, problem.hi, np.asarray(state, float))
    else:
        y = np.asarray(dual, float)
        first = make_certificate(cost, rows, problem.lo, problem.hi, state, y, source)
        if first.rel_gap <= 1e-8:
            return first
        y = tighten_equalities(cost, rows, problem.lo, problem.hi, y)
    return make_certificate(cost, rows, problem.lo, problem.hi, state, y, source)


def check_certificate(problem: Problem, state: np.ndarray, certificate: Certificate, *, tol: float = 1e-9) -> str | None:
    """Why `certificate` does not hold for `state` (recomputed from the problem data and
    its multipliers alone: no solver), or None."""
    from scf.domains.certify import lower_bound

    x = np.asarray(state, float)
    broken = _violations(problem, x)
    if broken:
        return f"the decision is not feasible: {broken[0]}"
    d = problem.domain
    cost = d.cost(problem.context, x)
    if abs(cost - certificate.cost) > tol * max(1.0, abs(cost)):
        return f"the certificate says cost {certificate.cost:.9g}, the decision costs {cost:.9g}"
    bound = lower_bound(d.separable_cost, d.constraint_rows(problem.context), problem.lo, problem.hi, certificate.dual)
    if bound < certificate.lower_bound - tol * max(1.0, abs(bound)):
        return f"the multipliers give a lower bound of {bound:.9g}, not the {certificate.lower_bound:.9g} claimed"
    return None


def _exact(problem: Problem, start: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    d = problem.domain
    x, y = d.solve_exact(problem.context, lo=problem.lo, hi=problem.hi, start=start)
    if problem.budget is not None and d.cost(problem.context, x) > problem.budget * (1 + 1e-9) + 1e-9:
        raise Infeasible(
            f"{d.name}: the budget {problem.budget:.6g} {d.energy_unit} is below the least cost {d.cost(problem.context, x):.6g} {d.energy_unit} that meets the other constraints: the budget conflicts with them"
        )
    return x, y


def _finish(problem: Problem, x: np.ndarray, cert: Certificate, method: str, model_id: str | None, fallback: bool,
            max_gap: float | None, timings: dict[str, float]) -> Decision:  # fmt: skip
    broken = _violations(problem, x)
    if broken:
        status, message = "infeasible", broken[0]
    elif max_gap is not None and not cert.certified(max_gap):
        status, message = "uncertified", f"certified gap {cert.rel_gap:.3g} exceeds max_gap {max_gap:g}"
        unbounded = int(np.sum(~np.isfinite(problem.lo) | ~np.isfinite(problem.hi)))
        if not math.isfinite(cert.lower_bound) and unbounded:
            message += (f": {unbounded} state variables have no finite limit, and a duality bound over an unbounded range is finite only with"
                        " multipliers exact to the last bit; give them finite limits (Pmin/Pmax) to certify")  # fmt: skip
    else:
        status, message = "optimal", f"certified within {cert.rel_gap:.3g} of the optimum"
    d = problem.domain
    return Decision(x, d.cost(problem.context, x), cert, method, model_id, fallback, status, message,
                    slacks(problem, x), broken, timings, d.state_names)  # fmt: skip


def _failed(problem: Problem, method: str, message: str, timings: dict[str, float]) -> Decision:
    return Decision(None, None, None, method, None, False, "infeasible", message, {}, [message], timings, problem.domain.state_names)


def optimize(
    problems: list[Problem],
    *,
    method: str = "exact",
    checkpoint: str | Path | None = None,
    max_gap: float | None = None,
) -> list[Decision]:
    """A decision per problem (see the module docstring for the methods)."""
    if method not in METHODS:
        raise OptimizeError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if max_gap is not None and not (max_gap >= 0 and math.isfinite(max_gap)):
        raise OptimizeError(f"max_gap = {max_gap} must be a number >= 0 (a relative gap, e.g. 0.001 for 0.1 %)")
    if method == "auto":
        method = "exact"
        if checkpoint is not None:
            try:
                learned_hook()
                method = "learned"
            except OptimizeError:
                method = "exact"
    if method == "learned":
        if checkpoint is None:
            raise OptimizeError("method 'learned' needs a checkpoint (--checkpoint PATH)")
        return _optimize_learned(problems, Path(checkpoint), max_gap)
    return [_optimize_exact(p, max_gap) for p in problems]


def _optimize_exact(p: Problem, max_gap: float | None) -> Decision:
    t0 = time.perf_counter()
    try:
        x, y = _exact(p)
    except Infeasible as exc:
        return _failed(p, "exact", str(exc), {"solve_s": time.perf_counter() - t0, "total_s": time.perf_counter() - t0})
    t1 = time.perf_counter()
    cert = certify(p, x, y, source="solver")
    t2 = time.perf_counter()
    return _finish(p, x, cert, "exact", None, False, max_gap, {"solve_s": t1 - t0, "certify_s": t2 - t1, "total_s": t2 - t0})


def _optimize_learned(problems: list[Problem], checkpoint: Path, max_gap: float | None) -> list[Decision]:
    hook = learned_hook()
    out: list[Decision | None] = [None] * len(problems)
    # one propose call per distinct domain (outages and comfort bands make domains of their own)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(problems):
        groups.setdefault(id(p.domain), []).append(i)
    for members in groups.values():
        domain = problems[members[0]].domain
        contexts = np.stack([problems[i].context for i in members])
        t0 = time.perf_counter()
        result = hook.propose(domain, contexts, checkpoint)
        states, model_id, duals = _unpack(result, checkpoint)
        states = np.asarray(states, float)
        if states.ndim == 2:
            states = states[:, None, :]
        if states.shape[0] != len(members) or states.shape[2] != domain.state_dim:
            raise OptimizeError(f"scf.ml.optimize.propose returned states of shape {states.shape}; expected ({len(members)}, [K,] {domain.state_dim})")
        t1 = time.perf_counter()
        repair = getattr(hook, "repair", None)
        k = states.shape[1]
        if callable(repair):
            flat = np.asarray(repair(domain, np.repeat(contexts, k, axis=0), states.reshape(-1, domain.state_dim)), float)
            states = flat.reshape(len(members), k, domain.state_dim)
        t2 = time.perf_counter()
        per = {"propose_s": (t1 - t0) / len(members), "repair_s": (t2 - t1) / len(members)}
        group = [problems[i] for i in members]
        for i, dec in zip(members, choose_batch(group, states, max_gap=max_gap, model_id=model_id, duals=duals, repaired=callable(repair), timings=per)):
            out[i] = dec
    return out  # type: ignore[return-value]


def _unpack(result: Any, checkpoint: Path) -> tuple[np.ndarray, str, np.ndarray | None]:
    if isinstance(result, tuple):
        states, model_id = result[0], str(result[1])
        return states, model_id, None
    if hasattr(result, "states"):
        return result.states, str(getattr(result, "model_id", checkpoint.name)), getattr(result, "duals", None)
    return result, checkpoint.name, None


def choose(p: Problem, candidates: np.ndarray, *, max_gap: float | None, model_id: str | None = None,
           duals: np.ndarray | None = None, repaired: bool = False, timings: dict[str, float] | None = None) -> Decision:  # fmt: skip
    """`choose_batch` for one problem: candidates (K, state_dim)."""
    return choose_batch([p], np.asarray(candidates, float)[None], max_gap=max_gap, model_id=model_id,
                        duals=None if duals is None else np.asarray(duals, float)[None], repaired=repaired, timings=timings)[0]  # fmt: skip


def choose_batch(problems: list[Problem], candidates: np.ndarray, *, max_gap: float | None, model_id: str | None = None,
                 duals: np.ndarray | None = None, repaired: bool = False, timings: dict[str, float] | None = None) -> list[Decision]:  # fmt: skip
    """Decisions among candidate states (B, K, state_dim) for problems of one domain: each
    candidate clipped to its problem's bounds and, where the rows say it is not feasible (or
    `repaired` is False), projected (`Domain.project`); all feasible candidates certified at
    once with multipliers recovered from them (`certify.recover_duals`, vectorised; and
    `duals` (B, n_rows), predicted ones, where given: the higher bound kept); the cheapest
    per problem kept and checked by the domain's own `violations`; with `max_gap`, an exact
    solve warm-started from it replaces it when its gap is not certified (`fallback` True).
    This is the learned path after `propose`; tests and benchmarks feed it any states."""
    from scf.domains.certify import lower_bounds, make_certificates, recover_duals

    timings = dict(timings or {})
    cand = np.asarray(candidates, float)
    n_b, k, n = cand.shape
    d = problems[0].domain
    t0 = time.perf_counter()
    row_sets = [d.constraint_rows(p.context) for p in problems]
    rows0 = row_sets[0]
    rlo = np.stack([r.lo for r in row_sets])  # (B, m)
    rhi = np.stack([r.hi for r in row_sets])
    lo = np.stack([p.lo for p in problems])  # (B, n)
    hi = np.stack([p.hi for p in problems])
    x = np.clip(cand, lo[:, None], hi[:, None])  # (B, K, n)
    tol = 1e-3 * 0.5  # inside the domains' 1 kW / 1 mK tolerance
    act = rows0.matvec(x.reshape(-1, n)).reshape(n_b, k, -1)
    ok = np.all((act >= rlo[:, None] - tol) & (act <= rhi[:, None] + tol), axis=-1)
    for b, j in zip(*np.nonzero(~ok | (not repaired))):
        p = problems[b]
        try:
            x[b, j] = np.clip(d.project(p.context, x[b, j]), p.lo, p.hi)
            ok[b, j] = True
        except Infeasible:
            ok[b, j] = False
    act = rows0.matvec(x.reshape(-1, n)).reshape(n_b, k, -1)
    ok &= np.all((act >= rlo[:, None] - tol) & (act <= rhi[:, None] + tol), axis=-1)
    flat_b, flat_j = np.nonzero(ok)
    best: list[tuple[np.ndarray, Certificate] | None] = [None] * n_b
    if len(flat_b):
        xs = x[flat_b, flat_j]
        y = recover_duals(d.separable_cost, rows0, rlo[flat_b], rhi[flat_b], lo[flat_b], hi[flat_b], xs)
        if duals is not None:  # predicted multipliers: keep whichever bounds higher
            yp = np.asarray(duals, float)[flat_b]
            g_rec = lower_bounds(d.separable_cost, rows0.rmatvec, rlo[flat_b], rhi[flat_b], lo[flat_b], hi[flat_b], y)
            g_pred = lower_bounds(d.separable_cost, rows0.rmatvec, rlo[flat_b], rhi[flat_b], lo[flat_b], hi[flat_b], yp)
            y = np.where((g_pred > g_rec)[:, None], yp, y)
        certs = make_certificates(d.separable_cost, rows0, rlo[flat_b], rhi[flat_b], lo[flat_b], hi[flat_b], xs, y, "recovered")
        if duals is not None:
            certs = [dataclasses.replace(c, source="predicted") if up else c for c, up in zip(certs, g_pred > g_rec)]
        for i, (b, cert) in enumerate(zip(flat_b, certs)):
            if best[b] is None or cert.cost < best[b][1].cost:
                best[b] = (xs[i], cert)
    per = (time.perf_counter() - t0) / n_b
    out = []
    for b, p in enumerate(problems):
        tb = {**timings, "certify_s": per}
        chosen = best[b]
        if chosen is not None and _violations(p, chosen[0]):
            chosen = None  # the domain's own check is the authority
        if chosen is not None and (max_gap is None or chosen[1].certified(max_gap)):
            tb["total_s"] = sum(tb.values())
            out.append(_finish(p, chosen[0], chosen[1], "learned", model_id, False, max_gap, tb))
            continue
        if max_gap is None:  # nothing feasible came out of the model and no fallback was asked for
            tb["total_s"] = sum(tb.values())
            out.append(_failed(p, "learned", f"no feasible candidate from the model after repair ({k} tried); set max_gap to fall back to an exact solve", tb))
            continue
        t1 = time.perf_counter()
        try:
            xe, ye = _exact(p, start=None if chosen is None else chosen[0])
        except Infeasible as exc:
            tb["total_s"] = sum(tb.values())
            out.append(_failed(p, "learned", str(exc), tb))
            continue
        t2 = time.perf_counter()
        cert = certify(p, xe, ye, source="solver")
        tb.update(solve_s=t2 - t1, certify_s=tb["certify_s"] + time.perf_counter() - t2)
        tb["total_s"] = sum(v for key, v in tb.items() if key != "total_s")
        dec = _finish(p, xe, cert, "learned", model_id, True, max_gap, tb)
        out.append(dec)
    return out


def summary(decisions: list[Decision]) -> dict:
    """Counts over a batch: statuses, the fallback rate, gaps."""
    gaps = [d.certificate.rel_gap for d in decisions if d.certificate is not None]
    learned = [d for d in decisions if d.method == "learned"]
    return {
        "n": len(decisions),
        "optimal": sum(d.status == "optimal" for d in decisions),
        "uncertified": sum(d.status == "uncertified" for d in decisions),
        "infeasible": sum(d.status == "infeasible" for d in decisions),
        "fallback_rate": (sum(d.fallback for d in learned) / len(learned)) if learned else 0.0,
        "max_rel_gap": max(gaps) if gaps else None,
        "median_rel_gap": float(np.median(gaps)) if gaps else None,
    }


# --------------------------------------------------------------------------- batches


def read_batch(domain: Domain, path: Path) -> list[dict]:
    """Contexts from JSONL (one constraints object per line) or Parquet (a `context` list
    column, or one column per context name, or a `spec` column of JSON objects)."""
    path = Path(path)
    if not path.is_file():
        raise OptimizeError(f"no batch file at {path}; give a .jsonl or .parquet file")
    if path.suffix in (".jsonl", ".ndjson", ".json"):
        specs = []
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                spec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise OptimizeError(f"{path}:{n}: not JSON ({exc.msg}); write one JSON object per line") from None
            except RecursionError:
                raise OptimizeError(f"{path}:{n}: not JSON (nested too deeply); write one JSON object per line") from None
            if not isinstance(spec, dict):
                raise OptimizeError(f"{path}:{n}: a line must be a JSON object of constraints, got {type(spec).__name__}")
            specs.append(spec)
        return specs
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a broken file; one line names it
            raise OptimizeError(f"{path}: not a readable Parquet file ({exc}); write it with pyarrow or DuckDB") from None
        cols = table.column_names
        if "spec" in cols:
            try:
                specs = [json.loads(s) for s in table.column("spec").to_pylist()]
            except (TypeError, ValueError, RecursionError) as exc:
                raise OptimizeError(f"{path}: a 'spec' row is not a JSON object ({type(exc).__name__}); write each as a JSON string") from None
            if not all(isinstance(s, dict) for s in specs):
                raise OptimizeError(f"{path}: every 'spec' row must be a JSON object of constraints")
            return specs
        if "context" in cols:
            return [{"context": list(c)} for c in table.column("context").to_pylist()]
        if all(name in cols for name in domain.context_names):
            data = np.stack([np.asarray(table.column(n).to_numpy(), float) for n in domain.context_names], axis=1)
            return [{"context": list(row)} for row in data]
        raise OptimizeError(f"{path}: needs a 'context' list column, a 'spec' JSON column or the columns {', '.join(domain.context_names[:4])}…")
    raise OptimizeError(f"{path}: unknown batch format {path.suffix!r}; use .jsonl or .parquet")


def write_parquet(decisions: list[Decision], path: Path) -> None:
    """One row per decision: the state, cost, certificate, method, model id, timings, and
    the slacks (their names in the file's metadata, `slack_names`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = next((list(d.slacks) for d in decisions if d.slacks), [])
    timing_keys = sorted({k for d in decisions for k in d.timings})
    cols: dict[str, list] = {
        "index": list(range(len(decisions))),
        "status": [d.status for d in decisions],
        "message": [d.message for d in decisions],
        "method": [d.method for d in decisions],
        "model_id": [d.model_id for d in decisions],
        "fallback": [d.fallback for d in decisions],
        "state": [None if d.state is None else [float(v) for v in d.state] for d in decisions],
        "cost": [d.cost for d in decisions],
        "lower_bound": [None if d.certificate is None else d.certificate.lower_bound for d in decisions],
        "gap": [None if d.certificate is None else d.certificate.gap for d in decisions],
        "rel_gap": [None if d.certificate is None else d.certificate.rel_gap for d in decisions],
        "violations": [d.violations for d in decisions],
        "slack": [[d.slacks.get(n) for n in names] if d.slacks else None for d in decisions],
    }
    for k in timing_keys:
        cols[k] = [d.timings.get(k) for d in decisions]
    table = pa.table(cols)
    state_names = next((list(d.state_names) for d in decisions), [])
    table = table.replace_schema_metadata({"slack_names": json.dumps(names), "state_names": json.dumps(state_names)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
