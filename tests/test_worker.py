"""The training worker as a real process (`scf run worker`) against a real nats-server:
a worker killed mid-job hands the job to another; a job failing past its attempts ends
in job.failed (final) and the DLQ; a config the model refuses fails at once; SIGTERM
hands a job in training back without counting a failure; liveness in KV."""

from __future__ import annotations

import signal
import sys

import msgspec
import pytest
from nats.js.errors import KeyDeletedError, KeyNotFoundError

from scf.bus import events as ev
from scf.bus.artifacts import open_store
from scf.bus.codec import Codec
from scf.bus.dlq import list_dead
from scf.bus.ids import derived_id
from scf.bus.reader import StreamReader
from scf.consumers.dispatch import WorkerInfo, data_selection, worker_key
from tests.conftest import spawn, stream_count, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

DOMAIN = "grid:case14"
POOL = "t"
TINY = {"hidden": 32, "depth": 1, "batch_size": 32, "fourier_features": 8, "sigma_features": 4,
        "eval_records": 32, "n_levels": 4, "langevin_steps": 2, "log_every": 10, "warmup": 5}


def worker_toml(settings, **extra) -> None:
    lines = ["[worker]", "ack_wait = 3.0", "heartbeat = 1.0", "progress_every = 0.2", "threads = 1"]
    lines += [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in extra.items()]
    path = settings.home_path / "scf.toml"
    path.write_text("\n".join(lines).replace("'", '"') + "\n")


def start_worker(scf_env, tmp_path, wid: str):
    argv = [sys.executable, "-m", "scf.cli.main", "run", "worker", "--pool", POOL, "--device", "cpu", "--id", wid]
    return spawn(argv, scf_env, tmp_path / f"worker-{wid}.out")


async def ingest_fossils(bus, tmp_path, n: int = 160) -> None:
    from scf.domains.fossils import synth_shards
    from scf.producers.ingest import ingest

    synth_shards(DOMAIN, n, tmp_path / "shards", shard_size=n)
    assert (await ingest(bus, [tmp_path / "shards"], settings=bus.settings)).recorded == n


async def submit(bus, job_id: str, config: dict, *, domain: str = DOMAIN, max_attempts: int = 3) -> ev.WorkItem:
    spec = ev.JobSpec(job_id=job_id, intent_id=f"intent-{job_id}", domain=domain, pool=POOL, config=config,
                      config_hash="sha256:test", data=await data_selection(bus, domain), max_attempts=max_attempts)
    work = ev.WorkItem.new(spec, source="test", id=derived_id("work.item", job_id))
    await bus.publish(work)
    return work


async def events(bus, stream: str, subject: str, cls) -> list:
    codec = Codec([cls])
    out: list = []
    await StreamReader(bus.nc, bus.js, stream, subject).scan(lambda m: out.append(codec.decode(m.data)))
    return out


def log_of(tmp_path, wid: str) -> str:
    p = tmp_path / f"worker-{wid}.out"
    return p.read_text() if p.exists() else ""


async def test_worker_killed_mid_job_the_job_completes_on_another(bus, settings, scf_env, tmp_path):
    worker_toml(settings)
    await ingest_fossils(bus, tmp_path)
    work = await submit(bus, "job-kill", {**TINY, "steps": 600})
    a = start_worker(scf_env, tmp_path, "A")
    b = None
    try:
        async def a_is_training() -> bool:
            return await stream_count(bus, "TRAINING", "job.progress.job-kill") >= 1

        await wait_for(a_is_training, 60, f"worker A to report progress\n{log_of(tmp_path, 'A')}")
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        b = start_worker(scf_env, tmp_path, "B")

        async def completed() -> bool:
            return await stream_count(bus, "TRAINING", "job.completed.job-kill") == 1

        await wait_for(completed, 90, f"the job to complete on worker B\n{log_of(tmp_path, 'B')}")
        await wait_for(lambda: _jobs_empty(bus), 10, "the job to be acked")
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(20)

    started = sorted(await events(bus, "TRAINING", "job.started.job-kill", ev.JobStarted), key=lambda e: e.data.attempt)
    assert [(e.data.worker, e.data.attempt) for e in started] == [("A", 1), ("B", 2)]
    (done,) = await events(bus, "TRAINING", "job.completed.job-kill", ev.JobCompleted)
    assert done.data.worker == "B" and done.causation_id == work.id
    assert await stream_count(bus, "TRAINING", "job.failed.>") == 0
    (produced,) = await events(bus, "CHECKPOINTS", "checkpoint.produced.>", ev.CheckpointProduced)
    assert produced.data.job_id == "job-kill" and produced.data.checkpoint_id == done.data.checkpoint_id
    ref = await open_store(bus, settings).stat(produced.data.uri)
    assert (ref.sha256, ref.size) == (produced.data.sha256, produced.data.size)
    assert ref.meta["worker"] == "B"


async def _jobs_empty(bus) -> bool:
    return await stream_count(bus, "JOBS") == 0


async def test_failures_are_retried_then_final_and_dead_lettered(bus, settings, scf_env, tmp_path):
    worker_toml(settings)
    # No fossils of hvac:office3 were ever ingested: every attempt fails the same way.
    await submit(bus, "job-empty", {**TINY, "steps": 5}, domain="hvac:office3", max_attempts=2)
    await submit(bus, "job-badcfg", {"no_such_knob": 1})
    w = start_worker(scf_env, tmp_path, "W")
    try:
        async def announced() -> bool:
            kv = await bus.kv("scf_workers")
            try:
                entry = await kv.get(worker_key(POOL, "W"))
            except Exception:
                return False
            if entry is None:
                return False
            info = msgspec.json.decode(entry.value, type=WorkerInfo)
            return info.pool == POOL and info.gpus == 0  # a CPU worker advertises no GPU

        await wait_for(announced, 30, "the worker's liveness record")

        async def two_dead() -> bool:
            return await stream_count(bus, "DLQ") == 2

        await wait_for(two_dead, 60, f"two dead letters\n{log_of(tmp_path, 'W')}")
    finally:
        w.send_signal(signal.SIGTERM)
        assert w.wait(20) == 0, log_of(tmp_path, "W")

    failed = sorted(await events(bus, "TRAINING", "job.failed.>", ev.JobFailed), key=lambda e: (e.data.job_id, e.data.attempt))
    assert all(d.event.data.subject == "work.t" for d in await list_dead(bus))
    assert [(e.data.job_id, e.data.attempt, e.data.final) for e in failed] == [
        ("job-badcfg", 1, True), ("job-empty", 1, False), ("job-empty", 2, True),
    ]
    assert "no fossils of hvac:office3" in failed[1].data.error and failed[1].data.worker == "W"
    assert "no_such_knob" in failed[0].data.error
    by_job = {msgspec.json.decode(d.event.data.payload)["data"]["job_id"]: d.event.data for d in await list_dead(bus)}
    assert by_job["job-empty"].deliveries == 2 and by_job["job-empty"].consumer == "worker-t"
    assert "failed on attempt 2 of 2" in by_job["job-empty"].error
    assert by_job["job-badcfg"].deliveries == 1
    assert await stream_count(bus, "JOBS") == 0

    kv = await bus.kv("scf_workers")
    with pytest.raises((KeyNotFoundError, KeyDeletedError)):  # removed on a clean exit
        await kv.get(worker_key(POOL, "W"))


async def test_sigterm_hands_a_job_in_training_back(bus, settings, scf_env, tmp_path):
    worker_toml(settings)
    await ingest_fossils(bus, tmp_path, 64)
    await submit(bus, "job-long", {**TINY, "steps": 1_000_000})
    w = start_worker(scf_env, tmp_path, "S")
    try:
        async def training() -> bool:
            return await stream_count(bus, "TRAINING", "job.progress.job-long") >= 1

        await wait_for(training, 60, f"progress\n{log_of(tmp_path, 'S')}")
    finally:
        w.send_signal(signal.SIGTERM)
        rc = w.wait(30)
    assert rc == 0, log_of(tmp_path, "S")
    assert await stream_count(bus, "TRAINING", "job.failed.>") == 0
    assert await stream_count(bus, "JOBS") == 1  # still queued for the next worker
    assert await stream_count(bus, "DLQ") == 0
