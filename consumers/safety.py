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
import builtins
import contextlib
import gc
import logging
import os
import select
import signal
import socket
import struct
import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import msgspec

from scf.bus import codec, gears
from scf.bus import events as ev
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
TURN_S = 0.005  # ruling in the loop: at most this long between two turns of the event loop
FLUSH_S = 0.05  # a decide worker: at most this long between an answer and its sending


class SafetySettings(msgspec.Struct, frozen=True, kw_only=True):
    """`[safety]` in scf.toml."""

    rules: str = ""  # a rules file; "" = consumers/rules/default.toml
    sandbox_roots: list[str] = msgspec.field(default_factory=lambda: ["/sandbox", "/tmp/scf-sandbox"])
    max_code_bytes: int = 512_000
    concurrency: int = 8  # messages ruled at once (publishing overlaps; the analysis is CPU)
    # `decide` in forked worker processes beside the event loop (DecidePool): -1 = one per
    # CPU this process may use beyond two (the loop's and nats-server's), at most 8: none on
    # a 2-CPU host; 0 = in the loop.
    # Only with concurrency > 1 (at 1 the gate rules in order, one at a time: in the loop)
    decide_workers: int = -1
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


def _wire(event: ev.Event, delivery: Delivery | None) -> bytes:
    """The event's bytes as received (what the runner decoded), for a decide worker."""
    data = getattr(getattr(delivery, "msg", None), "data", None)
    return data if isinstance(data, (bytes, bytearray, memoryview)) and data else codec.encode(event)


def evaluate_code(code: str, trial, limits, isolation: str = "auto"):
    """The sandbox run of a code proposal; an unknown domain or a sandbox that cannot start is a
    failed run (default deny), never an exception."""
    from scf.domains import sandbox
    from scf.domains.base import DomainError

    try:
        return sandbox.evaluate(code, trial, limits, isolation=isolation)
    except DomainError as exc:
        return sandbox.SandboxResult(False, str(exc), {}, isolation)


# --------------------------------------------------------------------------- decide off the loop


_FRAME = struct.Struct("!IcQ")  # length of what follows the length, kind, task id
_ENC = msgspec.msgpack.Encoder()
_VERDICTS = msgspec.msgpack.Decoder(list[ev.VerdictIssued])
_RULING = msgspec.msgpack.Decoder(Ruling)
_VIEW = msgspec.msgpack.Decoder(tuple[str, dict[str, Any]])


class DecideWorkerError(RuntimeError):
    """A decide worker died with rulings in hand: they are failed (the runner retries them)."""


def decide_workers(config: SafetySettings) -> int:
    """How many decide workers `config` asks for on this host (see `SafetySettings.decide_workers`)."""
    if config.concurrency <= 1:
        return 0
    if config.decide_workers >= 0:
        return config.decide_workers
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    # one core is the loop's (receiving, publishing, acking), one a co-located nats-server's:
    # on two, the workers would only take CPU from them (bench_safety: no faster, 1.2-1.4x the CPU)
    return max(0, min(cores - 2, config.concurrency, 8))


class DecidePool:
    """`decide` in forked worker processes: the gate's CPU (AST analysis, rules, physics)
    beside the event loop, which keeps receiving, publishing and acking.

    Forked from the gate after its view is loaded, so a worker has the rules and the ethics
    configuration as the gate has them (nothing is pickled); a task is the message's bytes as
    received (the worker decodes them with the gate's codec), the answer the verdict events
    (msgpack). The view's gear and facts travel as a frame before the first task that was
    handed over under them: every worker rules each message on the view the gate held when
    the message was handled — what `decide` in the loop does. A worker that dies fails the
    rulings it held (`DecideWorkerError`: the runner naks them, as any failed handler) and
    the pool goes on with the others; with none left, the gate rules in the loop again."""

    def __init__(self, view: GateView, workers: int, source: str) -> None:
        self.view, self.workers, self.source = view, workers, source
        self._procs: list[_Worker] = []
        self._seq = 0  # rulings asked for

    async def start(self) -> "DecidePool":
        parents: list[socket.socket] = []
        for i in range(self.workers):
            parent, child = socket.socketpair()
            pid = os.fork()
            if pid == 0:  # the worker: never returns
                parent.close()
                _worker_main(child, self.view, self.source, [p.fileno() for p in parents])
            child.close()
            parents.append(parent)
            reader, writer = await asyncio.open_unix_connection(sock=parent, limit=1 << 24)
            w = _Worker(i, pid, reader, writer)
            w.task = asyncio.create_task(self._read(w))
            w.task.add_done_callback(lambda task, w=w: self._ended(w, task))
            self._procs.append(w)
        log.info("safety gate: %d decide workers (pids %s)", self.workers, ", ".join(str(w.pid) for w in self._procs))
        return self

    @property
    def asked(self) -> int:
        return self._seq

    @property
    def alive(self) -> bool:
        return any(w.alive for w in self._procs)

    async def decide(self, view: GateView, data: bytes) -> list[ev.VerdictIssued]:
        return _VERDICTS.decode(await self._ask(view, b"D", data))

    async def static(self, view: GateView, data: bytes) -> Ruling:
        """`rule_code` for the proposal in `data` (the sandbox path: the runner side runs the sandbox)."""
        return _RULING.decode(await self._ask(view, b"S", data))

    async def _ask(self, view: GateView, kind: bytes, data: bytes) -> bytes:
        w = min((w for w in self._procs if w.alive), key=lambda w: len(w.pending))
        if not w.out:  # the frames handed over in this turn of the loop go out in one write
            asyncio.get_running_loop().call_soon(self._flush, w)
        if w.view is not view:  # the gear or the facts changed since this worker's last task
            body = _ENC.encode((view.gear, dict(view.facts)))
            w.out += _FRAME.pack(_FRAME.size - 4 + len(body), b"V", 0)
            w.out += body
            w.view = view
        self._seq += 1
        fut = asyncio.get_running_loop().create_future()
        w.pending[self._seq] = fut
        w.out += _FRAME.pack(_FRAME.size - 4 + len(data), kind, self._seq)
        w.out += data
        return await fut

    @staticmethod
    def _flush(w: "_Worker") -> None:
        out, w.out = w.out, bytearray()
        if out and w.alive and not w.writer.is_closing():
            w.writer.write(out)

    async def _read(self, w: "_Worker") -> None:
        """The worker's answers, until it closes its end (it has exited, or is exiting)."""
        head = _FRAME.size
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, OSError):
            while True:
                size, kind, seq = _FRAME.unpack(await w.reader.readexactly(head))
                body = await w.reader.readexactly(size - head + 4)
                fut = w.pending.pop(seq, None)
                if fut is None or fut.done():
                    continue
                if kind == b"E":
                    fut.set_exception(_rebuilt(body.decode()))
                else:
                    fut.set_result(body)

    def _ended(self, w: "_Worker", task: asyncio.Task) -> None:
        """The reader is done (a done callback: it runs even for a reader cancelled before it
        started): the worker is reaped — killed first unless it closed its end, so that this
        never waits on a worker that is still ruling — and what it held is failed."""
        w.alive = False
        w.writer.transport.abort()
        if (task.cancelled() or task.exception() is not None) and not w.exit:  # not reaped: the pid is the worker's
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, signal.SIGKILL)
        status = _reap(w, 0)  # it closed its end (exiting) or was killed: it is gone now
        if w.pending:
            log.error("safety gate: decide worker %d (pid %d) is gone (%s) with %d rulings in hand: they are retried%s",
                      w.index, w.pid, status, len(w.pending), "" if self.alive else "; ruling in the loop from now on")
        for fut in w.pending.values():
            if not fut.done():
                fut.set_exception(DecideWorkerError(f"decide worker {w.index} (pid {w.pid}) is gone ({status})"))
        w.pending.clear()

    async def close(self) -> None:
        for w in self._procs:
            w.writer.close()  # the worker reads the end of its input and exits
        deadline = time.monotonic() + 5
        for w in self._procs:
            while _reap(w, os.WNOHANG) is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if _reap(w, os.WNOHANG) is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)
                _reap(w, 0)
            w.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await w.task


@dataclass(eq=False)
class _Worker:
    index: int
    pid: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    task: asyncio.Task | None = None
    pending: dict[int, asyncio.Future] = field(default_factory=dict)
    view: GateView | None = None
    out: bytearray = field(default_factory=bytearray)  # frames not written yet
    alive: bool = True
    exit: str = ""  # how it ended, once reaped


def _reap(w: "_Worker", flags: int) -> str | None:
    """The worker's exit as words once it has exited (reaped once, remembered), else None."""
    if w.exit:
        return w.exit
    try:
        got, status = os.waitpid(w.pid, flags)
    except ChildProcessError:
        w.exit = "exited"
        return w.exit
    if got == 0:
        return None
    w.exit = f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit code {os.waitstatus_to_exitcode(status)}"
    return w.exit


def _rebuilt(error: str) -> Exception:
    """The worker's exception, as the runner would have seen it in the loop ("Type: message")."""
    name, _, message = error.partition(": ")
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        with contextlib.suppress(Exception):
            return cls(message)
    return type(name if name.isidentifier() else "DecideError", (RuntimeError,), {})(message)


def _worker_main(sock: socket.socket, base: GateView, source: str, others: list[int]) -> None:
    """A decide worker's life (a forked child): tasks in, verdicts out, until its input ends.
    Answers go back together: when nothing more is waiting to be ruled, or `FLUSH_S` after the
    oldest unsent one (fewer wake-ups of the gate, and verdicts settled in larger waves: a
    wave settled costs the gate a publish, an ack frame and their tasks; answers sent as
    they came settled in waves of 6-8 and cost the gate 1.7x the CPU).
    Never returns: `os._exit`, so nothing of the parent's (its event loop, its connection,
    atexit handlers) runs here."""
    code = 0
    try:
        for fd in others:  # the other workers' parent ends: theirs must see EOF when the gate goes
            with contextlib.suppress(OSError):
                os.close(fd)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C is the gate's to handle; the end of input ends this
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        gc.freeze()  # what came from the gate is never collected here: no collection walks (and copies) its pages
        view = base
        head = _FRAME.size
        buf = bytearray()
        pos = 0  # where the next frame starts in buf
        out = bytearray()
        oldest = 0.0  # when the oldest answer in `out` was ready

        def complete() -> bool:
            return len(buf) - pos >= head and len(buf) - pos >= _FRAME.unpack_from(buf, pos)[0] + 4

        while True:
            while not complete():
                if out and not select.select([sock], [], [], 0)[0]:  # nothing else to rule now
                    sock.sendall(out)
                    out = bytearray()
                data = sock.recv(1 << 20)
                if not data:
                    raise EOFError
                del buf[:pos]
                pos = 0
                buf += data
            size, kind, seq = _FRAME.unpack_from(buf, pos)
            body = bytes(buf[pos + head:pos + size + 4])
            pos += size + 4
            if kind == b"V":
                gear, facts = _VIEW.decode(body)
                view = replace(base, gear=gear, facts=facts)
                continue
            try:
                event = CODEC.decode(body)
                answer = _ENC.encode(rule_code(view, event.data) if kind == b"S" else decide(view, event, source=source))
                reply = b"R"
            except Exception as exc:  # noqa: BLE001 - handed to the gate's handler, which raises it
                answer, reply = f"{type(exc).__name__}: {exc}".encode(), b"E"
            now = time.monotonic()
            if not out:
                oldest = now
            out += _FRAME.pack(head - 4 + len(answer), reply, seq)
            out += answer
            if now - oldest >= FLUSH_S:
                sock.sendall(out)
                out = bytearray()
    except EOFError:  # the gate closed its end: done
        pass
    except BaseException:  # noqa: BLE001 - the gate sees the worker gone and retries what it held
        code = 1
    finally:
        os._exit(code)


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
        self.pool: DecidePool | None = None  # decide off the loop (start(); `decide_workers`)
        self._turn = time.perf_counter()  # the last time ruling in the loop let the loop run

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
        if (n := decide_workers(self.config)) > 0:
            self.pool = await DecidePool(self.view, n, self.bus.source).start()
        log.info("safety gate: gear %s, %d context facts, rules %s", self.view.gear, len(self._facts), self.view.rules.source)
        return self

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        pool, self.pool = self.pool, None
        if pool is not None:
            await pool.close()

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
        pool = self.pool if self.pool is not None and self.pool.alive else None
        if isinstance(event, ev.CodeProposed) and self.config.sandbox and event.data.domain:
            static = await pool.static(view, _wire(event, delivery)) if pool else rule_code(view, event.data)
            if static.decision == "APPROVE":
                result = await self._run_sandbox(event.data, delivery)
            out = decide(view, event, source=self.bus.source, sandbox=result, static=static)
        elif pool is not None:
            out = await pool.decide(view, _wire(event, delivery))
        else:
            out = decide(view, event, source=self.bus.source)
            if time.perf_counter() - self._turn > TURN_S:
                # ruling in the loop holds it: let it run now and then (the batch taken
                # ahead is asked for, the last wave's verdicts go out, their acks come in)
                await asyncio.sleep(0)
                self._turn = time.perf_counter()
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
        # with decide workers a whole batch is handed to them at once (concurrency > 1 keeps
        # no order in any case): the workers stay busy and the verdicts settle in large waves
        concurrency = self.config.concurrency if self.pool is None else max(self.config.concurrency, BATCH)
        return Runner(self.bus, spec, self.handle, decode=lambda m: CODEC.decode(m.data), concurrency=concurrency,
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


__all__ = ["SafetySettings", "GateView", "Ruling", "decide", "rule_intent", "rule_code", "rule_sandbox", "rule_state", "evaluate_code", "SafetyGate", "DecidePool", "DecideWorkerError", "decide_workers", "serve"]
