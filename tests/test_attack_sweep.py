"""The gaps left after issue 10's first pass, attacked as the tester would: a real
nats-server with the production users of nats/users.conf, real `scf run deploy`,
`scf run dispatch`, `scf run ledger` and `scf run edge` processes.

* effect ids outsiders can compute: an `edge` or `operator` login takes the public ids of
  the deploy planner's orders and rejections first; a `worker` login takes dispatch's;
* a replayed signed `control.rollback` (before and after a planner restart);
* the emergency gate fails closed while its state cannot be read;
* the node registry: an older entry the node itself signed, put back for a restarted
  ledger; a deleted entry that must come back with the agent's heartbeat.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import msgspec
import nats
import pytest

from scf.bus import control
from scf.bus import events as ev
from scf.bus.client import MSG_ID, Bus
from scf.bus.events import DeployRequested, DeployRollbackRequested
from scf.bus.ids import derived_id
from scf.bus.settings import Settings
from scf.bus.streams import ensure, ensure_consumer
from scf.consumers import nodes as nodes_mod
from scf.consumers.deploy import deployment_id_for, intent_id_for
from scf.consumers.dispatch import job_id_for
from scf.consumers.ledger import balances, read_transfers
from tests import test_attack_control
from tests.conftest import spawn, wait_for
from tests.test_attack_control import Deployment
from tests.test_attack_ledger import HOUR, T0, reading
from tests.test_deploy_helpers import Keys, approve, events_on, make_model, promotion, publish_raw, start_process, stop
from tests.test_ledger import consumer_done, publish_signed

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]

# the fixtures of the control-plane attacks: nats/users.conf on a real server, a service login
deployment = test_attack_control.deployment
service = test_attack_control.service


async def login(deployment: Deployment, user: str):
    """A plain nats-py client logged in as a production user (the attacker)."""
    prefix = f"_INBOX.{user}" if user != "service" else "_INBOX"  # users.conf: each its own inboxes
    return await nats.connect(deployment.url(user), name=f"attacker-{user}", inbox_prefix=prefix)


def settings_as(deployment: Deployment, user: str) -> Settings:
    return Settings(home=str(deployment.home), nats_url=deployment.url(user), source=user)


def env_as(deployment: Deployment, user: str, **extra: str) -> dict[str, str]:
    return {**deployment.env(), "NATS_URL": deployment.url(user), "SCF_LOG": "INFO", **extra}


def add_toml(deployment: Deployment, text: str) -> None:
    path = deployment.home / "scf.toml"
    path.write_text(path.read_text() + text)


async def take_id(nc, subject: str, msg_id: str, stream: str) -> int:
    """The attack: junk on a subject this login may write, under the id of someone's effect."""
    ack = await nc.jetstream().publish(subject, b'{"junk": true}', headers={MSG_ID: msg_id})
    assert ack.stream == stream and not ack.duplicate
    return ack.seq


async def control_events(bus: Bus, subject: str, types) -> list[ev.Event]:
    return [e for _, e in await events_on(bus, "CONTROL", subject, types)]


# --------------------------------------------------------------------------- the deploy planner


async def test_edge_and_operator_logins_cannot_pre_empt_the_planner_and_a_signed_rollback_is_not_replayed(
    deployment: Deployment, service: Bus, tmp_path: Path
):
    keys = Keys(deployment.settings)
    add_toml(deployment, '[deploy]\ntarget = "edge-x"\nstrategy = "all"\n')
    logs = deployment.logs
    planner = start_process(env_as(deployment, "service"), "deploy", logs)
    edge, operator = await login(deployment, "edge"), await login(deployment, "operator")
    try:
        # 1. control.rejected: the operator takes the id the planner's rejection of the next
        #    CONTROL sequence would have had (public: "control.rejected" + seq)
        nxt = await service.stream_last_seq("CONTROL") + 2
        await take_id(operator, "control.stop", derived_id("control.rejected", nxt), "CONTROL")
        bad = (await operator.jetstream().publish("control.rollback", b"not json")).seq
        assert bad == nxt

        async def rejection_of(seq: int) -> ev.ControlRejected | None:
            found = [e for e in await control_events(service, "control.rejected", [ev.ControlRejected]) if e.data.command_seq == seq]
            return found[0] if found else None

        await wait_for(lambda: rejection_of(bad), 60, f"the planner's control.rejected for CONTROL seq {bad}")
        assert (await rejection_of(bad)).id != derived_id("control.rejected", bad)

        # 2. deploy.rollback_requested: an edge login takes the order's public id
        #    ("deploy.rollback_requested" + the command's CONTROL seq) in DEPLOY
        nxt = await service.stream_last_seq("CONTROL") + 1
        await take_id(edge, "deploy.failed.edge-evil", derived_id("deploy.rollback_requested", nxt), "DEPLOY")
        subject, body, headers = control.encode(control.RollbackCommand(node="edge-x", reason="sweep"), keys.operator)
        assert (await operator.jetstream().publish(subject, body, headers=headers)).seq == nxt

        async def rollbacks() -> list[DeployRollbackRequested]:
            return [e for _, e in await events_on(service, "DEPLOY", "deploy.rollback_requested.edge-x", [DeployRollbackRequested])]

        await wait_for(lambda: _nonempty(rollbacks()), 60, "the rollback order for edge-x")
        [order] = await rollbacks()
        assert order.data.command_seq == nxt and order.id != derived_id("deploy.rollback_requested", nxt)

        # 3. the signed rollback replayed byte for byte: refused, before and after a restart
        for restart in (False, True):
            if restart:
                stop(planner, signal.SIGKILL)
                planner = start_process(env_as(deployment, "service"), "deploy", logs)
            seq = (await operator.jetstream().publish(subject, body, headers=headers)).seq
            await wait_for(lambda: rejection_of(seq), 60, f"the planner's decision on the replay at CONTROL seq {seq}")
            reason = (await rejection_of(seq)).data.reason
            assert reason.startswith("replayed control.rollback: key ") and f"(CONTROL seq {nxt})" in reason, reason
            assert len(await rollbacks()) == 1, "a replayed rollback became an order"

        # 4. deploy.requested: an edge login takes the public id of the order the next
        #    promotion's plan would send to edge-x
        dep = deployment_id_for(intent_id_for("ck-1", "production"), "edge-x")
        await take_id(edge, "deploy.activated.edge-evil", derived_id("deploy.requested", dep), "DEPLOY")
        make_model(tmp_path / "art" / "v1.safetensors", 1)
        await publish_raw(service, promotion("ck-1", 1, tmp_path / "art" / "v1.safetensors"), keys.release)
        iid = intent_id_for("ck-1", "production")
        await wait_for(lambda: _exists(service.last(f"intent.created.deploy.{iid}")), 60, "the deploy intent")
        await service.publish(approve(iid))

        async def orders() -> list[DeployRequested]:
            return [e for _, e in await events_on(service, "DEPLOY", "deploy.requested.edge-x", [DeployRequested])]

        await wait_for(lambda: _nonempty(orders()), 60, "the deploy order for edge-x")
        [o] = await orders()
        assert o.data.deployment_id == dep and o.id != derived_id("deploy.requested", dep)
        assert planner.poll() is None, (logs / "deploy.log").read_text()[-3000:]
    finally:
        stop(planner)
        await edge.close()
        await operator.close()


async def _nonempty(coro) -> bool:
    return bool(await coro)


async def _exists(coro) -> bool:
    return (await coro) is not None


# --------------------------------------------------------------------------- dispatch


def train_intent(intent_id: str) -> ev.IntentCreated:
    return ev.IntentCreated.new(ev.Intent(intent_id=intent_id, kind="train", domain="grid:case14", params={}), source="test")


def train_verdict(intent_id: str) -> ev.VerdictIssued:
    return ev.VerdictIssued.new(
        ev.Verdict(verdict_id=f"v-{intent_id}", subject_id=intent_id, subject_type="intent", decision="APPROVE",
                   gate="test", final=True, kind="train", domain="grid:case14"),
        source="test",
    )


async def approve_training(bus: Bus, intent_id: str) -> None:
    assert (await bus.publish_once(train_intent(intent_id))).status == "new"
    await bus.publish(train_verdict(intent_id))


async def test_a_worker_login_cannot_pre_empt_a_dispatch_record(deployment: Deployment, service: Bus):
    worker = await login(deployment, "worker")
    job = job_id_for("intent-sweep")
    # the worker takes the record's public id in TRAINING, where it may write job.started.*
    await take_id(worker, f"job.started.{job}", derived_id("job.dispatched", job), "TRAINING")
    proc = start_process(env_as(deployment, "service"), "dispatch", deployment.logs)
    try:
        await approve_training(service, "intent-sweep")
        await wait_for(lambda: _exists(service.last(f"job.dispatched.{job}")), 60, "the dispatch record")
        _, record = await service.last(f"job.dispatched.{job}")
        assert record.data.job_id == job and record.id != derived_id("job.dispatched", job)
        assert (await service.js.stream_info("JOBS")).state.messages == 1  # the work item, once
    finally:
        stop(proc)
        await worker.close()


# --------------------------------------------------------------------------- the emergency gate


async def test_the_emergency_gate_fails_closed_while_its_state_cannot_be_read(deployment: Deployment, service: Bus):
    log = deployment.logs / "dispatch.log"
    proc = start_process(env_as(deployment, "service"), "dispatch", deployment.logs)
    try:
        await approve_training(service, "intent-before")
        job0 = job_id_for("intent-before")
        await wait_for(lambda: _exists(service.last(f"job.dispatched.{job0}")), 60, "dispatch running, its gate open")

        await service.js.delete_key_value("scf_state")  # the state can no longer be read
        closed = "emergency gate closed: cannot read scf_state/emergency"
        await wait_for(lambda: _logged(log, closed, 1), 60, "the gate to close")
        await approve_training(service, "intent-during")
        job1 = job_id_for("intent-during")
        # the gate says it is closed again after the verdict arrived: it was held meanwhile
        n = log.read_text().count(closed)
        await wait_for(lambda: _logged(log, closed, n + 1), 60, "the gate to stay closed")
        assert await service.last(f"job.dispatched.{job1}") is None, "dispatched while the emergency state was unknown"
        assert proc.poll() is None, log.read_text()[-3000:]

        await ensure(service.js)  # the bucket back, the key never written: not engaged
        await wait_for(lambda: _exists(service.last(f"job.dispatched.{job1}")), 60, "the held verdict dispatched")
        assert "emergency gate: scf_state/emergency read again (clear)" in log.read_text()
    finally:
        stop(proc)


async def _logged(path: Path, text: str, times: int) -> bool:
    return path.exists() and path.read_text().count(text) >= times


# --------------------------------------------------------------------------- the node registry


async def test_a_replayed_registry_entry_is_refused_by_a_restarted_ledger(deployment: Deployment, service: Bus):
    keys = Keys(deployment.settings)
    kx = keys.node("node-x")
    node_x = await Bus.connect(settings_as(deployment, "edge"), "edge-node-x", key=kx)
    attacker = await login(deployment, "edge")
    ledger = None
    try:
        old = nodes_mod.NodeInfo(node="node-x", labels={"account": "acme"}, updated_at=T0)
        await nodes_mod.register(node_x, old)
        captured = (await (await service.kv(nodes_mod.NODES_BUCKET)).get("node-x")).value  # what the attacker saw
        await nodes_mod.register(node_x, nodes_mod.NodeInfo(node="node-x", labels={"account": "acme-2"}, updated_at=T0 + HOUR))

        ledger = start_process(env_as(deployment, "service"), "ledger", deployment.logs)
        seq = await publish_signed(service, reading("node-x", T0, T0 + HOUR), kx)
        await wait_for(lambda: consumer_done(service, seq - 1), 60, "the ledger to mint the first hour")
        stop(ledger, signal.SIGKILL)

        # the production edge login puts back the older entry node-x signed itself
        ack = await attacker.jetstream().publish(f"$KV.{nodes_mod.NODES_BUCKET}.node-x", captured)
        assert ack.stream == f"KV_{nodes_mod.NODES_BUCKET}"
        assert msgspec.json.decode((await (await service.kv(nodes_mod.NODES_BUCKET)).get("node-x")).value) == msgspec.json.decode(captured)
        assert await nodes_mod.get_node(service, "node-x", trust=keys.trust) is None  # refused: older than the newest believed

        ledger = start_process(env_as(deployment, "service"), "ledger", deployment.logs)  # nothing in memory
        seq = await publish_signed(service, reading("node-x", T0 + HOUR, T0 + 2 * HOUR), kx)
        await wait_for(lambda: consumer_done(service, seq - 1), 60, "the restarted ledger to mint the second hour")
        bal = balances(await read_transfers(service))
        assert bal == {"issuer:negentropy": -2 * 18_000_000, "client:acme-2": 2 * 18_000_000}, bal

        # the node's next registration is believed again
        await nodes_mod.register(node_x, nodes_mod.NodeInfo(node="node-x", labels={"account": "acme-3"}, updated_at=T0 + 2 * HOUR))
        assert (await nodes_mod.get_node(service, "node-x", trust=keys.trust)).labels == {"account": "acme-3"}
    finally:
        if ledger is not None:
            stop(ledger)
        await node_x.close()
        await attacker.close()


async def test_a_deleted_registry_entry_comes_back_with_the_agents_heartbeat(deployment: Deployment, service: Bus, tmp_path: Path):
    keys = Keys(deployment.settings)
    keys.node("node-h")
    add_toml(deployment, "[edge]\nregister_every_s = 1.0\n")
    await ensure_consumer(service.js, nodes_mod.edge_consumer("node-h"))  # the planner's job; the edge user may only bind
    argv = [sys.executable, "-m", "scf.cli.main", "run", "edge", "--node", "node-h", "--dir", str(tmp_path / "node-h"), "--bind-only"]
    proc = spawn(argv, env_as(deployment, "edge"), deployment.logs / "edge-node-h.log")
    attacker = await login(deployment, "edge")
    kv = await service.kv(nodes_mod.NODES_BUCKET)
    try:
        await wait_for(lambda: _exists(nodes_mod.get_node(service, "node-h", trust=keys.trust)), 60, "node-h to register")
        ack = await attacker.jetstream().publish(f"$KV.{nodes_mod.NODES_BUCKET}.node-h", b"", headers={"KV-Operation": "DEL"})
        assert ack.stream == f"KV_{nodes_mod.NODES_BUCKET}"
        assert await nodes_mod.get_node(service, "node-h", trust=keys.trust) is None  # the denial

        async def back() -> bool:
            entry = await kv.get("node-h")
            return entry.revision > ack.seq and await nodes_mod.get_node(service, "node-h", trust=keys.trust) is not None

        await wait_for(lambda: _quiet(back()), 60, "node-h's entry back with its next registration")
        assert proc.poll() is None, (deployment.logs / "edge-node-h.log").read_text()[-3000:]
    finally:
        stop(proc)
        await attacker.close()


async def _quiet(coro) -> bool:
    try:
        return await coro
    except Exception:  # noqa: BLE001 - the key deleted (KeyDeletedError): not back yet
        return False


# --------------------------------------------------------------------------- deliver subjects


async def test_an_operator_push_consumer_cannot_write_into_control(deployment: Deployment, service: Bus):
    """Found during the sweep. The operator may create consumers on any stream but JOBS, and a
    consumer's deliver subject is in the request body, which no subject permission sees: bytes
    the operator may write into TRUST (trust.key.*), delivered onto `emergency.released`, were
    stored by CONTROL while the operator listened there. A push consumer delivers only where
    someone listens, and the operator (like analyst, worker and edge) may now subscribe only to
    inboxes: its subscription is refused, the consumer is never bound, nothing is delivered."""
    from nats.js import api

    refusals: list[str] = []

    async def on_error(err: Exception) -> None:
        refusals.append(str(err))

    operator = await nats.connect(deployment.url("operator"), name="attacker-operator", error_cb=on_error,
                                 inbox_prefix="_INBOX.operator")
    try:
        seq = (await operator.jetstream().publish("trust.key.forged", b'{"type": "emergency.released"}')).seq
        received: list = []

        async def interest(msg) -> None:
            received.append(msg)

        await operator.subscribe("emergency.released", cb=interest)
        await wait_for(lambda: any('subscription to "emergency.released"' in r.lower() for r in refusals), 30,
                       "the server to refuse the subscription")
        info = await operator.jetstream().add_consumer(
            "TRUST", api.ConsumerConfig(deliver_subject="emergency.released", ack_policy=api.AckPolicy.NONE,
                                        filter_subject="trust.key.forged", opt_start_seq=seq,
                                        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE),
        )
        # the server's own view: the consumer has one message pending and no one to deliver it to
        info = await operator.jetstream().consumer_info("TRUST", info.name)
        assert info.push_bound is not True and info.num_pending == 1 and info.delivered.consumer_seq == 0, info
        # a message CONTROL stores afterwards: whatever a delivery put there is stored by then
        marker = (await service.js.publish("control.stop", b"{}")).seq
        subjects = [(await service.js.get_msg("CONTROL", n)).subject for n in range(1, marker)]
        assert subjects == [] and received == [], f"CONTROL stored messages the operator may not write there: {subjects}"
        info = await operator.jetstream().consumer_info("TRUST", info.name)
        assert info.delivered.consumer_seq == 0, info
    finally:
        await operator.close()
