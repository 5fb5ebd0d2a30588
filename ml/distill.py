"""Ternary students: distil an EBDM (or a learned optimiser's network) into BitNet b1.58
layers, judge it against its teacher on held-out data, export it packed for the edge.

    result = distill_file("teacher.safetensors", "vault/fossils", "model_zoo")   # no bus
    await distill_on_bus(bus, settings, checkpoint_id)       # `scf distill --checkpoint ID`

* The student starts as a copy of the teacher whose inner linear layers are BitLinear
  (`ml/ternary.py`); input/output projections, feature maps, norms and biases stay in
  full precision.
* EBDM: at noisy points z̃ = z + σε of the training fossils (σ drawn as in training), the
  student matches the teacher's score (σ²|s_S - s_T|²: score distillation) and energy
  (σ²(E_S - E_T)²: the network part g, the envelope being the same), plus the task loss,
  denoising score matching on the data itself; the clean states' energies at σ_min (where
  states are ranked) matched too, and optionally their ORDER (`rank_loss`, RankNet on the
  teacher's soft order) and queries between fossils (`mix`: convex mixtures of two
  fossils' states and contexts — a ternary student ranks the states it was trained on
  nearly as its teacher does and held-out ones worse, a generalisation gap that mixing
  closes on grid:case118; benchmarks/RESULTS.md), and a moving average of the latent
  weights (`ema`).
* Optimiser: the proposal network's normalised output matched on fossil contexts (and
  convex mixtures of two), plus the teacher's task loss: the learned cost of the balanced
  proposal and the constraint penalty.
* The student is frozen (scales fixed, weights snapped to γ·T), judged on held-out data
  against the teacher (`compare_ebdm`, `compare_optimiser`), and written packed
  (`export_student`: format `scf-ternary/1`, docs/distill.md).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as dt
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from scipy.stats import spearmanr
from torch import nn
from torch.nn import functional as F

from scf.bus.errors import ConfigError, SCFError
from scf.consumers.edge.ternary import FORMAT, PACKINGS, TernaryError, pack, unpack
from scf.ml.ternary import bit_layers, freeze, ternarise, ternary_share

EBDM_FORMAT = "scf-ebdm/1"
OPT_FORMAT = "scf-opt/1"
KINDS = {EBDM_FORMAT: "ebdm", OPT_FORMAT: "optimiser"}


class DistillError(SCFError):
    pass


@dataclass
class DistillConfig:
    steps: int = 2000
    batch_size: int = 256
    lr: float = 5e-4
    warmup: int = 50
    score_weight: float = 1.0  # σ²|s_S - s_T|² (EBDM)
    energy_weight: float = 1.0  # σ²(E_S - E_T)² (EBDM)
    anchor_weight: float = 1.0  # σ_min²(E_S - E_T)² on the clean states, at σ_min: where states are ranked (EBDM)
    # rank_weight 1 and mix 0.5 by default (2026-12-02): grid:case118 at hidden 512 reaches an energy rank
    # of 0.981-0.983 with them (three seeds; 0.954 without), grid:case14 0.992 (0.982 without; DSM 1.008x vs 1.001x)
    rank_weight: float = 1.0  # pairwise ranking of the batch's clean states at σ_min, RankNet with the teacher's soft order (EBDM; `rank_loss`)
    rank_temperature: float = 0.1  # τ of `rank_loss` as a share of the batch's teacher-energy standard deviation
    mix: float = 0.5  # share of each batch made of convex mixtures of two training fossils (state and context): matched, not in the task loss (EBDM)
    ema: float = 0.0  # moving average of the latent weights (decay; 0: off): the average is what is frozen and judged (EBDM)
    # on-policy matching (issue 14: decisions are made where the sampler goes, not at the fossils): a share of each batch made of
    # states the physics-guided annealed MALA sampler visits, each at its level's σ, drawn from a pool refreshed every `chain_every` steps
    # on by default since 2026-12-02 (session 8): grid:case118 at hidden 512 on an H200, paired decisions on 10,240-16,384 fresh
    # contexts: the student's own pool gives decisions -0.23, -1.00, -0.85 pp against its teacher's (three teacher/student pairs),
    # the recipe without it +1.41 and +4.04 pp, the teacher's pool +0.58 to +0.80 (docs/distill.md, benchmarks/RESULTS.md)
    chain: float = 0.25  # share of each batch from the sampler's pool: matched (score and energy), not in the task loss (EBDM; 0: off)
    chain_by: str = "student"  # whose sampler fills the pool: "student" (its own, DAgger-style), or "teacher"
    chain_every: int = 200  # steps between refreshes of the pool
    chain_contexts: int = 1024  # contexts sampled at each refresh (convex mixtures of two fossils' contexts); the pool keeps every level's state
    chain_steps: int = 8  # Langevin moves per level of the pool's sampler (the decisions' sampler uses the model's langevin_steps)
    # the pool's last-level states (σ_min: what the sampler returns; contexts: new mixtures) added to the clean states that are
    # anchored and ranked at σ_min, so that the rank loss orders states across more contexts than the fossils' (issue 14)
    # opt-in: on grid:case118 (CPU, hidden 256, 600 steps, three seeds, 2026-12-03) 0.5 gave a held-out rank of 0.971, the default 0.973
    rank_pool: float = 0.0  # rows added, as a share of the batch (EBDM; 0: off; needs chain > 0: the pool)
    # the sampler's Metropolis test (issue 14): at each batch point z (level σ), a MALA proposal p = z + ½α s_T(z) + √α ξ with
    # α = hσ², h log-uniform over the sampler's range [h₀/16, 4h₀]; the student's log acceptance ratio
    # E(z) - E(p) + log q(z|p) - log q(p|z) matched to the teacher's (squared difference, nats): energy DIFFERENCES and the scores
    # along the move, what decides which moves the chain takes
    accept_weight: float = 0.0  # weight of that match (EBDM; 0: off; costs a second teacher and student score per batch)
    ternary: bool = True  # False: the student stays full precision (a diagnostic: is a gap the recipe's or the ternary weights'?) (EBDM)
    match_weight: float = 1.0  # |π_S - π_T|² on normalised outputs (optimiser)
    task_weight: float = 0.1  # the teacher's own loss on the data (DSM; the optimiser's objective)
    packing: str = "2bit"  # 2bit | base3
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 0  # torch intra-op threads (0: torch's default)
    device: str = "cpu"  # where the EBDM student trains (cpu, cuda, cuda:N, mps); it is judged and exported on the CPU
    max_fossils: int = 50_000  # train-split fossils read
    heldout: int = 512  # held-out fossils the student is judged on
    decisions: int = 0  # held-out contexts for decision quality (0: not measured; EBDM sampling is slow)
    log_every: int = 100

    def check(self) -> DistillConfig:
        if self.packing not in PACKINGS:
            raise ConfigError(f"packing {self.packing!r} is not one of {sorted(PACKINGS)}: use --packing 2bit or base3")
        if self.steps < 0 or self.batch_size < 1:
            raise ConfigError(f"distil steps must be >= 0 and batch_size >= 1 (got {self.steps}, {self.batch_size})")
        if not 0 <= self.mix < 1:
            raise ConfigError(f"distil mix must be in [0, 1) (got {self.mix}): the share of mixed fossils in a batch")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"distil ema must be in [0, 1) (got {self.ema}): a decay such as 0.999, or 0 for none")
        if not 0 <= self.chain < 1 or self.mix + self.chain >= 1:
            raise ConfigError(f"distil chain must be in [0, 1) with mix + chain < 1 (got chain {self.chain}, mix {self.mix}): fossils keep a share of each batch")
        if self.chain_by not in ("teacher", "student"):
            raise ConfigError(f"distil chain_by {self.chain_by!r} is not 'teacher' or 'student': whose sampler fills the pool")
        if self.chain_every < 1 or self.chain_contexts < 1 or self.chain_steps < 1:
            raise ConfigError(f"distil chain_every, chain_contexts and chain_steps must be >= 1 (got {self.chain_every}, {self.chain_contexts}, {self.chain_steps})")
        if not (self.accept_weight >= 0 and math.isfinite(self.accept_weight)):
            raise ConfigError(f"distil accept_weight must be a finite number >= 0 (got {self.accept_weight}): 0 turns the acceptance match off")
        if not isinstance(self.ternary, bool):
            raise ConfigError(f"distil ternary must be true or false (got {self.ternary!r}): false keeps the student full precision (a diagnostic)")
        if not (0 <= self.rank_pool <= 4 and math.isfinite(self.rank_pool)):
            raise ConfigError(f"distil rank_pool must be in [0, 4] (got {self.rank_pool}): the pool's states ranked, a share of the batch (0: off)")
        if self.rank_pool and not self.chain:
            raise ConfigError(f"distil rank_pool {self.rank_pool} needs chain > 0: the states it ranks come from the sampler's pool")
        if not self.rank_temperature > 0 or self.rank_weight < 0:
            raise ConfigError(f"distil rank_temperature must be > 0 and rank_weight >= 0 (got {self.rank_temperature}, {self.rank_weight})")
        return self

    @classmethod
    def from_params(cls, params: dict) -> DistillConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ConfigError(f"unknown distil config keys {unknown}: use some of {sorted(names)}")
        return cls(**params).check()


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _lr_lambda(cfg: DistillConfig):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))))
    return f


# --------------------------------------------------------------------------- students


def student_keep(kind: str, model: nn.Module) -> tuple[str, ...]:
    """The linear layers kept in full precision: the input and output projections."""
    if kind == "ebdm":
        return ("inp", "head.1")
    linears = [n for n, m in model.policy.net.named_children() if isinstance(m, nn.Linear)]
    return (linears[0], linears[-1])


def make_student(teacher: nn.Module, kind: str, *, ternary: bool = True) -> nn.Module:
    """A copy of the teacher whose inner linear layers are BitLinear (latent weights = the
    teacher's: distillation starts where the teacher is). `ternary=False`: a plain copy,
    full precision throughout (a diagnostic: the recipe without the ternary weights)."""
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    root = student if kind == "ebdm" else student.policy.net
    if ternary and not ternarise(root, student_keep(kind, student)):
        raise DistillError("the teacher has no inner linear layer to ternarise: give it depth >= 1")
    if kind == "optimiser":
        student.cost.requires_grad_(False)
    return student


def _sigmas(cfg, n: int, gen: torch.Generator) -> torch.Tensor:
    """σ per example as the EBDM trains: log-normal clamped to the ladder, a share log-uniform."""
    lo, hi = math.log(cfg.sigma_min), math.log(cfg.sigma_max)
    normal = (cfg.sigma_log_mean + cfg.sigma_log_std * torch.randn(n, 1, generator=gen)).clamp(lo, hi)
    uniform = lo + (hi - lo) * torch.rand(n, 1, generator=gen)
    pick = torch.rand(n, 1, generator=gen) < cfg.sigma_uniform
    return torch.exp(torch.where(pick, uniform, normal))


def rank_loss(e_s: torch.Tensor, e_t: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Pairwise ranking of a batch's energies (B,) against the teacher's: RankNet (Burges et
    al. 2005, "Learning to Rank using Gradient Descent", ICML) with the teacher's soft order
    as the target (its pairwise probabilities p_ij = σ((E_T,i - E_T,j)/τ)), as a KL: the
    mean over all ordered pairs of BCE(σ((E_S,i - E_S,j)/τ), p_ij) - H(p_ij), 0 when the
    student orders every pair as the teacher does. τ = `temperature` × the std of the
    batch's teacher energies (detached): scale-free, so the loss weighs each pair's order,
    not how far apart the two energies are (what an MSE does: Spearman counts ranks)."""
    tau = temperature * e_t.detach().std().clamp(min=1e-12)
    target = torch.sigmoid((e_t[:, None] - e_t[None, :]).detach() / tau)
    logits = (e_s[:, None] - e_s[None, :]) / tau
    entropy = F.binary_cross_entropy(target, target, reduction="none")  # H(p): the BCE's floor
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") - entropy).mean()


def accept_loss(teacher, student, z, cz, sigma, s_t, e_t, s_s, e_s, gen: torch.Generator, step: float) -> torch.Tensor:
    """Mean squared difference (nats²) between the student's and the teacher's log
    Metropolis-Hastings ratio, log a = E(z) - E(p) + log q(z|p) - log q(p|z), of one MALA move
    from each point z (B, d) at its level σ (B, 1) (`EBDM.sample`'s move without the physics
    term, which both share): p = z + ½α s_T(z) + √α ξ, α = hσ², h log-uniform over
    [step/16, 4·step] (the sampler's adapted range). (s_t, e_t), (s_s, e_s): both models'
    score and energy at z (the student's with its graph). The ratio weighs the energy
    difference E(z) - E(p) and both scores along the move: where the student's chain would
    accept a move its teacher's refuses, or the reverse."""
    n = z.shape[0]
    h = step * torch.exp(math.log(1 / 16) + math.log(64) * torch.rand(n, 1, generator=gen)).to(z.device)
    alpha = h * sigma.square()
    prop = z + 0.5 * alpha * s_t + alpha.sqrt() * torch.randn(z.shape, generator=gen).to(z.device)
    sp_t, ep_t = (v.detach() for v in teacher.score(prop, cz, sigma))
    sp_s, ep_s = student.score(prop, cz, sigma, create_graph=True)
    a = alpha.squeeze(-1)

    def log_ratio(s0, e0, sp, ep):
        fwd = (prop - z - 0.5 * alpha * s0).square().sum(-1) / (2 * a)  # -log q(p | z)
        bwd = (z - prop - 0.5 * alpha * sp).square().sum(-1) / (2 * a)  # -log q(z | p)
        return e0 - ep + fwd - bwd

    return (log_ratio(s_s, e_s, sp_s, ep_s) - log_ratio(s_t, e_t, sp_t, ep_t)).square().mean()


class _Average:
    """An exponential moving average of a student's latent weights (its parameters), kept as a
    second student (`model`); the decay warms up as (1 + n)/(10 + n), as the EBDM's does."""

    def __init__(self, student: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(student).requires_grad_(False)
        self.decay, self.n = decay, 0
        self._src = [p for p in student.parameters()]
        self._dst = [p for p in self.model.parameters()]

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(self._dst, self._src, 1.0 - d)


@torch.no_grad()
def sampler_states(model, c: torch.Tensor, *, generator: torch.Generator, steps: int, penalty=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The states `model`'s sampler visits for contexts c (B, m) (physical units): the
    annealed, Metropolis-adjusted, physics-guided Langevin chain of `EBDM.sample` itself
    (`steps` moves per level), each level's last state kept. Returns (z (L·B, d) in
    normalised space, σ (L·B, 1)), level by level: where the decisions' sampler asks the
    energy and its score."""
    levels: list = []
    model.sample(c, generator=generator, steps=steps, penalty=penalty, levels=levels)
    n = c.shape[0]
    zs = [z for z, _ in levels]
    sig = [torch.full((n, 1), sigma, device=c.device, dtype=z.dtype) for z, sigma in levels]
    return torch.cat(zs), torch.cat(sig)


def distill_ebdm(teacher, x: np.ndarray, c: np.ndarray, config: DistillConfig, log=None, monitor=None):
    """(frozen student, training stats) from a teacher EBDM and train-split fossils (x, c).
    `monitor(step, student)`, where given, is called every `log_every` steps and after the
    last (step = steps done; the student unfrozen, on the training device); its time is not
    counted in `train_seconds` (`monitor_seconds`). With `ema`, the moving average of the
    latent weights is what the monitor sees and what is frozen and returned."""
    cfg = config.check()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    home = next(teacher.parameters()).device
    teacher = teacher.eval().to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = make_student(teacher, "ebdm", ternary=cfg.ternary).train()
    tcfg = teacher.config
    xt, ct = torch.as_tensor(x, dtype=torch.float32, device=device), torch.as_tensor(c, dtype=torch.float32, device=device)
    z_all, cz_all = teacher.normalise(xt), teacher.normalise_context(ct)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    average = _Average(student, cfg.ema) if cfg.ema else None
    stats = {"steps": 0.0}
    started = time.perf_counter()
    monitored = 0.0
    rank = torch.zeros((), device=device)
    n_mix = min(cfg.batch_size - 1, round(cfg.mix * cfg.batch_size))
    n_chain = min(cfg.batch_size - 1 - n_mix, round(cfg.chain * cfg.batch_size))
    n_own = n_mix + n_chain  # rows before this are matched only; the fossils after it are in the task loss too
    n_rank_pool = round(cfg.rank_pool * cfg.batch_size) if n_chain else 0
    pool: tuple | None = None
    pool_low: tuple | None = None
    penalty = None
    if n_chain and tcfg.domain:
        from scf import domains
        from scf.ml.physics import penalty_for

        penalty = penalty_for(domains.get(tcfg.domain))
        penalty = penalty.to(device) if penalty is not None else None
    pool_gen = torch.Generator(device=device).manual_seed(cfg.seed + 7919)
    stats["chain_seconds"] = 0.0
    with _threads(cfg.threads):
        for step in range(cfg.steps):
            if n_chain and step % cfg.chain_every == 0:  # refresh the pool: where the sampler goes for new (mixed) contexts
                t0 = time.perf_counter()
                k = cfg.chain_contexts
                a, b = (torch.randint(len(cz_all), (k,), generator=gen).to(device) for _ in range(2))
                t = torch.rand(k, 1, generator=gen).to(device)
                cp = t * ct[a] + (1 - t) * ct[b]
                walker = teacher if cfg.chain_by == "teacher" else student
                was = walker.training
                walker.eval()
                zp, sp = sampler_states(walker, cp, generator=pool_gen, steps=cfg.chain_steps, penalty=penalty)
                walker.train(was)
                pool = (zp, teacher.normalise_context(cp).repeat(len(zp) // k, 1), sp)
                pool_low = (zp[-k:], pool[1][-k:])  # the last level's states (σ_min) and their contexts
                stats["chain_seconds"] += time.perf_counter() - t0
            idx = torch.randint(len(z_all), (cfg.batch_size,), generator=gen).to(device)
            z, cz = z_all[idx], cz_all[idx]
            if n_mix:  # points between two fossils: the teacher is queried where no fossil is (held-out contexts are new too)
                other = torch.randint(len(z_all), (n_mix,), generator=gen).to(device)
                t = torch.rand(n_mix, 1, generator=gen).to(device)
                z = torch.cat([t * z[:n_mix] + (1 - t) * z_all[other], z[n_mix:]])
                cz = torch.cat([t * cz[:n_mix] + (1 - t) * cz_all[other], cz[n_mix:]])
            sigma = _sigmas(tcfg, len(z), gen).to(device)
            eps = torch.randn(z.shape, generator=gen).to(device)
            noisy = z + sigma * eps
            if n_chain:  # the sampler's states, each at its own level: queried as they are (no noise added)
                pick = torch.randint(len(pool[0]), (n_chain,), generator=gen).to(device)
                noisy = torch.cat([noisy[:n_mix], pool[0][pick], noisy[n_own:]])
                cz = torch.cat([cz[:n_mix], pool[1][pick], cz[n_own:]])
                sigma = torch.cat([sigma[:n_mix], pool[2][pick], sigma[n_own:]])
            s_t, e_t = (v.detach() for v in teacher.score(noisy, cz, sigma))
            s_s, e_s = student.score(noisy, cz, sigma, create_graph=True)
            score = (sigma * (s_s - s_t)).square().mean()
            energy = (sigma.squeeze(-1) * (e_s - e_t)).square().mean()
            task = (sigma * s_s + eps)[n_own:].square().mean()  # denoising the fossils themselves
            loss = cfg.score_weight * score + cfg.energy_weight * energy + cfg.task_weight * task
            if cfg.accept_weight:  # the Metropolis test of a MALA move from each point, as the teacher would take it
                accept = accept_loss(teacher, student, noisy, cz, sigma, s_t, e_t, s_s, e_s, gen, tcfg.langevin_step)
                loss = loss + cfg.accept_weight * accept
            if cfg.anchor_weight or cfg.rank_weight:  # the energies that rank states: clean data at σ_min (rare among the σ drawn)
                smin = tcfg.sigma_min
                if n_chain:  # fossils and their mixtures: the sampler's states are matched at their own level above
                    z, cz = torch.cat([z[:n_mix], z[n_own:]]), torch.cat([cz[:n_mix], cz[n_own:]])
                if n_rank_pool:  # and the sampler's final states for new contexts: ranked with (and against) the fossils
                    pick = torch.randint(len(pool_low[0]), (n_rank_pool,), generator=gen).to(device)
                    z, cz = torch.cat([z, pool_low[0][pick]]), torch.cat([cz, pool_low[1][pick]])
                with torch.no_grad():
                    e_t0 = teacher.energy(z, cz, smin)
                e_s0 = student.energy(z, cz, smin)
                if cfg.anchor_weight:
                    loss = loss + cfg.anchor_weight * (smin * (e_s0 - e_t0)).square().mean()
                if cfg.rank_weight:
                    rank = rank_loss(e_s0, e_t0, cfg.rank_temperature)
                    loss = loss + cfg.rank_weight * rank
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            if average is not None:
                average.update()
            if step % cfg.log_every == 0 or step == cfg.steps - 1:  # (a host sync: not every step)
                stats.update(score_match=float(score.detach()), energy_match=float(energy.detach()), dsm=float(task.detach()),
                             rank=float(rank.detach()))  # fmt: skip
                if log is not None:
                    log(f"step {step}: score {stats['score_match']:.5f} energy {stats['energy_match']:.5f} dsm {stats['dsm']:.5f}"
                        + (f" rank {stats['rank']:.5f}" if cfg.rank_weight else ""))  # fmt: skip
                if monitor is not None:
                    t0 = time.perf_counter()
                    monitor(step + 1, average.model if average is not None else student)
                    monitored += time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the time is the GPU's work, not its queue
    stats["steps"] = float(cfg.steps)
    stats["monitor_seconds"] = monitored
    stats["train_seconds"] = time.perf_counter() - started - monitored
    stats["samples_per_s"] = cfg.steps * cfg.batch_size / max(stats["train_seconds"], 1e-9)
    if average is not None:
        student = average.model
    freeze(student)
    teacher.to(home)
    return student.eval().to(home), stats


def distill_optimiser(teacher, domain, c: np.ndarray, config: DistillConfig, log=None):
    """(frozen student, stats) from a LearnedOptimiser and fossil contexts c."""
    from scf.domains.repair import batch_rows
    from scf.ml.optimize import _balance_layer, _equality_rows

    cfg = config.check()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    teacher = teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = make_student(teacher, "optimiser").train()
    contexts = np.asarray(c, dtype=float)
    a, rlo_all, rhi_all = batch_rows(domain, contexts[: min(len(contexts), 64)])
    eq = _equality_rows(a, rlo_all, rhi_all)
    a_t = torch.tensor(a[~eq], dtype=torch.float32)
    row_norm = (a_t * student.state_half).norm(dim=-1).clamp(min=1e-9)
    e_mean, e_std = (float(v) for v in student.cost.energy_scale)
    rho = teacher.config.penalty
    opt = torch.optim.AdamW(student.policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    stats: dict[str, float] = {}
    started = time.perf_counter()
    with _threads(cfg.threads):
        for step in range(cfg.steps):
            cb = contexts[rng.integers(len(contexts), size=cfg.batch_size)]
            n_mix = cfg.batch_size // 2
            t = rng.random((n_mix, 1))
            cb[:n_mix] = t * cb[:n_mix] + (1 - t) * contexts[rng.integers(len(contexts), size=n_mix)]
            ct = torch.tensor(cb, dtype=torch.float32)
            with torch.no_grad():
                _, out_t = teacher._raw(ct)
            xb, out_s = student._raw(ct)
            match = (out_s - out_t).square().sum(-1).mean()
            task = torch.zeros(())
            if cfg.task_weight:
                _, rlo, rhi = batch_rows(domain, cb)
                if eq.any():
                    xb = _balance_layer(xb, student.state_lo, student.state_hi, torch.tensor(rlo[:, eq][:, 0], dtype=torch.float32))
                energy_b = (student.cost(xb, ct).float() - e_mean) / e_std
                ax = xb @ a_t.T
                excess = (ax - torch.tensor(rhi[:, ~eq], dtype=torch.float32)).clamp(min=0) + (torch.tensor(rlo[:, ~eq], dtype=torch.float32) - ax).clamp(min=0)
                task = energy_b.mean() + rho * (excess / row_norm).square().sum(-1).mean()
            loss = cfg.match_weight * match + cfg.task_weight * task
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(student.policy.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            if log is not None and (step % cfg.log_every == 0 or step == cfg.steps - 1):
                log(f"step {step}: match {float(match.detach()):.3g} task {float(task.detach()):.5f}")
            stats.update(match=float(match.detach()), task=float(task.detach()))
    stats["steps"] = float(cfg.steps)
    stats["train_seconds"] = time.perf_counter() - started
    freeze(student)
    return student.eval(), stats


# --------------------------------------------------------------------------- judged against the teacher


def _spearman(a, b) -> float:
    rho = spearmanr(np.asarray(a, float), np.asarray(b, float)).statistic
    return float(rho) if np.isfinite(rho) else float("nan")


def compare_ebdm(teacher, student, x, c, cost=None, *, domain=None, decisions: int = 0, seed: int = 0) -> dict[str, float]:
    """Student vs teacher on the same held-out fossils (x, c, cost):

    heldout_dsm / teacher_heldout_dsm / dsm_ratio   DSM over the ladder, the same fixed noise
    energy_rank_corr        Spearman of E_S vs E_T at σ_min over the held-out states
    energy_rank_corr_noisy  the same at noisy points of every level of the ladder (mean)
    energy_cost_spearman / teacher_energy_cost_spearman   E vs the measured cost
    ternary_share           share of the student's numbers that are ternary weights
    decision_* / teacher_decision_*   with `decisions` > 0 and a domain: one physics-guided
                            sample per held-out context, repaired (ml.optimize.ebdm_decisions)"""
    from scf.ml.ebdm import heldout_dsm

    teacher.eval(), student.eval()
    dev = next(teacher.parameters()).device  # both models on one device (the CPU unless moved)
    x, c = torch.as_tensor(x, dtype=torch.float32, device=dev), torch.as_tensor(c, dtype=torch.float32, device=dev)
    z, cz = teacher.normalise(x), teacher.normalise_context(c)
    out = {"heldout_dsm": heldout_dsm(student, x, c, seed=seed), "teacher_heldout_dsm": heldout_dsm(teacher, x, c, seed=seed)}
    out["dsm_ratio"] = out["heldout_dsm"] / out["teacher_heldout_dsm"]
    smin = teacher.config.sigma_min
    _, e_t = teacher.score(z, cz, smin)
    _, e_s = student.score(z, cz, smin)
    e_s, e_t = e_s.detach().cpu(), e_t.detach().cpu()
    out["energy_rank_corr"] = _spearman(e_s, e_t)
    gen = torch.Generator().manual_seed(seed)
    rhos = []
    for sigma in teacher.config.sigmas().tolist():
        noisy = z + sigma * torch.randn(z.shape, generator=gen).to(dev)
        _, et = teacher.score(noisy, cz, sigma)
        _, es = student.score(noisy, cz, sigma)
        rhos.append(_spearman(es.detach().cpu(), et.detach().cpu()))
    out["energy_rank_corr_noisy"] = float(np.nanmean(rhos))
    if cost is not None and len(x) > 2:
        out["energy_cost_spearman"] = _spearman(e_s, cost)
        out["teacher_energy_cost_spearman"] = _spearman(e_t, cost)
    out["ternary_share"] = ternary_share(student)
    if decisions and domain is not None:
        from scf.ml.optimize import ebdm_decisions

        xs, cs = x[:decisions].double().cpu().numpy(), c[:decisions].double().cpu().numpy()
        for prefix, model in (("", student), ("teacher_", teacher)):
            out.update({prefix + k: v for k, v in ebdm_decisions(model, domain, xs, cs, seed=seed).items()})
    out["records"] = float(len(x))
    return out


def _sample_decisions(model, domain, c: np.ndarray, *, seed: int, batch: int, device) -> np.ndarray:
    """Physics-guided samples (B, d) of `model`, batch by batch, each batch's generator
    seeded `seed + batch index` on `device`: two models given the same arguments draw
    the same noise tensors (initial states, Langevin moves, Metropolis uniforms)."""
    from scf.ml.physics import penalty_for

    dev = torch.device(device)
    home = next(model.parameters()).device
    model = model.eval().to(dev)
    penalty = penalty_for(domain)
    penalty = penalty.to(dev) if penalty is not None else None
    out = []
    try:
        for b, start in enumerate(range(0, len(c), batch)):
            gen = torch.Generator(device=dev).manual_seed(seed + b)
            ct = torch.as_tensor(c[start : start + batch], dtype=torch.float32, device=dev)
            with torch.no_grad():
                out.append(model.sample(ct, generator=gen, penalty=penalty).double().cpu().numpy())
    finally:
        model.to(home)
    return np.concatenate(out) if out else np.zeros((0, domain.state_dim))


def _mean_ci(d: np.ndarray, z: float) -> tuple[float, float, float]:
    """(mean, low, high) of the paired differences d: a normal interval, z standard errors."""
    if len(d) < 2:
        return float(np.mean(d)) if len(d) else math.nan, math.nan, math.nan
    m, se = float(np.mean(d)), float(np.std(d, ddof=1) / math.sqrt(len(d)))
    return m, m - z * se, m + z * se


def _ratio_diff_ci(u: np.ndarray, a: np.ndarray, z: float) -> tuple[float, float, float]:
    """(Σu/Σa, low, high): the difference of two savings-captured ratios that share their
    denominator Σa (the achievable savings), by the delta method over contexts."""
    if len(u) < 2 or a.sum() <= 0:
        return math.nan, math.nan, math.nan
    r = float(u.sum() / a.sum())
    se = float(np.std(u - r * a, ddof=1) * math.sqrt(len(u)) / a.sum())
    return r, r - z * se, r + z * se


def verdict(low_pp: float, high_pp: float, tolerance_pp: float) -> str:
    """`met` when the interval lies within ±tolerance, `missed` when it lies outside it,
    else `undecided` (more contexts would decide)."""
    if math.isnan(low_pp) or math.isnan(high_pp):
        return "undecided"
    if -tolerance_pp <= low_pp and high_pp <= tolerance_pp:
        return "met"
    return "missed" if high_pp < -tolerance_pp or low_pp > tolerance_pp else "undecided"


def no_worse(low_pp: float, high_pp: float, tolerance_pp: float) -> str:
    """One-sided, for an interval of how much worse the student is: `met` when it lies below
    +tolerance, `missed` when above it, else `undecided`."""
    if math.isnan(low_pp) or math.isnan(high_pp):
        return "undecided"
    return "met" if high_pp <= tolerance_pp else "missed" if low_pp > tolerance_pp else "undecided"


def paired_decisions(teacher, student, domain, x: np.ndarray, c: np.ndarray, *, seed: int = 0, batch: int = 256,
                     device: str = "cpu", z: float = 1.96, tolerance_pp: float = 0.1, student_seed: int | None = None,
                     optimum: np.ndarray | None = None) -> dict[str, float | str]:  # fmt: skip
    """Decision quality of student and teacher compared PAIRED on held-out contexts c (status
    quo: the held-out states x): both sample with identical noise (the same generator seeds,
    so the same initial states, Langevin moves and Metropolis uniforms), both are repaired
    and measured against the same exact optimum, and the per-context differences give the
    difference and its confidence interval (`z` standard errors; 1.96: 95 %). The
    sampler's seed-to-seed noise, common to both, cancels in the pairs; what remains is
    where the two energies send the same trajectory.

    decision_gap_mean / teacher_decision_gap_mean      mean relative gap to the optimum
    gap_diff_pp, gap_diff_low_pp, gap_diff_high_pp     student - teacher, pp, and its CI
    decision_savings_captured / teacher_…              share of achievable savings
    savings_diff_pp, savings_diff_low_pp, savings_diff_high_pp
    gap_verdict, savings_verdict   met (CI within ±tolerance_pp), missed, undecided
    gap_no_worse, savings_no_worse  one-sided: met when the CI excludes being worse than the
                                    teacher by more than tolerance_pp, missed when the CI is all there
    `student_seed` other than `seed` unpairs the noise (the sampler's own spread: pass the
    teacher twice); `optimum`: the contexts' exact optimal costs where known
    (`domains.quality.optimum_costs`), else solved here."""
    from scf.domains.quality import optimum_costs

    c, x = np.asarray(c, dtype=float), np.asarray(x, dtype=float)
    optimum = optimum_costs(domain, c)[1] if optimum is None else np.asarray(optimum, dtype=float)
    runs = {}
    for name, model, s in (("teacher", teacher, seed), ("student", student, seed if student_seed is None else student_seed)):
        samples = _sample_decisions(model, domain, c, seed=s, batch=batch, device=device)
        runs[name] = decision_outcome(domain, c, x, samples, optimum)
    return paired_summary(runs["teacher"], runs["student"], z=z, tolerance_pp=tolerance_pp)


def decision_outcome(domain, c: np.ndarray, x: np.ndarray, samples: np.ndarray, optimum: np.ndarray):
    """(DecisionQuality, repair fallback flags (B,)) of sampled decisions `samples` (B, d) in
    contexts c: repaired, measured against the exact optimum's costs `optimum` (B,), status quo
    x. All numpy on the CPU: a process pool can take slices of the contexts (`paired_summary`
    joins them with `join_outcomes`)."""
    from scf.domains.quality import decision_quality
    from scf.domains.repair import repair_batch

    c, x = np.asarray(c, dtype=float), np.asarray(x, dtype=float)
    fixed = repair_batch(domain, c, samples)
    return decision_quality(domain, c, fixed.states, status_quo=x, optimum=np.asarray(optimum, dtype=float)), fixed.fallback


def join_outcomes(parts):
    """One (DecisionQuality, fallback flags) from `decision_outcome`'s results on consecutive
    slices of the contexts, in order."""
    from scf.domains.quality import DecisionQuality

    parts = list(parts)
    qs = [q for q, _ in parts]
    join = lambda name: np.concatenate([getattr(q, name) for q in qs])  # noqa: E731
    sq = None if any(q.status_quo is None for q in qs) else join("status_quo")
    q = DecisionQuality(feasible=join("feasible"), cost=join("cost"), optimum=join("optimum"), gap=join("gap"), status_quo=sq)
    return q, np.concatenate([f for _, f in parts])


def paired_summary(teacher, student, *, z: float = 1.96, tolerance_pp: float = 0.1) -> dict[str, float | str]:
    """`paired_decisions`' result from the two models' `decision_outcome`s on the same
    contexts (the same optimum and status quo): see `paired_decisions`."""
    (qt, ft), (qs, fs) = teacher, student
    optimum = qt.optimum
    rate = lambda f: float(np.mean(f)) if len(f) else 0.0  # noqa: E731 - RepairResult.fallback_rate
    ok = np.isfinite(optimum)
    both = ok & np.isfinite(qs.gap) & np.isfinite(qt.gap)
    gap, glo, ghi = _mean_ci(qs.gap[both] - qt.gap[both], z)
    got = lambda q: np.where(q.feasible[ok], q.status_quo[ok] - q.cost[ok], 0.0)  # noqa: E731 - as savings_captured counts
    sav, slo, shi = _ratio_diff_ci(got(qs) - got(qt), qs.status_quo[ok] - optimum[ok], z)
    out: dict[str, float | str] = {
        "contexts": float(len(optimum)), "paired_contexts": float(both.sum()),
        "decision_gap_mean": float(np.mean(qs.gap[both])) if both.any() else math.nan,
        "teacher_decision_gap_mean": float(np.mean(qt.gap[both])) if both.any() else math.nan,
        "decision_savings_captured": qs.savings_captured(), "teacher_decision_savings_captured": qt.savings_captured(),
        "decision_feasible": float(qs.feasible.mean()), "teacher_decision_feasible": float(qt.feasible.mean()),
        "decision_repair_fallback": rate(fs), "teacher_decision_repair_fallback": rate(ft),
        "gap_diff_pp": 100 * gap, "gap_diff_low_pp": 100 * glo, "gap_diff_high_pp": 100 * ghi,
        "gap_diff_sd_pp": 100 * float(np.std(qs.gap[both] - qt.gap[both], ddof=1)) if both.sum() > 1 else math.nan,
        "savings_diff_pp": 100 * sav, "savings_diff_low_pp": 100 * slo, "savings_diff_high_pp": 100 * shi,
        "identical_decisions": float(np.mean(qs.cost == qt.cost)) if len(optimum) else math.nan,  # the same cost: the same decision
    }  # fmt: skip
    out["gap_verdict"] = verdict(out["gap_diff_low_pp"], out["gap_diff_high_pp"], tolerance_pp)
    out["savings_verdict"] = verdict(out["savings_diff_low_pp"], out["savings_diff_high_pp"], tolerance_pp)
    # one-sided: the student no worse than the teacher by more than the tolerance (a higher gap, lower savings is worse)
    out["gap_no_worse"] = no_worse(out["gap_diff_low_pp"], out["gap_diff_high_pp"], tolerance_pp)
    out["savings_no_worse"] = no_worse(-out["savings_diff_high_pp"], -out["savings_diff_low_pp"], tolerance_pp)
    return out


def compare_optimiser(teacher, student, domain, heldout, limit: int = 256) -> dict[str, float]:
    """Decision quality of student and teacher on the same held-out fossils (x, c, energy):
    gap to the exact optimum after repair, savings captured; their differences in
    percentage points (`*_diff_pp`)."""
    from scf.ml.optimize import evaluate_optimiser

    s = evaluate_optimiser(student, domain, heldout, limit=limit)
    t = evaluate_optimiser(teacher, domain, heldout, limit=limit)
    out = {**s, **{"teacher_" + k: v for k, v in t.items()}}
    for k in ("decision_gap_mean", "decision_savings_captured", "decision_feasible"):
        if k in s and k in t:
            out[k + "_diff_pp"] = 100.0 * (s[k] - t[k])
    out["ternary_share"] = ternary_share(student.policy)
    return out


DECISION_RULES = ("no_worse", "within", "proven")


def decision_reasons(p: dict, tolerance_pp: float, rule: str = "no_worse") -> list[str]:
    """Why an EBDM student's PAIRED decisions (`paired_decisions`' result, judged at
    `tolerance_pp`) refuse it, by `rule`, for the gap to the optimum and the savings
    captured alike (each a 95 % interval of student - teacher over the paired contexts):

    no_worse  refused when the interval shows it worse than its teacher by more than the
              tolerance (gap higher, savings lower): the one-sided verdict `missed`
    within    refused when the interval lies outside ±tolerance on either side (the issue's
              "within 0.1 percentage point" read literally: a student deciding much
              better is refused too): the two-sided verdict `missed`
    proven    refused unless the interval shows it no worse by more than the tolerance
              (the one-sided verdict `met`: an undecided interval is refused; the
              intervals need thousands of contexts to be that narrow)

    and whatever the rule, when fewer of its repaired decisions pass the domain's check
    than its teacher's. Nothing when no context was paired (no exact optimum known)."""
    if rule not in DECISION_RULES:
        raise ConfigError(f"decision rule {rule!r} is not one of {list(DECISION_RULES)}")
    n = int(p.get("paired_contexts", 0))
    if n == 0:
        return []
    reasons = []
    what = {"gap": ("gap to the optimum", "higher"), "savings": ("share of the achievable savings captured", "lower")}
    for key, (name, worse) in what.items():
        diff, low, high = p[f"{key}_diff_pp"], p[f"{key}_diff_low_pp"], p[f"{key}_diff_high_pp"]
        one, two = p[f"{key}_no_worse"], p[f"{key}_verdict"]
        said = f"its decisions' {name} is {diff:+.3f} pp [95 % CI {low:+.3f}, {high:+.3f}] from its teacher's on {n} paired held-out contexts"
        if rule == "no_worse" and one == "missed":
            reasons.append(f"{said}: {worse}, worse by more than the allowed {tolerance_pp:g} pp")
        elif rule == "within" and two == "missed":
            reasons.append(f"{said}: outside ±{tolerance_pp:g} pp")
        elif rule == "proven" and one != "met":
            why = "worse by more than" if one == "missed" else "not shown to be within"
            reasons.append(f"{said}: {why} the allowed {tolerance_pp:g} pp on the worse side (more contexts narrow the interval)")
    if p["decision_feasible"] < p["teacher_decision_feasible"]:
        reasons.append(f"only {p['decision_feasible']:.1%} of its repaired decisions pass the domain's check (its teacher's: {p['teacher_decision_feasible']:.1%})")
    return reasons


def judge_student(student_path, teacher_path, x, c, cost, *, max_dsm_ratio: float = 1.02, min_rank_corr: float = 0.98,
                  max_decision_pp: float = 0.1, decision_contexts: int = 256, decision_rule: str = "no_worse",
                  seed: int = 0) -> tuple[dict[str, float], dict[str, float], list[str]]:  # fmt: skip
    """The verifier's check of a packed student against its teacher on the same held-out
    fossils: (student metrics, teacher metrics, reasons it fails). An EBDM student fails
    when its held-out DSM exceeds `max_dsm_ratio` × the teacher's or its energies rank the
    held-out states with Spearman < `min_rank_corr` against the teacher's, or when its
    decisions on the first `decision_contexts` held-out contexts (0: not judged), sampled
    PAIRED with its teacher's (`paired_decisions`: the same noise, repaired, against the
    same exact optimum; status quo: the held-out states), fail `decision_rule` at
    `max_decision_pp` percentage points (`decision_reasons`); an optimiser student when
    its repaired decisions on those contexts are off its teacher's by more than
    `max_decision_pp` (mean gap to the exact optimum, savings captured) or any of them
    breaks a constraint."""
    if decision_rule not in DECISION_RULES:
        raise ConfigError(f"decision rule {decision_rule!r} is not one of {list(DECISION_RULES)}")
    student, meta = load_student(student_path)
    teacher, kind, _ = teacher_file(teacher_path)
    if kind != meta.get("model"):
        return {}, {}, [f"its teacher holds the model {kind!r}, the student {meta.get('model')!r}: the student's lineage names the wrong checkpoint"]
    teacher_config = dataclasses.asdict(teacher.config) if kind == "ebdm" else teacher.config.to_dict()
    if json.loads(json.dumps(teacher_config, sort_keys=True)) != meta["config"]:
        return {}, {}, ["its config differs from its teacher's: a student keeps its teacher's architecture"]
    if kind == "optimiser":
        from scf import domains

        n = decision_contexts
        m = compare_optimiser(teacher, student, domains.get(teacher.config.domain), (x[:n], c[:n], cost[:n]), limit=n)
        student_metrics = {k: v for k, v in m.items() if not k.startswith("teacher_") and math.isfinite(v)}
        teacher_metrics = {k.removeprefix("teacher_"): v for k, v in m.items() if k.startswith("teacher_") and math.isfinite(v)}
        reasons = [f"its decisions' {k.removeprefix('decision_')} is {m[k + '_diff_pp']:+.3f} percentage points off its teacher's (allowed {max_decision_pp:g})"
                   for k in ("decision_gap_mean", "decision_savings_captured") if not abs(m.get(k + "_diff_pp", math.nan)) <= max_decision_pp]  # fmt: skip
        if not m.get("decision_feasible", 0.0) >= 1.0:
            reasons.append(f"only {m.get('decision_feasible', 0.0):.1%} of its repaired decisions pass the domain's check")
        return student_metrics, teacher_metrics, reasons
    m = compare_ebdm(teacher, student, x, c, cost, seed=seed)
    student_metrics = {k: v for k, v in m.items() if not k.startswith("teacher_") and math.isfinite(v)}
    teacher_metrics = {k.removeprefix("teacher_"): v for k, v in m.items() if k.startswith("teacher_") and math.isfinite(v)}
    reasons = []
    if not m["dsm_ratio"] <= max_dsm_ratio:
        reasons.append(f"held-out DSM {m['heldout_dsm']:.6g} is {m['dsm_ratio']:.4f}x its teacher's {m['teacher_heldout_dsm']:.6g} (allowed {max_dsm_ratio:.4g}x)")
    if not m["energy_rank_corr"] >= min_rank_corr:
        reasons.append(f"its energies rank the held-out states with Spearman {m['energy_rank_corr']:.4f} against its teacher's (needs >= {min_rank_corr:.4g})")
    if decision_contexts and teacher.config.domain:
        from scf import domains

        n = decision_contexts
        p = paired_decisions(teacher, student, domains.get(teacher.config.domain), x[:n], c[:n], seed=seed, tolerance_pp=max_decision_pp)
        for k, v in p.items():
            if isinstance(v, str) or not math.isfinite(v):
                continue
            if k.startswith("teacher_"):
                teacher_metrics[k.removeprefix("teacher_")] = v
            else:  # the differences named as an optimiser student's are (`compare_optimiser`)
                name = {"gap_diff_pp": "decision_gap_mean_diff_pp", "savings_diff_pp": "decision_savings_captured_diff_pp"}.get(k, k)
                student_metrics[name if name.startswith("decision_") else f"decision_{name}"] = v
        reasons += decision_reasons(p, max_decision_pp, decision_rule)
    return student_metrics, teacher_metrics, reasons


# --------------------------------------------------------------------------- files


def export_student(path: str | os.PathLike, student: nn.Module, *, kind: str, config: dict, packing: str,
                   lineage: dict, metrics: dict[str, float]) -> Path:  # fmt: skip
    """Write a frozen student packed (format `scf-ternary/1`); atomic. Ternary layers as
    `<name>.weight.packed` (uint8), shape and scale in the metadata's `layers`; every
    other tensor as it is (float)."""
    if packing not in PACKINGS:
        raise ConfigError(f"packing {packing!r} is not one of {sorted(PACKINGS)}")
    bits = bit_layers(student)
    if not bits:
        raise DistillError("the student has no ternary layer (distilled with ternary=false, a diagnostic): it is not exported as a student")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, layers = {}, {}
    for name, layer in bits.items():
        t, gamma = layer.quantised_weight()
        tensors[f"{name}.weight.packed"] = torch.from_numpy(pack(t.to(torch.int8).cpu().numpy(), packing))
        layers[name] = {"shape": list(t.shape), "scale": float(gamma)}
    for k, v in student.state_dict().items():
        owner = k.rsplit(".", 1)[0]
        if owner in bits and k.endswith((".weight", ".wscale")):
            continue
        tensors[k] = v.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "packing": packing,
        "bits_per_weight": str(PACKINGS[packing]),
        "activation_bits": "8",
        "model": kind,
        "layers": json.dumps(layers, sort_keys=True),
        "config": json.dumps(config, sort_keys=True),
        "lineage": json.dumps(lineage, sort_keys=True, default=str),
        "metrics": json.dumps({k: float(v) for k, v in metrics.items()}, sort_keys=True),
        "torch_version": torch.__version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path


def read_header(path: str | os.PathLike) -> dict:
    """A model file's metadata, its JSON fields decoded; reads no tensor."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise DistillError(f"{path} is not a readable safetensors model file ({exc}): give a checkpoint written by SCF") from None
    for key in ("config", "lineage", "metrics", "layers"):
        if key in raw:
            raw[key] = json.loads(raw[key])
    return raw


def load_student(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """(torch student in eval mode, metadata) from a packed file: the modules rebuilt from
    the config, the ternary weights unpacked and set to γ·T with γ fixed."""
    meta = read_header(path)
    if meta.get("format") != FORMAT:
        raise DistillError(f"{path} has format {meta.get('format')!r}, not {FORMAT!r}: give a student written by `scf distill`")
    kind = meta.get("model")
    if kind == "ebdm":
        from scf.ml.ebdm import EBDM, EBDMConfig

        model = EBDM(EBDMConfig.from_dict(meta["config"]))
        root = model
    elif kind == "optimiser":
        from scf.ml.optimize import LearnedOptimiser, OptimiserConfig

        model = LearnedOptimiser(OptimiserConfig.from_dict(meta["config"]))
        root = model.policy.net
    else:
        raise DistillError(f"{path} states model {kind!r}: only 'ebdm' and 'optimiser' students are known")
    ternarise(root, student_keep(kind, model))
    bits = bit_layers(model)
    if set(bits) != set(meta["layers"]):
        raise DistillError(f"{path}: its packed layers {sorted(meta['layers'])} do not fit its config's {sorted(bits)}: the file is damaged")
    state = load_file(str(path))
    with torch.no_grad():
        for name, info in meta["layers"].items():
            shape = [int(v) for v in info["shape"]]
            try:
                t = unpack(state.pop(f"{name}.weight.packed").numpy(), int(np.prod(shape)), meta["packing"])
            except (KeyError, TernaryError) as exc:
                raise DistillError(f"{path}: layer {name} does not unpack ({exc})") from None
            layer = bits[name]
            layer.wscale.fill_(float(info["scale"]))
            layer.weight.copy_(torch.from_numpy(t.astype(np.float32)).reshape(shape) * layer.wscale)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in bits]
    if missing or unexpected:
        raise DistillError(f"{path} does not fit its config (missing {missing}, unexpected {unexpected}): the file is damaged")
    return model.eval(), meta


def teacher_file(path: str | os.PathLike):
    """(teacher module in eval mode, kind, metadata) of an EBDM or learned-optimiser checkpoint."""
    meta = read_header(path)
    kind = KINDS.get(meta.get("format", ""))
    if kind == "ebdm":
        from scf.ml.checkpoint import load_checkpoint

        model, _ = load_checkpoint(path)
    elif kind == "optimiser":
        from scf.ml.optimize import load_optimiser

        model, _ = load_optimiser(path)
    else:
        what = "a ternary student already" if meta.get("format") == FORMAT else f"format {meta.get('format')!r}"
        raise DistillError(f"{path} is {what}: distil an EBDM ({EBDM_FORMAT}) or a learned optimiser ({OPT_FORMAT}) checkpoint")
    return model.eval(), kind, meta


# --------------------------------------------------------------------------- the whole run


@dataclass
class DistillResult:
    student: Path
    kind: str
    metrics: dict[str, float]
    teacher_bytes: int
    student_bytes: int
    duration_s: float


def distill_file(teacher_path: str | os.PathLike, data_source, out_dir: str | os.PathLike, config: DistillConfig | None = None,
                 *, teacher_ref: dict | None = None, log=None) -> DistillResult:  # fmt: skip
    """Distil the checkpoint at `teacher_path` on the train split of `data_source` (shards or
    a FossilSource), judge it on the held-out split, write the packed student under
    `out_dir`; its lineage names the teacher (`teacher_ref`: the checkpoint id, uri, sha256
    where it came from the bus)."""
    from scf import domains
    from scf.bus.events import domain_token
    from scf.ml.checkpoint import sha256_file
    from scf.ml.loader import as_source, load_arrays

    cfg = (config or DistillConfig()).check()
    started = time.perf_counter()
    teacher, kind, tmeta = teacher_file(teacher_path)
    domain_name = tmeta["config"].get("domain") or tmeta["lineage"].get("domain")
    if not domain_name:
        raise DistillError(f"{teacher_path} names no domain in its config or lineage: distil a checkpoint trained on a domain's fossils")
    source = as_source(data_source)
    x, c, e = load_arrays(source, domain=domain_name, split="train", limit=cfg.max_fossils, seed=cfg.seed)
    hx, hc, he = load_arrays(source, domain=domain_name, split="heldout", limit=cfg.heldout, seed=cfg.seed)
    domain = domains.get(domain_name)
    if kind == "ebdm":
        student, stats = distill_ebdm(teacher, x, c, cfg, log=log)
        metrics = compare_ebdm(teacher, student, hx, hc, he, domain=domain, decisions=cfg.decisions, seed=cfg.seed)
        config_dict = dataclasses.asdict(teacher.config)
    else:
        student, stats = distill_optimiser(teacher, domain, c, cfg, log=log)
        metrics = compare_optimiser(teacher, student, domain, (hx, hc, he), limit=cfg.heldout)
        config_dict = teacher.config.to_dict()
    metrics.update({f"distill_{k}": v for k, v in stats.items()})
    lineage = {
        "teacher": {"format": tmeta["format"], "sha256": sha256_file(teacher_path), "file": Path(teacher_path).name, **(teacher_ref or {})},
        "teacher_lineage": tmeta.get("lineage", {}),
        "domain": domain_name,
        "source": source.lineage(hashes=False),
        "fossils": len(x),
        "distill": dataclasses.asdict(cfg),
        "recipe": "BitNet b1.58: absmean ternary weights, per-row absmax 8-bit activations, STE (docs/distill.md)",
    }
    name = f"student-{kind}-{domain_token(domain_name)}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{cfg.packing}.safetensors"
    path = export_student(Path(out_dir) / name, student, kind=kind, config=config_dict, packing=cfg.packing, lineage=lineage,
                          metrics={k: v for k, v in metrics.items() if math.isfinite(v)})  # fmt: skip
    return DistillResult(path, kind, metrics, os.path.getsize(teacher_path), os.path.getsize(path), time.perf_counter() - started)


async def find_produced(bus, checkpoint_id: str):
    """The checkpoint.produced event of `checkpoint_id` (from CHECKPOINTS), or None."""
    from scf.bus import events as ev
    from scf.bus.codec import Codec
    from scf.bus.reader import read

    codec = Codec([ev.CheckpointProduced])
    found = None
    for msg in await read(bus, "CHECKPOINTS", "checkpoint.produced.>"):
        e = codec.decode(msg.data)
        if isinstance(e, ev.CheckpointProduced) and e.data.checkpoint_id == checkpoint_id:
            found = e
    return found


async def distill_on_bus(bus, settings, checkpoint_id: str, config: DistillConfig | None = None, *, data=None, log=None):
    """`scf distill --checkpoint ID`: fetch the teacher named by its checkpoint.produced
    event (digest checked), distil it on its domain's fossils (from the bus, or `data`),
    store the student in the artifact store and publish its checkpoint.produced (job
    `distill-<teacher id>`): the daemon verifies and promotes it like any checkpoint.
    Returns (DistillResult, the published event)."""
    import asyncio

    from scf.bus import events as ev
    from scf.bus.artifacts import open_store
    from scf.bus.ids import derived_id, subject_token

    produced = await find_produced(bus, checkpoint_id)
    if produced is None:
        raise DistillError(f"no checkpoint.produced for checkpoint {checkpoint_id} in CHECKPOINTS: check the id (`scf query` the checkpoints view)")
    t = produced.data
    work = Path(settings.path("model_zoo", "distill", subject_token(checkpoint_id)))
    work.mkdir(parents=True, exist_ok=True)
    store = open_store(bus, settings)
    teacher_path = Path(await store.get(t.uri, work / "teacher.safetensors", sha256=t.sha256, size=t.size or None))
    if data is None:
        from scf.consumers.worker import fetch_fossils

        data = work / "fossils"
        await fetch_fossils(bus, ev.DataSelection(domain=t.domain), data)
    ref = {"checkpoint_id": t.checkpoint_id, "uri": t.uri, "sha256": t.sha256, "job_id": t.job_id}
    result = await asyncio.to_thread(distill_file, teacher_path, data, work, config, teacher_ref=ref, log=log)
    ref_student = await store.put(result.student, f"{subject_token(t.domain)}/{result.student.name}", meta={"teacher": t.checkpoint_id})
    job_id = f"distill-{t.checkpoint_id}"
    event = ev.CheckpointProduced.new(
        ev.CheckpointInfo(
            checkpoint_id=derived_id("checkpoint", job_id, ref_student.sha256), job_id=job_id, domain=t.domain, uri=ref_student.uri,
            sha256=ref_student.sha256, size=ref_student.size, metrics={k: float(v) for k, v in result.metrics.items() if math.isfinite(v)},
        ),
        source=bus.source, cause=produced, id=derived_id("checkpoint.produced", job_id, ref_student.sha256),
    )  # fmt: skip
    await bus.publish(event)
    return result, event


__all__ = [
    "DistillConfig", "DistillError", "DistillResult", "compare_ebdm", "compare_optimiser", "distill_ebdm", "distill_file",
    "decision_outcome", "distill_on_bus", "distill_optimiser", "export_student", "find_produced", "join_outcomes", "load_student",
    "make_student", "paired_decisions", "accept_loss", "paired_summary",
    "no_worse", "rank_loss", "decision_reasons", "DECISION_RULES", "read_header", "student_keep", "teacher_file", "verdict",
]
