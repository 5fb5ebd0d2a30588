"""Dispatch: approved training intents → jobs on `work.<pool>`. `scf run dispatch`.

Consumes `verdict.intent.approve` (durable `dispatch`). For a final APPROVE of a `train`
intent it reads the intent (`intent.created.train.<intent_id>`, a direct get), chooses a
pool, fixes the data selection (the domain's fossils in FOSSILS up to the last sequence
at dispatch time) and publishes

* `work.item` on `work.<pool>` (the JOBS work-queue stream) — what one worker takes;
* `job.dispatched` on `job.dispatched.<job_id>` (TRAINING) with `publish_once`.

Ids: `job_id` is derived from the intent id (one job per intent, ever); the work item and
the dispatch record take ids derived from the job id with the deployment's id key
(`bus.ids`: no worker login can compute them), so a redelivered verdict (or a second
approval of the same intent) republishes nothing new: when `job.dispatched.<job_id>`
already holds the record the verdict is acknowledged without effect.

Pool choice (`choose_pool`, pure): workers announce themselves in the KV bucket
`scf_workers` as `<pool>.<worker_id>` (TTL 30 s, refreshed every 10 s). The intent's
`params["pool"]` wins if that pool has a live worker; else a live non-local pool with an
idle worker (most idle first); else `local` if it has a live worker; else any live pool
(its queue); else `local` (the job waits there for a local worker). A job whose params
ask for `gpus` > 1 is routed among the workers that advertise that many (`WorkerInfo.gpus`)
when one is live; the worker then trains it data-parallel over its GPUs (`ml.ddp`).

Intent params that steer dispatch rather than the model — `pool`, `max_attempts` — are
taken out; the rest is the job's `config`, hashed canonically (`config_hash`).
While the emergency stop is engaged nothing is dispatched (the runner's pause gate).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import msgspec
from nats.js import api
from nats.js.errors import NotFoundError
from nats.nuid import NUID

from scf.bus import events as ev
from scf.bus.client import Bus
from scf.bus.codec import Codec
from scf.bus.errors import SCFError
from scf.bus.gears import TRAIN_INTENT_PARAMS
from scf.bus.ids import derived_id, subject_token
from scf.bus.runner import Delivery, Poison, Runner, event_decoder
from scf.bus.streams import CONSUMERS

log = logging.getLogger("scf.dispatch")

WORKERS_BUCKET = "scf_workers"
LOCAL_POOL = "local"
# Intent params that are dispatch's own or the daemon's bookkeeping, not the model's config.
DISPATCH_PARAMS = ("pool", "max_attempts", *TRAIN_INTENT_PARAMS)


class DispatchError(SCFError):
    pass


class DispatchSettings(msgspec.Struct, frozen=True, kw_only=True):
    """`[dispatch]` in scf.toml."""

    default_pool: str = LOCAL_POOL
    max_attempts: int = 3


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A worker's liveness record in KV `scf_workers` under `<pool>.<worker_id>`."""

    worker_id: str
    pool: str
    device: str = "cpu"
    host: str = ""
    busy: bool = False
    job_id: str | None = None
    started_at: str = ""
    at: str = ""  # when the record was last refreshed
    gpus: int = 0  # CUDA devices the worker can train on (data parallel over them)


def worker_key(pool: str, worker_id: str) -> str:
    return f"{subject_token(pool)}.{subject_token(worker_id)}"


async def live_workers(bus: Bus) -> list[WorkerInfo]:
    """The workers whose liveness record has not expired."""
    kv = await bus.kv(WORKERS_BUCKET)
    out: list[WorkerInfo] = []
    try:
        watcher = await kv.watchall(ignore_deletes=True)
    except Exception as exc:  # noqa: BLE001  # pragma: no cover - the bucket exists (bus.kv checked)
        raise DispatchError(f"cannot read {WORKERS_BUCKET}: {exc}") from None
    try:
        async for entry in watcher:
            if entry is None:
                break
            if not entry.value:
                continue
            try:
                out.append(msgspec.json.decode(entry.value, type=WorkerInfo))
            except msgspec.DecodeError:
                log.warning("unreadable worker record %s in %s", entry.key, WORKERS_BUCKET)
    finally:
        await watcher.stop()
    return out


# --------------------------------------------------------------------------- pure decisions


def choose_pool(requested: str | None, workers: list[WorkerInfo], default: str = LOCAL_POOL, gpus: int = 0) -> str:
    """Where a job goes, from the live workers (see the module doc). A job that asks for
    `gpus` > 1 goes where workers have that many, when any live one has; else as any job."""
    if gpus > 1 and any(w.gpus >= gpus for w in workers):
        workers = [w for w in workers if w.gpus >= gpus]
    pools: dict[str, list[WorkerInfo]] = {}
    for w in workers:
        pools.setdefault(w.pool, []).append(w)
    if requested and requested in pools:
        return requested
    idle = sorted(
        ((sum(not w.busy for w in ws), len(ws), p) for p, ws in pools.items() if p != default),
        key=lambda t: (-t[0], -t[1], t[2]),
    )
    if idle and idle[0][0] > 0:
        return idle[0][2]
    if default in pools:
        return default
    if idle:
        return idle[0][2]
    return default


def job_config(params: dict[str, ev.Scalar]) -> tuple[dict[str, ev.Scalar], str]:
    """The model's config (params minus dispatch's own) and its canonical hash."""
    config = {k: v for k, v in sorted(params.items()) if k not in DISPATCH_PARAMS}
    return config, "sha256:" + hashlib.sha256(msgspec.json.encode(config, order="sorted")).hexdigest()


def job_id_for(intent_id: str) -> str:
    return derived_id("job", intent_id)


def plan_job(intent: ev.Intent, pool: str, selection: ev.DataSelection, cfg: DispatchSettings) -> ev.JobSpec:
    config, config_hash = job_config(intent.params)
    attempts = intent.params.get("max_attempts")
    return ev.JobSpec(
        job_id=job_id_for(intent.intent_id),
        intent_id=intent.intent_id,
        domain=intent.domain,
        pool=pool,
        config=config,
        config_hash=config_hash,
        data=selection,
        max_attempts=int(attempts) if isinstance(attempts, (int, float)) and attempts >= 1 else cfg.max_attempts,
    )


def wants_dispatch(verdict: ev.Verdict) -> bool:
    return verdict.final and verdict.decision == "APPROVE" and verdict.subject_type == "intent" and verdict.kind == "train"


# --------------------------------------------------------------------------- data selection


def fossil_subject(domain: str) -> str:
    return f"fossil.recorded.{ev.domain_token(domain)}.>"


async def count_matching(bus: Bus, stream: str, subject: str, start_seq: int = 1) -> int:
    """How many messages of `stream` match `subject` from `start_seq` (an ephemeral
    consumer's pending count; no message is read)."""
    name = NUID().next().decode()
    cfg = api.ConsumerConfig(
        name=name,
        ack_policy=api.AckPolicy.NONE,
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=max(1, start_seq),
        filter_subject=subject,
        inactive_threshold=10.0,
        mem_storage=True,
        num_replicas=1,
    )
    try:
        info = await bus.js.add_consumer(stream, cfg)
    except NotFoundError:
        raise DispatchError(f"stream {stream} does not exist: run `scf streams ensure`") from None
    try:
        return int(info.num_pending or 0)
    finally:
        try:
            await bus.js.delete_consumer(stream, name)
        except Exception:  # noqa: BLE001 - already gone: nothing to clean up
            pass


async def data_selection(bus: Bus, domain: str) -> ev.DataSelection:
    """All fossils of `domain` recorded so far (end_seq fixed now, so the job's data
    does not grow while it waits)."""
    end = await bus.stream_last_seq("FOSSILS")
    subject = fossil_subject(domain)
    count = await count_matching(bus, "FOSSILS", subject) if end else 0
    return ev.DataSelection(domain=domain, stream="FOSSILS", subject=subject, start_seq=1, end_seq=end, count=count)


# --------------------------------------------------------------------------- the consumer


@dataclass
class Dispatched:
    job: ev.JobSpec
    status: str  # new | duplicate


class Dispatcher:
    def __init__(self, bus: Bus, cfg: DispatchSettings | None = None) -> None:
        self.bus = bus
        self.cfg = cfg or DispatchSettings()
        self.dispatched: list[Dispatched] = []

    async def intent(self, verdict: ev.Verdict) -> ev.Intent:
        subject = f"intent.created.{subject_token(verdict.kind or 'train')}.{subject_token(verdict.subject_id)}"
        got = await self.bus.last(subject)
        if got is None:
            raise DispatchError(f"approved intent {verdict.subject_id} is not on {subject}: it was never created or was purged")
        event = got[1]
        if not isinstance(event, ev.IntentCreated):
            raise Poison(f"{subject} holds a {event.type_name()}, not an intent.created")
        return event.data

    async def handle(self, event: ev.Event, delivery: Delivery | None = None) -> list[ev.Event]:
        if not isinstance(event, ev.VerdictIssued) or not wants_dispatch(event.data):
            return []
        verdict = event.data
        intent = await self.intent(verdict)
        if intent.kind != "train":
            return []
        job_id = job_id_for(intent.intent_id)
        if await self.bus.last(f"job.dispatched.{job_id}") is not None:
            log.info("job %s of intent %s is already dispatched", job_id, intent.intent_id)
            return []
        gpus = intent.params.get("gpus", 0)
        gpus = int(gpus) if isinstance(gpus, (int, float)) and not isinstance(gpus, bool) else 0
        pool = choose_pool(_str(intent.params.get("pool")), await live_workers(self.bus), self.cfg.default_pool, gpus)
        selection = await data_selection(self.bus, intent.domain)
        spec = plan_job(intent, pool, selection, self.cfg)
        source = self.bus.source
        # ids keyed with the deployment's id key (bus.ids): a worker login, which may publish
        # into TRAINING, cannot compute the record's id and have the record dropped as a duplicate
        work = ev.WorkItem.new(spec, source=source, cause=event, id=self.bus.ids.derive("work.item", job_id))
        record = ev.JobDispatched.new(spec, source=source, cause=event, id=self.bus.ids.derive("job.dispatched", job_id))
        await self.bus.publish(work)  # first the work (deduplicated by id on a redelivery) …
        once = await self.bus.publish_once(record)  # … then the record that it was sent
        self.dispatched.append(Dispatched(spec, once.status))
        log.info(
            "dispatched job %s (intent %s, %s, %d fossils up to seq %d) to work.%s",
            job_id, intent.intent_id, intent.domain, selection.count, selection.end_seq, pool,
        )
        return []


def _str(value: ev.Scalar) -> str | None:
    return value if isinstance(value, str) and value else None


async def run_dispatch(settings, stop=None) -> None:
    """The `scf run dispatch` process: until SIGTERM/SIGINT (or `stop`)."""
    from scf.bus.emergency import EmergencyGate
    from scf.bus.runner import run_all

    bus = await Bus.connect(settings, "scf-dispatch")
    gate = await EmergencyGate(bus, settings.emergency_lock).start()
    dispatcher = Dispatcher(bus, settings.section("dispatch", DispatchSettings))
    runner = Runner(
        bus,
        CONSUMERS["dispatch"],
        dispatcher.handle,
        decode=event_decoder(Codec([ev.VerdictIssued])),
        pause=gate,
    )
    try:
        await run_all(bus, [runner.run], stop=stop)
    finally:
        await gate.stop()


__all__ = [
    "Dispatcher",
    "DispatchSettings",
    "WorkerInfo",
    "choose_pool",
    "job_config",
    "job_id_for",
    "plan_job",
    "wants_dispatch",
    "data_selection",
    "live_workers",
    "worker_key",
    "run_dispatch",
]


