"""Certificates of optimality from Lagrangian duality, checkable without a solver.

Every certified domain here (grid DC-OPF, the HVAC LP) is, in its state x,

    min  f(x) = sum_j f_j(x_j)    s.t.  row_lo <= A x <= row_hi,   lo <= x <= hi

with each f_j convex: a quadratic c2 x^2 + c1 x + c0 plus, optionally, a convex
piecewise-linear max_k (m_k x + b_k) (`SeparableCost`). For any row multipliers y (HiGHS's
sign convention: y_r > 0 prices the lower bound of row r, y_r < 0 its upper bound; an
equality row takes either sign), weak duality gives a lower bound on the optimum:

    g(y) = sum_j min_{lo_j <= x_j <= hi_j} [ f_j(x_j) - (A'y)_j x_j ]
           + sum_r ( y_r row_lo_r  if y_r > 0  else  y_r row_hi_r )

because for every feasible x, f(x) >= f(x) - y'(A x) + (the second sum) >= g(y). Each inner
minimum is one-dimensional and closed-form (the minimiser is a bound, a breakpoint, or a
clipped vertex of one quadratic piece), so `lower_bound` evaluates g(y) with numpy alone:
it trusts no solver. A multiplier on a row whose bound is infinite would make g = -inf; such
entries are set to 0 (still a valid bound). The bound is exact up to floating-point round-off,
for which a margin of 1e-10 of the sum of the magnitudes of its terms is subtracted.

Where y comes from does not matter for validity, only for tightness: from HiGHS's duals of
the exact problem (then the gap is the solver's tolerance), or `recover_dual` for any
decision (a learned proposal): the KKT stationarity equations of the decision's interior
variables, solved by least squares over the rows the decision holds at a bound, signs
projected, then coordinate ascent of g over those multipliers, each maximised exactly by
bisection (for the grid's balance rows, that is the economic-dispatch price of each island). A near-optimal decision gets a tight
bound; a poor one an honest loose bound — and `--max-gap` then falls back to an exact solve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

BOUND_MARGIN = 1e-10  # relative to the sum of |terms| of g(y): floating-point round-off
GAP_FLOOR = 1e-9  # a gap is relative to max(|cost|, GAP_FLOOR)
SMALL_ROWS = 8  # up to this many rows, recovery ascends along every multiplier


@dataclass(frozen=True)
class SeparableCost:
    """f(x) = sum_j c2_j x_j^2 + c1_j x_j + c0_j + [has_pwl_j] max_k (slopes_jk x_j + intercepts_jk).
    Rows of `slopes`/`intercepts` without PWL are ignored; padding repeats the last piece.
    The pieces may come in any order (the max is convex whatever they are)."""

    c2: np.ndarray
    c1: np.ndarray
    c0: np.ndarray
    slopes: np.ndarray = field(default_factory=lambda: np.zeros((0, 1)))
    intercepts: np.ndarray = field(default_factory=lambda: np.zeros((0, 1)))
    has_pwl: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def __post_init__(self) -> None:
        n = len(self.c2)
        if len(self.has_pwl) == 0:
            object.__setattr__(self, "has_pwl", np.zeros(n, bool))
            object.__setattr__(self, "slopes", np.zeros((n, 1)))
            object.__setattr__(self, "intercepts", np.zeros((n, 1)))

    def terms(self, x: np.ndarray) -> np.ndarray:
        """f_j(x_j), batched over leading axes of x."""
        x = np.asarray(x, dtype=float)
        quad = (self.c2 * x + self.c1) * x + self.c0
        if not self.has_pwl.any():
            return quad
        pwl = np.max(self.slopes * x[..., None] + self.intercepts, axis=-1)
        return quad + np.where(self.has_pwl, pwl, 0.0)

    def value(self, x: np.ndarray) -> np.ndarray | float:
        v = self.terms(x).sum(-1)
        return float(v) if np.ndim(v) == 0 else v

    def _candidates(self, r: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """(n, C) points whose set holds a minimiser of f_j(x) - r_j x over [lo_j, hi_j]."""
        finite_lo, finite_hi = np.where(np.isfinite(lo), lo, -1e300), np.where(np.isfinite(hi), hi, 1e300)
        cols = [lo, hi]
        with np.errstate(divide="ignore", invalid="ignore"):
            pos = self.c2 > 0
            if self.has_pwl.any():
                m, b = self.slopes, self.intercepts
                k_all = m.shape[1]
                for i in range(k_all):  # every pairwise intersection: holds the kinks of the max whatever the order
                    for j in range(i + 1, k_all):
                        dm = m[:, j] - m[:, i]
                        kink = np.where(dm != 0, (b[:, i] - b[:, j]) / np.where(dm != 0, dm, 1.0), lo)
                        cols.append(np.clip(kink, finite_lo, finite_hi))
                for k in range(m.shape[1]):
                    vert = np.where(pos, (r - self.c1 - m[:, k]) / (2 * np.where(pos, self.c2, 1.0)), lo)
                    cols.append(np.clip(vert, finite_lo, finite_hi))
            vert = np.where(pos, (r - self.c1) / (2 * np.where(pos, self.c2, 1.0)), lo)
            cols.append(np.clip(vert, finite_lo, finite_hi))
        return np.stack(cols, axis=1)

    def inner_min(self, r: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(min_x f_j(x) - r_j x over [lo_j, hi_j], a minimiser), per variable; -inf where
        the function decreases without bound towards an infinite bound."""
        r, lo, hi = (np.asarray(v, float) for v in (r, lo, hi))
        pts = self._candidates(r, lo, hi)  # (n, C)
        finite = np.isfinite(pts)
        safe = np.where(finite, pts, 0.0)
        vals = self._terms_per_row(safe) - r[:, None] * safe
        vals = np.where(finite, vals, np.inf)
        k = np.argmin(vals, axis=1)
        best = vals[np.arange(len(r)), k]
        arg = safe[np.arange(len(r)), k]
        # asymptotic slopes towards infinite bounds
        has = self.has_pwl
        slope_lo = np.where(self.c2 > 0, -np.inf, self.c1 + np.where(has, self.slopes[:, 0], 0.0)) - r
        slope_hi = np.where(self.c2 > 0, np.inf, self.c1 + np.where(has, self.slopes[:, -1], 0.0)) - r
        unbounded = (~np.isfinite(lo) & (slope_lo > 0)) | (~np.isfinite(hi) & (slope_hi < 0))
        return np.where(unbounded, -np.inf, best), arg

    def _terms_per_row(self, pts: np.ndarray) -> np.ndarray:
        """f_j at each column of pts (n, C)."""
        quad = (self.c2[:, None] * pts + self.c1[:, None]) * pts + self.c0[:, None]
        if not self.has_pwl.any():
            return quad
        pwl = np.max(self.slopes[:, None, :] * pts[:, :, None] + self.intercepts[:, None, :], axis=-1)
        return quad + np.where(self.has_pwl[:, None], pwl, 0.0)

    def derivative(self, x: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
        """(f'_j(x_j), whether f_j is differentiable there: not within `tol` of a kink)."""
        x = np.asarray(x, float)
        d = 2 * self.c2 * x + self.c1
        smooth = np.ones(len(x), bool)
        if self.has_pwl.any():
            vals = self.slopes * x[:, None] + self.intercepts
            k = np.argmax(vals, axis=1)
            top = vals[np.arange(len(x)), k]
            near = (top[:, None] - vals) <= tol * np.maximum(1.0, np.abs(self.slopes))
            distinct = (np.abs(self.slopes - self.slopes[np.arange(len(x)), k][:, None]) > 1e-12) & near
            smooth &= ~(self.has_pwl & distinct.any(axis=1))
            d = d + np.where(self.has_pwl, self.slopes[np.arange(len(x)), k], 0.0)
        return d, smooth


@dataclass(frozen=True)
class Rows:
    """row_lo <= A x <= row_hi, with A as an operator (the grid's A is a PTDF that is never
    formed densely for large cases)."""

    lo: np.ndarray  # (m,)
    hi: np.ndarray  # (m,)
    names: tuple[str, ...]
    matvec: Callable[[np.ndarray], np.ndarray]  # x (n,) -> A x (m,)
    rmatvec: Callable[[np.ndarray], np.ndarray]  # y (m,) -> A'y (n,)

    @classmethod
    def dense(cls, a: np.ndarray, lo, hi, names) -> "Rows":
        a = np.asarray(a, float)
        return cls(np.asarray(lo, float), np.asarray(hi, float), tuple(names), lambda x: a @ x, lambda y: a.T @ y)


@dataclass(frozen=True)
class Certificate:
    """A decision's cost, a duality lower bound on the optimum, and the gap between them."""

    cost: float
    lower_bound: float
    gap: float  # cost - lower_bound (energy units)
    rel_gap: float  # gap / max(|cost|, GAP_FLOOR)
    dual: np.ndarray  # the row multipliers y the bound was evaluated at
    source: str  # "solver" (HiGHS duals of the exact problem) or "recovered" (from the decision)

    def certified(self, max_gap: float) -> bool:
        return math.isfinite(self.lower_bound) and self.rel_gap <= max_gap

    def to_dict(self) -> dict:
        return {"cost": self.cost, "lower_bound": self.lower_bound, "gap": self.gap, "rel_gap": self.rel_gap, "dual_source": self.source}


def _admissible(y: np.ndarray, rows: Rows) -> np.ndarray:
    """y with the entries that would price an infinite bound set to 0."""
    y = np.asarray(y, float).copy()
    y[(y > 0) & ~np.isfinite(rows.lo)] = 0.0
    y[(y < 0) & ~np.isfinite(rows.hi)] = 0.0
    y[~np.isfinite(y)] = 0.0
    return y


def lower_bound(cost: SeparableCost, rows: Rows, lo: np.ndarray, hi: np.ndarray, dual: np.ndarray) -> float:
    """g(dual): a lower bound on min f over the feasible set, recomputed from the problem
    data alone (see the module docstring)."""
    y = _admissible(dual, rows)
    r = rows.rmatvec(y)
    inner, _ = cost.inner_min(r, lo, hi)
    with np.errstate(invalid="ignore"):
        row_terms = np.where(y > 0, y * np.where(np.isfinite(rows.lo), rows.lo, 0.0), y * np.where(np.isfinite(rows.hi), rows.hi, 0.0))
    total = float(inner.sum() + row_terms.sum())
    if not math.isfinite(total):
        return -math.inf
    scale = float(np.abs(inner).sum() + np.abs(row_terms).sum())
    return total - BOUND_MARGIN * scale


def tighten_equalities(cost: SeparableCost, rows: Rows, lo, hi, dual: np.ndarray, sweeps: int = 2) -> np.ndarray:
    """`ascend` along the equality rows' multipliers (for the grid: each island's price)."""
    eq = np.flatnonzero(np.isfinite(rows.lo) & (rows.lo == rows.hi))
    return ascend(cost, rows, lo, hi, dual, eq, sweeps=sweeps)


def ascend(cost: SeparableCost, rows: Rows, lo, hi, dual: np.ndarray, coords, *, sweeps: int = 2, iters: int = 50) -> np.ndarray:
    """Coordinate ascent of g over the multipliers `coords`: g is concave along each, with
    the non-increasing slope (row_lo if y_r > 0 else row_hi) - a_r . x*(y), so bisection on
    the slope finds the best value of each in turn (an inequality row's multiplier keeps
    the sign its finite bounds allow)."""
    y = _admissible(dual, rows)
    coords = [int(k) for k in coords]
    if not coords:
        return y
    columns = {}
    for k in coords:
        e = np.zeros(len(y))
        e[k] = 1.0
        columns[k] = rows.rmatvec(e)
    base = rows.rmatvec(y)
    for _ in range(sweeps):
        for k in coords:
            a_k = columns[k]
            rest = base - y[k] * a_k
            r_lo, r_hi = rows.lo[k], rows.hi[k]
            t_min = -np.inf if np.isfinite(r_hi) else 0.0  # a negative multiplier prices the upper bound
            t_max = np.inf if np.isfinite(r_lo) else 0.0

            def slope(t: float, rest=rest, a_k=a_k, r_lo=r_lo, r_hi=r_hi) -> float:
                _, x = cost.inner_min(rest + t * a_k, lo, hi)
                bound = r_lo if t > 0 else r_hi
                return float(bound - a_k @ x)

            t0 = float(np.clip(y[k], t_min, t_max))
            if t0 == 0.0:  # already best along this row when 0 is in the superdifferential
                _, x0 = cost.inner_min(rest, lo, hi)
                ax = float(a_k @ x0)
                if (not np.isfinite(r_lo) or r_lo - ax <= 0) and (not np.isfinite(r_hi) or r_hi - ax >= 0):
                    continue
            low = high = t0
            step = max(1.0, abs(t0))
            while slope(low) < 0 and low > t_min and step < 1e300:  # bracket the root of the slope
                low = max(t_min, low - step)
                step *= 2
            step = max(1.0, abs(t0))
            while slope(high) > 0 and high < t_max and step < 1e300:
                high = min(t_max, high + step)
                step *= 2
            for _bisect in range(iters):
                mid = 0.5 * (low + high)
                if mid in (low, high):
                    break
                if slope(mid) > 0:
                    low = mid
                else:
                    high = mid
            best_t, best_g = t0, -math.inf
            for t in {low, high, t0, 0.0 if t_min <= 0 <= t_max else t0}:
                trial = y.copy()
                trial[k] = t
                g = lower_bound(cost, rows, lo, hi, trial)
                if g > best_g:
                    best_t, best_g = t, g
            base = rest + best_t * a_k
            y[k] = best_t
    return y


def recover_dual(cost: SeparableCost, rows: Rows, lo, hi, x: np.ndarray, *, tol: float = 1e-6, max_active: int = 400) -> np.ndarray:
    """Row multipliers for a decision x (no solver): least squares on the KKT stationarity
    f'_j(x_j) = (A'y)_j of the variables strictly inside their bounds, over the equality
    rows and the rows x holds within `tol` (relative) of a bound; signs projected; then the
    equality multipliers maximised (`tighten_equalities`)."""
    x = np.asarray(x, float)
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    act = rows.matvec(x)
    span = np.maximum(1.0, np.abs(act))
    eq = np.isfinite(rows.lo) & (rows.lo == rows.hi)
    at_lo = ~eq & np.isfinite(rows.lo) & (act - rows.lo <= tol * span)
    at_hi = ~eq & np.isfinite(rows.hi) & (rows.hi - act <= tol * span)
    active = np.flatnonzero(eq | at_lo | at_hi)
    if len(active) > max_active:
        closeness = np.minimum(np.abs(act - rows.lo), np.abs(rows.hi - act))[active]
        active = np.sort(active[np.argsort(closeness)[:max_active]])
    y = np.zeros(len(rows.lo))
    if len(active):
        grad, smooth = cost.derivative(x, tol)
        width = np.maximum(1.0, hi - lo)
        interior = smooth & (x - lo > tol * width) & (hi - x > tol * width)
        if interior.any():
            cols = []
            for r in active:
                e = np.zeros(len(y))
                e[r] = 1.0
                cols.append(rows.rmatvec(e)[interior])
            mat = np.stack(cols, axis=1)  # (n_interior, n_active)
            sol, *_ = np.linalg.lstsq(mat, grad[interior], rcond=None)
            y[active] = sol
        y[at_lo & (y < 0)] = 0.0
        y[at_hi & (y > 0)] = 0.0
    coords = np.arange(len(y)) if len(y) <= SMALL_ROWS else active  # a small problem: every row
    return ascend(cost, rows, lo, hi, y, coords, sweeps=3 if len(coords) <= SMALL_ROWS else 1)


def make_certificate(cost: SeparableCost, rows: Rows, lo, hi, x: np.ndarray, dual: np.ndarray, source: str) -> Certificate:
    value = float(cost.value(np.asarray(x, float)))
    bound = lower_bound(cost, rows, lo, hi, dual)
    gap = value - bound
    return Certificate(value, bound, gap, gap / max(abs(value), GAP_FLOOR), _admissible(dual, rows), source)
