"""Streams, durable consumers, KV buckets and the object store, declared as data.

`ensure(js)` applies the declarations idempotently and reports drift: for each stream and
bucket, whether it was created, updated (and which fields differed), or was already as
declared; fields the server cannot change in place (retention, storage) are reported as
drift that needs a manual migration rather than silently left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nats.js import api
from nats.js.errors import NotFoundError

DAY = 24 * 3600.0


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    description: str
    retention: api.RetentionPolicy = api.RetentionPolicy.LIMITS
    max_age: float = 0.0  # seconds; 0 = forever (the log is the source of truth)
    duplicate_window: float = 120.0
    max_msgs_per_subject: int = -1
    replicas: int = 1
    atomic: bool = False  # allow atomic batch publishing (per-entity subjects: Bus.publish_batch)

    def config(self, replicas: int | None = None) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.name,
            subjects=list(self.subjects),
            description=self.description,
            retention=self.retention,
            storage=api.StorageType.FILE,
            max_age=self.max_age,
            duplicate_window=self.duplicate_window,
            max_msgs_per_subject=self.max_msgs_per_subject,
            num_replicas=replicas or self.replicas,
            discard=api.DiscardPolicy.OLD,
            allow_direct=True,
            allow_atomic=self.atomic or None,
        )


STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec("FOSSILS", ("fossil.>",), "observations of physical systems; one subject per fossil", atomic=True),
    StreamSpec("INTENTS", ("intent.>", "code.>", "state.>"), "intents, generated code and proposed states"),
    StreamSpec("VERDICTS", ("verdict.>",), "every ruling of the safety gate and of humans"),
    StreamSpec("TRAINING", ("job.>",), "training job lifecycle"),
    StreamSpec(
        "JOBS",
        ("work.>",),
        "the dispatch queue GPU workers pull from (work-queue retention)",
        retention=api.RetentionPolicy.WORK_QUEUE,
    ),
    StreamSpec("CHECKPOINTS", ("checkpoint.>",), "checkpoints produced, verified, promoted"),
    StreamSpec("CONTROL", ("control.>", "gear.>", "emergency.>"), "commands as sent, and what they changed"),
    StreamSpec("DEPLOY", ("deploy.>", "energy.>"), "deployments, activations, rollbacks, measurements"),
    StreamSpec("LEDGER", ("ledger.>",), "double-entry transfers, one subject per transfer", atomic=True),
    StreamSpec("DLQ", ("dlq.>",), "poison and exhausted messages, with the error and the original"),
    # The shared trust list (bus/trust.py): root-signed grants and revocations of signing
    # keys, one subject per key (trust.key.<kid>); the whole history is kept as the audit trail.
    StreamSpec("TRUST", ("trust.>",), "the shared trust list: root-signed grants and revocations of signing keys"),
    # The transparency log's signed checkpoints (projections/tlog.py), one subject per origin
    # and tree size (proof.checkpoint.<origin>.<size>, published once: a second root for a
    # size is refused as a conflict).
    StreamSpec("PROOFS", ("proof.>",), "signed checkpoints of the transparency log over the archived events"),
    # Client contracts and the strikes run for them (docs/value-loop.md): contract.<what>.<id>,
    # strike.completed.<activity_id> (published once per activity: a strike never repeats).
    StreamSpec("CONTRACTS", ("contract.>", "strike.>"), "client contracts and the strikes of the value loop"),
)

STREAM_BY_NAME = {s.name: s for s in STREAMS}


def stream_for_subject(subject: str) -> str:
    for spec in STREAMS:
        for pattern in spec.subjects:
            if subject_matches(pattern, subject):
                return spec.name
    raise KeyError(subject)


def subject_matches(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer."""

    stream: str
    durable: str
    filter_subjects: tuple[str, ...] = ()
    ack_wait: float = 30.0
    max_deliver: int = 5
    max_ack_pending: int = 1000
    deliver_policy: api.DeliverPolicy = api.DeliverPolicy.ALL
    description: str = ""

    def config(self) -> api.ConsumerConfig:
        cfg = api.ConsumerConfig(
            durable_name=self.durable,
            name=self.durable,
            description=self.description or None,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=self.deliver_policy,
            ack_wait=self.ack_wait,
            # The runner decides what happens on the last delivery (DLQ + term), so the
            # server's own limit sits one above it as a backstop.
            max_deliver=self.max_deliver + 1 if self.max_deliver > 0 else -1,
            max_ack_pending=self.max_ack_pending,
        )
        if len(self.filter_subjects) == 1:
            cfg.filter_subject = self.filter_subjects[0]
        elif self.filter_subjects:
            cfg.filter_subjects = list(self.filter_subjects)
        return cfg


@dataclass(frozen=True)
class KVSpec:
    bucket: str
    description: str
    ttl: float = 0.0
    history: int = 1


KV_BUCKETS: tuple[KVSpec, ...] = (
    KVSpec("scf_state", "gear, emergency stop and daemon liveness (a cache of the log)", history=5),
    KVSpec("scf_workers", "GPU worker liveness; entries expire", ttl=30.0),
    KVSpec("scf_nodes", "edge node registry: labels and current version"),
    KVSpec("scf_context", "context facts the safety gate rules on (grid.state = blackout …)", history=10),
)

OBJECT_STORES: tuple[str, ...] = ("scf_artifacts",)

# Keys in scf_state
KEY_GEAR = "gear"
KEY_EMERGENCY = "emergency"
KEY_DAEMON = "daemon"


@dataclass
class EnsureReport:
    created: list[str] = field(default_factory=list)
    updated: dict[str, list[str]] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)
    drift: dict[str, list[str]] = field(default_factory=dict)  # needs manual migration

    def lines(self) -> list[str]:
        out = [f"created   {n}" for n in self.created]
        out += [f"updated   {n}: {', '.join(f)}" for n, f in self.updated.items()]
        out += [f"drift     {n}: {', '.join(f)} (cannot change in place: migrate by hand)" for n, f in self.drift.items()]
        out += [f"ok        {n}" for n in self.unchanged]
        return out


_COMPARED = ("subjects", "description", "max_age", "duplicate_window", "max_msgs_per_subject", "num_replicas", "allow_direct", "allow_atomic")
_FIXED = ("retention", "storage")


def _norm(name: str, value: Any) -> Any:
    if name == "subjects":
        return sorted(value or [])
    if name == "allow_atomic":
        return bool(value)
    if isinstance(value, float):
        return round(value, 3)
    return value


async def ensure(js, *, replicas: int | None = None, streams: tuple[StreamSpec, ...] = STREAMS) -> EnsureReport:
    """Create or update every declared stream, KV bucket and object store."""
    report = EnsureReport()
    for spec in streams:
        want = spec.config(replicas)
        try:
            info = await js.stream_info(spec.name)
        except NotFoundError:
            await js.add_stream(want)
            report.created.append(f"stream {spec.name}")
            continue
        have = info.config
        diff = [f for f in _COMPARED if _norm(f, getattr(have, f)) != _norm(f, getattr(want, f))]
        fixed = [f for f in _FIXED if getattr(have, f) != getattr(want, f)]
        if fixed:
            report.drift[f"stream {spec.name}"] = [f"{f}: server {getattr(have, f)} != declared {getattr(want, f)}" for f in fixed]
        if diff:
            await js.update_stream(want)
            report.updated[f"stream {spec.name}"] = diff
        elif not fixed:
            report.unchanged.append(f"stream {spec.name}")
    for kv in KV_BUCKETS:
        name = f"KV_{kv.bucket}"
        try:
            info = await js.stream_info(name)
            if round(info.config.max_age or 0, 3) != round(kv.ttl, 3) or (info.config.max_msgs_per_subject or 1) != kv.history:
                cfg = info.config
                cfg.max_age = kv.ttl
                cfg.max_msgs_per_subject = kv.history
                await js.update_stream(cfg)
                report.updated[f"kv {kv.bucket}"] = ["ttl/history"]
            else:
                report.unchanged.append(f"kv {kv.bucket}")
        except NotFoundError:
            await js.create_key_value(
                bucket=kv.bucket, description=kv.description, ttl=kv.ttl or None, history=kv.history
            )
            report.created.append(f"kv {kv.bucket}")
    for bucket in OBJECT_STORES:
        try:
            await js.stream_info(f"OBJ_{bucket}")
            report.unchanged.append(f"object store {bucket}")
        except NotFoundError:
            await js.create_object_store(bucket=bucket, description="checkpoints and release artifacts")
            report.created.append(f"object store {bucket}")
    return report


async def ensure_consumer(js, spec: ConsumerSpec) -> None:
    """Create the durable consumer, or update it to the declared config."""
    await js.add_consumer(spec.stream, spec.config())


# Durable consumers of the processes, by name. A worker pool's is built by the function
# below; the archive and the daemon's fossil counter use ordered consumers (their position
# is their own state, see docs/archive.md and docs/control.md).
CONSUMERS: dict[str, ConsumerSpec] = {
    "daemon-control": ConsumerSpec("CONTROL", "daemon-control", ("control.>",), description="the daemon applies commands"),
    "daemon-checkpoints": ConsumerSpec(
        "CHECKPOINTS", "daemon-checkpoints", ("checkpoint.produced.>",), ack_wait=120.0, description="verify and promote"
    ),
    "safety": ConsumerSpec("INTENTS", "safety", ("intent.>", "code.>", "state.>"), description="the safety gate"),
    "dispatch": ConsumerSpec("VERDICTS", "dispatch", ("verdict.intent.approve",), description="approved intents to jobs"),
    "genn": ConsumerSpec(
        "VERDICTS", "genn", ("verdict.intent.approve",), ack_wait=120.0, max_deliver=3, description="GenN: code for approved codegen intents"
    ),
    "deploy": ConsumerSpec("CHECKPOINTS", "deploy", ("checkpoint.promoted.>",), description="plans deployments"),
    "ledger": ConsumerSpec("DEPLOY", "ledger", ("energy.measured.>",), description="mints credits"),
}


def worker_consumer(pool: str) -> ConsumerSpec:
    return ConsumerSpec(
        "JOBS", f"worker-{pool}", (f"work.{pool}",), ack_wait=60.0, max_deliver=3, max_ack_pending=64,
        description=f"GPU workers of pool {pool}",
    )
