"""The daemon: `scf run daemon`. Applies control commands, pulses at the gear's heartbeat,
turns new fossils into training intents, verifies and promotes checkpoints.

    control.<verb>            → gear.changed / daemon.stopped / daemon.resumed /
                                emergency.engaged / emergency.released / a human verdict,
                                or control.rejected with the reason (nothing is ignored)
    fossil.recorded.<dom>.<id> → counted per domain (headers only); at a pulse, a domain
                                with enough new fossils since its last training gets one
                                intent.created.train.<intent_id> per model of
                                `[daemon] train_models` (an EBDM; a learned optimiser:
                                params `model = "optimiser"`, id `…-optimiser`)
    checkpoint.produced.<dom> → checkpoint.verified + checkpoint.promoted, or
                                checkpoint.rejected (producers/verify.py)

Pure decisions: `decide_control(state, received, ctx, holds)` and `orient(...)`; the
`Daemon` class owns the I/O. State is rebuilt from the log on start:

* gear, stop and emergency: the last `gear.changed`, `gear.daemon.*`, `emergency.*`
  events (direct gets, O(1)); the KV mirrors `scf_state/gear` and `scf_state/emergency`
  are rewritten from them (the log wins over a stale cache);
* which commands were decided: all at or below the control consumer's ack floor, and above
  it those whose effect or `control.rejected` CONTROL holds (their `CONTROL:<seq>`
  causation), so a command applied just before a crash and redelivered after it is not
  applied twice, and one that failed is applied when it comes back, whatever came between;
* the replay guard: the signed commands CONTROL stored within its window (docs/control.md);
* trainings: every `intent.created.train.*` the daemon wrote carries the domain's
  generation and fossil count; intent ids are `train-<domain>-<generation>` and are
  published with `publish_once`, so a restarted (or a second) daemon cannot duplicate one;
* fossil counts: a headers-only `StreamReader.follow` over `fossil.recorded.>` from the
  start, counted per subject token (the third); a token's domain is named from one of its
  fossils' bodies (`FossilView.name`: the token is lossy, `grid:case9` -> `grid_case9`), and
  a domain not named yet is not trained; orient waits until the counts have caught up with
  the stream's last sequence at start and are named, so a replay never fires on partial counts;
* held subjects: a `StreamReader.follow` over `verdict.>`; an approve that names a subject
  the view has not seen yet waits until the view has caught up with the stream (read your
  writes).

A server restart while this is rebuilt resets it and starts again (`Daemon.start`).

Every wait of the daemon's loops (the start, a pulse, a command being applied) is awaited
together with the stop (`until_stopped`), not checked between waits: SIGTERM ends them at
once whatever the server's state; a command being applied is given back (nak'ed) and
applied by the next start.

Effect ids are keyed with the deployment's id key (`bus.ids.keyed_id`, `$SCF_HOME/keys/ids.key`)
and published with `verify=True`: a duplicate ack for an id someone else took first is
detected and the effect published again under a fresh id.

While the emergency stop is engaged (KV or this host's lock file), the daemon keeps applying
control commands (it must hear the release) but creates no intent and promotes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, Sequence

import msgspec
from nats.aio.msg import Msg
from nats.js.errors import ServiceUnavailableError

from scf.bus import control, gears
from scf.bus import events as ev
from scf.bus.client import Bus, Throttle
from scf.bus.codec import Codec
from scf.bus.emergency import EmergencyGate, EmergencyState, write_state
from scf.bus.errors import ConfigError, DecodeError, SCFError, SignatureError
from scf.bus.ids import derived_id, ensure_id_key, keyed_id, load_id_key, subject_token
from scf.bus.reader import ReadStalled, StreamMsg, StreamReader, describe, last_seq
from scf.bus.runner import Delivery, Runner, Stopping, race, run_all, until_stopped
from scf.bus.settings import Settings
from scf.bus.signing import TrustList
from scf.bus.streams import CONSUMERS, KEY_DAEMON, ConsumerSpec, ensure_consumer
from scf.bus.trust import SharedTrust
from scf.consumers.worker import EBDM, MODELS, OPTIMISER
from scf.producers.verify import CheckpointVerifier, Verifier, VerifySettings, alias_heads, decide_promotion, next_version

log = logging.getLogger("scf.daemon")

CONTROL_CONSUMER: ConsumerSpec = CONSUMERS["daemon-control"]
CHECKPOINT_CONSUMER: ConsumerSpec = CONSUMERS["daemon-checkpoints"]
MAX_BODY = 64 * 1024
# Verbs the daemon applies; the others under control.> belong to other consumers.
NOT_MINE = {"rollback"}


class DaemonSettings(msgspec.Struct, frozen=True, kw_only=True):
    """`[daemon]` in scf.toml."""

    train_threshold: dict[str, int] = {}  # per gear, e.g. {STANDARD = 5000}; default: the gear table
    train_config: dict[str, ev.Scalar] = {}  # model config every train intent asks for (steps = 300, hidden = 128 …)
    train_models: tuple[str, ...] = (EBDM,)  # what each training generation trains: ebdm, optimiser (one intent each)
    optimiser_config: dict[str, ev.Scalar] = {}  # the learned optimiser's config (steps = 2000, hidden = 256, cost_knots = 9 …)
    verify_checkpoints: str = "auto"  # auto (when torch is importable) | on (fail without torch) | off
    liveness_min_interval: float = 0.25  # seconds between liveness writes at fast gears
    command_window_s: float = 300.0  # a signed command's issued_at may lie this far before it reached CONTROL
    clock_skew_s: float = 30.0  # … and this far after it (the sender's clock ahead of the server's)
    apply_attempts: int = 5  # a command that keeps failing is rejected (control.rejected) after this many tries
    checkpoint: VerifySettings = VerifySettings()


# --------------------------------------------------------------------------- control state


class ControlState(msgspec.Struct, frozen=True, kw_only=True):
    """What control commands change; rebuilt from CONTROL on start."""

    gear: str = gears.DEFAULT_GEAR
    gear_since: dt.datetime | None = None
    gear_by: str = ""
    gear_event_id: str | None = None
    stopped: bool = False
    stopped_by: str = ""
    emergency: bool = False
    emergency_reason: str = ""
    emergency_by: str = ""
    emergency_since: dt.datetime | None = None
    emergency_event_id: str | None = None
    applied_seq: int = 0  # CONTROL sequence of the last command applied


@dataclass(frozen=True)
class SubjectRuling:
    """The latest verdict on a subject (from VERDICTS), as the daemon's approval view sees it."""

    subject_id: str
    subject_type: str
    decision: str
    final: bool
    gate: str
    by: str
    kind: str = ""
    domain: str = ""
    causation_id: str | None = None


@dataclass(frozen=True)
class CommandContext:
    seq: int  # the command's CONTROL stream sequence
    subject: str
    body: bytes
    source: str  # this daemon's identity
    sandbox: bool
    now: dt.datetime
    id_key: bytes = b""  # the deployment's id key: effect ids outsiders cannot compute

    @property
    def ref(self) -> str:
        return command_ref(self.seq)


def command_ref(seq: int) -> str:
    return f"CONTROL:{seq}"


def command_seq(ref: str | None) -> int:
    if ref and ref.startswith("CONTROL:"):
        try:
            return int(ref.removeprefix("CONTROL:"))
        except ValueError:
            return 0
    return 0


def _effect(cls: type[ev.Event], payload: ev.Payload, ctx: CommandContext, key: str = "") -> ev.Event:
    parts = (ctx.ref, cls.type_name(), key)
    return cls(  # type: ignore[call-arg]
        id=keyed_id(ctx.id_key, *parts) if ctx.id_key else derived_id(*parts),
        at=ctx.now,
        source=ctx.source,
        correlation_id=ctx.ref,
        causation_id=ctx.ref,
        data=payload,
    )


def rejection(ctx: CommandContext, reason: str, max_body: int = MAX_BODY) -> ev.ControlRejected:
    body = ctx.body[:max_body].decode("utf-8", "replace")
    return _effect(ev.ControlRejected, ev.ControlRejection(command_subject=ctx.subject, body=body, reason=reason, command_seq=ctx.seq), ctx)  # type: ignore[return-value]


def decide_control(
    state: ControlState,
    received: control.Received | SCFError,
    ctx: CommandContext,
    holds: Mapping[str, SubjectRuling] | None = None,
) -> tuple[ControlState, list[ev.Event]]:
    """Apply one command: the new state and the events that record it (or its rejection)."""
    applied = msgspec.structs.replace(state, applied_seq=max(state.applied_seq, ctx.seq))
    if isinstance(received, SCFError):
        return applied, [rejection(ctx, str(received))]
    cmd = received.command
    who = received.signer or cmd.by or "anonymous"

    def reject(reason: str) -> tuple[ControlState, list[ev.Event]]:
        return applied, [rejection(ctx, reason)]

    match cmd:
        case control.ShiftGear(level=level):
            try:
                to = gears.normalise(level)
            except gears.UnknownGear as exc:
                return reject(str(exc))
            if gears.spec(to).sandbox_only and not ctx.sandbox:
                return reject(
                    f"{to} is refused: this deployment is not a sandbox "
                    "(set SCF_SANDBOX=1 or `sandbox = true` in scf.toml where the daemon runs)"
                )
            if to == state.gear:
                return reject(f"already in gear {to}: nothing to change")
            e = _effect(ev.GearChanged, ev.GearChange(from_gear=state.gear, to_gear=to, by=who, reason=cmd.reason), ctx)  # type: ignore[arg-type]
            return msgspec.structs.replace(applied, gear=to, gear_since=ctx.now, gear_by=who, gear_event_id=e.id), [e]
        case control.Stop():
            if state.stopped:
                return reject(f"the daemon is already stopped (by {state.stopped_by or 'unknown'}): send control.resume to restart it")
            e = _effect(ev.DaemonStopped, ev.Actor(by=who, reason=cmd.reason), ctx)
            return msgspec.structs.replace(applied, stopped=True, stopped_by=who), [e]
        case control.Resume():
            if not state.stopped:
                return reject("the daemon is not stopped: nothing to resume")
            e = _effect(ev.DaemonResumed, ev.Actor(by=who, reason=cmd.reason), ctx)
            return msgspec.structs.replace(applied, stopped=False, stopped_by=""), [e]
        case control.EmergencyStop():
            if state.emergency:
                return reject(
                    f"the emergency stop is already engaged (by {state.emergency_by or 'unknown'}"
                    f"{': ' + state.emergency_reason if state.emergency_reason else ''})"
                )
            e = _effect(ev.EmergencyEngaged, ev.EmergencyChange(by=who, reason=cmd.reason, origin="control"), ctx)
            return msgspec.structs.replace(
                applied, emergency=True, emergency_reason=cmd.reason, emergency_by=who, emergency_since=ctx.now, emergency_event_id=e.id
            ), [e]
        case control.ReleaseEmergency():
            if received.signer is None:  # decode() requires the signature; never release without one
                return reject("releasing the emergency stop needs a valid operator signature: sign it with a trusted operator key (SCF_KEY)")
            if not state.emergency:
                return reject("the emergency stop is not engaged: nothing to release")
            e = _effect(ev.EmergencyReleased, ev.EmergencyChange(by=who, reason=cmd.reason, origin="control"), ctx)
            return msgspec.structs.replace(
                applied, emergency=False, emergency_reason="", emergency_by=who, emergency_since=ctx.now, emergency_event_id=e.id
            ), [e]
        case control.Approve(subject_id=sid) | control.Reject(subject_id=sid):
            decision = "APPROVE" if isinstance(cmd, control.Approve) else "REJECT"
            ruling = (holds or {}).get(sid)
            if ruling is None:
                return reject(f"nothing is held with id {sid!r}: only subjects the safety gate held (HOLD) wait for a human")
            if ruling.final:
                if ruling.gate == "human" and ruling.causation_id == ctx.ref:
                    return applied, []  # this very command was applied before a restart
                return reject(f"{sid} is already decided: {ruling.decision} by {ruling.by} (gate {ruling.gate})")
            verdict = ev.Verdict(
                verdict_id=derived_id("verdict", "human", sid, ctx.seq),
                subject_id=sid,
                subject_type=ruling.subject_type,
                decision=decision,  # type: ignore[arg-type]
                gate="human",
                reasons=[f"{decision.lower()}d by {who}" + (f": {cmd.reason}" if cmd.reason else "")],
                final=True,
                by=who,
                kind=ruling.kind,
                domain=ruling.domain,
            )
            return applied, [_effect(ev.VerdictIssued, verdict, ctx, sid)]
        case _:
            return reject(f"control verb {ctx.subject!r} is not applied by the daemon")


# --------------------------------------------------------------------------- orient (pure)


class DomainCount(msgspec.Struct, kw_only=True):
    domain: str
    total: int = 0  # fossils of the domain seen in FOSSILS
    last_seq: int = 0  # stream sequence of its latest fossil


class TrainMark(msgspec.Struct, frozen=True, kw_only=True):
    """The domain's last training intent."""

    generation: int
    fossils: int  # the domain's fossil count when it was created
    intent_id: str
    fossil_seq: int = 0


TRAIN_INTENT_PARAMS = gears.TRAIN_INTENT_PARAMS


def threshold(gear: str, overrides: Mapping[str, int]) -> int:
    return int(overrides.get(gear, gears.spec(gear).train_threshold))


def train_intent_id(domain: str, generation: int, model: str = EBDM) -> str:
    """`train-<domain>-<generation>` (an EBDM), `…-optimiser` (a learned optimiser)."""
    return f"train-{subject_token(domain)}-{generation:06d}" + ("" if model == EBDM else f"-{subject_token(model)}")


def check_models(models: Sequence[str]) -> None:
    """Refuse `[daemon] train_models` naming a model no worker trains (ConfigError)."""
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        raise ConfigError(f"[daemon] train_models = {list(models)}: {bad or 'empty'}: use some of {', '.join(MODELS)}")


def orient(
    counts: Mapping[str, DomainCount],
    trained: Mapping[str, TrainMark],
    gear: str,
    overrides: Mapping[str, int],
    *,
    source: str,
    now: dt.datetime | None = None,
    train_config: Mapping[str, ev.Scalar] | None = None,
    models: Sequence[str] = (EBDM,),
    optimiser_config: Mapping[str, ev.Scalar] | None = None,
) -> list[ev.IntentCreated]:
    """One train intent per domain with at least the gear's threshold of new fossils and per
    model in `models` (`ebdm`, `optimiser`). The intent's params are the configured model
    config (`train_config` for an EBDM; `optimiser_config` and `model = "optimiser"` for a
    learned optimiser) plus the daemon's bookkeeping."""
    out = []
    g = gears.spec(gear)
    need = threshold(gear, overrides)
    for c in sorted(counts.values(), key=lambda c: c.domain):
        mark = trained.get(c.domain)
        new = c.total - (mark.fossils if mark else 0)
        if new < need:
            continue
        generation = (mark.generation if mark else 0) + 1
        for model in models:
            intent_id = train_intent_id(c.domain, generation, model)
            config = {**(optimiser_config or {}), "model": OPTIMISER} if model == OPTIMISER else dict(train_config or {})
            intent = ev.Intent(
                intent_id=intent_id,
                kind="train",
                domain=c.domain,
                params={
                    **config,
                    "generation": generation,
                    "fossils": c.total,
                    "new_fossils": new,
                    "fossil_seq": c.last_seq,
                    "threshold": need,
                    "hypotheses": g.hypotheses,
                    "sampling_temperature": g.sampling_temperature,
                },
                reason=f"{new} new fossils of {c.domain} since its last training (threshold {need} in {gear})"
                + ("" if model == EBDM else f": a learned {model}"),
                gear=gear,
            )
            out.append(ev.IntentCreated.new(intent, source=source, id=derived_id("intent", intent_id), at=now))
    return out


def mark_of(intent: ev.Intent) -> TrainMark | None:
    p = intent.params
    gen, fossils = p.get("generation"), p.get("fossils")
    if intent.kind != "train" or not isinstance(gen, int) or not isinstance(fossils, int):
        return None
    seq = p.get("fossil_seq")
    return TrainMark(generation=gen, fossils=fossils, intent_id=intent.intent_id, fossil_seq=seq if isinstance(seq, int) else 0)


# --------------------------------------------------------------------------- views of the log


class _LogView:
    """A catch-up-then-follow view of a subject filter (`StreamReader.follow`: it resumes
    after a server restart on its own)."""

    stream = ""
    subject = ""
    headers_only = False

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.caught_up = asyncio.Event()
        self.on_caught_up = lambda: None  # called once, when the view first catches up
        self._reader = StreamReader(bus.nc, bus.js, self.stream, self.subject, headers_only=self.headers_only)
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def seq(self) -> int:
        """The stream sequence of the last message applied."""
        return self._reader.stats.last_seq

    async def start(self) -> None:
        self._task = asyncio.create_task(self._reader.follow(self._apply, self._stop, on_caught_up=self._caught_up))

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
            self._task = None

    def _caught_up(self) -> None:
        self.caught_up.set()
        self.on_caught_up()

    async def _apply(self, msg: StreamMsg) -> None:
        try:
            await self.apply(msg)
        except Exception as exc:  # noqa: BLE001 - a bad message must not stop the view
            log.error("%s view: seq %s: %s", self.stream, msg.seq, exc)

    async def apply(self, msg: StreamMsg) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    async def sync(self, timeout: float = 5.0) -> bool:
        """Wait until the view has applied everything the stream holds now."""
        return await self._reader.reached(await last_seq(self.bus.js, self.stream, self.subject), timeout)


class HoldsView(_LogView):
    """The latest verdict per subject, for approvals: holds are kept, final ones bounded."""

    stream, subject = "VERDICTS", "verdict.>"
    KEEP_FINAL = 100_000

    def __init__(self, bus: Bus) -> None:
        super().__init__(bus)
        self.rulings: dict[str, SubjectRuling] = {}
        self._finals: OrderedDict[str, None] = OrderedDict()
        self.codec = Codec([ev.VerdictIssued])

    async def apply(self, msg: StreamMsg) -> None:
        e = self.codec.decode(msg.data)
        assert isinstance(e, ev.VerdictIssued)
        self.record(e)

    def record(self, e: ev.VerdictIssued) -> None:
        v = e.data
        old = self.rulings.get(v.subject_id)
        if old is not None and old.final and not v.final:
            return  # a late HOLD never reopens a decided subject
        self.rulings[v.subject_id] = SubjectRuling(
            v.subject_id, v.subject_type, v.decision, v.final, v.gate, v.by, v.kind, v.domain, e.causation_id
        )
        if v.final:
            self._finals[v.subject_id] = None
            self._finals.move_to_end(v.subject_id)
            while len(self._finals) > self.KEEP_FINAL:
                old_id, _ = self._finals.popitem(last=False)
                self.rulings.pop(old_id, None)

    @property
    def held(self) -> list[SubjectRuling]:
        return [r for r in self.rulings.values() if not r.final]


class _DomainOf(msgspec.Struct):
    domain: str


class _FossilBody(msgspec.Struct):
    data: _DomainOf


class FossilView(_LogView):
    """Fossil counts per domain, from the subjects alone (headers-only delivery).

    A subject names its domain by a token (`grid:case9` -> `grid_case9`), which is lossy, so
    a domain's real name is read from one of its fossils' bodies by `name()` (the pulse
    calls it before it orients). A body that cannot be read now (the server away, a
    timeout) leaves the domain counted but unnamed, so not trained, until a later call reads
    it: never named by its token, which would make `orient` propose other content under an
    existing intent's id (`train-grid_case9-000001`, "already exists with other content")."""

    stream, subject, headers_only = "FOSSILS", "fossil.recorded.>", True

    def __init__(self, bus: Bus) -> None:
        super().__init__(bus)
        self.by_token: dict[str, DomainCount] = {}
        self._decoder = msgspec.json.Decoder(_FossilBody)
        self._nameless: dict[str, int] = {}  # token -> the seq whose body names no domain (tried again at a newer one)
        self._throttle = Throttle(1.0)

    async def apply(self, msg: StreamMsg) -> None:
        parts = msg.subject.split(".")
        if len(parts) < 4:
            return
        count = self.by_token.get(parts[2])
        if count is None:
            count = self.by_token[parts[2]] = DomainCount(domain="")  # named by name()
        count.total += 1
        count.last_seq = msg.seq

    async def name(self) -> bool:
        """Name the domains counted so far from a fossil's body each (its latest). False
        while a body could not be read (tried again at the next call); a body that names no
        domain (not a fossil) is skipped until a newer fossil of its token comes."""
        from nats.js.errors import NotFoundError

        named = True
        for token, count in list(self.by_token.items()):
            if count.domain or self._nameless.get(token) == count.last_seq:
                continue
            seq = count.last_seq
            try:
                full = await self.bus.js.get_msg(self.stream, seq)
            except NotFoundError:
                self._nameless[token] = seq  # deleted since: a newer fossil names it
                continue
            except Exception as exc:  # noqa: BLE001 - the server away or slow: counted, named at the next call
                named = False
                self._throttle.warn(log, "name", "fossils of %s: cannot read seq %d for the domain's name (%s): "
                                    "not trained until it can be read", token, seq, describe(exc))
                continue
            try:
                count.domain = self._decoder.decode(full.data).data.domain
            except msgspec.DecodeError as exc:
                self._nameless[token] = seq
                log.warning("fossils of %s: seq %d names no domain (%s): waiting for another fossil of it", token, seq, exc)
        return named

    @property
    def counts(self) -> dict[str, DomainCount]:
        """The named domains' counts (see `name`)."""
        return {c.domain: c for c in self.by_token.values() if c.domain}


async def read_trainings(bus: Bus) -> dict[str, TrainMark]:
    """The last training mark per domain, from every train intent in INTENTS."""
    marks: dict[str, TrainMark] = {}
    codec = Codec([ev.IntentCreated])

    def take(msg: StreamMsg) -> None:
        with contextlib.suppress(Exception):
            e = codec.decode(msg.data)
            m = mark_of(e.data) if isinstance(e, ev.IntentCreated) else None
            if m is not None:
                old = marks.get(e.data.domain)
                if old is None or m.generation >= old.generation:
                    marks[e.data.domain] = m

    await StreamReader(bus.nc, bus.js, "INTENTS", "intent.created.train.>").scan(take)
    return marks


async def rebuild_control(bus: Bus) -> ControlState:
    """The control state from the last events of CONTROL."""
    state = ControlState()
    applied = 0

    async def last(subject: str):
        nonlocal applied
        found = await bus.last(subject)
        if found is not None:
            applied = max(applied, command_seq(found[1].causation_id))
        return found

    gear = await last("gear.changed")
    if gear is not None and isinstance(gear[1], ev.GearChanged):
        e = gear[1]
        state = msgspec.structs.replace(state, gear=e.data.to_gear, gear_since=e.at, gear_by=e.data.by, gear_event_id=e.id)
    stopped, resumed = await last("gear.daemon.stopped"), await last("gear.daemon.resumed")
    if stopped is not None and (resumed is None or stopped[0] > resumed[0]):
        state = msgspec.structs.replace(state, stopped=True, stopped_by=stopped[1].data.by)  # type: ignore[attr-defined]
    engaged, released = await last("emergency.engaged"), await last("emergency.released")
    if engaged is not None and (released is None or engaged[0] > released[0]):
        e = engaged[1]
        state = msgspec.structs.replace(
            state, emergency=True, emergency_reason=e.data.reason, emergency_by=e.data.by, emergency_since=e.at, emergency_event_id=e.id  # type: ignore[attr-defined]
        )
    await last("control.rejected")
    return msgspec.structs.replace(state, applied_seq=applied)


# Where the daemon records what a command did: an effect or its rejection, each with
# causation "CONTROL:<seq>" of the command (and stored after it, in the same stream).
EFFECT_SUBJECTS = ("gear.>", "emergency.>", "control.rejected")


class _Causation(msgspec.Struct):
    causation_id: str | None = None


# the replay guard's rebuild is shared with the deploy planner (bus/control.py)
read_recent_commands = control.read_recent_commands


async def decided_commands(bus: Bus, after_seq: int) -> set[int]:
    """CONTROL sequences above `after_seq` of the commands whose effect or rejection CONTROL
    holds (the causation of every effect stored after `after_seq`): these were decided, the
    others above `after_seq` were not, whatever their order."""
    found: set[int] = set()
    decoder = msgspec.json.Decoder(_Causation)

    def handle(msg: StreamMsg) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            seq = command_seq(decoder.decode(msg.data).causation_id)
            if seq > after_seq:
                found.add(seq)

    await StreamReader(bus.nc, bus.js, "CONTROL", EFFECT_SUBJECTS, start_seq=after_seq + 1).scan(handle)
    return found


def _stored_at(msg: Msg) -> dt.datetime:
    """When CONTROL stored the message (the server's clock)."""
    try:
        return msg.metadata.timestamp
    except Exception:  # noqa: BLE001 - not a JetStream delivery (a test's stand-in): now is as good as it gets
        return ev.utcnow()


def _adopt_reissued(events: list[ev.Event], published, state: ControlState) -> tuple[list[ev.Event], ControlState]:
    """Effects the bus had to publish again under a fresh id replace the originals (and their
    ids in the state, which the KV mirrors carry)."""
    out = []
    for e, p in zip(events, published):
        fresh = p.reissued
        if fresh is None:
            out.append(e)
            continue
        out.append(fresh)
        if state.gear_event_id == e.id:
            state = msgspec.structs.replace(state, gear_event_id=fresh.id)
        if state.emergency_event_id == e.id:
            state = msgspec.structs.replace(state, emergency_event_id=fresh.id)
    return out, state


def _transient(exc: BaseException, bus: Bus) -> bool:
    """Connection trouble (worth a redelivery later), as opposed to a command that fails."""
    from nats import errors as nerr

    if not bus.nc.is_connected:
        return True
    if isinstance(exc, (asyncio.TimeoutError, nerr.TimeoutError, nerr.ConnectionClosedError, nerr.NoServersError,
                        nerr.StaleConnectionError, nerr.ConnectionReconnectingError, nerr.FlushTimeoutError,
                        nerr.OutboundBufferLimitError, nerr.NoRespondersError, ServiceUnavailableError)):
        return True
    from scf.bus.errors import NatsUnavailable, ServerError

    if isinstance(exc, NatsUnavailable):
        return True
    return isinstance(exc, ServerError) and (exc.code is None or exc.code == 503)


# --------------------------------------------------------------------------- liveness


class Liveness(msgspec.Struct, kw_only=True):
    """The value of `scf_state/daemon` (JSON), rewritten at each pulse (at most every
    `liveness_min_interval`)."""

    source: str
    host: str
    pid: int
    started_at: dt.datetime
    at: dt.datetime
    gear: str
    heartbeat_s: float
    stopped: bool
    emergency: bool
    pulses: int
    ready: bool  # state rebuilt and fossil counts caught up
    pending: dict[str, int] = {}  # new fossils per domain since its last training
    held: int = 0  # subjects waiting for a human
    verifying: bool = False  # whether this daemon verifies checkpoints


# --------------------------------------------------------------------------- the process


class Daemon:
    def __init__(self, bus: Bus, settings: Settings, config: DaemonSettings | None = None, *, verifier: Verifier | None = None) -> None:
        self.bus = bus
        self.settings = settings
        self.config = config or settings.section("daemon", DaemonSettings)
        check_models(self.config.train_models)
        self.state = ControlState()
        self.trained: dict[str, TrainMark] = {}
        self.holds = HoldsView(bus)
        self.fossils = FossilView(bus)
        self.gate = EmergencyGate(bus, settings.emergency_lock)
        self.verifier = verifier
        self.ready = False
        self.pulses = 0
        self.started_at = ev.utcnow()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # control commands and orient never interleave
        self._trust: TrustList | None = None  # the live trust view (bus/trust.py), opened in start()
        self._last_liveness = 0.0
        self.intents_created = 0
        self.started = asyncio.Event()
        self.control_seen = self.control_target = 0
        self._start_mono = time.monotonic()
        self.id_key = self._load_id_key()
        self.replay = control.ReplayGuard(self.config.command_window_s, self.config.clock_skew_s)
        # Which commands were decided (an effect or a control.rejected is in CONTROL): every
        # command at or below the consumer's ack floor at start, and those in `decided`.
        # A command that failed is not in either, so its redelivery is applied, whatever the
        # order in which the consumer hands commands out.
        self.ack_floor = 0
        self.decided: set[int] = set()
        self._throttle = Throttle(1.0)
        self._stop: asyncio.Event | None = None  # run()'s: every wait of the loops ends at it (`until_stopped`)

    def _load_id_key(self) -> bytes:
        path, created = ensure_id_key(self.settings.keys_dir)
        if created:
            log.warning("created the deployment's id key %s (mode 0600): every service host needs this same file (docs/control.md)", path)
        return load_id_key(self.settings.keys_dir)

    # ------------------------------------------------------------------ start
    async def start(self, stop: asyncio.Event | None = None) -> "Daemon":
        """Rebuild the state from the log, then start the views. Connection trouble meanwhile
        (a server restart, JetStream recovering) is ridden out: what the attempt built is
        reset and the start tried again with backoff (0.1 s doubling to 5 s, logged at most
        once a second) until it succeeds or `stop` is set; `started` is set once it has."""
        delay = 0.1
        log.info("daemon: rebuilding its state from the log")
        while stop is None or not stop.is_set():
            try:
                # awaited with the stop: a read of the log waits up to a minute for a server
                # that is away (StreamReader patience), a JetStream request 5 s
                return await until_stopped(self._start(), stop)
            except Stopping:
                break
            except Exception as exc:
                if not (_transient(exc, self.bus) or isinstance(exc, ReadStalled)):
                    await self._reset()
                    raise
                self._throttle.warn(log, "start", "daemon start interrupted (%s): starting again", describe(exc))
            await self._reset()
            if stop is None:
                await asyncio.sleep(delay)
            else:
                await race(asyncio.sleep(delay), stop)
            delay = min(delay * 2, 5.0)
        await self._reset()  # stopped while starting: what the attempt built is let go
        return self

    async def _reset(self) -> None:
        """Forget what an interrupted start built (views, trust view, gate, replay guard)."""
        await self.stop()
        self.holds, self.fossils = HoldsView(self.bus), FossilView(self.bus)
        self.gate = EmergencyGate(self.bus, self.settings.emergency_lock)
        self._trust = None
        self.replay = control.ReplayGuard(self.config.command_window_s, self.config.clock_skew_s)
        self.state, self.trained, self.decided, self.ack_floor = ControlState(), {}, set(), 0

    async def _start(self) -> "Daemon":
        await ensure_consumer(self.bus.js, CONTROL_CONSUMER)
        info = await self.bus.js.consumer_info(CONTROL_CONSUMER.stream, CONTROL_CONSUMER.durable)
        self.ack_floor = info.ack_floor.stream_seq if info.ack_floor else 0
        self.state = await rebuild_control(self.bus)
        self.decided = await decided_commands(self.bus, self.ack_floor)
        # the trust view first: the replay guard verifies the recent signed commands with it
        self._trust = await SharedTrust.open(self.bus, self.settings)
        replay_seen = await read_recent_commands(self.bus, self.replay, self.trust())
        await self._mirror_gear()
        await self._mirror_emergency()
        self.trained = await read_trainings(self.bus)
        await self.holds.start()
        self.fossils.on_caught_up = self._wake.set  # orient at once, not a heartbeat later
        await self.fossils.start()
        # Commands waiting in CONTROL are applied before the first orient (a shift or a
        # stop sent while the daemon was down must not be preceded by an intent).
        self.control_seen = self.ack_floor
        self.control_target = await last_seq(self.bus.js, "CONTROL", "control.>")
        self._start_mono = time.monotonic()
        await self.gate.start()
        if self.verifier is None:
            self.verifier = self._make_verifier()
        log.info(
            "daemon: gear %s%s%s, %d trained domains, commands decided up to CONTROL seq %d and %d after it, "
            "%d signed command(s) in the replay window",
            self.state.gear, ", stopped" if self.state.stopped else "", ", EMERGENCY" if self.state.emergency else "",
            len(self.trained), self.ack_floor, len(self.decided), replay_seen,
        )
        self.started.set()
        return self

    def _make_verifier(self) -> Verifier | None:
        from scf.producers import verify

        mode = self.config.verify_checkpoints
        if mode == "off":
            log.warning("checkpoint verification is off ([daemon] verify_checkpoints): checkpoint.produced waits in CHECKPOINTS")
            return None
        why = verify.available()
        if why:
            if mode == "on":
                raise SCFError(f"cannot verify checkpoints: {why}")
            log.warning("checkpoint verification disabled: %s; checkpoint.produced waits in CHECKPOINTS for a daemon that can", why)
            return None
        return CheckpointVerifier(self.bus, self.settings, self.config.checkpoint)

    async def stop(self) -> None:
        """Stop the views, the gate and the trust view, together (each ends at once: its
        reads are awaited with its stop)."""
        parts = [self.holds.stop(), self.fossils.stop(), self.gate.stop()]
        if isinstance(self._trust, SharedTrust):
            parts.append(self._trust.stop())
        await asyncio.gather(*parts)

    # ------------------------------------------------------------------ control
    def trust(self) -> TrustList:
        # the shared TRUST list + this host's trusted.json, followed live; before start(), the file
        return self._trust if self._trust is not None else TrustList.load(self.settings.keys_dir / "trusted.json")

    @property
    def control_caught_up(self) -> bool:
        if self.control_seen >= self.control_target:
            return True
        # unacked commands of a crashed predecessor come back after the ack wait: do not wait longer
        return time.monotonic() - self._start_mono > CONTROL_CONSUMER.ack_wait + 5

    async def on_control(self, msg: Msg, d: Delivery) -> list[ev.Event] | None:
        """Apply one command; a failure is retried here (so later commands wait: order is
        kept), and a command that keeps failing becomes control.rejected with the error.
        Connection trouble is left to the runner (nak: the command comes back later). The
        stop (SIGTERM) ends every wait at once: the command is then given back (`Stopping`
        raised: nak'ed, applied by the next start; its effects' ids are the same)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                out = await until_stopped(self._on_control(msg, d), self._stop)
                break
            except Stopping:
                raise Stopping(f"stopped while applying control seq {d.stream_seq} ({d.subject}): given back for the next start") from None
            except Exception as exc:
                if _transient(exc, self.bus):
                    raise  # nak'ed and redelivered: not decided, so never skipped
                if attempt >= max(1, self.config.apply_attempts):
                    out = await until_stopped(self._give_up(msg, d, exc, attempt), self._stop)
                    break
                log.warning("control seq %d (%s) attempt %d failed: %s: %s", d.stream_seq, d.subject, attempt, type(exc).__name__, exc)
                await until_stopped(asyncio.sleep(min(5.0, 0.25 * 2 ** (attempt - 1))), self._stop)  # backoff between attempts
        self.control_seen = max(self.control_seen, d.stream_seq)
        if self.control_seen >= self.control_target:
            self._wake.set()
        return out

    async def _on_control(self, msg: Msg, d: Delivery) -> list[ev.Event] | None:
        subject = d.subject
        verb = subject.removeprefix("control.")
        if subject in control.EVENT_SUBJECTS or verb in NOT_MINE:
            return None
        if d.stream_seq <= self.ack_floor or d.stream_seq in self.decided:
            log.info("control seq %d (%s) was decided before this start: skipped", d.stream_seq, subject)
            return None
        ctx = self._context(msg, d)
        try:
            received: control.Received | SCFError = control.decode(
                subject, msg.data, d.headers, self.trust(),
                require_signature=self.settings.require_signed_control or verb == "release_emergency",
            )
        except (DecodeError, SignatureError) as exc:
            received = exc
        stored_at = _stored_at(msg)
        if isinstance(received, control.Received):
            try:
                self.replay.check(received, d.stream_seq, stored_at)
            except control.ReplayError as exc:
                log.warning("control seq %d refused: %s", d.stream_seq, exc)
                received = exc
        if isinstance(received, control.Received) and isinstance(received.command, (control.Approve, control.Reject)):
            await self.holds.sync()
        async with self._lock:
            new_state, events = decide_control(self.state, received, ctx, self.holds.rulings)
            if events:
                # a duplicate ack is checked against the stream: an id taken first by
                # someone else gets the effect published again under a fresh id
                published = await self.bus.publish_many(events, verify=True)
                events, new_state = _adopt_reissued(events, published, new_state)
            if isinstance(received, control.Received):
                self.replay.record(received, d.stream_seq, stored_at)
            for e in events:
                if isinstance(e, ev.VerdictIssued):
                    self.holds.record(e)
            # mirrors first, state last: if a KV write fails the command is redelivered,
            # decided again from the old state (same event ids: deduplicated), mirrored again
            old = self.state
            if new_state.gear != old.gear:
                await self._mirror_gear(new_state)
            if new_state.emergency != old.emergency:
                await self._mirror_emergency(new_state)
            self.state = new_state
            self._decided(d.stream_seq)
            if (new_state.gear, new_state.emergency, new_state.stopped) != (old.gear, old.emergency, old.stopped):
                self._wake.set()
        for e in events:
            log.info("%s -> %s %s", subject, e.type_name(), getattr(e.data, "reason", "") or "")
        return None

    def _context(self, msg: Msg, d: Delivery) -> CommandContext:
        return CommandContext(d.stream_seq, d.subject, msg.data or b"", self.bus.source, self.settings.sandbox, ev.utcnow(), self.id_key)

    def _decided(self, seq: int) -> None:
        self.decided.add(seq)
        if len(self.decided) > 200_000:  # long-gone redeliveries: keep the newest half
            self.decided = set(sorted(self.decided)[100_000:])

    async def _give_up(self, msg: Msg, d: Delivery, exc: Exception, attempts: int) -> None:
        """A command that cannot be applied is rejected with the reason: never lost."""
        reason = f"could not be applied after {attempts} attempts ({type(exc).__name__}: {exc}): fix the cause and send it again"
        log.error("control seq %d (%s): %s", d.stream_seq, d.subject, reason)
        async with self._lock:
            # small on purpose: whatever made the command fail must not make its rejection fail
            await self.bus.publish_many([rejection(self._context(msg, d), reason[:4000], max_body=4096)], verify=True)
            self._decided(d.stream_seq)
        return None

    async def _mirror_gear(self, state: ControlState | None = None) -> None:
        s = state or self.state
        await gears.write_gear(self.bus, gears.GearState(gear=s.gear, since=s.gear_since, by=s.gear_by, event_id=s.gear_event_id))

    async def _mirror_emergency(self, state: ControlState | None = None) -> None:
        s = state or self.state
        await write_state(
            self.bus, EmergencyState(s.emergency, s.emergency_reason, s.emergency_by, s.emergency_since, s.emergency_event_id)
        )

    # ------------------------------------------------------------------ pulse / orient
    @property
    def heartbeat(self) -> float:
        return gears.spec(self.state.gear).heartbeat_s

    async def pulse(self) -> list[ev.IntentCreated]:
        self.pulses += 1
        created: list[ev.IntentCreated] = []
        caught_up = self.fossils.caught_up.is_set()
        named = await self.fossils.name() if caught_up else False
        self.ready = caught_up and named and self.control_caught_up
        if self.ready and not self.state.stopped and not self.state.emergency and not self.gate.engaged:
            async with self._lock:
                created = await self._orient()
        await self._liveness()
        return created

    async def _orient(self) -> list[ev.IntentCreated]:
        created = []
        for intent in orient(
            self.fossils.counts, self.trained, self.state.gear, self.config.train_threshold,
            source=self.bus.source, train_config=self.config.train_config,
            models=self.config.train_models, optimiser_config=self.config.optimiser_config,
        ):
            once = await self.bus.publish_once(intent)
            chosen = intent.data
            if once.status == "conflict" and isinstance(once.existing, ev.IntentCreated):
                chosen = once.existing.data  # another daemon created this generation first: adopt it
                log.warning("intent %s already exists with other content: adopted", chosen.intent_id)
            mark = mark_of(chosen)
            if mark is not None:
                self.trained[chosen.domain] = mark
            if once.status == "new":
                created.append(intent)
                self.intents_created += 1
                log.info("intent %s: %s", intent.data.intent_id, intent.data.reason)
        return created

    async def _liveness(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_liveness < self.config.liveness_min_interval:
            return
        self._last_liveness = now
        counts = self.fossils.counts
        pending = {d: c.total - (self.trained[d].fossils if d in self.trained else 0) for d, c in counts.items()}
        value = Liveness(
            source=self.bus.source, host=socket.gethostname(), pid=os.getpid(), started_at=self.started_at, at=ev.utcnow(),
            gear=self.state.gear, heartbeat_s=self.heartbeat, stopped=self.state.stopped,
            emergency=self.state.emergency or self.gate.engaged, pulses=self.pulses, ready=self.ready,
            pending=pending, held=len(self.holds.held), verifying=self.verifier is not None,
        )
        try:
            kv = await self.bus.kv("scf_state")
            await kv.put(KEY_DAEMON, msgspec.json.encode(value))
        except Exception as exc:  # noqa: BLE001 - liveness is best effort; the next pulse tries again
            log.warning("cannot write scf_state/%s: %s", KEY_DAEMON, exc)

    async def pulse_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            self._wake.clear()
            try:
                # with the server away a pulse waits on JetStream (the liveness write, an
                # intent's publish: 5 s each): the stop ends it
                await until_stopped(self.pulse(), stop)
            except Stopping:
                break
            except Exception as exc:  # noqa: BLE001 - a transient bus error must not end the daemon
                log.error("pulse failed: %s: %s", type(exc).__name__, exc)
            left = self.heartbeat - (time.monotonic() - t0)
            if left > 0:
                waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
                try:
                    await asyncio.wait(waiters, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waiters:
                        w.cancel()
            else:
                await asyncio.sleep(0)

    # ------------------------------------------------------------------ act: checkpoints
    async def on_checkpoint(self, event: ev.CheckpointProduced, d: Delivery) -> list[ev.Event]:
        assert self.verifier is not None
        c = event.data
        cfg = self.config.checkpoint
        # an alias has one head per (domain, model kind): the candidate faces, and replaces, its own kind's
        kind = await self.verifier.kind(event) if hasattr(self.verifier, "kind") else EBDM
        heads = await alias_heads(self.bus, c.domain, cfg.alias)
        production = heads.get(kind)
        if production is not None and production.checkpoint_id == c.checkpoint_id:
            log.info("checkpoint %s is already %s of %s (%s)", c.checkpoint_id, cfg.alias, c.domain, kind)
            return []
        verification = await self.verifier(event, production)
        out = decide_promotion(event, production, verification, cfg, source=self.bus.source, kind=kind, version=next_version(heads))
        # published here, not by the runner: a worker may publish into CHECKPOINTS, so a
        # duplicate ack is checked against the stream (an id taken first gets a fresh one)
        for e, p in zip(out, await self.bus.publish_many(out, verify=True)):
            log.info("checkpoint %s: %s%s", c.checkpoint_id, e.type_name(), f" (re-issued as {p.reissued.id})" if p.reissued else "")
        return []

    # ------------------------------------------------------------------ run
    def runners(self) -> list[Runner]:
        out = [Runner(self.bus, CONTROL_CONSUMER, self.on_control, decode=lambda m: m, batch=16, fetch_timeout=0.5)]
        if self.verifier is not None:
            codec = Codec([ev.CheckpointProduced])
            out.append(Runner(self.bus, CHECKPOINT_CONSUMER, self.on_checkpoint, decode=lambda m: codec.decode(m.data), pause=self.gate, batch=1))
        return out

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        await self.start(stop)
        try:
            if not self.started.is_set():
                return  # stopped while starting
            tasks = [asyncio.create_task(r.run(stop)) for r in self.runners()]
            tasks.append(asyncio.create_task(self.pulse_loop(stop)))
            done, pending = await asyncio.wait(tasks + [asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t in tasks and t.exception() is not None:
                    stop.set()
                    raise t.exception()  # type: ignore[misc]
            await asyncio.gather(*tasks)
        finally:
            await self.stop()


async def serve(bus: Bus, settings: Settings, config: DaemonSettings | None = None, stop: asyncio.Event | None = None) -> None:
    """`scf run daemon`: run until SIGTERM."""
    daemon = Daemon(bus, settings, config)
    await run_all(bus, [daemon.run], stop)


__all__ = [
    "Daemon", "DaemonSettings", "ControlState", "TRAIN_INTENT_PARAMS", "CommandContext", "SubjectRuling", "decide_control", "orient",
    "DomainCount", "TrainMark", "train_intent_id", "check_models", "rebuild_control", "read_trainings", "HoldsView", "FossilView", "serve",
    "Stopping", "until_stopped",
]
