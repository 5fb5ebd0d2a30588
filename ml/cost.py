"""A cost model learned from fossils: E(c, x) ≈ the measured energy of state x in context c.

The EBDM learns where states *are* (the data density); to decide, a model must know what
states *cost*. Fossils carry the measured energy of every observed state, so the cost is
learned by regression on them — no access to the domain's cost function or solver.

Form (an additive model over devices, as energy is: each generator's fuel, each zone's
HVAC electricity), in normalised units z = (x - mid) / half ∈ [-1, 1]:

    E(c, x) = Σ_j Σ_k w_jk(c) φ_k(z_j) + g(c)
    φ(z)    = [z, z², relu(z - t_1), …, relu(z - t_K)]     (knots t evenly over [-1, 1])
    w(c)    = W0 + Σ_r p_r(c) W_r                           (p: the context's top principal
                                                              components, `context_rank`)
    g(c)    = v · [c, c², cos/sin(2π c F)]                  (random Fourier features)

The quadratic terms hold a generator's quadratic cost curve exactly, the hinge terms any
piecewise-linear curve (HVAC's heating / cooling COP kink) to the knot spacing, and the
low-rank context modulation lets a device's curve move with the context. The model is
linear in its weights, so fitting is one ridge regression (float64 normal equations):
the global least-squares optimum in seconds, deterministic — no SGD noise in the
marginal costs the optimiser follows. Because Σ x = demand on the feasible set, a linear
term common to all generators is not identifiable from feasible data; it does not need to
be: every feasible state of a context pays it alike, so the ranking and the minimiser over
the feasible set are unaffected.

**Conservatism away from the data** (`conservative` > 0; offline model-based optimisation,
COMs, warns that a proposal network trained against a learned cost exploits its errors
where there are no data). Each device's curve is identified only where that device has
been observed: its features ψ_j = [φ(z_j), φ(z_j) p(c)] (F (1 + r) values) span a region
in the fossils. In the principal axes of their second moment G_j = V Λ Vᵀ, whitened,
s_j = ψ_j V (Λ + ε)^-½, the fossils cover a box [lo_j, hi_j] per axis; an axis the fossils
never move along (a hinge past the highest output a generator was ever run at) has
lo = hi = 0 and a scale of ε^-½. `support_penalty` is Σ_j Σ_k relu(s_jk − hi_jk)² +
relu(lo_jk − s_jk)²: zero everywhere inside the fossils' box (in-distribution decisions are
unchanged), quadratic outside, steep along directions without data. The proposal network's
training adds `conservative` × it to the normalised learned cost (`ml.optimize`). Set at fit
time and kept in memory only (decisions do not need it, checkpoints do not carry it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class CostConfig:
    knots: int = 9  # hinge knots over [-1, 1] (odd: one at the middle of the bounds)
    context_rank: int = 1  # principal components of the context that modulate the device curves
    fourier: int = 32  # random Fourier features of the context in g(c)
    ridge: float = 1e-6  # relative to the mean diagonal of the normal equations
    seed: int = 0
    conservative: float = 0.0  # weight of the distance-to-support penalty in the proposal network's training (0: off)
    support_ridge: float = 1e-3  # ε: added to the eigenvalues of each device's feature second moment (basis units)
    support_margin: float = 0.3  # the fossils' box widened by this share of its width on each side

    def to_dict(self) -> dict:
        return asdict(self)


class CostModel(nn.Module):
    """E(c, x) in the domain's energy unit; batched: x (B, d), c (B, m) -> (B,)."""

    def __init__(self, state_lo, state_hi, context_lo, context_hi, config: CostConfig | None = None) -> None:
        super().__init__()
        cfg = self.config = config or CostConfig()
        lo, hi = torch.as_tensor(state_lo, dtype=torch.float64), torch.as_tensor(state_hi, dtype=torch.float64)
        clo, chi = torch.as_tensor(context_lo, dtype=torch.float64), torch.as_tensor(context_hi, dtype=torch.float64)
        d, m = len(lo), len(clo)
        self.register_buffer("state_mid", (lo + hi) / 2)
        self.register_buffer("state_half", ((hi - lo) / 2).clamp(min=1e-9))
        self.register_buffer("context_mid", (clo + chi) / 2)
        self.register_buffer("context_half", ((chi - clo) / 2).clamp(min=1e-9))
        self.register_buffer("knots", torch.linspace(-1, 1, cfg.knots, dtype=torch.float64) if cfg.knots else torch.zeros(0, dtype=torch.float64))
        gen = torch.Generator().manual_seed(cfg.seed)
        self.register_buffer("fourier", torch.randn(m, cfg.fourier, generator=gen, dtype=torch.float64))
        self.register_buffer("pcs", torch.zeros(m, cfg.context_rank, dtype=torch.float64))  # set by fit
        n_basis = 2 + cfg.knots
        self.register_buffer("weights", torch.zeros(d * n_basis * (1 + cfg.context_rank) + 2 * m + 2 * cfg.fourier + 1, dtype=torch.float64))
        self.register_buffer("energy_scale", torch.ones(2, dtype=torch.float64))  # (mean, std) of the fitted energies
        k = n_basis * (1 + cfg.context_rank)
        # the data's support per device (fit; not saved: only training uses it)
        self.register_buffer("support_proj", torch.zeros(d, k, k, dtype=torch.float64), persistent=False)
        self.register_buffer("support_lo", torch.full((d, k), -math.inf, dtype=torch.float64), persistent=False)
        self.register_buffer("support_hi", torch.full((d, k), math.inf, dtype=torch.float64), persistent=False)
        self.state_dim, self.context_dim, self.n_basis = d, m, n_basis

    # ---------------------------------------------------------------- features

    def _basis(self, z):  # (B, d) -> (B, d, F)
        parts = [z[..., None], z[..., None].square()]
        if len(self.knots):
            parts.append(torch.relu(z[..., None] - self.knots))
        return torch.cat(parts, dim=-1)

    def features(self, x, c):  # physical (B, d), (B, m) -> (B, P)
        z = (x.to(self.weights.dtype) - self.state_mid) / self.state_half
        cz = (c.to(self.weights.dtype) - self.context_mid) / self.context_half
        basis = self._basis(z).flatten(1)  # (B, d F)
        mod = [basis] + [basis * p[:, None] for p in (cz @ self.pcs).unbind(-1)]
        proj = 2 * math.pi * cz @ self.fourier
        ones = torch.ones(len(cz), 1, dtype=cz.dtype, device=cz.device)
        return torch.cat([*mod, cz, cz.square(), proj.cos(), proj.sin(), ones], dim=-1)

    def forward(self, x, c):  # (B,) energy
        return self.features(x, c) @ self.weights

    def device_weights(self, c):
        """The per-device curve coefficients w(c) (B, d, F) in contexts c (B, m): with them,
        `device_energy` evaluates the state-dependent part of E (all but g(c)) cheaply."""
        cz = (c.to(self.weights.dtype) - self.context_mid) / self.context_half
        r, d, f = self.config.context_rank, self.state_dim, self.n_basis
        w = self.weights[: d * f * (1 + r)].view(1 + r, d, f)
        return w[0] + torch.einsum("br,rdf->bdf", cz @ self.pcs, w[1:])

    def device_energy(self, x, weights):
        """Σ_j Σ_k w_jk φ_k(z_j) for states x (B, K, d) under `device_weights` (B, d, F) -> (B, K):
        E(c, x) minus g(c), which does not depend on the state."""
        z = (x.to(self.weights.dtype) - self.state_mid) / self.state_half
        return (self._basis(z) * weights[:, None]).sum((-1, -2))

    def device_features(self, x, c):  # physical (B, d), (B, m) -> (B, d, F (1 + r)): ψ_j
        z = (x.to(self.weights.dtype) - self.state_mid) / self.state_half
        cz = (c.to(self.weights.dtype) - self.context_mid) / self.context_half
        basis = self._basis(z)  # (B, d, F)
        p = cz @ self.pcs  # (B, r)
        return torch.cat([basis] + [basis * p[:, i, None, None] for i in range(p.shape[1])], dim=-1)

    def support_coords(self, x, c):
        """s_j (B, d, K): each device's features in the whitened principal axes of the fossils'."""
        return torch.einsum("bdk,dkl->bdl", self.device_features(x, c), self.support_proj)

    def support_penalty(self, x, c):
        """Σ_j Σ_k relu(s − hi)² + relu(lo − s)² (B,): 0 inside the fossils' box, growing outside."""
        s = self.support_coords(x, c)
        return ((s - self.support_hi).clamp(min=0).square() + (self.support_lo - s).clamp(min=0).square()).sum((-1, -2))

    @torch.no_grad()
    def fit_support(self, x, c) -> dict[str, float]:
        """Each device's whitened principal axes over the fossils (x, c) and the box the
        fossils cover in them (`support_penalty` is zero inside it)."""
        x, c = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(c, dtype=torch.float64)
        psi = self.device_features(x, c)  # (N, d, K)
        gram = torch.einsum("ndk,ndl->dkl", psi, psi) / max(len(psi), 1)
        lam, vec = torch.linalg.eigh(gram)
        self.support_proj.copy_(vec / (lam.clamp(min=0) + self.config.support_ridge).sqrt()[:, None, :])
        s = self.support_coords(x, c)
        lo, hi = s.min(0).values, s.max(0).values
        pad = self.config.support_margin * (hi - lo)
        self.support_lo.copy_(lo - pad)
        self.support_hi.copy_(hi + pad)
        empty = (lam <= 1e-9 * lam.amax(-1, keepdim=True)).sum()  # axes the fossils never move along
        return {"cost_support_empty_axes": float(empty)}

    def marginal(self, x, c):
        """dE/dx (B, d): each variable's learned marginal cost (the repair's merit order)."""
        with torch.enable_grad():
            x = x.detach().to(self.weights.dtype).requires_grad_(True)
            (grad,) = torch.autograd.grad(self(x, c).sum(), x)
        return grad

    # ---------------------------------------------------------------- fitting

    @torch.no_grad()
    def fit(self, x, c, energy) -> dict[str, float]:
        """Ridge regression of `energy` on the features; returns the fit's metrics
        (in-sample RMSE relative to the energies' std, and R²)."""
        x, c = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(c, dtype=torch.float64)
        y = torch.as_tensor(energy, dtype=torch.float64)
        if self.config.context_rank:
            cz = (c - self.context_mid) / self.context_half
            centred = cz - cz.mean(0)
            _, _, vh = torch.linalg.svd(centred, full_matrices=False)
            k = min(self.config.context_rank, vh.shape[0])
            self.pcs.zero_()
            self.pcs[:, :k] = vh[:k].T
        mean, std = float(y.mean()), float(y.std().clamp(min=1e-9))
        self.energy_scale.copy_(torch.tensor([mean, std], dtype=torch.float64))
        target = (y - mean) / std
        phi = self.features(x, c)  # (N, P)
        scale = phi.square().mean(0).sqrt().clamp(min=1e-12)  # column scaling for conditioning
        phi_s = phi / scale
        gram = phi_s.T @ phi_s
        gram += self.config.ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
        w = torch.linalg.solve(gram, phi_s.T @ target) / scale
        self.weights.copy_(w * std)
        self.weights[-1] += mean
        resid = self(x, c) - y
        out = {"cost_fit_rmse_rel": float(resid.square().mean().sqrt() / std), "cost_fit_r2": float(1 - resid.var() / y.var())}
        if self.config.conservative > 0:
            out.update(self.fit_support(x, c))
        return out


__all__ = ["CostConfig", "CostModel"]
