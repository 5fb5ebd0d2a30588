"""The feasibility repair and the learned-cost polish as batched torch programs on the model's device.

    rows = device_rows(domain, contexts_t)                        # A, row_lo, row_hi as tensors
    x, met = repair_t(rows, states_t, lo, hi, merit=merit_t)      # (B, d), (B,) bool — no host sync
    x = polish_t(cost, weights, knots, rows, x, met, lo, hi)       # line searches on the learned cost

The same steps as `domains.repair.repair_batch` (clip; the balance restored in merit
order; weighted least-norm moves onto the violated and binding rows — PTDF redispatch on
the grid, the RC rows on HVAC) and as `LearnedOptimiser.polish` (exact line searches on
the learned cost along each variable and each row), written for a whole batch at once:
a fixed number of iterations with masked updates instead of a per-proposal loop with
early exits, a batched Cholesky solve per iteration for the active rows (inactive rows
are replaced by identity rows, so every proposal's system has the same shape), and no
`.item()`/`.cpu()` inside — the only host syncs are in `repair_batch_t`: one to pick the
proposals that need the least-norm stage at all (none on an uncongested grid: the stage is
skipped), one every 4th iteration to stop when none needs a move or none got in since the
last check (at most 2 of them), one for the met mask, and one at the end to bring the result back — a fixed number per batch, none per proposal. What is still outside a row by more
than `CHECK_TOL` after the fixed iterations goes to the domain's exact projection
(`Domain.project`, numpy/HiGHS on the CPU), counted in `RepairResult.fallback`.

`domains/` stays numpy-only (the edge runs it); this module is its torch twin for the
learned optimiser (`ml/optimize.py`), checked against it in tests/test_repair_torch.py.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from scf.domains.base import Domain, Infeasible
from scf.domains.repair import CHECK_TOL, MARGIN, RepairResult, batch_rows

ITERATIONS = 12  # least-norm iterations, fixed (the numpy repair stops early per proposal, at most 12)
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # domain -> {(device, dtype): constants}


@dataclass
class Rows:
    """The feasible polytope row_lo <= x A' <= row_hi of every context, on one device."""

    a: torch.Tensor  # (R, d)
    lo: torch.Tensor  # (B, R)
    hi: torch.Tensor  # (B, R)
    eq: torch.Tensor  # (R,) bool: balance rows (equal bounds, all-nonzero coefficients)
    eq_host: np.ndarray  # the same on the host (decides the code path without a sync)
    a_host: np.ndarray  # A on the host (index sets and polish directions without a sync)
    consts: dict  # per (domain, device): constant tensors made once (a host->device copy is a sync)

    def const(self, name: str, make):
        """A constant tensor on the rows' device, made by `make()` (numpy) once per domain and device."""
        if name not in self.consts:
            v = make()
            self.consts[name] = [torch.as_tensor(e, device=self.a.device) for e in v] if isinstance(v, list) else torch.as_tensor(v, device=self.a.device)
        return self.consts[name]


def _constants(domain: Domain, device, dtype) -> dict:
    per = _CACHE.setdefault(domain, {})
    key = (str(device), dtype)
    if key in per:
        return per[key]
    t = lambda v: torch.as_tensor(np.asarray(v, dtype=float), dtype=dtype, device=device)  # noqa: E731
    if domain.kind == "grid" and hasattr(domain, "ptdf_load"):
        lim = domain.limited
        a = np.vstack([np.ones((1, domain.state_dim)), domain.ptdf_gen[lim]])
        out = {"kind": "grid", "a": t(a), "a_host": a, "load_t": t(domain.ptdf_load[lim].T), "offset": t(domain.flow_offset[lim]),
               "rate": t(domain.rate[lim]), "fixed_load": float(domain.fixed_load)}
        eq = np.zeros(len(a), dtype=bool)
        eq[0] = True
    elif domain.kind == "hvac" and hasattr(domain, "b_u"):
        b = domain.building
        out = {"kind": "hvac", "a": t(domain.b_u), "a_host": np.asarray(domain.b_u, dtype=float), "a_d_t": t(domain.a_d.T), "b_u_t": t(domain.b_u.T), "b_out": t(domain.b_out),
               "occ_gain": t(domain.occupancy_gain), "solar_gain": t(domain.solar_gain), "z": domain.n_zones,
               "band": (*b.occupied_band, *b.unoccupied_band)}
        eq = np.zeros(domain.n_zones, dtype=bool)
    else:
        out = {"kind": "other"}
        eq = None
    out["eq_host"] = eq
    per[key] = out
    return out


def device_rows(domain: Domain, contexts: torch.Tensor) -> Rows:
    """`domains.repair.batch_rows` computed on the contexts' device (grid and HVAC in torch;
    any other domain through numpy, once per call)."""
    from scf.domains.hvac import OCCUPIED

    c = contexts
    k = _constants(domain, c.device, c.dtype)
    if k["kind"] == "grid":
        demand = c.sum(-1) + k["fixed_load"]
        base = k["offset"] - c @ k["load_t"]
        lo = torch.cat([demand[:, None], -k["rate"] - base], 1)
        hi = torch.cat([demand[:, None], k["rate"] - base], 1)
        a, eq = k["a"], k["eq_host"]
    elif k["kind"] == "hvac":
        z = k["z"]
        t_out, hour, occ, t0 = c[:, 0], c[:, 1], c[:, 2 : 2 + z], c[:, 2 + z : 2 + 2 * z]
        sun = torch.sin(torch.pi * (hour - 6.0) / 12.0).clamp(min=0.0)
        gains = occ * k["occ_gain"] + sun[:, None] * k["solar_gain"]
        free = t0 @ k["a_d_t"] + gains @ k["b_u_t"] + t_out[:, None] * k["b_out"]
        lo_o, hi_o, lo_u, hi_u = k["band"]
        occupied = occ > OCCUPIED
        lo = torch.where(occupied, lo_o, lo_u) - free
        hi = torch.where(occupied, hi_o, hi_u) - free
        a, eq = k["a"], k["eq_host"]
    else:
        an, ln, hn = batch_rows(domain, c.detach().cpu().numpy())
        eq = np.all(ln == hn, axis=0) & np.all(an != 0, axis=1)
        a, lo, hi = (torch.as_tensor(v, dtype=c.dtype, device=c.device) for v in (an, ln, hn))
        k = {"a_host": an}
    if "eq" not in k:
        k["eq"] = torch.as_tensor(eq, device=c.device)
    return Rows(a, lo, hi, k["eq"], eq, k["a_host"], k)


def _room(x, lo, hi):
    span = (hi - lo).clamp(min=1e-9)
    return torch.maximum((x - lo) * (hi - x) / span, 1e-4 * span)


def balance_t(x, rows: Rows, lo, hi, merit=None, passes: int = 3):
    """The balance rows restored (`domains.repair._balance`): the mismatch spread over the
    room in the needed direction, cheapest first for a shortfall and dearest first for a
    surplus when `merit` (B, d) is given, else in proportion to the room; a fixed number
    of passes, a mismatch within MARGIN left alone."""
    for k in np.flatnonzero(rows.eq_host):
        on = rows.const(f"on{k}", lambda: np.flatnonzero(rows.a_host[k] != 0))  # noqa: B023
        lo_on, hi_on = lo[on], hi[on]
        m = None if merit is None else merit[:, on]
        for _ in range(passes):
            xo = x[:, on]
            gap = rows.lo[:, k] - xo.sum(-1)
            gap = torch.where(gap.abs() > MARGIN, gap, torch.zeros_like(gap))
            short = gap > 0
            up = torch.where(short[:, None], hi_on - xo, xo - lo_on)
            need = gap.abs()
            if m is None:
                share = up * torch.clamp(need / up.sum(-1).clamp(min=1e-12), max=1.0)[:, None]
            else:
                order = torch.argsort(torch.where(short[:, None], m, -m), dim=1)
                room_sorted = torch.gather(up, 1, order)
                before = torch.cumsum(room_sorted, 1) - room_sorted
                take = torch.minimum((need[:, None] - before).clamp(min=0.0), room_sorted)
                share = torch.empty_like(take).scatter_(1, order, take)
            x = x.index_copy(1, on, xo + torch.sign(gap)[:, None] * share)
        x = torch.minimum(torch.maximum(x, lo), hi)
    return x


def _outside(x, rows_a, rlo, rhi, lo, hi, tol):
    ax = x @ rows_a.T
    return (ax > rhi + tol).any(1) | (ax < rlo - tol).any(1) | (x < lo - tol).any(1) | (x > hi + tol).any(1)


def _ridge(a: np.ndarray, span: np.ndarray) -> float:
    """1e-10 of the largest diagonal entry A W A' can have (W is at most span / 4)."""
    return 1e-10 * max(1.0, float((a**2 @ (span / 4)).max()))


def _spd_solve_small(m, b):
    """m (B, R, R) symmetric positive definite, b (B, R, 1) -> m^-1 b, by a Cholesky
    factorisation written out in elementwise ops (R <= 4): no solver library call, so it
    can be recorded in a CUDA graph."""
    n = m.shape[-1]
    low = [[None] * n for _ in range(n)]
    for j in range(n):
        diag = m[:, j, j] - sum((low[j][k] ** 2 for k in range(j)), torch.zeros_like(m[:, 0, 0]))
        low[j][j] = diag.clamp(min=1e-300).sqrt()
        for i in range(j + 1, n):
            low[i][j] = (m[:, i, j] - sum((low[i][k] * low[j][k] for k in range(j)), torch.zeros_like(m[:, 0, 0]))) / low[j][j]
    y: list = []
    for i in range(n):
        y.append((b[:, i, 0] - sum((low[i][k] * y[k] for k in range(i)), torch.zeros_like(b[:, 0, 0]))) / low[i][i])
    z: list = [None] * n
    for i in reversed(range(n)):
        z[i] = (y[i] - sum((low[k][i] * z[k] for k in range(i + 1, n)), torch.zeros_like(b[:, 0, 0]))) / low[i][i]
    return torch.stack(z, 1)[:, :, None]


def least_norm_t(x, a, rlo, rhi, eq, lo, hi, iterations: int = ITERATIONS, check_every: int = 0, ridge: float | None = None, small: bool = False):
    """`domains.repair._active_set` for a batch: each iteration moves every proposal that
    still violates a row (or a bound) by dx = -W A_act'(A_act W A_act')^-1 r, W the room
    each variable has, A_act the violated, binding and equality rows; proposals already
    within every row keep their state (masked). One change from the numpy loop: a variable
    that the last step pushed past a bound (and was clipped there) is held at it for the
    next step (weight ~0), so the others carry the move — clipping otherwise undoes part of
    each step and the balance row creeps back in 1e-4 MW steps (the proposals that the
    numpy repair hands to the exact projection on the congested grid). With `check_every`
    = k > 0, every k-th iteration asks the device how many proposals still need a move
    (one host sync) and stops if none does, or if no more got in than at the last check
    (those are stuck at a point the step cannot leave: the exact projection takes them);
    0: the fixed count, no sync. Returns x."""
    span = hi - lo
    if ridge is None:  # (a host sync on an accelerator: repair_batch_t passes it)
        ridge = _ridge(a.detach().cpu().numpy(), span.detach().cpu().numpy())
    eye = torch.eye(a.shape[0], dtype=x.dtype, device=x.device) * ridge
    t_lo, t_hi = rlo + MARGIN, rhi - MARGIN
    t_lo = torch.where(eq, rlo, t_lo)  # equality rows: exactly their value
    t_hi = torch.where(eq, rlo, t_hi)
    b_lo, b_hi = rlo + (2 * MARGIN + CHECK_TOL), rhi - (2 * MARGIN + CHECK_TOL)
    floor = 1e-4 * span.clamp(min=1e-9)
    pinned_w = 1e-9 * span
    pinned = torch.zeros_like(x, dtype=torch.bool)  # clipped at a bound by the last step: held there
    still = len(x) + 1
    for it in range(iterations):
        ax = x @ a.T
        r = ax - torch.clamp(ax, t_lo, t_hi)
        violated = r.abs() > CHECK_TOL
        need = violated.any(1, keepdim=True)  # x is within its bounds (clipped at every step)
        if check_every and it and it % check_every == 0:
            left = int(need.sum())  # one host sync
            if left == 0 or left >= still:  # done, or no proposal got in since the last check: the rest is stuck
                break
            still = left
        act = (violated | (ax >= b_hi) | (ax <= b_lo) | eq).to(x.dtype)  # (B, R)
        w = torch.where(pinned, pinned_w, torch.maximum((x - lo) * (hi - x) / span.clamp(min=1e-9), floor))  # (B, d)
        aa = a * act[:, :, None]  # (B, R, d): the inactive rows zeroed …
        m = torch.baddbmm(torch.diag_embed(1.0 - act) + eye, aa * w[:, None, :], aa.transpose(1, 2))  # … and replaced by identity rows
        if small:  # written out (recordable in a CUDA graph)
            lam = _spd_solve_small(m, (r * act)[:, :, None])
        else:
            chol, _ = torch.linalg.cholesky_ex(m)
            lam = torch.cholesky_solve((r * act)[:, :, None], chol)  # (B, R, 1)
        step = torch.nan_to_num(w * (lam.transpose(1, 2) @ a)[:, 0], nan=0.0, posinf=0.0, neginf=0.0)
        moved = x - step
        pinned = (moved < lo) | (moved > hi)
        x = torch.where(need, torch.clamp(moved, lo, hi), x)
    return x


def repair_t(rows: Rows, states, lo, hi, *, merit=None, iterations: int = ITERATIONS):
    """(repaired states (B, d), met (B,) bool) — the whole batch on its device, no host sync."""
    x = torch.where(torch.isfinite(states), states, (lo + hi) / 2)
    x = torch.minimum(torch.maximum(x, lo), hi)
    if rows.eq_host.any():
        x = balance_t(x, rows, lo, hi, merit)
    x = least_norm_t(x, rows.a, rows.lo, rows.hi, rows.eq, lo, hi, iterations)
    return x, ~_outside(x, rows.a, rows.lo, rows.hi, lo, hi, CHECK_TOL)


def repair_batch_t(
    domain: Domain, contexts: np.ndarray, states: torch.Tensor, *, merit: torch.Tensor | None = None,
    rows: Rows | None = None, iterations: int = ITERATIONS, fallback: bool = True, polish=None, check_every: int = 4,
    graphs: dict | None = None, emulate: bool = False,
) -> tuple[RepairResult, torch.Tensor]:
    """`domains.repair.repair_batch` with the cheap steps on `states`' device: balance for
    the whole batch; the least-norm stage only for the proposals outside a row after it
    (one host sync to pick them; skipped when there are none; then `check_every`: a sync
    every 4th iteration to stop once none needs a move); one sync for the met mask; the
    exact projection (`Domain.project`, on the host) for the rare proposal still outside a
    row by more than CHECK_TOL (`RepairResult.fallback`); then `polish(x, feasible, rows)`
    (optional, e.g. the learned-cost line searches) on the device for the whole batch; one
    sync to bring the result back. Returns (numpy result, the device states)."""
    dev, dt = states.device, torch.float64
    lo_np, hi_np = (np.asarray(b, dtype=float) for b in domain.state_bounds)
    if rows is None:  # (a caller that has them passes them: a host->device copy is a sync)
        rows = device_rows(domain, torch.as_tensor(np.atleast_2d(np.asarray(contexts, dtype=float)), dtype=dt, device=dev))
    lo, hi = rows.const("state_lo", lambda: lo_np), rows.const("state_hi", lambda: hi_np)
    x0 = states.to(dt)
    x = torch.where(torch.isfinite(x0), x0, (lo + hi) / 2)
    start = x = torch.minimum(torch.maximum(x, lo), hi)
    if rows.eq_host.any():
        x = balance_t(x, rows, lo, hi, None if merit is None else merit.to(dt))
    ridge = _ridge(rows.a_host, hi_np - lo_np)
    if graphs is not None and len(rows.a_host) <= 4 and iterations and (x.is_cuda or emulate):
        # few rows (HVAC): the fixed iterations on the whole batch, masked, recorded as a CUDA graph
        def program(xs, rl, rh):
            return least_norm_t(xs, rows.a, rl, rh, rows.eq, lo, hi, iterations, 0, ridge, small=True)

        key = ("least_norm", id(rows.consts), len(x), str(x.device), iterations)
        x = run_graphed(graphs, key, program, (x, rows.lo, rows.hi), capture=not emulate, keep=(rows.consts,))
        idx = ()
    else:
        bad = _outside(x, rows.a, rows.lo, rows.hi, lo, hi, CHECK_TOL)
        idx = torch.nonzero(bad).flatten()  # sync 1: which proposals need the least-norm stage
    if len(idx):
        xs = least_norm_t(x[idx], rows.a, rows.lo[idx], rows.hi[idx], rows.eq, lo, hi, iterations, check_every, ridge)
        x = x.index_copy(0, idx, xs)
    met = ~_outside(x, rows.a, rows.lo, rows.hi, lo, hi, CHECK_TOL)
    feasible = met.cpu().numpy()  # sync 2
    used = np.zeros(len(feasible), dtype=bool)
    if fallback and not feasible.all():  # the exact projection for the rare rest, on the host
        c = np.atleast_2d(np.asarray(contexts, dtype=float))
        which = np.flatnonzero(~feasible)
        pick = torch.as_tensor(which, device=dev)
        x0_np, xi_np = x0[pick].cpu().numpy(), x[pick].cpu().numpy()
        for k, i in enumerate(which):
            used[i] = True
            try:
                xi_np[k] = domain.project(c[i], x0_np[k] if np.all(np.isfinite(x0_np[k])) else xi_np[k])
                feasible[i] = True
            except Infeasible:
                pass
        x = x.index_copy(0, pick, torch.as_tensor(xi_np, dtype=dt, device=dev))
        met = torch.as_tensor(feasible, device=dev)
    if polish is not None:
        x = polish(x, met, rows)
    x_np, start_np = x.cpu().numpy(), start.cpu().numpy()  # sync 3
    half = np.maximum((hi_np - lo_np) / 2, 1e-9)
    return RepairResult(states=x_np, feasible=feasible, fallback=used, moved=(np.abs(x_np - start_np) / half).sum(-1)), x


# ------------------------------------------------------------------------ device graphs


class Graphed:
    """`fn(*inputs)` (a program of fixed shapes with no host sync) recorded once as a CUDA
    graph and replayed: one launch instead of hundreds of small kernels, each of which costs
    more to launch from Python than to run at these sizes. The inputs are copied into the
    graph's own (static) tensors before each replay; the result is a copy. Tensors that `fn`
    reads besides its inputs (model buffers, the domain's constants) must stay where they
    are while the graph lives (`LearnedOptimiser` drops its graphs when it moves). On the
    CPU (`capture=False`) the same bookkeeping calls `fn` on the static tensors, which is
    what the tests check."""

    def __init__(self, fn, inputs, *, capture: bool, keep=()) -> None:
        self.fn, self.keep = fn, keep
        self.static = [t.clone() for t in inputs]
        self.graph = None
        if capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(*self.static)  # warm-up outside the capture (allocator, constants, libraries)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = fn(*self.static)
        else:
            self.out = fn(*self.static)

    def __call__(self, *inputs):
        for dst, src in zip(self.static, inputs):
            dst.copy_(src)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.out.copy_(self.fn(*self.static))
        return self.out.clone()


def run_graphed(cache: dict, key, fn, inputs, *, capture: bool | None = None, keep=()):
    """`fn(*inputs)` through a `Graphed` cached under `key` (which must name every shape);
    where recording fails, the error is kept in `cache["error"]` and `fn` runs eagerly from
    then on for that key."""
    capture = inputs[0].is_cuda if capture is None else capture
    entry = cache.get(key)
    if entry is None:
        try:
            entry = cache[key] = Graphed(fn, inputs, capture=capture, keep=keep)
        except Exception as e:  # noqa: BLE001 — a device that cannot record falls back to eager launches
            cache["error"] = f"{type(e).__name__}: {e}"
            entry = cache[key] = "eager"
    return fn(*inputs) if entry == "eager" else entry(*inputs)


# ------------------------------------------------------------------------ the polish


def polish_directions(a: np.ndarray) -> list[np.ndarray]:
    """Each variable alone, then each row alone (a column of pinv(A), scaled to max |v| = 1)."""
    dirs = [np.eye(a.shape[1])[j] for j in range(a.shape[1])]
    return dirs + [v / max(np.abs(v).max(), 1e-12) for v in np.linalg.pinv(a).T]


def _direction_constants(rows: Rows, dirs) -> list[tuple]:
    """Per direction v, host-side: the rows of G = [A; I] that v moves (G v != 0), split by
    sign, with 1 / (G v), and the moving variables with 1 / v (no host work per line search)."""
    def make():
        g = np.vstack([rows.a_host, np.eye(rows.a_host.shape[1])])
        out = []
        for v in dirs:
            gv = g @ v
            pos, neg = np.flatnonzero(gv > 1e-12 * np.abs(gv).max()), np.flatnonzero(gv < -1e-12 * np.abs(gv).max())
            sel = np.concatenate([pos, neg])
            mv = np.flatnonzero(v != 0)
            out += [np.asarray(v, float), g[sel], 1.0 / gv[sel], pos, neg, mv, 1.0 / v[mv]]
        return out
    flat = rows.const("polish_directions", make)
    return [tuple(flat[k : k + 7]) for k in range(0, len(flat), 7)]


def polish_t(cost, weights, knots, rows: Rows, x, feasible, lo, hi, *, sweeps: int = 2, grid: int = 5, dirs=None):
    """`LearnedOptimiser.polish` for a batch on its device: `sweeps` rounds of exact line
    searches on the learned cost (`cost.device_energy` under `weights` (B, d, F)) along
    each direction, the candidates being the current point, the feasible interval's ends,
    a grid over it and the cost model's kinks (`knots` (d, K), physical units); only
    `feasible` proposals move, and each stays inside every row and bound. The feasible
    interval of a line is cut by the rows of [A; I] that it moves, their signs and
    reciprocals fixed per direction on the host, so a line search is ~40 kernels and no
    host sync. Ties keep the current point (it is the first candidate; argmin takes the
    first minimum)."""
    dirs = polish_directions(rows.a_host) if dirs is None else dirs
    consts = _direction_constants(rows, dirs)
    n = len(x)
    big_lo = torch.cat([rows.lo, lo.expand(n, -1)], 1)  # (B, R + d): bounds of G x
    big_hi = torch.cat([rows.hi, hi.expand(n, -1)], 1)
    g = torch.linspace(0.0, 1.0, grid, dtype=x.dtype, device=x.device)
    zero = torch.zeros(n, 1, dtype=x.dtype, device=x.device)
    per_dir = []
    for v, g_sel, inv, pos, neg, mv, inv_v in consts:  # the interval ends' bounds, once per call
        start = torch.cat([big_lo[:, pos], big_hi[:, neg]], 1)  # t >= (start - G x) / (G v)
        end = torch.cat([big_hi[:, pos], big_lo[:, neg]], 1)  # t <= (end - G x) / (G v)
        per_dir.append((v, g_sel, inv, start, end, mv, inv_v, knots[mv][None]))
    for _ in range(sweeps):
        for v, g_sel, inv, start, end, mv, inv_v, knots_mv in per_dir:
            gx = x @ g_sel.T  # (B, k)
            t_lo = ((start - gx) * inv).amax(1, keepdim=True)
            t_hi = ((end - gx) * inv).amin(1, keepdim=True)
            span = t_hi - t_lo
            t_lo, t_hi = t_lo + 1e-6 * span, t_hi - 1e-6 * span
            ok = feasible[:, None] & (t_lo <= 0) & (t_hi >= 0) & torch.isfinite(span)
            t_lo, t_hi = torch.where(ok, t_lo, zero), torch.where(ok, t_hi, zero)
            kinks = ((knots_mv - x[:, mv, None]) * inv_v[:, None]).flatten(1)
            cand = torch.cat([zero, t_lo + g * (t_hi - t_lo), kinks], 1).clamp(t_lo, t_hi)  # (B, K)
            energy = cost.device_energy(x[:, None, :] + cand[:, :, None] * v, weights)
            best = torch.gather(cand, 1, energy.argmin(1, keepdim=True))
            x = x + best * v  # best is 0 where not ok (the interval [0, 0])
    return x


__all__ = ["ITERATIONS", "Graphed", "Rows", "run_graphed", "balance_t", "device_rows", "least_norm_t", "polish_directions", "polish_t", "repair_batch_t", "repair_t"]
