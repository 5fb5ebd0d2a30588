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
GAP_FLOOR = 1.0  # a gap is relative to max(|cost|, 1 energy unit): an optimum of 0 kWh (HVAC off) has no relative gap
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
        """(..., n, C) points whose set holds a minimiser of f_j(x) - r_j x over [lo_j, hi_j]
        (r, lo, hi of shape (..., n))."""
        finite_lo, finite_hi = np.where(np.isfinite(lo), lo, -1e300), np.where(np.isfinite(hi), hi, 1e300)
        cols = [lo, hi]
        with np.errstate(divide="ignore", invalid="ignore"):
            pos = self.c2 > 0
            half = 2 * np.where(pos, self.c2, 1.0)
            if self.has_pwl.any():
                m, b = self.slopes, self.intercepts
                k_all = m.shape[1]
                for i in range(k_all):  # every pairwise intersection: holds the kinks of the max whatever the order
                    for j in range(i + 1, k_all):
                        dm = m[:, j] - m[:, i]
                        kink = np.where(dm != 0, (b[:, i] - b[:, j]) / np.where(dm != 0, dm, 1.0), lo)
                        cols.append(np.clip(kink, finite_lo, finite_hi))
                if pos.any():
                    for k in range(k_all):
                        cols.append(np.clip(np.where(pos, (r - self.c1 - m[:, k]) / half, lo), finite_lo, finite_hi))
            if pos.any():
                cols.append(np.clip(np.where(pos, (r - self.c1) / half, lo), finite_lo, finite_hi))
        shape = np.broadcast_shapes(*(np.shape(c) for c in cols))
        return np.stack([np.broadcast_to(c, shape) for c in cols], axis=-1)

    def inner_min(self, r: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(min_x f_j(x) - r_j x over [lo_j, hi_j], a minimiser), per variable, batched over
        leading axes; -inf where the function decreases without bound towards an infinite bound."""
        r, lo, hi = (np.asarray(v, float) for v in (r, lo, hi))
        r, lo, hi = np.broadcast_arrays(r, lo, hi)
        if not self.has_pwl.any():  # quadratic or linear: the clipped vertex, or the cheaper end
            pos = self.c2 > 0
            with np.errstate(divide="ignore", invalid="ignore"):
                vertex = (r - self.c1) / (2 * np.where(pos, self.c2, 1.0))
            arg = np.where(pos, np.clip(vertex, lo, hi), np.where(self.c1 - r > 0, lo, hi))
            arg = np.where(np.isfinite(arg), arg, 0.0)
            best = (self.c2 * arg + self.c1 - r) * arg + self.c0
        else:
            pts = self._candidates(r, lo, hi)  # (..., n, C)
            finite = np.isfinite(pts)
            safe = np.where(finite, pts, 0.0)
            vals = self._terms_per_row(safe) - r[..., None] * safe
            vals = np.where(finite, vals, np.inf)
            k = np.argmin(vals, axis=-1)[..., None]
            best = np.take_along_axis(vals, k, axis=-1)[..., 0]
            arg = np.take_along_axis(safe, k, axis=-1)[..., 0]
        # asymptotic slopes towards infinite bounds
        has = self.has_pwl
        slope_lo = np.where(self.c2 > 0, -np.inf, self.c1 + np.where(has, self.slopes[:, 0], 0.0)) - r
        slope_hi = np.where(self.c2 > 0, np.inf, self.c1 + np.where(has, self.slopes[:, -1], 0.0)) - r
        unbounded = (~np.isfinite(lo) & (slope_lo > 0)) | (~np.isfinite(hi) & (slope_hi < 0))
        return np.where(unbounded, -np.inf, best), arg

    def _terms_per_row(self, pts: np.ndarray) -> np.ndarray:
        """f_j at each candidate of pts (..., n, C)."""
        quad = (self.c2[:, None] * pts + self.c1[:, None]) * pts + self.c0[:, None]
        if not self.has_pwl.any():
            return quad
        pwl = np.max(self.slopes[:, None, :] * pts[..., None] + self.intercepts[:, None, :], axis=-1)
        return quad + np.where(self.has_pwl[:, None], pwl, 0.0)

    def derivative(self, x: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
        """(f'_j(x_j), whether f_j is differentiable there: not within `tol` of a kink),
        batched over leading axes."""
        x = np.asarray(x, float)
        d = 2 * self.c2 * x + self.c1
        smooth = np.ones(x.shape, bool)
        if self.has_pwl.any():
            vals = self.slopes * x[..., None] + self.intercepts  # (..., n, K)
            k = np.argmax(vals, axis=-1)[..., None]
            top = np.take_along_axis(vals, k, axis=-1)
            near = (top - vals) <= tol * np.maximum(1.0, np.abs(self.slopes))
            slope_k = np.take_along_axis(np.broadcast_to(self.slopes, vals.shape), k, axis=-1)
            distinct = (np.abs(self.slopes - slope_k) > 1e-12) & near
            smooth &= ~(self.has_pwl & distinct.any(axis=-1))
            d = d + np.where(self.has_pwl, slope_k[..., 0], 0.0)
        return d, smooth


@dataclass(frozen=True)
class Rows:
    """row_lo <= A x <= row_hi, with A as an operator (the grid's A is a PTDF that is never
    formed densely for large cases)."""

    lo: np.ndarray  # (m,)
    hi: np.ndarray  # (m,)
    names: tuple[str, ...]
    matvec: Callable[[np.ndarray], np.ndarray]  # x (..., n) -> A x (..., m), batched over leading axes
    rmatvec: Callable[[np.ndarray], np.ndarray]  # y (..., m) -> A'y (..., n)

    @classmethod
    def dense(cls, a: np.ndarray, lo, hi, names) -> "Rows":
        a = np.asarray(a, float)
        return cls(np.asarray(lo, float), np.asarray(hi, float), tuple(names), lambda x: np.asarray(x) @ a.T, lambda y: np.asarray(y) @ a)


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
            knots = _knots(cost, rest, a_k, lo, hi)
            extra: list[float] = []
            if knots is not None:  # the slope is piecewise linear between known knots: bisect over them, then interpolate
                knots = knots[(knots > t_min) & (knots < t_max)]
                if t_min <= 0 <= t_max:
                    knots = np.union1d(knots, [0.0])
                if not len(knots):
                    knots = np.array([t0])
                i, j = 0, len(knots) - 1
                extra = [float(v) for v in knots[:2]] + [float(v) for v in knots[-2:]]
                if slope(knots[0]) <= 0:
                    low = high = float(knots[0])
                    if slope(knots[0]) < 0 and np.isfinite(t_min):
                        low = high = t_min
                elif slope(knots[-1]) >= 0:
                    low = high = float(knots[-1])
                    if slope(knots[-1]) > 0 and np.isfinite(t_max):
                        low = high = t_max
                else:
                    while j - i > 1:
                        mid = (i + j) // 2
                        if slope(knots[mid]) > 0:
                            i = mid
                        else:
                            j = mid
                    low, high = float(knots[i]), float(knots[j])
                    extra = [float(v) for v in knots[max(0, i - 1) : j + 2]]  # neighbours too: x* is ambiguous at a knot
                    s_lo, s_hi = slope(low), slope(np.nextafter(high, low))
                    if s_lo > 0 > s_hi and s_lo != s_hi:  # a linear piece crossing zero
                        root = low + (high - low) * s_lo / (s_lo - s_hi)
                        low = high = float(np.clip(root, low, high))
            else:
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
            for t in {low, high, t0, 0.0 if t_min <= 0 <= t_max else t0, *extra}:
                trial = y.copy()
                trial[k] = t
                g = lower_bound(cost, rows, lo, hi, trial)
                if g > best_g:
                    best_t, best_g = t, g
            base = rest + best_t * a_k
            y[k] = best_t
    return y


def _knots(cost: SeparableCost, rest: np.ndarray, a: np.ndarray, lo, hi) -> np.ndarray | None:
    """The multipliers t at which some x*_j(rest + t a) changes regime (a bound reached, a
    kink passed): between them the slope of g along t is linear. None where a variable
    mixes a quadratic with a piecewise-linear cost (then bisection)."""
    on = a != 0
    if not on.any():
        return np.array([], float)
    quad, pwl = cost.c2 > 0, cost.has_pwl
    if np.any(on & quad & pwl):
        return None
    r_points = []
    lo_, hi_ = np.asarray(lo, float), np.asarray(hi, float)
    with np.errstate(invalid="ignore"):
        q = on & quad  # x* = clip((r - c1) / 2 c2): regime changes where it meets a bound
        r_points += [(2 * cost.c2 * lo_ + cost.c1)[q], (2 * cost.c2 * hi_ + cost.c1)[q]]
        lin = on & ~quad & ~pwl  # x* jumps where r crosses c1
        r_points.append(cost.c1[lin])
        pw = on & ~quad & pwl  # x* jumps where r crosses c1 + each slope
        r_points += [(cost.c1 + cost.slopes[:, k])[pw] for k in range(cost.slopes.shape[1])]
        idx = [np.flatnonzero(q), np.flatnonzero(q), np.flatnonzero(lin)] + [np.flatnonzero(pw)] * cost.slopes.shape[1]
        t = np.concatenate([(r - rest[i]) / a[i] for r, i in zip(r_points, idx)]) if r_points else np.array([])
    t = t[np.isfinite(t)]
    return np.unique(t)


def recover_dual(cost: SeparableCost, rows: Rows, lo, hi, x: np.ndarray, *, tol: float = 1e-6) -> np.ndarray:
    """Row multipliers for a decision x (no solver): least squares on the KKT stationarity
    f'_j(x_j) = (A'y)_j of the variables strictly inside their bounds, over the equality
    rows and the rows x holds within `tol` (relative) of a bound; signs projected; then
    coordinate ascent of g (`recover_duals` for a batch of one)."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    return recover_duals(cost, rows, rows.lo[None], rows.hi[None], lo[None], hi[None], np.asarray(x, float)[None], tol=tol)[0]


def make_certificate(cost: SeparableCost, rows: Rows, lo, hi, x: np.ndarray, dual: np.ndarray, source: str) -> Certificate:
    value = float(cost.value(np.asarray(x, float)))
    bound = lower_bound(cost, rows, lo, hi, dual)
    gap = value - bound
    return Certificate(value, bound, gap, gap / max(abs(value), GAP_FLOOR), _admissible(dual, rows), source)


# --------------------------------------------------------------------------- batches


def _admissible_batch(y: np.ndarray, row_lo: np.ndarray, row_hi: np.ndarray) -> np.ndarray:
    y = np.where(np.isfinite(y), y, 0.0)
    y = np.where((y > 0) & ~np.isfinite(row_lo), 0.0, y)
    return np.where((y < 0) & ~np.isfinite(row_hi), 0.0, y)


def lower_bounds(cost: SeparableCost, rmatvec, row_lo, row_hi, lo, hi, dual) -> np.ndarray:
    """`lower_bound` for a batch: one problem per leading row, the same A (`rmatvec` takes
    (B, m)), bounds (B, m) and (B, n) or (n,); returns (B,)."""
    y = _admissible_batch(np.asarray(dual, float), row_lo, row_hi)
    inner, _ = cost.inner_min(rmatvec(y), lo, hi)
    with np.errstate(invalid="ignore"):
        row_terms = np.where(y > 0, y * np.where(np.isfinite(row_lo), row_lo, 0.0), y * np.where(np.isfinite(row_hi), row_hi, 0.0))
    total = inner.sum(-1) + row_terms.sum(-1)
    scale = np.abs(inner).sum(-1) + np.abs(row_terms).sum(-1)
    out = total - BOUND_MARGIN * scale
    return np.where(np.isfinite(out), out, -np.inf)


def recover_duals(cost: SeparableCost, rows: Rows, row_lo, row_hi, lo, hi, x, *, tol: float = 1e-6, iters: int = 50) -> np.ndarray:
    """`recover_dual` for a batch of decisions x (B, n) of problems sharing A (bounds per
    problem: row_lo/row_hi (B, m), lo/hi (B, n)): least squares per decision, then the
    coordinate ascent vectorised over the batch (bisection, `iters` halvings)."""
    x = np.asarray(x, float)
    n_b, m = len(x), len(row_lo[0])
    lo, hi = np.broadcast_to(lo, x.shape), np.broadcast_to(hi, x.shape)
    act = rows.matvec(x)
    span = np.maximum(1.0, np.abs(act))
    eq = np.isfinite(row_lo) & (row_lo == row_hi)
    at_lo = ~eq & np.isfinite(row_lo) & (act - row_lo <= tol * span)
    at_hi = ~eq & np.isfinite(row_hi) & (row_hi - act <= tol * span)
    active = eq | at_lo | at_hi
    used = np.flatnonzero(active.any(0))
    y = np.zeros((n_b, m))
    if len(used):
        eye = np.zeros((len(used), m))
        eye[np.arange(len(used)), used] = 1.0
        cols = rows.rmatvec(eye)  # (|used|, n): the rows of A in use
        grad, smooth = cost.derivative(x, tol)
        width = np.maximum(1.0, hi - lo)
        interior = smooth & (x - lo > tol * width) & (hi - x > tol * width)
        pos = {r: i for i, r in enumerate(used)}
        for b in range(n_b):
            rows_b = np.flatnonzero(active[b])
            if not len(rows_b) or not interior[b].any():
                continue
            mat = cols[[pos[r] for r in rows_b]][:, interior[b]].T
            y[b, rows_b] = np.linalg.lstsq(mat, grad[b, interior[b]], rcond=None)[0]
        y = np.where(at_lo & (y < 0), 0.0, y)
        y = np.where(at_hi & (y > 0), 0.0, y)
    coords = np.arange(m) if m <= SMALL_ROWS else used
    sweeps = 3 if len(coords) <= SMALL_ROWS else 1
    which = np.ones_like(active) if m <= SMALL_ROWS else active
    return _ascend_batch(cost, rows, row_lo, row_hi, lo, hi, y, coords, which, sweeps, iters)


def _ascend_batch(cost, rows, row_lo, row_hi, lo, hi, y, coords, which, sweeps: int, iters: int) -> np.ndarray:
    """Coordinate ascent over `coords`, each for the decisions `which[:, k]` marks (rows a
    decision does not hold at a bound keep their 0 there)."""
    y = _admissible_batch(y, row_lo, row_hi)
    n_b, m = y.shape
    if not len(coords):
        return y
    eye = np.zeros((len(coords), m))
    eye[np.arange(len(coords)), coords] = 1.0
    columns = rows.rmatvec(eye)  # (|coords|, n)
    base = rows.rmatvec(y)  # (B, n)
    for _ in range(sweeps):
        for ci, k in enumerate(coords):
            sub = np.flatnonzero(which[:, k])
            if not len(sub):
                continue
            a_k = columns[ci]
            yk, bk = y[sub], base[sub]
            lo_s, hi_s, rlo_s, rhi_s = lo[sub], hi[sub], row_lo[sub], row_hi[sub]
            rest = bk - yk[:, k : k + 1] * a_k
            r_lo, r_hi = rlo_s[:, k], rhi_s[:, k]
            t_min = np.where(np.isfinite(r_hi), -np.inf, 0.0)
            t_max = np.where(np.isfinite(r_lo), np.inf, 0.0)

            def slope(t, rest=rest, a_k=a_k, r_lo=r_lo, r_hi=r_hi, lo_s=lo_s, hi_s=hi_s):
                _, xs = cost.inner_min(rest + t[:, None] * a_k, lo_s, hi_s)
                return np.where(t > 0, r_lo, r_hi) - xs @ a_k

            t0 = np.clip(yk[:, k], t_min, t_max)
            low, high = t0.copy(), t0.copy()
            step = np.maximum(1.0, np.abs(t0))
            for _grow in range(64):  # bracket the root of the non-increasing slope
                move = (slope(low) < 0) & (low > t_min)
                if not move.any():
                    break
                low = np.where(move, np.maximum(t_min, low - step), low)
                step = np.where(move, 2 * step, step)
            step = np.maximum(1.0, np.abs(t0))
            for _grow in range(64):
                move = (slope(high) > 0) & (high < t_max)
                if not move.any():
                    break
                high = np.where(move, np.minimum(t_max, high + step), high)
                step = np.where(move, 2 * step, step)
            for _bisect in range(iters):
                mid = 0.5 * (low + high)
                up = slope(mid) > 0
                low, high = np.where(up, mid, low), np.where(up, high, mid)
            best_t, best_g = t0, np.full(len(sub), -np.inf)
            zero = np.where((t_min <= 0) & (t_max >= 0), 0.0, t0)
            for t in (low, high, t0, zero):
                trial = yk.copy()
                trial[:, k] = t
                g = lower_bounds(cost, rows.rmatvec, rlo_s, rhi_s, lo_s, hi_s, trial)
                better = g > best_g
                best_t, best_g = np.where(better, t, best_t), np.where(better, g, best_g)
            base[sub] = rest + best_t[:, None] * a_k
            y[sub, k] = best_t
    return y


def make_certificates(cost: SeparableCost, rows: Rows, row_lo, row_hi, lo, hi, x, dual, source: str) -> list[Certificate]:
    """`make_certificate` for a batch (one bound evaluation for all)."""
    x = np.asarray(x, float)
    values = np.asarray(cost.value(x), float).reshape(len(x))
    y = _admissible_batch(np.asarray(dual, float), row_lo, row_hi)
    bounds = lower_bounds(cost, rows.rmatvec, row_lo, row_hi, lo, hi, y)
    return [Certificate(float(v), float(b), float(v - b), float((v - b) / max(abs(v), GAP_FLOOR)), y[i], source)
            for i, (v, b) in enumerate(zip(values, bounds))]  # fmt: skip
