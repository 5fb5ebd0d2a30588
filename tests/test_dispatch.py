"""Dispatch: the pure decisions, the handler against a real server (redelivery-safe
ids, live-worker routing), and `scf run dispatch` as a real process."""

from __future__ import annotations

import signal
import sys

import msgspec
import pytest

from scf.bus import events as ev
from scf.bus.codec import Codec
from scf.consumers.dispatch import (
    Dispatcher,
    DispatchSettings,
    WorkerInfo,
    choose_pool,
    job_config,
    job_id_for,
    wants_dispatch,
    worker_key,
)
from tests.conftest import spawn, stream_count, wait_for

pytestmark = pytest.mark.anyio

DOMAIN = "grid:case14"


def w(pool: str, wid: str, busy: bool = False) -> WorkerInfo:
    return WorkerInfo(worker_id=wid, pool=pool, busy=busy)


def test_choose_pool():
    assert choose_pool(None, []) == "local"
    assert choose_pool("cloud", []) == "local"  # requested but nobody there
    assert choose_pool("cloud", [w("cloud", "a", busy=True), w("local", "l")]) == "cloud"  # requested and live
    assert choose_pool(None, [w("local", "l"), w("cloud", "a")]) == "cloud"  # a GPU pool with an idle worker wins
    assert choose_pool(None, [w("a100", "x", True), w("h100", "y"), w("h100", "z", True)]) == "h100"
    assert choose_pool(None, [w("h100", "y", True), w("local", "l")]) == "local"  # GPU pool busy, local idle
    assert choose_pool(None, [w("h100", "y", True)]) == "h100"  # only a busy pool: queue there
    assert choose_pool(None, [w("b", "1"), w("a", "2")]) == "a"  # ties: by name


def test_job_config_and_hash():
    cfg, h = job_config({"steps": 100, "pool": "cloud", "max_attempts": 2, "hidden": 32})
    assert cfg == {"hidden": 32, "steps": 100}
    cfg2, h2 = job_config({"hidden": 32, "steps": 100})
    assert h == h2 and h.startswith("sha256:")
    assert job_config({"hidden": 64, "steps": 100})[1] != h
    assert job_id_for("intent-1") == job_id_for("intent-1") != job_id_for("intent-2")


def verdict(intent_id: str, decision: str = "APPROVE", final: bool = True, kind: str = "train") -> ev.VerdictIssued:
    return ev.VerdictIssued.new(
        ev.Verdict(verdict_id=f"v-{intent_id}-{decision}", subject_id=intent_id, subject_type="intent", decision=decision,
                   gate="test", final=final, kind=kind, domain=DOMAIN),
        source="test",
    )


def test_wants_dispatch():
    assert wants_dispatch(verdict("a").data)
    assert not wants_dispatch(verdict("a", final=False).data)
    assert not wants_dispatch(verdict("a", decision="HOLD").data)
    assert not wants_dispatch(verdict("a", kind="deploy").data)


async def publish_intent(bus, intent_id: str, **params) -> ev.IntentCreated:
    event = ev.IntentCreated.new(ev.Intent(intent_id=intent_id, kind="train", domain=DOMAIN, params=params), source="test")
    assert (await bus.publish_once(event)).status == "new"
    return event


async def publish_fossils(bus, n: int, tmp_path) -> None:
    from scf.domains.fossils import synth_shards
    from scf.producers.ingest import ingest

    synth_shards(DOMAIN, n, tmp_path / "shards", shard_size=n)
    report = await ingest(bus, [tmp_path / "shards"], settings=bus.settings)
    assert report.recorded == n


async def jobs(bus, pool: str) -> list[ev.WorkItem]:
    codec = Codec([ev.WorkItem])
    out = []
    info = await bus.js.stream_info("JOBS")
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await bus.js.get_msg("JOBS", seq)
        if msg.subject == f"work.{pool}":
            out.append(codec.decode(msg.data))
    return out


async def test_handler_dispatches_once_per_intent(bus, tmp_path):
    await publish_fossils(bus, 12, tmp_path)
    await publish_intent(bus, "i-1", steps=50, hidden=32, max_attempts=2)
    d = Dispatcher(bus, DispatchSettings())
    v = verdict("i-1")
    assert await d.handle(v) == []
    (work,) = await jobs(bus, "local")
    spec = work.data
    assert (spec.job_id, spec.intent_id, spec.domain, spec.pool, spec.max_attempts) == (job_id_for("i-1"), "i-1", DOMAIN, "local", 2)
    assert spec.config == {"hidden": 32, "steps": 50} and spec.config_hash == job_config({"hidden": 32, "steps": 50})[1]
    assert spec.data is not None and spec.data.count == 12 and spec.data.end_seq == await bus.stream_last_seq("FOSSILS")
    assert spec.data.subject == "fossil.recorded.grid_case14.>"
    got = await bus.last(f"job.dispatched.{spec.job_id}")
    assert got is not None and got[1].data == spec and got[1].causation_id == v.id

    # The verdict redelivered, and a second approval of the same intent: nothing new.
    await d.handle(v)
    await d.handle(msgspec.structs.replace(v, id="another-verdict"))
    assert await stream_count(bus, "JOBS") == 1
    assert await stream_count(bus, "TRAINING", "job.dispatched.>") == 1

    # Not for dispatch: not final, not approved, not a train intent.
    await publish_intent(bus, "i-2")
    for ignored in (verdict("i-2", final=False), verdict("i-2", decision="HOLD"), verdict("i-2", kind="optimise")):
        await d.handle(ignored)
    assert await stream_count(bus, "JOBS") == 1


async def test_routes_to_a_live_gpu_pool(bus, tmp_path):
    kv = await bus.kv("scf_workers")
    await kv.put(worker_key("h100", "gpu-1"), msgspec.json.encode(WorkerInfo(worker_id="gpu-1", pool="h100", device="cuda")))
    await kv.put(worker_key("local", "mac"), msgspec.json.encode(WorkerInfo(worker_id="mac", pool="local")))
    await publish_intent(bus, "i-gpu")
    await publish_intent(bus, "i-asked", pool="local")
    d = Dispatcher(bus)
    await d.handle(verdict("i-gpu"))
    await d.handle(verdict("i-asked"))
    assert [j.data.intent_id for j in await jobs(bus, "h100")] == ["i-gpu"]
    assert [j.data.intent_id for j in await jobs(bus, "local")] == ["i-asked"]
    assert [j.data.data.count for j in await jobs(bus, "h100")] == [0]  # no fossils yet: the worker will say so


async def test_run_dispatch_process(bus, scf_env, tmp_path):
    await publish_intent(bus, "i-proc", steps=10)
    proc = spawn([sys.executable, "-m", "scf.cli.main", "run", "dispatch"], scf_env, tmp_path / "dispatch.out")
    try:
        await bus.publish(verdict("i-proc"))

        async def dispatched() -> bool:
            return await stream_count(bus, "JOBS", "work.local") == 1

        await wait_for(dispatched, 30, "the job on work.local")
        await wait_for(lambda: _acked(bus), 10, "the verdict to be acked")
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
    assert rc == 0, (tmp_path / "dispatch.out").read_text()


async def _acked(bus) -> bool:
    info = await bus.js.consumer_info("VERDICTS", "dispatch")
    return info.num_ack_pending == 0 and info.num_pending == 0


def test_daemon_bookkeeping_params_stay_out_of_the_model_config():
    from scf.bus.gears import TRAIN_INTENT_PARAMS
    from scf.consumers.dispatch import job_config

    params = {k: 1 for k in TRAIN_INTENT_PARAMS} | {"pool": "h100", "steps": 50, "lr": 0.001}
    config, digest = job_config(params)
    assert config == {"lr": 0.001, "steps": 50}
    assert digest == job_config({"steps": 50, "lr": 0.001})[1]
