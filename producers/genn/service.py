"""`scf run genn`: answers approved `codegen` intents with code proposals.

    verdict.intent.approve (final, kind codegen) → the intent (its own subject, a direct get)
      → CodeRequest (the contract's task, the prompt rendered by cfr_prompt)
      → the backend's candidates → code.proposed × n (INTENTS), ruled on by the safety gate

The decision is a function of (generator, intent, verdict) → events (`answer`); the runner
owns the consumer, acks and retries. Proposal ids derive from (intent, verdict, index,
generator), and the search backend and seeded sampling write the same code again, so a
redelivered verdict republishes the same proposals (deduplicated). Generation runs in a
thread (a local model takes seconds to minutes); the runner keeps the message alive.

Intent params the process reads: `proposals` (how many, 1..64; default `[genn] proposals`),
`seed` (default: from the verdict), `contract` (a client contract's id: its constraints, read
from CONTRACTS as the regiment reads them — with `[regiment] require_signed_contracts`, the
default, only operator-signed terms count, so an unsigned event on CONTRACTS never reaches a
prompt), any `constraint.<name>` (scalar constraints) and the code contract's parameters
(`load_scale`, `voll`, `t_out_shift`, `comfort_weight`, `target`: producers/genn/contract.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from scf.bus import events as ev
from scf.bus.client import Bus
from scf.bus.codec import Codec
from scf.bus.ids import subject_token
from scf.bus.runner import Delivery, Poison, Runner
from scf.bus.streams import CONSUMERS, ConsumerSpec
from scf.producers.genn import CodeRequest, Generator, GennSettings, proposals
from scf.producers.genn.contract import ContractError

log = logging.getLogger("scf.genn")

MAX_PROPOSALS = 64
CODEC = Codec([ev.VerdictIssued])


def genn_consumer() -> ConsumerSpec:
    return CONSUMERS["genn"]


def constraints_of(intent: ev.Intent) -> dict[str, ev.Scalar]:
    return {k.removeprefix("constraint."): v for k, v in sorted(intent.params.items()) if k.startswith("constraint.")}


def count_of(intent: ev.Intent, default: int) -> int:
    n = intent.params.get("proposals", default)
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        return default
    return max(1, min(MAX_PROPOSALS, int(n)))


def seed_of(intent: ev.Intent, verdict_id: str) -> int:
    s = intent.params.get("seed")
    if isinstance(s, int) and not isinstance(s, bool):
        return s
    return int(hashlib.sha256(verdict_id.encode()).hexdigest()[:8], 16)


def answer(gen: Generator, settings: GennSettings, intent: ev.Intent, verdict: ev.VerdictIssued, *, source: str, ids=None,
           contract_constraints: dict | None = None) -> list[ev.CodeProposed]:
    """The proposals for one approved codegen intent (pure apart from the generator)."""
    cons = {**(contract_constraints or {}), **constraints_of(intent)}
    request = CodeRequest.for_intent(intent, cons)
    seed = seed_of(intent, verdict.data.verdict_id)
    candidates = gen.generate(request, count_of(intent, settings.proposals), seed)
    return proposals(request, candidates, gen.identity, seed=seed, source=source, cause=verdict, ids=ids)


async def contract_constraints(bus: Bus, contract_id: str, trust=None) -> dict:
    """A contract's constraints (its canonical JSON on CONTRACTS), for the task. With `trust`
    (a TrustList: the regiment's view) only operator-signed events count."""
    import json

    from scf.producers import contracts

    c = await contracts.get(bus, contract_id, trust)
    return json.loads(c.spec.constraints or "{}")


class GennProcess:
    """`trust`: a function returning the trust list contracts are read with (the regiment's view,
    read anew for each intent so a key trusted later counts), or None for every event."""

    def __init__(self, bus: Bus, settings: GennSettings, generator: Generator, trust=None) -> None:
        self.bus, self.settings, self.gen, self.trust = bus, settings, generator, trust
        self.answered = 0

    async def handle(self, event: ev.Event, delivery: Delivery) -> list[ev.Event] | None:
        if not isinstance(event, ev.VerdictIssued):
            return None
        v = event.data
        if v.subject_type != "intent" or v.kind != "codegen" or v.decision != "APPROVE" or not v.final:
            return None
        found = await self.bus.last(f"intent.created.codegen.{subject_token(v.subject_id)}")
        if found is None:
            raise Poison(f"approved codegen intent {v.subject_id} is not on the log (intent.created.codegen.{subject_token(v.subject_id)})")
        _, intent_event = found
        if not isinstance(intent_event, ev.IntentCreated):
            raise Poison(f"intent.created.codegen.{v.subject_id} holds a {intent_event.type_name()}, not an intent")
        from scf.producers.contracts import ContractError as NoContract

        cid = intent_event.data.params.get("contract")
        try:
            cons = await contract_constraints(self.bus, str(cid), self.trust() if self.trust else None) if cid else None
            out = await asyncio.to_thread(answer, self.gen, self.settings, intent_event.data, event, source=self.bus.source,
                                          ids=self.bus.ids, contract_constraints=cons)
        except (ContractError, NoContract) as exc:
            raise Poison(f"intent {v.subject_id}: {exc}") from None
        bad = sum(1 for p in out if p.data.error)
        log.info("intent %s (%s): %d proposals from %s, %d malformed", v.subject_id, intent_event.data.domain, len(out), self.gen.identity.label(), bad)
        self.answered += 1
        return list(out)

    def runner(self) -> Runner:
        return Runner(self.bus, genn_consumer(), self.handle, decode=lambda m: CODEC.decode(m.data), concurrency=1)


async def serve(bus: Bus, settings: GennSettings, generator: Generator, stop: asyncio.Event | None = None, trust=None) -> None:
    """`scf run genn`: answer until SIGTERM (`trust`: as GennProcess's)."""
    from scf.bus.runner import run_all

    proc = GennProcess(bus, settings, generator, trust)
    log.info("genn: backend %s", generator.identity.label())
    try:
        await run_all(bus, [proc.runner().run], stop)
    finally:
        generator.close()


__all__ = ["GennProcess", "answer", "serve", "genn_consumer", "constraints_of", "count_of", "seed_of"]
