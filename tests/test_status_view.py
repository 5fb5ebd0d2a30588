"""`scf status --watch`: the snapshot it renders is read from the bus."""

from __future__ import annotations

import pytest

from scf.bus import events as ev
from scf.bus.emergency import EmergencyState, write_state
from scf.bus.gears import GearState, write_gear
from scf.ops.status_view import render, snapshot

pytestmark = pytest.mark.anyio


async def test_snapshot_shows_gear_emergency_jobs_checkpoints_nodes_and_dlq(bus):
    await write_gear(bus, GearState(gear="HYPER", by="op"))
    await write_state(bus, EmergencyState(True, reason="storm", by="bob"))
    await bus.publish_many([
        ev.JobProgress.new(ev.JobProgressData(job_id="job-running", step=50, total_steps=200, loss=0.5, samples_per_s=1000.0, worker="w1"), source="t"),
        ev.JobProgress.new(ev.JobProgressData(job_id="job-done", step=200, total_steps=200, loss=0.1, worker="w1"), source="t"),
        ev.JobCompleted.new(ev.JobCompletion(job_id="job-done", checkpoint_id="c1", duration_s=3.0), source="t"),
        ev.CheckpointPromoted.new(ev.Promotion(checkpoint_id="ckpt-123456789", domain="grid:case9", alias="production", version=4, uri="file:///x", sha256="ab"), source="t"),
        ev.DeployActivated.new(ev.Activation(deployment_id="d1", plan_id="p1", node="node-a", checkpoint_id="ckpt-123456789", version=4), source="t"),
        ev.DeadLettered.new(ev.DeadLetter(stream="INTENTS", consumer="safety", subject="intent.created.x.y", seq=1, deliveries=5, error="boom"), source="t"),
    ])
    s = await snapshot(bus)
    assert s.gear == "HYPER"
    assert s.emergency == "ENGAGED (storm, by bob)"
    assert len(s.jobs) == 1 and s.jobs[0].startswith("job-running") and "25.0%" in s.jobs[0]
    assert s.checkpoints == ["grid:case9       v4  ckpt-1234567  (production)"]
    assert s.deployments == ["node-a     runs ckpt-1234567 v4"]
    assert s.dlq == 1
    assert {name for name, _, _ in s.streams} >= {"FOSSILS", "DLQ"}
    render(s)  # renders without error
