"""The event catalog: every fact SCF records, as frozen, tagged msgspec Structs.

An event *is* its envelope: the shared envelope fields (id, v, at, source, correlation and
causation ids, optional signature) live on `Event`, the tag (`type`) names the event, and
`data` holds the typed payload of that type. On the wire it is plain JSON:

    {"type": "fossil.recorded", "id": "0192…", "v": 1, "at": "2026-11-22T10:00:00Z",
     "source": "ingest@mac", "correlation_id": null, "causation_id": null,
     "sig": null, "kid": null, "data": {...}}

Rules for changing this file (see docs/architecture.md, "Schema evolution"):
new fields get defaults; a field's type never changes; a breaking change bumps the class's
`v` default and registers an upcaster in `bus.codec` for the old version. Golden encoded
events under tests/golden are decoded in CI forever.

Bounded contexts, in the order of the loop: fossil, intent/code/state, verdict, job/work,
checkpoint, control/gear/daemon/emergency, deploy/energy, ledger, dlq.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal, Union

import msgspec

from scf.bus.ids import PUBLIC_IDS, Ids, content_id, new_id, subject_token

Gear = Literal["STANDARD", "ACCELERATED", "HYPER", "SINGULARITY"]
GEARS: tuple[str, ...] = ("STANDARD", "ACCELERATED", "HYPER", "SINGULARITY")
Decision = Literal["APPROVE", "REJECT", "HOLD"]
# Scalar parameter values: what travels in `params` / `config` maps. Never nested dicts.
Scalar = Union[str, int, float, bool, None]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Payload(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every payload (the `data` of an event)."""


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """The envelope. Subclasses set `tag=` (the type) and declare `data`."""

    id: str
    v: int = 1
    at: dt.datetime
    source: str
    correlation_id: str | None = None
    causation_id: str | None = None
    sig: str | None = None  # base64 Ed25519 signature over bus.codec.canonical_bytes
    kid: str | None = None  # key id of the signer

    # Which stream the subject lands in is declared in bus.streams; each type knows its subject.
    def subject(self) -> str:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    @classmethod
    def type_name(cls) -> str:
        return cls.__struct_config__.tag  # type: ignore[return-value]

    @classmethod
    def new(
        cls,
        data: Payload,
        *,
        source: str,
        cause: "Event | None" = None,
        id: str | None = None,
        at: dt.datetime | None = None,
        ids: Ids = PUBLIC_IDS,
    ):
        """Build an event. With `cause`, correlation/causation ids follow the cause, and the
        id (unless given) is derived from the cause's id and this type, so a redelivered
        cause yields the same event id (and JetStream drops the duplicate). Services pass
        `ids=bus.ids`: the derivation is then keyed with the deployment's id key, so nobody
        without it can compute (and pre-empt) the id."""
        if id is None:
            id = ids.derive(cause.id, cls.type_name(), _payload_key(data)) if cause else new_id()
        return cls(
            id=id,
            at=at or utcnow(),
            source=source,
            correlation_id=(cause.correlation_id or cause.id) if cause else None,
            causation_id=cause.id if cause else None,
            data=data,  # type: ignore[call-arg]
        )


def _payload_key(data: Payload) -> str:
    """The part of a payload that distinguishes several effects of one cause."""
    for name in (
        "transfer_id", "verdict_id", "proposal_id", "measurement_id", "request_id",
        "job_id", "deployment_id", "intent_id", "checkpoint_id", "node",
    ):
        value = getattr(data, name, None)
        if value:
            return f"{name}={value}"
    return ""


# --------------------------------------------------------------------------- fossil


class Provenance(Payload, frozen=True):
    source: str  # where the observation came from: a meter, a simulator, a shard
    verifier: str  # the check that was run on it
    verified: bool  # its result
    detail: str = ""


class FossilContent(Payload, frozen=True):
    """A fossil without its id: what the content id is computed over."""

    domain: str  # e.g. "grid:case14", "hvac:office3"
    context: list[float]  # the domain's context vector (loads, weather, occupancy …)
    state: list[float]  # the domain's state vector (dispatch, setpoints …)
    energy: float  # measured energy / cost of `state` in `context`, in the domain's unit
    observed_at: dt.datetime
    provenance: Provenance


class Fossil(FossilContent, frozen=True):
    fossil_id: str  # "sha256:" over msgspec.json.encode(FossilContent(...))

    def content(self) -> FossilContent:
        return FossilContent(
            domain=self.domain,
            context=self.context,
            state=self.state,
            energy=self.energy,
            observed_at=self.observed_at,
            provenance=self.provenance,
        )


def fossil_content_id(content: FossilContent) -> str:
    if type(content) is not FossilContent:
        content = content.content()  # type: ignore[attr-defined]
    return content_id(msgspec.json.encode(content))


def domain_token(domain: str) -> str:
    return subject_token(domain)


class FossilRecorded(Event, tag="fossil.recorded", frozen=True, kw_only=True):
    data: Fossil

    def subject(self) -> str:
        # One subject per fossil: published with expected-last-subject-sequence 0, a fossil
        # is recorded once, ever, whatever the dedup window.
        return f"fossil.recorded.{domain_token(self.data.domain)}.{self.data.fossil_id.removeprefix('sha256:')}"


class FossilRejection(Payload, frozen=True):
    shard: str
    line: int
    reason: str
    raw: str  # the line as read (truncated to 64 KiB)
    fossil_id: str | None = None


class FossilRejected(Event, tag="fossil.rejected", frozen=True, kw_only=True):
    data: FossilRejection

    def subject(self) -> str:
        return "fossil.rejected"


# --------------------------------------------------------------------------- intent / code / state


class Intent(Payload, frozen=True):
    intent_id: str
    kind: str  # train | optimise | deploy | promote | codegen (unknown kinds are denied by safety)
    domain: str
    params: dict[str, Scalar] = {}
    reason: str = ""
    gear: str = "STANDARD"
    hypothesis: int = 0  # index among the gear's parallel hypotheses


class IntentCreated(Event, tag="intent.created", frozen=True, kw_only=True):
    data: Intent

    def subject(self) -> str:
        # Per intent: created once, ever (publish_once), and found by id with a direct get.
        return f"intent.created.{subject_token(self.data.kind)}.{subject_token(self.data.intent_id)}"


class CodeProposal(Payload, frozen=True):
    proposal_id: str
    intent_id: str
    code: str
    language: str = "python"
    generator: str = ""  # which model or tool wrote it
    prompt: str = ""  # the context it was written from
    domain: str = ""  # the domain the code controls: the safety gate scores it there in its sandbox ("" = static gate only)
    # GenN's identity (docs/codegen.md): backend, model and its weights' sha256, sampling
    backend: str = ""  # search | http | local | smollm2
    model: str = ""
    model_sha256: str = ""
    sampling: dict[str, Scalar] = {}
    error: str = ""  # a malformed answer: why (the raw answer is the code); the gate rejects it


class CodeProposed(Event, tag="code.proposed", frozen=True, kw_only=True):
    data: CodeProposal

    def subject(self) -> str:
        return "code.proposed"


class StateProposal(Payload, frozen=True):
    """A proposed physical state (a configuration) to be checked against its domain."""

    proposal_id: str
    domain: str
    context: list[float]
    state: list[float]
    intent_id: str | None = None
    previous_state: list[float] | None = None  # for ramp-rate checks


class StateProposed(Event, tag="state.proposed", frozen=True, kw_only=True):
    data: StateProposal

    def subject(self) -> str:
        return f"state.proposed.{domain_token(self.data.domain)}"


# --------------------------------------------------------------------------- verdict


SubjectType = Literal["intent", "code", "state", "checkpoint", "deployment"]


class Verdict(Payload, frozen=True):
    verdict_id: str
    subject_id: str  # the id of what was ruled on (intent_id, proposal_id, …)
    subject_type: str  # intent | code | state | checkpoint | deployment
    decision: Decision
    gate: str  # regulator | ethics | physics | gear | human | emergency
    reasons: list[str] = []
    final: bool = True  # HOLD is never final; a human's ruling always is
    by: str = "safety"
    kind: str = ""  # the intent kind, where the subject is an intent
    domain: str = ""
    scores: dict[str, float] = {}  # code: what the sandbox measured (docs/codegen.md); empty otherwise


class VerdictIssued(Event, tag="verdict.issued", frozen=True, kw_only=True):
    data: Verdict

    def subject(self) -> str:
        return f"verdict.{subject_token(self.data.subject_type)}.{self.data.decision.lower()}"


# --------------------------------------------------------------------------- jobs


class DataSelection(Payload, frozen=True):
    domain: str
    stream: str = "FOSSILS"
    subject: str = ""  # subject filter; "" means all fossils of the domain
    start_seq: int = 1
    end_seq: int = 0  # inclusive; 0 means "up to the last at dispatch time"
    count: int = 0  # fossils in the selection when dispatched


class JobSpec(Payload, frozen=True):
    job_id: str
    intent_id: str
    domain: str
    pool: str
    config: dict[str, Scalar] = {}
    config_hash: str = ""
    data: DataSelection | None = None
    max_attempts: int = 3


class WorkItem(Event, tag="work.item", frozen=True, kw_only=True):
    """A job on the work-queue stream (JOBS) that one worker of the pool takes."""

    data: JobSpec

    def subject(self) -> str:
        return f"work.{subject_token(self.data.pool)}"


class JobDispatched(Event, tag="job.dispatched", frozen=True, kw_only=True):
    data: JobSpec

    def subject(self) -> str:
        return f"job.dispatched.{self.data.job_id}"


class JobStart(Payload, frozen=True):
    job_id: str
    worker: str
    device: str = "cpu"
    attempt: int = 1


class JobStarted(Event, tag="job.started", frozen=True, kw_only=True):
    data: JobStart

    def subject(self) -> str:
        return f"job.started.{self.data.job_id}"


class JobProgressData(Payload, frozen=True):
    job_id: str
    step: int
    total_steps: int
    loss: float
    samples_per_s: float = 0.0
    worker: str = ""


class JobProgress(Event, tag="job.progress", frozen=True, kw_only=True):
    data: JobProgressData

    def subject(self) -> str:
        return f"job.progress.{self.data.job_id}"


class JobCompletion(Payload, frozen=True):
    job_id: str
    checkpoint_id: str
    duration_s: float
    metrics: dict[str, float] = {}
    worker: str = ""


class JobCompleted(Event, tag="job.completed", frozen=True, kw_only=True):
    data: JobCompletion

    def subject(self) -> str:
        return f"job.completed.{self.data.job_id}"


class JobFailure(Payload, frozen=True):
    job_id: str
    error: str
    attempt: int = 1
    final: bool = False  # True when no attempt is left (the job went to the DLQ)
    worker: str = ""


class JobFailed(Event, tag="job.failed", frozen=True, kw_only=True):
    data: JobFailure

    def subject(self) -> str:
        return f"job.failed.{self.data.job_id}"


# --------------------------------------------------------------------------- checkpoints


class CheckpointInfo(Payload, frozen=True):
    checkpoint_id: str
    job_id: str
    domain: str
    uri: str  # artifact store uri: "obj://BUCKET/NAME" or "file:///…"
    sha256: str
    size: int
    metrics: dict[str, float] = {}
    config_hash: str = ""


class CheckpointProduced(Event, tag="checkpoint.produced", frozen=True, kw_only=True):
    data: CheckpointInfo

    def subject(self) -> str:
        return f"checkpoint.produced.{domain_token(self.data.domain)}"


class CheckpointVerification(Payload, frozen=True):
    checkpoint_id: str
    domain: str
    metrics: dict[str, float] = {}
    baseline_checkpoint_id: str | None = None
    baseline_metrics: dict[str, float] = {}
    margin: float = 0.0


class CheckpointVerified(Event, tag="checkpoint.verified", frozen=True, kw_only=True):
    data: CheckpointVerification

    def subject(self) -> str:
        return f"checkpoint.verified.{domain_token(self.data.domain)}"


class CheckpointRejection(Payload, frozen=True):
    checkpoint_id: str
    domain: str
    reasons: list[str]
    metrics: dict[str, float] = {}  # what the verifier measured, when it got that far
    baseline_checkpoint_id: str | None = None
    baseline_metrics: dict[str, float] = {}  # the baseline's on the same held-out fossils


class CheckpointRejected(Event, tag="checkpoint.rejected", frozen=True, kw_only=True):
    data: CheckpointRejection

    def subject(self) -> str:
        return f"checkpoint.rejected.{domain_token(self.data.domain)}"


class Promotion(Payload, frozen=True):
    checkpoint_id: str
    domain: str
    alias: str  # "production", "staging", …
    version: int  # increases by one per (domain, alias), whatever the kind
    uri: str
    sha256: str
    size: int = 0
    previous_checkpoint_id: str | None = None  # the head of the same (domain, kind, alias) before it
    # what kind of model (producers/verify.py: "ebdm", "optimiser", "code"): an alias has one head per
    # (domain, kind); "" (events before 2026-12-02) is an EBDM's, a code model's in domain `genn`
    kind: str = ""


class CheckpointPromoted(Event, tag="checkpoint.promoted", frozen=True, kw_only=True):
    data: Promotion

    def subject(self) -> str:
        return f"checkpoint.promoted.{domain_token(self.data.domain)}"


# --------------------------------------------------------------------------- control plane
# Commands arrive as plain JSON on control.<verb> (see bus.control); these are the events
# that record what a command changed, or why it was refused.


class ControlRejection(Payload, frozen=True):
    command_subject: str
    body: str  # the command as sent (truncated to 64 KiB)
    reason: str
    command_seq: int = 0  # its sequence in the CONTROL stream


class ControlRejected(Event, tag="control.rejected", frozen=True, kw_only=True):
    data: ControlRejection

    def subject(self) -> str:
        return "control.rejected"


class GearChangeV1(Payload, frozen=True):
    """gear.changed v1 (before 0.1): the gear as a level number 1–4. Upcast to v2."""

    level: int
    by: str = ""


class GearChange(Payload, frozen=True):
    from_gear: str | None
    to_gear: Gear
    by: str = ""
    reason: str = ""


class GearChanged(Event, tag="gear.changed", frozen=True, kw_only=True):
    v: int = 2
    data: GearChange

    def subject(self) -> str:
        return "gear.changed"


class Actor(Payload, frozen=True):
    by: str = ""
    reason: str = ""


class DaemonStopped(Event, tag="daemon.stopped", frozen=True, kw_only=True):
    data: Actor

    def subject(self) -> str:
        return "gear.daemon.stopped"


class DaemonResumed(Event, tag="daemon.resumed", frozen=True, kw_only=True):
    data: Actor

    def subject(self) -> str:
        return "gear.daemon.resumed"


class EmergencyChange(Payload, frozen=True):
    by: str = ""
    reason: str = ""
    origin: str = "control"  # control | lock_file


class EmergencyEngaged(Event, tag="emergency.engaged", frozen=True, kw_only=True):
    data: EmergencyChange

    def subject(self) -> str:
        return "emergency.engaged"


class EmergencyReleased(Event, tag="emergency.released", frozen=True, kw_only=True):
    data: EmergencyChange

    def subject(self) -> str:
        return "emergency.released"


# --------------------------------------------------------------------------- deploy / energy


class Artifact(Payload, frozen=True):
    checkpoint_id: str
    domain: str
    version: int
    uri: str
    sha256: str
    size: int = 0


class DeployRequest(Payload, frozen=True):
    deployment_id: str
    plan_id: str
    node: str
    artifact: Artifact
    strategy: Literal["all", "canary"] = "all"
    wave: int = 0  # 0: the canary (or everyone, for "all"); 1: the rest after the canary
    # The signed checkpoint.promoted event (raw bytes) this order deploys: the edge agent
    # verifies the release signature on these bytes before it activates anything.
    release: bytes = b""


class DeployRequested(Event, tag="deploy.requested", frozen=True, kw_only=True):
    data: DeployRequest

    def subject(self) -> str:
        return f"deploy.requested.{subject_token(self.data.node)}"


class Activation(Payload, frozen=True):
    deployment_id: str
    plan_id: str
    node: str
    checkpoint_id: str
    version: int


class DeployActivated(Event, tag="deploy.activated", frozen=True, kw_only=True):
    data: Activation

    def subject(self) -> str:
        return f"deploy.activated.{subject_token(self.data.node)}"


class DeployFailure(Payload, frozen=True):
    deployment_id: str
    plan_id: str
    node: str
    checkpoint_id: str
    reason: str
    running_checkpoint_id: str | None = None  # what the node runs after the failure


class DeployFailed(Event, tag="deploy.failed", frozen=True, kw_only=True):
    data: DeployFailure

    def subject(self) -> str:
        return f"deploy.failed.{subject_token(self.data.node)}"


class Rollback(Payload, frozen=True):
    node: str
    from_checkpoint_id: str | None
    to_checkpoint_id: str
    reason: str = ""
    deployment_id: str | None = None


class DeployRolledBack(Event, tag="deploy.rolled_back", frozen=True, kw_only=True):
    data: Rollback

    def subject(self) -> str:
        return f"deploy.rolled_back.{subject_token(self.data.node)}"


class RollbackRequest(Payload, frozen=True):
    """A verified `control.rollback`, addressed to one node (edge nodes read only deploy.>)."""

    request_id: str  # derived from the control command (its CONTROL sequence)
    node: str
    to: str | None = None  # checkpoint id or version number; None: the previous artifact
    reason: str = ""
    by: str = ""
    signer: str | None = None  # the trusted operator key that signed the command, if any
    command_seq: int = 0


class DeployRollbackRequested(Event, tag="deploy.rollback_requested", frozen=True, kw_only=True):
    data: RollbackRequest

    def subject(self) -> str:
        return f"deploy.rollback_requested.{subject_token(self.data.node)}"


class Calibration(Payload, frozen=True):
    """How well the baseline model reproduces the site's measured history (IPMVP Option D,
    ASHRAE Guideline 14 figures as fractions: 0.12 = 12 %; docs/mv.md)."""

    interval: str  # "hourly" | "monthly": which Guideline 14 criterion applies
    points: int  # measured intervals compared
    cv_rmse: float
    nmbe: float  # signed
    model: str = ""  # what was calibrated, against what
    parameters: dict[str, float] | None = None  # the fitted factors, by name


class Measurement(Payload, frozen=True):
    measurement_id: str
    node: str
    deployment_id: str | None
    period_start: dt.datetime
    period_end: dt.datetime
    baseline_kwh: float
    actual_kwh: float
    method: str  # e.g. "metered-vs-baseline", "ipmvp-option-b"
    domain: str = ""
    meter: str = ""  # which of the node's meters ("" = its main meter); part of the cause
    # M&V (docs/mv.md): the calibration of the baseline model and the saving's uncertainty
    # (the half-width of its interval at `confidence`, kWh); None when not stated.
    calibration: Calibration | None = None
    uncertainty_kwh: float | None = None
    confidence: float = 0.0
    # What baseline_kwh and actual_kwh are kWh of: "kwh-electric" (electricity at the site's
    # meter) or "kwh-fuel" (fuel burned, thermal input); "" = the unit `[ledger] meter_units`
    # gives the meter (docs/ledger.md, "Units"). The ledger mints each unit as its own instrument.
    unit: str = ""

    @property
    def saved_kwh(self) -> float:
        return self.baseline_kwh - self.actual_kwh


class EnergyMeasured(Event, tag="energy.measured", frozen=True, kw_only=True):
    data: Measurement

    def subject(self) -> str:
        return f"energy.measured.{subject_token(self.data.node)}"


# --------------------------------------------------------------------------- ledger


class Transfer(Payload, frozen=True):
    transfer_id: str  # derived from the cause: one transfer per cause, ever
    cause_id: str  # the measurement id
    debit_account: str
    credit_account: str
    micro_credits: int  # amount in millionths of a credit: integers keep the books exact
    kwh: float
    rate: float  # credits per kWh
    cause_digest: str = ""  # sha256 of the measurement: tells a true repeat from a changed one
    # The normalised cause (consumers/energy.py): what `scf ledger verify` re-derives the
    # cause id from and checks for overlapping periods. Empty/0 on transfers minted before.
    node: str = ""
    meter: str = ""
    period_start_us: int = 0  # UTC microseconds since the epoch, half-open [start, end)
    period_end_us: int = 0
    # The instrument: what `kwh` is kWh of ("kwh-electric", "kwh-fuel"); credits of different
    # units are never added together (docs/ledger.md, "Units"). "" on transfers minted before.
    unit: str = ""


class LedgerTransfer(Event, tag="ledger.transfer", frozen=True, kw_only=True):
    data: Transfer

    def subject(self) -> str:
        return f"ledger.transfer.{self.data.transfer_id}"


class LedgerRejection(Payload, frozen=True):
    cause_id: str
    reason: str


class LedgerRejected(Event, tag="ledger.rejected", frozen=True, kw_only=True):
    data: LedgerRejection

    def subject(self) -> str:
        return f"ledger.rejected.{subject_token(self.data.cause_id)}"


# --------------------------------------------------------------------------- dead letters


class DeadLetter(Payload, frozen=True):
    stream: str
    consumer: str
    subject: str
    seq: int
    deliveries: int
    error: str
    headers: dict[str, str] = {}
    payload: bytes = b""  # the original message body (base64 in JSON), cut when it does not fit
    digest: str = ""  # "sha256:<hex>" of the whole original body
    size: int = 0  # bytes in the whole original body
    truncated: bool = False  # payload holds only the first bytes (the entry must fit max_payload)


class DeadLettered(Event, tag="dlq.message", frozen=True, kw_only=True):
    data: DeadLetter

    def subject(self) -> str:
        return f"dlq.{subject_token(self.data.consumer)}"


# --------------------------------------------------------------------------- proofs


class LateRows(Payload, frozen=True):
    """Rows of `stream` with sequences in (after, upto] that the transparency log placed at
    time `t` (µs): they reached the archive below the log's watermark (docs/proofs.md)."""

    stream: str
    after: int
    upto: int
    t: int


class LogCheckpoint(Payload, frozen=True):
    """A signed checkpoint of the transparency log over the archived events."""

    origin: str  # the log's name: the checkpoint's first line and its key's name
    size: int  # leaves (archived events) in the tree
    root: str  # base64 RFC 9162 root hash
    note: str  # the C2SP signed note (tlog-checkpoint body, blank line, signature line)
    verifier_key: str  # the note key that signed it: NAME+HASH+BASE64 (pin it to verify offline)
    late: list[LateRows] = []  # every late range so far: a rebuild from the archive needs them


class ProofCheckpoint(Event, tag="proof.checkpoint", frozen=True, kw_only=True):
    data: LogCheckpoint

    def subject(self) -> str:
        return f"proof.checkpoint.{subject_token(self.data.origin)}.{self.data.size}"


class ReleaseRecord(Payload, frozen=True):
    """A weekly release (projections/release.py), recorded so the transparency log covers it."""

    week: str  # "week-YYYY-MM-DD"
    envelope_sha256: str  # sha256 of its provenance.dsse.json
    domains: list[str] = []
    kid: str = ""  # the release key's id


class ReleaseLogged(Event, tag="proof.release", frozen=True, kw_only=True):
    data: ReleaseRecord

    def subject(self) -> str:
        return f"proof.release.{subject_token(self.data.week)}"


# --------------------------------------------------------------------------- contracts / strikes


class ContractSpec(Payload, frozen=True):
    """A client contract (docs/value-loop.md): who, where, what the optimiser must respect.
    `constraints` is the field engineer's JSON (loads or a load profile, outages, derates,
    comfort bands, budgets, objectives), validated by `scf.producers.contracts` at the
    boundary and carried here as canonical JSON text (its sha256 is an input hash)."""

    contract_id: str
    client: str
    domain: str
    nodes: list[str] = []  # the edge nodes (sites) that run its capsules
    constraints: str = "{}"  # canonical JSON (sorted keys)
    schedule_s: float = 86_400.0  # the regiment strikes it again this often (0: only on new data or a new model)
    status: Literal["active", "paused", "ended"] = "active"
    by: str = ""
    reason: str = ""


class ContractRegistered(Event, tag="contract.registered", frozen=True, kw_only=True):
    data: ContractSpec

    def subject(self) -> str:
        return f"contract.registered.{subject_token(self.data.contract_id)}"


class ContractUpdated(Event, tag="contract.updated", frozen=True, kw_only=True):
    data: ContractSpec

    def subject(self) -> str:
        return f"contract.updated.{subject_token(self.data.contract_id)}"


class ContractEnded(Event, tag="contract.ended", frozen=True, kw_only=True):
    data: ContractSpec

    def subject(self) -> str:
        return f"contract.ended.{subject_token(self.data.contract_id)}"


class StrikeRecord(Payload, frozen=True):
    """One strike of the loop (producers/strike.py): its activity id (a function of the
    contract and its inputs), how far it got and the signed proof's digest."""

    activity_id: str
    contract_id: str
    domain: str
    status: str  # "awaiting-approval" | "deployed" | "measured" | "rejected" | "failed"
    inputs_sha256: str = ""
    capsule_id: str = ""
    proof_sha256: str = ""
    detail: str = ""


class StrikeCompleted(Event, tag="strike.completed", frozen=True, kw_only=True):
    data: StrikeRecord

    def subject(self) -> str:
        return f"strike.completed.{subject_token(self.data.activity_id)}"


# --------------------------------------------------------------------------- the catalog

ALL_EVENTS: tuple[type[Event], ...] = (
    FossilRecorded,
    FossilRejected,
    IntentCreated,
    CodeProposed,
    StateProposed,
    VerdictIssued,
    WorkItem,
    JobDispatched,
    JobStarted,
    JobProgress,
    JobCompleted,
    JobFailed,
    CheckpointProduced,
    CheckpointVerified,
    CheckpointRejected,
    CheckpointPromoted,
    ControlRejected,
    GearChanged,
    DaemonStopped,
    DaemonResumed,
    EmergencyEngaged,
    EmergencyReleased,
    DeployRequested,
    DeployActivated,
    DeployFailed,
    DeployRolledBack,
    DeployRollbackRequested,
    EnergyMeasured,
    LedgerTransfer,
    LedgerRejected,
    DeadLettered,
    ProofCheckpoint,
    ReleaseLogged,
    ContractRegistered,
    ContractUpdated,
    ContractEnded,
    StrikeCompleted,
)

EVENT_TYPES: dict[str, type[Event]] = {cls.type_name(): cls for cls in ALL_EVENTS}

AnyEvent = Union[tuple(ALL_EVENTS)]  # type: ignore[valid-type]

# Payload classes of older versions, by (type, version): kept so golden files of old
# versions keep decoding; bus.codec upcasts them.
LEGACY_PAYLOADS: dict[tuple[str, int], type[Payload]] = {("gear.changed", 1): GearChangeV1}
