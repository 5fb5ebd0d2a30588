"""Energy-based diffusion model (EBDM) of states given their context, in one file.

The network is an energy E(x, c, σ) — a scalar per example. Its score is -∇ₓE (autograd),
so one model gives both energies (to rank states) and scores (to sample states).

* The score is computed analytically by default (`score_impl`): the MLP's input gradient
  written out as ordinary torch ops (LayerNorm, SiLU and linear backward by hand), so the
  DSM loss is a first-order graph of the parameters that torch.compile takes (it cannot
  take autograd's `create_graph` double backward); autograd's double backward stays as the
  reference and for layers it does not know (a ternary student's BitLinear).
* Inputs are normalised by the domain's bounds: z = (x - mid) / half, so z ∈ [-1, 1];
  all noise levels σ live in that normalised space. The context is normalised the same
  way and enters through random Fourier features; log σ through sinusoidal features.
* E(z, c, σ) = |z|² / (2(1 + σ²)) + g(z, c, σ) / σ, g a residual MLP (SiLU, smooth for
  double backprop). The quadratic envelope is the energy of N(0, (1 + σ²) I), which holds
  everything the data can be; it keeps the energy growing away from the data, where the
  network never trained, so samplers cannot run off.
* Training: denoising score matching (Vincent 2011), σ half log-normal (EDM's choice for
  data of std ≈ 0.5: it learns the mid levels, where mode weights are decided) and half
  log-uniform over the ladder (so the small σ the sampler ends on are trained too):
  z̃ = z + σ ε, loss = |σ·score(z̃) + ε|², plus a physics penalty on the
  denoised estimate x̂ = x̃ + σ²·score (Tweedie), the domain's constraint excess in torch.
* Sampling: annealed Langevin dynamics (Song & Ermon 2019) over a geometric ladder of L
  levels from σ_max to σ_min, Metropolis-adjusted with the model's energy (plain Langevin
  misweights modes by a few percent at affordable step counts), then a Tweedie step; with
  the domain's penalty, physics-guided (a constraint likelihood added to the energy).
* Evaluation: held-out DSM loss, constraint violation rate of samples, sliced-Wasserstein
  distance samples ↔ held-out states, Spearman correlation of E(x, c, σ_min) with cost.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from scf.bus.errors import ConfigError

SCORE_IMPLS = ("auto", "analytic", "autograd")
COMPILE_MODES = ("auto", "off", "default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")


def spearman(a, b) -> float:
    """Spearman's rank correlation of `a` and `b` (scipy.stats imported here, when first asked:
    1–1.5 s of start-up that a process training or serving a model never needs)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


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
    sigma_log_mean: float = -1.2  # training σ: log σ ~ N(mean, std²) clamped to the ladder
    sigma_log_std: float = 1.2  # (data in [-1, 1] has std ≈ 0.5, as in EDM) …
    sigma_uniform: float = 0.5  # … except this share, log-uniform over [σ_min, σ_max]
    physics_weight: float = 0.1
    # training
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 100
    grad_clip: float = 1.0
    ema: float = 0.999  # decay of the weights' moving average (0: off); warm-up (1+n)/(10+n)
    seed: int = 0
    log_every: int = 50
    # sampling and evaluation
    langevin_steps: int = 20  # moves per level
    langevin_step: float = 1.0  # step at level σ is langevin_step * σ² (adapted when metropolis)
    metropolis: bool = True  # Metropolis-adjust each move with the model's energy (MALA)
    guidance: float = 1.0  # physics guidance: constraint distance ~ N(0, (guidance·σ)²) at level σ (0: off)
    eval_records: int = 1024
    # speed (issue 16): how the score -∇E is computed, and torch.compile of the training loss
    score_impl: str = "auto"  # "analytic" (input gradient by hand), "autograd" (double backward), "auto": analytic where the layers allow
    compile: str = "auto"  # torch.compile of the training loss: "auto" (mode "default" on CUDA with the analytic score, else off), "off", or a mode

    def resolved(self) -> EBDMConfig:
        """A copy with dimensions and bounds filled from the domain (a no-op if given)."""
        cfg = dataclasses.replace(self)
        if cfg.domain is not None:
            from scf import domains

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
        if cfg.score_impl not in SCORE_IMPLS:
            raise ConfigError(f"score_impl {cfg.score_impl!r} is not one of {list(SCORE_IMPLS)}: use \"auto\" unless comparing")
        if cfg.compile not in COMPILE_MODES:
            raise ConfigError(f"compile {cfg.compile!r} is not one of {list(COMPILE_MODES)}: \"auto\", \"off\", or a torch.compile mode")
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


def _layer_norm(norm: nn.LayerNorm, h):
    """nn.LayerNorm's output and what its backward needs (x̂, 1/std), in fp32 at least
    (as autocast runs layer_norm)."""
    h = h.to(torch.promote_types(h.dtype, torch.float32))
    centred = h - h.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centred.square().mean(-1, keepdim=True) + norm.eps)
    xhat = centred * rstd
    return xhat * norm.weight + norm.bias, xhat, rstd


def _layer_norm_backward(norm: nn.LayerNorm, dy, xhat, rstd):
    """∂/∂h of LayerNorm given ∂/∂y: rstd·(ĝ - mean ĝ - x̂·mean(ĝ x̂)), ĝ = γ ⊙ dy."""
    g = dy.to(xhat.dtype) * norm.weight
    return rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))


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
        g = self.head(h).squeeze(-1)  # (B,), bf16 under autocast: energies are summed in fp32
        g = g.to(torch.promote_types(g.dtype, torch.float32))
        sigma = sigma.squeeze(-1)  # (B,)
        envelope = z.square().sum(-1) / (2 * (1 + sigma.square()))  # N(0, (1+σ²) I): data lies in [-1, 1]
        return envelope + g / sigma  # (B,)

    def score(self, z, cz, sigma, create_graph: bool = False):
        """(-∇_z E (B, d), E (B,)); `create_graph` to backpropagate through the score.
        Analytic (`analytic_score`) or by autograd's double backward, as `score_impl` says."""
        if self.analytic:
            score, e = self.analytic_score(z.detach(), cz, sigma)
            return (score if create_graph else score.detach()), e
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            e = self.energy(z, cz, sigma)
            (grad,) = torch.autograd.grad(e.sum(), z, create_graph=create_graph)
        return -grad, e

    @property
    def analytic(self) -> bool:
        """Whether `score` uses `analytic_score`: asked for (or "auto") and every layer is one
        it knows (plain nn.Linear, nn.LayerNorm, this file's Block; not e.g. a BitLinear)."""
        impl = self.config.score_impl
        return impl != "autograd" and self._plain_layers()

    def _plain_layers(self) -> bool:
        linears = [self.inp, self.head[1]] + [m for b in self.blocks for m in (b.fc1, b.cond, b.fc2)]
        norms = [self.head[0]] + [b.norm for b in self.blocks]
        return (
            type(self).energy is EBDM.energy
            and len(self.head) == 2
            and all(type(b) is Block for b in self.blocks)
            and all(type(m) is nn.Linear and m.bias is not None for m in linears)
            and all(type(m) is nn.LayerNorm and m.weight is not None and m.bias is not None for m in norms)
        )

    def analytic_score(self, z, cz, sigma):
        """(-∇_z E, E) with the input gradient written out: the forward keeps what LayerNorm
        and SiLU need, then the gradient runs back through head, blocks and input layer as
        plain matrix products and elementwise ops — differentiable in the parameters as an
        ordinary first-order graph (no `create_graph`), so torch.compile and CUDA graphs take
        the whole training step. Equal to autograd's score within rounding (tests, float64).
        Under autocast the dtypes follow autograd's: LayerNorm in fp32, the residual stream
        and its gradient in the matmuls' dtype."""
        if not self._plain_layers():
            raise TypeError("analytic_score needs plain nn.Linear/nn.LayerNorm layers: use score_impl='autograd'")
        n, d = z.shape
        sigma = torch.as_tensor(sigma, dtype=z.dtype, device=z.device).expand(n, 1)
        cond = self.condition(cz, sigma)  # (B, C)
        h = self.inp(torch.cat([z, cond], dim=-1))  # (B, H)
        saved = []
        for block in self.blocks:
            u, xhat, rstd = _layer_norm(block.norm, h)
            a = block.fc1(u) + block.cond(cond)
            gate = torch.sigmoid(a)
            h = h + block.fc2(a * gate)  # silu(a) = a·sigmoid(a)
            saved.append((xhat, rstd, a, gate))
        norm, lin = self.head
        u, xhat, rstd = _layer_norm(norm, h)
        g = lin(u).squeeze(-1)
        g = g.to(torch.promote_types(g.dtype, torch.float32))
        s1 = sigma.squeeze(-1)  # (B,)
        e = z.square().sum(-1) / (2 * (1 + s1.square())) + g / s1
        # backward: δ = ∂g/∂h, from the head down to the input layer
        delta = _layer_norm_backward(norm, lin.weight.to(xhat.dtype), xhat, rstd).to(h.dtype)  # (B, H)
        for block, (xhat, rstd, a, gate) in zip(reversed(self.blocks), reversed(saved)):
            ds = delta @ block.fc2.weight  # ∂g/∂silu(a)
            da = ds * (gate * (1 + a * (1 - gate)))  # silu'(a) = σ(a)(1 + a(1 - σ(a)))
            du = da @ block.fc1.weight
            delta = delta + _layer_norm_backward(block.norm, du, xhat, rstd).to(delta.dtype)
        dz = (delta @ self.inp.weight[:, :d]).to(z.dtype)  # (B, d)
        grad = z / (1 + sigma.square()) + dz / sigma
        return -grad, e

    # ---------------------------------------------------------------- training loss

    def loss(self, x, c, penalty: nn.Module | None = None):
        """DSM + physics on a batch of physical states x (B, d) and contexts c (B, m)."""
        sigma, eps = self.draw_noise(x.shape[0], x.shape[1], x.device, torch.promote_types(x.dtype, self.state_mid.dtype))
        return self.dsm_loss(x, c, sigma, eps, penalty)

    def draw_noise(self, n: int, d: int, device=None, dtype=torch.float32):
        """The training noise of a batch: σ (n, 1) and ε (n, d). log σ: log-normal (EDM,
        Karras et al. 2022) clamped to the ladder, except a share `sigma_uniform` drawn
        log-uniform over it, so that the ends are trained too."""
        cfg = self.config
        log_lo, log_hi = math.log(cfg.sigma_min), math.log(cfg.sigma_max)
        log_normal = (cfg.sigma_log_mean + cfg.sigma_log_std * torch.randn(n, 1, device=device)).clamp(log_lo, log_hi)
        log_uniform = log_lo + (log_hi - log_lo) * torch.rand(n, 1, device=device)
        uniform = torch.rand(n, 1, device=device) < cfg.sigma_uniform
        sigma = torch.exp(torch.where(uniform, log_uniform, log_normal))  # (n, 1)
        return sigma, torch.randn(n, d, device=device, dtype=dtype)

    def dsm_loss(self, x, c, sigma, eps, penalty: nn.Module | None = None):
        """The loss given the noise (`draw_noise`): deterministic, what torch.compile takes."""
        cfg = self.config
        z, cz = self.normalise(x), self.normalise_context(c)
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

    def guided_score(self, z, cz, c, sigma, penalty: nn.Module | None = None):
        """Score and energy at level σ, with the physics energy added when `penalty` is given:
        sum_k dist_k² / (2 (guidance·σ)²), dist_k the distance (in z) to violated constraint k
        — a Gaussian likelihood of the constraint that tightens with the noise, so it shapes
        samples as they settle, not before (the final Tweedie step uses the model alone;
        `Domain.project` then moves what still violates a constraint to the nearest
        feasible state)."""
        score, energy = self.score(z, cz, sigma)
        if penalty is None or self.config.guidance <= 0:
            return score, energy
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            dist = penalty.distance(self.denormalise(z), c, self.state_half)  # (B, K)
            phys = dist.square().sum(-1) / (2 * (self.config.guidance * sigma) ** 2)  # (B,)
            (grad,) = torch.autograd.grad(phys.sum(), z)
        return score - grad, energy + phys.detach()

    @torch.no_grad()
    def sample(self, c, generator: torch.Generator | None = None, steps: int | None = None, penalty: nn.Module | None = None,
               levels: list | None = None):
        """One state per context row c (B, m), in physical units (B, d); with `penalty`,
        physics-guided (see `guided_score`). `levels`, where given, gets each level's last
        state (normalised, (B, d)) and its σ: the states the chain visits (`ml.distill.sampler_states`).

        Annealed Langevin: from N(0, σ_max²) down the σ ladder, `steps` Langevin moves per
        level with step α = h·σ², then a Tweedie step at σ_min. With `metropolis` (the
        default) each move is Metropolis-adjusted with the model's own energy (MALA), so
        every level samples its density without the step-size bias of plain Langevin; h
        adapts between moves towards an acceptance of 0.5-0.8, within [h₀/16, 4h₀] so that
        moves stay local (where the data is sparse at small σ, the energy is not to be
        trusted across long jumps)."""
        cfg = self.config
        steps = steps or cfg.langevin_steps
        cz = self.normalise_context(c)
        n, d = c.shape[0], cfg.state_dim
        noise = lambda: torch.randn(n, d, generator=generator, device=c.device)  # noqa: E731
        uniform = lambda: torch.rand(n, generator=generator, device=c.device)  # noqa: E731
        z = noise() * cfg.sigma_max  # (n, d)
        h = cfg.langevin_step
        for sigma in cfg.sigmas().tolist():
            score, energy = self.guided_score(z, cz, c, sigma, penalty)
            for _ in range(steps):
                alpha = h * sigma**2
                prop = z + 0.5 * alpha * score + math.sqrt(alpha) * noise()
                if not cfg.metropolis:
                    z = prop
                    score, energy = self.guided_score(z, cz, c, sigma, penalty)
                    continue
                score_p, energy_p = self.guided_score(prop, cz, c, sigma, penalty)
                fwd = (prop - z - 0.5 * alpha * score).square().sum(-1) / (2 * alpha)  # -log q(prop | z)
                bwd = (z - prop - 0.5 * alpha * score_p).square().sum(-1) / (2 * alpha)  # -log q(z | prop)
                accept = torch.log(uniform()) < energy - energy_p + fwd - bwd  # (n,)
                z = torch.where(accept[:, None], prop, z)
                score = torch.where(accept[:, None], score_p, score)
                energy = torch.where(accept, energy_p, energy)
                rate = float(accept.float().mean())
                h = h * 0.8 if rate < 0.5 else (h * 1.25 if rate > 0.8 else h)
                h = min(max(h, cfg.langevin_step / 16), 4 * cfg.langevin_step)  # moves stay local: ≤ 2σ
            if levels is not None:
                levels.append((z.clone(), sigma))
        score, _ = self.score(z, cz, cfg.sigma_min)  # Tweedie with the model's score alone
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


def energy_ranks_cost(model: EBDM, domain, contexts, *, per_context: int = 8, limit: int = 32, seed: int = 0) -> float:
    """Mean Spearman correlation, within a context, between E(x, c, σ_min) and the true cost
    of `per_context` feasible states of that context (points from random feasible states
    to the optimum, from the domain's solver): does the energy rank dispatches like cost?"""
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device
    rhos = []
    for c in np.asarray(contexts, dtype=float)[:limit]:
        best = domain.reference_solution(c)
        states = np.stack([r + rng.random() * (best - r) for r in (domain.random_feasible(c, rng) for _ in range(per_context))])
        cost = [domain.cost(c, x) for x in states]
        z = model.normalise(torch.tensor(states, dtype=torch.float32, device=device))
        cz = model.normalise_context(torch.tensor(c, dtype=torch.float32, device=device)).expand(per_context, -1)
        _, energy = model.score(z, cz, model.config.sigma_min)
        rho = spearman(energy.detach().cpu().numpy(), cost)
        if np.isfinite(rho):
            rhos.append(rho)
    return float(np.mean(rhos)) if rhos else float("nan")


def evaluate_model(
    model: EBDM, x, c, cost, penalty: nn.Module | None = None, *, domain=None, seed: int = 0, tol: float = 1e-2
) -> dict[str, float]:
    """Metrics on held-out (x, c, cost) (numpy or tensors), one sample per held-out context:

    heldout_dsm            DSM loss over the ladder, fixed noise (lower is better)
    sliced_wasserstein     samples ↔ held-out states, normalised space (lower is better)
    energy_cost_spearman   E(x, c, σ_min) vs cost over the held-out fossils (across contexts)
    energy_cost_spearman_within  the same within a context (needs `domain`; see energy_ranks_cost)
    violation_rate         share of samples (physics-guided) off a constraint by more than
                           `tol` of its scale; sample_penalty their mean penalty;
                           heldout_violation_rate the same for the data itself
    violation_rate_projected  after `domain.project` (nearest feasible state; should be 0),
                           projection_distance the mean move it took, normalised units
    decision_*             the samples as decisions: repaired (domains.repair) and measured
                           against the exact optimum and the held-out states as status quo
                           (domains.quality: feasible, gap_median, gap_p95, savings_captured,
                           regret) — what promotion compares"""
    model.eval()
    device = next(model.parameters()).device
    x, c = torch.as_tensor(x, dtype=torch.float32, device=device), torch.as_tensor(c, dtype=torch.float32, device=device)
    penalty = penalty.to(device) if penalty is not None else None
    gen = torch.Generator(device=device).manual_seed(seed)
    samples = model.sample(c, generator=gen, penalty=penalty)
    _, energy = model.score(model.normalise(x), model.normalise_context(c), model.config.sigma_min)
    rho = spearman(energy.detach().cpu().numpy(), np.asarray(cost, dtype=float)) if len(x) > 2 else float("nan")
    metrics = {
        "heldout_dsm": heldout_dsm(model, x, c, seed=seed),
        "sliced_wasserstein": sliced_wasserstein(model.normalise(samples), model.normalise(x), seed=seed),
        "energy_cost_spearman": float(rho),
        "heldout_records": float(len(x)),
    }
    if domain is not None:
        metrics["energy_cost_spearman_within"] = energy_ranks_cost(model, domain, c.cpu().numpy(), seed=seed)
    if penalty is not None:
        metrics["violation_rate"] = float(penalty.violated(samples, c, tol).float().mean())
        metrics["sample_penalty"] = float(penalty(samples, c).mean())
        if domain is not None:
            x_np, c_np = samples.double().cpu().numpy(), c.double().cpu().numpy()
            fixed = torch.tensor(np.stack([domain.project(ci, xi) for ci, xi in zip(c_np, x_np)]), dtype=torch.float32, device=device)
            metrics["violation_rate_projected"] = float(penalty.violated(fixed, c, tol).float().mean())
            metrics["projection_distance"] = float((model.normalise(fixed) - model.normalise(samples)).norm(dim=-1).mean())
            metrics.update(_decisions(domain, c_np, x_np, x.double().cpu().numpy()))
        metrics["heldout_violation_rate"] = float(penalty.violated(x, c, tol).float().mean())
    return metrics


def _decisions(domain, c, samples, status_quo) -> dict[str, float]:
    """Decision quality of repaired samples (numpy in, finite floats out)."""
    from scf.domains.quality import decision_quality
    from scf.domains.repair import repair_batch

    fixed = repair_batch(domain, c, samples)
    metrics = decision_quality(domain, c, fixed.states, status_quo=status_quo).metrics("decision_")
    metrics["decision_repair_fallback"] = fixed.fallback_rate
    return {k: v for k, v in metrics.items() if math.isfinite(v)}
