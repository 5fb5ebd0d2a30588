"""The certified optimiser: duality bounds checked without a solver, the max-gap fallback,
contract constraints, bad input in one line, `scf optimize` and its batch files."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scf import domains
from scf.domains import matpower as mp
from scf.domains.certify import lower_bound, recover_dual
from scf.producers import optimize as opt
from tests.conftest import cli


def scf_optimize(tmp_path, *args: str):
    """`scf optimize ARGS` in this process (no bus needed), with a home of its own."""
    return cli("optimize", *args, env={"SCF_HOME": str(tmp_path / "home"), "PATH": os.environ.get("PATH", "")})


def _problems(name: str, n: int, seed: int = 0) -> list[opt.Problem]:
    d = domains.get(name)
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        c = d.sample_context(rng, index=len(out) + 8)
        try:
            d.reference_solution(c)
        except domains.Infeasible:
            continue
        out.append(opt.problem(d, {"context": list(c)}))
    return out


# --------------------------------------------------------------------------- certificates


@pytest.mark.parametrize("name", ["grid:case14", "grid:case118", "hvac:office3"])
def test_exact_decisions_carry_tight_certificates_that_check_without_a_solver(name):
    problems = _problems(name, 12)
    decisions = opt.optimize(problems, method="exact", max_gap=1e-7)
    assert [d.status for d in decisions] == ["optimal"] * 12, [d.message for d in decisions]
    for p, d in zip(problems, decisions):
        cert = d.certificate
        assert cert.lower_bound <= cert.cost and cert.rel_gap <= 1e-7
        assert opt.check_certificate(p, d.state, cert) is None
        assert d.cost == pytest.approx(p.domain.cost(p.context, p.domain.reference_solution(p.context)), rel=1e-7)


def test_a_forged_certificate_is_caught():
    [p] = _problems("grid:case118", 1)
    [d] = opt.optimize([p])
    cert = d.certificate
    inflated = type(cert)(cert.cost, cert.lower_bound + 1.0, cert.gap - 1.0, 0.0, cert.dual, "solver")
    assert opt.check_certificate(p, d.state, inflated).startswith("the multipliers give a lower bound of")
    cheaper = type(cert)(cert.cost - 5, cert.lower_bound, cert.gap, cert.rel_gap, cert.dual, "solver")
    assert opt.check_certificate(p, d.state, cheaper).startswith("the certificate says cost")
    broken = d.state + np.r_[1.0, np.zeros(len(d.state) - 1)]
    assert opt.check_certificate(p, broken, cert).startswith("the decision is not feasible: power_balance")


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(0.0, 3.0))
def test_any_multipliers_give_a_valid_lower_bound(seed, scale):
    """Weak duality, the property the certificates rest on: whatever the multipliers, the
    bound never exceeds the true optimum (HiGHS's, found independently)."""
    rng = np.random.default_rng(seed)
    for name in ("grid:case30", "hvac:office3", "grid:case9"):
        [p] = _problems(name, 1, seed=seed % 1000)
        d = p.domain
        optimum = d.cost(p.context, d.reference_solution(p.context))
        rows = d.constraint_rows(p.context)
        y = rng.normal(scale=scale * max(1.0, abs(optimum)) / 100, size=len(rows.lo))
        assert lower_bound(d.separable_cost, rows, p.lo, p.hi, y) <= optimum + 1e-9 * max(1.0, abs(optimum))


@pytest.mark.parametrize("name, tight", [("grid:case118", True), ("grid:case14", True), ("hvac:office3", False)])
def test_recovered_multipliers_certify_a_near_optimal_decision(name, tight):
    """A decision near the optimum (the optimum nudged and projected back to feasibility,
    as a repaired learned proposal would be): the bound recovered from the decision alone
    is always valid; on the grid its certified gap is close to the true gap. On the HVAC LP
    the coordinate ascent can stall on the piecewise-linear dual (a loose, still valid bound:
    `max_gap` then falls back to the exact LP; docs/optimise.md)."""
    rng = np.random.default_rng(5)
    for p in _problems(name, 8, seed=5):
        d = p.domain
        best = d.reference_solution(p.context)
        optimum = d.cost(p.context, best)
        lo, hi = d.state_bounds
        x = d.project(p.context, best + rng.normal(scale=0.005 * (hi - lo)))
        rows = d.constraint_rows(p.context)
        y = recover_dual(d.separable_cost, rows, p.lo, p.hi, x)
        bound = lower_bound(d.separable_cost, rows, p.lo, p.hi, y)
        true_gap = d.cost(p.context, x) - optimum
        assert bound <= optimum + 1e-7 * max(1.0, abs(optimum))
        if tight:
            assert d.cost(p.context, x) - bound <= 1.5 * true_gap + 1e-6 * max(1.0, abs(optimum))


def test_candidates_beyond_max_gap_fall_back_to_a_warm_started_exact_solve():
    problems = _problems("grid:case14", 6, seed=2)
    rng = np.random.default_rng(2)
    loose, tight = [], []
    for p in problems:
        poor = np.stack([p.domain.random_feasible(p.context, rng) for _ in range(3)])  # feasible, far from optimal
        loose.append(opt.choose(p, poor, max_gap=None, model_id="random"))
        tight.append(opt.choose(p, poor, max_gap=1e-4, model_id="random"))
    assert all(d.status == "optimal" and not d.fallback and d.certificate.rel_gap > 1e-4 for d in loose)
    assert all(d.status == "optimal" and d.fallback and d.certificate.rel_gap <= 1e-4 for d in tight)
    assert opt.summary(tight)["fallback_rate"] == 1.0 and opt.summary(loose)["fallback_rate"] == 0.0
    near = [opt.choose(p, p.domain.reference_solution(p.context)[None], max_gap=1e-4, model_id="m") for p in problems]
    assert not any(d.fallback for d in near) and all(d.method == "learned" for d in near)


def test_a_batch_of_candidates_is_certified_at_once_and_predicted_multipliers_are_used():
    problems = _problems("grid:case118", 20, seed=3)
    rng = np.random.default_rng(3)
    exact = opt.optimize(problems)
    lo, hi = problems[0].domain.state_bounds
    cands = np.stack([[d.state, p.domain.project(p.context, d.state + rng.normal(scale=0.02 * (hi - lo)))] for p, d in zip(problems, exact)])
    batch = opt.choose_batch(problems, cands, max_gap=1e-6, model_id="m", repaired=True)
    assert all(d.status == "optimal" and not d.fallback for d in batch)  # the optimum is among each pair's candidates
    assert [round(d.cost, 6) for d in batch] == [round(d.cost, 6) for d in exact]
    single = [opt.choose(p, c, max_gap=None) for p, c in zip(problems, cands[:, 1:])]
    again = opt.choose_batch(problems, cands[:, 1:], max_gap=None)
    np.testing.assert_allclose([d.certificate.lower_bound for d in again], [d.certificate.lower_bound for d in single], rtol=1e-9)
    # a model that also predicts multipliers: the exact ones certify a near-optimal candidate at least as tightly
    duals = np.stack([d.certificate.dual for d in exact])
    predicted = opt.choose_batch(problems, cands[:, 1:], max_gap=None, duals=duals)
    assert all(p.certificate.lower_bound >= s.certificate.lower_bound - 1e-9 * abs(s.cost) for p, s in zip(predicted, again))
    assert {d.certificate.source for d in predicted} <= {"predicted", "recovered"}
    for p, d in zip(problems, predicted):
        assert opt.check_certificate(p, d.state, d.certificate) is None


def test_learned_method_without_a_checkpoint_is_one_line():
    p = _problems("grid:case14", 1)
    with pytest.raises(opt.OptimizeError) as err:
        opt.optimize(p, method="learned")
    assert str(err.value) == "method 'learned' needs a checkpoint (--checkpoint PATH)"
    assert opt.optimize(p, method="auto")[0].method == "exact"  # no checkpoint: exact


# --------------------------------------------------------------------------- contracts


def test_contract_constraints_change_the_decision():
    grid = domains.get("grid:case14")
    [base, out, derated, ramped] = opt.optimize([
        opt.problem(grid, {}),
        opt.problem(grid, {"outages": {"generators": ["Pg2@bus2"]}}),
        opt.problem(grid, {"derates": {"generators": {"1": 0.5}}}),
        opt.problem(grid, {"previous": [200, 40, 10, 0, 0]}),
    ])  # fmt: skip
    assert out.state[1] == 0 and out.cost > base.cost
    assert derated.state[0] <= 0.5 * grid.pmax[0] + 1e-6
    assert np.all(np.abs(ramped.state - [200, 40, 10, 0, 0]) <= grid.ramp + 1e-6)
    assert all(d.status == "optimal" for d in (base, out, derated, ramped))
    assert set(base.slacks) >= {"power_balance", "branch[1-2]", "limit[Pg1@bus1]"} and len(base.slacks) == 1 + len(grid.limited) + 5


def test_branch_outage_and_derate_build_their_own_network():
    grid = domains.get("grid:case30")
    p = opt.problem(grid, {"outages": {"branches": ["6-8"]}, "derates": {"branches": {"2-4": 0.3}}})
    assert p.domain is not grid and p.domain.context_names == grid.context_names
    [d] = opt.optimize([p])
    k = p.domain.branch_labels.index("2-4")
    assert abs(p.domain.flows(p.context, d.state)[k]) <= 0.3 * grid.rate[grid.branch_labels.index("2-4")] + 1e-6
    assert "6-8" not in p.domain.branch_labels


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"loads": {"99": 3}}, "loads: bus 99 is not a bus of the case; loads may be set at buses 2, 3, 4, 5, 6, 9, 10, 11…"),
        ({"loads": {"5": -3}}, "negative load -3 MW at Pd@bus5, a bus that consumes in the case; give a load >= 0"),
        ({"outages": {"branches": ["1-9"]}}, "unknown branch '1-9' in grid:case14: name a branch as 'from-to' bus numbers, e.g. '1-2'"),
        ({"derates": {"generators": {"Pg1@bus1": 2}}}, "derates.generators[Pg1@bus1] = 2: a derate is a fraction of Pmax between 0 and 1"),
        ({"load_scale": "big"}, "load_scale must be a finite number, got 'big'"),
        ({"outages": {"branches": "1-2"}}, "outages.branches must be a list like [\"from-to\", ...], got '1-2'"),
        ({"wind": 3}, "unknown constraint 'wind' for grid:case14; use budget, context, derates, load_scale, loads, outages, previous"),
    ],
)
def test_bad_grid_input_is_one_clear_line(spec, message):
    with pytest.raises(opt.OptimizeError) as err:
        opt.problem(domains.get("grid:case14"), spec)
    assert str(err.value) == message


def test_infeasible_problems_say_which_constraints_conflict():
    grid = domains.get("grid:case14")
    [d] = opt.optimize([opt.problem(grid, {"load_scale": 3})])
    assert d.status == "infeasible"
    assert d.message.endswith("demand 777.00 MW exceeds the generation capacity 772.40 MW: power_balance conflicts with gen_limit")
    [d] = opt.optimize([opt.problem(grid, {"budget": 100})])
    assert "the budget 100 $/h is below the least cost 7642.59 $/h that meets the other constraints" in d.message
    hvac = domains.get("hvac:office3")
    cold = {"T_out": -15, "hour": 9, "occupancy": [1, 1, 1], "T0": [12, 12, 12]}
    [d] = opt.optimize([opt.problem(hvac, cold)])
    assert d.status == "infeasible" and "comfort[open_plan] needs 7.62 K more heating than equipment[open_plan]" in d.message


@pytest.mark.parametrize("formulation", ["ptdf", "b-theta", "lazy"])
def test_a_conflict_no_cheap_check_explains_is_named_from_highs_iis(formulation):
    """Generator 1 must make 50 MW but its only line carries 10: neither the capacity check
    nor a single branch's reach explains it; HiGHS's irreducible infeasible set does."""
    import dataclasses

    from scf.domains.grid import GridDomain

    case = mp.load_case("case9")
    branch, gen = case.branch.copy(), case.gen.copy()
    branch[(branch[:, 0] == 1) & (branch[:, 1] == 4), mp.RATE_A] = 10.0
    gen[0, mp.PMIN] = 50.0
    grid = GridDomain(dataclasses.replace(case, branch=branch, gen=gen), name="grid:case9-cut", formulation=formulation)
    [d] = opt.optimize([opt.problem(grid, {})])
    assert d.status == "infeasible"
    assert "these constraints conflict (an irreducible infeasible set from HiGHS): power_balance" in d.message
    assert "line_limit[1-4]" in d.message and "gen_limit[Pg1@bus1]" in d.message


def test_hvac_comfort_bands_and_context_by_name():
    hvac = domains.get("hvac:office3")
    spec = {"T_out": 0, "hour": 9, "occupancy": {"open_plan": 1, "meeting": 0, "south_office": 1}, "T0": [21, 21, 21]}
    [wide, narrow] = opt.optimize([opt.problem(hvac, spec), opt.problem(hvac, {**spec, "comfort": {"occupied": [22, 23]}})])
    assert narrow.cost > wide.cost and narrow.status == wide.status == "optimal"
    assert min(narrow.slacks[f"comfort[{z}]"] for z in ("open_plan", "south_office")) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(opt.OptimizeError, match=r"^comfort.occupied = \[24, 22\]: the low end is above the high end$"):
        opt.problem(hvac, {**spec, "comfort": {"occupied": [24, 22]}})


# --------------------------------------------------------------------------- the CLI


def test_cli_prints_one_json_object_per_decision(tmp_path):
    r = scf_optimize(tmp_path, "--domain", "grid:case9", "--context", '{"load_scale": 1.1}', "--json", "--max-gap", "1e-6")
    assert r.returncode == 0, r.output
    [line] = r.stdout.strip().splitlines()
    d = json.loads(line)
    assert d["status"] == "optimal" and d["method"] == "exact" and d["rel_gap"] <= 1e-6
    assert set(d["decision"]) == {"Pg1@bus1", "Pg2@bus2", "Pg3@bus3"}
    assert d["lower_bound"] <= d["cost"] and "power_balance" in d["slack"] and d["timings"]["total_s"] > 0


def test_cli_bad_input_is_one_line(tmp_path):
    r = scf_optimize(tmp_path, "--domain", "grid:case14", "--context", '{"loads": {"99": 1}}')
    assert r.returncode == 1
    assert r.stderr.strip() == "Error: loads: bus 99 is not a bus of the case; loads may be set at buses 2, 3, 4, 5, 6, 9, 10, 11…"
    r = scf_optimize(tmp_path, "--domain", "grid:case14", "--context", "{nope")
    assert r.stderr.strip() == "Error: --context is not valid JSON (Expecting property name enclosed in double quotes at position 1); give a JSON object"
    r = scf_optimize(tmp_path, "--domain", "grid:case14", "--context", '{"load_scale": 3}')
    assert r.returncode == 1 and r.stderr.strip().endswith("power_balance conflicts with gen_limit")
    r = scf_optimize(tmp_path, "--case", "no/such.m")
    assert r.stderr.strip() == "Error: no MATPOWER case at no/such.m: use one of case118, case14, case24_ieee_rts, case30, case39, case5, case57, case6ww, case9 or a path to a .m file"


def test_cli_batch_jsonl_to_parquet(tmp_path):
    batch = tmp_path / "contexts.jsonl"
    batch.write_text('{"load_scale": 1.0}\n{"load_scale": 1.05, "outages": {"generators": [3]}}\n{"load_scale": 9}\n')
    out = tmp_path / "decisions.parquet"
    r = scf_optimize(tmp_path, "--case", str(mp.DATA_DIR / "case30.m"), "--batch", str(batch), "--out", str(out))
    assert r.returncode == 0, r.output
    assert r.stdout.strip().startswith("3 decisions: 2 optimal, 0 uncertified, 1 infeasible; fallback rate 0.0%")
    table = pq.read_table(out)
    assert table.column("status").to_pylist() == ["optimal", "optimal", "infeasible"]
    assert table.column("state").to_pylist()[1][2] == 0.0
    names = json.loads(table.schema.metadata[b"slack_names"])
    assert names[0] == "power_balance" and len(table.column("slack").to_pylist()[0]) == len(names)
    import pyarrow as pa

    d = domains.get("grid:case30")
    rng = np.random.default_rng(8)
    contexts = [d.sample_context(rng) for _ in range(3)]
    by_list, by_name = tmp_path / "list.parquet", tmp_path / "named.parquet"
    pq.write_table(pa.table({"context": [list(c) for c in contexts]}), by_list)
    pq.write_table(pa.table({name: [c[j] for c in contexts] for j, name in enumerate(d.context_names)}), by_name)
    costs = []
    for path in (by_list, by_name):
        r = scf_optimize(tmp_path, "--domain", "grid:case30", "--batch", str(path), "--json")
        assert r.returncode == 0, r.stderr
        costs.append([json.loads(line)["cost"] for line in r.stdout.strip().splitlines()])
    assert costs[0] == costs[1] and costs[0] == pytest.approx([d.cost(c, d.reference_solution(c)) for c in contexts], rel=1e-9)
    r = scf_optimize(tmp_path, "--domain", "grid:case30", "--batch", str(batch).replace("jsonl", "csv"))
    assert r.stderr.strip() == f"Error: no batch file at {str(batch).replace('jsonl', 'csv')}; give a .jsonl or .parquet file"
