"""The batched torch repair and polish (ml/repair_torch.py) against the numpy repair
(domains/repair.py) and the domains' own `violations` check, on the CPU."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from scf import domains
from scf.domains import matpower as mp
from scf.domains.base import Infeasible
from scf.domains.grid import GridDomain
from scf.domains.repair import batch_rows, repair_batch
from scf.ml.repair_torch import device_rows, repair_batch_t


def _contexts(domain, n, seed):
    rng = np.random.default_rng(seed)
    out, best = [], []
    while len(out) < n:
        c = domain.sample_context(rng)
        try:
            best.append(domain.reference_solution(c))
        except Infeasible:
            continue
        out.append(c)
    return np.array(out), np.array(best), rng


def _congested_case30():
    case = mp.load_case("case30")
    branch = case.branch.copy()
    branch[:, mp.RATE_A] *= 0.7
    return GridDomain(dataclasses.replace(case, branch=branch), name="grid:case30x0.7")


def _ok(domain, c, states):
    return np.array([not domain.violations(ci, xi) for ci, xi in zip(c, states)])


@pytest.mark.parametrize("name", ["grid:case14", "grid:case118", "hvac:office3"])
def test_device_rows_are_the_numpy_rows(name):
    d = domains.get(name)
    c, _, _ = _contexts(d, 20, 4)
    a, lo, hi = batch_rows(d, c)
    rows = device_rows(d, torch.as_tensor(c, dtype=torch.float64))
    np.testing.assert_allclose(rows.a.numpy(), a, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rows.lo.numpy(), lo, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(rows.hi.numpy(), hi, rtol=1e-10, atol=1e-9)
    assert list(rows.eq_host) == list(np.all(lo == hi, axis=0) & np.all(a != 0, axis=1))


@pytest.mark.parametrize("name", ["grid:case14", "grid:case30", "hvac:office3"])
def test_noisy_optima_repaired_in_torch_pass_the_domains_check_like_the_numpy_repair(name):
    d = domains.get(name)
    c, best, rng = _contexts(d, 80, 0)
    lo, hi = d.state_bounds
    proposals = best + rng.normal(scale=0.05, size=best.shape) * (hi - lo)
    broken = ~_ok(d, c, proposals)
    assert broken.sum() >= 20  # many proposals really were infeasible
    ref = repair_batch(d, c, proposals)
    got, states_t = repair_batch_t(d, c, torch.as_tensor(proposals))
    assert _ok(d, c, ref.states).all() and _ok(d, c, got.states).all()
    assert got.feasible.all() and np.array_equal(got.feasible, ref.feasible)
    assert got.fallback.sum() <= ref.fallback.sum()
    np.testing.assert_array_equal(states_t.numpy(), got.states)
    in_bounds = np.all((proposals >= lo) & (proposals <= hi), axis=1)
    assert np.all(got.moved[~broken & in_bounds] == 0)  # a feasible proposal is left alone
    assert np.all(got.moved[broken] > 0)


def test_the_written_out_solve_is_a_solve():
    from scf.ml.repair_torch import _spd_solve_small

    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 4):
        q = torch.randn(50, n, n, generator=gen, dtype=torch.float64)
        m = q @ q.transpose(1, 2) + 0.1 * torch.eye(n, dtype=torch.float64)
        b = torch.randn(50, n, 1, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(_spd_solve_small(m, b), torch.linalg.solve(m, b))


def test_the_recordable_least_norm_stage_repairs_hvac_like_the_compacted_one():
    """HVAC's few rows: the fixed-count stage over the whole batch (what a GPU records as a
    graph; here its bookkeeping on the CPU) repairs what the compacted, early-stopping one does."""
    d = domains.get("hvac:office3")
    c, best, rng = _contexts(d, 80, 3)
    lo, hi = d.state_bounds
    proposals = best + rng.normal(scale=0.05, size=best.shape) * (hi - lo)
    assert (~_ok(d, c, proposals)).sum() >= 20
    plain, _ = repair_batch_t(d, c, torch.as_tensor(proposals))
    cache: dict = {}
    for _ in range(2):  # recorded, then replayed
        graphed, _ = repair_batch_t(d, c, torch.as_tensor(proposals), graphs=cache, emulate=True)
        assert _ok(d, c, graphed.states).all() and graphed.feasible.all()
        assert graphed.fallback.sum() <= plain.fallback.sum()
        np.testing.assert_allclose(graphed.states, plain.states, atol=1e-3)
    assert list(cache) == [("least_norm", id(device_rows(d, torch.as_tensor(c)).consts), len(c), "cpu", 12)]


def test_congested_line_overloads_are_relieved_in_torch_keeping_the_balance():
    d = _congested_case30()
    c, _, rng = _contexts(d, 80, 1)
    vertices = np.stack([d.random_feasible(ci, rng, vertices=1) for ci in c])
    proposals = np.clip(vertices + rng.normal(scale=0.1, size=vertices.shape) * (d.pmax - d.pmin), d.pmin, d.pmax)
    overloaded = np.array([any(v.constraint.startswith("line_limit") for v in d.violations(ci, xi)) for ci, xi in zip(c, proposals)])
    assert overloaded.sum() >= 15
    merit = np.broadcast_to(np.arange(1.0, d.state_dim + 1), proposals.shape)  # any merit order
    ref = repair_batch(d, c, proposals, merit=merit)
    got, _ = repair_batch_t(d, c, torch.as_tensor(proposals), merit=torch.as_tensor(merit.copy()))
    assert _ok(d, c, ref.states).all() and _ok(d, c, got.states).all()
    assert got.feasible.all() and got.fallback.sum() <= ref.fallback.sum()
    np.testing.assert_allclose(got.states.sum(1), d.demand(c), atol=1e-3)


def test_what_the_cheap_steps_leave_is_projected_exactly_and_counted():
    """With no least-norm iterations, every proposal outside a row after the clip goes to the
    exact projection: the fallback count is exactly those, and all end feasible."""
    d = domains.get("hvac:office3")
    c, best, rng = _contexts(d, 60, 2)
    lo, hi = d.state_bounds
    proposals = np.clip(best + rng.normal(scale=0.05, size=best.shape) * (hi - lo), lo, hi)
    broken = ~_ok(d, c, proposals)
    got, _ = repair_batch_t(d, c, torch.as_tensor(proposals), iterations=0)
    assert broken.sum() >= 10
    # the repair's own tolerance is half the domain's, so it projects at least what the domain flags
    assert got.fallback[broken].all() and got.fallback.sum() >= broken.sum()
    assert got.feasible.all() and _ok(d, c, got.states).all()
    full, _ = repair_batch_t(d, c, torch.as_tensor(proposals))
    assert full.fallback.sum() < got.fallback.sum()  # the iterations do the work otherwise


def test_an_infeasible_context_is_reported_not_raised_and_non_finite_proposals_repaired():
    d = domains.get("hvac:office3")
    rng = np.random.default_rng(0)
    c = np.array([d.sample_context(rng) for _ in range(4)])
    c[0, 0], c[0, 5:8] = 45.0, 35.0  # hot outside, zones at 35 °C: no cooling reaches the band
    c[1, 2:5] = 0.0
    with pytest.raises(Infeasible):
        d.reference_solution(c[0])
    x = np.zeros((4, d.state_dim))
    x[1, 0] = np.nan
    got, _ = repair_batch_t(d, c, torch.as_tensor(x))
    assert not got.feasible[0] and got.fallback[0]
    assert np.isfinite(got.states).all()
    for i in range(1, 4):
        try:
            d.reference_solution(c[i])
        except Infeasible:
            continue
        assert got.feasible[i] and not d.violations(c[i], got.states[i])


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["hvac:office3", "congested"])
def test_learned_optimiser_decides_the_same_with_either_backend(name):
    """A briefly trained optimiser: the torch path (network, balance, merit, repair, polish
    on one device) and the numpy path give feasible decisions of the same quality."""
    from scf.domains.quality import decision_quality, optimum_costs
    from scf.ml.optimize import OptimiserConfig, fit_optimiser

    d = _congested_case30() if name == "congested" else domains.get(name)
    samples = d.synthesize(np.random.default_rng(3), 1500)
    x, c, e = (np.array([getattr(s, k) for s in samples], dtype=float) for k in ("state", "context", "energy"))
    bounds = dict(state_lo=list(map(float, d.state_bounds[0])), state_hi=list(map(float, d.state_bounds[1])),
                  context_lo=list(map(float, d.context_bounds[0])), context_hi=list(map(float, d.context_bounds[1])))
    model, _ = fit_optimiser(d, x, c, e, OptimiserConfig(domain=d.name, steps=300, hidden=64, **bounds))
    ctx, _, _ = _contexts(d, 120, 9)
    _, opt = optimum_costs(d, ctx)
    out = {}
    for backend in ("numpy", "torch"):
        model.repair_backend = backend
        raw, fixed = model.decide(d, ctx)
        assert _ok(d, ctx, fixed.states).all() and fixed.feasible.all()
        out[backend] = (raw, fixed, decision_quality(d, ctx, fixed.states, status_quo=fixed.states, optimum=opt).metrics())
    np.testing.assert_allclose(out["torch"][0], out["numpy"][0], atol=1e-6)  # same raw proposals
    assert out["torch"][1].fallback.sum() <= out["numpy"][1].fallback.sum()
    gap_t, gap_n = out["torch"][2], out["numpy"][2]
    assert gap_t["gap_median"] <= gap_n["gap_median"] + 1e-3 and gap_t["gap_p95"] <= gap_n["gap_p95"] + 5e-3
    model.repair_backend, model.device_graphs = "torch", "emulate"  # the GPU's recorded polish, its bookkeeping on the CPU
    for _ in range(2):  # recorded, then replayed
        _, replayed = model.decide(d, ctx)
        # the same arithmetic; a last-bit difference (1e-16 seen once) comes from the BLAS's thread split
        np.testing.assert_allclose(replayed.states, out["torch"][1].states, rtol=0, atol=1e-12)
    assert model.graph_error == "" and len(model.__dict__.get("_graphs", {})) == (0 if d.kind == "grid" else 2)  # HVAC: least-norm stage and polish
    model.to("cpu")
    assert model._graphs == {}  # moving the model drops what a graph would read
    model.repair_backend = "fast"
    with pytest.raises(Exception, match="repair_backend"):
        model.decide(d, ctx[:2])


def test_a_recorded_program_replays_with_new_inputs_like_an_eager_call():
    """`run_graphed`'s bookkeeping (static inputs copied before each replay, the result a
    copy), checked on the CPU with the polish as the program: the GPU records the same."""
    from scf.ml.cost import CostModel
    from scf.ml.repair_torch import polish_t, run_graphed

    d = domains.get("hvac:office3")
    c, best, rng = _contexts(d, 64, 6)
    lo, hi = (torch.as_tensor(np.asarray(b, float)) for b in d.state_bounds)
    cost = CostModel(*d.state_bounds, *d.context_bounds)
    x_fit = np.stack([d.random_feasible(ci, rng) for ci in c])
    cost.fit(x_fit, c, np.array([d.cost(ci, xi) for ci, xi in zip(c, x_fit)]))
    knots = cost.state_mid[:, None] + cost.state_half[:, None] * cost.knots[None, :]

    def program(x, feasible, cs, rlo, rhi):
        rows = device_rows(d, cs)
        return polish_t(cost, cost.device_weights(cs), knots, rows, x, feasible, lo, hi)

    cache: dict = {}
    outs = []
    for seed in (1, 2):
        start = torch.as_tensor(np.stack([d.random_feasible(ci, np.random.default_rng(seed)) for ci in c]))
        feasible = torch.ones(len(c), dtype=torch.bool)
        feasible[::7] = False
        ct = torch.as_tensor(c, dtype=torch.float64)
        rows = device_rows(d, ct)
        eager = program(start, feasible, ct, rows.lo, rows.hi)
        got = run_graphed(cache, "polish", program, (start, feasible, ct, rows.lo, rows.hi), capture=False)
        torch.testing.assert_close(got, eager, rtol=0, atol=0)
        assert torch.equal(got[::7], start[::7])  # infeasible rows are not moved
        outs.append(got)
    assert len(cache) == 1 and "error" not in cache  # recorded once, replayed with the second inputs
    assert not torch.equal(outs[0], outs[1])  # the replay used the new inputs, not the first ones
    assert _ok(d, c, outs[1].numpy()).all()  # the polish keeps a feasible state feasible
