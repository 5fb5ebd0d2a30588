"""The deploy planner: targets and waves (pure), then real processes — `scf run deploy` and
three `scf run edge` agents — on a real nats-server: a promotion becomes a deploy intent,
an approval becomes a canary deployment (the first node, then the other two once it is
healthy); a failing health check on one node rolls it back and reports it; a failing
canary stops the plan; the emergency stop holds a plan until released."""

from __future__ import annotations

import time

import pytest

from scf.bus import events as ev
from scf.bus.codec import Codec
from scf.bus.events import DeployRequested
from scf.consumers.deploy import deploy_intent, deployment_id_for, intent_id_for, plan_orders, waves
from scf.consumers.nodes import NodeInfo, Target, TargetError, parse_target, select
from tests.conftest import scf, stream_count, wait_for
from tests.test_deploy_helpers import (
    Keys,
    approve,
    current_model,
    events_on,
    logs,
    make_model,
    node_runs,
    promotion,
    publish_raw,
    start_edge,
    start_process,
    stop,
)

# --------------------------------------------------------------------------- pure


def test_targets_and_selectors():
    nodes = [
        NodeInfo(node="a", labels={"domain": "grid:case14", "site": "berlin"}),
        NodeInfo(node="b", labels={"domain": "grid:case14", "site": "lab"}),
        NodeInfo(node="c", labels={"domain": "hvac:office3", "site": "berlin"}),
    ]
    assert select(nodes, parse_target("domain=grid:case14")) == ["a", "b"]
    assert select(nodes, parse_target("domain=grid:case14,site!=lab")) == ["a"]
    assert select(nodes, parse_target("site=berlin")) == ["a", "c"]
    assert select(nodes, parse_target("*")) == ["a", "b", "c"]
    assert select(nodes, parse_target("c,zz")) == ["c", "zz"]  # a node list: registered or not
    assert parse_target("nodes:b,a") == Target(nodes=("b", "a"))
    assert parse_target("domain=grid:case14,site!=lab").text() == "domain=grid:case14,site!=lab"
    with pytest.raises(TargetError):
        parse_target("domain=x,???")
    with pytest.raises(TargetError):
        parse_target("  ")


def test_waves_and_ids(tmp_path):
    assert waves(["c", "a", "b"], "canary") == (["a"], ["b", "c"])
    assert waves(["c", "a", "b"], "all") == (["a", "b", "c"], [])
    assert waves(["a"], "canary") == (["a"], [])
    make_model(tmp_path / "m.safetensors")
    promo = promotion("ck-1", 3, tmp_path / "m.safetensors")
    intent = deploy_intent(promo, 7, target="", strategy="canary", source="t")
    assert intent.data.intent_id == intent_id_for("ck-1", "production")
    assert intent.id == deploy_intent(promo, 7, target="", strategy="canary", source="t").id  # redelivery: same event
    assert intent.data.params["target"] == "domain=grid:test" and intent.data.params["promotion_seq"] == 7
    orders = plan_orders(intent.data, ["b", "a"], wave=1, release=b"signed", source="t")
    assert [o.data.node for o in orders] == ["a", "b"]
    assert orders[0].data.deployment_id == deployment_id_for(intent.data.intent_id, "a")
    assert orders[0].data.artifact.version == 3 and orders[0].data.release == b"signed" and orders[0].data.wave == 1
    assert orders[0].id == plan_orders(intent.data, ["a"], wave=1, release=b"signed", source="t")[0].id


# --------------------------------------------------------------------------- processes

NODES = ["edge-a", "edge-b", "edge-c"]
DEPLOY_TYPES = [ev.DeployActivated, ev.DeployFailed, ev.DeployRolledBack, DeployRequested]


async def _deploy_log(bus):
    return await events_on(bus, "DEPLOY", "deploy.>", DEPLOY_TYPES)


async def _all_run(bus, checkpoint_id: str, nodes=NODES) -> bool:
    return all([await node_runs(bus, n, checkpoint_id) for n in nodes])


async def _intent_exists(bus, intent_id: str) -> bool:
    return await bus.last(f"intent.created.deploy.{intent_id}") is not None


@pytest.mark.anyio
@pytest.mark.slow  # six `scf` processes (edge agents, canary, rollback, emergency): 6.6 s of CPU
async def test_canary_health_rollback_and_emergency(bus, settings, scf_env, tmp_path):
    keys = Keys(settings)
    for n in NODES:
        keys.node(n)
    env = dict(scf_env, SCF_LOG="INFO")
    art, logd = tmp_path / "artifacts", tmp_path / "logs"
    logd.mkdir()
    procs = [start_edge(env, n, tmp_path / n, logd, {"domain": "grid:test", "site": "lab"}) for n in NODES]
    procs.append(start_process(env, "deploy", logd))
    try:
        await wait_for(lambda: _all_run(bus, None), 40, "three agents to register")

        # 1. Promotion → intent (held for a human: nothing is deployed yet) → approval → canary.
        make_model(art / "v1.safetensors", 1)
        p1 = promotion("ck-1", 1, art / "v1.safetensors")
        await publish_raw(bus, p1, keys.release)
        iid = intent_id_for("ck-1", "production")
        await wait_for(lambda: _intent_exists(bus, iid), 30, "the deploy intent")
        _, created = await bus.last(f"intent.created.deploy.{iid}")
        assert created.data.kind == "deploy" and created.data.params["strategy"] == "canary"
        assert created.data.params["target"] == "domain=grid:test"
        assert [e for _, e in await _deploy_log(bus)] == []
        await bus.publish(approve(iid))
        await wait_for(lambda: _all_run(bus, "ck-1"), 40, "all three nodes on ck-1")
        log = await _deploy_log(bus)
        orders = [(s, e) for s, e in log if isinstance(e, DeployRequested)]
        activations = {e.data.node: s for s, e in log if isinstance(e, ev.DeployActivated)}
        assert [(e.data.node, e.data.wave) for _, e in orders] == [("edge-a", 0), ("edge-b", 1), ("edge-c", 1)]
        assert all(s > activations["edge-a"] for s, e in orders if e.data.wave == 1), "wave 1 before the canary was healthy"
        assert all(current_model(tmp_path / n) == "ck-1" for n in NODES)

        # 2. A failing health check on one node (a NaN model, ordered to edge-b only through
        #    `scf deploy request`): edge-b rolls back to ck-1 and reports it.
        make_model(art / "v2.safetensors", 2, nan=True)
        p2 = promotion("ck-2", 2, art / "v2.safetensors", alias="staging")
        await publish_raw(bus, p2, keys.release)
        out = scf("deploy", "request", "ck-2", "--target", "edge-b", "--strategy", "all", env=env)
        assert out.returncode == 0, out.stderr
        iid2 = intent_id_for("ck-2", "staging")
        assert iid2 in out.stdout
        await bus.publish(approve(iid2))
        await wait_for(lambda: _reported(bus, ev.DeployRolledBack, "edge-b"), 40, "edge-b to roll back")
        failed = [e.data for _, e in await _deploy_log(bus) if isinstance(e, ev.DeployFailed)]
        assert len(failed) == 1 and failed[0].node == "edge-b" and failed[0].checkpoint_id == "ck-2"
        assert "health check failed" in failed[0].reason and "non-finite" in failed[0].reason
        assert failed[0].running_checkpoint_id == "ck-1"
        rb = [e.data for _, e in await _deploy_log(bus) if isinstance(e, ev.DeployRolledBack)]
        assert rb[0].from_checkpoint_id == "ck-2" and rb[0].to_checkpoint_id == "ck-1"
        assert await _all_run(bus, "ck-1") and current_model(tmp_path / "edge-b") == "ck-1"

        # 3. A failing canary stops the plan: nothing is ordered to edge-b and edge-c.
        make_model(art / "v3.safetensors", 3, nan=True)
        p3 = promotion("ck-3", 3, art / "v3.safetensors")
        await publish_raw(bus, p3, keys.release)
        iid3 = intent_id_for("ck-3", "production")
        await wait_for(lambda: _intent_exists(bus, iid3), 30, "the ck-3 intent")
        await bus.publish(approve(iid3))
        await wait_for(lambda: _reported(bus, ev.DeployFailed, "edge-a", "ck-3"), 40, "the canary to fail")
        plan3 = [e for _, e in await _deploy_log(bus) if isinstance(e, DeployRequested) and e.data.plan_id == iid3]
        assert [e.data.node for e in plan3] == ["edge-a"]
        assert await _all_run(bus, "ck-1")

        # 4. The emergency stop holds an approved plan; released, it proceeds.
        settings.emergency_lock.touch()
        make_model(art / "v4.safetensors", 4)
        p4 = promotion("ck-4", 4, art / "v4.safetensors")
        await publish_raw(bus, p4, keys.release)
        iid4 = intent_id_for("ck-4", "production")
        held = time.monotonic()
        await wait_for(lambda: time.monotonic() - held > 1.0, 5, "a second of emergency stop")
        assert not await _intent_exists(bus, iid4)
        settings.emergency_lock.unlink()
        await wait_for(lambda: _intent_exists(bus, iid4), 30, "the ck-4 intent after the release")
        await bus.publish(approve(iid4))
        await wait_for(lambda: _all_run(bus, "ck-4"), 40, "all three nodes on ck-4")

        out = scf("nodes", "ls", env=env)
        assert out.returncode == 0 and out.stdout.count("ck-4") == 3, out.stdout

        # 5. An unsigned promotion never becomes an intent: the planner dead-letters it
        #    with the reason (and the edge agents would refuse it anyway: test_edge.py).
        assert await stream_count(bus, "DLQ") == 0
        p5 = promotion("ck-5", 5, art / "v4.safetensors")
        await publish_raw(bus, p5, None)
        await wait_for(lambda: stream_count(bus, "DLQ"), 30, "the unsigned promotion in the DLQ")
        dead = (await events_on(bus, "DLQ", "dlq.>", [ev.DeadLettered]))[0][1].data
        assert dead.consumer == "deploy" and "trusted release signature" in dead.error
        assert not await _intent_exists(bus, intent_id_for("ck-5", "production"))
    finally:
        codes = [stop(p) for p in procs]
    assert codes == [0, 0, 0, 0], logs(logd)


async def _reported(bus, cls, node: str, checkpoint_id: str | None = None) -> bool:
    for _, e in await events_on(bus, "DEPLOY", f"deploy.*.{node}", DEPLOY_TYPES):
        if isinstance(e, cls) and (checkpoint_id is None or getattr(e.data, "checkpoint_id", None) == checkpoint_id):
            return True
    return False


def test_release_codec_rejects_untrusted(settings, tmp_path):
    """The planner's own check: an unsigned promotion is not turned into an intent."""
    from scf.bus import codec

    keys = Keys(settings)
    make_model(tmp_path / "m.safetensors")
    p = promotion("ck", 1, tmp_path / "m.safetensors")
    c = Codec([ev.CheckpointPromoted], trust=keys.trust, require_signature=True, role="release")
    assert c.decode(codec.sign(p, keys.release)).data.checkpoint_id == "ck"
    with pytest.raises(Exception, match="missing signature"):
        c.decode(codec.encode(p))
