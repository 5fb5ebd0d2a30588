"""The conservative penalty of the learned cost (ml/cost.py, `CostConfig.conservative`):
zero on the fossils' own support, growing outside it; on a congested grid (case30 with its
line ratings at 70 %) it leaves in-distribution decisions as good as before, and where the
learned cost extrapolates — a generator never run above 40 MW whose true cost turns steep
above it — it keeps the proposal network from exploiting the learned cost's straight-line
guess, and the regret falls. Real case data, real HiGHS optima, real torch training."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from scf.domains import matpower as mp
from scf.domains.grid import GridDomain
from scf.domains.quality import decision_quality, optimum_costs
from scf.ml.cost import CostConfig, CostModel
from scf.ml.optimize import OptimiserConfig, fit_optimiser, load_optimiser, save_optimiser

GEN, CEILING, STEEP = 1, 40.0, 8.0  # generator 2 (bus 2): never observed above 40 MW; 8 $/MWh beyond


def derated_case30(kink: bool) -> GridDomain:
    """case30 with every rateA × 0.7 (lines bind at the optimum); with `kink`, generator 2's
    quadratic cost as a piecewise-linear curve up to 40 MW and a steep segment above it."""
    c = mp.load_case("case30")
    branch = c.branch.copy()
    branch[:, mp.RATE_A] *= 0.7
    gencost = c.gencost
    if kink:
        c2, c1 = gencost[GEN, mp.COST], gencost[GEN, mp.COST + 1]
        q = lambda p: c2 * p * p + c1 * p  # noqa: E731
        xs = [0.0, 10.0, 20.0, 30.0, CEILING, 80.0]
        ys = [q(p) for p in xs[:-1]] + [q(CEILING) + STEEP * (80.0 - CEILING)]
        rows = np.zeros((len(gencost), 4 + 2 * len(xs)))
        rows[:, : gencost.shape[1]] = gencost
        rows[GEN, :4] = [mp.PIECEWISE_LINEAR, 0, 0, len(xs)]
        rows[GEN, 4:] = np.ravel(list(zip(xs, ys)))
        gencost = rows
    return GridDomain(dataclasses.replace(c, branch=branch, gencost=gencost), name="grid:case30x0.7" + ("-kink" if kink else ""))


def fossils(d: GridDomain, n: int, seed: int = 0):
    samples = d.synthesize(np.random.default_rng(seed), n)
    return tuple(np.array([getattr(s, k) for s in samples], dtype=float) for k in ("state", "context", "energy"))


def config(d: GridDomain, conservative: float) -> OptimiserConfig:
    lo, hi = d.state_bounds
    clo, chi = d.context_bounds
    return OptimiserConfig(domain=d.name, steps=600, hidden=64, batch_size=128, cost=CostConfig(conservative=conservative),
                           state_lo=list(map(float, lo)), state_hi=list(map(float, hi)),
                           context_lo=list(map(float, clo)), context_hi=list(map(float, chi)))


def judged(d: GridDomain, train, test, conservative: float):
    model, metrics = fit_optimiser(d, *train, config(d, conservative))
    _, fixed = model.decide(d, test[1])
    _, opt_cost = optimum_costs(d, test[1])
    q = decision_quality(d, test[1], fixed.states, status_quo=test[0], optimum=opt_cost).metrics("")
    return q, fixed.states, metrics


def test_the_penalty_is_zero_on_the_fossils_and_grows_off_them(tmp_path):
    d = derated_case30(kink=False)
    x, c, e = fossils(d, 400)
    seen = x[:, GEN] <= CEILING  # a plant that never ran generator 2 above 40 MW
    x, c, e = x[seen], c[seen], e[seen]
    model = CostModel(*d.state_bounds, *d.context_bounds, CostConfig(conservative=1.0))
    metrics = model.fit(x, c, e)
    xt, ct = torch.as_tensor(x), torch.as_tensor(c)
    assert float(model.support_penalty(xt, ct).abs().max()) == 0.0  # inside the box the fossils span
    penalties = []
    for mw in (55.0, 65.0, 75.0):  # generator 2 beyond anything observed, further and further
        far = xt.clone()
        far[:, GEN] = mw
        penalties.append(model.support_penalty(far, ct))
    assert bool((penalties[0] > 0).all()) and bool((penalties[1] > penalties[0]).all()) and bool((penalties[2] > penalties[1]).all())
    assert metrics["cost_support_empty_axes"] > 0  # the hinges past 40 MW
    # memory only: a checkpoint of a conservative optimiser carries and loads the same weights
    opt, _ = fit_optimiser(d, x, c, e, dataclasses.replace(config(d, 1.0), steps=5))
    path = save_optimiser(tmp_path / "o.safetensors", opt, lineage={}, metrics={})
    loaded, meta = load_optimiser(path)
    assert meta["config"]["cost"]["conservative"] == 1.0
    assert torch.equal(loaded.cost.weights, opt.cost.weights)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_on_a_congested_grid_it_keeps_decisions_in_distribution_and_cuts_regret_where_the_cost_extrapolates():
    # in distribution: the derated case's own fossils, 1 in 8 held out
    d = derated_case30(kink=False)
    x, c, e = fossils(d, 1500)
    held = np.arange(len(x)) % 8 == 0
    train, test = (x[~held], c[~held], e[~held]), (x[held][:128], c[held][:128])
    opt_states, _ = optimum_costs(d, test[1])
    ok = np.all(np.isfinite(opt_states), axis=1)
    assert (np.abs(d.flows(test[1][ok], opt_states[ok])) >= d.rate - 1e-3).any(1).mean() > 0  # lines bind: congested
    plain, _, _ = judged(d, train, test, 0.0)
    careful, _, _ = judged(d, train, test, 1.0)
    assert plain["feasible"] == careful["feasible"] == 1.0
    assert careful["regret"] <= plain["regret"] + 0.01, (plain, careful)  # no worse, up to training noise

    # extrapolation: generator 2 never observed above 40 MW, where its true cost turns steep
    d = derated_case30(kink=True)
    x, c, e = fossils(d, 1500)
    held = np.arange(len(x)) % 8 == 0
    seen = ~held & (x[:, GEN] <= CEILING)
    train, test = (x[seen], c[seen], e[seen]), (x[held][:128], c[held][:128])
    plain, plain_x, _ = judged(d, train, test, 0.0)
    careful, careful_x, metrics = judged(d, train, test, 1.0)
    assert metrics["cost_support_empty_axes"] > 0  # the hinges past 40 MW: directions the fossils never moved along
    assert plain_x[:, GEN].mean() > CEILING + 5  # the straight-line guess exploited ...
    assert careful_x[:, GEN].mean() <= CEILING + 1  # ... and not with the penalty
    assert careful["regret"] < plain["regret"] / 5, (plain, careful)
    assert careful["feasible"] == plain["feasible"] == 1.0
