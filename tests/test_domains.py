"""Physical domains: MATPOWER cases, DC-OPF, the RC building, synthetic fossils, validation."""

from __future__ import annotations

import dataclasses

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from scf import domains
from scf.bus.events import Fossil, fossil_content_id
from scf.domains import matpower as mp
from scf.domains.fossils import FossilInvalid, synth_shards, to_fossil, validate_line
from scf.domains.grid import GridDomain

# --------------------------------------------------------------------------- case files


@pytest.mark.parametrize(
    "case, n_bus, n_gen, n_branch",
    [("case9", 9, 3, 9), ("case14", 14, 5, 20), ("case30", 30, 6, 41), ("case118", 118, 54, 186), ("case5", 5, 5, 6),
     ("case6ww", 6, 3, 11), ("case24_ieee_rts", 24, 33, 38), ("case39", 39, 10, 46), ("case57", 57, 7, 80)],
)
def test_case_files_parse_with_published_sizes(case, n_bus, n_gen, n_branch):
    c = mp.load_case(case)
    assert (c.bus.shape[0], c.gen.shape[0], c.branch.shape[0], c.gencost.shape[0]) == (n_bus, n_gen, n_branch, n_gen)
    assert c.base_mva == 100
    assert c.bus.shape[1] == 13 and c.gen.shape[1] == 21 and c.branch.shape[1] == 13


def test_case_parser_reports_broken_files():
    with pytest.raises(mp.CaseFormatError, match="missing mpc.gencost"):
        mp.parse_case("mpc.baseMVA = 100;\nmpc.bus = [1 3 0;];\nmpc.gen = [1 0;];\nmpc.branch = [1 2;];")
    with pytest.raises(mp.CaseFormatError, match="rows of different lengths"):
        mp.parse_case("mpc.bus = [1 2 3;\n 4 5;];")
    with pytest.raises(mp.CaseFormatError, match="use one of case118, case14, case24_ieee_rts, case30, case39, case5, case57, case6ww, case9"):
        mp.load_case("case300")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=3, max_size=3), min_size=1, max_size=6))
def test_case_parser_reads_back_what_was_written(rows):
    body = "\n".join("\t" + "\t".join(repr(v) for v in r) + ";  % a comment" for r in rows)
    inline = "; ".join(", ".join(repr(v) for v in r) for r in rows)  # one-line form: [a, b, c; d, e, f]
    text = f"mpc.baseMVA = 100;\nmpc.bus = [\n{body}\n];\nmpc.gen = [{inline}];\nmpc.branch = [\n{body}\n];\nmpc.gencost = [\n{body}\n];\nmpc.bus_name = {{'a'; 'b'}};"
    case = mp.parse_case(text)
    assert all(np.array_equal(m, np.array(rows)) for m in (case.bus, case.gen, case.branch, case.gencost))


def test_registry_names_and_unknown_domain():
    assert {"grid:case9", "grid:case14", "grid:case30", "grid:case118", "grid:case5", "grid:case6ww", "grid:case24_ieee_rts",
            "grid:case39", "grid:case57", "hvac:office3"} <= set(domains.names())
    assert domains.get("grid:case14") is domains.get("grid:case14")
    with pytest.raises(domains.UnknownDomain, match="unknown domain 'grid:case300': use one of grid:case9"):
        domains.get("grid:case300")


# --------------------------------------------------------------------------- grid: DC-OPF


def dcopf_b_theta(case: mp.MatpowerCase, loads: np.ndarray) -> tuple[float, np.ndarray]:
    """DC-OPF in the B-theta formulation, solved with SLSQP: an independent check of the
    PTDF + HiGHS formulation in domains.grid (no shifts or shunts in case9)."""
    bus, gen, br, cost = case.bus, case.gen, case.branch, case.gencost
    nb, ng = len(bus), len(gen)
    idx = {int(b): i for i, b in enumerate(bus[:, 0])}
    f = np.array([idx[int(v)] for v in br[:, 0]])
    t = np.array([idx[int(v)] for v in br[:, 1]])
    b = 1 / br[:, 3]
    bbus = np.zeros((nb, nb))
    for k in range(len(br)):
        bbus[f[k], f[k]] += b[k]
        bbus[t[k], t[k]] += b[k]
        bbus[f[k], t[k]] -= b[k]
        bbus[t[k], f[k]] -= b[k]
    cg = np.zeros((nb, ng))
    cg[[idx[int(v)] for v in gen[:, 0]], np.arange(ng)] = 1
    pd = np.zeros(nb)
    pd[bus[:, 2] != 0] = loads
    slack = int(np.flatnonzero(bus[:, 1] == 3)[0])
    c2, c1, c0 = cost[:, 4], cost[:, 5], cost[:, 6]
    rate = np.where(br[:, 5] > 0, br[:, 5], np.inf)

    def objective(v):
        pg = v[:ng]
        return float(np.sum(c2 * pg**2 + c1 * pg + c0))

    cons = [
        {"type": "eq", "fun": lambda v: case.base_mva * bbus @ v[ng:] - (cg @ v[:ng] - pd)},
        {"type": "eq", "fun": lambda v: v[ng + slack : ng + slack + 1]},
        {"type": "ineq", "fun": lambda v: rate - np.abs(case.base_mva * b * (v[ng + f] - v[ng + t]))},
    ]
    bounds = [(lo, hi) for lo, hi in gen[:, [9, 8]]] + [(-np.pi, np.pi)] * nb
    x0 = np.concatenate([np.full(ng, pd.sum() / ng), np.zeros(nb)])
    res = minimize(objective, x0, bounds=bounds, constraints=cons, method="SLSQP", options={"ftol": 1e-12, "maxiter": 500})
    assert res.success, res.message
    return res.fun, res.x[:ng]


def test_case9_dcopf_matches_published_optimum_and_b_theta_formulation():
    grid = domains.get("grid:case9")
    loads = grid.nominal_load
    x = grid.reference_solution(loads)
    # MATPOWER rundcopf(case9): 5216.03 $/hr
    assert grid.cost(loads, x) == pytest.approx(5216.03, abs=0.01)
    cost, pg = dcopf_b_theta(grid.case, loads)
    assert grid.cost(loads, x) == pytest.approx(cost, rel=1e-6)
    np.testing.assert_allclose(x, pg, atol=1e-2)
    assert grid.violations(loads, x) == []


def test_dcopf_with_a_binding_line_agrees_across_formulations():
    case = mp.load_case("case9")
    branch = case.branch.copy()
    branch[branch[:, 0] == 9, 5] = 40.0  # branch 9-4: 40 MW, binds at nominal load
    tight = dataclasses.replace(case, branch=branch)
    grid = GridDomain(tight, name="grid:case9-tight")
    loads = grid.nominal_load
    x = grid.reference_solution(loads)
    flows = grid.flows(loads, x)
    k = grid.branch_labels.index("9-4")
    assert abs(flows[k]) == pytest.approx(40.0, abs=1e-3)  # the limit binds
    cost, pg = dcopf_b_theta(tight, loads)
    assert grid.cost(loads, x) == pytest.approx(cost, rel=1e-6)
    assert grid.cost(loads, x) > domains.get("grid:case9").cost(loads, domains.get("grid:case9").reference_solution(loads))
    np.testing.assert_allclose(x, pg, atol=1e-2)


# MATPOWER rundcopf; case5, case39 and case57 as published in other projects' tests of MATPOWER's DC OPF: case5 17479.89677
# (Egret's and PowerModels' DC-OPF tests), case39 41263.94078588 ("from MATPOWER v8.0b1", the AMS project's known results),
# case57 41006.736942 (PYPOWER's t_opf_dc values). case6ww and case24_ieee_rts: no published DC value found (session 9).
@pytest.mark.parametrize("name, optimum", [("grid:case14", 7642.59), ("grid:case30", 565.21), ("grid:case118", 125947.88),
                                           ("grid:case5", 17479.90), ("grid:case39", 41263.94), ("grid:case57", 41006.74)])
def test_nominal_dcopf_costs_match_matpower(name, optimum):
    grid = domains.get(name)
    x = grid.reference_solution(grid.nominal_load)
    assert grid.cost(grid.nominal_load, x) == pytest.approx(optimum, abs=0.01)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_ptdf_flows_equal_a_dc_power_flow_solve(seed):
    grid = domains.get("grid:case30")
    rng = np.random.default_rng(seed)
    c = grid.sample_context(rng)
    x = rng.uniform(*grid.state_bounds)
    x *= grid.demand(c) / x.sum()  # a balanced injection
    case, idx = grid.case, {int(b): i for i, b in enumerate(grid.case.bus[:, 0])}
    p = np.zeros(len(case.bus))
    np.add.at(p, [idx[int(v)] for v in case.gen[:, 0]], x)
    p[grid.load_buses] -= c
    f = np.array([idx[int(v)] for v in case.branch[:, 0]])
    t = np.array([idx[int(v)] for v in case.branch[:, 1]])
    b = 1 / (case.branch[:, 3] * np.where(case.branch[:, 8] == 0, 1, case.branch[:, 8]))
    lap = np.zeros((len(p), len(p)))
    np.add.at(lap, (f, f), b), np.add.at(lap, (t, t), b), np.add.at(lap, (f, t), -b), np.add.at(lap, (t, f), -b)
    theta = np.linalg.lstsq(lap, p, rcond=None)[0]
    np.testing.assert_allclose(grid.flows(c, x), b * (theta[f] - theta[t]), atol=1e-6)


def test_grid_violations_name_the_constraint_and_its_size():
    grid = domains.get("grid:case9")
    loads = grid.nominal_load  # 315 MW
    x = grid.pmax.copy()  # 820 MW
    (balance,) = [v for v in grid.violations(loads, x) if v.constraint == "power_balance"]
    assert balance.size == pytest.approx(505.0) and balance.unit == "MW"
    assert "power_balance" in balance.message and "505.000 MW" in balance.message
    over = grid.violations(loads, np.array([260.0, 40.0, 15.0]))
    (gen,) = [v for v in over if v.constraint.startswith("gen_limit")]
    assert gen.size == pytest.approx(10.0) and "above Pmax 250.00 MW by 10.000 MW" in gen.message
    best = grid.reference_solution(loads)
    ramp = grid.violations(loads, best, previous_state=best + np.array([100.0, -100.0, 0.0]))
    assert [v.constraint for v in ramp] == ["ramp[Pg1@bus1]", "ramp[Pg2@bus2]"]
    assert ramp[0].size == pytest.approx(100.0 - 0.3 * 250)


def test_line_violation_reported_with_flow_and_rating():
    case = mp.load_case("case9")
    branch = case.branch.copy()
    branch[branch[:, 0] == 9, 5] = 40.0
    grid = GridDomain(dataclasses.replace(case, branch=branch), name="grid:case9-tight")
    x = domains.get("grid:case9").reference_solution(grid.nominal_load)  # ignores the tight line
    (line,) = [v for v in grid.violations(grid.nominal_load, x) if v.constraint.startswith("line_limit")]
    assert line.constraint == "line_limit[9-4]"
    assert line.size == pytest.approx(abs(grid.flows(grid.nominal_load, x)[-1]) - 40.0)
    assert "exceeds rateA 40.00 MW" in line.message


@pytest.mark.parametrize("name", ["grid:case14", "grid:case30", "hvac:office3"])
def test_synthesized_observations_verify_and_span_poor_to_optimal(name):
    d = domains.get(name)
    rng = np.random.default_rng(7)
    samples = d.synthesize(rng, 40)
    assert all(s.verified for s in samples), [s.detail for s in samples if not s.verified]
    gaps = [s.energy - d.cost(s.context, d.reference_solution(s.context)) for s in samples]
    assert min(gaps) >= -1e-6 * max(1.0, max(abs(s.energy) for s in samples))  # never beats the optimum
    assert max(gaps) > 0  # and some are clearly worse
    bad = d.synthesize(rng, 30, infeasible_fraction=1.0)
    assert not any(s.verified for s in bad)
    assert all(d.in_bounds(s.context, s.state) is None for s in bad)  # infeasible, yet in bounds


@pytest.mark.parametrize("name", ["grid:case30", "hvac:office3"])
def test_project_finds_the_nearest_feasible_state(name):
    d = domains.get(name)
    rng = np.random.default_rng(4)
    lo, hi = d.state_bounds
    for _ in range(10):
        c = d.sample_context(rng)
        try:
            feasible = d.random_feasible(c, rng)
        except domains.Infeasible:
            continue
        np.testing.assert_allclose(d.project(c, feasible), feasible, atol=1e-5 * (hi - lo).max())  # already feasible
        x = rng.uniform(lo, hi)
        p = d.project(c, x)
        assert d.violations(c, p) == []
        half = (hi - lo) / 2
        # no random feasible point is nearer (in half-ranges, summed)
        others = [d.random_feasible(c, rng) for _ in range(5)]
        assert all(np.abs((p - x) / half).sum() <= np.abs((o - x) / half).sum() + 1e-6 for o in others)


# --------------------------------------------------------------------------- hvac


def test_hvac_reference_is_feasible_and_no_worse_than_random_feasible():
    hvac = domains.get("hvac:office3")
    rng = np.random.default_rng(3)
    for i in range(20):
        c = hvac.sample_context(rng, index=i)
        try:
            best = hvac.reference_solution(c)
        except domains.Infeasible:
            continue
        assert hvac.violations(c, best) == []
        for _ in range(5):
            other = hvac.random_feasible(c, rng)
            assert hvac.violations(c, other) == []
            assert hvac.cost(c, best) <= hvac.cost(c, other) + 1e-9


def test_hvac_violations_detected():
    hvac = domains.get("hvac:office3")
    # a chilly occupied morning, zones at 19 °C, HVAC off: every zone falls below 21 °C
    cold = np.array([5.0, 9.0, 1.0, 1.0, 1.0, 19.0, 19.0, 19.0])
    off = np.zeros(3)
    found = hvac.violations(cold, off)
    assert [v.constraint for v in found] == ["comfort[open_plan]", "comfort[meeting]", "comfort[south_office]"]
    assert all(v.unit == "K" and v.size > 0 and "below the occupied band 21.0-24.0 °C" in v.message for v in found)
    best = hvac.reference_solution(cold)
    assert hvac.violations(cold, best) == []
    assert hvac.next_temperature(cold, best) == pytest.approx(np.array([21.0, 21.0, 21.0]), abs=1e-6)  # just warm enough
    ramp = hvac.violations(cold, best, previous_state=best - np.array([0.0, 10.0, 0.0]))
    assert [v.constraint for v in ramp] == ["ramp[meeting]"] and ramp[0].size == pytest.approx(6.0)
    too_much = hvac.violations(cold, np.array([15.0, 0.0, 0.0]))
    assert any(v.constraint == "equipment[open_plan]" and v.size == pytest.approx(3.0) for v in too_much)
    assert hvac.in_bounds(cold, np.array([15.0, 0.0, 0.0])) == "state[u[open_plan]] = 15 is above its bound 12"


def test_hvac_energy_counts_heating_and_cooling_through_their_cop():
    hvac = domains.get("hvac:office3")
    c = hvac.sample_context(np.random.default_rng(0))
    assert hvac.cost(c, np.array([3.5, -3.0, 0.0])) == pytest.approx(1.0 + 1.0)


# --------------------------------------------------------------------------- fossil shards and validation


@pytest.fixture(scope="module")
def case14_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("case14")
    return synth_shards("grid:case14", 60, out, shard_size=25, seed=11, infeasible_fraction=0.2)


def test_synth_shards_writes_deterministic_verified_fossils(case14_shards, tmp_path):
    assert [p.name for p in case14_shards] == ["fossils-00000.ndjson", "fossils-00001.ndjson", "fossils-00002.ndjson"]
    lines = [line for p in case14_shards for line in p.read_bytes().splitlines()]
    assert len(lines) == 60
    fossils = [msgspec.json.decode(line, type=Fossil) for line in lines]
    assert all(f.fossil_id == fossil_content_id(f) for f in fossils)
    assert {f.provenance.source for f in fossils} == {"synth:grid:case14"}
    assert {f.provenance.verifier for f in fossils} == {"grid.dc_check"}
    assert all(f.observed_at.utcoffset().total_seconds() == 0 for f in fossils)
    verified = [f for f in fossils if f.provenance.verified]
    assert 0 < len(verified) < 60  # infeasible_fraction=0.2 leaves some unverified
    for f in verified:
        assert validate_line(msgspec.json.encode(f), recheck=True) == f
    again = synth_shards("grid:case14", 60, tmp_path, shard_size=25, seed=11, infeasible_fraction=0.2, processes=2)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in case14_shards]  # same seed, same bytes


def _line(case14_shards, verified=True) -> Fossil:
    for p in case14_shards:
        for line in p.read_bytes().splitlines():
            f = msgspec.json.decode(line, type=Fossil)
            if f.provenance.verified == verified:
                return f
    raise AssertionError("no such fossil")


def _with(fossil: Fossil, **changes) -> bytes:
    """The fossil with changes and a recomputed (correct) content id, as a line."""
    content = msgspec.structs.replace(fossil.content(), **changes)
    return msgspec.json.encode(Fossil(**msgspec.structs.asdict(content), fossil_id=fossil_content_id(content)))


def test_validate_line_reasons(case14_shards):
    good = _line(case14_shards)
    raw = msgspec.json.encode(good)
    assert validate_line(raw) == good

    cases = {
        "malformed_json": raw[:-10],
        "schema": raw.replace(b'"energy":', b'"energy":"lots","x":'),
        "content_id_mismatch": _with(good, energy=good.energy + 1.0).replace(
            fossil_content_id(msgspec.structs.replace(good.content(), energy=good.energy + 1.0)).encode(), good.fossil_id.encode()
        ),
        "missing_provenance": msgspec.json.encode({k: v for k, v in msgspec.structs.asdict(good).items() if k != "provenance"}),
        "out_of_bounds": _with(good, state=[good.state[0] + 1000.0, *good.state[1:]]),
        "unknown_domain": _with(good, domain="grid:case300"),
        "verifier_failed": msgspec.json.encode(_line(case14_shards, verified=False)),
        "shape_mismatch": _with(good, state=good.state[:-1]),
    }
    for reason, line in cases.items():
        with pytest.raises(FossilInvalid) as info:
            validate_line(line)
        assert info.value.reason == reason, (reason, str(info.value))
        assert isinstance(info.value, ValueError)
        assert str(info.value).startswith(f"{reason}: ")
    with pytest.raises(FossilInvalid, match=r"schema: Expected `float`, got `str` - at `\$.energy`"):
        validate_line(cases["schema"])
    with pytest.raises(FossilInvalid, match=r"out_of_bounds: grid:case14: state\[Pg1@bus1\] = .* is above its bound 332.4"):
        validate_line(cases["out_of_bounds"])
    empty = _with(good, provenance=msgspec.structs.replace(good.provenance, source=" "))
    with pytest.raises(FossilInvalid, match="missing_provenance: provenance.source is empty"):
        validate_line(empty)
    # a claimed-verified line whose energy is not the cost of its state: only a recheck sees it
    lying = _with(good, energy=good.energy * 0.5)
    assert validate_line(lying).energy == good.energy * 0.5
    with pytest.raises(FossilInvalid, match="recheck_failed: grid.dc_check: energy"):
        validate_line(lying, recheck=True)


@settings(max_examples=30, deadline=None)
@given(position=st.integers(0, 10_000), byte=st.integers(0, 255))
def test_validate_line_never_accepts_a_changed_byte_silently(case14_shards, position, byte):
    good = _line(case14_shards)
    raw = bytearray(msgspec.json.encode(good))
    position %= len(raw)
    if raw[position] == byte:
        return
    raw[position] = byte
    try:
        fossil = validate_line(bytes(raw))
    except FossilInvalid:
        return
    # accepted only if the change did not change the content (e.g. whitespace, an equal float spelling)
    assert fossil == good


def test_to_fossil_round_trips_through_validation():
    grid = domains.get("grid:case9")
    (sample,) = grid.synthesize(np.random.default_rng(0), 1)
    import datetime as dt

    fossil = to_fossil(grid, sample, dt.datetime(2025, 6, 1, tzinfo=dt.timezone.utc), "meter:substation-4")
    assert validate_line(msgspec.json.encode(fossil), recheck=True) == fossil
