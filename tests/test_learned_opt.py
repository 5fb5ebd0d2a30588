"""The learned optimiser (ml/optimize.py): trained on fossils only, repaired, judged against
the exact optimum on held-out contexts."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from scf import domains
from scf.domains.fossils import synth_shards
from scf.domains.quality import best_in_data, decision_quality, optimum_costs
from scf.ml.loader import load_arrays
from scf.ml.optimize import (
    FORMAT,
    OptimiserConfig,
    OptimiserError,
    checkpoint_format,
    load_optimiser,
    propose,
    repair,
    train_optimiser,
)


@pytest.fixture(scope="module")
def trained(case14_optimiser_2000):
    """case14: 2000 synthesised fossils, a small network trained briefly (the run's one,
    conftest: test_optimize_learned certifies its decisions). The result as train_optimiser
    returned it: the checkpoint and the metrics it holds."""
    [checkpoint] = (case14_optimiser_2000 / "zoo").glob("*.safetensors")
    _, meta = load_optimiser(checkpoint)
    return SimpleNamespace(checkpoint=checkpoint, metrics=meta["metrics"]), case14_optimiser_2000 / "shards"


def test_learned_proposals_are_feasible_and_beat_the_best_in_data_on_heldout_contexts(trained):
    result, shards = trained
    d = domains.get("grid:case14")
    x, c, e = (np.asarray(a, dtype=float) for a in load_arrays(shards, domain="grid:case14", split="heldout"))
    tx, tc, te = (np.asarray(a, dtype=float) for a in load_arrays(shards, domain="grid:case14", split="train"))
    assert len(c) >= 80  # held-out contexts the model never saw
    states = propose(d, c, result.checkpoint)
    _, opt = optimum_costs(d, c)
    learned = decision_quality(d, c, states, status_quo=x, optimum=opt)
    baseline = decision_quality(d, c, best_in_data(d, tc, tx, te, c), status_quo=x, optimum=opt)
    assert learned.feasible.all()  # the domain's own check, 1 kW
    assert np.all(learned.gap >= -1e-9)  # nothing beats the exact optimum
    assert np.median(learned.gap) < np.median(baseline.gap)
    assert np.percentile(learned.gap, 95) < np.percentile(baseline.gap, 95)
    assert learned.savings_captured() > baseline.savings_captured()
    # the metrics the checkpoint carries are the same measurement
    assert result.metrics["decision_feasible"] == 1.0
    assert result.metrics["decision_gap_median"] < result.metrics["baseline_gap_median"]


def test_the_learned_cost_ranks_heldout_states_like_their_measured_energy(trained):
    result, shards = trained
    model, meta = load_optimiser(result.checkpoint)
    x, c, e = load_arrays(shards, domain="grid:case14", split="heldout")
    pred = model.cost(torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(c, dtype=torch.float64)).numpy()
    assert np.mean(np.abs(pred - e)) / np.mean(np.abs(e)) < 1e-3
    assert meta["metrics"]["cost_heldout_mae_rel"] < 1e-3


def test_checkpoint_is_safetensors_with_its_story_and_refuses_other_files(trained, tmp_path):
    result, _ = trained
    assert checkpoint_format(result.checkpoint) == FORMAT
    raw = result.checkpoint.read_bytes()
    # a safetensors file (an 8-byte little-endian length, then that many bytes of a JSON object), not a
    # pickle stream (whose first bytes are no length of a JSON header within the file)
    size = int.from_bytes(raw[:8], "little")
    assert 8 + size <= len(raw) and isinstance(json.loads(raw[8:8 + size]), dict) and b"pickle" not in raw[:4096]
    model, meta = load_optimiser(result.checkpoint)
    assert meta["config"]["domain"] == "grid:case14" and meta["lineage"]["fossils"] > 1500
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(OptimiserError, match=r"is not a readable safetensors file, not a learned optimiser \(scf-opt/1\)"):
        load_optimiser(junk)
    with pytest.raises(OptimiserError, match=r"was trained for grid:case14 \(5 state, 11 context values\); grid:case30 has 6 and 20"):
        propose(domains.get("grid:case30"), np.zeros((1, 20)), result.checkpoint)


def test_train_optimiser_command_writes_a_checkpoint_and_names_bad_input(trained, tmp_path):
    import os

    from tests.conftest import cli

    _, shards = trained
    env = {**os.environ, "SCF_HOME": str(tmp_path / "home")}
    env.pop("NATS_URL", None)
    r = cli("train-optimiser", "--data", str(shards), "--domain", "grid:case14", "--out", str(tmp_path / "zoo"), "--steps", "50", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {tmp_path / 'zoo'}/opt-") and "decision_feasible" in r.stdout
    assert checkpoint_format(next((tmp_path / "zoo").glob("opt-*.safetensors"))) == FORMAT
    r = cli("train-optimiser", "--data", str(tmp_path / "nothing"), "--domain", "grid:case14", env=env)
    assert r.returncode == 1
    assert r.stderr.strip() == f"Error: no shard directory at {tmp_path / 'nothing'}: write shards with `scf fossils synth` or pass the right path"
    r = cli("train-optimiser", "--data", str(shards), "--domain", "grid:case300", env=env)
    assert r.returncode == 1 and r.stderr.strip().startswith("Error: unknown domain 'grid:case300': use one of grid:case9")


def test_repair_hook_matches_the_domain_check():
    d = domains.get("grid:case9")
    c = np.stack([d.nominal_load, 1.1 * d.nominal_load])
    fixed = repair(d, c, np.zeros((2, 3)))
    assert all(d.violations(ci, xi) == [] for ci, xi in zip(c, fixed))


@pytest.mark.slow
def test_hvac_learned_decisions_are_feasible_and_beat_the_best_in_data(tmp_path):
    synth_shards("hvac:office3", 2000, tmp_path / "shards", shard_size=1000, seed=6)
    result = train_optimiser("hvac:office3", tmp_path / "shards", tmp_path / "zoo", OptimiserConfig(steps=1000))
    m = result.metrics
    assert m["decision_feasible"] == 1.0
    assert m["decision_savings_captured"] > m["baseline_savings_captured"]
    assert m["decision_gap_median"] <= m["baseline_gap_median"]


@pytest.mark.long
@pytest.mark.timeout(1500)  # about 3 min each on a shared 2-core machine
@pytest.mark.parametrize("name", ["grid:case118", "hvac:office3"])
def test_learned_optimiser_meets_the_issue_goals(name, tmp_path):
    """Issue 12's measures on held-out contexts: 100 % feasible, gap median <= 0.5 %, p95 <= 2 %,
    savings captured >= 95 %, better than the best in data."""
    synth_shards(name, 8000, tmp_path / "shards", shard_size=2000, seed=7)
    result = train_optimiser(name, tmp_path / "shards", tmp_path / "zoo", OptimiserConfig(steps=2000))
    m = result.metrics
    assert m["decision_feasible"] == 1.0
    assert m["decision_gap_median"] <= 0.005 and m["decision_gap_p95"] <= 0.02
    assert m["decision_savings_captured"] >= 0.95
    assert m["decision_gap_mean"] < m["baseline_gap_mean"]


@pytest.mark.long
@pytest.mark.timeout(1500)
def test_learned_optimiser_on_congested_contexts():
    """case30 with every rateA at 70 %: lines bind at the optimum in about a fifth of the
    contexts; the repaired decisions stay feasible and near the optimum."""
    import dataclasses

    from scf.domains import matpower as mp
    from scf.domains.grid import GridDomain
    from scf.ml.optimize import evaluate_optimiser, fit_optimiser

    case = mp.load_case("case30")
    branch = case.branch.copy()
    branch[:, mp.RATE_A] *= 0.7
    d = GridDomain(dataclasses.replace(case, branch=branch), name="grid:case30x0.7")
    samples = d.synthesize(np.random.default_rng(3), 4000)
    x, c, e = (np.array([getattr(s, k) for s in samples], dtype=float) for k in ("state", "context", "energy"))
    held = np.arange(len(x)) % 16 == 0
    opt_states, _ = optimum_costs(d, c[held])
    assert np.mean((np.abs(d.flows(c[held], opt_states)) - d.rate > -1e-3).any(1)) > 0.1  # congestion is real
    bounds = dict(state_lo=list(map(float, d.state_bounds[0])), state_hi=list(map(float, d.state_bounds[1])),
                  context_lo=list(map(float, d.context_bounds[0])), context_hi=list(map(float, d.context_bounds[1])))
    model, _ = fit_optimiser(d, x[~held], c[~held], e[~held], OptimiserConfig(domain=d.name, steps=1500, **bounds))
    m = evaluate_optimiser(model, d, (x[held], c[held], e[held]), (x[~held], c[~held], e[~held]))
    assert m["decision_feasible"] == 1.0
    assert m["decision_gap_median"] <= 0.005 and m["decision_gap_p95"] <= 0.02 and m["decision_savings_captured"] >= 0.95
    assert m["decision_gap_median"] < m["baseline_gap_median"]


@pytest.mark.parametrize("steps", [1, 3, 20])
def test_short_training_runs_do_not_break_the_schedule(steps):
    """A tiny job (`steps = 20` from an operator's config) trained: OneCycle's warm-up of
    0.05 × 20 steps was one step, and its annealing then divided by zero."""
    from scf.ml.optimize import fit_optimiser

    d = domains.get("grid:case9")
    samples = d.synthesize(np.random.default_rng(0), 200)
    x, c = np.stack([s.state for s in samples]), np.stack([s.context for s in samples])
    e = np.array([s.energy for s in samples])
    model, metrics = fit_optimiser(d, x, c, e, OptimiserConfig(domain=d.name, hidden=16, depth=2, steps=steps, batch_size=32))
    assert all(np.isfinite(p.detach().numpy()).all() for p in model.parameters())
