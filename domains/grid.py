"""DC power networks from MATPOWER cases: generator dispatch against bus loads.

    context c: the loads (MW) at the buses whose nominal load is non-zero
    state   x: the in-service generators' outputs Pg (MW)
    energy   : generation cost sum_g poly_g(Pg_g) ($/h), the case's polynomial gencost

DC power flow as MATPOWER builds it (makeBdc): branch susceptance b = 1 / (x * tap);
with the reference bus as slack, flows are F = PTDF @ (Cg Pg - Pd - Gs) + shift terms.
Constraints: power balance sum Pg = sum Pd + sum Gs; Pmin <= Pg <= Pmax; |F| <= rateA
(rateA = 0 means unlimited); with a previous dispatch, |Pg - Pg_prev| <= ramp (the case's
ramp_30 when given, else `DEFAULT_RAMP_FRACTION` of Pmax: MATPOWER's IEEE cases ship none).

Reference solution: DC-OPF as a convex QP (quadratic costs, diagonal Hessian) solved by
HiGHS, in the PTDF formulation: one balance row and one row per limited branch.
"""

from __future__ import annotations

import datetime as dt

import numpy as np

from scf.domains import matpower as mp
from scf.domains.base import Domain, DomainError, Infeasible, Violation
from scf.domains.solvers import HighsProgram

TOL_MW = 1e-3  # 1 kW: below this a balance or limit excess is solver round-off
DEFAULT_RAMP_FRACTION = 0.3  # of Pmax per step, where the case gives no ramp_30


class GridDomain(Domain):
    kind = "grid"
    verifier = "grid.dc_check"
    state_unit = "MW"
    energy_unit = "$/h"
    sample_interval = dt.timedelta(minutes=5)

    def __init__(self, case: mp.MatpowerCase, name: str | None = None) -> None:
        self.name = name or f"grid:{case.name}"
        self.case = case
        bus, base = case.bus, case.base_mva
        gen = case.gen[case.gen[:, mp.GEN_STATUS] > 0]
        gencost = case.gencost[: len(case.gen)][case.gen[:, mp.GEN_STATUS] > 0]
        branch = case.branch[case.branch[:, mp.BR_STATUS] > 0]
        n_bus, n_gen, n_br = len(bus), len(gen), len(branch)
        index = {int(b): i for i, b in enumerate(bus[:, mp.BUS_I])}

        # costs: polynomial (model 2), at most quadratic for the QP
        if np.any(gencost[:, mp.MODEL] != mp.POLYNOMIAL):
            raise DomainError(f"{self.name}: piecewise-linear gencost (model 1) is not supported; use polynomial costs (model 2)")
        ncost = gencost[:, mp.NCOST].astype(int)
        if ncost.max() > 3:
            raise DomainError(f"{self.name}: gencost of degree {ncost.max() - 1} > 2; DC-OPF here needs quadratic costs")
        self.cost_coef = np.zeros((n_gen, 3))  # columns c2, c1, c0
        for g in range(n_gen):
            self.cost_coef[g, 3 - ncost[g] :] = gencost[g, mp.COST : mp.COST + ncost[g]]

        # DC network (MATPOWER makeBdc)
        f = np.array([index[int(v)] for v in branch[:, mp.F_BUS]])
        t = np.array([index[int(v)] for v in branch[:, mp.T_BUS]])
        tap = np.where(branch[:, mp.TAP] == 0, 1.0, branch[:, mp.TAP])
        b = 1.0 / (branch[:, mp.BR_X] * tap)
        cft = np.zeros((n_br, n_bus))
        cft[np.arange(n_br), f], cft[np.arange(n_br), t] = 1.0, -1.0
        bf = b[:, None] * cft
        bbus = cft.T @ bf
        pf_shift = -b * np.deg2rad(branch[:, mp.SHIFT])  # p.u.
        ref = np.flatnonzero(bus[:, mp.BUS_TYPE] == mp.REF)
        slack = int(ref[0]) if len(ref) else 0
        keep = np.delete(np.arange(n_bus), slack)
        ptdf = np.zeros((n_br, n_bus))
        ptdf[:, keep] = np.linalg.solve(bbus[np.ix_(keep, keep)], bf[:, keep].T).T  # Bf B^-1 (B symmetric)
        self.ptdf = ptdf  # (n_branch, n_bus): MW of flow per MW injected (withdrawn at slack)

        gen_bus = np.array([index[int(v)] for v in gen[:, mp.GEN_BUS]])
        pd = bus[:, mp.PD]
        self.load_buses = np.flatnonzero(pd != 0)
        gs = bus[:, mp.GS]  # shunt conductance: MW consumed at V = 1 p.u.
        fixed = gs + base * (cft.T @ pf_shift)  # MW withdrawn at each bus that no context sets
        self.fixed_load = float(gs.sum())  # cft.T @ pf_shift sums to zero
        self.ptdf_gen = ptdf[:, gen_bus]  # (n_branch, n_gen)
        self.ptdf_load = ptdf[:, self.load_buses]  # (n_branch, n_load)
        self.flow_offset = base * pf_shift - ptdf @ fixed  # (n_branch,)
        self.rate = np.where(branch[:, mp.RATE_A] > 0, branch[:, mp.RATE_A], np.inf)
        self.limited = np.flatnonzero(np.isfinite(self.rate))
        self.branch_labels = [f"{int(a)}-{int(z)}" for a, z in branch[:, [mp.F_BUS, mp.T_BUS]]]

        self.pmin, self.pmax = gen[:, mp.PMIN].copy(), gen[:, mp.PMAX].copy()
        self.ramp = np.where(gen[:, mp.RAMP_30] > 0, gen[:, mp.RAMP_30], DEFAULT_RAMP_FRACTION * self.pmax)
        self.nominal_load = pd[self.load_buses].copy()
        self.gen_bus_ids = gen[:, mp.GEN_BUS].astype(int)
        self.state_names = tuple(f"Pg{g + 1}@bus{int(bid)}" for g, bid in enumerate(self.gen_bus_ids))
        self.context_names = tuple(f"Pd@bus{int(bus[i, mp.BUS_I])}" for i in self.load_buses)
        self.state_bounds = (self.pmin.copy(), self.pmax.copy())
        nominal = self.nominal_load
        self.context_bounds = (np.minimum(0.5 * nominal, 1.5 * nominal), np.maximum(0.5 * nominal, 1.5 * nominal))

        # feasible polytope rows: [balance; limited branch flows] = A @ Pg
        self._rows_a = np.vstack([np.ones((1, n_gen)), self.ptdf_gen[self.limited]])
        self._opf: HighsProgram | None = None

    # ------------------------------------------------------------------ physics

    def flows(self, context, state) -> np.ndarray:
        """Branch flows (MW, from -> to); batched over leading axes."""
        return np.asarray(state) @ self.ptdf_gen.T - np.asarray(context) @ self.ptdf_load.T + self.flow_offset

    simulate = flows

    def demand(self, context) -> np.ndarray:
        return np.asarray(context).sum(-1) + self.fixed_load

    def cost(self, context, state) -> float:
        x = np.asarray(state, dtype=float)
        c2, c1, c0 = self.cost_coef.T
        return float(np.sum((c2 * x + c1) * x + c0))

    def energy_range(self) -> tuple[float, float]:
        """Each generator's quadratic cost over [Pmin, Pmax]: its extremes lie at the ends
        or at the vertex -c1 / 2 c2."""
        c2, c1, c0 = self.cost_coef.T
        lo, hi = self.pmin, self.pmax
        with np.errstate(divide="ignore", invalid="ignore"):
            vertex = np.where(c2 != 0, -c1 / (2 * np.where(c2 != 0, c2, 1.0)), lo)
        points = np.stack([lo, hi, np.clip(vertex, lo, hi)])  # (3, n_gen)
        values = (c2 * points + c1) * points + c0
        return float(values.min(0).sum()), float(values.max(0).sum())

    def feasible_rows(self, context):
        context = np.asarray(context, dtype=float)
        demand = self.demand(context)
        base_flow = (self.flow_offset - self.ptdf_load @ context)[self.limited]
        rate = self.rate[self.limited]
        row_lo = np.concatenate([[demand], -rate - base_flow])
        row_hi = np.concatenate([[demand], rate - base_flow])
        return self._rows_a, row_lo, row_hi

    def reference_solution(self, context) -> np.ndarray:
        """DC-OPF optimum (HiGHS QP, PTDF formulation)."""
        if self._opf is None:
            c2, c1, c0 = self.cost_coef.T
            self._opf = HighsProgram(self._rows_a, self.pmin, self.pmax, cost=c1, quad=2 * c2, offset=c0.sum())
        _, row_lo, row_hi = self.feasible_rows(context)
        x = self._opf.solve(row_lo, row_hi)
        if x is None:
            raise Infeasible(f"{self.name}: DC-OPF has no optimum for this load ({self._opf.status}); lower the loads")
        return np.clip(x, self.pmin, self.pmax)

    def violations(self, context, state, previous_state=None) -> list[Violation]:
        context, x = np.asarray(context, float), np.asarray(state, float)
        out: list[Violation] = []
        mismatch = float(x.sum() - self.demand(context))
        if abs(mismatch) > TOL_MW:
            word = "exceeds" if mismatch > 0 else "falls short of"
            out.append(
                Violation(
                    "power_balance",
                    abs(mismatch),
                    "MW",
                    f"power_balance: generation {x.sum():.2f} MW {word} demand {self.demand(context):.2f} MW by {abs(mismatch):.3f} MW",
                )
            )
        for g in np.flatnonzero(x > self.pmax + TOL_MW):
            size = x[g] - self.pmax[g]
            out.append(Violation(f"gen_limit[{self.state_names[g]}]", size, "MW",
                                 f"gen_limit[{self.state_names[g]}]: {x[g]:.2f} MW above Pmax {self.pmax[g]:.2f} MW by {size:.3f} MW"))
        for g in np.flatnonzero(x < self.pmin - TOL_MW):
            size = self.pmin[g] - x[g]
            out.append(Violation(f"gen_limit[{self.state_names[g]}]", size, "MW",
                                 f"gen_limit[{self.state_names[g]}]: {x[g]:.2f} MW below Pmin {self.pmin[g]:.2f} MW by {size:.3f} MW"))
        flow = self.flows(context, x)
        excess = np.abs(flow) - self.rate
        for k in np.flatnonzero(excess > TOL_MW):
            label = self.branch_labels[k]
            out.append(Violation(f"line_limit[{label}]", float(excess[k]), "MW",
                                 f"line_limit[{label}]: flow {flow[k]:.2f} MW exceeds rateA {self.rate[k]:.2f} MW by {excess[k]:.3f} MW"))
        if previous_state is not None:
            step = x - np.asarray(previous_state, float)
            for g in np.flatnonzero(np.abs(step) > self.ramp + TOL_MW):
                size = abs(step[g]) - self.ramp[g]
                out.append(Violation(f"ramp[{self.state_names[g]}]", float(size), "MW",
                                     f"ramp[{self.state_names[g]}]: moves {step[g]:+.2f} MW, beyond its ramp limit {self.ramp[g]:.2f} MW by {size:.3f} MW"))
        return out

    def sample_context(self, rng, index=None) -> np.ndarray:
        """Loads around nominal: a system-wide factor U(0.85, 1.15) times a per-bus factor
        U(0.9, 1.1) (so each load within about ±25%)."""
        return self.nominal_load * rng.uniform(0.85, 1.15) * rng.uniform(0.9, 1.1, size=self.nominal_load.shape)


def load(case: str) -> GridDomain:
    return GridDomain(mp.load_case(case))
