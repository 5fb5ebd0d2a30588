"""The learned optimiser: decisions from a model trained only on fossils, then repaired.

    result = train_optimiser("grid:case118", "vault/fossils", "model_zoo")   # fossils only
    states = propose(domain, contexts, result.checkpoint)                   # (B, d), feasible

Two parts, both learned from observations (context, state, measured energy) — neither
sees the domain's cost function or its solver:

* **a cost model** (`ml/cost.py`): E(c, x) ≈ measured energy, fitted by ridge regression
  on the fossils; it ranks states by what they cost, which a density model cannot;
* **an amortised proposal network** π(c) → x (an MLP on the normalised context), trained
  to minimise the *learned* cost of its proposal over the fossils' contexts (and convex
  mixtures of two of them), with the domain's constraints as a penalty and a
  differentiable balance layer inside the loop (as E2ELR does: the proposal is balanced
  before its cost is measured, so the network learns what survives the repair).

At decision time: one forward pass for a batch of contexts, then `domains.repair` (the
cheap feasibility repair, merit-ordered by the learned marginal costs), so every proposal
passes the domain's own `violations` check. The constraints are the domain's (known
physics: PTDF rows, the RC model); the cost is learned. docs/optimise.md argues the
choice against the alternatives (cost-guided diffusion, supervised DeepOPF) and gives
the measured numbers.

Checkpoints are safetensors (format `scf-opt/1`: weights of both parts, config, lineage
and metrics in the header); no pickle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from scf import domains
from scf.bus.errors import ConfigError, SCFError
from scf.bus.events import domain_token
from scf.domains.base import Domain
from scf.domains.quality import best_in_data, decision_quality, optimum_costs
from scf.domains.repair import RepairResult, batch_rows, repair_batch
from scf.ml.cost import CostConfig, CostModel

FORMAT = "scf-opt/1"


class OptimiserError(SCFError):
    pass


@dataclass
class OptimiserConfig:
    domain: str = ""
    hidden: int = 256
    depth: int = 3  # hidden layers of the proposal network
    steps: int = 3000
    batch_size: int = 256
    lr: float = 2e-3
    penalty: float = 100.0  # weight of the squared constraint distance (normalised units), final value
    penalty_start: float = 10.0  # … grown geometrically from this over the steps
    mixup: float = 0.5  # share of each batch drawn as convex combinations of two fossil contexts
    seed: int = 0
    polish_sweeps: int = 2  # line-search sweeps on the learned cost after repair (domains without balance rows)
    polish_grid: int = 5  # evenly spaced candidates per line search, beside the ends and the cost model's kinks
    threads: int = 1  # torch intra-op threads while training and proposing (0: torch's default)
    max_fossils: int = 50_000  # train-split fossils read
    eval_contexts: int = 256  # held-out contexts judged against the exact optimum
    cost: CostConfig = field(default_factory=CostConfig)
    # filled from the domain
    state_lo: list[float] = field(default_factory=list)
    state_hi: list[float] = field(default_factory=list)
    context_lo: list[float] = field(default_factory=list)
    context_hi: list[float] = field(default_factory=list)

    def resolved(self) -> OptimiserConfig:
        cfg = dataclasses.replace(self)
        if not cfg.state_lo:
            d = domains.get(cfg.domain)
            cfg.state_lo, cfg.state_hi = [list(map(float, b)) for b in d.state_bounds]
            cfg.context_lo, cfg.context_hi = [list(map(float, b)) for b in d.context_bounds]
        if cfg.steps < 1 or cfg.batch_size < 1 or cfg.hidden < 1 or cfg.depth < 1:
            raise ConfigError(f"optimiser steps, batch_size, hidden and depth must be >= 1 (got {cfg.steps}, {cfg.batch_size}, {cfg.hidden}, {cfg.depth})")
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> OptimiserConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in names}
        cost_names = {f.name for f in dataclasses.fields(CostConfig)}
        data["cost"] = CostConfig(**{k: v for k, v in dict(data.get("cost") or {}).items() if k in cost_names})
        return cls(**data)


class PolicyNet(nn.Module):
    """π(c): normalised context (B, m) -> normalised state (B, d), unbounded (clamped later)."""

    def __init__(self, state_dim: int, context_dim: int, hidden: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(context_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, state_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, cz):
        return self.net(cz)


class LearnedOptimiser(nn.Module):
    def __init__(self, config: OptimiserConfig) -> None:
        super().__init__()
        cfg = self.config = config.resolved()
        lo, hi = (torch.tensor(v, dtype=torch.float32) for v in (cfg.state_lo, cfg.state_hi))
        clo, chi = (torch.tensor(v, dtype=torch.float32) for v in (cfg.context_lo, cfg.context_hi))
        self.register_buffer("state_lo", lo)
        self.register_buffer("state_hi", hi)
        self.register_buffer("state_mid", (lo + hi) / 2)
        self.register_buffer("state_half", ((hi - lo) / 2).clamp(min=1e-9))
        self.register_buffer("context_mid", (clo + chi) / 2)
        self.register_buffer("context_half", ((chi - clo) / 2).clamp(min=1e-9))
        self.cost = CostModel(cfg.state_lo, cfg.state_hi, cfg.context_lo, cfg.context_hi, cfg.cost)
        with torch.random.fork_rng():  # seeded initial weights, the caller's RNG untouched
            torch.manual_seed(cfg.seed)
            self.policy = PolicyNet(len(lo), len(clo), cfg.hidden, cfg.depth)

    def _raw(self, c):  # physical context (B, m) -> (state (B, d), unclamped normalised output)
        out = self.policy((c - self.context_mid) / self.context_half)
        return torch.minimum(torch.maximum(self.state_mid + self.state_half * out, self.state_lo), self.state_hi), out

    @torch.no_grad()
    def propose_raw(self, domain: Domain, contexts: np.ndarray) -> np.ndarray:
        """The network's proposals (B, d) within the state bounds, through the same balance
        layer as in training (where the domain has a balance row), before repair."""
        c = np.atleast_2d(np.asarray(contexts, dtype=float))
        dev = self.state_lo.device  # the model's device (`model.to("cuda")`); numpy in and out
        x = self._raw(torch.as_tensor(c, dtype=torch.float32, device=dev))[0]
        a, rlo, rhi = batch_rows(domain, c)
        eq = _equality_rows(a, rlo, rhi)
        if eq.any():
            x = _balance_layer(x.double(), self.state_lo.double(), self.state_hi.double(), torch.as_tensor(rlo[:, eq][:, 0], device=dev))
        return x.double().cpu().numpy()

    def merit(self, contexts: np.ndarray, states: np.ndarray) -> np.ndarray:
        """The learned marginal cost of each variable at `states` (B, d)."""
        dev = self.state_lo.device
        return self.cost.marginal(torch.as_tensor(states, device=dev), torch.as_tensor(contexts, dtype=torch.float64, device=dev)).cpu().numpy()

    # "torch": repair and polish as one batched program on the model's device (ml/repair_torch.py);
    # "numpy": domains.repair and the numpy polish; "auto": torch on an accelerator, numpy on the
    # CPU (where the two measured within noise of each other: benchmarks/RESULTS.md, learned optimiser)
    repair_backend = "auto"
    device_graphs = True  # the torch polish recorded as a CUDA graph per batch shape on a GPU (ml/repair_torch.Graphed); "emulate": its bookkeeping on the CPU

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() move the buffers a recorded graph reads: drop the graphs
        self._graphs = {}
        return super()._apply(fn, *args, **kwargs)

    @property
    def graph_error(self) -> str:
        """Why recording a device graph failed (then the polish ran eagerly), or ''."""
        return getattr(self, "_graphs", {}).get("error", "")

    def decide(self, domain: Domain, contexts: np.ndarray) -> tuple[np.ndarray, RepairResult]:
        """(raw proposals, their repair) for `contexts` (B, m). With the torch backend
        (`repair_backend`; "auto" picks it when the model is on an accelerator) the network,
        balance layer, merit order, repair and polish run as one batched program on the
        model's device; the exact projection (numpy, the domain's) only for what is still
        infeasible after it."""
        c = np.atleast_2d(np.asarray(contexts, dtype=float))
        if self.repair_backend not in ("auto", "torch", "numpy"):
            raise OptimiserError(f"repair_backend {self.repair_backend!r} is not one of auto, torch, numpy")
        with _threads(self.config.threads):
            if self.repair_backend == "torch" or (self.repair_backend == "auto" and self.state_lo.device.type != "cpu"):
                return self._decide_torch(domain, c)
            raw = self.propose_raw(domain, c)
            merit = self.merit(c, raw)
            fixed = repair_batch(domain, c, raw, merit=merit)
            if self.config.polish_sweeps:
                fixed.states = self.polish(domain, c, fixed.states, fixed.feasible)
        return raw, fixed

    @torch.no_grad()
    def _decide_torch(self, domain: Domain, c: np.ndarray) -> tuple[np.ndarray, RepairResult]:
        from scf.ml.repair_torch import Rows, device_rows, polish_t, repair_batch_t, run_graphed

        dev = self.state_lo.device
        ct = torch.as_tensor(c, dtype=torch.float64, device=dev)
        rows = device_rows(domain, ct)
        x = self._raw(ct.float())[0].double()
        lo, hi = self.state_lo.double(), self.state_hi.double()
        if rows.eq_host.any():
            x = _balance_layer(x, lo, hi, rows.lo[:, int(np.flatnonzero(rows.eq_host)[0])])
        merit = self.cost.marginal(x, ct) if rows.eq_host.any() else None  # only the balance uses the merit order
        polish = None
        if self.config.polish_sweeps and not rows.eq_host.any() and len(rows.a_host) <= 4 * rows.a_host.shape[1]:
            sweeps, grid = self.config.polish_sweeps, self.config.polish_grid

            def program(xs, feasible, cs, rlo, rhi):  # fixed shapes, no host sync: recorded as a CUDA graph on a GPU
                knots = self.state_mid.double()[:, None] + self.state_half.double()[:, None] * self.cost.knots[None, :]
                r = Rows(rows.a, rlo, rhi, rows.eq, rows.eq_host, rows.a_host, rows.consts)
                return polish_t(self.cost, self.cost.device_weights(cs), knots, r, xs, feasible,
                                self.state_lo.double(), self.state_hi.double(), sweeps=sweeps, grid=grid)

            def polish(xs, feasible, r):
                emulate = self.device_graphs == "emulate"  # the graph's bookkeeping without a GPU (tests)
                if not (self.device_graphs and (xs.is_cuda or emulate)):
                    return program(xs, feasible, ct, r.lo, r.hi)
                key = ("polish", id(domain), len(xs), str(xs.device), sweeps, grid)
                return run_graphed(self.__dict__.setdefault("_graphs", {}), key, program, (xs, feasible, ct, r.lo, r.hi),
                                   capture=not emulate, keep=(domain, rows.consts))

        graphs = self.__dict__.setdefault("_graphs", {}) if self.device_graphs else None
        fixed, _ = repair_batch_t(domain, c, x, merit=merit, rows=rows, polish=polish, graphs=graphs, emulate=self.device_graphs == "emulate")
        return x.cpu().numpy(), fixed

    @torch.no_grad()
    def polish(self, domain: Domain, contexts: np.ndarray, states: np.ndarray, feasible: np.ndarray) -> np.ndarray:
        """Exact line searches on the *learned* cost inside the feasible set, for domains
        without balance rows (HVAC). Directions: each variable alone, and each row alone
        (a column of pinv(A): move one zone's temperature, the others held — heating one
        zone to warm its neighbour is such a move). Along a direction the learned cost is
        piecewise quadratic with kinks where a variable crosses a knot, so the candidates
        are the feasible interval's ends, those kink points, and a grid. A feasible state
        stays feasible (the interval is cut by every row and bound); the network's last
        tenths of a kW — an MLP does not output an exact 0 where the optimum idles a zone —
        are removed. Grid domains are returned as they are (a move along one variable or
        one row breaks the balance)."""
        a, rlo, rhi = batch_rows(domain, contexts)
        if _equality_rows(a, rlo, rhi).any() or len(a) > 4 * a.shape[1]:
            return states
        x = states.copy()
        lo, hi = (np.asarray(v, dtype=float) for v in (self.config.state_lo, self.config.state_hi))
        knots = (self.state_mid.double().cpu().numpy()[:, None] + self.state_half.double().cpu().numpy()[:, None] * self.cost.knots.cpu().numpy()[None, :])  # (d, K)
        dirs = [np.eye(a.shape[1])[j] for j in range(a.shape[1])]
        dirs += [v / max(np.abs(v).max(), 1e-12) for v in np.linalg.pinv(a).T]
        weights = self.cost.device_weights(torch.as_tensor(contexts, dtype=torch.float64, device=self.state_lo.device))
        grid = np.linspace(0.0, 1.0, self.config.polish_grid)
        for _ in range(self.config.polish_sweeps):
            for v in dirs:
                x = self._line_search(x, v, a, rlo, rhi, lo, hi, feasible, knots, grid, weights)
        return x

    def _line_search(self, x, v, a, rlo, rhi, lo, hi, feasible, knots, grid, weights):
        n = len(x)
        av, ax = a @ v, x @ a.T
        with np.errstate(divide="ignore", invalid="ignore"):
            r1, r2 = (rlo - ax) / av, (rhi - ax) / av  # (B, R)
            b1, b2 = (lo - x) / v, (hi - x) / v  # (B, d)
        t_lo = np.maximum(np.where(av > 0, r1, np.where(av < 0, r2, -np.inf)).max(1), np.where(v > 0, b1, np.where(v < 0, b2, -np.inf)).max(1))
        t_hi = np.minimum(np.where(av > 0, r2, np.where(av < 0, r1, np.inf)).min(1), np.where(v > 0, b2, np.where(v < 0, b1, np.inf)).min(1))
        span = t_hi - t_lo
        t_lo, t_hi = t_lo + 1e-6 * span, t_hi - 1e-6 * span
        ok = feasible & np.isfinite(span) & (t_lo <= 0) & (t_hi >= 0)
        if not ok.any():
            return x
        t_lo, t_hi = np.where(ok, t_lo, 0.0), np.where(ok, t_hi, 0.0)
        moving = np.flatnonzero(v != 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            kinks = ((knots[moving][None, :, :] - x[:, moving, None]) / v[moving][None, :, None]).reshape(n, -1)
        cand = np.concatenate([t_lo[:, None] + grid * (t_hi - t_lo)[:, None], kinks, np.zeros((n, 1))], 1)
        cand = np.clip(cand, t_lo[:, None], t_hi[:, None])  # (B, K)
        trial = x[:, None, :] + cand[:, :, None] * v  # (B, K, d)
        energy = self.cost.device_energy(torch.as_tensor(trial, device=weights.device), weights).cpu().numpy()  # g(c) is the same along the line
        energy[:, -1] -= 1e-12 * np.abs(energy[:, -1])  # ties keep the state where it is
        best = cand[np.arange(n), energy.argmin(1)]
        return np.where(ok[:, None], x + best[:, None] * v, x)


# ------------------------------------------------------------------------ training


@contextlib.contextmanager
def _threads(n: int):
    """torch's intra-op threads set to `n` (0: leave them) for the block. These networks are
    small: on a shared CPU one thread is many times faster than a team spinning for cores."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _equality_rows(a: np.ndarray, rlo: np.ndarray, rhi: np.ndarray) -> np.ndarray:
    """The balance rows: equal bounds in every context given, all-nonzero coefficients."""
    return np.all(rlo == rhi, axis=0) & np.all(a != 0, axis=1)


def _balance_layer(x, lo, hi, demand):
    """Differentiable power balance (E2ELR's proportional response): the mismatch spread
    over the room each variable has in the needed direction; x (B, d), demand (B,)."""
    gap = demand - x.sum(-1)  # (B,)
    up, down = hi - x, x - lo
    share_up = up / up.sum(-1, keepdim=True).clamp(min=1e-9)
    share_down = down / down.sum(-1, keepdim=True).clamp(min=1e-9)
    return x + gap.clamp(min=0)[:, None] * share_up + gap.clamp(max=0)[:, None] * share_down


def fit_optimiser(domain: Domain, x: np.ndarray, c: np.ndarray, energy: np.ndarray, config: OptimiserConfig, log=None,
                  progress=None) -> tuple[LearnedOptimiser, dict[str, float]]:
    """Fit the cost model on (x, c, energy) and train the proposal network on contexts c.
    `progress(step, total, loss, samples_per_s)` is called after every step (the worker's
    job.progress; it may raise to stop training)."""
    with _threads(config.threads):
        return _fit(domain, x, c, energy, config, log, progress)


def _fit(domain, x, c, energy, config, log, progress=None):
    model = LearnedOptimiser(config)
    cfg = model.config
    metrics = model.cost.fit(x, c, energy)
    model.cost.requires_grad_(False)
    gen = np.random.default_rng(cfg.seed)
    contexts = np.asarray(c, dtype=float)
    a, rlo_all, rhi_all = batch_rows(domain, contexts[: min(len(contexts), 64)])
    eq = _equality_rows(a, rlo_all, rhi_all)
    a_t = torch.tensor(a[~eq], dtype=torch.float32)
    row_norm = (a_t * model.state_half).norm(dim=-1).clamp(min=1e-9)  # distance in z per unit of the row
    e_mean, e_std = (float(v) for v in model.cost.energy_scale)
    opt = torch.optim.Adam(model.policy.parameters(), lr=cfg.lr)
    # OneCycle needs at least one warm-up and one annealing step (pct_start * steps >= 2): short runs
    # (a test, a tiny job) warm up over two steps, and fewer than four steps keep the rate constant
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=max(0.05, 2.0 / cfg.steps))
             if cfg.steps >= 4 else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    ratio = cfg.penalty / max(cfg.penalty_start, 1e-9)
    model.policy.train()
    started = time.perf_counter()
    for step in range(cfg.steps):
        idx = gen.integers(len(contexts), size=cfg.batch_size)
        cb = contexts[idx]
        n_mix = int(cfg.mixup * cfg.batch_size)
        if n_mix:
            other = contexts[gen.integers(len(contexts), size=n_mix)]
            t = gen.random((n_mix, 1))
            cb[:n_mix] = t * cb[:n_mix] + (1 - t) * other
        _, rlo, rhi = batch_rows(domain, cb)
        ct = torch.tensor(cb, dtype=torch.float32)
        xb, out = model._raw(ct)
        if eq.any():
            xb = _balance_layer(xb, model.state_lo, model.state_hi, torch.tensor(rlo[:, eq][:, 0], dtype=torch.float32))
        energy_b = (model.cost(xb, ct).float() - e_mean) / e_std
        if cfg.cost.conservative > 0:  # away from the fossils' support the learned cost is not trusted (ml/cost.py)
            energy_b = energy_b + cfg.cost.conservative * model.cost.support_penalty(xb, ct).float()
        ax = xb @ a_t.T
        excess = (ax - torch.tensor(rhi[:, ~eq], dtype=torch.float32)).clamp(min=0) + (torch.tensor(rlo[:, ~eq], dtype=torch.float32) - ax).clamp(min=0)
        dist = (excess / row_norm).square().sum(-1)
        rho = cfg.penalty_start * ratio ** (step / max(1, cfg.steps - 1))
        box = (out.abs() - 1).clamp(min=0).square().sum(-1)  # keeps the clamped outputs from drifting off
        loss = energy_b.mean() + rho * dist.mean() + 1e-2 * box.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.policy.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress(step + 1, cfg.steps, float(loss.detach()), cfg.batch_size * (step + 1) / max(time.perf_counter() - started, 1e-9))
        if log is not None and (step % 500 == 0 or step == cfg.steps - 1):
            log(f"step {step}: energy {float(energy_b.mean().detach()):.5f} dist {float(dist.mean().detach()):.3g} rho {rho:.3g}")
    model.policy.eval()
    metrics["train_seconds"] = time.perf_counter() - started
    return model.eval(), metrics


def evaluate_optimiser(
    model: LearnedOptimiser, domain: Domain, heldout: tuple[np.ndarray, np.ndarray, np.ndarray],
    train: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, limit: int = 256,
) -> dict[str, float]:
    """Decision quality on held-out fossils (x, c, energy): the repaired proposals' gap to
    the exact optimum, feasibility, savings captured from the observed state; the learned
    cost's error on the held-out energies; with `train`, the best-in-data baseline too."""
    x, c, e = (np.asarray(a, dtype=float)[:limit] for a in heldout)
    _, fixed = model.decide(domain, c)
    _, opt_cost = optimum_costs(domain, c)
    quality = decision_quality(domain, c, fixed.states, status_quo=x, optimum=opt_cost)
    metrics = quality.metrics("decision_")
    metrics["decision_repair_fallback"] = fixed.fallback_rate
    with torch.no_grad():
        dev = model.state_lo.device
        pred = model.cost(torch.as_tensor(x, device=dev), torch.as_tensor(c, device=dev)).cpu().numpy()
    metrics["cost_heldout_mae_rel"] = float(np.mean(np.abs(pred - e)) / max(float(np.mean(np.abs(e))), 1e-9))
    if train is not None:
        tx, tc, te = train
        base = best_in_data(domain, tc, tx, te, c)
        metrics.update(decision_quality(domain, c, base, status_quo=x, optimum=opt_cost).metrics("baseline_"))
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def ebdm_decisions(model, domain: Domain, x: np.ndarray, c: np.ndarray, *, seed: int = 0) -> dict[str, float]:
    """Decision quality of an EBDM used as an optimiser: one physics-guided sample per
    held-out context, repaired, measured like the learned optimiser's decisions (status quo:
    the held-out states x)."""
    from scf.ml.ebdm import _decisions
    from scf.ml.physics import penalty_for

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        samples = model.sample(torch.as_tensor(c, dtype=torch.float32), generator=gen, penalty=penalty_for(domain))
    return _decisions(domain, np.asarray(c, dtype=float), samples.double().numpy(), np.asarray(x, dtype=float))


@dataclass
class OptimiserResult:
    checkpoint: Path
    metrics: dict[str, float]
    duration_s: float


def train_optimiser(
    domain_name: str,
    data_source,
    out_dir: str | os.PathLike | None = None,
    config: OptimiserConfig | None = None,
    log=None,
    *,
    lineage: dict | None = None,
    progress=None,
) -> OptimiserResult:
    """Train the learned optimiser of `domain_name` on the "train" split of `data_source`
    (shards or a FossilSource), judge it on the "heldout" split, write the checkpoint.
    `lineage` is added to the checkpoint's (the worker's job id, intent, data selection);
    `progress` as in `fit_optimiser`."""
    from scf.ml.loader import as_source, load_arrays

    started = time.perf_counter()
    cfg = dataclasses.replace(config or OptimiserConfig(), domain=domain_name)
    domain = domains.get(domain_name)
    source = as_source(data_source)
    train = load_arrays(source, domain=domain_name, split="train", limit=cfg.max_fossils, seed=cfg.seed)
    heldout = load_arrays(source, domain=domain_name, split="heldout", limit=cfg.eval_contexts, seed=cfg.seed)
    x, c, e = (np.asarray(a, dtype=float) for a in train)
    model, metrics = fit_optimiser(domain, x, c, e, cfg, log=log, progress=progress)
    metrics.update(evaluate_optimiser(model, domain, heldout, (x, c, e), limit=cfg.eval_contexts))
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="scf-opt-"))
    name = f"opt-{domain_token(domain_name)}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-s{cfg.steps}.safetensors"
    lineage = {"domain": domain_name, "source": source.lineage(), "fossils": len(x), "split": "train: fossil_id last hex digit != 0", **(lineage or {})}
    path = save_optimiser(out / name, model, lineage=lineage, metrics=metrics)
    return OptimiserResult(path, metrics, time.perf_counter() - started)


# ------------------------------------------------------------------------ checkpoints


def save_optimiser(path: str | os.PathLike, model: LearnedOptimiser, *, lineage: dict, metrics: dict[str, float]) -> Path:
    from scf.ml.checkpoint import write_module

    return write_module(path, model, FORMAT, model.config.to_dict(), lineage=lineage, metrics={k: float(v) for k, v in metrics.items()})


def checkpoint_format(path: str | os.PathLike) -> str | None:
    """The `format` in a safetensors header (`scf-opt/1`, `scf-ebdm/1`), or None if unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except (SafetensorError, OSError):
        return None


def load_optimiser(path: str | os.PathLike) -> tuple[LearnedOptimiser, dict]:
    """(model in eval mode, metadata); safetensors only."""
    fmt = checkpoint_format(path)
    if fmt != FORMAT:
        what = "not a readable safetensors file" if fmt is None else f"format {fmt!r}"
        raise OptimiserError(f"{path} is {what}, not a learned optimiser ({FORMAT}): train one with ml.optimize.train_optimiser")
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
    meta = {k: (json.loads(v) if k in ("config", "lineage", "metrics") else v) for k, v in raw.items()}
    model = LearnedOptimiser(OptimiserConfig.from_dict(meta["config"]))
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise OptimiserError(f"{path} does not fit its config (missing {missing}, unexpected {unexpected}): the file is damaged or from another version")
    return model.eval(), meta


# ------------------------------------------------------------------------ the hook


def _check_fits(domain: Domain, model: LearnedOptimiser, path) -> None:
    d, m = len(model.config.state_lo), len(model.config.context_lo)
    if (d, m) != (domain.state_dim, domain.context_dim):
        raise OptimiserError(
            f"{path} was trained for {model.config.domain} ({d} state, {m} context values); "
            f"{domain.name} has {domain.state_dim} and {domain.context_dim}: use a checkpoint of {domain.name}"
        )


def propose(domain: Domain, contexts: np.ndarray, checkpoint_path: str | os.PathLike) -> np.ndarray:
    """Learned, repaired decisions (B, d) for `contexts` (B, m) from an optimiser checkpoint."""
    model, _ = load_optimiser(checkpoint_path)
    _check_fits(domain, model, checkpoint_path)
    return model.decide(domain, contexts)[1].states


def repair(domain: Domain, contexts: np.ndarray, states: np.ndarray) -> np.ndarray:
    """`domains.repair.repair`: the feasibility repair, without a merit order."""
    return repair_batch(domain, np.atleast_2d(contexts), np.atleast_2d(states)).states


__all__ = [
    "FORMAT", "LearnedOptimiser", "OptimiserConfig", "OptimiserError", "OptimiserResult", "PolicyNet",
    "checkpoint_format", "ebdm_decisions", "evaluate_optimiser", "fit_optimiser", "load_optimiser", "propose", "repair",
    "save_optimiser", "train_optimiser",
]
