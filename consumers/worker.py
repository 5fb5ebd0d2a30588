"""The GPU worker: `scf run worker --pool NAME [--device cuda]`.

One job at a time from `work.<pool>` (durable `worker-<pool>`, shared by every worker of
the pool; the JOBS stream is a work queue, so each job goes to one worker):

1. announce: the KV record `scf_workers/<pool>.<worker_id>` (TTL 30 s) is refreshed every
   10 s with `busy` and the job id, and removed on a clean exit — dispatch routes by it;
2. `job.started` (attempt = the delivery count);
3. fetch the job's data selection from the FOSSILS stream into
   `$SCF_HOME/system_cache/jobs/<job_id>/data/*.ndjson` (the `StreamReader` fast path;
   reused when a complete copy is already there);
4. train in a thread, the runner keeping the message alive with in-progress acks: an EBDM
   (`ml.train`), or — when the job's config says `model = "optimiser"` — a learned
   optimiser (`ml.optimize.train_optimiser`: a cost model and a proposal network, judged on
   the held-out split; format `scf-opt/1`); `job.progress` (step, loss, samples/s) at most
   every `progress_every` seconds, published from the training thread onto the event loop;
5. store the checkpoint (safetensors) in the artifact store as
   `<domain_token>/<job_id>.safetensors` with its metrics in the object's metadata, and
   keep a copy in `$SCF_HOME/model_zoo/<domain_token>/`;
6. `checkpoint.produced` (uri, sha256, size, metrics) and `job.completed`, then ack.

Effectively once: `job.completed` / `checkpoint.produced` take ids derived from the job
id; before training, a redelivered job whose checkpoint is already in the store (the
worker died after storing it) republishes those two events from the stored metadata
instead of training again, so the events always describe the stored bytes.
`job.started` / `job.progress` / `job.failed` are per attempt (ids derived from job id,
attempt, step).

Failures: a job config the model refuses (`ConfigError`: an unknown domain or model, a key
the model does not have, zero steps — checked before any data is fetched) is final at once; any other error
is retried (`job.failed` with final=False, nak with backoff) until the attempt reaches
the job's `max_attempts`, then `job.failed` final=True and the runner's DLQ. A worker
killed mid-job never acks: JetStream redelivers the job after `ack_wait` to another
worker of the pool. SIGTERM stops training at the next progress report and hands the job
back (nak) without counting a failure.

torch is imported only here, lazily (the other consumers stay light).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import msgspec

from scf.bus import events as ev
from scf.bus.artifacts import ArtifactRef, ArtifactStore, open_store
from scf.bus.client import Bus
from scf.bus.codec import Codec
from scf.bus.errors import ConfigError, SCFError
from scf.bus.ids import derived_id, subject_token
from scf.bus.reader import StreamMsg, StreamReader, describe
from scf.bus.runner import Delivery, Poison, Runner, Stopping, event_decoder, race, until_stopped
from scf.bus.streams import ConsumerSpec, worker_consumer
from scf.consumers.dispatch import WORKERS_BUCKET, WorkerInfo, worker_key

log = logging.getLogger("scf.worker")

FAREWELL_S = 1.0  # at the stop, the liveness entry's deletion is given this long (a frozen server: it expires after its TTL)
SHARD_LINES = 200_000  # fossils per cached data shard


class WorkerError(SCFError):
    pass


class JobInterrupted(WorkerError, Stopping):
    """Training stopped because the worker is shutting down: the job goes back to the queue
    (a `Stopping`: the runner gives it back, never counted as a failure nor dead-lettered)."""


class NoData(WorkerError):
    pass


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """`[worker]` in scf.toml."""

    ack_wait: float = 60.0  # seconds without an (in-progress) ack before JetStream redelivers
    max_deliver: int = 10  # backstop; a job's own max_attempts decides first
    heartbeat: float = 10.0  # liveness refresh (the KV entry expires after 30 s)
    progress_every: float = 1.0  # seconds between job.progress events
    keep_data: bool = False  # keep the fetched fossils after a successful job
    device: str = "auto"
    trainer: str = ""  # "module:function" taking a TrainRequest, returning a TrainResult; "" = ml.train
    threads: int = 0  # torch intra-op threads on CPU (0: ml.train picks: one for a small model, else torch's default)


def worker_spec(pool: str, cfg: WorkerSettings) -> ConsumerSpec:
    """The pool's durable consumer with this deployment's ack wait."""
    return dataclasses.replace(worker_consumer(pool), ack_wait=cfg.ack_wait, max_deliver=max(2, cfg.max_deliver), max_ack_pending=256)


def resolve_device(device: str) -> str:
    """cpu | cuda | cuda:N | mps | auto (cuda, else mps, else cpu)."""
    if device not in ("auto", "cpu", "mps") and not device.startswith("cuda"):
        raise ConfigError(f"device {device!r} is unknown: use cpu, cuda, cuda:N, mps or auto")
    if device == "cpu":
        return "cpu"
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} but torch sees no CUDA device (torch {torch.__version__}): use --device cpu or a CUDA build of torch")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps but MPS is not available: use --device cpu")
    return device


def prepare_torch(device: str, threads: int = 0) -> str:
    """Import torch once, up front (the first job does not pay for it), set its CPU
    threads, and resolve the device."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # its first use imports torch._dynamo (seconds)
    return resolve_device(device)


def gpu_count(device: str) -> int:
    """The CUDA devices a worker on `device` can train on (0 off CUDA)."""
    if not device.startswith("cuda"):
        return 0
    from scf.ml.ddp import gpu_count as count

    return count()


def checkpoint_name(spec: ev.JobSpec) -> str:
    return f"{ev.domain_token(spec.domain)}/{spec.job_id}.safetensors"


def checkpoint_id_for(job_id: str) -> str:
    return derived_id("checkpoint", job_id)


def finite_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Metrics as plain finite floats (JSON has no NaN; a non-finite value is dropped)."""
    out = {}
    for k, v in metrics.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[str(k)] = f
    return out


# --------------------------------------------------------------------------- data


class _EventData(msgspec.Struct):
    data: msgspec.Raw


_data_decoder = msgspec.json.Decoder(_EventData)


async def fetch_fossils(bus: Bus, selection: ev.DataSelection, dest: Path) -> int:
    """Copy the fossils of `selection` from the bus into NDJSON shards under `dest`
    (one Fossil per line, the format of `scf fossils synth`). Reuses a complete copy."""
    marker = dest / ".complete.json"
    want = msgspec.json.encode(selection)
    if marker.exists():
        try:
            done = json.loads(marker.read_text())
            if done.get("selection") == json.loads(want):
                return int(done["count"])
        except (ValueError, KeyError):
            pass
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    subject = selection.subject or f"fossil.recorded.{ev.domain_token(selection.domain)}.>"
    state = {"n": 0, "shard": 0, "lines": 0}
    files: list[Any] = [open(dest / "fossils-00000.ndjson", "wb")]

    def on_message(m: StreamMsg) -> None:
        try:
            raw = _data_decoder.decode(m.data).data
        except msgspec.DecodeError:
            return  # not an event: the stream's own business (ingest never writes these)
        if state["lines"] >= SHARD_LINES:
            files[0].close()
            state["shard"] += 1
            state["lines"] = 0
            files[0] = open(dest / f"fossils-{state['shard']:05d}.ndjson", "wb")
        files[0].write(bytes(raw) + b"\n")
        state["lines"] += 1
        state["n"] += 1

    reader = StreamReader(bus.nc, bus.js, selection.stream or "FOSSILS", subject, start_seq=selection.start_seq, end_seq=selection.end_seq)
    try:
        await reader.scan(on_message)
    finally:
        files[0].close()
    if state["n"] == 0:
        raise NoData(
            f"no fossils of {selection.domain} on {subject} in {selection.stream} seq {selection.start_seq}..{selection.end_seq or 'end'}: "
            "ingest some with `scf fossils ingest`"
        )
    marker.write_text(json.dumps({"selection": json.loads(want), "count": state["n"]}))
    return state["n"]


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainRequest:
    spec: ev.JobSpec
    data_dir: Path
    out_path: Path
    device: str
    progress: Callable[[int, int, float, float], None]  # (step, total, loss, samples/s)
    threads: int = 0  # torch CPU threads ([worker] threads; 0: ml.train decides)
    gpus: int = 0  # GPUs of this host (a job asking for several is trained data-parallel over them)


@dataclass(frozen=True)
class TrainResult:
    path: Path
    metrics: dict[str, float]


def job_gpus(spec: ev.JobSpec) -> int:
    """How many GPUs the job asks for (its config's `gpus`; 0 or 1: one process)."""
    value = spec.config.get("gpus", 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != int(value):
        raise ConfigError(f"job {spec.job_id}: gpus = {value!r} is not a whole number >= 0")
    return int(value)


EBDM, OPTIMISER = "ebdm", "optimiser"
MODELS = (EBDM, OPTIMISER)  # what a job's config `model` may name (default: ebdm)
WORKER_KEYS = ("gpus", "model")  # config keys that are the worker's, not the model's


def job_model(spec: ev.JobSpec) -> str:
    """Which model the job trains: its config's `model` (`ebdm` when absent)."""
    model = spec.config.get("model", EBDM)
    if model not in MODELS:
        raise ConfigError(f"job {spec.job_id}: model = {model!r} is unknown: use one of {', '.join(MODELS)}")
    return str(model)


def model_params(spec: ev.JobSpec) -> dict:
    """The job's config as EBDMConfig fields (without the worker's own keys)."""
    return {**{k: v for k, v in spec.config.items() if k not in WORKER_KEYS}, "domain": spec.domain}


def _check_domain(spec: ev.JobSpec) -> None:
    from scf import domains

    try:
        domains.get(spec.domain)
    except domains.UnknownDomain as exc:
        raise ConfigError(f"job {spec.job_id}: {exc}") from None


def optimiser_config(spec: ev.JobSpec):
    """The job's config as an `ml.optimize.OptimiserConfig` (the cost model's settings as
    `cost_<name>`); unknown keys and values of the wrong type are a ConfigError naming them."""
    import dataclasses as dc

    from scf.ml.cost import CostConfig
    from scf.ml.optimize import OptimiserConfig

    own = {f.name: f for f in dc.fields(OptimiserConfig) if f.name not in ("domain", "cost", "state_lo", "state_hi", "context_lo", "context_hi")}
    cost = {f.name: f for f in dc.fields(CostConfig)}
    top, sub, unknown = {}, {}, []
    for key, value in spec.config.items():
        if key in WORKER_KEYS:
            continue
        field_ = own.get(key) or (cost.get(key[5:]) if key.startswith("cost_") else None)
        if field_ is None:
            unknown.append(key)
            continue
        want = int if isinstance(field_.default, int) else float
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (want is int and value != int(value)):
            raise ConfigError(f"job {spec.job_id}: {key} = {value!r} is not {'a whole number' if want is int else 'a number'}")
        (top if key in own else sub)[field_.name] = want(value)
    if unknown:
        raise ConfigError(
            f"job {spec.job_id}: {sorted(unknown)} are not learned-optimiser settings: use some of {sorted(own)} "
            f"or cost_<{'|'.join(sorted(cost))}>"
        )
    for key in ("eval_contexts", "max_fossils"):
        if key in top and top[key] < 1:
            raise ConfigError(f"job {spec.job_id}: {key} must be >= 1 (got {top[key]})")
    cfg = OptimiserConfig(domain=spec.domain, cost=CostConfig(**sub), **top)
    try:
        cfg.resolved()  # steps, batch_size, hidden, depth >= 1
    except ConfigError as exc:
        raise ConfigError(f"job {spec.job_id}: {exc}") from None
    return cfg


def check_with_ml(spec: ev.JobSpec) -> None:
    """Refuse a config the model cannot take, before any data is fetched (ConfigError)."""
    job_gpus(spec)
    _check_domain(spec)
    if job_model(spec) == OPTIMISER:
        optimiser_config(spec)
        return
    from scf.ml.ebdm import EBDMConfig

    try:
        EBDMConfig.from_params(model_params(spec)).resolved()
    except TypeError as exc:
        raise ConfigError(f"job {spec.job_id}: config {dict(spec.config)} does not fit EBDMConfig ({exc})") from None


def job_lineage(spec: ev.JobSpec) -> dict:
    """What a checkpoint records of the job that made it."""
    lineage = {"job_id": spec.job_id, "intent_id": spec.intent_id, "config_hash": spec.config_hash}
    if spec.data is not None:
        lineage["selection"] = msgspec.to_builtins(spec.data)
    return lineage


def train_optimiser_with_ml(req: TrainRequest) -> TrainResult:
    """Train the job's learned optimiser (`ml.optimize.train_optimiser`: a cost model of the
    fossils' measured energy and a proposal network, judged on the held-out split) on the
    fetched shards and move its `scf-opt/1` checkpoint to `req.out_path`. It trains on the
    CPU (small networks: one thread is fastest, `threads`); `req.progress` reports every step
    and raises JobInterrupted when the worker stops."""
    import dataclasses as dc

    from scf.ml.optimize import train_optimiser

    spec = req.spec
    cfg = optimiser_config(spec)
    if req.threads:
        cfg = dc.replace(cfg, threads=req.threads)
    scratch = req.out_path.parent / f".train-{subject_token(spec.job_id)}-{os.getpid()}"
    try:
        result = train_optimiser(spec.domain, req.data_dir, scratch, cfg, lineage=job_lineage(spec), progress=req.progress)
        os.replace(result.checkpoint, req.out_path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return TrainResult(req.out_path, finite_metrics(result.metrics))


def train_with_ml(req: TrainRequest) -> TrainResult:
    """Train the job's model on the fetched shards and move the checkpoint (safetensors) to
    `req.out_path`: an EBDM with `ml.train.train` (data parallel when the job asks for
    several GPUs), or a learned optimiser when the config says `model = "optimiser"`."""
    from scf.ml import train as ml_train
    from scf.ml.ebdm import EBDMConfig

    if job_model(req.spec) == OPTIMISER:
        return train_optimiser_with_ml(req)
    nproc = min(job_gpus(req.spec), req.gpus) if req.device.startswith("cuda") else 0
    if nproc > 1:
        return train_distributed(req, nproc)
    config = EBDMConfig.from_params(model_params(req.spec))
    spec = req.spec
    lineage = job_lineage(spec)
    stop = getattr(req.progress, "should_stop", None)
    scratch = req.out_path.parent / f".train-{subject_token(spec.job_id)}-{os.getpid()}"
    try:
        result = ml_train.train(
            config, req.data_dir, out_dir=scratch, device=req.device,
            progress_cb=req.progress, should_stop=stop, lineage=lineage, threads=req.threads or None,
        )
        if result.stopped_early:
            raise JobInterrupted(f"job {spec.job_id} stopped at step {result.steps}: the worker is stopping")
        os.replace(result.checkpoint, req.out_path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return TrainResult(req.out_path, finite_metrics(result.metrics))


def train_distributed(req: TrainRequest, nproc: int, *, device: str = "cuda", poll: float = 0.5) -> TrainResult:
    """Train the job data-parallel on `nproc` processes of this host (`ml.ddp` under
    torchrun: NCCL on GPUs, gloo with device="cpu"). Rank 0's progress lines are relayed to
    `req.progress` (which raises JobInterrupted when the worker stops: the ranks are then
    terminated); a rank that fails fails the attempt (WorkerError, the ranks' log tail)
    and nothing of it is published; rank 0's checkpoint moves to `req.out_path`."""
    from scf.ml.ddp import launch_env, torchrun_argv

    spec = req.spec
    scratch = req.out_path.parent / f".train-{subject_token(spec.job_id)}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    progress, result, logfile = scratch / "progress.ndjson", scratch / "result.json", scratch / "ranks.log"
    progress.touch()
    argv = torchrun_argv(nproc, config=model_params(spec), data=req.data_dir, out_dir=scratch / "out",
                         device=device, progress=progress, result=result)
    try:
        with open(logfile, "wb") as log_out, open(progress, "rb") as lines:
            proc = subprocess.Popen(argv, stdout=log_out, stderr=subprocess.STDOUT, env=launch_env(req.threads or 1), start_new_session=True)
            try:
                while True:
                    rc = proc.poll()
                    for line in lines.readlines():
                        p = json.loads(line)
                        req.progress(p["step"], p["total"], p["loss"], p["samples_per_s"])
                    if rc is not None:
                        break
                    time.sleep(poll)
            except BaseException:
                _stop_group(proc)
                raise
        if rc != 0 or not result.exists():
            raise WorkerError(f"job {spec.job_id}: data-parallel training on {nproc} processes failed (torchrun exit {rc}): {_rank_error(logfile)}")
        done = json.loads(result.read_text())
        os.replace(done["checkpoint"], req.out_path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return TrainResult(req.out_path, finite_metrics({**done["metrics"], "world_size": done["world_size"]}))


def _rank_error(logfile: Path) -> str:
    """The first exception a rank printed (its last traceback line), else the log's tail."""
    import re

    text = logfile.read_bytes().decode(errors="replace")
    found = re.search(r"^(?:\[rank\d+\]:\s*)?((?:[\w.]+\.)?\w*(?:Error|Exception|Interrupted|Fossils)\b: .*)$", text, re.MULTILINE)
    return found.group(1)[:2000] if found else text[-2000:]


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM torchrun and its ranks (their own process group), SIGKILL after 30 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


Trainer = Callable[[TrainRequest], TrainResult]


def load_trainer(spec: str) -> Trainer:
    """`""` → `train_with_ml`; `"package.module:function"` → that function."""
    if not spec:
        return train_with_ml
    import importlib

    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name or "train")
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"[worker] trainer = {spec!r} cannot be loaded ({exc}): use \"module:function\"") from None
    return fn


# --------------------------------------------------------------------------- the worker


class Worker:
    def __init__(
        self,
        bus: Bus,
        store: ArtifactStore,
        *,
        pool: str,
        home: Path,
        device: str = "auto",
        worker_id: str | None = None,
        cfg: WorkerSettings | None = None,
        trainer: Trainer | None = None,
    ) -> None:
        self.bus, self.store, self.pool, self.home = bus, store, pool, Path(home)
        self.cfg = cfg or WorkerSettings()
        self.device_request = device
        self.device = "cpu"
        self.gpus = 0  # CUDA devices of this host, when the worker trains on CUDA
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.trainer = trainer or train_with_ml
        self.started_at = dt.datetime.now(dt.timezone.utc).isoformat()
        self.job_id: str | None = None
        self.abort = threading.Event()
        self.completed: list[str] = []

    # ------------------------------------------------------------------ liveness
    def record(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id, pool=self.pool, device=self.device, host=socket.gethostname(), gpus=self.gpus,
            busy=self.job_id is not None, job_id=self.job_id, started_at=self.started_at,
            at=dt.datetime.now(dt.timezone.utc).isoformat(),
        )

    async def announce(self) -> None:
        kv = await self.bus.kv(WORKERS_BUCKET)
        await kv.put(worker_key(self.pool, self.worker_id), msgspec.json.encode(self.record()))

    async def heartbeat(self, stop: asyncio.Event) -> None:
        """Refresh the liveness entry every `heartbeat` s until `stop`; each refresh (a
        JetStream request and a KV put: 5 s each with the server away) ends at the stop
        (`until_stopped`). At the stop the entry is deleted, given FAREWELL_S at most (it
        expires after its TTL anyway)."""
        try:
            while not stop.is_set():
                try:
                    await until_stopped(self.announce(), stop)
                except Stopping:
                    log.info("worker liveness refresh cut by the stop")
                    break
                except Exception as exc:  # noqa: BLE001 - NATS away for a moment: try again next beat
                    log.warning("worker liveness refresh failed: %s", exc)
                await race(asyncio.sleep(self.cfg.heartbeat), stop)
        finally:
            await self._farewell()

    async def _farewell(self) -> None:
        async def delete() -> None:
            kv = await self.bus.kv(WORKERS_BUCKET)
            await kv.delete(worker_key(self.pool, self.worker_id))

        gone = asyncio.Event()
        asyncio.get_running_loop().call_later(FAREWELL_S, gone.set)
        try:
            await until_stopped(delete(), gone)
        except Exception as exc:  # noqa: BLE001 - the record expires after its TTL anyway (Stopping: not within FAREWELL_S)
            log.info("worker liveness entry not deleted at the stop (%s): it expires after its TTL", describe(exc))

    async def watch_stop(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.abort.set()  # a job in training stops at its next progress report

    # ------------------------------------------------------------------ one job
    async def handle(self, work: ev.Event, delivery: Delivery) -> list[ev.Event]:
        if not isinstance(work, ev.WorkItem):
            raise Poison(f"{delivery.subject} carries a {work.type_name()}, not a work.item")
        spec = work.data
        attempt = max(1, delivery.deliveries)
        max_attempts = max(1, min(spec.max_attempts, worker_spec(self.pool, self.cfg).max_deliver))
        name = checkpoint_name(spec)
        done = await self.store.stat(name)
        if done is not None and done.meta.get("job_id") == spec.job_id:
            log.info("job %s already stored its checkpoint %s: publishing its completion again", spec.job_id, done.uri)
            return self._completion(work, spec, done, _meta_metrics(done), float(done.meta.get("duration_s", 0) or 0))

        self.job_id = spec.job_id
        await self._announce_quietly()
        t0 = time.monotonic()
        try:
            await self.bus.publish(ev.JobStarted.new(
                ev.JobStart(job_id=spec.job_id, worker=self.worker_id, device=self.device, attempt=attempt),
                source=self.bus.source, cause=work, id=derived_id("job.started", spec.job_id, attempt),
            ))
            ref, metrics = await self._run(work, spec, attempt)
        except JobInterrupted:
            log.warning("job %s interrupted by shutdown: handing it back", spec.job_id)
            raise
        except Exception as exc:
            final = isinstance(exc, ConfigError) or attempt >= max_attempts
            error = f"{type(exc).__name__}: {exc}"
            log.error("job %s attempt %d/%d failed%s: %s", spec.job_id, attempt, max_attempts, " (final)" if final else "", error)
            await self.bus.publish(ev.JobFailed.new(
                ev.JobFailure(job_id=spec.job_id, error=error[:4000], attempt=attempt, final=final, worker=self.worker_id),
                source=self.bus.source, cause=work, id=derived_id("job.failed", spec.job_id, attempt),
            ))
            if final:
                raise Poison(f"job {spec.job_id} failed on attempt {attempt} of {max_attempts}: {error}") from None
            raise
        finally:
            self.job_id = None
            await self._announce_quietly()
        duration = time.monotonic() - t0
        self.completed.append(spec.job_id)
        return self._completion(work, spec, ref, metrics, duration)

    async def _announce_quietly(self) -> None:
        try:
            await self.announce()
        except Exception:  # noqa: BLE001 - liveness is best effort: the next heartbeat retries
            pass

    def _completion(self, work: ev.WorkItem, spec: ev.JobSpec, ref: ArtifactRef, metrics: dict[str, float], duration: float) -> list[ev.Event]:
        cid = checkpoint_id_for(spec.job_id)
        produced = ev.CheckpointProduced.new(
            ev.CheckpointInfo(
                checkpoint_id=cid, job_id=spec.job_id, domain=spec.domain, uri=ref.uri, sha256=ref.sha256,
                size=ref.size, metrics=metrics, config_hash=spec.config_hash,
            ),
            source=self.bus.source, cause=work, id=derived_id("checkpoint.produced", spec.job_id),
        )
        completed = ev.JobCompleted.new(
            ev.JobCompletion(job_id=spec.job_id, checkpoint_id=cid, duration_s=round(duration, 3), metrics=metrics, worker=ref.meta.get("worker", self.worker_id)),
            source=self.bus.source, cause=work, id=derived_id("job.completed", spec.job_id),
        )
        return [produced, completed]

    async def _run(self, work: ev.WorkItem, spec: ev.JobSpec, attempt: int) -> tuple[ArtifactRef, dict[str, float]]:
        if spec.data is None:
            raise ConfigError(f"job {spec.job_id} has no data selection: dispatch it with `scf run dispatch`")
        check = getattr(self.trainer, "check", None) or (check_with_ml if self.trainer is train_with_ml else None)
        if check is not None:
            await asyncio.to_thread(check, spec)
        job_dir = self.home / "system_cache" / "jobs" / subject_token(spec.job_id)
        data_dir = job_dir / "data"
        count = await fetch_fossils(self.bus, spec.data, data_dir)
        log.info("job %s: %d fossils of %s fetched", spec.job_id, count, spec.domain)
        out = self.home / "model_zoo" / ev.domain_token(spec.domain) / f"{spec.job_id}.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        progress = self._progress_reporter(work, spec, attempt)
        req = TrainRequest(spec=spec, data_dir=data_dir, out_path=out, device=self.device, progress=progress,
                           threads=self.cfg.threads, gpus=self.gpus)
        result = await asyncio.to_thread(self.trainer, req)
        metrics = finite_metrics({**result.metrics, "fossils": count})
        duration = time.monotonic() - t0
        ref = await self.store.put(
            result.path,
            checkpoint_name(spec),
            meta={
                "job_id": spec.job_id, "domain": spec.domain, "config_hash": spec.config_hash,
                "worker": self.worker_id, "attempt": str(attempt), "duration_s": f"{duration:.3f}",
                "metrics": json.dumps(metrics, sort_keys=True),
            },
        )
        if not self.cfg.keep_data:
            shutil.rmtree(job_dir, ignore_errors=True)
        return ref, metrics

    def _progress_reporter(self, work: ev.WorkItem, spec: ev.JobSpec, attempt: int) -> Callable[[int, int, float, float], None]:
        loop = asyncio.get_running_loop()
        last = [0.0]
        every = self.cfg.progress_every

        def report(step: int, total: int, loss: float, samples_per_s: float = 0.0) -> None:  # on the training thread
            if self.abort.is_set():
                raise JobInterrupted(f"job {spec.job_id} interrupted at step {step}: the worker is stopping")
            now = time.monotonic()
            if now - last[0] < every and step < total:
                return
            last[0] = now
            event = ev.JobProgress.new(
                ev.JobProgressData(
                    job_id=spec.job_id, step=int(step), total_steps=int(total),
                    loss=float(loss) if math.isfinite(float(loss)) else -1.0,
                    samples_per_s=float(samples_per_s), worker=self.worker_id,
                ),
                source=self.bus.source, cause=work, id=derived_id("job.progress", spec.job_id, attempt, step),
            )
            fut = asyncio.run_coroutine_threadsafe(self.bus.publish(event), loop)
            fut.add_done_callback(_log_failure)

        report.should_stop = self.abort.is_set  # type: ignore[attr-defined]  # checked by ml.train every step
        return report


def _log_failure(fut) -> None:
    exc = fut.exception()
    if exc is not None:
        log.warning("job.progress not published: %s", exc)


def _meta_metrics(ref: ArtifactRef) -> dict[str, float]:
    try:
        return finite_metrics(json.loads(ref.meta.get("metrics", "{}")))
    except ValueError:
        return {}


async def run_worker(settings, *, pool: str, device: str | None = None, worker_id: str | None = None,
                     stop: asyncio.Event | None = None, trainer: Trainer | None = None) -> Worker:
    """The `scf run worker` process: until SIGTERM/SIGINT (or `stop`)."""
    from scf.bus.emergency import EmergencyGate
    from scf.bus.runner import run_all

    cfg = settings.section("worker", WorkerSettings)
    bus = await Bus.connect(settings, f"scf-worker-{pool}")
    worker = Worker(bus, open_store(bus, settings), pool=pool, home=settings.home_path,
                    device=device or cfg.device, worker_id=worker_id, cfg=cfg, trainer=trainer or load_trainer(cfg.trainer))
    worker.device = await asyncio.to_thread(prepare_torch, worker.device_request, cfg.threads)
    worker.gpus = await asyncio.to_thread(gpu_count, worker.device)
    gate = await EmergencyGate(bus, settings.emergency_lock).start()
    runner = Runner(
        bus, worker_spec(pool, cfg), worker.handle,
        decode=event_decoder(Codec([ev.WorkItem])), concurrency=1, batch=1, pause=gate,
    )
    stop = stop or asyncio.Event()
    log.info("worker %s on pool %s (device %s) ready", worker.worker_id, pool, worker.device)
    try:
        await run_all(bus, [runner.run, worker.heartbeat, worker.watch_stop], stop=stop)
    finally:
        await gate.stop()
    return worker


__all__ = [
    "Worker",
    "WorkerSettings",
    "TrainRequest",
    "TrainResult",
    "train_with_ml",
    "fetch_fossils",
    "resolve_device",
    "checkpoint_name",
    "worker_spec",
    "run_worker",
    "JobInterrupted",
]
