"""A packed ternary student through the deploy path, with a real `scf run edge` process:
a signed promotion to the `edge` alias activates (digest and release signature checked,
the probe runs the student with numpy); a student whose packed weights are damaged
*before* it was signed passes the digest and the signature but fails the probe, so the
agent refuses it and the previous student keeps running."""

from __future__ import annotations

import dataclasses
import json
import struct

import pytest
import torch

from scf.bus import events as ev
from scf.consumers.edge.probe import health_check
from scf.consumers.edge.ternary import TernaryNet
from scf.ml.distill import export_student, make_student
from scf.ml.ebdm import EBDM, EBDMConfig
from scf.ml.ternary import freeze
from tests.conftest import wait_for
from tests.test_deploy_helpers import Keys, current_model, events_on, node_runs, orders_for, promotion, publish_raw, start_edge, stop

pytestmark = pytest.mark.anyio

NODE = "edge-t"


def student_file(path, seed: int):
    torch.manual_seed(seed)
    teacher = EBDM(EBDMConfig(state_dim=3, context_dim=2, hidden=32, depth=1, fourier_features=8, n_levels=4))
    student = make_student(teacher, "ebdm")
    freeze(student)
    return export_student(path, student, kind="ebdm", config=dataclasses.asdict(teacher.config), packing="2bit",
                          lineage={"teacher": {"checkpoint_id": f"t{seed}"}}, metrics={})  # fmt: skip


def damage_packed_weights(path) -> None:
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    start = json.loads(data[8 : 8 + n])["blocks.0.fc2.weight.packed"]["data_offsets"][0]
    data[8 + n + start] = 0xFF  # four code-3 weights: no ternary value
    path.write_bytes(bytes(data))


async def test_a_packed_student_deploys_and_a_damaged_one_is_refused(bus, settings, scf_env, tmp_path):
    keys = Keys(settings)
    keys.node(NODE)
    art, edir, logd = tmp_path / "artifacts", tmp_path / "edge", tmp_path / "logs"
    art.mkdir()
    logd.mkdir()
    good = student_file(art / "s1.safetensors", 1)
    bad = student_file(art / "s2.safetensors", 2)
    damage_packed_weights(bad)
    assert health_check(good) is None and "2-bit code 3" in health_check(bad)
    p1 = promotion("st-1", 1, good, domain="grid:test", alias="edge")
    p2 = promotion("st-2", 2, bad, domain="grid:test", alias="edge")
    s1, raw1 = await publish_raw(bus, p1, keys.release)
    s2, raw2 = await publish_raw(bus, p2, keys.release)
    agent = start_edge(dict(scf_env, SCF_LOG="INFO"), NODE, edir, logd, {"domain": "grid:test"})
    try:
        await wait_for(lambda: node_runs(bus, NODE, None), 30, "the agent to register")
        await bus.publish(orders_for(p1, raw1, [NODE], seq=s1, plan="plan-s1")[0])
        await wait_for(lambda: node_runs(bus, NODE, "st-1"), 60, "the student active")
        assert current_model(edir) == "st-1"
        installed = [p for p in (edir / "current").iterdir() if p.suffix == ".safetensors" or p.name.startswith("model")]
        assert installed, list((edir / "current").iterdir())
        net = TernaryNet.load(installed[0])  # what the node runs: the packed student, read with numpy
        assert net.m.kind == "ebdm" and net.m.packing == "2bit"

        await bus.publish(orders_for(p2, raw2, [NODE], seq=s2, plan="plan-s2")[0])

        async def refused() -> bool:
            reports = [e for _, e in await events_on(bus, "DEPLOY", f"deploy.failed.{NODE}", [ev.DeployFailed])]
            return any(r.data.checkpoint_id == "st-2" for r in reports)

        await wait_for(refused, 60, "the damaged student refused")
        [failure] = [e.data for _, e in await events_on(bus, "DEPLOY", f"deploy.failed.{NODE}", [ev.DeployFailed]) if e.data.checkpoint_id == "st-2"]
        assert "2-bit code 3 is not a ternary weight" in failure.reason, failure.reason
        assert current_model(edir) == "st-1" and await node_runs(bus, NODE, "st-1")
    finally:
        stop(agent)
