"""Energy-based diffusion model (EBDM) of states given their context, in one file.

The network is an energy E(x, c, σ) — a scalar per example. Its score is -∇ₓE (autograd),
so one model gives both energies (to rank states) and scores (to sample states).

* Inputs are normalised by the domain's bounds: z = (x - mid) / half, so z ∈ [-1, 1];
  all noise levels σ live in that normalised space. The context is normalised the same
  way and enters through random Fourier features; log σ through sinusoidal features.
* E(z, c, σ) = |z|² / (2(1 + σ²)) + g(z, c, σ) / σ, g a residual MLP (SiLU, smooth for
  double backprop). The quadratic envelope is the energy of N(0, (1 + σ²) I), which holds
  everything the data can be; it keeps the energy growing away from the data, where the
  network never trained, so samplers cannot run off.
* Training: denoising score matching (Vincent 2011) over σ log-uniform in
  [σ_min, σ_max]: z̃ = z + σ ε, loss = |σ·score(z̃) + ε|², plus a physics penalty on the
  denoised estimate x̂ = x̃ + σ²·score (Tweedie), the domain's constraint excess in torch.
* Sampling: annealed Langevin dynamics (Song & Ermon 2019) over a geometric ladder of L
  levels from σ_max to σ_min, Metropolis-adjusted with the model's energy (plain Langevin
  misweights modes by a few percent at affordable step counts), then a Tweedie step.
* Evaluation: held-out DSM loss, constraint violation rate of samples, sliced-Wasserstein
  distance samples ↔ held-out states, Spearman correlation of E(x, c, σ_min) with cost.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.nn import functional as F

from bus.errors import ConfigError


@dataclass
class EBDMConfig:
    domain: str | None = None  # "grid:case118"; None for a bare vector model (give dims/bounds)
    state_dim: int = 0  # 0: from the domain
    context_dim: int = 0
    state_lo: list[float] = field(default_factory=list)  # [] : from the domain's bounds
    state_hi: list[float] = field(default_factory=list)
    context_lo: list[float] = field(default_factory=list)
    context_hi: list[float] = field(default_factory=list)
    # network
    hidden: int = 256
    depth: int = 4  # residual blocks
    fourier_features: int = 64  # random Fourier frequencies of the context
    fourier_scale: float = 1.0
    sigma_features: int = 16
    # noise
    sigma_min: float = 0.01
    sigma_max: float = 3.0
    n_levels: int = 30  # sampler ladder
    physics_weight: float = 0.1
    # training
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    # sampling and evaluation
    langevin_steps: int = 20  # moves per level
    langevin_step: float = 1.0  # step at level σ is langevin_step * σ² (adapted when metropolis)
    metropolis: bool = True  # Metropolis-adjust each move with the model's energy (MALA)
    eval_records: int = 1024

    def resolved(self) -> EBDMConfig:
        """A copy with dimensions and bounds filled from the domain (a no-op if given)."""
        cfg = dataclasses.replace(self)
        if cfg.domain is not None:
            import domains

            d = domains.get(cfg.domain)
            cfg.state_dim, cfg.context_dim = d.state_dim, d.context_dim
            if not cfg.state_lo:
                cfg.state_lo, cfg.state_hi = [list(map(float, b)) for b in d.state_bounds]
            if not cfg.context_lo:
                cfg.context_lo, cfg.context_hi = [list(map(float, b)) for b in d.context_bounds]
        if not cfg.state_lo:
            cfg.state_lo, cfg.state_hi = [-1.0] * cfg.state_dim, [1.0] * cfg.state_dim
        if not cfg.context_lo:
            cfg.context_lo, cfg.context_hi = [-1.0] * cfg.context_dim, [1.0] * cfg.context_dim
        if cfg.state_dim < 1 or len(cfg.state_lo) != cfg.state_dim or len(cfg.context_lo) != cfg.context_dim:
            raise ConfigError("EBDMConfig needs a domain, or state_dim >= 1 with bounds of matching length")
        if not 0 < cfg.sigma_min < cfg.sigma_max:
            raise ConfigError(f"need 0 < sigma_min < sigma_max (got {cfg.sigma_min}, {cfg.sigma_max})")
        return cfg

    @classmethod
    def from_params(cls, params: dict) -> EBDMConfig:
        """From a job's flat `config` map; unknown keys are an error that names them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ConfigError(f"unknown EBDM config keys {unknown}: use some of {sorted(names)}")
        return cls(**{k: v for k, v in params.items() if v is not None})

    @classmethod
    def from_dict(cls, data: dict) -> EBDMConfig:
        """From a saved config; keys this version does not know are dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def sigmas(self) -> torch.Tensor:
        """The sampler's ladder, σ_max down to σ_min (L,)."""
        return torch.exp(torch.linspace(math.log(self.sigma_max), math.log(self.sigma_min), self.n_levels))


class Block(nn.Module):
    """Pre-norm residual MLP block, conditioned by adding a projection of the condition."""

    def __init__(self, hidden: int, cond_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.cond = nn.Linear(cond_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h, cond):  # h: (B, H), cond: (B, C)
        return h + self.fc2(F.silu(self.fc1(self.norm(h)) + self.cond(cond)))


class EBDM(nn.Module):
    def __init__(self, config: EBDMConfig) -> None:
        super().__init__()
        cfg = self.config = config.resolved()
        d, m, f = cfg.state_dim, cfg.context_dim, cfg.fourier_features if cfg.context_dim else 0
        lo, hi = torch.tensor(cfg.state_lo), torch.tensor(cfg.state_hi)
        self.register_buffer("state_mid", (lo + hi) / 2)  # (d,)
        self.register_buffer("state_half", ((hi - lo) / 2).clamp(min=1e-6))  # (d,)
        clo, chi = torch.tensor(cfg.context_lo).reshape(m), torch.tensor(cfg.context_hi).reshape(m)
        self.register_buffer("context_mid", (clo + chi) / 2)  # (m,)
        self.register_buffer("context_half", ((chi - clo) / 2).clamp(min=1e-6))  # (m,)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.register_buffer("fourier", torch.randn(m, f, generator=gen) * cfg.fourier_scale)  # (m, f)
        cond_dim = m + 2 * f + 2 * cfg.sigma_features + 1
        self.inp = nn.Linear(d + cond_dim, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg.hidden, cond_dim) for _ in range(cfg.depth))
        self.head = nn.Sequential(nn.LayerNorm(cfg.hidden), nn.Linear(cfg.hidden, 1))

    # ---------------------------------------------------------------- normalisation

    def normalise(self, x):  # (B, d) physical -> (B, d) in [-1, 1]
        return (x - self.state_mid) / self.state_half

    def denormalise(self, z):
        return z * self.state_half + self.state_mid

    def normalise_context(self, c):  # (B, m)
        return (c - self.context_mid) / self.context_half

    # ---------------------------------------------------------------- energy and score

    def condition(self, cz, sigma):  # cz: (B, m), sigma: (B, 1) -> (B, C)
        cfg = self.config
        proj = 2 * math.pi * cz @ self.fourier  # (B, f)
        u = (torch.log(sigma) - math.log(cfg.sigma_min)) / (math.log(cfg.sigma_max) - math.log(cfg.sigma_min))  # (B, 1)
        k = torch.arange(1, cfg.sigma_features + 1, device=u.device, dtype=u.dtype)  # (S,)
        return torch.cat([cz, proj.sin(), proj.cos(), torch.sin(math.pi * k * u), torch.cos(math.pi * k * u), u], dim=-1)

    def energy(self, z, cz, sigma):
        """E(z, c, σ) (B,), all in normalised space; sigma: float or (B, 1)."""
        sigma = torch.as_tensor(sigma, dtype=z.dtype, device=z.device).expand(z.shape[0], 1)
        cond = self.condition(cz, sigma)  # (B, C)
        h = self.inp(torch.cat([z, cond], dim=-1))  # (B, H)
        for block in self.blocks:
            h = block(h, cond)
        sigma = sigma.squeeze(-1)  # (B,)
        envelope = z.float().square().sum(-1) / (2 * (1 + sigma.square()))  # N(0, (1+σ²) I): data lies in [-1, 1]
        return envelope + self.head(h).squeeze(-1).float() / sigma  # (B,)

    def score(self, z, cz, sigma, create_graph: bool = False):
        """(-∇_z E (B, d), E (B,)); `create_graph` to backpropagate through the score."""
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            e = self.energy(z, cz, sigma)
            (grad,) = torch.autograd.grad(e.sum(), z, create_graph=create_graph)
        return -grad, e

    # ---------------------------------------------------------------- training loss

    def loss(self, x, c, penalty: nn.Module | None = None):
        """DSM + physics on a batch of physical states x (B, d) and contexts c (B, m)."""
        cfg = self.config
        z, cz = self.normalise(x), self.normalise_context(c)
        log_lo, log_hi = math.log(cfg.sigma_min), math.log(cfg.sigma_max)
        sigma = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(z.shape[0], 1, device=z.device))  # (B, 1)
        eps = torch.randn_like(z)
        noisy = z + sigma * eps
        score, _ = self.score(noisy, cz, sigma, create_graph=self.training)
        dsm = (sigma * score + eps).square().mean()
        parts = {"dsm": dsm.detach()}
        loss = dsm
        if penalty is not None and cfg.physics_weight > 0:
            x_hat = self.denormalise(noisy + sigma.square() * score)  # (B, d) physical
            phys = penalty(x_hat, c).mean()
            parts["physics"] = phys.detach()
            loss = loss + cfg.physics_weight * phys
        return loss, parts

    # ---------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample(self, c, generator: torch.Generator | None = None, steps: int | None = None):
        """One state per context row c (B, m), in physical units (B, d).

        Annealed Langevin: from N(0, σ_max²) down the σ ladder, `steps` Langevin moves per
        level with step α = h·σ², then a Tweedie step at σ_min. With `metropolis` (the
        default) each move is Metropolis-adjusted with the model's own energy (MALA), so
        every level samples its density without the step-size bias of plain Langevin; h
        adapts between moves towards an acceptance of 0.5-0.8."""
        cfg = self.config
        steps = steps or cfg.langevin_steps
        cz = self.normalise_context(c)
        n, d = c.shape[0], cfg.state_dim
        noise = lambda: torch.randn(n, d, generator=generator, device=c.device)  # noqa: E731
        uniform = lambda: torch.rand(n, generator=generator, device=c.device)  # noqa: E731
        z = noise() * cfg.sigma_max  # (n, d)
        h = cfg.langevin_step
        for sigma in cfg.sigmas().tolist():
            score, energy = self.score(z, cz, sigma)
            for _ in range(steps):
                alpha = h * sigma**2
                prop = z + 0.5 * alpha * score + math.sqrt(alpha) * noise()
                if not cfg.metropolis:
                    z = prop
                    score, energy = self.score(z, cz, sigma)
                    continue
                score_p, energy_p = self.score(prop, cz, sigma)
                fwd = (prop - z - 0.5 * alpha * score).square().sum(-1) / (2 * alpha)  # -log q(prop | z)
                bwd = (z - prop - 0.5 * alpha * score_p).square().sum(-1) / (2 * alpha)  # -log q(z | prop)
                accept = torch.log(uniform()) < energy - energy_p + fwd - bwd  # (n,)
                z = torch.where(accept[:, None], prop, z)
                score = torch.where(accept[:, None], score_p, score)
                energy = torch.where(accept, energy_p, energy)
                rate = float(accept.float().mean())
                h = h * 0.8 if rate < 0.5 else (h * 1.25 if rate > 0.8 else h)
        score, _ = self.score(z, cz, cfg.sigma_min)
        return self.denormalise(z + cfg.sigma_min**2 * score)


# ------------------------------------------------------------------------ evaluation


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between point sets a (n, d) and b (k, d)."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=gen)
    dirs = (dirs / dirs.norm(dim=0, keepdim=True)).to(a)
    pa, pb = (a @ dirs).sort(dim=0).values, (b @ dirs).sort(dim=0).values  # (n, P), (k, P)
    q = torch.linspace(0, 1, max(len(a), len(b)), device=a.device)
    qa = torch.quantile(pa, q, dim=0) if len(a) != len(q) else pa
    qb = torch.quantile(pb, q, dim=0) if len(b) != len(q) else pb
    return float((qa - qb).square().mean().sqrt())


@torch.no_grad()
def heldout_dsm(model: EBDM, x, c, seed: int = 0, repeats: int = 4) -> float:
    """DSM loss on held-out data at every level of the ladder, with fixed noise."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    z, cz = model.normalise(x), model.normalise_context(c)
    total = 0.0
    sigmas = model.config.sigmas().tolist()
    for sigma in sigmas:
        for _ in range(repeats):
            eps = torch.randn(z.shape, generator=gen, device=z.device)
            score, _ = model.score(z + sigma * eps, cz, sigma)
            total += float((sigma * score + eps).square().mean())
    return total / (len(sigmas) * repeats)


def evaluate_model(model: EBDM, x, c, cost, penalty: nn.Module | None = None, *, seed: int = 0, tol: float = 1e-2) -> dict[str, float]:
    """Metrics on held-out (x, c, cost) (numpy or tensors): heldout_dsm, violation_rate of
    one sample per held-out context (a constraint off by more than `tol` of its scale),
    sliced_wasserstein (normalised space), energy_cost_spearman."""
    model.eval()
    device = next(model.parameters()).device
    x, c = torch.as_tensor(x, dtype=torch.float32, device=device), torch.as_tensor(c, dtype=torch.float32, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    samples = model.sample(c, generator=gen)
    _, energy = model.score(model.normalise(x), model.normalise_context(c), model.config.sigma_min)
    rho = spearmanr(energy.detach().cpu().numpy(), np.asarray(cost, dtype=float)).statistic if len(x) > 2 else float("nan")
    metrics = {
        "heldout_dsm": heldout_dsm(model, x, c, seed=seed),
        "sliced_wasserstein": sliced_wasserstein(model.normalise(samples), model.normalise(x), seed=seed),
        "energy_cost_spearman": float(rho),
        "heldout_records": float(len(x)),
    }
    if penalty is not None:
        penalty = penalty.to(device)
        metrics["violation_rate"] = float(penalty.violated(samples, c, tol).float().mean())
        metrics["sample_penalty"] = float(penalty(samples, c).mean())
        metrics["heldout_violation_rate"] = float(penalty.violated(x, c, tol).float().mean())
    return metrics
