"""The edge agent: the health probe and release verification (pure), then one real
`scf run edge` process (with `scf run deploy` translating control.rollback) through:
activate v1; a tampered artifact, an unsigned release, a release signed by a non-release
key and an order that does not match its release are refused and v1 keeps running;
v2 activates; a silent downgrade is refused; rollback on command (previous, then named);
a restart keeps the state; a meter reading becomes a signed energy.measured."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil

import msgspec
import pytest

from scf.bus import codec
from scf.bus import events as ev
from scf.bus.client import Bus
from scf.bus.codec import Codec
from scf.bus.events import DeployRequested, DeployRollbackRequested
from scf.consumers.edge import EdgeAgent, Refused, health_check, verify_release
from tests.conftest import cli, stream_count, wait_for
from tests.mv_support import mv_fields
from tests.test_deploy_helpers import (
    Keys,
    current_model,
    events_on,
    logs,
    make_model,
    node_runs,
    orders_for,
    promotion,
    publish_raw,
    start_edge,
    start_process,
    stop,
)

# --------------------------------------------------------------------------- pure


def test_health_check(tmp_path):
    make_model(tmp_path / "ok.safetensors", 1)
    assert health_check(tmp_path / "ok.safetensors") is None
    make_model(tmp_path / "nan.safetensors", 1, nan=True)
    assert "non-finite" in health_check(tmp_path / "nan.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert "does not load" in health_check(tmp_path / "junk.safetensors")
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"steps": np.arange(3, dtype=np.int64)}, str(tmp_path / "ints.safetensors"))
    assert "no floating-point tensor" in health_check(tmp_path / "ints.safetensors")


def test_verify_release(tmp_path, settings):
    keys = Keys(settings)
    codec_r = Codec([ev.CheckpointPromoted], trust=keys.trust, require_signature=True, role="release")
    make_model(tmp_path / "m.safetensors")
    promo = promotion("ck-1", 1, tmp_path / "m.safetensors")
    good = orders_for(promo, codec.sign(promo, keys.release), ["n"])[0].data
    assert verify_release(good, codec_r).data.checkpoint_id == "ck-1"
    with pytest.raises(Refused, match="unsigned release"):
        verify_release(msgspec.structs.replace(good, release=b""), codec_r)
    with pytest.raises(Refused, match="missing signature"):
        verify_release(msgspec.structs.replace(good, release=codec.encode(promo)), codec_r)
    with pytest.raises(Refused, match="lacks the 'release' role"):
        verify_release(msgspec.structs.replace(good, release=codec.sign(promo, keys.operator)), codec_r)
    other = msgspec.structs.replace(good.artifact, uri="file:///elsewhere", sha256="0" * 64)
    with pytest.raises(Refused, match="uri, sha256 differ"):
        verify_release(msgspec.structs.replace(good, artifact=other), codec_r)
    # A signature over other bytes: flip the version inside the signed envelope.
    raw = codec.sign(promo, keys.release).replace(b'"version":1', b'"version":9')
    with pytest.raises(Refused, match="bad signature"):
        verify_release(msgspec.structs.replace(good, release=raw), codec_r)


# --------------------------------------------------------------------------- one real agent

NODE = "edge-1"


async def _orders_done(bus: Bus, n: int) -> bool:
    info = await bus.js.consumer_info("DEPLOY", f"edge-{NODE}")
    return info.delivered.stream_seq > 0 and info.num_pending == 0 and info.num_ack_pending == 0 and info.delivered.consumer_seq >= n


async def _reports(bus: Bus):
    return [e for _, e in await events_on(bus, "DEPLOY", "deploy.*.edge-1",
                                          [ev.DeployActivated, ev.DeployFailed, ev.DeployRolledBack, DeployRequested, DeployRollbackRequested])]


@pytest.mark.anyio
@pytest.mark.slow  # three `scf run` processes (the edge agent twice, the deploy planner; the rollbacks in-process)
async def test_edge_agent_lifecycle(bus, settings, scf_env, tmp_path):
    keys = Keys(settings)
    keys.node(NODE)
    env = dict(scf_env, SCF_LOG="INFO")
    art, edir, logd = tmp_path / "artifacts", tmp_path / "edge", tmp_path / "logs"
    logd.mkdir()
    make_model(art / "v1.safetensors", 1)
    make_model(art / "v2.safetensors", 2)
    p1, p2 = promotion("ck-1", 1, art / "v1.safetensors"), promotion("ck-2", 2, art / "v2.safetensors")
    s1, raw1 = await publish_raw(bus, p1, keys.release)
    s2, raw2 = await publish_raw(bus, p2, keys.release)

    agent = start_edge(env, NODE, edir, logd, {"domain": "grid:test", "site": "lab"})
    planner = start_process(env, "deploy", logd)
    sent = 0

    async def send(order) -> None:
        nonlocal sent
        await bus.publish(order)
        sent += 1

    async def failed_with(text: str) -> ev.DeployFailure:
        failures = [e.data for e in await _reports(bus) if isinstance(e, ev.DeployFailed) and text in e.data.reason]
        assert failures, f"no deploy.failed mentioning {text!r}"
        return failures[-1]

    try:
        await wait_for(lambda: node_runs(bus, NODE, None), 30, "the agent to register")

        # 1. v1 activates.
        await send(orders_for(p1, raw1, [NODE], seq=s1, plan="plan-1")[0])
        await wait_for(lambda: node_runs(bus, NODE, "ck-1"), 30, "v1 active")
        assert current_model(edir) == "ck-1"

        # 2. A tampered artifact: the file changed after the release was signed.
        shutil.copy(art / "v2.safetensors", art / "v2-tampered.safetensors")
        p2t = promotion("ck-2t", 2, art / "v2-tampered.safetensors")
        s2t, raw2t = await publish_raw(bus, p2t, keys.release)
        with open(art / "v2-tampered.safetensors", "r+b") as fh:
            fh.seek(-4, 2)
            fh.write(b"\x00\x00\x80\x7f")  # the last float becomes +inf
        await send(orders_for(p2t, raw2t, [NODE], seq=s2t, plan="plan-2")[0])
        await wait_for(lambda: _orders_done(bus, sent), 30, "the tampered order")
        f = await failed_with("digest mismatch")
        assert f.checkpoint_id == "ck-2t" and f.running_checkpoint_id == "ck-1"

        # 3. An unsigned release, a release signed by an operator (not a release key),
        #    and an order whose artifact is not the one its release signed.
        await send(orders_for(p2, codec.encode(p2), [NODE], seq=s2, plan="plan-3")[0])
        await send(orders_for(p2, codec.sign(p2, keys.operator), [NODE], seq=s2, plan="plan-4")[0])
        swapped = orders_for(p2t, raw2, [NODE], seq=s2, plan="plan-5")[0]  # says ck-2t, carries ck-2's release
        await send(swapped)
        await wait_for(lambda: _orders_done(bus, sent), 30, "the refused orders")
        await failed_with("missing signature")
        await failed_with("lacks the 'release' role")
        await failed_with("does not match its signed release")
        assert current_model(edir) == "ck-1" and await node_runs(bus, NODE, "ck-1")
        assert sorted(p.name for p in (edir / "versions").iterdir()) == ["000001-" + _h("ck-1")]

        # 4. v2 activates.
        await send(orders_for(p2, raw2, [NODE], seq=s2, plan="plan-6")[0])
        await wait_for(lambda: node_runs(bus, NODE, "ck-2"), 30, "v2 active")

        # 5. A silent downgrade to v1 (a new plan) is refused.
        await send(orders_for(p1, raw1, [NODE], seq=s1, plan="plan-7")[0])
        await wait_for(lambda: _orders_done(bus, sent), 30, "the downgrade order")
        f = await failed_with("downgrade refused")
        assert f.running_checkpoint_id == "ck-2" and current_model(edir) == "ck-2"

        # 6. Rollback on command (through the planner): to the previous, then to a named version.
        r = await asyncio.to_thread(cli, "control", "rollback", NODE, "--reason", "bad readings", env=env)
        assert r.returncode == 0, r.stderr
        await wait_for(lambda: node_runs(bus, NODE, "ck-1"), 30, "rolled back to v1")
        rb = [e.data for e in await _reports(bus) if isinstance(e, ev.DeployRolledBack)]
        assert rb[-1].from_checkpoint_id == "ck-2" and rb[-1].to_checkpoint_id == "ck-1" and rb[-1].reason == "bad readings"
        r = await asyncio.to_thread(cli, "control", "rollback", NODE, "--to", "2", env=env)
        assert r.returncode == 0, r.stderr
        await wait_for(lambda: node_runs(bus, NODE, "ck-2"), 30, "rolled forward to v2 by name")
        r = await asyncio.to_thread(cli, "control", "rollback", NODE, "--to", "ck-404", env=env)
        await wait_for(lambda: _has_failure(bus, "no artifact 'ck-404'"), 30, "the refused rollback")
        assert current_model(edir) == "ck-2"

        # 7. Restart: the state survives (history, current), and a rollback still finds v1.
        assert stop(agent) == 0, logs(logd)
        (edir / "state.json").unlink()  # even without its state file: rebuilt from the directory
        agent = start_edge(env, NODE, edir, logd, {"domain": "grid:test", "site": "lab"})
        await wait_for(lambda: _registered_after_restart(bus), 30, "the agent to come back")
        assert current_model(edir) == "ck-2"
        r = await asyncio.to_thread(cli, "control", "rollback", NODE, env=env)
        await wait_for(lambda: node_runs(bus, NODE, "ck-1"), 30, "rolled back to v1 after the restart")

        # 8. A meter reading dropped by a bridge becomes a signed energy.measured, with its M&V figures.
        reading = {"period_start": "2026-11-01T00:00:00Z", "period_end": "2026-11-01T01:00:00Z",
                   "baseline_kwh": 12.5, "actual_kwh": 10.0, **mv_fields(12.5, 10.0)}
        (edir / "meter" / "r1.json").write_text(json.dumps(reading))
        await wait_for(lambda: (edir / "meter" / "sent" / "r1.json").exists(), 30, "the reading to be sent")
        measured = await events_on(bus, "DEPLOY", "energy.measured.>", [ev.EnergyMeasured])
        assert len(measured) == 1
        raw = (await bus.js.get_msg("DEPLOY", measured[0][0])).data
        m = Codec([ev.EnergyMeasured], trust=keys.trust, require_signature=True, role="node").decode(raw)
        assert m.data.node == NODE and m.data.saved_kwh == 2.5 and m.data.deployment_id is not None
        assert m.data.calibration is not None and m.data.calibration.cv_rmse == 0.05 and m.data.uncertainty_kwh == 0.25
        assert await stream_count(bus, "DLQ") == 0
    finally:
        codes = [stop(agent), stop(planner)]
    assert codes == [0, 0], logs(logd)


def _h(checkpoint_id: str) -> str:
    import hashlib

    return hashlib.sha256(checkpoint_id.encode()).hexdigest()[:16]


async def _has_failure(bus: Bus, text: str) -> bool:
    return any(isinstance(e, ev.DeployFailed) and text in e.data.reason for e in await _reports(bus))


async def _registered_after_restart(bus: Bus) -> bool:
    from scf.consumers.nodes import get_node

    info = await get_node(bus, NODE)
    return info is not None and info.updated_at is not None and info.updated_at > dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5) and info.status == "active"


# --------------------------------------------------------------------------- state rebuild (in process)


@pytest.mark.anyio
async def test_state_rebuilt_from_directory(bus, settings, tmp_path):
    keys = Keys(settings)
    make_model(tmp_path / "a" / "v1.safetensors", 1)
    make_model(tmp_path / "a" / "v2.safetensors", 2)
    p1, p2 = promotion("ck-1", 1, tmp_path / "a" / "v1.safetensors"), promotion("ck-2", 2, tmp_path / "a" / "v2.safetensors")
    agent = await EdgeAgent(bus, "n", tmp_path / "edge", keys.trust).start()
    for p in (p1, p2):
        out = await agent.handle(orders_for(p, codec.sign(p, keys.release), ["n"])[0])
        assert isinstance(out[0], ev.DeployActivated)
    (tmp_path / "edge" / "state.json").write_text("{garbage")
    again = await EdgeAgent(bus, "n", tmp_path / "edge", keys.trust).start()
    assert again.current().checkpoint_id == "ck-2"
    assert [i.checkpoint_id for i in again.store.state.history] == ["ck-1", "ck-2"]
    assert again.rollback_target(None).checkpoint_id == "ck-1"
    # A redelivered order that already ran is confirmed (same event id), not re-installed.
    order = orders_for(p2, codec.sign(p2, keys.release), ["n"])[0]
    first = await again.handle(order)
    assert isinstance(first[0], ev.DeployActivated) and first[0].id == (await again.handle(order))[0].id
