"""The training loop end to end, every process real: `scf fossils synth` → `scf fossils
ingest` → an approved training intent (the safety gate's final APPROVE, published here) →
`scf run dispatch` → `scf run worker` trains a tiny EBDM on CPU → `checkpoint.produced` →
the checkpoint comes back from the Object Store, verified, loads without pickle, and its
metrics are finite."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import sys

import pytest

from scf.bus import events as ev
from scf.bus.artifacts import open_store
from scf.bus.codec import Codec
from scf.bus.reader import StreamReader
from scf.consumers.dispatch import job_id_for
from tests.conftest import scf, spawn, stream_count, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

DOMAIN = "grid:case14"
TINY = {"hidden": 32, "depth": 1, "batch_size": 32, "fourier_features": 8, "sigma_features": 4,
        "eval_records": 32, "n_levels": 4, "langevin_steps": 2, "log_every": 10, "warmup": 5, "steps": 120}


async def read_all(bus, stream: str, subject: str, cls) -> list:
    codec = Codec([cls])
    out: list = []
    await StreamReader(bus.nc, bus.js, stream, subject).scan(lambda m: out.append(codec.decode(m.data)))
    return out


async def test_synth_ingest_dispatch_train_checkpoint(bus, settings, scf_env, tmp_path):
    (settings.home_path / "scf.toml").write_text("[worker]\nprogress_every = 0.2\nthreads = 1\n")
    shards = tmp_path / "shards"
    r = await asyncio.to_thread(scf, "fossils", "synth", "--domain", DOMAIN, "--n", "300", "--out", str(shards), "--shard-size", "100", env=scf_env)
    assert r.returncode == 0, r.stderr
    r = await asyncio.to_thread(scf, "fossils", "ingest", str(shards), "--json", env=scf_env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["recorded"] == 300

    intent = ev.IntentCreated.new(ev.Intent(intent_id="e2e-1", kind="train", domain=DOMAIN, params=TINY, reason="e2e"), source="daemon")
    assert (await bus.publish_once(intent)).status == "new"
    verdict = ev.VerdictIssued.new(
        ev.Verdict(verdict_id="v-e2e-1", subject_id="e2e-1", subject_type="intent", decision="APPROVE", gate="human",
                   final=True, by="test", kind="train", domain=DOMAIN),
        source="safety", cause=intent,
    )
    await bus.publish(verdict)

    run = [sys.executable, "-m", "scf.cli.main", "run"]
    dispatch = spawn(run + ["dispatch"], scf_env, tmp_path / "dispatch.out")
    worker = spawn(run + ["worker", "--pool", "local", "--device", "cpu", "--id", "e2e"], scf_env, tmp_path / "worker.out")
    try:
        async def produced() -> bool:
            return await stream_count(bus, "CHECKPOINTS", "checkpoint.produced.>") == 1

        await wait_for(produced, 120, "checkpoint.produced\n" + _tail(tmp_path / "worker.out") + _tail(tmp_path / "dispatch.out"))

        async def settled() -> bool:
            return await stream_count(bus, "JOBS") == 0 and await stream_count(bus, "TRAINING", "job.completed.>") == 1

        await wait_for(settled, 20, "the job to be acked")
    finally:
        for p in (worker, dispatch):
            p.send_signal(signal.SIGTERM)
        rcs = [p.wait(30) for p in (worker, dispatch)]
    assert rcs == [0, 0], _tail(tmp_path / "worker.out") + _tail(tmp_path / "dispatch.out")

    job_id = job_id_for("e2e-1")
    (dispatched,) = await read_all(bus, "TRAINING", "job.dispatched.>", ev.JobDispatched)
    assert (dispatched.data.job_id, dispatched.data.pool, dispatched.data.data.count) == (job_id, "local", 300)
    assert dispatched.causation_id == verdict.id and dispatched.correlation_id == intent.id
    progress = await read_all(bus, "TRAINING", f"job.progress.{job_id}", ev.JobProgress)
    assert progress and progress[-1].data.step == progress[-1].data.total_steps == TINY["steps"]
    assert all(math.isfinite(p.data.loss) and p.data.samples_per_s > 0 for p in progress)
    (completed,) = await read_all(bus, "TRAINING", f"job.completed.{job_id}", ev.JobCompleted)
    (checkpoint,) = await read_all(bus, "CHECKPOINTS", "checkpoint.produced.>", ev.CheckpointProduced)
    info = checkpoint.data
    assert info.job_id == job_id and info.domain == DOMAIN and info.checkpoint_id == completed.data.checkpoint_id
    assert info.uri == f"obj://scf_artifacts/grid_case14/{job_id}.safetensors"
    assert info.config_hash == dispatched.data.config_hash
    assert info.metrics and all(math.isfinite(v) for v in info.metrics.values())
    assert info.metrics["fossils"] == 300

    path = await open_store(bus, settings).get(info.uri, tmp_path / "fetched", sha256=info.sha256)
    assert path.stat().st_size == info.size

    from scf.ml.checkpoint import load_checkpoint

    model, meta = load_checkpoint(path)
    assert model.config.domain == DOMAIN and model.config.hidden == TINY["hidden"]
    assert all(math.isfinite(float(v)) for v in meta["metrics"].values() if isinstance(v, (int, float)))


def _tail(path, n: int = 3000) -> str:
    return "\n--- " + path.name + "\n" + (path.read_text()[-n:] if path.exists() else "(no output)")
