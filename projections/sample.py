"""A deterministic, coherent event history for tests, benchmarks and demos.

`history(cycles, seed)` yields what the running system would put on the bus, in order: gear
changes (one in the legacy v1 shape), plain-JSON control commands, fossils, intents and the
safety gate's verdicts, generated code with approvals and rejections, training jobs with
progress, checkpoints produced / verified / promoted, deployments with activations, failures
and rollbacks, energy measurements, ledger transfers and a dead letter now and then. Every id
and timestamp derives from (seed, position), so the same arguments give the same events.

`publish(bus, items)` puts them on a real bus; `write_archive(store, items)` writes them
straight into an archive (as if archived from streams that received them in order), which
benchmarks use to build large archives without waiting for NATS.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from typing import Iterable, Iterator

import msgspec

from scf.bus import codec
from scf.bus import events as ev
from scf.bus.client import MSG_ID, SCF_TYPE, Bus
from scf.bus.ids import derived_id
from scf.bus.streams import stream_for_subject

START = dt.datetime(2026, 9, 7, tzinfo=dt.timezone.utc)  # a Monday
NODES = ("edge-berlin-1", "edge-berlin-2", "edge-lyon-1", "edge-oslo-1")
DOMAINS = ("grid:case14", "hvac:office3", "plant:chiller2")
ACCOUNTS = {"grid:case14": "client:stadtwerk", "hvac:office3": "client:office-park", "plant:chiller2": "client:foodworks"}


@dataclass(frozen=True)
class Plain:
    """A message that is not an event envelope: a control command as any client sends it."""

    subject: str
    body: bytes
    headers: dict[str, str] | None = None


Item = ev.Event | Plain


def subject_of(item: Item) -> str:
    return item.subject if isinstance(item, Plain) else item.subject()


def body_of(item: Item) -> bytes:
    return item.body if isinstance(item, Plain) else codec.encode(item)


def headers_of(item: Item) -> dict[str, str] | None:
    return item.headers if isinstance(item, Plain) else Bus.headers(item)


class _Gen:
    def __init__(self, seed: int, start: dt.datetime) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.t = start
        self.n = 0

    def id(self, *parts: object) -> str:
        return derived_id("sample", self.seed, *parts)

    def tick(self, seconds: float = 60.0) -> dt.datetime:
        self.t += dt.timedelta(seconds=seconds)
        return self.t

    def ev(self, cls, data, *, cause: ev.Event | None = None, source: str = "sample", at: dt.datetime | None = None):
        self.n += 1
        return cls.new(data, source=source, cause=cause, id=self.id("event", self.n), at=at or self.tick(7))


def history(
    cycles: int = 50,
    *,
    seed: int = 7,
    fossils_per_cycle: int = 4,
    start: dt.datetime = START,
    cycle_seconds: float = 6 * 3600,
) -> Iterator[Item]:
    """About (14 + fossils_per_cycle) messages per cycle on average; one cycle is one
    intent's life, `cycle_seconds` apart (the default spreads 50 cycles over two weeks)."""
    g = _Gen(seed, start)
    gear = "STANDARD"
    # The gear as a v1 event (level number), exactly as an old producer wrote it.
    legacy = {
        "type": "gear.changed", "id": g.id("gear-v1"), "v": 1, "at": "2026-09-07T00:00:00Z", "source": "daemon@old",
        "correlation_id": None, "causation_id": None, "sig": None, "kid": None, "data": {"level": 1, "by": "bootstrap"},
    }
    yield Plain("gear.changed", msgspec.json.encode(legacy), {MSG_ID: legacy["id"], SCF_TYPE: "gear.changed"})
    promoted: dict[str, int] = {}
    running: dict[str, str | None] = {n: None for n in NODES}
    for c in range(cycles):
        g.t = start + dt.timedelta(seconds=c * cycle_seconds)
        rng = g.rng
        domain = DOMAINS[c % len(DOMAINS)]
        if c % 10 == 5:
            to = rng.choice(["ACCELERATED", "HYPER", "STANDARD"])
            cmd = {"level": to, "by": "ops@console", "reason": f"cycle {c}"}
            yield Plain("control.shift_gear", msgspec.json.encode(cmd))
            yield g.ev(ev.GearChanged, ev.GearChange(from_gear=gear, to_gear=to, by="ops@console", reason=f"cycle {c}"), source="daemon")
            gear = to
        if c % 25 == 12:
            yield Plain("control.stop", b"")
            yield Plain("control.resume", b'{"by": "ops@console"}')
        for k in range(fossils_per_cycle):
            content = ev.FossilContent(
                domain=domain,
                context=[round(rng.uniform(0, 100), 3) for _ in range(4)],
                state=[round(rng.uniform(-1, 1), 4) for _ in range(6)],
                energy=round(rng.uniform(50, 150), 3),
                observed_at=g.tick(1),
                provenance=ev.Provenance(source=f"meter-{k % 3}", verifier="bounds", verified=True),
            )
            fossil = ev.Fossil(**{f: getattr(content, f) for f in content.__struct_fields__}, fossil_id=ev.fossil_content_id(content))
            yield g.ev(ev.FossilRecorded, fossil, source="ingest")
        if c % 30 == 29:
            yield g.ev(
                ev.DeadLettered,
                ev.DeadLetter(stream="DEPLOY", consumer="ledger", subject="energy.measured.x", seq=c, deliveries=5,
                              error="ValueError: negative kWh", payload=b"{}"),
                source="ledger",
            )
            yield g.ev(ev.GearChanged, ev.GearChange(from_gear=None, to_gear="STANDARD", by="daemon", reason="restart"), source="daemon")
            gear = "STANDARD"
        if c % 40 == 39:
            raw = b'{"domain": "grid:case14", "context": "oops"}'
            yield g.ev(ev.FossilRejected, ev.FossilRejection(shard="shard-003.ndjson", line=c, reason="context: expected array", raw=raw.decode()), source="ingest")

        kind = "codegen" if c % 2 else "train"
        intent_id = g.id("intent", c)
        intent = g.ev(
            ev.IntentCreated,
            ev.Intent(
                intent_id=intent_id, kind=kind, domain=domain, gear=gear, hypothesis=c % 3,
                params={"lr": 0.001 * (1 + c % 5), "steps": 200 + 10 * (c % 7), "objective": "energy"},
                reason=f"{fossils_per_cycle} new fossils in {domain}",
            ),
            source="daemon",
        )
        yield intent
        roll = rng.random()
        decision = "APPROVE" if roll < 0.75 else ("REJECT" if roll < 0.9 else "HOLD")
        yield g.ev(
            ev.VerdictIssued,
            ev.Verdict(
                verdict_id=g.id("verdict-intent", c), subject_id=intent_id, subject_type="intent", decision=decision,
                gate="regulator", reasons=[] if decision == "APPROVE" else [f"rule {c % 4}: context {domain}"],
                final=decision != "HOLD", kind=kind, domain=domain,
            ),
            cause=intent, source="safety",
        )
        if decision == "HOLD":
            human = "APPROVE" if rng.random() < 0.5 else "REJECT"
            yield Plain(f"control.{human.lower()}", msgspec.json.encode({"subject_id": intent_id, "by": "alice"}))
            yield g.ev(
                ev.VerdictIssued,
                ev.Verdict(
                    verdict_id=g.id("verdict-human", c), subject_id=intent_id, subject_type="intent", decision=human,
                    gate="human", reasons=["operator ruling"], final=True, by="alice", kind=kind, domain=domain,
                ),
                cause=intent, source="daemon",
            )
            decision = human
        if decision != "APPROVE":
            continue
        if kind == "codegen":
            yield from _codegen(g, intent, c)
        else:
            yield from _train(g, intent, c, domain, promoted, running)


def _codegen(g: _Gen, intent: ev.IntentCreated, c: int) -> Iterator[Item]:
    rng = g.rng
    d = intent.data
    for p in range(1 + c % 3):
        proposal_id = g.id("proposal", c, p)
        bad = p == 1 or rng.random() < 0.2
        code = (
            f"import os\n\ndef setpoints(ctx):\n    os.system('curl http://x')\n    return [0.0] * {4 + p}\n"
            if bad
            else f"def setpoints(ctx):\n    # {d.domain}: scale by load\n    return [min(1.0, x / {50 + p}) for x in ctx]\n"
        )
        proposal = g.ev(
            ev.CodeProposed,
            ev.CodeProposal(
                proposal_id=proposal_id, intent_id=d.intent_id, code=code, generator=f"coder-{p % 2}",
                prompt=f"Write setpoints(ctx) for {d.domain} minimising energy.",
            ),
            cause=intent, source="coder",
        )
        yield proposal
        yield g.ev(
            ev.VerdictIssued,
            ev.Verdict(
                verdict_id=g.id("verdict-code", c, p), subject_id=proposal_id, subject_type="code",
                decision="REJECT" if bad else "APPROVE", gate="ethics",
                reasons=["network call: os.system"] if bad else [], kind="codegen", domain=d.domain,
            ),
            cause=proposal, source="safety",
        )


def _train(g: _Gen, intent: ev.IntentCreated, c: int, domain: str, promoted: dict[str, int], running: dict[str, str | None]) -> Iterator[Item]:
    rng = g.rng
    job_id = g.id("job", c)
    spec = ev.JobSpec(
        job_id=job_id, intent_id=intent.data.intent_id, domain=domain, pool="local", config={"lr": 0.001, "steps": 200},
        config_hash=g.id("config", c % 5), data=ev.DataSelection(domain=domain, count=100),
    )
    dispatched = g.ev(ev.JobDispatched, spec, cause=intent, source="dispatch")
    yield dispatched
    yield g.ev(ev.JobStarted, ev.JobStart(job_id=job_id, worker="gpu-mac-1", device="mps"), cause=dispatched, source="worker")
    loss = 1.0 + rng.random()
    for step in (50, 100, 150):
        loss *= 0.8
        yield g.ev(
            ev.JobProgress, ev.JobProgressData(job_id=job_id, step=step, total_steps=200, loss=round(loss, 5), samples_per_s=900.0, worker="gpu-mac-1"),
            cause=dispatched, source="worker",
        )
    if c % 9 == 4:
        yield g.ev(ev.JobFailed, ev.JobFailure(job_id=job_id, error="CUDA out of memory", final=True, worker="gpu-mac-1"), cause=dispatched, source="worker")
        return
    checkpoint_id = g.id("checkpoint", c)
    metrics = {"loss": round(loss * 0.8, 5), "energy_gap": round(rng.uniform(0.01, 0.2), 4)}
    yield g.ev(ev.JobCompleted, ev.JobCompletion(job_id=job_id, checkpoint_id=checkpoint_id, duration_s=round(rng.uniform(60, 600), 1), metrics=metrics, worker="gpu-mac-1"), cause=dispatched, source="worker")
    info = ev.CheckpointInfo(
        checkpoint_id=checkpoint_id, job_id=job_id, domain=domain, uri=f"obj://scf_artifacts/{checkpoint_id}",
        sha256="0" * 64, size=1_000_000 + c, metrics=metrics, config_hash=spec.config_hash,
    )
    produced = g.ev(ev.CheckpointProduced, info, source="worker")
    yield produced
    if rng.random() < 0.25:
        yield g.ev(ev.CheckpointRejected, ev.CheckpointRejection(checkpoint_id=checkpoint_id, domain=domain, reasons=["no better than baseline"]), cause=produced, source="daemon")
        return
    yield g.ev(ev.CheckpointVerified, ev.CheckpointVerification(checkpoint_id=checkpoint_id, domain=domain, metrics=metrics, margin=0.02), cause=produced, source="daemon")
    version = promoted.get(domain, 0) + 1
    promoted[domain] = version
    promo = g.ev(
        ev.CheckpointPromoted,
        ev.Promotion(checkpoint_id=checkpoint_id, domain=domain, alias="production", version=version, uri=info.uri, sha256=info.sha256, size=info.size),
        cause=produced, source="daemon",
    )
    yield promo
    artifact = ev.Artifact(checkpoint_id=checkpoint_id, domain=domain, version=version, uri=info.uri, sha256=info.sha256, size=info.size)
    plan_id = g.id("plan", c)
    for n, node in enumerate(NODES[: 1 + c % len(NODES)]):
        deployment_id = g.id("deployment", c, node)
        req = g.ev(ev.DeployRequested, ev.DeployRequest(deployment_id=deployment_id, plan_id=plan_id, node=node, artifact=artifact, wave=min(n, 1)), cause=promo, source="deploy")
        yield req
        if rng.random() < 0.08:
            yield g.ev(ev.DeployFailed, ev.DeployFailure(deployment_id=deployment_id, plan_id=plan_id, node=node, checkpoint_id=checkpoint_id, reason="digest mismatch", running_checkpoint_id=running[node]), cause=req, source=f"agent@{node}")
            continue
        yield g.ev(ev.DeployActivated, ev.Activation(deployment_id=deployment_id, plan_id=plan_id, node=node, checkpoint_id=checkpoint_id, version=version), cause=req, source=f"agent@{node}")
        previous, running[node] = running[node], checkpoint_id
        if previous and rng.random() < 0.1:
            yield Plain("control.rollback", msgspec.json.encode({"node": node, "by": "ops@console", "reason": "health check"}))
            yield g.ev(ev.DeployRolledBack, ev.Rollback(node=node, from_checkpoint_id=checkpoint_id, to_checkpoint_id=previous, reason="health check", deployment_id=deployment_id), source=f"agent@{node}")
            running[node] = previous
            continue
        period_start = g.t.replace(microsecond=0)
        baseline = round(rng.uniform(900, 1100), 2)
        saved = round(baseline * rng.uniform(0.02, 0.12), 2)
        m = g.ev(
            ev.EnergyMeasured,
            ev.Measurement(
                measurement_id=g.id("measurement", c, node), node=node, deployment_id=deployment_id, period_start=period_start,
                period_end=period_start + dt.timedelta(days=1), baseline_kwh=baseline, actual_kwh=round(baseline - saved, 2),
                method="metered-vs-baseline", domain=domain,
            ),
            source=f"agent@{node}",
        )
        yield m
        transfer_id = g.id("transfer", c, node)
        yield g.ev(
            ev.LedgerTransfer,
            ev.Transfer(
                transfer_id=transfer_id, cause_id=m.data.measurement_id, debit_account="issuance:negentropy",
                credit_account=ACCOUNTS[domain], micro_credits=int(round(saved * 1_000_000 * 0.5)), kwh=saved, rate=0.5,
            ),
            cause=m, source="ledger",
        )


async def publish(bus: Bus, items: Iterable[Item]) -> int:
    """Publish events (pipelined) and plain messages, in order. Returns the count."""
    n = 0
    pending: list[ev.Event] = []

    async def flush() -> None:
        if pending:
            await bus.publish_many(pending)
            pending.clear()

    for item in items:
        n += 1
        if isinstance(item, Plain):
            await flush()
            await bus.js.publish(item.subject, item.body, headers=item.headers)
        else:
            pending.append(item)
            if len(pending) >= 4096:
                await flush()
    await flush()
    return n


def write_archive(store, items: Iterable[Item], *, batch: int = 100_000, start_ns: int | None = None) -> dict[str, int]:
    """Write items into `store` as if each stream had received them in this order (one ms
    apart), without NATS. Returns the last sequence per stream."""
    from scf.projections.store import RawMessage, messages_table

    store.ensure()
    t0 = start_ns if start_ns is not None else int(dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc).timestamp()) * 1_000_000_000
    seqs: dict[str, int] = {}
    buffers: dict[str, list[RawMessage]] = {}
    for i, item in enumerate(items):
        subject = subject_of(item)
        stream = stream_for_subject(subject)
        if stream == "JOBS":
            continue
        seq = seqs[stream] = seqs.get(stream, 0) + 1
        buf = buffers.setdefault(stream, [])
        buf.append(RawMessage(seq, t0 + i * 1_000_000, subject, body_of(item), headers_of(item)))
        if len(buf) >= batch:
            store.append(stream, messages_table(buf))
            buf.clear()
    for stream, buf in buffers.items():
        if buf:
            store.append(stream, messages_table(buf))
    return seqs
