"""The repair step (domains/repair.py): proposals made feasible for the domain's own check."""

from __future__ import annotations

import numpy as np
import pytest

from scf import domains
from scf.domains.base import Infeasible
from scf.domains.grid import GridDomain
from scf.domains.repair import repair, repair_batch


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


@pytest.mark.parametrize("name", ["grid:case9", "grid:case14", "grid:case30", "grid:case118", "hvac:office3"])
def test_noisy_optima_become_feasible_for_the_domains_own_check(name):
    d = domains.get(name)
    c, best, rng = _contexts(d, 60, 0)
    lo, hi = d.state_bounds
    proposals = best + rng.normal(scale=0.05, size=best.shape) * (hi - lo)
    broken = np.array([bool(d.violations(ci, xi)) for ci, xi in zip(c, proposals)])
    result = repair_batch(d, c, proposals)
    assert broken.sum() >= 15  # many proposals really were infeasible
    assert all(d.violations(ci, xi) == [] for ci, xi in zip(c, result.states))
    assert result.feasible.all() and not result.fallback.any()  # the cheap steps sufficed
    assert np.all(result.moved[broken] > 0)
    in_bounds = np.all((proposals >= lo) & (proposals <= hi), axis=1)
    assert np.all(result.moved[~broken & in_bounds] == 0)  # a feasible proposal is left alone


@pytest.mark.parametrize("name", ["grid:case9", "grid:case30"])
def test_line_overloads_are_relieved_by_redispatch_keeping_the_balance(name):
    d = domains.get(name)
    c, _, rng = _contexts(d, 60, 1)
    vertices = np.stack([d.random_feasible(ci, rng, vertices=1) for ci in c])
    proposals = vertices + rng.normal(scale=0.1, size=vertices.shape) * (d.pmax - d.pmin)
    overloaded = [any(v.constraint.startswith("line_limit") for v in d.violations(ci, xi)) for ci, xi in zip(c, np.clip(proposals, d.pmin, d.pmax))]
    assert sum(overloaded) >= 10
    fixed = repair(d, c, proposals)
    assert all(d.violations(ci, xi) == [] for ci, xi in zip(c, fixed))


def test_merit_order_gives_a_shortfall_to_the_cheapest_generator_with_headroom():
    d = domains.get("grid:case9")
    c = d.nominal_load[None, :]
    x = np.array([[100.0, 100.0, 100.0]])  # demand 315 MW: 15 MW short
    merit = np.array([3.0, 1.0, 2.0])  # generator 2 cheapest
    fixed = repair(d, c, x, merit=merit)
    np.testing.assert_allclose(fixed[0], [100.0, 115.0, 100.0], atol=1e-6)
    proportional = repair(d, c, x)
    assert proportional[0, 0] > 100.0 and proportional[0, 2] > 100.0  # spread over the room


def test_non_finite_proposals_are_repaired_and_bad_shapes_named():
    d = domains.get("grid:case14")
    c, _, _ = _contexts(d, 3, 2)
    x = np.full((3, d.state_dim), np.nan)
    x[1] = np.inf
    fixed = repair(d, c, x)
    assert all(d.violations(ci, xi) == [] for ci, xi in zip(c, fixed))
    with pytest.raises(ValueError, match=r"states have shape \(3, 2\), expected \(3, 5\) for grid:case14"):
        repair(d, c, x[:, :2])


def test_an_infeasible_context_is_reported_not_raised():
    d = domains.get("hvac:office3")
    c = np.array([[45.0, 14.0, 1.0, 1.0, 1.0, 35.0, 35.0, 35.0]])  # 35 °C inside, 45 °C out: no cooling suffices
    with pytest.raises(Infeasible):
        d.reference_solution(c[0])
    result = repair_batch(d, c, np.zeros((1, 3)))
    assert not result.feasible[0] and result.fallback[0]


class _CostlessGrid(GridDomain):
    def cost(self, context, state):  # repair must never need it
        raise AssertionError("repair called the cost")


def test_repair_uses_the_constraints_only():
    from scf.domains import matpower as mp

    d = _CostlessGrid(mp.load_case("case30"), name="grid:case30-costless")
    ref = domains.get("grid:case30")
    c, best, rng = _contexts(ref, 20, 3)
    fixed = repair(d, c, best + rng.normal(scale=5.0, size=best.shape))
    assert all(ref.violations(ci, xi) == [] for ci, xi in zip(c, fixed))
