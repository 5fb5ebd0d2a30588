"""The strike loop: one contract from its constraints to a deployed, measured capsule and a
signed JSON proof (docs/value-loop.md).

    map        the contract's constraints → one optimisation problem per hour
    optimise   exact (HiGHS) or learned decisions, each with its duality certificate
    verify     the safety gate's physical checks offline (`compliance.check_state`, the
               running gate's own `rule_state`), then `state.proposed` on the log and the
               running gate's verdicts awaited
    deploy     a signed capsule (producers/capsule.py) promoted under the release key and
               a deploy intent for the contract's nodes: the gate rules on it (a human
               approves at STANDARD and ACCELERATED), the planner orders it, the edge
               agents verify it before they activate it
    measure    "sim": the capsule run by the edge control loop on the simulated site in
               this process (runtime monitor and M&V as on a node; not minted); "live":
               the nodes' `energy.measured` for these deployments; "none"
    report     the proof: inputs' hashes, the decision and its certificates, every event
               (stream, sequence, id, sha256 of the stored bytes), the M&V figures,
               signed with the release key; `strike.completed` on CONTRACTS

The activity id is a function of the contract's content and the model: the same contract
and inputs give the same id, the same capsule, the same promotion and intent (the log
keeps one of each) and the same orders, so re-running resumes a strike and never deploys
twice. A strike held for a human returns status "awaiting-approval"; run it again once
approved (the regiment does, every heartbeat).
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import json
import logging
import math
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from scf.bus import codec as codec_mod
from scf.bus import events as ev
from scf.bus.codec import Codec
from scf.bus.errors import SCFError
from scf.bus.ids import derived_id, subject_token
from scf.bus.reader import StreamReader, read
from scf.producers import capsule as cap
from scf.producers import contracts as contracts_mod

log = logging.getLogger("scf.strike")
_TIMINGS: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("strike_timings", default=None)


_VERSION_LOCKS: dict[str, asyncio.Lock] = {}


def _mark(phase: str) -> None:
    """Charge the time since the last mark to `phase` (this task's strike)."""
    t = _TIMINGS.get()
    if t is not None:
        now = time.perf_counter()
        t[phase] = t.get(phase, 0.0) + now - t.pop("_last", now)
        t["_last"] = now

PROOF_KIND = "scf.strike.proof/v1"
UNSIGNED = ("signature", "log", "log_verifier_key")  # the log's bundle is covered by its own signed note
MEASURE_MODES = ("sim", "live", "none")


class StrikeError(SCFError):
    """A strike that cannot run: the message names the problem and the fix."""


@dataclass(frozen=True)
class StrikeOptions:
    method: str = "exact"  # exact | learned | auto (scf.producers.optimize)
    checkpoint: Path | None = None  # the learned optimiser's checkpoint
    model: str = ""  # the production model's id: part of the inputs (a new model, a new strike)
    measure: str = "sim"  # sim | live | none
    wait_s: float = 60.0  # how long to wait for each of verdicts, activation, measurement
    sim_hours: float = 72.0  # the simulated run: status quo for `history_hours`, then the capsule
    history_hours: float = 24.0
    period: int = 0  # the contract's schedule period (floor(now / schedule_s)): a new period, a new strike
    decision_override: Any = None  # tests and drills: deploy this decision instead (the monitor's breach drill)


@dataclass
class StrikeResult:
    activity_id: str
    status: str  # awaiting-approval | deployed | measured | reverted (the runtime monitor) | rejected | failed
    detail: str = ""
    proof_path: Path | None = None
    proof: dict | None = None
    intent_id: str = ""
    resumed: bool = False
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase (benchmarks/bench_regiment.py)


# --------------------------------------------------------------------------- inputs and ids


def inputs_of(spec: ev.ContractSpec, opts: StrikeOptions) -> dict:
    """What the strike decides from: the contract's content, the method and model, the
    schedule period. How it is measured is not an input (a strike measured live and the
    same one measured in simulation deploy the same capsule)."""
    return {
        "contract_sha256": contracts_mod.spec_sha256(spec),
        "constraints_sha256": hashlib.sha256(spec.constraints.encode()).hexdigest(),
        "method": opts.method,
        "model": opts.model or ("highs" if opts.method == "exact" else str(opts.checkpoint or "")),
        "period": opts.period,
        "decision_override": None if opts.decision_override is None else hashlib.sha256(
            np.asarray(opts.decision_override, dtype=np.float32).tobytes()).hexdigest(),
    }


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj)).hexdigest()


def period_of(spec: ev.ContractSpec, now: float) -> int:
    """Which schedule period `now` (unix seconds) falls in (0 when the contract has no schedule)."""
    return int(now // spec.schedule_s) if spec.schedule_s > 0 else 0


async def production_model(bus, domain: str) -> str:
    """The checkpoint id promoted to production for `domain` last ("" when none): part of a
    strike's inputs, so a newly promoted model makes every contract of its domain due."""
    try:
        msg = await bus.js.get_last_msg("CHECKPOINTS", f"checkpoint.promoted.{ev.domain_token(domain)}")
    except Exception:  # noqa: BLE001 - none yet
        return ""
    found = ""
    for m in await read(bus, "CHECKPOINTS", f"checkpoint.promoted.{ev.domain_token(domain)}", end_seq=msg.seq):
        try:
            p = Codec([ev.CheckpointPromoted]).decode(m.data)
        except Exception:  # noqa: BLE001
            continue
        if p.data.alias == "production":
            found = p.data.checkpoint_id
    return found


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def activity_id_for(contract_id: str, inputs_sha256: str) -> str:
    return derived_id("strike", contract_id, inputs_sha256)


def capsule_id_of(contract_id: str, activity_id: str) -> str:
    return f"capsule-{contract_id}-{activity_id[:8]}"


def intent_id_of(contract_id: str, activity_id: str) -> str:
    """The deploy intent a strike creates (the planner's id for its capsule's promotion)."""
    from scf.consumers.deploy import intent_id_for

    return intent_id_for(capsule_id_of(contract_id, activity_id), cap.ALIAS)


# --------------------------------------------------------------------------- map and optimise


@dataclass
class Solved:
    hours: list[int]
    contexts: np.ndarray
    states: np.ndarray
    state_names: list[str]
    certificates: list[dict]
    cost: float
    lower_bound: float
    rel_gap: float
    method: str
    model_id: str


def solve(spec: ev.ContractSpec, opts: StrikeOptions) -> Solved:
    """Map the contract to its problems and optimise them (raises StrikeError when a
    problem has no feasible decision)."""
    from scf.producers import optimize as opt

    c = contracts_mod.parse_constraints(spec.domain, spec.constraints)
    target = opt.target(domain=spec.domain)
    hours = contracts_mod.hours(c)
    problems = [opt.problem(target, contracts_mod.problem_spec(target, c, h)) for h in hours]
    try:
        decisions = opt.optimize(problems, method=opts.method, checkpoint=opts.checkpoint)
    except opt.OptimizeError as exc:
        raise StrikeError(f"contract {spec.contract_id}: {exc}") from None
    certs, states = [], []
    for h, d in zip(hours, decisions):
        if d.state is None or d.certificate is None or d.status == "infeasible":
            raise StrikeError(f"contract {spec.contract_id}, hour {h}: no feasible decision ({d.message}); relax its constraints")
        states.append(np.asarray(d.state, float))
        certs.append({"hour": h, "cost": float(d.cost), "lower_bound": float(d.certificate.lower_bound),
                      "gap": float(d.certificate.gap), "rel_gap": float(d.certificate.rel_gap), "dual_source": d.certificate.source,
                      "status": d.status})
    return Solved(
        hours=hours,
        contexts=np.array([p.context for p in problems], float),
        states=np.array(states),
        state_names=list(target.state_names),
        certificates=certs,
        cost=float(sum(x["cost"] for x in certs)),
        lower_bound=float(sum(x["lower_bound"] for x in certs)),
        rel_gap=float(max(x["rel_gap"] for x in certs)),
        method=decisions[0].method,
        model_id=(opts.model if decisions[0].method == "learned" and opts.model else decisions[0].model_id) or "highs",  # id + sha256
    )


# --------------------------------------------------------------------------- the log


@dataclass
class Recorded:
    """Every event the proof names, with where the log stores it."""

    items: list[dict] = field(default_factory=list)

    def add(self, role: str, stream: str, seq: int, event_id: str, type_: str, subject: str, raw: bytes) -> None:
        self.items.append({"role": role, "stream": stream, "seq": int(seq), "id": event_id, "type": type_, "subject": subject,
                           "sha256": hashlib.sha256(raw).hexdigest()})


async def _stored(bus, stream: str, seq: int) -> bytes:
    msg = await bus.js.get_msg(stream, seq)
    return bytes(msg.data)


async def await_events(bus, stream: str, subjects, types, pick: Callable[[ev.Event], bool], *, want: int, timeout: float,
                       codec: Codec | None = None) -> list[tuple[int, ev.Event, bytes, str]]:
    """The first `want` events on `stream`/`subjects` that `pick` accepts (from the start of
    the stream, then live), or fewer when `timeout` passes first."""
    codec = codec or Codec(types)
    found: list[tuple[int, ev.Event, bytes, str]] = []
    stop = asyncio.Event()

    def on(m) -> None:
        try:
            e = codec.decode(m.data)
        except Exception:  # noqa: BLE001 - not ours (or forged): skipped
            return
        if pick(e):
            found.append((m.seq, e, bytes(m.data), m.subject))
            if len(found) >= want:
                stop.set()

    reader = StreamReader(bus.nc, bus.js, stream, subjects)
    try:
        await asyncio.wait_for(reader.follow(on, stop), timeout)
    except asyncio.TimeoutError:
        pass
    return found[:want] if len(found) >= want else found


@dataclass
class _Versions:
    highest: int = 0
    known: dict[str, int] = field(default_factory=dict)  # capsule id -> its version
    last_seq: int = 0  # CHECKPOINTS read up to here


_VERSIONS: "weakref.WeakKeyDictionary[Any, dict[str, _Versions]]" = weakref.WeakKeyDictionary()


async def next_capsule_version(bus, domain: str, capsule_id: str) -> int:
    """The version this capsule is promoted under: its own when promoted before (a resumed
    strike), else one above every promotion of the domain, capsule or model (an edge agent
    refuses to go down). The domain's promotions are read once per connection and then
    only what is new (a regiment pass over N contracts reads each promotion once)."""
    v = _VERSIONS.setdefault(bus, {}).setdefault(domain, _Versions())
    codec = Codec([ev.CheckpointPromoted])
    for m in await read(bus, "CHECKPOINTS", f"checkpoint.promoted.{ev.domain_token(domain)}", start_seq=v.last_seq + 1):
        v.last_seq = max(v.last_seq, m.seq)
        try:
            p = codec.decode(m.data)
        except Exception:  # noqa: BLE001
            continue
        v.known.setdefault(p.data.checkpoint_id, p.data.version)
        v.highest = max(v.highest, p.data.version)
    return v.known.get(capsule_id) or v.highest + 1


async def completed(bus, activity_id: str, trust) -> tuple[int, ev.StrikeCompleted, bytes] | None:
    """The strike's `strike.completed`, when the release key signed one."""
    try:
        msg = await bus.js.get_last_msg("CONTRACTS", f"strike.completed.{subject_token(activity_id)}")
    except Exception:  # noqa: BLE001 - none yet
        return None
    try:
        e = Codec([ev.StrikeCompleted], trust=trust, require_signature=True, role="release").decode(msg.data)
    except SCFError as exc:
        log.warning("strike.completed for %s is not signed by a release key (%s): ignored", activity_id, exc)
        return None
    return msg.seq, e, bytes(msg.data)  # type: ignore[return-value]


async def publish_signed(bus, event: ev.Event, key) -> tuple[int, bytes]:
    from scf.bus.client import Bus

    raw = codec_mod.sign(event, key)
    ack = await bus.js.publish(event.subject(), raw, headers=Bus.headers(event))
    if ack.duplicate:  # published before (a resumed strike): the ack names the original, the log's copy is the record
        return ack.seq, await _stored(bus, ack.stream, ack.seq)
    return ack.seq, raw


# --------------------------------------------------------------------------- the strike


async def strike(bus, settings, spec: ev.ContractSpec, *, key, trust, opts: StrikeOptions = StrikeOptions(),
                 contract_seq: int = 0, contract_event_id: str = "", out_dir: Path | None = None) -> StrikeResult:
    """Run (or resume) the strike of `spec` (module doc). `key` is the release key."""
    if opts.measure not in MEASURE_MODES:
        raise StrikeError(f"measure {opts.measure!r}: use one of {', '.join(MEASURE_MODES)}")
    if not spec.nodes:
        raise StrikeError(f"contract {spec.contract_id} names no nodes: add the edge nodes that run it (`nodes` in its file)")
    _TIMINGS.set({"_last": time.perf_counter()})
    inputs = inputs_of(spec, opts)
    inputs_sha = sha256_json(inputs)
    activity = activity_id_for(spec.contract_id, inputs_sha)
    out_dir = Path(out_dir or settings.path("strikes")) / activity
    done = await completed(bus, activity, trust)
    if done is not None:
        seq, e, _ = done
        path = out_dir / "proof.json"
        proof = json.loads(path.read_text()) if path.is_file() else None
        return StrikeResult(activity, e.data.status, f"done before (CONTRACTS seq {seq}): nothing deployed again",
                            path if proof else None, proof, resumed=True)
    rec = Recorded()
    if contract_seq:
        stored = await bus.js.get_msg("CONTRACTS", contract_seq)
        rec.add("contract", "CONTRACTS", contract_seq, contract_event_id, stored.subject.rsplit(".", 1)[0], stored.subject,
                bytes(stored.data))

    _mark("setup")
    # map + optimise
    solved = solve(spec, opts)
    states = solved.states if opts.decision_override is None else np.asarray(opts.decision_override, float).reshape(solved.states.shape)

    _mark("optimise")
    # verify offline (the gate's code), then on the log
    from scf.producers.compliance import check_state

    for h, ctx, row in zip(solved.hours, solved.contexts, states):
        r = check_state(spec.domain, ctx, row)
        if r.decision != "APPROVE":
            return await _finish(bus, settings, key, spec, activity, inputs, inputs_sha, solved, states, rec, out_dir,
                                 status="rejected", detail=f"hour {h}: {'; '.join(r.reasons)}")
    _mark("verify_offline")
    proposals = []
    for h, ctx, row in zip(solved.hours, solved.contexts, states):
        pid = derived_id("strike.state", activity, h)
        p = ev.StateProposal(proposal_id=pid, domain=spec.domain, context=[float(x) for x in ctx], state=[float(x) for x in row],
                             intent_id=activity)
        proposals.append(ev.StateProposed.new(p, source=bus.source, id=derived_id("state.proposed", pid)))
    for e in proposals:
        pub = await bus.publish(e)
        rec.add("state", "INTENTS", pub.seq, e.id, e.type_name(), e.subject(), await _stored(bus, "INTENTS", pub.seq))
    ids = {e.data.proposal_id for e in proposals}
    verdicts = await await_events(bus, "VERDICTS", "verdict.state.>", [ev.VerdictIssued],
                                  lambda v: v.data.subject_id in ids and v.data.final, want=len(ids), timeout=opts.wait_s)
    for seq, v, raw, subject in verdicts:
        rec.add("verdict", "VERDICTS", seq, v.id, v.type_name(), subject, raw)
    if len(verdicts) < len(ids):
        return StrikeResult(activity, "failed", f"the safety gate ruled on {len(verdicts)} of {len(ids)} states within {opts.wait_s:g} s: "
                            "is `scf run safety` running?")
    refused = [v for _, v, _, _ in verdicts if v.data.decision != "APPROVE"]
    if refused:
        return await _finish(bus, settings, key, spec, activity, inputs, inputs_sha, solved, states, rec, out_dir, status="rejected",
                             detail="the safety gate: " + "; ".join(refused[0].data.reasons))

    _mark("gate")
    # the capsule, promoted and proposed for deployment
    capsule_id = capsule_id_of(spec.contract_id, activity)
    # versions rise per domain (an edge agent refuses to go down): one promotion at a time per domain in this process
    lock = _VERSION_LOCKS.setdefault(spec.domain, asyncio.Lock())
    await lock.acquire()
    held = [True]

    def release() -> None:
        if held[0]:
            held[0] = False
            lock.release()

    try:
        return await _deploy_and_measure(bus, settings, key, trust, spec, opts, activity, inputs, inputs_sha, solved, states, rec,
                                         out_dir, capsule_id, release)
    finally:
        release()


async def _deploy_and_measure(bus, settings, key, trust, spec, opts, activity, inputs, inputs_sha, solved, states, rec, out_dir,
                              capsule_id, release) -> StrikeResult:
    version = await next_capsule_version(bus, spec.domain, capsule_id)
    manifest = cap.Manifest(
        format=cap.FORMAT, capsule_id=capsule_id, version=version, contract_id=spec.contract_id, domain=spec.domain,
        activity_id=activity, inputs_sha256=inputs_sha, model=solved.model_id,
        decision=cap.DecisionInfo(hours=solved.hours, contexts=solved.contexts.tolist(), state_names=solved.state_names,
                                  method=solved.method, cost=solved.cost, lower_bound=solved.lower_bound, rel_gap=solved.rel_gap),
    )
    cdir = cap.build(out_dir / "capsule", manifest, states, key)
    checked = cap.verify(cdir, trust)
    if not checked.ok:
        return StrikeResult(activity, "failed", "the capsule does not verify: " + "; ".join(checked.findings))
    promotion, pseq, praw, intent, once = await deploy_capsule(
        bus, settings, cdir, manifest, spec.nodes, key, trust,
        reason=f"strike {activity}: capsule {capsule_id} v{version} for contract {spec.contract_id}")
    rec.add("promotion", "CHECKPOINTS", pseq, promotion.id, promotion.type_name(), promotion.subject(), praw)
    release()  # the version is on the log: the next strike of the domain counts it
    iid = intent.data.intent_id
    rec.add("intent", "INTENTS", once.seq, (once.existing or intent).id, intent.type_name(), intent.subject(), await _stored(bus, "INTENTS", once.seq))
    # The gate's first word on the intent (a HOLD at STANDARD), then whatever is final now.
    await await_events(bus, "VERDICTS", "verdict.intent.>", [ev.VerdictIssued], lambda v: v.data.subject_id == iid,
                       want=1, timeout=opts.wait_s)
    final = [(m.seq, v, bytes(m.data), m.subject) for m in await read(bus, "VERDICTS", "verdict.intent.>")
             if (v := _verdict(m.data)) is not None and v.data.subject_id == iid and v.data.final][:1]
    if not final:
        return StrikeResult(activity, "awaiting-approval", f"deploy intent {iid} waits for a human: `scf control approve {iid}`, "
                            f"then run the strike again", intent_id=iid)
    vseq, verdict, vraw, vsubj = final[0]
    rec.add("verdict", "VERDICTS", vseq, verdict.id, verdict.type_name(), vsubj, vraw)
    if verdict.data.decision != "APPROVE":
        return await _finish(bus, settings, key, spec, activity, inputs, inputs_sha, solved, states, rec, out_dir, status="rejected",
                             detail=f"deploy intent {iid}: {'; '.join(verdict.data.reasons)}", capsule=manifest, cdir=cdir)

    _mark("capsule_and_approval")
    # deployment: every node activates it (or says why not)
    from scf.consumers.deploy import deployment_id_for

    deps = {deployment_id_for(iid, n): n for n in spec.nodes}
    outcomes = await await_events(bus, "DEPLOY", ["deploy.activated.>", "deploy.failed.>"], [ev.DeployActivated, ev.DeployFailed],
                                  lambda e: e.data.deployment_id in deps, want=len(deps), timeout=opts.wait_s)
    orders = await await_events(bus, "DEPLOY", "deploy.requested.>", [ev.DeployRequested],
                                lambda e: e.data.deployment_id in deps, want=len(deps), timeout=1.0)
    for seq, e, raw, subject in orders:
        rec.add("order", "DEPLOY", seq, e.id, e.type_name(), subject, raw)
    for seq, e, raw, subject in outcomes:
        rec.add("deployment", "DEPLOY", seq, e.id, e.type_name(), subject, raw)
    failed = [e for _, e, _, _ in outcomes if isinstance(e, ev.DeployFailed)]
    if failed or len(outcomes) < len(deps):
        why = "; ".join(f"{e.data.node}: {e.data.reason}" for e in failed) or \
            f"{len(outcomes)} of {len(deps)} nodes reported within {opts.wait_s:g} s (are their edge agents running?)"
        return await _finish(bus, settings, key, spec, activity, inputs, inputs_sha, solved, states, rec, out_dir, status="failed",
                             detail=f"deployment: {why}", capsule=manifest, cdir=cdir)

    _mark("deploy")
    # measurement
    mv: dict = {"mode": opts.measure, "periods": []}
    if opts.measure == "sim":
        mv.update(await asyncio.to_thread(simulate_capsule, cdir, spec.domain, opts))
    elif opts.measure == "live":
        got = await await_events(bus, "DEPLOY", "energy.measured.>", [ev.EnergyMeasured],
                                 lambda e: e.data.deployment_id in deps, want=len(deps), timeout=opts.wait_s)
        for seq, e, raw, subject in got:
            rec.add("measurement", "DEPLOY", seq, e.id, e.type_name(), subject, raw)
            mv["periods"].append(_period(e.data))
        # a node's runtime monitor that reverted this capsule said why (deploy.rolled_back)
        mv["reverts"] = []
        for m in await read(bus, "DEPLOY", [f"deploy.rolled_back.{subject_token(n)}" for n in spec.nodes]):
            try:
                e = Codec([ev.DeployRolledBack]).decode(m.data)
            except Exception:  # noqa: BLE001 - not one we can read
                continue
            if e.data.deployment_id in deps or e.data.from_checkpoint_id == capsule_id:
                rec.add("rollback", "DEPLOY", m.seq, e.id, e.type_name(), m.subject, bytes(m.data))
                mv["reverts"].append(f"{e.data.node}: {e.data.reason}")
    _mark("measure")
    status = "reverted" if mv.get("reverts") else "deployed" if not mv["periods"] else "measured"
    return await _finish(bus, settings, key, spec, activity, inputs, inputs_sha, solved, states, rec, out_dir, status=status,
                         detail=f"capsule {capsule_id} v{version} runs on {', '.join(sorted(spec.nodes))}", capsule=manifest,
                         cdir=cdir, mv=mv, intent_id=iid)


async def deploy_capsule(bus, settings, cdir: Path, manifest: cap.Manifest, nodes: list[str], key, trust, *, reason: str = ""):
    """Upload the capsule's artifact, promote it under the release key (alias `capsule`:
    the planner's own aliases are untouched) and create its deploy intent for `nodes`: the
    safety gate rules on it, the planner orders it, the edge agents verify and activate it.
    Idempotent: the same capsule gives the same promotion and intent.
    Returns (promotion, its seq, its raw bytes, intent, Once)."""
    from scf.bus.artifacts import open_store
    from scf.consumers.deploy import DeployPlanner, deploy_intent

    ref = await open_store(bus, settings).put(cdir / cap.ARTIFACT, f"capsules/{manifest.capsule_id}-v{manifest.version}.safetensors")
    promotion = ev.CheckpointPromoted.new(
        ev.Promotion(checkpoint_id=manifest.capsule_id, domain=manifest.domain, alias=cap.ALIAS, version=manifest.version,
                     uri=ref.uri, sha256=ref.sha256, size=ref.size),
        source=bus.source, id=derived_id("capsule.promoted", manifest.capsule_id, manifest.version),
    )
    pseq, praw = await publish_signed(bus, promotion, key)
    intent = deploy_intent(promotion, pseq, target=",".join(nodes), strategy="all", source=bus.source,
                           gear=await DeployPlanner(bus, trust).current_gear(),
                           reason=reason or f"capsule {manifest.capsule_id} v{manifest.version} for contract {manifest.contract_id}")
    once = await bus.publish_once(intent)
    return promotion, pseq, praw, intent, once


def _verdict(data: bytes) -> ev.VerdictIssued | None:
    try:
        v = Codec([ev.VerdictIssued]).decode(data)
    except Exception:  # noqa: BLE001 - not a verdict we can read
        return None
    return v if isinstance(v, ev.VerdictIssued) else None


def _period(m) -> dict:
    cal = getattr(m, "calibration", None)
    unc = getattr(m, "uncertainty_kwh", None)
    return {
        "node": m.node, "deployment_id": m.deployment_id, "period_start": m.period_start.isoformat(), "period_end": m.period_end.isoformat(),
        "baseline_kwh": float(m.baseline_kwh), "actual_kwh": float(m.actual_kwh), "saved_kwh": float(m.baseline_kwh - m.actual_kwh),
        "uncertainty_kwh": None if unc is None or not math.isfinite(unc) else float(unc),
        "confidence": float(getattr(m, "confidence", 0.0) or 0.0), "method": m.method,
        "cv_rmse": None if cal is None else float(cal.cv_rmse), "nmbe": None if cal is None else float(cal.nmbe),
    }


def simulate_capsule(cdir: Path, domain: str, opts: StrikeOptions) -> dict:
    """The capsule on the simulated site, run by the edge control loop in this process:
    the status quo for `history_hours`, then the capsule; the runtime monitor and M&V as on
    a node. Returns the M&V periods, any revert and the simulator's stability metrics."""
    import tempfile

    from scf.consumers.edge.control import ControlLoop, ControlSettings
    from scf.consumers.edge.plant import PlantEnded, SimPlant
    from scf.consumers.edge.store import Installed

    m = cap.parse_manifest((cdir / cap.MANIFEST).read_bytes())
    settings = ControlSettings(domain=domain, sim_hours=opts.sim_hours, min_history_hours=opts.history_hours,
                               report_hours=max(1.0, (opts.sim_hours - opts.history_hours) / 2))
    with tempfile.TemporaryDirectory(prefix="scf-strike-") as tmp:
        d = Path(tmp)
        dirname = f"{m.capsule_id}-v{m.version}"
        (d / "versions" / dirname).mkdir(parents=True)
        (d / "versions" / dirname / "model.safetensors").write_bytes((cdir / cap.ARTIFACT).read_bytes())
        item = Installed(checkpoint_id=m.capsule_id, domain=domain, version=m.version, uri="", sha256="", size=0, dirname=dirname,
                         deployment_id=f"sim-{m.activity_id}", plan_id="sim")
        plant = SimPlant(settings.site())
        state: dict = {"cur": None}
        loop = ControlLoop(plant, "sim", d, settings, current=lambda: state["cur"], previous=lambda _: None, source="strike:sim")
        start = int(round(opts.history_hours / (settings.sim_step_minutes / 60.0)))

        async def run() -> None:
            while True:
                try:
                    tel = await plant.telemetry(loop.last_seq)
                except PlantEnded:
                    return
                loop.last_seq = tel.seq
                if tel.seq == start:
                    state["cur"] = item
                await plant.write(await loop.step(tel))

        asyncio.run(run())
        reverts = [e.data.reason for e in loop.events if isinstance(e, ev.DeployRolledBack)]
        temps = np.array([r.tel.t_zone_c for r in loop.records[start:]], float) if len(loop.records) > start else np.zeros((0, 1))
        lo, hi = (21.0, 24.0)
        occ = np.array([max(r.tel.occupancy) > 0 for r in loop.records[start:]]) if len(loop.records) > start else np.zeros(0, bool)
        dev = np.where(temps[occ] < lo, lo - temps[occ], np.where(temps[occ] > hi, temps[occ] - hi, 0.0)) if occ.any() else np.zeros(1)
        return {
            "periods": [_period(x) for x in loop.measured],
            "reverts": reverts,
            "stability": {"comfort_max_dev_k": float(dev.max()), "comfort_mean_dev_k": float(dev.mean()),
                          "steps": int(len(loop.records) - start)},
        }


async def _finish(bus, settings, key, spec, activity, inputs, inputs_sha, solved: Solved, states, rec: Recorded, out_dir: Path, *,
                  status: str, detail: str, capsule: cap.Manifest | None = None, cdir: Path | None = None, mv: dict | None = None,
                  intent_id: str = "") -> StrikeResult:
    body = {
        "kind": PROOF_KIND,
        "activity_id": activity,
        "contract_id": spec.contract_id,
        "client": spec.client,
        "domain": spec.domain,
        "nodes": sorted(spec.nodes),
        "status": status,
        "detail": detail,
        "inputs": dict(inputs, inputs_sha256=inputs_sha, constraints=json.loads(spec.constraints)),
        "decision": {
            "hours": solved.hours, "state_names": solved.state_names, "rows": np.asarray(states, float).round(9).tolist(),
            "method": solved.method, "model": solved.model_id, "cost": solved.cost, "lower_bound": solved.lower_bound,
            "rel_gap": solved.rel_gap, "certificates": solved.certificates,
        },
        "capsule": None if capsule is None or cdir is None else {
            "capsule_id": capsule.capsule_id, "version": capsule.version,
            "manifest_sha256": hashlib.sha256((cdir / cap.MANIFEST).read_bytes()).hexdigest(),
            "artifact_sha256": hashlib.sha256((cdir / cap.ARTIFACT).read_bytes()).hexdigest(),
        },
        "events": rec.items,
        "mv": mv or {"mode": "none", "periods": []},
    }
    proof = sign_proof(body, key)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "proof.json"
    path.write_text(json.dumps(proof, indent=2, sort_keys=True) + "\n")
    record = ev.StrikeRecord(activity_id=activity, contract_id=spec.contract_id, domain=spec.domain, status=status,
                             inputs_sha256=inputs_sha, capsule_id=capsule.capsule_id if capsule else "",
                             proof_sha256=hashlib.sha256(canonical_json(proof)).hexdigest(), detail=detail[:500])
    await publish_signed(bus, ev.StrikeCompleted.new(record, source=bus.source, id=derived_id("strike.completed", activity)), key)
    _mark("proof")
    t = {k: v for k, v in (_TIMINGS.get() or {}).items() if not k.startswith("_")}
    return StrikeResult(activity, status, detail, path, proof, intent_id=intent_id, timings=t)


# --------------------------------------------------------------------------- the proof


def sign_proof(body: dict, key) -> dict:
    if "signature" in body:
        raise StrikeError("the proof body already carries a signature")
    return dict(body, signature={"kid": key.kid, "sig": key.sign(canonical_json(body))})


class ProofInvalid(SCFError):
    """A strike proof that does not hold: the message says what failed."""


def verify_proof(proof: dict | bytes | str, trust) -> dict:
    """Check the release signature over everything in the proof but the signature (any
    field changed fails here), then its inner consistency. Returns the body."""
    if isinstance(proof, (bytes, str)):
        try:
            proof = json.loads(proof)
        except (ValueError, RecursionError):
            raise ProofInvalid("the proof is not JSON: pass the proof.json `scf strike` wrote") from None
    if not isinstance(proof, dict) or proof.get("kind") != PROOF_KIND:
        raise ProofInvalid(f"not a strike proof (kind {PROOF_KIND} expected)")
    sig = proof.get("signature")
    if not isinstance(sig, dict):
        raise ProofInvalid("the proof carries no signature")
    body = {k: v for k, v in proof.items() if k not in UNSIGNED}
    try:
        trust.verify(canonical_json(body), sig.get("sig"), sig.get("kid"), role="release")
    except (SCFError, ValueError) as exc:
        raise ProofInvalid(f"signature: {exc}") from None
    if sha256_json({k: v for k, v in body["inputs"].items() if k not in ("inputs_sha256", "constraints")}) != body["inputs"]["inputs_sha256"]:
        raise ProofInvalid("inputs_sha256 does not match the inputs")
    if activity_id_for(body["contract_id"], body["inputs"]["inputs_sha256"]) != body["activity_id"]:
        raise ProofInvalid("the activity id is not the one its contract and inputs give")
    return body


async def check_against_log(bus, body: dict) -> list[str]:
    """Every named event against what the log stores at its (stream, seq): its sha256 and id."""
    problems = []
    for e in body.get("events", []):
        try:
            raw = await _stored(bus, e["stream"], e["seq"])
        except Exception as exc:  # noqa: BLE001 - gone or never there
            problems.append(f"{e['role']} {e['id']}: {e['stream']} seq {e['seq']} cannot be read ({type(exc).__name__})")
            continue
        if hashlib.sha256(raw).hexdigest() != e["sha256"]:
            problems.append(f"{e['role']} {e['id']}: {e['stream']} seq {e['seq']} holds other bytes than the proof names")
    return problems


async def attach_log_proof(bus, settings, proof_path: Path, *, key_name: str = "tlog", wait_s: float = 120.0) -> dict:
    """Embed inclusion proofs of every event the proof names against one signed checkpoint of
    the transparency log (docs/proofs.md) as `proof["log"]`: waits until the archive holds
    them (`scf run archive`), syncs the log and signs a checkpoint (as `scf proof
    checkpoint` does), then `TransparencyLog.events_bundle`. The bundle sits beside the
    release signature, not under it: the log's own signed note covers it."""
    from scf.projections import tlog
    from scf.projections.archive import archive_root
    from scf.projections.store import ArchiveStore

    proof = json.loads(Path(proof_path).read_text())
    events = proof.get("events") or []
    if not events:
        raise StrikeError(f"{proof_path} names no events to prove")
    store = ArchiveStore(archive_root(settings))
    need: dict[str, int] = {}
    for e in events:
        need[e["stream"]] = max(need.get(e["stream"], 0), int(e["seq"]))
    loop = asyncio.get_running_loop()
    deadline, delay = loop.time() + wait_s, 0.1
    while any(store.position(stream) < seq for stream, seq in need.items()):
        if loop.time() > deadline:
            late = ", ".join(f"{s} seq {q}" for s, q in need.items() if store.position(s) < q)
            raise StrikeError(f"the archive does not hold {late} after {wait_s:g} s: is `scf run archive` running?")
        await asyncio.sleep(delay)  # the archive writes in batches: poll its files with backoff
        delay = min(1.0, delay * 2)
    result = await tlog.checkpoint(settings, bus, key_name=key_name)
    key = tlog.log_key(settings, key_name)
    with tlog.open_log(settings, key=key) as log:
        bundle = log.events_bundle([log.find(e["stream"], int(e["seq"])) for e in events], result.sync.size)
        proof["log"] = bundle
        proof["log_verifier_key"] = tlog.verifier_key_of(log, key)
    Path(proof_path).write_text(json.dumps(proof, indent=2, sort_keys=True) + "\n")
    return proof


def check_log_proof(proof: dict, verifier_key: str) -> str:
    """The embedded log proof against the log's verifier key (pinned by the caller, not
    taken from the proof): every named event is the leaf the bundle proves, in order."""
    from scf.projections import proofcheck

    bundle = proof.get("log")
    if not isinstance(bundle, dict):
        raise ProofInvalid("the proof carries no log inclusion proofs: add them with `scf strike ... --log-proof`")
    try:
        summary = proofcheck.verify_bundle(bundle, verifier_key)
    except proofcheck.ProofError as exc:
        raise ProofInvalid(f"log: {exc}") from None
    entries = summary["entries"]
    named = proof.get("events") or []
    if len(entries) != len(named):
        raise ProofInvalid(f"log: the bundle proves {len(entries)} events, the proof names {len(named)}")
    keys = ("stream", "seq", "id", "type", "subject")  # every field the proof and the leaf both carry
    for e, leaf in zip(named, entries):
        differ = ["entry"] if not isinstance(leaf, dict) else [k for k in keys if leaf.get(k) != e.get(k)]
        if differ:
            what = ", ".join(f"{k} {leaf.get(k)!r} where the proof names {e.get(k)!r}" for k in differ) if isinstance(leaf, dict) else "not an entry"
            raise ProofInvalid(f"log: leaf for {e['stream']} seq {e['seq']} is another event ({what})")
    return f"{len(entries)} events in {summary['origin']} at tree size {summary['tree_size']}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def summary(result: StrikeResult) -> str:
    p = result.proof or {}
    periods = (p.get("mv") or {}).get("periods") or []
    saved = sum(x["saved_kwh"] for x in periods)
    unc = [x["uncertainty_kwh"] for x in periods if x.get("uncertainty_kwh") is not None]
    mvtext = f"; saved {saved:.2f} ± {math.sqrt(sum(u * u for u in unc)):.2f} kWh over {len(periods)} period(s)" if periods else ""
    return f"activity {result.activity_id}: {result.status} ({result.detail}){mvtext}"



