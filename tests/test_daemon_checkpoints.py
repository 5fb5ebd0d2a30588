"""The daemon's act step on a real nats-server: checkpoint.produced → verified + promoted
(with history) or rejected; redelivery and restarts promote nothing twice; the emergency
stop pauses promotion. The verifier is injected here (its decision inputs are data); the
real verifier is tested below against the real artifact store (digest, unloadable files,
too few held-out fossils) and end to end with two tiny real EBDM checkpoints (torch, CPU,
ml.checkpoint's safetensors format) evaluated on real grid:case9 fossils."""

from __future__ import annotations

import hashlib

import pytest

from scf.bus import events as ev
from scf.producers.daemon import DaemonSettings
from scf.producers.verify import CheckpointVerifier, Verification, VerifySettings, current_promotion, heldout_fossils
from tests.conftest import wait_for
from tests.daemon_support import FIXED_TIME, add_fossils, operator_key, recorded_fossils, running_daemon, send, wait_events

pytestmark = pytest.mark.anyio

CFG = DaemonSettings(verify_checkpoints="off", checkpoint=VerifySettings(margin=0.05))
SCORES = {"ck-1": 1.0, "ck-2": 0.9, "ck-3": 0.88, "ck-4": 0.5}  # heldout_dsm of each candidate (lower is better)


class TableVerifier:
    """Verification results from a table: what a real evaluation would have measured."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, event: ev.CheckpointProduced, production: ev.Promotion | None) -> Verification:
        cid = event.data.checkpoint_id
        self.calls.append(cid)
        if cid == "ck-broken":
            return Verification(cid, False, ["artifact obj://scf_artifacts/x: DigestMismatch: sha256 differs"])
        base = {"heldout_dsm": SCORES[production.checkpoint_id]} if production else {}
        return Verification(cid, True, [], {"heldout_dsm": SCORES[cid]}, production.checkpoint_id if production else None, base)


def produced(cid: str, domain: str = "grid:case14") -> ev.CheckpointProduced:
    info = ev.CheckpointInfo(checkpoint_id=cid, job_id=f"job-{cid}", domain=domain, uri=f"obj://scf_artifacts/{cid}", sha256="00" * 32, size=1)
    return ev.CheckpointProduced.new(info, source="worker")


async def test_promotion_history_and_rejections(bus, settings):
    verifier = TableVerifier()
    async with running_daemon(settings, CFG, verifier=verifier):
        await bus.publish(produced("ck-1"))
        [p1] = await wait_events(bus, "CHECKPOINTS", "checkpoint.promoted.>", 1)
        assert (p1.data.checkpoint_id, p1.data.version, p1.data.alias, p1.data.previous_checkpoint_id) == ("ck-1", 1, "production", None)
        await bus.publish(produced("ck-2"))  # 10 % better: promoted
        promoted = await wait_events(bus, "CHECKPOINTS", "checkpoint.promoted.>", 2)
        assert (promoted[1].data.version, promoted[1].data.previous_checkpoint_id) == (2, "ck-1")
        [verified1, verified2] = await wait_events(bus, "CHECKPOINTS", "checkpoint.verified.>", 2)
        assert verified2.data.baseline_checkpoint_id == "ck-1" and verified2.data.metrics == {"heldout_dsm": 0.9}
        await bus.publish_many([produced("ck-3"), produced("ck-broken")])  # 2 % better than ck-2: not enough
        rejected = await wait_events(bus, "CHECKPOINTS", "checkpoint.rejected.>", 2)
        assert "does not beat production's 0.9 by the margin 5.0%" in rejected[0].data.reasons[0]
        assert rejected[1].data.reasons == ["artifact obj://scf_artifacts/x: DigestMismatch: sha256 differs"]
        assert (await current_promotion(bus, "grid:case14", "production")).checkpoint_id == "ck-2"
        # a checkpoint that is already production is not promoted again
        ack = await bus.publish(produced("ck-2"))

        async def handled() -> bool:
            info = await bus.js.consumer_info("CHECKPOINTS", "daemon-checkpoints")
            return info.ack_floor.stream_seq >= ack.seq

        await wait_for(handled, 10, "the repeat to be handled")
        assert verifier.calls.count("ck-2") == 1 and len(await wait_events(bus, "CHECKPOINTS", "checkpoint.promoted.>", 2)) == 2
    async with running_daemon(settings, CFG, verifier=verifier) as daemon:  # a restart re-verifies nothing
        await bus.publish(produced("ck-4"))
        promoted = await wait_events(bus, "CHECKPOINTS", "checkpoint.promoted.>", 3)
        assert (promoted[2].data.version, promoted[2].data.previous_checkpoint_id) == (3, "ck-2")
        assert daemon is not None
    assert verifier.calls == ["ck-1", "ck-2", "ck-3", "ck-broken", "ck-4"]


class KindVerifier(TableVerifier):
    """A table verifier that also says each candidate's model kind (the real one reads the header)."""

    async def kind(self, event: ev.CheckpointProduced) -> str:
        return "optimiser" if event.data.checkpoint_id.startswith("opt-") else "ebdm"


async def test_an_alias_has_one_head_per_model_kind(bus, settings):
    """A learned optimiser promoted to production leaves the EBDM there (and vice versa): each
    candidate faces, and replaces, its own kind's head; versions still rise over the alias."""
    from scf.producers.verify import alias_heads

    SCORES.update({"opt-1": 5.0, "opt-2": 4.0})  # worse than every EBDM: judged against optimisers only
    verifier = KindVerifier()
    async with running_daemon(settings, CFG, verifier=verifier):
        await bus.publish(produced("ck-1"))
        await wait_events(bus, "CHECKPOINTS", "checkpoint.promoted.>", 1)
        await bus.publish(produced("opt-1"))  # no optimiser in production yet: finite metrics suffice
        await bus.publish(produced("opt-2"))  # 20 % better than opt-1 (not than ck-1): promoted
        await bus.publish(produced("ck-2"))  # 10 % better than ck-1: promoted beside the optimiser
        promoted = await wait_events(bus, "CHECKPOINTS", "checkpoint.promoted.>", 4)
    got = [(p.data.checkpoint_id, p.data.kind, p.data.version, p.data.previous_checkpoint_id) for p in promoted]
    assert got == [("ck-1", "ebdm", 1, None), ("opt-1", "optimiser", 2, None), ("opt-2", "optimiser", 3, "opt-1"), ("ck-2", "ebdm", 4, "ck-1")]
    [_, v_opt1, v_opt2, v_ck2] = await wait_events(bus, "CHECKPOINTS", "checkpoint.verified.>", 4)
    assert (v_opt1.data.baseline_checkpoint_id, v_opt2.data.baseline_checkpoint_id, v_ck2.data.baseline_checkpoint_id) == (None, "opt-1", "ck-1")
    heads = await alias_heads(bus, "grid:case14", "production")
    assert {k: p.checkpoint_id for k, p in heads.items()} == {"ebdm": "ck-2", "optimiser": "opt-2"}


async def test_emergency_pauses_promotion(bus, settings):
    key = operator_key(settings)
    verifier = TableVerifier()
    async with running_daemon(settings, CFG, verifier=verifier) as daemon:
        await send(settings, "emergency_stop")
        await wait_for(lambda: daemon.gate.engaged, 10, "the daemon's gate to engage")
        await bus.publish(produced("ck-1"))

        async def waiting() -> bool:
            info = await bus.js.consumer_info("CHECKPOINTS", "daemon-checkpoints")
            return info.num_pending + info.num_ack_pending == 1

        await wait_for(waiting, 10, "the checkpoint to wait")
        assert verifier.calls == []
        await send(settings, "release_emergency", key=key)
        [p] = await wait_events(bus, "CHECKPOINTS", "checkpoint.promoted.>", 1)
        assert p.data.checkpoint_id == "ck-1" and verifier.calls == ["ck-1"]


async def test_real_verifier_checks_the_digest_and_refuses_what_it_cannot_load(bus, settings, tmp_path):
    from scf.bus.artifacts import open_store

    blob = tmp_path / "ck.safetensors"
    blob.write_bytes(b"not really a checkpoint")
    ref = await open_store(bus, settings).put(blob, "grid_case14/ck-real.safetensors")
    assert ref.sha256 == hashlib.sha256(blob.read_bytes()).hexdigest()
    await add_fossils(bus, "grid:case14", 0, 400)
    verifier = CheckpointVerifier(bus, settings, VerifySettings(min_heldout=2))

    wrong = ev.CheckpointInfo(checkpoint_id="ck-w", job_id="j", domain="grid:case14", uri=ref.uri, sha256="ab" * 32, size=ref.size)
    v = await verifier(ev.CheckpointProduced.new(wrong, source="w"), None)
    assert not v.ok and ("sha256" in v.reasons[0].lower() or "digest" in v.reasons[0].lower()), v.reasons

    right = ev.CheckpointInfo(checkpoint_id="ck-r", job_id="j", domain="grid:case14", uri=ref.uri, sha256=ref.sha256, size=ref.size)
    v = await verifier(ev.CheckpointProduced.new(right, source="w"), None)
    assert not v.ok and "cannot load or evaluate the checkpoint without pickle" in v.reasons[0], v.reasons

    few = CheckpointVerifier(bus, settings, VerifySettings(min_heldout=10_000))
    v = await few(ev.CheckpointProduced.new(right, source="w"), None)
    assert not v.ok and "held-out fossils of grid:case14" in v.reasons[0]


async def test_heldout_fossils_are_the_loaders_split(bus):
    await add_fossils(bus, "grid:case14", 0, 200)
    await add_fossils(bus, "hvac:office3", 0, 50)
    held = await heldout_fossils(bus, "grid:case14", 1000)
    assert held and all(f.domain == "grid:case14" and int(f.fossil_id[-1], 16) % 16 == 0 for f in held)
    assert 2 <= len(held) <= 30  # about 1 in 16 of 200
    assert len(await heldout_fossils(bus, "grid:case14", 1)) == 1
    assert await heldout_fossils(bus, "grid:case9", 10) == []


@pytest.mark.slow
async def test_real_checkpoints_are_verified_and_promoted(bus, settings, tmp_path):
    """torch on CPU, end to end: two tiny EBDMs saved with ml.checkpoint (safetensors, no
    pickle), put in the artifact store; real grid:case9 fossils in FOSSILS; the daemon's real
    verifier fetches, checks the digest, loads and evaluates each on the held-out fossils:
    the first is promoted (v1), the trained one beats it (v2), the untrained one again is
    rejected against the new production."""
    torch = pytest.importorskip("torch")
    import numpy as np

    from scf import domains
    from scf.bus.artifacts import open_store
    from scf.ml.checkpoint import save_checkpoint, sha256_file
    from scf.ml.ebdm import EBDM, EBDMConfig

    d = domains.get("grid:case9")
    samples = d.synthesize(np.random.default_rng(0), 240)
    rows = [np.array([getattr(s, k) for s in samples]) for k in ("state", "context", "energy")]
    recorded = recorded_fossils(d, *rows, observed_at=FIXED_TIME)
    await bus.publish_many(recorded)

    cfg = EBDMConfig(domain=d.name, hidden=32, depth=1, fourier_features=8, n_levels=4, langevin_steps=2, seed=0)
    untrained, trained = EBDM(cfg), EBDM(cfg)
    x = torch.tensor(np.stack([s.state for s in samples]), dtype=torch.float32)
    c = torch.tensor(np.stack([s.context for s in samples]), dtype=torch.float32)
    torch.manual_seed(0)
    opt = torch.optim.Adam(trained.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        loss, _ = trained.loss(x, c)
        loss.backward()
        opt.step()
    store = open_store(bus, settings)

    async def checkpoint(cid: str, model) -> ev.CheckpointProduced:
        path = save_checkpoint(tmp_path / f"{cid}.safetensors", model, lineage={"test": True}, metrics={})
        ref = await store.put(path, f"grid_case9/{cid}.safetensors")
        assert ref.sha256 == sha256_file(path)
        info = ev.CheckpointInfo(checkpoint_id=cid, job_id=f"job-{cid}", domain=d.name, uri=ref.uri, sha256=ref.sha256, size=ref.size)
        return ev.CheckpointProduced.new(info, source="worker")

    first, better, worse = await checkpoint("ck-a", untrained), await checkpoint("ck-b", trained), await checkpoint("ck-c", untrained)
    config = DaemonSettings(verify_checkpoints="on", checkpoint=VerifySettings(margin=0.02, violation_tolerance=1.0, min_heldout=4))
    async with running_daemon(settings, config) as daemon:
        assert isinstance(daemon.verifier, CheckpointVerifier)
        await bus.publish(first)
        [p1] = await wait_events(bus, "CHECKPOINTS", "checkpoint.promoted.>", 1, timeout=60)
        assert (p1.data.checkpoint_id, p1.data.version) == ("ck-a", 1)
        await bus.publish(better)
        promoted = await wait_events(bus, "CHECKPOINTS", "checkpoint.promoted.>", 2, timeout=60)
        assert (promoted[1].data.checkpoint_id, promoted[1].data.version, promoted[1].data.previous_checkpoint_id) == ("ck-b", 2, "ck-a")
        verified = await wait_events(bus, "CHECKPOINTS", "checkpoint.verified.>", 2)
        m, base = verified[1].data.metrics, verified[1].data.baseline_metrics
        assert m["heldout_dsm"] < base["heldout_dsm"] and m["heldout_records"] == base["heldout_records"] >= 4
        await bus.publish(worse)
        [r] = await wait_events(bus, "CHECKPOINTS", "checkpoint.rejected.>", 1, timeout=60)
        assert r.data.checkpoint_id == "ck-c" and "does not beat production's" in r.data.reasons[0]
