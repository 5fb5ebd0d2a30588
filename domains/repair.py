"""Make proposed states feasible, in batch, cheaply, without the cost: the repair step.

    fixed = repair(domain, contexts, states)                 # (B, d), feasible rows
    result = repair_batch(domain, contexts, states, merit=mc)  # with what it took

A learned optimiser proposes states that are close to the optimum but break the
constraints by a little (power balance by a few MW, a line by a few percent, a comfort
band by a tenth of a kelvin). The domain's own `violations` check allows 1 kW (1e-3 MW,
1e-3 K), not a relative tolerance, so every proposal goes through this step before it
is compared, certified or deployed. It uses the domain's constraints only — the polytope
`row_lo(c) <= A x <= row_hi(c)`, `state_lo <= x <= state_hi` of `Domain.feasible_rows` —
never its cost, so the edge can run it with numpy alone.

The steps, each batched over the B proposals:

1. clip to the state bounds;
2. equality rows (the grid's power balance) restored by spreading the mismatch over the
   room the generators have in the needed direction: in *merit order* when `merit` (the
   marginal cost of each variable, e.g. from the learned cost model) is given — the
   cheapest generator with headroom takes a shortfall first, the dearest with room to
   spare gives up a surplus first — else in proportion to the room;
3. rows still outside their bounds (line overloads: PTDF rows; comfort bands: the RC
   model's rows) are pulled back by a weighted least-norm move on the active rows
   (violated or binding, plus every equality row): dx = -W A'(A W A')^-1 r, with W the
   room each variable has inside its bounds, so generators at a limit do not move and
   the balance is kept while a line is relieved (PTDF-based redispatch); repeated, with
   clipping, a few times — only for the proposals that still violate;
4. what is still infeasible goes to `Domain.project` (the exact nearest feasible state, an
   LP), and `RepairResult.fallback` says which.

Targets sit `MARGIN` inside each bound, so round-off never reads as a violation.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from scf.domains.base import Domain, Infeasible

MARGIN = 1e-6  # aim this far inside each row bound (units of the row: MW, K)
CHECK_TOL = 5e-4  # a row is treated as met within this (half the domains' 1e-3 tolerance)
_GRID_ROWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # domain -> its limited rows


@dataclass
class RepairResult:
    states: np.ndarray  # (B, d) repaired
    feasible: np.ndarray  # (B,) bool: every row and bound met within CHECK_TOL
    fallback: np.ndarray  # (B,) bool: the cheap repair failed and `Domain.project` was used
    moved: np.ndarray  # (B,) L1 move from the proposal, in half-ranges of the bounds (the EBDM's units)

    @property
    def fallback_rate(self) -> float:
        return float(self.fallback.mean()) if len(self.fallback) else 0.0


def batch_rows(domain: Domain, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A (R, d), row_lo (B, R), row_hi (B, R)) of the feasible polytope for every context:
    batched for the grid and HVAC domains, a loop over `feasible_rows` otherwise."""
    c = np.atleast_2d(np.asarray(contexts, dtype=float))
    if domain.kind == "grid" and hasattr(domain, "ptdf_load"):
        rows = _GRID_ROWS.get(domain)
        if rows is None:  # the limited rows, sliced once per domain
            lim = domain.limited
            a = np.vstack([np.ones((1, domain.state_dim)), domain.ptdf_gen[lim]])
            rows = _GRID_ROWS[domain] = (a, np.ascontiguousarray(domain.ptdf_load[lim].T), domain.flow_offset[lim], domain.rate[lim])
        a, load_t, offset, rate = rows
        demand = c.sum(-1) + domain.fixed_load  # (B,)
        base = offset - c @ load_t  # (B, L)
        return a, np.concatenate([demand[:, None], -rate - base], 1), np.concatenate([demand[:, None], rate - base], 1)
    if domain.kind == "hvac":
        a, lo, hi = domain.feasible_rows(c)  # vectorised over leading axes
        return np.asarray(a, float), np.atleast_2d(lo), np.atleast_2d(hi)
    rows = [domain.feasible_rows(ci) for ci in c]
    return rows[0][0], np.stack([r[1] for r in rows]), np.stack([r[2] for r in rows])


def _room(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """A weight per variable that vanishes at either bound (the affine-scaling metric), with
    a floor so that a variable stuck at a bound can still be moved off it, then clipped."""
    span = np.maximum(hi - lo, 1e-9)
    return np.maximum((x - lo) * (hi - x) / span, 1e-4 * span)


def _balance(x, a_eq, target, lo, hi, merit):
    """Restore the equality rows (all-ones rows: a balance) by spreading the mismatch over
    the room in the needed direction; in merit order when `merit` (B, d) is given."""
    for k in range(len(a_eq)):
        on = a_eq[k] != 0  # (d,) the variables in this balance
        for _ in range(3):  # clipping cannot undo it, but a second pass costs nothing
            gap = target[:, k] - x[:, on].sum(-1)  # (B,) > 0: too little
            if not np.any(np.abs(gap) > MARGIN):
                break
            up = np.where(gap[:, None] > 0, (hi - x)[:, on], (x - lo)[:, on])  # (B, n) room in the needed direction
            need = np.abs(gap)
            if merit is None:
                total = up.sum(-1)
                share = up * np.minimum(1.0, need / np.maximum(total, 1e-12))[:, None]
            else:  # cheapest first for a shortfall, dearest first for a surplus
                m = merit[:, on]
                order = np.argsort(np.where(gap[:, None] > 0, m, -m), axis=1)
                room_sorted = np.take_along_axis(up, order, 1)
                before = np.cumsum(room_sorted, 1) - room_sorted
                take = np.clip(need[:, None] - before, 0.0, room_sorted)
                share = np.empty_like(take)
                np.put_along_axis(share, order, take, 1)
            x[:, on] += np.sign(gap)[:, None] * share
    return np.clip(x, lo, hi)


def _active_set(x, a, rlo, rhi, lo, hi, eq, iters):
    """One proposal: weighted least-norm moves onto the violated and binding rows (and the
    equality rows), clipped to the bounds; returns (x, met)."""
    for _ in range(iters):
        ax = a @ x
        target = np.clip(ax, rlo + MARGIN, rhi - MARGIN)
        target[eq] = rlo[eq]
        r = ax - target
        violated = np.abs(r) > CHECK_TOL
        if not violated.any() and np.all((x >= lo) & (x <= hi)):
            return x, True
        binding = (ax >= rhi - 2 * MARGIN - CHECK_TOL) | (ax <= rlo + 2 * MARGIN + CHECK_TOL)
        act = violated | binding | eq
        aa = a[act]  # (k, d)
        w = _room(x, lo, hi)
        m = (aa * w) @ aa.T
        lam = np.linalg.lstsq(m + 1e-12 * np.eye(len(m)) * max(1.0, np.trace(m)), r[act], rcond=None)[0]
        x = np.clip(x - w * (aa.T @ lam), lo, hi)
    ax = a @ x
    met = bool(np.all(ax <= rhi + CHECK_TOL) and np.all(ax >= rlo - CHECK_TOL))
    return x, met


def repair_batch(
    domain: Domain,
    contexts: np.ndarray,
    states: np.ndarray,
    *,
    merit: np.ndarray | None = None,
    iterations: int = 12,
    fallback: bool = True,
) -> RepairResult:
    """Repair `states` (B, d) for `contexts` (B, m); see the module docstring. `merit` (B, d)
    or (d,): marginal costs used to order the balance step (optional; never the true cost
    unless the caller has it). Non-finite proposals are replaced by the middle of the
    bounds first. With `fallback`, what the cheap steps leave infeasible is projected
    exactly (`Domain.project`); a context with no feasible state stays infeasible."""
    c = np.atleast_2d(np.asarray(contexts, dtype=float))
    x0 = np.atleast_2d(np.asarray(states, dtype=float))
    if x0.shape != (len(c), domain.state_dim):
        raise ValueError(f"states have shape {x0.shape}, expected ({len(c)}, {domain.state_dim}) for {domain.name}")
    lo, hi = (np.asarray(b, dtype=float) for b in domain.state_bounds)
    half = np.maximum((hi - lo) / 2, 1e-9)
    x = np.where(np.isfinite(x0), x0, (lo + hi) / 2)
    x = np.clip(x, lo, hi)
    a, rlo, rhi = batch_rows(domain, c)
    eq = np.all(rlo == rhi, axis=0) & np.all(a != 0, axis=1)  # balance rows (same for every context)
    if eq.any():
        m = None if merit is None else np.broadcast_to(np.asarray(merit, float), x.shape)
        x = _balance(x, a[eq], rlo[:, eq], lo, hi, m)
    ax = x @ a.T
    bad = np.flatnonzero(np.any(ax > rhi + CHECK_TOL, 1) | np.any(ax < rlo - CHECK_TOL, 1))
    feasible = np.ones(len(x), dtype=bool)
    used = np.zeros(len(x), dtype=bool)
    eq_rows = np.all(rlo == rhi, axis=0)
    for i in bad:
        xi, ok = _active_set(x[i].copy(), a, rlo[i], rhi[i], lo, hi, eq_rows, iterations)
        x[i] = xi
        if not ok and fallback:
            used[i] = True
            try:
                x[i] = domain.project(c[i], x0[i] if np.all(np.isfinite(x0[i])) else xi)
                ok = True
            except Infeasible:
                ok = False
        feasible[i] = ok
    start = np.clip(np.where(np.isfinite(x0), x0, (lo + hi) / 2), lo, hi)
    return RepairResult(states=x, feasible=feasible, fallback=used, moved=(np.abs(x - start) / half).sum(-1))


def repair(domain: Domain, contexts: np.ndarray, states: np.ndarray, *, merit: np.ndarray | None = None) -> np.ndarray:
    """The repaired states (B, d): `repair_batch(...).states`."""
    return repair_batch(domain, contexts, states, merit=merit).states


__all__ = ["MARGIN", "RepairResult", "batch_rows", "repair", "repair_batch"]
