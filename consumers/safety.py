"""The safety gate: `scf run safety`. Rules on every intent, code proposal and proposed state.

    intent.created.<kind>.<id>   → contextual regulator (rules as data + context facts),
                                   then the gear: HOLD when the gear needs a human for the kind
    code.proposed                → the capability gate (static, default deny; docs/codegen.md),
                                   then, when the proposal names a domain, the sandbox: the
                                   candidate runs in a sandboxed process against the domain's
                                   simulator and the verdict carries its scores
    state.proposed.<domain>      → physical constraints of the domain (bounds, balance,
                                   limits, ramp rates)

Each ruling is one `verdict.issued` (subject `verdict.<type>.<approve|reject|hold>`) with the
gate that decided and its reasons. APPROVE and REJECT are final; HOLD is not: a human answers
with `scf control approve ID` / `reject ID`, which the daemon turns into a final verdict
(gate "human"). Dispatch and deploy act only on a final APPROVE.

The decision is a pure function, `decide(view, event)`; the runner keeps the view current:
the gear from `scf_state/gear` and the facts from the `scf_context` bucket, both watched.

Race, by design: a verdict uses the gear the gate had seen when it ruled. An intent ruled
just before a gear change keeps its verdict (an APPROVE in HYPER stays approved after a
shift down to STANDARD; a HOLD in STANDARD still waits for a human after a shift up). The
intent carries the daemon's gear at creation (`Intent.gear`) for the record; the gate
rules on the gear in force, which is what the operator last asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import msgspec

from scf.bus import events as ev
from scf.bus import gears
from scf.bus.client import Bus
from scf.bus.codec import Codec
from scf.bus.ids import derived_id
from scf.bus.runner import Delivery, Runner
from scf.bus.streams import CONSUMERS, KEY_GEAR, ConsumerSpec
from scf.consumers.regulator import RuleSet, parse_fact
from scf.domains import ethics

log = logging.getLogger("scf.safety")

SAFETY_CONSUMER: ConsumerSpec = CONSUMERS["safety"]
CODEC = Codec([ev.IntentCreated, ev.CodeProposed, ev.StateProposed])
BATCH = 128  # messages fetched and ruled together; their verdicts are published together


class SafetySettings(msgspec.Struct, frozen=True, kw_only=True):
    """`[safety]` in scf.toml."""

    rules: str = ""  # a rules file; "" = consumers/rules/default.toml
    sandbox_roots: list[str] = msgspec.field(default_factory=lambda: ["/sandbox", "/tmp/scf-sandbox"])
    max_code_bytes: int = 512_000
    concurrency: int = 8  # messages ruled at once (publishing overlaps; the analysis is CPU)
    context_bucket: str = "scf_context"
    # generated code in the sandbox (domains/sandbox.py, docs/codegen.md)
    sandbox: bool = True  # score code that names a domain; false = the static gate only
    sandbox_isolation: str = "auto"  # auto | bwrap | fallback | sandbox-exec
    sandbox_runs: int = 2  # sandboxes at once
    sandbox_scenarios: int = 4
    sandbox_hours: float = 24.0
    sandbox_step_minutes: float = 15.0
    sandbox_seed: int = 0
    sandbox_cpu_s: int = 60
    sandbox_wall_s: float = 120.0
    sandbox_memory_mb: int = 1024


@dataclass(frozen=True)
class GateView:
    """Everything a ruling depends on besides the event itself."""

    gear: str = gears.DEFAULT_GEAR
    facts: Mapping[str, Any] = field(default_factory=dict)
    rules: RuleSet = field(default_factory=RuleSet.load)
    ethics: ethics.EthicsConfig = field(default_factory=ethics.EthicsConfig)


# --------------------------------------------------------------------------- pure decisions


@dataclass(frozen=True)
class Ruling:
    decision: ev.Decision
    gate: str
    reasons: list[str]
    final: bool = True
    scores: dict[str, float] = field(default_factory=dict)


def rule_intent(view: GateView, intent: ev.Intent) -> Ruling:
    r = view.rules.rule(intent.kind, intent.domain, intent.params, view.facts)
    if r.decision == "deny":
        return Ruling("REJECT", "regulator", list(r.reasons))
    if r.decision == "hold":
        return Ruling("HOLD", "regulator", list(r.reasons) + [_approve_hint(intent.intent_id)], final=False)
    if gears.needs_human(view.gear, intent.kind):
        return Ruling(
            "HOLD",
            "gear",
            list(r.reasons) + [f"gear {view.gear} needs a human for {intent.kind} intents: {_approve_hint(intent.intent_id)}"],
            final=False,
        )
    return Ruling("APPROVE", "regulator", list(r.reasons) + [f"gear {view.gear}: no human approval needed for {intent.kind}"])


def _approve_hint(intent_id: str) -> str:
    return f"`scf control approve {intent_id}` or `scf control reject {intent_id}`"


def rule_code(view: GateView, proposal: ev.CodeProposal) -> Ruling:
    """The static ruling: default deny. The capability gate decides (and, for code that names a
    domain, checks the Controller contract); the deny-list's findings explain what it refused."""
    error = getattr(proposal, "error", "")  # GenN's field for a malformed answer (bus/events.py)
    if error:
        return Ruling("REJECT", "ethics", [f"the generator's answer is malformed: {error}"])
    if proposal.language.lower() not in ("python", "py", "python3"):
        return Ruling("REJECT", "ethics", [f"language {proposal.language!r} cannot be analysed: the gate rules on Python only"])
    contract = ethics.CONTROLLER if proposal.domain else None
    findings = ethics.gate(proposal.code, contract, max_bytes=view.ethics.max_bytes)
    if findings:
        why = [f"why it matters: {f}" for f in ethics.explain(proposal.code, view.ethics)]
        return Ruling("REJECT", "ethics", ethics.reasons(findings) + why)
    return Ruling("APPROVE", "ethics", ["capability gate: nothing outside the capability set" + (", the Controller contract holds" if contract else "")])


def rule_sandbox(static: Ruling, result) -> Ruling:
    """The ruling once the sandbox has run the code (`result`: a domains.sandbox.SandboxResult)."""
    if not result.ok:
        return Ruling("REJECT", "sandbox", static.reasons + [f"sandbox ({result.isolation}): {result.reason}"])
    sc = result.scores
    summary = (
        f"sandbox ({result.isolation}): {int(sc['steps'])} steps x {int(sc['scenarios'])} scenarios; cost {sc['cost']:.6g} "
        f"vs {sc['baseline_cost']:.6g} for the baseline (relative {sc['relative_cost']:.3f}); "
        f"{int(sc['violations'])} steps with a violated constraint"
    )
    return Ruling("APPROVE", "sandbox", static.reasons + [summary], scores=dict(sc))


def rule_state(view: GateView, proposal: ev.StateProposal) -> Ruling:
    import numpy as np

    from scf import domains

    try:
        domain = domains.get(proposal.domain)
    except domains.UnknownDomain as exc:
        return Ruling("REJECT", "physics", [str(exc)])
    why = domain.in_bounds(proposal.context, proposal.state)
    if why:
        return Ruling("REJECT", "physics", [f"bounds: {why}"])
    previous = None
    if proposal.previous_state is not None:
        if len(proposal.previous_state) != domain.state_dim:
            return Ruling("REJECT", "physics", [f"previous_state has {len(proposal.previous_state)} values, {domain.name} expects {domain.state_dim}"])
        previous = np.asarray(proposal.previous_state, float)
    violations = domain.violations(np.asarray(proposal.context, float), np.asarray(proposal.state, float), previous)
    if violations:
        return Ruling("REJECT", "physics", [f"{v.message} [{v.constraint}: {v.size:.6g} {v.unit}]" for v in violations])
    checked = "bounds and constraints" + (" and ramp rates" if previous is not None else "")
    return Ruling("APPROVE", "physics", [f"{domain.name}: {checked} hold"])


def decide(view: GateView, event: ev.Event, *, source: str = "safety", sandbox=None, static: Ruling | None = None) -> list[ev.VerdictIssued]:
    """The gate's verdict on one event (a list of one verdict, or empty for other types).
    `sandbox`: the sandbox's result for a code proposal the static gate approved (the runner
    runs it; `decide` stays pure); `static`: `rule_code(view, proposal)` when the caller
    has it already (the AST analysis is the gate's largest cost: done once per proposal)."""
    match event:
        case ev.IntentCreated(data=intent):
            r = rule_intent(view, intent)
            sid, stype, kind, domain = intent.intent_id, "intent", intent.kind, intent.domain
        case ev.CodeProposed(data=proposal):
            r = static if static is not None else rule_code(view, proposal)
            if sandbox is not None and r.decision == "APPROVE":
                r = rule_sandbox(r, sandbox)
            sid, stype, kind, domain = proposal.proposal_id, "code", "", proposal.domain
        case ev.StateProposed(data=proposal):
            r = rule_state(view, proposal)
            sid, stype, kind, domain = proposal.proposal_id, "state", "", proposal.domain
        case _:
            return []
    verdict = ev.Verdict(
        verdict_id=derived_id("verdict", stype, sid, event.id),
        subject_id=sid,
        subject_type=stype,
        decision=r.decision,
        gate=r.gate,
        reasons=r.reasons,
        final=r.final,
        by="safety",
        kind=kind,
        domain=domain,
        scores=r.scores,
    )
    return [ev.VerdictIssued.new(verdict, source=source, cause=event)]


def evaluate_code(code: str, trial, limits, isolation: str = "auto"):
    """The sandbox run of a code proposal; an unknown domain or a sandbox that cannot start is a
    failed run (default deny), never an exception."""
    from scf.domains import sandbox
    from scf.domains.base import DomainError

    try:
        return sandbox.evaluate(code, trial, limits, isolation=isolation)
    except DomainError as exc:
        return sandbox.SandboxResult(False, str(exc), {}, isolation)


# --------------------------------------------------------------------------- the process


class SafetyGate:
    """The runner side: keeps the view current (gear, facts) and rules on INTENTS."""

    def __init__(self, bus: Bus, config: SafetySettings | None = None, *, rules: RuleSet | None = None) -> None:
        self.bus = bus
        self.config = config or SafetySettings()
        self.view = GateView(
            rules=rules or RuleSet.load(self.config.rules or None),
            ethics=ethics.EthicsConfig(sandbox_roots=tuple(self.config.sandbox_roots), max_bytes=self.config.max_code_bytes),
        )
        self._facts: dict[str, Any] = {}
        self._tasks: list[asyncio.Task] = []
        self._sandboxes = asyncio.Semaphore(max(1, self.config.sandbox_runs))
        self.ruled = 0

    async def start(self) -> "SafetyGate":
        """Read the gear and the facts (and keep watching them) before the first ruling."""
        state_kv = await self.bus.kv("scf_state")
        context_kv = await self.bus.kv(self.config.context_bucket)
        gear_watch = await state_kv.watch(KEY_GEAR)
        facts_watch = await context_kv.watchall()
        gear_ready, facts_ready = asyncio.Event(), asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._watch_gear(gear_watch, gear_ready)),
            asyncio.create_task(self._watch_facts(facts_watch, facts_ready)),
        ]
        await asyncio.wait_for(asyncio.gather(gear_ready.wait(), facts_ready.wait()), 10)
        log.info("safety gate: gear %s, %d context facts, rules %s", self.view.gear, len(self._facts), self.view.rules.source)
        return self

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _watch_gear(self, watcher, ready: asyncio.Event) -> None:
        while True:
            entry = await watcher.updates(timeout=None)
            if entry is None:  # end of the initial values
                ready.set()
                continue
            gear = gears.decode_state(entry.value).gear
            if gear != self.view.gear:
                log.info("safety gate: gear %s -> %s", self.view.gear, gear)
            self.view = replace(self.view, gear=gear)

    async def _watch_facts(self, watcher, ready: asyncio.Event) -> None:
        while True:
            entry = await watcher.updates(timeout=None)
            if entry is None:
                ready.set()
                continue
            op = getattr(entry, "operation", None)
            if op in ("DEL", "PURGE") or not entry.value:
                self._facts.pop(entry.key, None)
            else:
                self._facts[entry.key] = parse_fact(entry.value)
            self.view = replace(self.view, facts=dict(self._facts))

    async def handle(self, event: ev.Event, delivery: Delivery) -> list[ev.Event]:
        result = static = None
        view = self.view
        if isinstance(event, ev.CodeProposed) and self.config.sandbox and event.data.domain:
            static = rule_code(view, event.data)
            if static.decision == "APPROVE":
                result = await self._run_sandbox(event.data, delivery)
        out = decide(view, event, source=self.bus.source, sandbox=result, static=static)
        if log.isEnabledFor(logging.INFO):
            for v in out:
                d = v.data
                log.info("%s %s %s: %s (%s) %s", d.subject_type, d.subject_id, d.decision, d.gate, d.kind or d.domain, "; ".join(d.reasons)[:300])
        self.ruled += 1
        return list(out)

    async def _run_sandbox(self, proposal: ev.CodeProposal, delivery: Delivery):
        """The candidate in its sandboxed process (a thread waits for it; the message's ack
        deadline is extended while it runs)."""
        from scf.domains import sandbox

        c = self.config
        trial = sandbox.Trial(proposal.domain, c.sandbox_scenarios, c.sandbox_hours, c.sandbox_seed, c.sandbox_step_minutes)
        limits = sandbox.SandboxLimits(cpu_s=c.sandbox_cpu_s, wall_s=c.sandbox_wall_s, memory_mb=c.sandbox_memory_mb)
        async with self._sandboxes:
            job = asyncio.ensure_future(asyncio.to_thread(evaluate_code, proposal.code, trial, limits, c.sandbox_isolation))
            while not job.done():
                await asyncio.wait({job}, timeout=5)
                if not job.done():
                    with contextlib.suppress(Exception):
                        await delivery.in_progress()
            return job.result()

    def runner(self, spec: ConsumerSpec = SAFETY_CONSUMER) -> Runner:
        # batched: a fetched batch's verdicts are published together (one wait for the
        # server's acks per batch, not per message), then its inputs are acked
        return Runner(self.bus, spec, self.handle, decode=lambda m: CODEC.decode(m.data), concurrency=self.config.concurrency,
                      batched=True, batch=BATCH)

    async def run(self, stop: asyncio.Event, spec: ConsumerSpec = SAFETY_CONSUMER) -> None:
        await self.start()
        try:
            await self.runner(spec).run(stop)
        finally:
            await self.stop()


async def serve(bus: Bus, config: SafetySettings | None = None, stop: asyncio.Event | None = None) -> None:
    """`scf run safety`: rule until SIGTERM."""
    from scf.bus.runner import run_all

    gate = SafetyGate(bus, config)
    await run_all(bus, [gate.run], stop)


__all__ = ["SafetySettings", "GateView", "Ruling", "decide", "rule_intent", "rule_code", "rule_sandbox", "rule_state", "evaluate_code", "SafetyGate", "serve"]
