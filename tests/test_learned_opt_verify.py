"""Promotion on decision quality (producers/verify.py): the rule as data, and the real
verifier on a real nats-server judging real learned-optimiser checkpoints on real case9
fossils against the exact optimum."""

from __future__ import annotations

import numpy as np
import pytest

from scf.bus import events as ev
from scf.producers.verify import (
    CheckpointVerifier,
    VerifySettings,
    compare,
    decide_promotion,
    primary_metric,
)
from tests.daemon_support import FIXED_TIME, recorded_fossils

pytestmark = pytest.mark.anyio

S = VerifySettings(margin=0.05)


def test_decision_quality_is_the_metric_where_both_sides_carry_it():
    cand = {"heldout_dsm": 0.5, "decision_regret": 0.02, "decision_feasible": 1.0}
    base = {"heldout_dsm": 1.0, "decision_regret": 0.01, "decision_feasible": 1.0}
    assert primary_metric(cand, base, S) == "decision_regret"
    assert compare(cand, base, S) == [
        "decision_regret 0.02 does not beat production's 0.01 by the margin 5.0% (needs <= 0.0095)"
    ]  # a far better DSM does not rescue worse decisions
    assert compare({**cand, "decision_regret": 0.009}, base, S) == []
    # without decisions on one side, or switched off: the configured metric
    assert primary_metric(cand, {"heldout_dsm": 1.0}, S) == "heldout_dsm"
    assert primary_metric(cand, base, VerifySettings(decisions=False)) == "heldout_dsm"
    # a learned optimiser of a domain with no exact solver: its cost model against measured energy
    assert primary_metric({"cost_heldout_mae_rel": 0.01}, {"cost_heldout_mae_rel": 0.02}, S) == "cost_heldout_mae_rel"


def test_a_candidate_whose_repaired_decisions_break_a_constraint_is_rejected():
    why = compare({"decision_regret": 0.001, "decision_feasible": 0.98}, None, S)
    assert why == ["decision_feasible 0.98: some repaired decisions on held-out contexts break a constraint (needs >= 1)"]


@pytest.fixture(scope="module")
def case9_data():
    from scf import domains

    d = domains.get("grid:case9")
    samples = d.synthesize(np.random.default_rng(11), 1200)
    return d, samples


@pytest.mark.slow
async def test_the_real_verifier_promotes_the_better_optimiser_on_its_decisions(bus, settings, tmp_path, case9_data):
    from scf.bus.artifacts import open_store
    from scf.ml.checkpoint import sha256_file
    from scf.ml.optimize import OptimiserConfig, fit_optimiser, save_optimiser

    d, samples = case9_data
    rows = [np.array([getattr(s, k) for s in samples]) for k in ("state", "context", "energy")]
    recorded = recorded_fossils(d, *rows, observed_at=FIXED_TIME)
    await bus.publish_many(recorded)
    train = [s for s, r in zip(samples, recorded) if r.data.fossil_id[-1] != "0"]
    x, c, e = (np.array([getattr(s, k) for s in train]) for k in ("state", "context", "energy"))
    good, _ = fit_optimiser(d, x, c, e, OptimiserConfig(domain=d.name, steps=600, hidden=64, batch_size=128))
    poor, _ = fit_optimiser(d, x, c, e, OptimiserConfig(domain=d.name, steps=2, hidden=64, seed=3))
    store = open_store(bus, settings)

    async def produced(cid: str, model) -> ev.CheckpointProduced:
        path = save_optimiser(tmp_path / f"{cid}.safetensors", model, lineage={"test": True}, metrics={})
        ref = await store.put(path, f"grid_case9/{cid}.safetensors")
        assert ref.sha256 == sha256_file(path)
        return ev.CheckpointProduced.new(
            ev.CheckpointInfo(checkpoint_id=cid, job_id=f"job-{cid}", domain=d.name, uri=ref.uri, sha256=ref.sha256, size=ref.size),
            source="worker",
        )

    config = VerifySettings(margin=0.02, min_heldout=16, decision_contexts=48)
    verifier = CheckpointVerifier(bus, settings, config)
    first = await produced("opt-poor", poor)
    v1 = await verifier(first, None)
    assert v1.ok, v1.reasons
    assert v1.metrics["decision_feasible"] == 1.0 and v1.metrics["decision_contexts"] == 48
    [_, promoted] = decide_promotion(first, None, v1, config, source="daemon")
    assert isinstance(promoted, ev.CheckpointPromoted)

    better = await produced("opt-good", good)
    v2 = await verifier(better, promoted.data)
    assert v2.ok and v2.baseline_checkpoint_id == "opt-poor"
    assert v2.metrics["decision_regret"] < v2.baseline_metrics["decision_regret"]
    assert v2.metrics["decision_gap_median"] < v2.baseline_metrics["decision_gap_median"]
    verified, promoted2 = decide_promotion(better, promoted.data, v2, config, source="daemon")
    assert isinstance(verified, ev.CheckpointVerified) and verified.data.metrics["decision_regret"] == v2.metrics["decision_regret"]
    assert (promoted2.data.checkpoint_id, promoted2.data.version) == ("opt-good", 2)

    again = await produced("opt-poor-again", poor)
    v3 = await verifier(again, promoted2.data)
    [rejected] = decide_promotion(again, promoted2.data, v3, config, source="daemon")
    assert isinstance(rejected, ev.CheckpointRejected)
    assert rejected.data.reasons[0].startswith("decision_regret ") and "does not beat production's" in rejected.data.reasons[0]


def test_the_value_report_lists_each_checkpoints_decision_quality():
    from scf.projections.report import decision_rows

    rows = [
        {"checkpoint_id": "opt-1", "domain": "grid:case14", "status": "promoted", "metric": "decision_gap_median", "value": 3.05e-6},
        {"checkpoint_id": "opt-1", "domain": "grid:case14", "status": "promoted", "metric": "decision_feasible", "value": 1.0},
        {"checkpoint_id": "opt-1", "domain": "grid:case14", "status": "promoted", "metric": "decision_savings_captured", "value": 0.99982},
        {"checkpoint_id": "opt-1", "domain": "grid:case14", "status": "promoted", "metric": "heldout_dsm", "value": 0.4},
        {"checkpoint_id": "ebdm-1", "domain": "grid:case14", "status": "rejected", "metric": "heldout_dsm", "value": 0.5},
    ]
    assert decision_rows(rows) == [["opt-1", "grid:case14", "promoted", "100.000 %", "0.000 %", "n/a", "99.982 %"]]
