"""Any MATPOWER case: the parser's MATLAB subset, the DC model's features, published optima.

Outside references: MATPOWER's own test suite (lib/t in github.com/MATPOWER/matpower):
`soln9_dcopf.mat` holds f_soln = 6392.90171154 $/h and the dispatch of `rundcopf` on
`t_case9_opf` (version-1 format, piecewise-linear and linear costs, a 40 MW line limit);
`t_opf_dc_highs.m` asserts f = 6456.7213 and Pg = [99.98497; 89.35133; 125.66371] for the
same case with angle-difference limits (branch 4 ANGMAX = 3°, branch 7 ANGMIN = -4.5°). The
feature tests compare against an independent dense B-theta model written here from the
MATPOWER manual's equations (scipy linprog on a problem built without domains.grid).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linprog

from scf.domains import DomainError
from scf.domains import matpower as mp
from scf.domains.grid import GridDomain

DATA = Path(__file__).parent / "data" / "matpower"
FORMULATIONS = ["ptdf", "b-theta", "lazy"]


def t_case9_opf() -> mp.MatpowerCase:
    return mp.load_case(DATA / "t_case9_opf.m")


# --------------------------------------------------------------------------- parser


def test_version1_function_file_parses():
    case = t_case9_opf()
    assert case.base_mva == 100
    assert (case.bus.shape, case.gen.shape, case.branch.shape, case.gencost.shape) == ((9, 13), (3, 10), (9, 11), (3, 12))
    assert list(case.bus[:, 0]) == [1, 2, 30, 4, 5, 6, 7, 8, 9]  # bus 30: numbers need not be consecutive
    assert list(case.gencost[:, 0]) == [1, 1, 2]


def test_distribution_case_unit_conversions_are_applied():
    text = """function mpc = tiny
mpc.version = '2';
mpc.baseMVA = 10;
mpc.bus = [ %% kW here
\t1\t3\t0\t0\t0\t0\t1\t1\t0\t23\t1\t1\t1;
\t2\t1\t1840\t460\t0\t0\t1\t1\t0\t23\t1\t1.1\t0.9;
];
mpc.gen = [1 0 0 10 -10 1 100 1 10 0];
mpc.branch = [1 2 0.1 2.5 0 0 0 0 0 0 1 -360 360];
mpc.gencost = [2 0 0 3 0 20 0];
[PQ, PV, REF, NONE, BUS_I, BUS_TYPE, PD, QD, GS, BS, BUS_AREA, VM, ...
    VA, BASE_KV, ZONE, VMAX, VMIN, LAM_P, LAM_Q, MU_VMAX, MU_VMIN] = idx_bus;
Vbase = mpc.bus(1, BASE_KV) * 1e3;      %% in Volts
Sbase = mpc.baseMVA * 1e6;              %% in VA
mpc.branch(:, [BR_R BR_X]) = mpc.branch(:, [BR_R BR_X]) / (Vbase^2 / Sbase);
mpc.bus(:, [PD, QD]) = mpc.bus(:, [PD, QD]) / 1e3;
"""
    case = mp.parse_case(text)
    assert case.bus[1, mp.PD] == pytest.approx(1.84)
    assert case.branch[0, mp.BR_X] == pytest.approx(2.5 / (23e3**2 / 10e6))


def test_arithmetic_entries_and_skipped_flag_blocks():
    text = "mpc.baseMVA = 50/3;\nfixed = 0;\nmpc.bus = [1 3 135/sqrt(3) 0 0 0 1 1 0 1 1 1 1;];\nmpc.gen = [1 0 0 0 0 1 1 1 2^3 0];\n"
    text += "mpc.branch = [1 1 0 1 0 0 0 0 0 0 1];\nmpc.gencost = [2 0 0 2 1 0];\nif fixed\n  mpc.gen(1, 9) = 1;\nend\n"
    case = mp.parse_case(text)
    assert case.base_mva == pytest.approx(50 / 3)
    assert case.bus[0, mp.PD] == pytest.approx(135 / np.sqrt(3)) and case.gen[0, mp.PMAX] == 8


def test_unknown_matlab_is_refused_in_one_line():
    base = "mpc.baseMVA = 100;\nmpc.bus = [1 3 0 0 0 0 1 1 0 1 1 1 1;];\n"
    with pytest.raises(mp.CaseFormatError) as err:
        mp.parse_case(base + "mpc.bus(:, 3) = 2 * mpc.bus(:, 3);\n", name="odd")
    assert str(err.value) == (
        "odd: the statement 'mpc.bus(:, 3) = 2 * mpc.bus(:, 3);' is MATLAB code this reader does not interpret; "
        "run the file in MATPOWER, savecase() the result and pass that file"
    )
    with pytest.raises(mp.CaseFormatError, match="'if flag' runs MATLAB code"):
        mp.parse_case(base + "flag = 1;\nif flag\nend\n", name="odd")
    with pytest.raises(mp.CaseFormatError, match=r"non-numeric entry \(could not read 'system\(1\)' as a number\)"):
        mp.parse_case("mpc.bus = [1 system(1)];", name="odd")


# --------------------------------------------------------------------------- published optima


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_t_case9_opf_matches_matpowers_published_dcopf(formulation):
    grid = GridDomain(t_case9_opf(), formulation=formulation)
    x = grid.reference_solution(grid.nominal_load)
    # MATPOWER lib/t/soln9_dcopf.mat: f_soln = 6392.90171154, gen_soln(:, PG)
    assert grid.cost(grid.nominal_load, x) == pytest.approx(6392.90171154, rel=1e-5)
    np.testing.assert_allclose(x, [89.99995004, 95.34844939, 129.65160057], atol=1e-3)
    assert grid.violations(grid.nominal_load, x) == []
    assert list(grid.pwl_gens) == [0, 1]
    if formulation == "lazy":  # constraint generation added the binding 40 MW line, and only what it needed
        assert "6-7" in [grid.branch_labels[grid.limited[i]] for i in grid._lazy] and len(grid._lazy) < len(grid.limited)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_angle_difference_limits_match_matpower(formulation):
    case = t_case9_opf()
    branch = np.hstack([case.branch, np.tile([-360.0, 360.0], (len(case.branch), 1))])
    branch[3, mp.ANGMAX] = 3  # as t_opf_dc_highs.m: mpc.branch(4, ANGMAX) = 3; mpc.branch(7, ANGMIN) = -4.5
    branch[6, mp.ANGMIN] = -4.5
    grid = GridDomain(dataclasses.replace(case, branch=branch), formulation=formulation)
    x = grid.reference_solution(grid.nominal_load)
    assert grid.cost(grid.nominal_load, x) == pytest.approx(6456.7213, rel=1e-5)
    np.testing.assert_allclose(x, [99.98497, 89.35133, 125.66371], atol=1e-4)
    assert list(grid.angle_limited) == [3, 6]
    # the plain case's optimum breaks the angle limit, and the check says so
    plain = GridDomain(case).reference_solution(grid.nominal_load)
    assert [v.constraint for v in grid.violations(grid.nominal_load, plain)] == ["angle_limit[30-6]", "angle_limit[8-2]"]


# --------------------------------------------------------------------------- an independent model


def independent_dcopf(case: mp.MatpowerCase) -> float:
    """DC-OPF (linear costs) as a dense B-theta LP from MATPOWER's equations: taps, shifts,
    shunt conductance, out-of-service elements and isolated buses, one fixed angle per island."""
    bus = case.bus[case.bus[:, 1] != 4]
    ids = {int(b): i for i, b in enumerate(bus[:, 0])}
    on = case.branch[:, 10] > 0
    br = case.branch[on & np.isin(case.branch[:, 0], list(ids)) & np.isin(case.branch[:, 1], list(ids))]
    gmask = (case.gen[:, 7] > 0) & np.isin(case.gen[:, 0], list(ids))
    gen, cost = case.gen[gmask], case.gencost[: len(case.gen)][gmask]
    nb, ng, base = len(bus), len(gen), case.base_mva
    tap = np.where(br[:, 8] == 0, 1.0, br[:, 8])
    b = 1 / (br[:, 3] * tap)
    f = np.array([ids[int(v)] for v in br[:, 0]])
    t = np.array([ids[int(v)] for v in br[:, 1]])
    shift = np.deg2rad(br[:, 9])
    a_eq = np.zeros((nb, ng + nb))
    for g in range(ng):
        a_eq[ids[int(gen[g, 0])], g] = 1.0
    for k in range(len(br)):  # P_injected = base * B theta + base * Pbusinj
        for i, j, s in ((f[k], t[k], 1), (t[k], f[k], -1)):
            a_eq[i, ng + i] -= base * b[k]
            a_eq[i, ng + j] += base * b[k]
    pbusinj = np.zeros(nb)
    np.add.at(pbusinj, f, -b * shift)
    np.add.at(pbusinj, t, b * shift)
    b_eq = bus[:, 2] + bus[:, 4] + base * pbusinj
    rows, rhs = [], []
    for k in np.flatnonzero(br[:, 5] > 0):
        row = np.zeros(ng + nb)
        row[ng + f[k]], row[ng + t[k]] = base * b[k], -base * b[k]
        off = -base * b[k] * shift[k]
        rows += [row, -row]
        rhs += [br[k, 5] - off, br[k, 5] + off]
    bounds = [(lo, hi) for lo, hi in gen[:, [9, 8]]] + [(None, None)] * nb
    for k in range(nb):
        if bus[k, 1] == 3:
            bounds[ng + k] = (0, 0)
    c = np.concatenate([cost[:, 5] if cost.shape[1] > 6 else cost[:, 4], np.zeros(nb)])  # linear costs: c1
    res = linprog(c, A_ub=np.array(rows) if rows else None, b_ub=np.array(rhs) if rhs else None, A_eq=a_eq, b_eq=b_eq, bounds=bounds, method="highs")
    assert res.status == 0, res.message
    return float(res.fun + cost[:, 6].sum())


def pegase89() -> mp.MatpowerCase:
    return mp.load_case(DATA / "case89pegase.m")


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_phase_shifters_taps_shunts_and_negative_loads_agree_with_an_independent_model(formulation):
    case = pegase89()  # 3 phase shifters, 32 taps, 26 shunt conductances, 6 negative loads
    assert (case.branch[:, mp.SHIFT] != 0).sum() == 3 and (case.bus[:, mp.PD] < 0).sum() == 6
    grid = GridDomain(case, formulation=formulation)
    x = grid.reference_solution(grid.nominal_load)
    assert grid.violations(grid.nominal_load, x) == []
    assert grid.cost(grid.nominal_load, x) == pytest.approx(independent_dcopf(case), rel=1e-7)


def test_outages_isolated_buses_and_negative_reactance():
    case = pegase89()
    bus, branch, gen = case.bus.copy(), case.branch.copy(), case.gen.copy()
    branch[5, mp.BR_STATUS] = 0  # a branch out
    branch[10, mp.BR_X] *= -0.5  # series compensation: negative reactance
    gen[2, mp.GEN_STATUS] = 0  # a generator out
    leaf = int(np.flatnonzero(np.bincount(np.concatenate([branch[:, 0], branch[:, 1]]).astype(int)) == 1)[0])
    bus[bus[:, 0] == leaf, mp.BUS_TYPE] = mp.NONE  # an isolated bus (with what hangs on it)
    changed = dataclasses.replace(case, bus=bus, branch=branch, gen=gen)
    grid = GridDomain(changed, name="grid:changed")
    assert grid.state_dim == len(case.gen) - 1 - int((gen[:, 0] == leaf).sum())
    assert "isolated bus(es) (type 4) dropped" in grid.notes[0]
    x = grid.reference_solution(grid.nominal_load)
    assert grid.violations(grid.nominal_load, x) == []
    assert grid.cost(grid.nominal_load, x) == pytest.approx(independent_dcopf(changed), rel=1e-7)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_islands_balance_separately(formulation):
    case = mp.load_case("case9")
    branch = case.branch.copy()
    for f, t in ((5, 6), (8, 9)):  # islands {1, 4, 5, 9} (gen 1) and {2, 3, 6, 7, 8} (gens 2, 3)
        branch[(branch[:, 0] == f) & (branch[:, 1] == t), mp.BR_STATUS] = 0
    grid = GridDomain(dataclasses.replace(case, branch=branch), formulation=formulation)
    assert grid.n_islands == 2 and "2 islands" in grid.notes[-1]
    loads = grid.nominal_load
    x = grid.reference_solution(loads)
    assert x[0] == pytest.approx(90 + 125, abs=1e-6)  # island 1: gen 1 serves buses 5 and 9 alone
    assert x[1] + x[2] == pytest.approx(100, abs=1e-6)
    assert grid.violations(loads, x) == []
    moved = x + np.array([10.0, -10.0, 0.0])  # total balanced, each island not
    assert [v.constraint for v in grid.violations(loads, moved)] == ["power_balance[island 1]", "power_balance[island 2]"]


def test_island_without_a_generator_is_dropped_with_a_note():
    case = mp.load_case("case9")
    branch = case.branch.copy()
    branch[np.isin(branch[:, 1], [5]) | np.isin(branch[:, 0], [5]), mp.BR_STATUS] = 0  # bus 5 (90 MW) cut off
    grid = GridDomain(dataclasses.replace(case, branch=branch))
    assert grid.notes == ["1 island(s) without an in-service generator dropped (1 buses, 90 MW of load)"]
    assert "Pd@bus5" not in grid.context_names


def test_costs_beyond_the_dc_model_are_refused_in_one_line():
    case = mp.load_case("case9")
    cubic = np.hstack([case.gencost[:, :4], np.zeros((3, 1)), case.gencost[:, 4:]])
    cubic[:, mp.NCOST] = 4
    grid = GridDomain(dataclasses.replace(case, gencost=cubic))  # a zero cubic term is a quadratic
    assert grid.cost(grid.nominal_load, grid.reference_solution(grid.nominal_load)) == pytest.approx(5216.026608, abs=1e-4)
    cubic[1, mp.COST] = 0.001
    with pytest.raises(DomainError) as err:
        GridDomain(dataclasses.replace(case, gencost=cubic), name="grid:cubic")
    assert str(err.value) == (
        "grid:cubic: generator 2 at bus 2: polynomial gencost of degree 3; DC-OPF here takes at most quadratic costs "
        "(as MATPOWER's DC OPF): refit it as a quadratic or a piecewise-linear cost"
    )
    concave = t_case9_opf().gencost.copy()
    concave[0, 4:12] = [0, 0, 100, 5000, 200, 5500, 250, 7250]  # slopes 50, 5, 35
    grid = GridDomain(dataclasses.replace(t_case9_opf(), gencost=concave))  # MATPOWER's epigraph: the max of the lines
    assert grid.notes == ["generator 1 at bus 1: piecewise-linear gencost is not convex (its slopes decrease); its cost is the max of its segments' lines, as MATPOWER's epigraph makes it"]
    assert grid.cost(grid.nominal_load, np.array([150.0, 0, 0])) == pytest.approx(max(50 * 150, 5 * 150 + 4500, 35 * 150 - 1500) + 0 - 403.5)  # gens 2, 3 at 0 MW: 0 and c0
    with pytest.raises(DomainError, match="no bus is connected to an in-service generator"):
        GridDomain(dataclasses.replace(case, bus=np.where(np.arange(13) == 1, mp.NONE, case.bus)))


def test_sparse_flows_equal_the_dense_ptdf():
    grid = GridDomain(mp.load_case("case118"), formulation="b-theta")
    rng = np.random.default_rng(0)
    c = np.stack([grid.sample_context(rng) for _ in range(4)])
    x = rng.uniform(grid.pmin, grid.pmax, size=(4, grid.state_dim))
    sparse_flows = grid._flows_from_injection(grid.injection(c, x)) + grid._pf_shift_mw
    np.testing.assert_allclose(sparse_flows, grid.flows(c, x), atol=1e-8)  # flows() here goes through the dense PTDF
    ptdf, bth = GridDomain(mp.load_case("case118"), formulation="ptdf"), grid
    for ci in c:
        assert bth.cost(ci, bth.reference_solution(ci)) == pytest.approx(ptdf.cost(ci, ptdf.reference_solution(ci)), rel=1e-8)


LARGE = Path(os.environ.get("SCF_MATPOWER_DATA", "/nonexistent"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["case1354pegase", "case2383wp", "case13659pegase", "case_RTS_GMLC", "case300", "case_ACTIVSg2000", "case_ACTIVSg10k"])
def test_large_cases_from_matpowers_data_folder(name):
    """Set SCF_MATPOWER_DATA to MATPOWER's data/ folder to run these."""
    path = LARGE / f"{name}.m"
    if not path.is_file():
        pytest.skip(f"{path} not present (set SCF_MATPOWER_DATA to MATPOWER's data folder)")
    from scf.producers import optimize as opt

    target = opt.target(case=path)
    [d] = opt.optimize([opt.problem(target, {})], max_gap=1e-6)
    assert d.status == "optimal" and d.violations == [], d.message
