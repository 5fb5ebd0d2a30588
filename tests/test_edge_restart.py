"""An edge agent SIGKILLed right after it switched `current` to v4 (issue 10, lower
severity): on restart it reconciles with what is on disk and reports `deploy.activated`
for what runs, never `deploy.failed … downgrade refused` for the version it runs."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from scf.bus import events as ev
from scf.bus.events import DeployRequested
from tests.conftest import wait_for
from tests.test_deploy_helpers import Keys, events_on, logs, make_model, node_runs, orders_for, promotion, publish_raw, start_edge, stop

pytestmark = pytest.mark.anyio

NODE = "edge-r"


def _linked(directory) -> str | None:
    try:
        return os.path.basename(os.readlink(directory / "current"))
    except OSError:
        return None


async def _reports(bus):
    return [e for _, e in await events_on(bus, "DEPLOY", f"deploy.*.{NODE}", [ev.DeployActivated, ev.DeployFailed, DeployRequested])]


async def test_killed_after_switching_to_v4_reports_v4_activated_on_restart(bus, settings, scf_env, tmp_path):
    keys = Keys(settings)
    keys.node(NODE)
    env = dict(scf_env, SCF_LOG="INFO")
    art, edir, logd = tmp_path / "artifacts", tmp_path / "edge", tmp_path / "logs"
    logd.mkdir()
    make_model(art / "v3.safetensors", 3)
    # A larger model: its health check takes a moment, so the kill often lands between the
    # switch of `current` and the report (either way, the outcome must be the same).
    make_model(art / "v4.safetensors", 4, hidden=2_000_000)
    p3, p4 = promotion("ck-3", 3, art / "v3.safetensors"), promotion("ck-4", 4, art / "v4.safetensors")
    s3, raw3 = await publish_raw(bus, p3, keys.release)
    s4, raw4 = await publish_raw(bus, p4, keys.release)

    agent = start_edge(env, NODE, edir, logd)
    try:
        await wait_for(lambda: node_runs(bus, NODE, None), 30, "the agent to register")
        await bus.publish(orders_for(p3, raw3, [NODE], seq=s3, plan="plan-3")[0])
        await wait_for(lambda: node_runs(bus, NODE, "ck-3"), 30, "v3 active")
        v4_dir = os.path.basename(os.readlink(edir / "current")).replace("000003-", "000004-")

        order4 = orders_for(p4, raw4, [NODE], seq=s4, plan="plan-4")[0]
        await bus.publish(order4)
        # Poll tightly for the switch (a polling interval, not a wait for an outcome).
        while _linked(edir) is None or not _linked(edir).startswith("000004-"):
            assert agent.poll() is None, logs(logd)
            await asyncio.sleep(0.001)
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(10)
        assert _linked(edir).startswith("000004-") and v4_dir
        # Did the kill land between the switch and the recorded outcome (the usual case)?
        pending = json.loads((edir / "state.json").read_bytes()).get("pending")

        before = (logd / f"edge-{NODE}.log").read_text()
        agent = start_edge(env, NODE, edir, logd)

        async def v4_reported() -> bool:
            return any(isinstance(e, ev.DeployActivated) and e.data.checkpoint_id == "ck-4" for e in await _reports(bus))

        await wait_for(v4_reported, 90, "deploy.activated for v4 after the restart")
        await wait_for(lambda: node_runs(bus, NODE, "ck-4"), 30, "the registry to say v4 runs")
        deployment = order4.data.deployment_id
        said = f"deploy.activated for deployment {deployment}: runs grid:test v4 (ck-4)"
        await wait_for(lambda: said in (logd / f"edge-{NODE}.log").read_text()[len(before):]
                       or f"runs grid:test v4 (ck-4), deployment {deployment} (deploy.activated)" in (logd / f"edge-{NODE}.log").read_text()[len(before):],
                       30, "the restarted agent's log to say that v4 runs, activated")
        log = (logd / f"edge-{NODE}.log").read_text()
        reports = await _reports(bus)
        assert not [e for e in reports if isinstance(e, ev.DeployFailed) and e.data.checkpoint_id == "ck-4"], log
        assert "downgrade refused" not in log, log
        if pending is not None:  # reconciled at start, not left to the redelivery an ack wait later
            assert pending["order"]["data"]["deployment_id"] == deployment
            assert "restarted after switching current to v4 (ck-4)" in log[len(before):], log
        activated = [e for e in reports if isinstance(e, ev.DeployActivated) and e.data.checkpoint_id == "ck-4"]
        assert len(activated) == 1 and activated[0].data.deployment_id == order4.data.deployment_id
    finally:
        code = stop(agent)
    assert code == 0, logs(logd)
