"""The regiment: `scf run regiment` (docs/value-loop.md).

At the gear's heartbeat, every active contract that is due is struck, at most
`concurrency` at once. "Due" is one question — has the strike of the contract's current
inputs been completed? — because a strike's activity id is a function of the contract's
content, its schedule period (floor(now / schedule_s)) and the model that decides it: a
contract update, a new period or a newly promoted model each give a new activity id, and
so a new strike; anything else finds its strike done and skips it.

What decides is `[regiment] method` (or `scf run regiment --method`), as `scf strike
--method`: `exact` (the default: HiGHS; the domain's last production model is still part
of the inputs), `learned` (the learned optimiser promoted for the contract's domain, or
`checkpoint`; a domain with none fails its contracts' strikes with the one-line reason) or
`auto` (learned where one is promoted, else exact). The strike names the method and the
model (checkpoint id and sha256) in its inputs, capsule and proof; the progress record says
what decided each domain.

The emergency stop pauses the regiment between strikes (a strike in flight finishes its
step and the next waits). Progress goes to the `scf_state` KV key `regiment` (read by
`scf status --watch`) as a small JSON record.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from scf.bus.errors import ConfigError, SCFError
from scf.bus.ids import subject_token
from scf.producers import contracts as contracts_mod
from scf.producers import promoted as promoted_mod
from scf.producers import strike as strike_mod

log = logging.getLogger("scf.regiment")
KEY_REGIMENT = "regiment"


class RegimentSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[regiment]` in scf.toml."""

    concurrency: int = 4  # strikes at once
    measure: str = "sim"  # sim | live | none (StrikeOptions.measure)
    wait_s: float = 60.0  # per awaited step of a strike
    release_key: str = "release"  # the key in $SCF_HOME/keys that signs capsules and proofs
    heartbeat_s: float = 0.0  # 0: the gear's heartbeat
    require_signed_contracts: bool = True  # strike only contracts whose events an operator key signed
    method: str = "exact"  # exact | learned | auto: what decides (scf strike --method; producers.strike.decider)
    checkpoint: str = ""  # with learned|auto: this optimiser file for every domain instead of the one promoted for each

    def check(self) -> None:
        """ConfigError (one line) for a method/checkpoint that cannot work."""
        if self.method not in promoted_mod.METHODS:
            raise ConfigError(f"[regiment] method = {self.method!r}: use exact, learned or auto")
        if self.checkpoint and self.method == "exact":
            raise ConfigError("[regiment] checkpoint is a learned optimiser's file: set method = \"learned\" or \"auto\" with it")
        if self.checkpoint and not Path(self.checkpoint).is_file():
            raise ConfigError(f"[regiment] checkpoint {self.checkpoint}: no such file: give a learned optimiser's checkpoint "
                              "(scf train-optimiser writes one)")

    def options(self) -> strike_mod.StrikeOptions:
        """The options every strike starts from (the method resolved per domain by `due_contracts`)."""
        return strike_mod.StrikeOptions(method=self.method, checkpoint=Path(self.checkpoint) if self.checkpoint else None,
                                        measure=self.measure, wait_s=self.wait_s)


class Progress(msgspec.Struct, kw_only=True):
    """What `scf status --watch` shows: the last pass of the regiment."""

    pass_no: int = 0
    started_at: str = ""
    finished_at: str = ""
    contracts: int = 0
    due: int = 0
    done: int = 0
    statuses: dict[str, int] = {}
    paused: str = ""  # why the regiment waits (the emergency stop), "" when it does not
    method: str = ""  # [regiment] method
    decided_by: dict[str, str] = {}  # per domain of the last pass: what decided its strikes ("exact (HiGHS)", "learned optimiser ckpt-… (…)")


@dataclass
class PassReport:
    contracts: int = 0
    due: int = 0
    results: list[strike_mod.StrikeResult] = field(default_factory=list)
    seconds: float = 0.0
    decided_by: dict[str, str] = field(default_factory=dict)  # domain -> what decided (or why it could not)

    def statuses(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.status] = out.get(r.status, 0) + 1
        return out


async def due_contracts(bus, now: float, opts: strike_mod.StrikeOptions, trust, signed: bool = True, settings=None,
                        decided_by: dict[str, str] | None = None,
                        ) -> tuple[int, list[tuple[contracts_mod.Contract, strike_mod.StrikeOptions | str]]]:
    """(active contracts, those due now with the options their strike runs under); with
    `signed`, only contracts whose events an operator key signed. `opts.method` is resolved
    per domain (`promoted_mod.decider`; needs `settings` unless exact): a domain whose method
    cannot decide (learned, none promoted) gives its contracts the reason (a str) instead of
    options. `decided_by` (when given) receives, per domain, what decides or why not."""
    import dataclasses

    found = [c for c in (await contracts_mod.load(bus, trust=trust if signed else None)).values() if c.active]
    models: dict[str, tuple[strike_mod.StrikeOptions | str, str]] = {}
    final: set[str] | None = None  # deploy intents with a final verdict (read once per pass, when needed)
    out: list[tuple[contracts_mod.Contract, strike_mod.StrikeOptions | str]] = []
    for c in found:
        domain = c.spec.domain
        if domain not in models:
            models[domain] = await _domain_options(bus, settings, trust, domain, opts)
            if decided_by is not None:
                decided_by[domain] = models[domain][1]
        base = models[domain][0]
        if isinstance(base, str):
            out.append((c, base))
            continue
        o = dataclasses.replace(base, period=strike_mod.period_of(c.spec, now))
        activity = strike_mod.activity_id_for(c.spec.contract_id, strike_mod.sha256_json(strike_mod.inputs_of(c.spec, o)))
        if await strike_mod.completed(bus, activity, trust) is not None:
            continue
        # held for a human: nothing to redo until the intent is ruled on for good
        iid = strike_mod.intent_id_of(c.spec.contract_id, activity)
        if await bus.last(f"intent.created.deploy.{subject_token(iid)}") is not None:
            if final is None:
                final = await finally_ruled(bus)
            if iid not in final:
                continue
        out.append((c, o))
    return len(found), out


_WARNED: set[tuple[str, str]] = set()


async def _domain_options(bus, settings, trust, domain: str, opts: strike_mod.StrikeOptions
                          ) -> tuple[strike_mod.StrikeOptions | str, str]:
    """(the options a strike of `domain` runs under — method resolved, model named — or why
    none can (logged once per domain and reason), what decides in words)."""
    import dataclasses

    production = await strike_mod.production_model(bus, domain)
    if opts.method == "exact":
        return dataclasses.replace(opts, model=production or opts.model), "exact (HiGHS)"
    try:
        d = await promoted_mod.decider(bus, settings, trust, domain, opts.method, opts.checkpoint)
    except SCFError as exc:  # NotPromoted, PromotedRefused: that domain's contracts are not struck
        if (domain, str(exc)) not in _WARNED:
            _WARNED.add((domain, str(exc)))
            log.warning("regiment: contracts of %s are not struck (method %s): %s", domain, opts.method, exc)
        why = f"method {opts.method}: {exc}"
        return why, why
    return dataclasses.replace(opts, method=d.method, checkpoint=d.path, model=d.model or production or opts.model), d.label


async def finally_ruled(bus) -> set[str]:
    """The intents with a final verdict (approve or reject) on VERDICTS."""
    from scf.bus.codec import Codec
    from scf.bus.events import VerdictIssued
    from scf.bus.reader import read

    codec, out = Codec([VerdictIssued]), set()
    for m in await read(bus, "VERDICTS", ["verdict.intent.approve", "verdict.intent.reject"]):
        try:
            v = codec.decode(m.data)
        except Exception:  # noqa: BLE001 - not one we can read
            continue
        if v.data.final:
            out.add(v.data.subject_id)
    return out


async def one_pass(bus, settings, *, key, trust, opts: strike_mod.StrikeOptions, concurrency: int = 4,
                   gate=None, progress=None, now: float | None = None, signed: bool = True) -> PassReport:
    """Strike every due contract once, `concurrency` at a time; a strike's failure is its
    result (status "failed"), never the pass's."""
    t0 = time.perf_counter()
    report = PassReport()
    n, due = await due_contracts(bus, time.time() if now is None else now, opts, trust, signed, settings, report.decided_by)
    report.contracts, report.due = n, len(due)
    sem = asyncio.Semaphore(max(1, concurrency))
    node_locks: dict[str, asyncio.Lock] = {}

    async def one(c: contracts_mod.Contract, o: strike_mod.StrikeOptions | str) -> None:
        if isinstance(o, str):  # its domain's method cannot decide: the reason is its result
            report.results.append(strike_mod.StrikeResult("", "failed", f"{c.spec.contract_id}: {o}"))
            if progress is not None:
                await progress(report)
            return
        # one strike per node at a time: a node's orders then arrive in version order
        locks = [node_locks.setdefault(n, asyncio.Lock()) for n in sorted(set(c.spec.nodes))]
        async with contextlib.AsyncExitStack() as stack:
            for lk in locks:
                await stack.enter_async_context(lk)
            await stack.enter_async_context(sem)
            while gate is not None and gate.engaged:
                if progress is not None:
                    await progress(report, paused=gate.reason)
                await asyncio.sleep(0.2)
            try:
                r = await strike_mod.strike(bus, settings, c.spec, key=key, trust=trust, opts=o, contract_seq=c.seq,
                                            contract_event_id=c.event_id)
            except Exception as exc:  # noqa: BLE001 - one contract's problem is its own line
                r = strike_mod.StrikeResult("", "failed", f"{c.spec.contract_id}: {type(exc).__name__}: {exc}")
                log.warning("strike of %s failed: %s", c.spec.contract_id, r.detail)
            else:
                log.info("strike of %s: %s", c.spec.contract_id, strike_mod.summary(r))
            report.results.append(r)
            if progress is not None:
                await progress(report)

    await asyncio.gather(*(one(c, o) for c, o in due))
    report.seconds = time.perf_counter() - t0
    return report


async def run_regiment(settings, bus, *, key, trust, cfg: RegimentSettings = RegimentSettings(),
                       stop: asyncio.Event, gate=None) -> None:
    """Pass after pass at the gear's heartbeat until `stop`. Every wait (a pass's strikes,
    the progress record's KV put, the gear's read, the sleep between passes) ends at the
    stop (`until_stopped`): a pass cut there is abandoned, and its strikes not completed are
    struck by the next run (a strike's activity id is a function of its inputs: one
    completed already is skipped, one cut is struck again with the same ids)."""
    from scf.bus.gears import read_gear, spec
    from scf.bus.runner import Stopping, race, until_stopped

    try:
        kv = await until_stopped(bus.kv("scf_state"), stop)
    except Stopping:
        return
    state = Progress()

    async def progress(report: PassReport, paused: str = "") -> None:
        state.contracts, state.due, state.done = report.contracts, report.due, len(report.results)
        state.statuses, state.paused = report.statuses(), paused
        state.decided_by = dict(report.decided_by) or state.decided_by
        try:
            await until_stopped(kv.put(KEY_REGIMENT, msgspec.json.encode(state)), stop)
        except Exception as exc:  # noqa: BLE001 - progress is a courtesy (Stopping included: the pass ends at the stop)
            log.debug("regiment progress not written: %s", exc)

    opts = cfg.options()
    state.method = cfg.method
    while not stop.is_set():
        try:
            if gate is not None and gate.engaged:
                await progress(PassReport(), paused=gate.reason)
            else:
                state.pass_no += 1
                state.started_at, state.finished_at = _now(), ""
                report = await until_stopped(one_pass(bus, settings, key=key, trust=trust, opts=opts, concurrency=cfg.concurrency,
                                                      gate=gate, progress=progress, signed=cfg.require_signed_contracts), stop)
                state.finished_at = _now()
                await progress(report)
                if report.due:
                    log.info("regiment pass %d: %d contracts, %d due, %s in %.1f s; decided by %s", state.pass_no, report.contracts,
                             report.due, report.statuses(), report.seconds,
                             "; ".join(f"{k}: {v}" for k, v in sorted(report.decided_by.items())) or "-")
            beat = cfg.heartbeat_s or spec((await until_stopped(read_gear(bus), stop)).gear).heartbeat_s
        except Stopping:
            if state.started_at and not state.finished_at:
                log.warning("regiment: pass %d cut by the stop: its strikes not completed are struck by the next run", state.pass_no)
            else:
                log.info("regiment: a wait on the server (the progress record, the gear) cut by the stop")
            break
        await race(asyncio.sleep(beat), stop)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


