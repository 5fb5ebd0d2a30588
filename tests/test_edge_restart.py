"""An edge agent SIGKILLed right after it switched `current` (issue 10, lower severity): on
restart it reconciles with what is on disk and reports what runs — `deploy.activated` for
a deployment, `deploy.rolled_back` for a rollback — never `deploy.failed … downgrade
refused` for the version it runs, and a redelivered order never switches again.

The agent binds (`--bind-only`, as the restricted edge user does) to its consumer, created
here with a short ack wait so that the interrupted order is redelivered within the test."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys

import pytest

from scf.bus import events as ev
from scf.bus.events import DeployRequested, DeployRollbackRequested, RollbackRequest
from scf.consumers.nodes import edge_consumer
from tests.conftest import spawn, wait_for
from tests.test_deploy_helpers import Keys, events_on, logs, make_model, node_runs, orders_for, promotion, publish_raw, stop

pytestmark = pytest.mark.anyio

NODE = "edge-r"
ACK_WAIT = 3.0


def _linked(directory) -> str:
    try:
        return os.path.basename(os.readlink(directory / "current"))
    except OSError:
        return ""


async def _reports(bus):
    return [e for _, e in await events_on(bus, "DEPLOY", f"deploy.*.{NODE}", [ev.DeployActivated, ev.DeployFailed, ev.DeployRolledBack, DeployRequested, DeployRollbackRequested])]


async def _orders_settled(bus) -> bool:
    info = await bus.js.consumer_info("DEPLOY", f"edge-{NODE}")
    return info.num_pending == 0 and info.num_ack_pending == 0


def _start(env, edir, logd):
    argv = [sys.executable, "-m", "scf.cli.main", "run", "edge", "--node", NODE, "--dir", str(edir), "--bind-only"]
    return spawn(argv, env, logd / f"edge-{NODE}.log")


async def _kill_when_linked(agent, edir, prefix: str, logd) -> None:
    # Poll tightly for the switch (a polling interval, not a wait for an outcome).
    while not _linked(edir).startswith(prefix):
        assert agent.poll() is None, logs(logd)
        await asyncio.sleep(0.001)
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait(10)


@pytest.fixture
async def edge(bus, settings, scf_env, tmp_path):
    """v3 (a large model: its digest and health check take a moment, so a kill lands
    between the switch and the report) and v4 promoted and signed; the consumer; a dir."""
    keys = Keys(settings)
    keys.node(NODE)
    art = tmp_path / "artifacts"
    make_model(art / "v3.safetensors", 3, hidden=2_000_000)
    make_model(art / "v4.safetensors", 4, hidden=2_000_000)
    p3, p4 = promotion("ck-3", 3, art / "v3.safetensors"), promotion("ck-4", 4, art / "v4.safetensors")
    s3, raw3 = await publish_raw(bus, p3, keys.release)
    s4, raw4 = await publish_raw(bus, p4, keys.release)
    await bus.js.add_consumer("DEPLOY", config=dataclasses.replace(edge_consumer(NODE), ack_wait=ACK_WAIT).config())
    logd = tmp_path / "logs"
    logd.mkdir()
    return {
        "env": dict(scf_env, SCF_LOG="INFO"), "dir": tmp_path / "edge", "logs": logd,
        "v3": orders_for(p3, raw3, [NODE], seq=s3, plan="plan-3")[0], "v4": orders_for(p4, raw4, [NODE], seq=s4, plan="plan-4")[0],
    }


async def test_killed_after_switching_to_v4_reports_v4_activated_on_restart(bus, edge):
    env, edir, logd = edge["env"], edge["dir"], edge["logs"]
    agent = _start(env, edir, logd)
    try:
        await bus.publish(edge["v3"])
        await wait_for(lambda: node_runs(bus, NODE, "ck-3"), 60, "v3 active")
        await wait_for(lambda: _orders_settled(bus), 30, "the v3 order acknowledged")

        order4 = edge["v4"]
        await bus.publish(order4)
        await _kill_when_linked(agent, edir, "000004-", logd)
        # Did the kill land between the switch and the recorded outcome (the usual case)?
        pending = json.loads((edir / "state.json").read_bytes()).get("pending")

        before = (logd / f"edge-{NODE}.log").read_text()
        agent = _start(env, edir, logd)
        deployment = order4.data.deployment_id

        def said() -> bool:
            text = (logd / f"edge-{NODE}.log").read_text()[len(before):]
            return (f"deploy.activated for deployment {deployment}: runs grid:test v4 (ck-4)" in text
                    or f"runs grid:test v4 (ck-4), deployment {deployment} (deploy.activated)" in text)

        await wait_for(said, 60, "the restarted agent's log to say that v4 runs, activated")
        await wait_for(lambda: _orders_settled(bus), 60, "the interrupted order redelivered and acknowledged")
        await wait_for(lambda: node_runs(bus, NODE, "ck-4"), 30, "the registry to say v4 runs")
        log = (logd / f"edge-{NODE}.log").read_text()
        reports = await _reports(bus)
        assert not [e for e in reports if isinstance(e, ev.DeployFailed)], log
        assert "downgrade refused" not in log, log
        activated = [e for e in reports if isinstance(e, ev.DeployActivated) and e.data.checkpoint_id == "ck-4"]
        assert len(activated) == 1 and activated[0].data.deployment_id == deployment
        assert _linked(edir).startswith("000004-")
        if pending is not None:  # reconciled at start, not left to the redelivery
            assert pending["order"]["data"]["deployment_id"] == deployment
            assert "restarted after switching current to v4 (ck-4)" in log[len(before):], log
    finally:
        code = stop(agent)
    assert code == 0, logs(logd)


async def test_killed_during_a_rollback_reports_it_once_and_never_rolls_forward(bus, edge):
    env, edir, logd = edge["env"], edge["dir"], edge["logs"]
    agent = _start(env, edir, logd)
    try:
        await bus.publish(edge["v3"])
        await wait_for(lambda: node_runs(bus, NODE, "ck-3"), 60, "v3 active")
        await bus.publish(edge["v4"])
        await wait_for(lambda: node_runs(bus, NODE, "ck-4"), 60, "v4 active")
        await wait_for(lambda: _orders_settled(bus), 30, "the orders acknowledged")

        # Roll back to the previous artifact (v3); kill the agent the moment `current` switched.
        request = ev.DeployRollbackRequested.new(RollbackRequest(request_id="rb-1", node=NODE, reason="bad readings"), source="test")
        await bus.publish(request)
        await _kill_when_linked(agent, edir, "000003-", logd)
        pending = json.loads((edir / "state.json").read_bytes()).get("pending")

        before = (logd / f"edge-{NODE}.log").read_text()
        agent = _start(env, edir, logd)
        await wait_for(lambda: "deploy.rolled_back for rollback rb-1: runs grid:test v3 (ck-3)" in (logd / f"edge-{NODE}.log").read_text()[len(before):]
                       or "runs grid:test v3 (ck-3)" in (logd / f"edge-{NODE}.log").read_text()[len(before):], 60,
                       "the restarted agent's log to say that v3 runs")
        await wait_for(lambda: _orders_settled(bus), 60, "the interrupted rollback redelivered and acknowledged")

        async def rolled_back() -> list:
            return [e.data for e in await _reports(bus) if isinstance(e, ev.DeployRolledBack)]

        await wait_for(rolled_back, 30, "deploy.rolled_back")
        # The redelivered "roll back to the previous" must not take the agent back to v4.
        assert _linked(edir).startswith("000003-")
        assert await node_runs(bus, NODE, "ck-3")
        rb = await rolled_back()
        assert [(r.from_checkpoint_id, r.to_checkpoint_id, r.reason) for r in rb] == [("ck-4", "ck-3", "bad readings")]
        log = (logd / f"edge-{NODE}.log").read_text()
        assert not [e for e in await _reports(bus) if isinstance(e, ev.DeployFailed)], log
        if pending is not None:
            assert pending["order"]["data"]["request_id"] == "rb-1" and pending["target"] == "ck-3"
            assert "restarted after switching current to v3 (ck-3) for rollback rb-1" in log[len(before):], log
    finally:
        code = stop(agent)
    assert code == 0, logs(logd)
