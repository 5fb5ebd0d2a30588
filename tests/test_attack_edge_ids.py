"""Edge effects an outsider can forge or pre-empt.

Every edge box logs in as the one `edge` user, which may publish `deploy.activated.*`,
`deploy.failed.*`, `deploy.rolled_back.*` and `energy.measured.*` for any node (NATS cannot
tell edge boxes apart). The tester, with the production `edge` password on a box of its own:

* publishes junk on `energy.measured.node-m` under the public `Nats-Msg-Id` node-m's next
  measurement would carry (derived from the node and the period, which anyone can compute):
  JetStream dropped the genuine measurement as a duplicate and the hour was never credited.
  Now every id an edge agent publishes is keyed with a secret derived from its node key
  (consumers/edge/keys.py `seal`);
* publishes `deploy.activated.edge-x` for the canary of a plan (unsigned, then signed by a
  trusted key of another node): the deploy planner took it as the canary's health and sent
  wave 1. Now an activation counts only when signed by the node's own trusted key; anything
  else is dead-lettered with the reason.

A real nats-server with nats/users.conf, real `scf run edge` (as the production `edge` user),
`scf run ledger` and `scf run deploy` processes.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import pytest

from scf.bus import events as ev
from scf.bus.client import Bus
from scf.bus.codec import encode, sign
from scf.bus.events import DeployRequested
from scf.bus.ids import derived_id
from scf.bus.reader import read
from scf.bus.streams import ensure_consumer
from scf.consumers import nodes as nodes_mod
from scf.consumers.deploy import intent_id_for
from scf.consumers.energy import measurement_id
from scf.consumers.ledger import read_transfers
from tests import test_attack_control
from tests.conftest import spawn, wait_for
from tests.mv_support import mv_fields
from tests.test_attack_control import Deployment
from tests.test_attack_sweep import add_toml, env_as, login, take_id
from tests.test_deploy_helpers import Keys, approve, events_on, make_model, promotion, publish_raw, start_process, stop

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]

deployment = test_attack_control.deployment
service = test_attack_control.service


async def test_an_edge_login_cannot_pre_empt_another_nodes_measurement(deployment: Deployment, service: Bus, tmp_path: Path):
    keys = Keys(deployment.settings)
    keys.node("node-m")
    await ensure_consumer(service.js, nodes_mod.edge_consumer("node-m"))  # the planner's job; the edge user may only bind
    edir = tmp_path / "node-m"
    argv = [sys.executable, "-m", "scf.cli.main", "run", "edge", "--node", "node-m", "--dir", str(edir), "--bind-only"]
    agent = spawn(argv, env_as(deployment, "edge"), deployment.logs / "edge-node-m.log")
    ledger = start_process(env_as(deployment, "service"), "ledger", deployment.logs)
    attacker = await login(deployment, "edge")
    try:
        await wait_for(lambda: (edir / "meter").is_dir(), 60, "the agent to start")
        t0 = dt.datetime(2026, 11, 5, 10, tzinfo=dt.timezone.utc)
        t1 = t0 + dt.timedelta(hours=1)
        # the attack: the id node-m's measurement of that hour would carry, taken first
        public = derived_id("energy.measured.event", measurement_id("node-m", t0, t1))
        await take_id(attacker, "energy.measured.node-m", public, "DEPLOY")
        reading = {"period_start": t0.isoformat(), "period_end": t1.isoformat(), "baseline_kwh": 12.5, "actual_kwh": 10.0,
                   **mv_fields(12.5, 10.0)}
        (edir / "meter" / "r1.json").write_text(json.dumps(reading))

        async def minted() -> bool:
            return any(e.transfer.credit_account == "node:node-m" for e in await read_transfers(service))

        await wait_for(minted, 60, "node-m's hour minted (its measurement stored despite the taken id)")
        junk, genuine = await read(service, "DEPLOY", "energy.measured.node-m")
        assert junk.data == b'{"junk": true}' and (junk.headers or {}).get("Nats-Msg-Id") == public
        assert (genuine.headers or {}).get("Nats-Msg-Id") != public  # keyed with node-m's secret
        assert agent.poll() is None and ledger.poll() is None
    finally:
        stop(agent)
        stop(ledger)
        await attacker.close()


async def test_a_forged_activation_does_not_advance_a_canary(deployment: Deployment, service: Bus, tmp_path: Path):
    keys = Keys(deployment.settings)
    for n in ("edge-x", "edge-y", "edge-evil"):
        keys.node(n)
    add_toml(deployment, '[deploy]\ntarget = "edge-x,edge-y"\nstrategy = "canary"\n')
    planner = start_process(env_as(deployment, "service"), "deploy", deployment.logs)
    attacker = await login(deployment, "edge")
    try:
        make_model(tmp_path / "art" / "v1.safetensors", 1)
        await publish_raw(service, promotion("ck-1", 1, tmp_path / "art" / "v1.safetensors"), keys.release)
        iid = intent_id_for("ck-1", "production")
        await wait_for(lambda: _exists(service.last(f"intent.created.deploy.{iid}")), 60, "the deploy intent")
        await service.publish(approve(iid))

        async def orders(node: str) -> list[DeployRequested]:
            return [e for _, e in await events_on(service, "DEPLOY", f"deploy.requested.{node}", [DeployRequested])]

        await wait_for(lambda: _nonempty(orders("edge-x")), 60, "wave 0 (the canary edge-x)")
        [order] = await orders("edge-x")  # what a compromised edge box reads from edge-x's durable
        health = ev.Activation(deployment_id=order.data.deployment_id, plan_id=order.data.plan_id, node="edge-x",
                               checkpoint_id="ck-1", version=1)
        forged = [encode(ev.DeployActivated.new(health, source="edge:evil")),
                  sign(ev.DeployActivated.new(health, source="edge:evil"), keys.nodes["edge-evil"])]
        for body in forged:
            assert (await attacker.jetstream().publish("deploy.activated.edge-x", body)).stream == "DEPLOY"

        async def dead_letters() -> list[str]:
            return [m.data.decode(errors="replace") for _, m in await _dlq(service)]  # each entry names its error

        await wait_for(lambda: _count(dead_letters(), 2), 60, "both forged activations dead-lettered")
        reasons = await dead_letters()
        assert any("missing signature" in r for r in reasons), reasons
        assert any("named 'edge-evil'" in r and "only the node's own key" in r for r in reasons), reasons
        assert await orders("edge-y") == [], "a forged activation sent wave 1"

        # the genuine report, signed by edge-x's own key: wave 1 follows
        await publish_raw(service, ev.DeployActivated.new(health, source="edge:edge-x"), keys.nodes["edge-x"])
        await wait_for(lambda: _nonempty(orders("edge-y")), 60, "wave 1 after edge-x's own activation")
        assert planner.poll() is None, (deployment.logs / "deploy.log").read_text()[-3000:]
    finally:
        stop(planner)
        await attacker.close()


async def _dlq(bus: Bus):
    return [(m.seq, m) for m in await read(bus, "DLQ", "dlq.>")]


async def _count(coro, n: int) -> bool:
    return len(await coro) >= n


async def _nonempty(coro) -> bool:
    return bool(await coro)


async def _exists(coro) -> bool:
    return (await coro) is not None
