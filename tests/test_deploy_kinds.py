"""An edge node deploys only the model kinds it runs (consumers/edge/kinds.py): a node that
controls a plant runs a learned optimiser (or its ternary student), so a promoted EBDM or
code model of the same domain never replaces it. The planner sends a kind only to the
nodes whose registry entry runs it; an order of another kind sent anyway is refused by the
agent (by the signed promotion's kind before any fetch, or by the file's header when the
promotion states none) and the optimiser keeps running. Real nats-server, the planner and
two agents in process, a real (small) trained optimiser."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import msgspec
import numpy as np
import pytest
from safetensors.numpy import save_file

from scf.bus import events as ev
from scf.bus.client import Bus
from scf.bus.errors import ConfigError
from scf.bus.events import DeployRequested
from scf.consumers.deploy import DeployPlanner, intent_id_for
from scf.consumers.edge import EdgeAgent, EdgeSettings
from scf.consumers.edge.kinds import accepted, file_kind
from scf.consumers.nodes import NodeInfo, get_node
from tests.conftest import cli, wait_for
from tests.test_deploy_helpers import Keys, approve, current_model, events_on, orders_for, publish_raw

DOMAIN = "grid:case14"
CTL, STORE = "ctl-1", "store-1"


@pytest.fixture(scope="module")
def optimiser(case14_optimiser):
    pytest.importorskip("torch")
    return case14_optimiser  # the run's one (conftest): trained once for this file and test_strike_learned


def write(path: Path, tensors: dict[str, np.ndarray], **meta: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta or None)
    return path


def ebdm_file(path: Path) -> Path:
    rng = np.random.default_rng(1)
    return write(path, {"net.0.weight": rng.standard_normal((8, 4)).astype(np.float32)}, format="scf-ebdm/1")


def promotion(cid: str, version: int, path: Path, kind: str) -> ev.CheckpointPromoted:
    data = path.read_bytes()
    return ev.CheckpointPromoted.new(ev.Promotion(checkpoint_id=cid, domain=DOMAIN, alias="production", version=version,
                                                  uri=path.resolve().as_uri(), sha256=hashlib.sha256(data).hexdigest(),
                                                  size=len(data), kind=kind), source="daemon")


def test_file_kinds_and_settings(tmp_path):
    w = np.ones((2, 3), np.float32)
    cases = {
        "opt": ({"w": w}, {"format": "scf-opt/1"}, "optimiser"),
        "opt-student": ({"w": w}, {"format": "scf-ternary/1", "model": "optimiser"}, "optimiser"),
        "ebdm-student": ({"w": w}, {"format": "scf-ternary/1", "model": "ebdm"}, "ebdm"),
        "ebdm": ({"w": w}, {"format": "scf-ebdm/1"}, "ebdm"),
        "code": ({"w": w}, {"format": "scf-ternary-lm/1"}, "code"),
        "decision": ({"decision": w}, {}, "optimiser"),
        "policy": ({"policy.0.weight": w}, {}, "optimiser"),
        "unknown": ({"net.0.weight": w}, {}, ""),
    }
    for name, (tensors, meta, kind) in cases.items():
        assert file_kind(write(tmp_path / f"{name}.safetensors", tensors, **meta))[0] == kind, name
    (tmp_path / "junk").write_bytes(b"\xff" * 9)
    kind, what = file_kind(tmp_path / "junk")
    assert kind == "" and what.startswith("a file that is not a safetensors model")
    assert accepted([], has_plant=True) == ("optimiser",) and accepted([], has_plant=False) is None
    assert accepted(["ebdm", "optimiser"], has_plant=True) == ("ebdm", "optimiser")
    with pytest.raises(ConfigError, match=r"\[edge\] runs names 'controller': the model kinds are ebdm, optimiser, code"):
        accepted(["controller"], has_plant=False)


async def _failures(bus: Bus, node: str) -> list[ev.DeployFailure]:
    return [e.data for _, e in await events_on(bus, "DEPLOY", f"deploy.failed.{node}", [ev.DeployFailed])]


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_plant_node_keeps_its_optimiser_when_an_ebdm_is_promoted(bus, settings, scf_env, tmp_path, optimiser):
    keys = Keys(settings)
    buses = {n: await Bus.connect(settings, f"edge-{n}", key=keys.node(n)) for n in (CTL, STORE)}
    planner_bus = await Bus.connect(settings, "deploy")
    # ctl-1 controls a plant (its label; the loop itself is not started here): it runs optimisers
    # only; store-1 has none (a deploy-only node): it takes every kind.
    labels = {CTL: {"domain": DOMAIN, "plant": "mqtt://127.0.0.1:9/site"}, STORE: {"domain": DOMAIN}}
    agents = {n: await EdgeAgent(buses[n], n, tmp_path / n, keys.trust, labels=labels[n], settings=EdgeSettings()).start()
              for n in (CTL, STORE)}
    assert agents[CTL].runs == ("optimiser",) and agents[STORE].runs is None
    planner = DeployPlanner(planner_bus, keys.trust)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(r.run(stop)) for r in [*planner.runners(), *(a.runner() for a in agents.values())]]
    art = tmp_path / "artifacts"
    art.mkdir()
    opt = art / "opt-1.safetensors"
    opt.write_bytes(Path(optimiser).read_bytes())
    ebdm = ebdm_file(art / "ebdm.safetensors")

    async def runs(node: str, cid: str) -> bool:
        info = await get_node(bus, node)
        return info is not None and info.checkpoint_id == cid

    async def intent_exists(iid: str) -> bool:
        try:
            await bus.js.get_last_msg("INTENTS", f"intent.created.deploy.{iid}")
            return True
        except Exception:  # noqa: BLE001 - not there yet
            return False

    try:
        info = await get_node(bus, CTL)
        assert info is not None and info.runs == ["optimiser"] and (await get_node(bus, STORE)).runs == []

        # 1. The optimiser goes to both nodes (canary ctl-1, then store-1).
        await publish_raw(bus, promotion("opt-1", 1, opt, "optimiser"), keys.release)
        await wait_for(lambda: intent_exists(intent_id_for("opt-1", "production")), 30, "the optimiser's deploy intent")
        await bus.publish(approve(intent_id_for("opt-1", "production")))
        await wait_for(lambda: runs(CTL, "opt-1"), 40, "ctl-1 on opt-1")
        await wait_for(lambda: runs(STORE, "opt-1"), 40, "store-1 on opt-1")

        # 2. An EBDM of the same domain is promoted (its own head): the planner orders it to
        #    store-1 only; ctl-1 keeps the optimiser.
        p2 = promotion("ebdm-2", 2, ebdm, "ebdm")
        _, raw2 = await publish_raw(bus, p2, keys.release)
        iid2 = intent_id_for("ebdm-2", "production")
        await wait_for(lambda: intent_exists(iid2), 30, "the EBDM's deploy intent")
        await bus.publish(approve(iid2))
        await wait_for(lambda: runs(STORE, "ebdm-2"), 40, "store-1 on ebdm-2")
        orders = [e.data.node for _, e in await events_on(bus, "DEPLOY", "deploy.requested.>", [DeployRequested])
                  if e.data.plan_id == iid2]
        assert orders == [STORE], "the planner ordered an EBDM to a node that runs optimisers"
        assert await runs(CTL, "opt-1") and current_model(tmp_path / CTL) == "opt-1"

        # 3. Ordered to ctl-1 anyway (the planner bypassed): refused by its signed kind, before any fetch.
        await bus.publish(orders_for(p2, raw2, [CTL], plan="direct-ebdm")[0])
        await wait_for(lambda: _failures(bus, CTL), 30, "ctl-1 to refuse the EBDM")
        [f] = await _failures(bus, CTL)
        assert f.checkpoint_id == "ebdm-2" and f.running_checkpoint_id == "opt-1"
        assert f.reason == ("wrong model kind: ctl-1 runs optimiser only (its control loop runs a learned optimiser (or its "
                            "ternary student); an EBDM or a code model decides nothing there); the order is an ebdm (ebdm-2, "
                            "production v2 of grid:case14): not deployed, it keeps running grid:case14 v1 (opt-1)")

        # 4. A promotion that states no kind (written before kinds): the file's header decides.
        p3 = promotion("ebdm-3", 3, ebdm, "")
        _, raw3 = await publish_raw(bus, p3, keys.release)
        await bus.publish(orders_for(p3, raw3, [CTL], plan="direct-legacy")[0])
        await wait_for(lambda: _n(_failures(bus, CTL), 2), 30, "ctl-1 to refuse the kind-less EBDM")
        f = (await _failures(bus, CTL))[-1]
        assert f.checkpoint_id == "ebdm-3" and "the order is an EBDM (scf-ebdm/1, a generative model of fossils) (ebdm-3)" in f.reason
        assert f.reason.endswith("it keeps running grid:case14 v1 (opt-1)")
        assert await runs(CTL, "opt-1") and current_model(tmp_path / CTL) == "opt-1"
        # nothing of the refused models was kept beside the running one
        assert [p.name for p in (tmp_path / CTL / "versions").iterdir()] == [agents[CTL].store.current().dirname]
        assert not list((tmp_path / CTL / "incoming").glob("*/*"))
        assert agents[CTL].store.current().checkpoint_id == "opt-1"
        r = await asyncio.to_thread(cli, "nodes", "ls", env=scf_env)
        listed = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.strip()}
        assert r.returncode == 0 and CTL in listed and STORE in listed, (r.returncode, r.stdout, r.stderr)
        assert listed[CTL].endswith("runs optimiser only") and "opt-1" in listed[CTL] and "runs " not in listed[STORE], r.stdout
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for b in [*buses.values(), planner_bus]:
            await b.close()


async def _n(coro, n: int) -> bool:
    return len(await coro) >= n


def test_a_ternary_optimiser_student_promoted_without_a_kind_is_taken(tmp_path):
    """The verifier promotes ternary students (alias `edge`) without a kind: the file says
    it is an optimiser's student, so a plant's node takes it (the header, not the name)."""
    path = write(tmp_path / "s.safetensors", {"w": np.ones((2, 2), np.float32)}, format="scf-ternary/1", model="optimiser")
    assert file_kind(path) == ("optimiser", "a learned optimiser's ternary student (scf-ternary/1)")
    assert msgspec.json.decode(b'{"node": "x"}', type=NodeInfo).runs == []  # an older agent's entry: no filter
