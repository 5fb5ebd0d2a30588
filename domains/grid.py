"""DC power networks from MATPOWER cases: generator dispatch against bus loads.

    context c: the loads (MW) at the buses whose nominal load is non-zero (negative loads,
               i.e. net injections, are kept as they are)
    state   x: the in-service generators' outputs Pg (MW)
    energy   : generation cost ($/h): polynomial gencost (model 2, at most quadratic) and
               piecewise-linear gencost (model 1, convex), per generator

The DC model is MATPOWER's (makeBdc, makeAang, ext2int):

- branch susceptance b = 1 / (x * tap) (tap 0 means 1); a phase shifter's angle enters as
  a fixed injection pair (Pfinj = -b * shift, Pbusinj = Cft' Pfinj); negative reactances
  (series compensation) are kept as they are;
- shunts: the conductance Gs is a fixed load (MW at V = 1 p.u.); the susceptance Bs has
  no active-power effect and is ignored in DC;
- out-of-service branches and generators are dropped; isolated buses (type 4) are dropped
  with the loads, generators and branches attached to them;
- islands: each connected set of buses balances on its own (one balance row and one slack
  per island: its reference bus, else its first bus); an island without an in-service
  generator cannot be served and is dropped, with its loads (listed in `notes`);
- branch limits rateA (0 = unlimited) and MATPOWER's angle-difference limits
  (ANGMIN/ANGMAX, as makeAang selects them) both bound the branch flow;
- a previous dispatch adds ramp limits |Pg - Pg_prev| <= ramp (the case's ramp_30 when
  given, else `DEFAULT_RAMP_FRACTION` of Pmax: MATPOWER's IEEE cases ship none).

Flows are F = PTDF (Cg Pg - Pd - Gs - Pbusinj) + base Pfinj. The PTDF is never formed for a
large case: a sparse LU of the reduced susceptance matrix (scipy's SuperLU) gives flows and
their transposes in one solve each. `ptdf`, `ptdf_gen`, `ptdf_load` and `flow_offset` are
computed on first use for the code that wants them dense (ml/physics).

Reference solution: DC-OPF solved by HiGHS (QP for quadratic costs, LP otherwise), in the
PTDF formulation for small cases (one balance row per island, one row per limited branch;
fastest to re-solve); above `DENSE_MAX_BUS` buses in the sparse B-theta formulation (angles
as variables, one balance row per bus) for linear costs, and for quadratic costs (HiGHS's
QP fails on B-theta) by constraint generation on the PTDF form ("lazy": branch rows added
when a solution overloads them). Piecewise-linear costs are epigraph variables
y_g >= m_k Pg + b_k in all three.
"""

from __future__ import annotations

import datetime as dt
import functools
import math

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph
from scipy.sparse import linalg as splinalg

from scf.domains import matpower as mp
from scf.domains.base import Domain, DomainError, Infeasible, Violation
from scf.domains.certify import Rows, SeparableCost
from scf.domains.solvers import HighsProgram

TOL_MW = 1e-3  # 1 kW: below this a balance or limit excess is solver round-off
DEFAULT_RAMP_FRACTION = 0.3  # of Pmax per step, where the case gives no ramp_30
DENSE_MAX_BUS = 200  # up to this many buses: dense PTDF rows; above: sparse B-theta


def _col(m: np.ndarray, j: int, default: float = 0.0) -> np.ndarray:
    return m[:, j] if m.shape[1] > j else np.full(len(m), default)


class GridDomain(Domain):
    kind = "grid"
    verifier = "grid.dc_check"
    state_unit = "MW"
    energy_unit = "$/h"
    sample_interval = dt.timedelta(minutes=5)

    def __init__(self, case: mp.MatpowerCase, name: str | None = None, *, formulation: str = "auto") -> None:
        self.name = name or f"grid:{case.name}"
        self.case = case
        self.notes: list[str] = []
        base = case.base_mva
        if not base > 0:
            raise DomainError(f"{self.name}: baseMVA is {base}; it must be positive")
        for what, mat, width in (("bus", case.bus, 13), ("gen", case.gen, 10), ("branch", case.branch, 11), ("gencost", case.gencost, 4)):
            if mat.ndim != 2 or mat.shape[1] < width:
                raise DomainError(f"{self.name}: mpc.{what} has {mat.shape[1] if mat.ndim == 2 else 0} columns, MATPOWER's format needs at least {width}")
        if len(case.gencost) < len(case.gen):
            raise DomainError(f"{self.name}: mpc.gencost has {len(case.gencost)} rows for {len(case.gen)} generators; every generator needs a cost row")
        all_bus = case.bus
        ids = all_bus[:, mp.BUS_I].astype(int)
        if len(set(ids)) != len(ids):
            raise DomainError(f"{self.name}: bus numbers repeat in mpc.bus; each bus needs its own number")
        where = {b: i for i, b in enumerate(ids)}
        for what, mat, cols in (("gen", case.gen, [mp.GEN_BUS]), ("branch", case.branch, [mp.F_BUS, mp.T_BUS])):
            for j in cols:
                unknown = sorted({int(v) for v in mat[:, j]} - set(where))
                if unknown:
                    raise DomainError(f"{self.name}: mpc.{what} refers to bus {unknown[0]}, which mpc.bus does not list; fix the case file")

        # in service: buses not isolated; gens and branches on, attached to such buses
        bus_on = all_bus[:, mp.BUS_TYPE] != mp.NONE
        gen_on = (case.gen[:, mp.GEN_STATUS] > 0) & bus_on[[where[int(v)] for v in case.gen[:, mp.GEN_BUS]]]
        f_all = np.array([where[int(v)] for v in case.branch[:, mp.F_BUS]], dtype=int)
        t_all = np.array([where[int(v)] for v in case.branch[:, mp.T_BUS]], dtype=int)
        br_on = (case.branch[:, mp.BR_STATUS] > 0) & bus_on[f_all] & bus_on[t_all]
        if (~bus_on).any():
            self.notes.append(f"{int((~bus_on).sum())} isolated bus(es) (type 4) dropped with their loads")

        # islands over in-service branches; those without a generator are dropped
        n_all = len(all_bus)
        adj = sparse.coo_array((np.ones(int(br_on.sum())), (f_all[br_on], t_all[br_on])), shape=(n_all, n_all))
        _, label = csgraph.connected_components(adj, directed=False)
        gen_bus_all = np.array([where[int(v)] for v in case.gen[:, mp.GEN_BUS]], dtype=int)
        served = np.zeros(n_all, bool)
        served[np.unique(label[gen_bus_all[gen_on]])] = True
        served = served[label] & bus_on
        dropped = bus_on & ~served
        if dropped.any():
            lost = float(all_bus[dropped, mp.PD].sum())
            self.notes.append(f"{len(np.unique(label[dropped]))} island(s) without an in-service generator dropped ({int(dropped.sum())} buses, {lost:.6g} MW of load)")
        keep_bus = np.flatnonzero(served)
        if not len(keep_bus):
            raise DomainError(f"{self.name}: no bus is connected to an in-service generator; check GEN_STATUS and BR_STATUS")
        gen_on &= served[gen_bus_all]
        br_on &= served[f_all]

        bus = all_bus[keep_bus]
        gen = case.gen[gen_on]
        gencost = case.gencost[: len(case.gen)][gen_on]
        branch = case.branch[br_on]
        self.bus, self.gen, self.branch = bus, gen, branch
        n_bus, n_gen, n_br = len(bus), len(gen), len(branch)
        if n_gen == 0:
            raise DomainError(f"{self.name}: no generator is in service; check GEN_STATUS")
        index = {int(b): i for i, b in enumerate(bus[:, mp.BUS_I])}
        f = np.array([index[int(v)] for v in branch[:, mp.F_BUS]], dtype=int)
        t = np.array([index[int(v)] for v in branch[:, mp.T_BUS]], dtype=int)
        gen_bus = np.array([index[int(v)] for v in gen[:, mp.GEN_BUS]], dtype=int)
        self._f, self._t, self.gen_bus = f, t, gen_bus
        self.bus_ids = bus[:, mp.BUS_I].astype(int)
        self.bus_index = index

        # islands (again, on what is kept), slack per island: its reference bus, else its first bus
        adj = sparse.coo_array((np.ones(n_br), (f, t)), shape=(n_bus, n_bus))
        self.n_islands, self.island = csgraph.connected_components(adj, directed=False)
        ref = bus[:, mp.BUS_TYPE] == mp.REF
        self.slack = np.array([
            int(np.flatnonzero((self.island == k) & ref)[0]) if ((self.island == k) & ref).any() else int(np.flatnonzero(self.island == k)[0])
            for k in range(self.n_islands)
        ], dtype=int)  # fmt: skip
        if self.n_islands > 1:
            self.notes.append(f"{self.n_islands} islands: each balances its own load (one balance row and one slack bus each)")

        self._build_costs(gen, gencost)

        # DC network (MATPOWER makeBdc)
        x = branch[:, mp.BR_X]
        zero = np.flatnonzero(x == 0)
        if len(zero):
            k = int(zero[0])
            raise DomainError(f"{self.name}: branch {int(branch[k, 0])}-{int(branch[k, 1])} has zero reactance; a DC model needs x != 0 (set a small x or take the branch out of service)")
        tap = np.where(_col(branch, mp.TAP) == 0, 1.0, _col(branch, mp.TAP))
        b = 1.0 / (x * tap)
        self.b = b
        cft = sparse.csr_array((np.concatenate([np.ones(n_br), -np.ones(n_br)]), (np.tile(np.arange(n_br), 2), np.concatenate([f, t]))), shape=(n_br, n_bus))
        self._bf = sparse.csr_array(cft.multiply(b[:, None]))  # (n_br, n_bus), p.u. flow per radian
        bbus = sparse.csc_array(cft.T @ self._bf)
        self._shift_rad = np.deg2rad(_col(branch, mp.SHIFT))
        pf_shift = -b * self._shift_rad  # p.u.
        self._pf_shift_mw = base * pf_shift
        self._nonslack = np.setdiff1d(np.arange(n_bus), self.slack)
        reduced = sparse.csc_array(bbus[self._nonslack][:, self._nonslack])
        try:
            self._lu = splinalg.splu(reduced) if len(self._nonslack) else None
        except RuntimeError:
            raise DomainError(f"{self.name}: the susceptance matrix is singular (negative reactances cancel out in a loop?); check BR_X") from None
        self._bbus = bbus

        pd = bus[:, mp.PD]
        self.load_buses = np.flatnonzero(pd != 0)
        gs = bus[:, mp.GS]  # shunt conductance: MW consumed at V = 1 p.u.
        self._fixed_bus = gs + base * (cft.T @ pf_shift)  # MW withdrawn at each bus that no context sets
        self.fixed_load = float(gs.sum())  # cft.T @ pf_shift sums to zero (per island too)
        self._island_fixed = np.bincount(self.island, weights=self._fixed_bus, minlength=self.n_islands)
        self._load_island = self.island[self.load_buses]
        self._gen_island = self.island[gen_bus]

        # branch flow bounds: rateA and MATPOWER's angle-difference limits
        rate_a = _col(branch, mp.RATE_A)
        self.rate = np.where(rate_a > 0, rate_a, np.inf)
        flo, fhi = -self.rate.copy(), self.rate.copy()
        amin, amax = _col(branch, mp.ANGMIN), _col(branch, mp.ANGMAX)
        iang = ((amin != 0) & (amin > -360)) | ((amax != 0) & (amax < 360)) | ((amin != 0) & (amax == 0)) | ((amin == 0) & (amax != 0))
        ang_lo = np.where(amin < -360, -np.inf, np.deg2rad(amin))
        ang_hi = np.where(amax > 360, np.inf, np.deg2rad(amax))
        # theta_f - theta_t = F / (base b) + shift (radians), so the angle limits bound F:
        with np.errstate(invalid="ignore"):
            e_lo = base * b * (ang_lo - self._shift_rad)
            e_hi = base * b * (ang_hi - self._shift_rad)
        a_lo, a_hi = np.where(b > 0, e_lo, e_hi), np.where(b > 0, e_hi, e_lo)
        self.angle_limited = np.flatnonzero(iang)
        self._ang_flow_lo = np.where(iang, np.nan_to_num(a_lo, nan=-np.inf), -np.inf)
        self._ang_flow_hi = np.where(iang, np.nan_to_num(a_hi, nan=np.inf), np.inf)
        self.flow_lo = np.maximum(flo, self._ang_flow_lo)
        self.flow_hi = np.minimum(fhi, self._ang_flow_hi)
        if np.any(self.flow_lo > self.flow_hi):
            k = int(np.flatnonzero(self.flow_lo > self.flow_hi)[0])
            raise DomainError(f"{self.name}: branch {self._label(k)} has an empty flow range (rateA and angle limits conflict); fix the case file")
        self.limited = np.flatnonzero(np.isfinite(self.flow_lo) | np.isfinite(self.flow_hi))
        self.branch_labels = [self._label(k) for k in range(n_br)]

        self.pmin, self.pmax = gen[:, mp.PMIN].copy(), gen[:, mp.PMAX].copy()
        if np.any(self.pmin > self.pmax):
            g = int(np.flatnonzero(self.pmin > self.pmax)[0])
            raise DomainError(f"{self.name}: generator {g + 1} at bus {int(gen[g, 0])} has Pmin {self.pmin[g]:g} > Pmax {self.pmax[g]:g}; fix the case file")
        ramp30 = _col(gen, mp.RAMP_30)
        self.ramp = np.where(ramp30 > 0, ramp30, DEFAULT_RAMP_FRACTION * np.where(np.isfinite(self.pmax), np.abs(self.pmax), np.inf))
        self.nominal_load = pd[self.load_buses].copy()
        self.gen_bus_ids = gen[:, mp.GEN_BUS].astype(int)
        self.state_names = tuple(f"Pg{g + 1}@bus{int(bid)}" for g, bid in enumerate(self.gen_bus_ids))
        self.context_names = tuple(f"Pd@bus{int(bus[i, mp.BUS_I])}" for i in self.load_buses)
        self.state_bounds = (self.pmin.copy(), self.pmax.copy())
        nominal = self.nominal_load
        self.context_bounds = (np.minimum(0.5 * nominal, 1.5 * nominal), np.maximum(0.5 * nominal, 1.5 * nominal))
        if formulation == "auto":  # HiGHS's QP solver fails on the B-theta QP (free angles); the PTDF QP solves
            quadratic = bool(np.any(self.cost_coef[:, 0] > 0))
            formulation = "ptdf" if n_bus <= DENSE_MAX_BUS else ("lazy" if quadratic else "b-theta")
        if formulation not in ("ptdf", "b-theta", "lazy"):
            raise DomainError(f"{self.name}: formulation {formulation!r}: use 'ptdf', 'b-theta', 'lazy' or 'auto'")
        self._lazy: list[int] = []  # "lazy": the branches (indices into `limited`) whose rows the model holds
        self.formulation = formulation
        self._opf: HighsProgram | None = None

    def _label(self, k: int) -> str:
        return f"{int(self.branch[k, mp.F_BUS])}-{int(self.branch[k, mp.T_BUS])}"

    # ------------------------------------------------------------------ costs

    def _build_costs(self, gen: np.ndarray, gencost: np.ndarray) -> None:
        n_gen = len(gen)
        coef = np.zeros((n_gen, 3))  # columns c2, c1, c0
        pieces: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for g in range(n_gen):
            model, n = int(gencost[g, mp.MODEL]), int(gencost[g, mp.NCOST])
            where = f"{self.name}: generator {g + 1} at bus {int(gen[g, mp.GEN_BUS])}"
            if model == mp.POLYNOMIAL:
                c = gencost[g, mp.COST : mp.COST + n]
                if len(c) < n:
                    raise DomainError(f"{where}: gencost says {n} coefficients but the row holds {len(c)}; fix the case file")
                if n > 3 and np.any(c[: n - 3] != 0):
                    raise DomainError(f"{where}: polynomial gencost of degree {n - 1 - int(np.argmax(c != 0))}; DC-OPF here takes at most quadratic costs (as MATPOWER's DC OPF): refit it as a quadratic or a piecewise-linear cost")
                c = c[-3:] if n >= 3 else c
                coef[g, 3 - len(c) :] = c
                if coef[g, 0] < 0:
                    raise DomainError(f"{where}: quadratic gencost coefficient {coef[g, 0]:g} < 0 makes the cost non-convex; DC-OPF needs c2 >= 0")
            elif model == mp.PIECEWISE_LINEAR:
                pts = gencost[g, mp.COST : mp.COST + 2 * n]
                if n < 1 or len(pts) < 2 * n:
                    raise DomainError(f"{where}: piecewise-linear gencost says {n} points but the row holds {len(pts) // 2}; fix the case file")
                xs, ys = pts[0::2], pts[1::2]
                if n == 1:
                    coef[g, 2] = ys[0]
                    continue
                if np.any(np.diff(xs) <= 0):
                    raise DomainError(f"{where}: piecewise-linear gencost points must have increasing MW values; fix the case file")
                m = np.diff(ys) / np.diff(xs)
                if np.any(np.diff(m) < -1e-9 * np.maximum(1.0, np.abs(m[1:]))):
                    self.notes.append(f"{where.removeprefix(self.name + ': ')}: piecewise-linear gencost is not convex (its slopes decrease); its cost is the max of its segments' lines, as MATPOWER's epigraph makes it")
                pieces[g] = (m, ys[:-1] - m * xs[:-1])
            else:
                raise DomainError(f"{where}: gencost model {model}; use 1 (piecewise linear) or 2 (polynomial)")
        self.cost_coef = coef
        k = max((len(m) for m, _ in pieces.values()), default=1)
        slopes, intercepts, has = np.zeros((n_gen, k)), np.zeros((n_gen, k)), np.zeros(n_gen, bool)
        for g, (m, b0) in pieces.items():
            slopes[g, : len(m)], intercepts[g, : len(m)] = m, b0
            slopes[g, len(m) :], intercepts[g, len(m) :] = m[-1], b0[-1]
            has[g] = True
        self.pwl_gens = np.flatnonzero(has)
        self._separable_cost = SeparableCost(coef[:, 0].copy(), coef[:, 1].copy(), coef[:, 2].copy(), slopes, intercepts, has)

    @property
    def separable_cost(self) -> SeparableCost:
        """Each generator's cost: quadratic (c2, c1, c0) or piecewise linear (max of its lines)."""
        return self._separable_cost

    # ------------------------------------------------------------------ physics

    def _solve_reduced(self, p_ns: np.ndarray, trans: bool = False) -> np.ndarray:
        """B_r^-1 applied to (n_nonslack,) or (n_nonslack, k)."""
        if self._lu is None:
            return np.zeros_like(p_ns)
        return self._lu.solve(np.asarray(p_ns, float), trans="T" if trans else "N")

    def _flows_from_injection(self, p: np.ndarray) -> np.ndarray:
        """PTDF @ p for bus injections p (..., n_bus) in MW, by one sparse solve."""
        p = np.asarray(p, float)
        flat = p.reshape(-1, p.shape[-1])
        theta = np.zeros_like(flat)
        theta[:, self._nonslack] = self._solve_reduced(flat[:, self._nonslack].T).T if len(self._nonslack) else 0.0
        return (self._bf @ theta.T).T.reshape(*p.shape[:-1], len(self.b))

    def _ptdf_transpose(self, nu: np.ndarray) -> np.ndarray:
        """PTDF' @ nu (..., n_bus) for branch weights nu (..., n_branch): one sparse solve."""
        nu = np.asarray(nu, float)
        flat = nu.reshape(-1, nu.shape[-1])
        w = np.zeros((len(flat), len(self.bus)))
        if len(self._nonslack):
            rhs = (self._bf.T @ flat.T)[self._nonslack]  # (n_nonslack, B)
            w[:, self._nonslack] = self._solve_reduced(rhs, trans=True).T
        return w.reshape(*nu.shape[:-1], len(self.bus))

    def injection(self, context, state) -> np.ndarray:
        """Net bus injections (MW), batched: Cg Pg - Pd - Gs - Pbusinj."""
        x, c = np.asarray(state, float), np.asarray(context, float)
        lead = np.broadcast_shapes(x.shape[:-1], c.shape[:-1])
        p = np.broadcast_to(-self._fixed_bus, (*lead, len(self.bus))).copy()
        np.add.at(p, (..., self.gen_bus), np.broadcast_to(x, (*lead, x.shape[-1])))
        p[..., self.load_buses] -= c
        return p

    def flows(self, context, state) -> np.ndarray:
        """Branch flows (MW, from -> to); batched over leading axes."""
        if "ptdf_gen" in self.__dict__ or len(self.bus) <= DENSE_MAX_BUS:
            return np.asarray(state) @ self.ptdf_gen.T - np.asarray(context) @ self.ptdf_load.T + self.flow_offset
        return self._flows_from_injection(self.injection(context, state)) + self._pf_shift_mw

    simulate = flows

    @functools.cached_property
    def ptdf(self) -> np.ndarray:
        """(n_branch, n_bus) dense: MW of flow per MW injected (withdrawn at the island's slack)."""
        eye = np.zeros((len(self.bus), len(self.bus)))
        eye[np.arange(len(self.bus)), np.arange(len(self.bus))] = 1.0
        return self._flows_from_injection(eye).T

    def _ptdf_columns(self, buses: np.ndarray) -> np.ndarray:
        p = np.zeros((len(buses), len(self.bus)))
        p[np.arange(len(buses)), buses] = 1.0
        return self._flows_from_injection(p).T if len(buses) else np.zeros((len(self.b), 0))

    @functools.cached_property
    def ptdf_gen(self) -> np.ndarray:
        return self._ptdf_columns(self.gen_bus)  # (n_branch, n_gen)

    @functools.cached_property
    def ptdf_load(self) -> np.ndarray:
        return self._ptdf_columns(self.load_buses)  # (n_branch, n_load)

    @functools.cached_property
    def flow_offset(self) -> np.ndarray:
        return self._pf_shift_mw - self._flows_from_injection(self._fixed_bus)  # (n_branch,)

    def demand(self, context) -> np.ndarray:
        """Total demand (MW): the loads plus the shunt conductances."""
        return np.asarray(context).sum(-1) + self.fixed_load

    def island_demand(self, context) -> np.ndarray:
        """Demand per island (..., n_islands)."""
        c = np.asarray(context, float)
        out = np.zeros((*c.shape[:-1], self.n_islands))
        for k in range(self.n_islands):
            out[..., k] = c[..., self._load_island == k].sum(-1) + self._island_fixed[k]
        return out

    def island_generation(self, state) -> np.ndarray:
        x = np.asarray(state, float)
        out = np.zeros((*x.shape[:-1], self.n_islands))
        for k in range(self.n_islands):
            out[..., k] = x[..., self._gen_island == k].sum(-1)
        return out

    def cost(self, context, state) -> float:
        return float(self.separable_cost.value(np.asarray(state, dtype=float)))

    def costs(self, states) -> np.ndarray:
        """The cost of each state in a batch (..., n_gen) -> (...)."""
        return np.asarray(self.separable_cost.value(np.asarray(states, float)))

    def energy_range(self) -> tuple[float, float]:
        """Each generator's cost over [Pmin, Pmax]: its extremes lie at the ends, a PWL
        breakpoint or the vertex -c1 / 2 c2."""
        sc = self.separable_cost
        lo, hi = self.pmin, self.pmax
        low, _ = sc.inner_min(np.zeros(len(lo)), lo, hi)
        # the maximum of a convex function over an interval is at an end
        ends = np.stack([sc.terms(np.where(np.isfinite(lo), lo, 0.0)), sc.terms(np.where(np.isfinite(hi), hi, 0.0))])
        return float(low.sum()), float(ends.max(0).sum())

    # ------------------------------------------------------------------ constraints

    def _row_bounds(self, context) -> tuple[np.ndarray, np.ndarray]:
        context = np.asarray(context, dtype=float)
        demand = self.island_demand(context)
        base_flow = (self.flow_offset if "flow_offset" in self.__dict__ or len(self.bus) <= DENSE_MAX_BUS else None)
        if base_flow is None:
            p = np.zeros(len(self.bus))
            p[self.load_buses] -= context
            base = self._flows_from_injection(p - self._fixed_bus) + self._pf_shift_mw
        else:
            base = base_flow - self.ptdf_load @ context
        lim = self.limited
        return (np.concatenate([demand, self.flow_lo[lim] - base[lim]]), np.concatenate([demand, self.flow_hi[lim] - base[lim]]))

    def row_names(self) -> tuple[str, ...]:
        bal = ("power_balance",) if self.n_islands == 1 else tuple(f"power_balance[island {k + 1}]" for k in range(self.n_islands))
        return bal + tuple(f"branch[{self.branch_labels[k]}]" for k in self.limited)

    def feasible_rows(self, context):
        """[balance per island; flow of each limited branch] = A @ Pg (dense A)."""
        row_lo, row_hi = self._row_bounds(context)
        return self._rows_a, row_lo, row_hi

    @functools.cached_property
    def _rows_a(self) -> np.ndarray:
        bal = np.zeros((self.n_islands, len(self.gen_bus)))
        bal[self._gen_island, np.arange(len(self.gen_bus))] = 1.0
        return np.vstack([bal, self.ptdf_gen[self.limited]])

    def constraint_rows(self, context) -> Rows:
        """The rows of `feasible_rows` as an operator (no dense PTDF for large cases)."""
        lo, hi = self._row_bounds(context)
        if len(self.bus) <= DENSE_MAX_BUS:
            return Rows.dense(self._rows_a, lo, hi, self.row_names())
        n_isl, lim, nb = self.n_islands, self.limited, len(self.b)

        def matvec(x):  # (..., n_gen) -> (..., n_rows)
            x = np.asarray(x, float)
            p = np.zeros((*x.shape[:-1], len(self.bus)))
            np.add.at(p, (..., self.gen_bus), x)
            return np.concatenate([self.island_generation(x), self._flows_from_injection(p)[..., lim]], axis=-1)

        def rmatvec(y):  # (..., n_rows) -> (..., n_gen)
            y = np.asarray(y, float)
            nu = np.zeros((*y.shape[:-1], nb))
            nu[..., lim] = y[..., n_isl:]
            return y[..., :n_isl][..., self._gen_island] + self._ptdf_transpose(nu)[..., self.gen_bus]

        return Rows(lo, hi, self.row_names(), matvec, rmatvec)

    # ------------------------------------------------------------------ solving

    def _build_opf(self) -> HighsProgram:
        sc, n_gen = self.separable_cost, len(self.gen_bus)
        pwl = self.pwl_gens
        n_y = len(pwl)
        pieces = [(i, g, k) for i, g in enumerate(pwl) for k in range(sc.slopes.shape[1]) if k == 0 or sc.slopes[g, k] != sc.slopes[g, k - 1] or sc.intercepts[g, k] != sc.intercepts[g, k - 1]]
        # epigraph rows: m_k Pg - y <= -b_k
        epi_rows, epi_cols, epi_vals = [], [], []
        for r, (i, g, k) in enumerate(pieces):
            epi_rows += [r, r]
            epi_cols += [g, -1 - i]  # y columns placed after the others (fixed below)
            epi_vals += [sc.slopes[g, k], -1.0]
        self._epi_hi = np.array([-sc.intercepts[g, k] for _, g, k in pieces])
        quad = 2 * sc.c2
        offset = float(sc.c0.sum())
        if self.formulation in ("ptdf", "lazy"):
            n_var = n_gen + n_y
            if self.formulation == "ptdf":
                rows_a = sparse.csr_array(self._rows_a)
            else:  # balance rows only; branch rows are added when a solution breaks them
                rows_a = sparse.csr_array((np.ones(n_gen), (self._gen_island, np.arange(n_gen))), shape=(self.n_islands, n_gen))
                self._lazy = []
            cols = [c if c >= 0 else n_gen + (-1 - c) for c in epi_cols]
            epi = sparse.csr_array((epi_vals, (epi_rows, cols)), shape=(len(pieces), n_var))
            a = sparse.vstack([sparse.hstack([rows_a, sparse.csr_array((rows_a.shape[0], n_y))]), epi], format="csr")
            lo = np.concatenate([self.pmin, np.full(n_y, -np.inf)])
            hi = np.concatenate([self.pmax, np.full(n_y, np.inf)])
            self._n_main_rows = rows_a.shape[0]
        else:  # b-theta: [Pg, theta, y]; rows: nodal balance (n_bus), limited flows, epigraph
            nb, base, lim = len(self.bus), self.case.base_mva, self.limited
            n_var = n_gen + nb + n_y
            cg = sparse.csr_array((np.ones(n_gen), (self.gen_bus, np.arange(n_gen))), shape=(nb, n_gen))
            nodal = sparse.hstack([-cg, base * self._bbus, sparse.csr_array((nb, n_y))])
            flow = sparse.hstack([sparse.csr_array((len(lim), n_gen)), base * self._bf[lim], sparse.csr_array((len(lim), n_y))])
            cols = [c if c >= 0 else n_gen + nb + (-1 - c) for c in epi_cols]
            epi = sparse.csr_array((epi_vals, (epi_rows, cols)), shape=(len(pieces), n_var))
            a = sparse.vstack([nodal, flow, epi], format="csr")
            theta_lo, theta_hi = np.full(nb, -np.inf), np.full(nb, np.inf)
            theta_lo[self.slack] = theta_hi[self.slack] = 0.0
            lo = np.concatenate([self.pmin, theta_lo, np.full(n_y, -np.inf)])
            hi = np.concatenate([self.pmax, theta_hi, np.full(n_y, np.inf)])
        cost = np.zeros(n_var)
        cost[:n_gen] = sc.c1
        cost[n_var - n_y :] = 1.0
        q = np.zeros(n_var)
        q[:n_gen] = quad
        self._n_var = n_var
        return HighsProgram(a, lo, hi, cost=cost, quad=q, offset=offset)

    def _base_flows(self, context) -> np.ndarray:
        """Branch flows (MW) with every generator at 0: one sparse solve."""
        return self._flows_from_injection(self.injection(context, np.zeros(len(self.gen_bus)))) + self._pf_shift_mw

    def _opf_bounds(self, context, base_flows=None) -> tuple[np.ndarray, np.ndarray]:
        n_epi = len(self._epi_hi)
        epi_lo, epi_hi = np.full(n_epi, -np.inf), self._epi_hi
        if self.formulation == "lazy":
            demand = self.island_demand(np.asarray(context, float))
            lim = self.limited[self._lazy]
            base = self._base_flows(context) if base_flows is None else base_flows
            return (np.concatenate([demand, epi_lo, self.flow_lo[lim] - base[lim]]),
                    np.concatenate([demand, epi_hi, self.flow_hi[lim] - base[lim]]))  # fmt: skip
        if self.formulation == "ptdf":
            lo, hi = self._row_bounds(context)
        else:
            c = np.asarray(context, float)
            rhs = -self._fixed_bus.copy()
            rhs[self.load_buses] -= c
            lim = self.limited
            lo = np.concatenate([rhs, self.flow_lo[lim] - self._pf_shift_mw[lim]])
            hi = np.concatenate([rhs, self.flow_hi[lim] - self._pf_shift_mw[lim]])
        return np.concatenate([lo, epi_lo]), np.concatenate([hi, epi_hi])

    def solve_exact(self, context, *, lo=None, hi=None, start=None) -> tuple[np.ndarray, np.ndarray]:
        """(the optimal dispatch, the row multipliers of `constraint_rows` from HiGHS's
        duals). `lo`/`hi` tighten the generator bounds (ramps, outages); `start` is a
        dispatch to warm-start from. Raises `Infeasible`."""
        if self._opf is None:
            self._opf = self._build_opf()
        prog = self._opf
        n_gen = len(self.gen_bus)
        if lo is not None or hi is not None:
            col_lo = self.pmin if lo is None else np.asarray(lo, float)
            col_hi = self.pmax if hi is None else np.asarray(hi, float)
            prog._h.changeColsBounds(n_gen, np.arange(n_gen, dtype=np.int32), col_lo, col_hi)
        if self.formulation == "lazy":
            return self._solve_lazy(context, lo, hi, start)
        row_lo, row_hi = self._opf_bounds(context)
        full_start = None
        if start is not None and self.formulation == "ptdf":
            s = np.zeros(self._n_var)
            s[:n_gen] = start
            if len(self.pwl_gens):
                s[n_gen:] = self.separable_cost.terms(np.asarray(start, float))[self.pwl_gens] - self.cost_coef[self.pwl_gens, 2]
            full_start = s
        if self.formulation == "b-theta":
            prog._h.clearSolver()  # a cold start: warm re-solves of these degenerate LPs measured slower (benchmarks/bench_optimize.py)
        try:
            x = prog.solve(row_lo, row_hi, start=full_start)
        finally:
            if lo is not None or hi is not None:
                prog._h.changeColsBounds(n_gen, np.arange(n_gen, dtype=np.int32), self.pmin, self.pmax)
        if x is None and self.formulation == "b-theta" and prog.status not in ("Infeasible", "Primal infeasible or unbounded"):
            # HiGHS's QP active-set method fails on some B-theta QPs ("Solve error"): the PTDF form solves them
            self.formulation, self._opf = "ptdf", None
            return self.solve_exact(context, lo=lo, hi=hi, start=start)
        if x is None:
            raise Infeasible(f"{self.name}: DC-OPF has no feasible dispatch{'' if prog.status == 'Infeasible' else f' ({prog.status})'}: {self.diagnose(context, lo, hi)}")
        pg = np.clip(x[:n_gen], self.pmin if lo is None else lo, self.pmax if hi is None else hi)
        dual = np.zeros(self.n_islands + len(self.limited))
        rd = prog.row_dual
        if rd is not None:
            if self.formulation == "ptdf":
                dual = rd[: self._n_main_rows].copy()
            else:
                nb = len(self.bus)
                dual[: self.n_islands] = -rd[self.slack]  # the price at each island's slack
                dual[self.n_islands :] = rd[nb : nb + len(self.limited)]
        return pg, dual

    def _solve_lazy(self, context, lo, hi, start) -> tuple[np.ndarray, np.ndarray]:
        """Constraint generation: solve with the branch rows the model holds, add every
        limited branch the solution overloads (its PTDF row over the generators, one sparse
        solve), repeat. The relaxation's optimum that breaks no limit is the optimum."""
        prog, n_gen = self._opf, len(self.gen_bus)
        col_lo = self.pmin if lo is None else np.asarray(lo, float)
        col_hi = self.pmax if hi is None else np.asarray(hi, float)
        prog._h.changeColsBounds(n_gen, np.arange(n_gen, dtype=np.int32), col_lo, col_hi)
        base = self._base_flows(context)
        n_y = self._n_var - n_gen
        position = {int(b): i for i, b in enumerate(self.limited)}
        try:
            for _round in range(200):
                row_lo, row_hi = self._opf_bounds(context, base)
                x = prog.solve(row_lo, row_hi)
                if x is None:
                    raise Infeasible(f"{self.name}: DC-OPF has no feasible dispatch{'' if prog.status == 'Infeasible' else f' ({prog.status})'}: {self.diagnose(context, lo, hi)}")
                pg = x[:n_gen]
                p = np.zeros(len(self.bus))
                np.add.at(p, self.gen_bus, pg)
                flows = base + self._flows_from_injection(p)
                held = np.zeros(len(self.b), bool)
                held[self.limited[self._lazy]] = True
                over = np.flatnonzero(((flows > self.flow_hi + 1e-7) | (flows < self.flow_lo - 1e-7)) & ~held)
                if not len(over):
                    break
                eye = np.zeros((len(over), len(self.b)))
                eye[np.arange(len(over)), over] = 1.0
                rows = self._ptdf_transpose(eye)[:, self.gen_bus]  # (k, n_gen): PTDF rows of these branches
                prog.add_rows(np.hstack([rows, np.zeros((len(over), n_y))]), self.flow_lo[over] - base[over], self.flow_hi[over] - base[over])
                self._lazy += [position[int(b)] for b in over]
            else:  # pragma: no cover - each round adds a row; 200 rounds means something is wrong
                raise Infeasible(f"{self.name}: constraint generation did not settle in 200 rounds; use formulation='ptdf'")
        finally:
            prog._h.changeColsBounds(n_gen, np.arange(n_gen, dtype=np.int32), self.pmin, self.pmax)
        dual = np.zeros(self.n_islands + len(self.limited))
        rd = prog.row_dual
        if rd is not None:
            dual[: self.n_islands] = rd[: self.n_islands]
            first = self.n_islands + len(self._epi_hi)
            dual[self.n_islands + np.array(self._lazy, dtype=int)] = rd[first : first + len(self._lazy)]
        return np.clip(pg, col_lo, col_hi), dual

    def reference_solution(self, context) -> np.ndarray:
        """DC-OPF optimum (HiGHS, see the module docstring for the formulation)."""
        return self.solve_exact(context)[0]

    def diagnose(self, context, lo=None, hi=None) -> str:
        """Which constraints conflict, by cheap checks: each island's demand against its
        generation range, then each limited branch's flow range against its limit."""
        lo = self.pmin if lo is None else np.asarray(lo, float)
        hi = self.pmax if hi is None else np.asarray(hi, float)
        demand = self.island_demand(np.asarray(context, float))
        out = []
        for k in range(self.n_islands):
            gl, gh = lo[self._gen_island == k].sum(), hi[self._gen_island == k].sum()
            where = "" if self.n_islands == 1 else f" in island {k + 1}"
            if demand[k] > gh + TOL_MW:
                out.append(f"demand {demand[k]:.2f} MW exceeds the generation capacity {gh:.2f} MW{where}")
            elif demand[k] < gl - TOL_MW:
                out.append(f"demand {demand[k]:.2f} MW is below the generators' minimum output {gl:.2f} MW{where}")
        if out:
            return "; ".join(out) + ": power_balance conflicts with gen_limit"
        if len(self.bus) <= DENSE_MAX_BUS or "ptdf_gen" in self.__dict__:
            _, row_lo, row_hi = self.feasible_rows(context)
            a = self._rows_a[self.n_islands :]
            reach_hi = np.where(a > 0, a * hi, a * lo).sum(1)
            reach_lo = np.where(a > 0, a * lo, a * hi).sum(1)
            lim_lo, lim_hi = row_lo[self.n_islands :], row_hi[self.n_islands :]
            bad = np.flatnonzero((reach_hi < lim_lo - TOL_MW) | (reach_lo > lim_hi + TOL_MW))
            if len(bad):
                names = ", ".join(self.branch_labels[self.limited[j]] for j in bad[:5])
                return f"no dispatch within the generator limits keeps branch {names} within its limit: line_limit conflicts with gen_limit"
        found = self._iis_names()
        if found:
            return f"these constraints conflict (an irreducible infeasible set from HiGHS): {', '.join(found[:8])}{'…' if len(found) > 8 else ''}"
        return "the balance, generator and branch limits cannot hold together (no single constraint pair explains it); relax line limits or loads"

    def _iis_names(self) -> list[str]:
        """The constraints of HiGHS's IIS of the last infeasible solve, by name."""
        prog = self._opf
        found = prog.iis() if prog is not None else None
        if not found:
            return []
        rows, cols = found
        n_gen, n_isl, n_epi = len(self.gen_bus), self.n_islands, len(getattr(self, "_epi_hi", ()))
        balance = ["power_balance"] if n_isl == 1 else [f"power_balance[island {k + 1}]" for k in range(n_isl)]
        if self.formulation == "ptdf":
            names = balance + [f"line_limit[{self.branch_labels[b]}]" for b in self.limited]
            names += [f"cost_epigraph[{i}]" for i in range(n_epi)]
        elif self.formulation == "lazy":
            names = balance + [f"cost_epigraph[{i}]" for i in range(n_epi)] + [f"line_limit[{self.branch_labels[self.limited[i]]}]" for i in self._lazy]
        else:
            names = [f"power_balance[bus {b}]" for b in self.bus_ids] + [f"line_limit[{self.branch_labels[b]}]" for b in self.limited]
            names += [f"cost_epigraph[{i}]" for i in range(n_epi)]
        out = [names[r] for r in rows if r < len(names)]
        out += [f"gen_limit[{self.state_names[c]}]" for c in cols if c < n_gen]
        return out

    def violations(self, context, state, previous_state=None) -> list[Violation]:
        context, x = np.asarray(context, float), np.asarray(state, float)
        out: list[Violation] = []
        if self.n_islands == 1:
            mismatches = [("power_balance", float(x.sum() - self.demand(context)), float(self.demand(context)), float(x.sum()))]
        else:
            dem, gen = self.island_demand(context), self.island_generation(x)
            mismatches = [(f"power_balance[island {k + 1}]", float(gen[k] - dem[k]), float(dem[k]), float(gen[k])) for k in range(self.n_islands)]
        for label, mismatch, dem_k, gen_k in mismatches:
            if abs(mismatch) > TOL_MW:
                word = "exceeds" if mismatch > 0 else "falls short of"
                out.append(Violation(label, abs(mismatch), "MW",
                                     f"{label}: generation {gen_k:.2f} MW {word} demand {dem_k:.2f} MW by {abs(mismatch):.3f} MW"))
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
        for k in self.angle_limited:
            over = max(flow[k] - self._ang_flow_hi[k], self._ang_flow_lo[k] - flow[k])
            if over > TOL_MW:
                label = self.branch_labels[k]
                diff = math.degrees(flow[k] / (self.case.base_mva * self.b[k]) + self._shift_rad[k])
                out.append(Violation(f"angle_limit[{label}]", float(over), "MW",
                                     f"angle_limit[{label}]: angle difference {diff:.3f}° outside its limits (flow {flow[k]:.2f} MW, {over:.3f} MW beyond)"))
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
