"""Differentiable constraint penalties per domain kind, in torch, from the domain's matrices.

`raw_excess(x, c)` is (B, K): each constraint's violation in its physical unit (MW, K,
kW), zero when met; `excess` divides by each constraint's natural scale (total nominal
load, a generator's range, a line's rating, 1 K of comfort …);
`forward(x, c)` is (B,): the sum of squared excesses, the physics term of the EBDM loss.
They mirror `domains.grid.GridDomain.violations` / `domains.hvac.HvacDomain.violations`
(tests check the two agree).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from scf.domains import Domain
from scf.domains.grid import GridDomain
from scf.domains.hvac import OCCUPIED, HvacDomain


def _buf(module: nn.Module, name: str, value) -> None:
    module.register_buffer(name, torch.as_tensor(value, dtype=torch.float32), persistent=False)


class ConstraintPenalty(nn.Module):
    scale: torch.Tensor  # (K,) each constraint's natural scale, in its physical unit
    rows: torch.Tensor  # (K, d) each constraint's gradient in the state (all are linear in x)

    def raw_excess(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # (B, K) physical units
        raise NotImplementedError

    def excess(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # (B, K) dimensionless
        return self.raw_excess(x, c) / self.scale

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # (B,)
        return self.excess(x, c).square().sum(-1)

    def distance(self, x: torch.Tensor, c: torch.Tensor, half: torch.Tensor) -> torch.Tensor:  # (B, K)
        """Distance of x to each violated constraint in normalised units z = x / half: the
        excess divided by the norm of the constraint's row in z."""
        return self.raw_excess(x, c) / (self.rows * half).norm(dim=-1).clamp(min=1e-12)

    def violated(self, x: torch.Tensor, c: torch.Tensor, tol: float = 1e-2) -> torch.Tensor:  # (B,) bool
        """Whether any constraint is off by more than `tol` of its scale."""
        return (self.excess(x, c) > tol).any(-1)


class GridPenalty(ConstraintPenalty):
    """Power balance, generator limits, and branch flows (PTDF) of the limited branches."""

    def __init__(self, domain: GridDomain) -> None:
        super().__init__()
        lim = domain.limited
        _buf(self, "ptdf_gen", domain.ptdf_gen[lim])  # (L, G)
        _buf(self, "ptdf_load", domain.ptdf_load[lim])  # (L, N)
        _buf(self, "offset", domain.flow_offset[lim])  # (L,)
        _buf(self, "rate", domain.rate[lim])  # (L,)
        _buf(self, "pmin", domain.pmin)  # (G,)
        _buf(self, "pmax", domain.pmax)
        self.fixed_load = float(domain.fixed_load)
        load_scale = max(1.0, abs(domain.nominal_load.sum() + domain.fixed_load))
        span = (domain.pmax - domain.pmin).clip(min=1e-6)
        _buf(self, "scale", [load_scale, *span, *span, *domain.rate[lim]])  # MW: total load, ranges, ratings
        eye = np.eye(len(span))
        _buf(self, "rows", np.vstack([np.ones((1, len(span))), eye, eye, domain.ptdf_gen[lim]]))  # (K, G)

    def raw_excess(self, x, c):
        # x: (B, G) MW, c: (B, N) MW -> (B, 1 + 2G + L) MW
        balance = (x.sum(-1) - c.sum(-1) - self.fixed_load).abs()  # (B,)
        over = (x - self.pmax).clamp(min=0)  # (B, G)
        under = (self.pmin - x).clamp(min=0)  # (B, G)
        flow = x @ self.ptdf_gen.T - c @ self.ptdf_load.T + self.offset  # (B, L)
        line = (flow.abs() - self.rate).clamp(min=0)  # (B, L)
        return torch.cat([balance[:, None], over, under, line], dim=-1)


class HvacPenalty(ConstraintPenalty):
    """Comfort band on the next temperature (RC model) and equipment limits."""

    def __init__(self, domain: HvacDomain) -> None:
        super().__init__()
        b = domain.building
        self.zones = domain.n_zones
        _buf(self, "a_d", domain.a_d)  # (Z, Z)
        _buf(self, "b_u", domain.b_u)  # (Z, Z)
        _buf(self, "b_out", domain.b_out)  # (Z,)
        _buf(self, "occ_gain", domain.occupancy_gain)  # (Z,)
        _buf(self, "solar_gain", domain.solar_gain)  # (Z,)
        _buf(self, "heat_max", domain.heat_max)
        _buf(self, "cool_max", domain.cool_max)
        self.band_occupied, self.band_empty = b.occupied_band, b.unoccupied_band
        span = domain.heat_max + domain.cool_max
        _buf(self, "scale", [*[1.0] * (2 * self.zones), *span, *span])  # K, K, kW, kW
        eye = np.eye(self.zones)
        _buf(self, "rows", np.vstack([domain.b_u, domain.b_u, eye, eye]))  # (K, Z)

    def raw_excess(self, x, c):
        # x: (B, Z) kW, c: (B, 2 + 2Z) = [T_out, hour, occ (Z), T0 (Z)] -> (B, 4Z) K and kW
        z = self.zones
        t_out, hour, occ, t0 = c[:, 0], c[:, 1], c[:, 2 : 2 + z], c[:, 2 + z : 2 + 2 * z]
        sun = torch.sin(torch.pi * (hour - 6.0) / 12.0).clamp(min=0)  # (B,)
        gain = occ * self.occ_gain + sun[:, None] * self.solar_gain  # (B, Z)
        t_next = t0 @ self.a_d.T + (gain + x) @ self.b_u.T + t_out[:, None] * self.b_out  # (B, Z)
        occupied = occ > OCCUPIED
        lo = torch.where(occupied, self.band_occupied[0], self.band_empty[0])
        hi = torch.where(occupied, self.band_occupied[1], self.band_empty[1])
        return torch.cat(
            [
                (t_next - hi).clamp(min=0),  # K above the band
                (lo - t_next).clamp(min=0),  # K below
                (x - self.heat_max).clamp(min=0),  # kW beyond heating capacity
                (-x - self.cool_max).clamp(min=0),  # kW beyond cooling capacity
            ],
            dim=-1,
        )


def penalty_for(domain: Domain | None) -> ConstraintPenalty | None:
    """The torch penalty of `domain` (None for no domain)."""
    if domain is None:
        return None
    if isinstance(domain, GridDomain):
        return GridPenalty(domain)
    if isinstance(domain, HvacDomain):
        return HvacPenalty(domain)
    raise TypeError(f"no torch penalty for {domain.name} ({type(domain).__name__}): add one to ml/physics.py")
