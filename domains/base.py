"""What every physical domain provides: variables and bounds, constraints, energy, a solver.

A domain is a physical system seen through two vectors: the *context* it is in (loads,
weather, occupancy …), which nobody chooses, and the *state* an operator chooses (a
generator dispatch, HVAC powers …). `cost(context, state)` is the fossil's energy;
`violations(...)` lists the constraints a state breaks, with sizes; `reference_solution`
is the optimum from a real solver. Everything here is numpy; torch stays in `ml/`.
"""

from __future__ import annotations

import abc
import datetime as dt
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from scf.bus.errors import SCFError


class DomainError(SCFError):
    """Root of the errors of `domains`."""


class UnknownDomain(DomainError):
    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        super().__init__(f"unknown domain {name!r}: use one of {', '.join(known)}")


class Infeasible(DomainError):
    """No state satisfies the constraints in this context."""


@dataclass(frozen=True)
class Violation:
    """One broken constraint: `size` is by how much, in `unit`; `message` says both."""

    constraint: str  # e.g. "line_limit[4-5]", "comfort[meeting]"
    size: float
    unit: str
    message: str

    def __str__(self) -> str:
        return self.message


class Sample(NamedTuple):
    """A synthesized observation: what a fossil's content is made from."""

    context: np.ndarray
    state: np.ndarray
    energy: float
    verified: bool
    detail: str


ENERGY_MARGIN = 0.1  # the plausible energy range: the cost range over the state bounds, widened by 10% of its span


class Domain(abc.ABC):
    """A physical system. Subclasses set the attributes below and the abstract methods.

    The feasible set of every domain here is a polytope in the state whose row matrix is
    fixed and whose row bounds depend on the context: `row_lo(c) <= A @ x <= row_hi(c)`
    and `state_lo <= x <= state_hi`. `feasible_rows` returns (A, row_lo, row_hi); the base
    class uses it to draw random feasible states (random vertices of the polytope).
    """

    name: str
    kind: str  # "grid", "hvac": which torch penalty ml/ uses
    verifier: str  # provenance verifier name of `verify`, e.g. "grid.dc_check"
    state_names: tuple[str, ...]
    context_names: tuple[str, ...]
    state_unit: str
    energy_unit: str
    state_bounds: tuple[np.ndarray, np.ndarray]
    context_bounds: tuple[np.ndarray, np.ndarray]
    sample_interval: dt.timedelta  # time between consecutive synthesized observations

    # ------------------------------------------------------------------ to implement

    @abc.abstractmethod
    def sample_context(self, rng: np.random.Generator, index: int | None = None) -> np.ndarray:
        """A plausible context; `index` is the observation's position in a series."""

    @abc.abstractmethod
    def cost(self, context: np.ndarray, state: np.ndarray) -> float:
        """The energy (in `energy_unit`) of `state` in `context`."""

    @abc.abstractmethod
    def violations(
        self, context: np.ndarray, state: np.ndarray, previous_state: np.ndarray | None = None
    ) -> list[Violation]:
        """Every constraint `state` breaks (empty when feasible)."""

    @abc.abstractmethod
    def reference_solution(self, context: np.ndarray) -> np.ndarray:
        """The optimal state from a real solver; raises `Infeasible`."""

    @abc.abstractmethod
    def simulate(self, context: np.ndarray, state: np.ndarray) -> np.ndarray:
        """What the system does with `state` (line flows, next temperatures …)."""

    @abc.abstractmethod
    def feasible_rows(self, context: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(A, row_lo, row_hi) of the feasible polytope (A fixed; bounds per context)."""

    # ------------------------------------------------------------------ certified path

    def constraint_rows(self, context: np.ndarray):
        """The rows of `feasible_rows` as a `certify.Rows` operator (domains with a sparse
        structure override it; see domains/certify.py)."""
        from scf.domains.certify import Rows

        a, lo, hi = self.feasible_rows(context)
        return Rows.dense(a, lo, hi, tuple(f"row[{i}]" for i in range(len(lo))))

    @property
    def separable_cost(self):
        """The cost as a `certify.SeparableCost` (what duality certificates need)."""
        raise DomainError(f"{self.name} has no certified path (its cost is not given as a separable convex cost); use the exact method")

    def solve_exact(self, context: np.ndarray, *, lo=None, hi=None, start=None) -> tuple[np.ndarray, np.ndarray]:
        """(the optimal state, the multipliers of `constraint_rows`); raises `Infeasible`."""
        raise DomainError(f"{self.name} has no exact solve with multipliers; use reference_solution")

    # ------------------------------------------------------------------ shared

    @property
    def state_dim(self) -> int:
        return len(self.state_names)

    @property
    def context_dim(self) -> int:
        return len(self.context_names)

    def in_bounds(self, context, state) -> str | None:
        """Why (context, state) is outside the domain's bounds or shape, or None."""
        for what, values, names, (lo, hi) in (
            ("context", context, self.context_names, self.context_bounds),
            ("state", state, self.state_names, self.state_bounds),
        ):
            v = np.asarray(values, dtype=float)
            if v.shape != (len(names),):
                return f"{what} has {v.size} values, {self.name} expects {len(names)} ({', '.join(names[:4])}…)"
            bad = ~np.isfinite(v)
            if bad.any():
                i = int(np.argmax(bad))
                return f"{what}[{names[i]}] is not finite"
            slack = 1e-9 * np.maximum(1.0, np.abs(hi - lo))
            below, above = v < lo - slack, v > hi + slack
            if below.any():
                i = int(np.argmax(below))
                return f"{what}[{names[i]}] = {v[i]:.6g} is below its bound {lo[i]:.6g}"
            if above.any():
                i = int(np.argmax(above))
                return f"{what}[{names[i]}] = {v[i]:.6g} is above its bound {hi[i]:.6g}"
        return None

    def energy_range(self) -> tuple[float, float]:
        """(min, max) of `cost` over the state bounds, in any context. This default assumes
        a separable cost (one term per state variable, as in every domain here) and scans
        each variable over its bounds; domains with a closed form override it."""
        lo, hi = self.state_bounds
        c_lo, c_hi = self.context_bounds
        context = (np.asarray(c_lo, float) + np.asarray(c_hi, float)) / 2
        base = np.asarray(lo, dtype=float)
        f0 = self.cost(context, base)
        low = high = f0
        for j in range(self.state_dim):
            terms = []
            for v in np.linspace(lo[j], hi[j], 257):
                x = base.copy()
                x[j] = v
                terms.append(self.cost(context, x) - f0)
            low, high = low + min(terms), high + max(terms)
        return float(low), float(high)

    def plausible_energy(self) -> tuple[float, float]:
        """The energy range a fossil of this domain may claim: `energy_range` widened by
        ENERGY_MARGIN of its span (measurement noise), computed once."""
        cached = getattr(self, "_plausible_energy", None)
        if cached is None:
            lo, hi = self.energy_range()
            m = ENERGY_MARGIN * max(hi - lo, abs(lo), abs(hi), 1.0)
            cached = self._plausible_energy = (lo - m, hi + m)
        return cached

    def energy_implausible(self, energy: float, bounds: tuple[float, float] | None = None) -> str | None:
        """Why `energy` cannot be a reading of this domain (not finite, or outside
        `bounds`, default `plausible_energy()`), or None."""
        if not math.isfinite(energy):
            return f"energy {energy} is not finite"
        lo, hi = bounds if bounds is not None else self.plausible_energy()
        if lo <= energy <= hi:
            return None
        origin = "set in [ingest] energy_bounds" if bounds is not None else "the cost of any state within its bounds, ±10%"
        return (
            f"energy {energy:.6g} {self.energy_unit} is outside the plausible range [{lo:.6g}, {hi:.6g}] "
            f"{self.energy_unit} of {self.name} ({origin}); if such readings are real, set "
            f'[ingest] energy_bounds = {{ "{self.name}" = [LOW, HIGH] }} in scf.toml'
        )

    def verify(self, context, state, energy: float) -> tuple[bool, str]:
        """The domain's own check of an observation: in bounds, no violation, and `energy`
        equal to the cost of `state` (relative 1e-6)."""
        reason = self.in_bounds(context, state)
        if reason:
            return False, reason
        context, state = np.asarray(context, float), np.asarray(state, float)
        problems = [v.message for v in self.violations(context, state)]
        cost = self.cost(context, state)
        if not np.isfinite(energy) or abs(energy - cost) > 1e-6 * max(1.0, abs(cost)):
            problems.append(f"energy {energy:.6g} {self.energy_unit} differs from the cost {cost:.6g} {self.energy_unit} of the state")
        if problems:
            return False, "; ".join(problems)
        return True, f"{self.verifier} ok: cost {cost:.6g} {self.energy_unit}, no violation"

    def random_feasible(self, context: np.ndarray, rng: np.random.Generator, vertices: int = 3) -> np.ndarray:
        """A random feasible state: a random convex combination of `vertices` vertices of
        the feasible polytope, each the optimum of an LP with a random cost."""
        a, row_lo, row_hi = self.feasible_rows(context)
        lp = self._vertex_lp(a)
        points = []
        for _ in range(vertices):
            x = lp.solve(row_lo, row_hi, cost=rng.normal(size=self.state_dim), cold=True)
            if x is None:
                raise Infeasible(f"{self.name}: no feasible state in this context ({lp.status})")
            points.append(x)
        return rng.dirichlet(np.ones(vertices)) @ np.stack(points)

    def project(self, context, state) -> np.ndarray:
        """The feasible state nearest to `state` — least total move, each variable counted in
        half-ranges of its bounds (the units the EBDM works in): min sum_j |x_j - s_j| / half_j
        over the feasible polytope, an LP solved by HiGHS. (The L2 version, a QP, hits a
        HiGHS active-set failure on a few percent of instances; the LP does not.) Raises
        `Infeasible` when no state is feasible in this context."""
        lo, hi = self.state_bounds
        half, d = np.maximum((hi - lo) / 2, 1e-9), self.state_dim
        a, row_lo, row_hi = self.feasible_rows(context)
        lp = getattr(self, "_projection_lp", None)
        if lp is None:  # variables [x, t]: rows [A x; x - half t <= s; x + half t >= s], min sum t
            from scf.domains.solvers import HighsProgram

            eye = np.eye(d)
            rows = np.block([[a, np.zeros((len(a), d))], [eye, -np.diag(half)], [eye, np.diag(half)]])
            lp = self._projection_lp = HighsProgram(
                rows, np.concatenate([lo, np.zeros(d)]), np.concatenate([hi, np.full(d, np.inf)]),
                cost=np.concatenate([np.zeros(d), np.ones(d)]),
            )  # fmt: skip
        s = np.asarray(state, dtype=float)
        x = lp.solve(np.concatenate([row_lo, np.full(d, -np.inf), s]), np.concatenate([row_hi, s, np.full(d, np.inf)]), cold=True)
        if x is None:
            raise Infeasible(f"{self.name}: no feasible state to project onto in this context ({lp.status})")
        return np.clip(x[:d], lo, hi)

    def _vertex_lp(self, a: np.ndarray):
        lp = getattr(self, "_vertex_lp_cache", None)
        if lp is None:
            from scf.domains.solvers import HighsProgram

            lp = HighsProgram(a, *self.state_bounds)
            self._vertex_lp_cache = lp
        return lp

    def synthesize(
        self, rng: np.random.Generator, n: int, *, first_index: int = 0, infeasible_fraction: float = 0.0
    ) -> list[Sample]:
        """`n` observations: contexts around nominal; states from a random feasible point
        to the reference optimum (x = x_r + t (x* - x_r), t = sqrt(U)), with their true
        energy; a fraction `infeasible_fraction` are feasible states pushed by noise until they
        break a constraint (their `verified` is False)."""
        out = []
        lo, hi = self.state_bounds
        for i in range(n):
            for _attempt in range(100):
                context = self.sample_context(rng, index=first_index + i)
                try:
                    best = self.reference_solution(context)
                    if rng.random() < infeasible_fraction:
                        state = self._infeasible_state(context, rng)
                    else:
                        start = self.random_feasible(context, rng)
                        state = start + np.sqrt(rng.random()) * (best - start)
                except Infeasible:
                    continue
                state = np.clip(state, lo, hi)  # solver round-off only
                energy = self.cost(context, state)
                ok, detail = self.verify(context, state, energy)
                out.append(Sample(context, state, energy, ok, detail))
                break
            else:  # pragma: no cover - the samplers are built to be feasible
                raise Infeasible(f"{self.name}: 100 sampled contexts in a row were infeasible; check the case data")
        return out

    def _infeasible_state(self, context: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A feasible state pushed by growing random noise until it breaks a constraint
        (kept inside the state bounds, so it is a plausible reading, not garbage)."""
        lo, hi = self.state_bounds
        start = self.random_feasible(context, rng)
        for attempt in range(60):
            scale = 0.02 * 2 ** (attempt // 10)
            state = np.clip(start + rng.normal(scale=scale * (hi - lo)), lo, hi)
            if self.violations(context, state):
                return state
        raise Infeasible(f"{self.name}: could not draw an infeasible in-bounds state")  # pragma: no cover

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}: state {self.state_dim}, context {self.context_dim}>"
