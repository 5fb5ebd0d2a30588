"""An optimiser student on the event log (issue 14): a learned optimiser published as a
checkpoint, distilled by `scf distill --checkpoint ID`'s path (`distill_on_bus`), judged by the
daemon's real verifier on its repaired decisions against its teacher's, promoted to `edge`, and
run by the edge's numpy runtime from the file the store hands out."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("torch")

from scf.bus import events as ev  # noqa: E402
from scf.consumers.edge.probe import health_check  # noqa: E402
from scf.consumers.edge.ternary import TernaryNet  # noqa: E402
from scf.ml.distill import DistillConfig, distill_on_bus, load_student  # noqa: E402
from scf.producers.daemon import DaemonSettings  # noqa: E402
from scf.producers.verify import CheckpointVerifier, VerifySettings, decide_promotion  # noqa: E402
from tests.daemon_support import FIXED_TIME, recorded_fossils, running_daemon, wait_events  # noqa: E402
from tests.test_distill import case9  # noqa: E402


@pytest.mark.anyio
async def test_an_optimiser_student_distilled_on_the_bus_is_judged_on_decisions_and_promoted_to_edge(bus, settings, tmp_path):
    from scf.bus.artifacts import open_store
    from scf.ml.optimize import OptimiserConfig, fit_optimiser, save_optimiser

    d, x, c, cost = case9(240, seed=4)
    await bus.publish_many(recorded_fossils(d, x, c, cost, observed_at=FIXED_TIME))  # the same held-out split every run
    teacher, _ = fit_optimiser(d, x, c, cost, OptimiserConfig(domain=d.name, hidden=32, depth=3, steps=60, batch_size=64))
    tpath = save_optimiser(tmp_path / "opt.safetensors", teacher, lineage={"test": True}, metrics={})
    ref = await open_store(bus, settings).put(tpath, "grid_case9/opt.safetensors")
    info = ev.CheckpointInfo(checkpoint_id="ck-opt", job_id="job-opt", domain=d.name, uri=ref.uri, sha256=ref.sha256, size=ref.size)
    await bus.publish(ev.CheckpointProduced.new(info, source="worker"))

    config = DistillConfig(steps=30, batch_size=32, heldout=48, log_every=1000)
    result, produced = await distill_on_bus(bus, settings, "ck-opt", config)
    student, meta = load_student(result.student)
    assert meta["model"] == "optimiser" and produced.data.job_id == "distill-ck-opt"
    assert meta["lineage"]["teacher"]["checkpoint_id"] == "ck-opt" and meta["lineage"]["teacher"]["sha256"] == ref.sha256

    # judged on its repaired decisions against the teacher's, paired: a limit no student can meet is named as the reason
    strict = VerifySettings(min_heldout=4, student_decision_contexts=16, student_max_decision_pp=-1.0)
    v = await CheckpointVerifier(bus, settings, strict)(produced, None)
    assert v.alias == "edge" and v.baseline_checkpoint_id == "ck-opt"
    assert v.metrics["decision_contexts"] == 16 and v.metrics["decision_feasible"] == 1.0
    assert any(r.startswith("its decisions' gap_mean is ") and "percentage points off its teacher's (allowed -1)" in r for r in v.reasons), v.reasons
    [rejected] = decide_promotion(produced, None, v, strict, source="daemon")
    assert isinstance(rejected, ev.CheckpointRejected) and rejected.data.reasons == v.reasons

    loose = VerifySettings(min_heldout=4, student_decision_contexts=16, student_max_decision_pp=100.0, violation_tolerance=1.0)
    async with running_daemon(settings, DaemonSettings(verify_checkpoints="on", checkpoint=loose), verifier=CheckpointVerifier(bus, settings, loose)):
        promoted = await wait_events(bus, "CHECKPOINTS", "checkpoint.promoted.>", 2, timeout=120)
    by_alias = {p.data.alias: p.data for p in promoted}
    assert by_alias["production"].checkpoint_id == "ck-opt"  # the teacher, by the ordinary path
    edge = by_alias["edge"]
    assert (edge.checkpoint_id, edge.version) == (produced.data.checkpoint_id, 1)

    # the edge fetches the promoted file and decides with numpy what the torch student decides
    got = await open_store(bus, settings).get(edge.uri, tmp_path / "edge" / "model.safetensors", sha256=edge.sha256)
    assert await asyncio.to_thread(health_check, got) is None
    net = TernaryNet.load(got)
    proposed = net.propose(c[:8])
    lo, hi = d.state_bounds
    assert proposed.shape == (8, x.shape[1]) and np.all(proposed >= lo - 1e-6) and np.all(proposed <= hi + 1e-6)
    import torch

    with torch.no_grad():
        reference = student._raw(torch.as_tensor(c[:8], dtype=torch.float32))[0].numpy()
    np.testing.assert_allclose(proposed, reference, rtol=0, atol=1e-4 * float(np.max(hi - lo)))
