"""The negentropy ledger: `scf run ledger`.

Each verified `energy.measured` becomes one balanced double-entry transfer — debit the
issuing account, credit the node's (or its client's) account, `micro_credits` =
saved kWh × rate × 10⁶, an integer — published on its own subject
`ledger.transfer.<transfer_id>` with `Nats-Expected-Last-Subject-Sequence: 0`, where
`transfer_id` is derived from the measurement id alone. So a cause is minted once, ever:
JetStream itself refuses a second message on that subject, whatever the redelivery, the
restart, the process that crashed between publishing and acking, or the duplicate window.

* A repeat whose content is identical (same measurement content, same amount and accounts)
  is acknowledged as already done.
* A repeat with different content for the same cause is refused: `ledger.rejected`
  ("conflict: …"), the first transfer stands.
* Unsigned, untrusted, wrongly signed (a node key signing for another node), negative,
  zero, non-finite or implausible (beyond `[ledger] max_saved_kwh`) savings are rejected
  with `ledger.rejected` and the reason — never the DLQ: a rejection is a business outcome.

Balances are a projection of the LEDGER stream (`balances`, `scf ledger balance`);
`verify` recomputes everything from the log (`scf ledger verify`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal

import msgspec

from scf.bus import codec, dlq
from scf.bus import events as ev
from scf.bus.client import Bus
from scf.bus.codec import Codec
from scf.bus.errors import DecodeError, PublishConflict, SCFError, SignatureError
from scf.bus.ids import derived_id
from scf.bus.runner import Delivery, Runner
from scf.bus.signing import TrustList
from scf.bus.streams import CONSUMERS
from scf.consumers import nodes as nodes_mod
from scf.bus.events import LedgerTransfer, Transfer

log = logging.getLogger("scf.ledger")

MICRO = 1_000_000


class LedgerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """`[ledger]` in scf.toml."""

    rate: float = 1.0  # credits per saved kWh
    max_saved_kwh: float = 100_000.0  # a single measurement saving more is implausible
    issuer: str = "issuer:negentropy"  # the account every mint debits
    account_label: str = "account"  # node label naming the account to credit (else node:<id>)
    require_signer_is_node: bool = True  # the signing key's name must be the node id
    batch: int = 500  # measurements fetched, decided and minted (atomically) together
    ack_wait: float = 30.0  # seconds before an unacknowledged measurement is redelivered
    gather_s: float = 0.05  # how long a batch waits to fill once its first measurement is in
    concurrency: int = 32  # the per-message path (`Ledger.runner`): measurements handled at once


class LedgerError(SCFError):
    pass


LEDGER_CONSUMER = CONSUMERS["ledger"]  # DEPLOY energy.measured.>


# --------------------------------------------------------------------------- pure rules


def transfer_id_for(cause_id: str) -> str:
    return derived_id("ledger.transfer", cause_id)


def dec(x: float) -> Decimal:
    return Decimal(repr(float(x)))


def saved_kwh(m: ev.Measurement) -> float:
    """baseline − actual, computed in decimal from the floats' shortest representations
    (0.3 − 0.1 is 0.2 here, not 0.19999999999999998)."""
    return float(dec(m.baseline_kwh) - dec(m.actual_kwh))


def micro_credits(kwh: float, rate: float) -> int:
    """kWh × rate in millionths of a credit, rounded half-even: integers keep the books exact."""
    return int((dec(kwh) * dec(rate) * MICRO).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def cause_digest(m: ev.Measurement) -> str:
    """sha256 over the fields that make a measurement what it is (stable across schema
    additions: new fields do not change old digests)."""
    canon = msgspec.json.encode(
        [m.measurement_id, m.node, m.deployment_id, m.period_start.isoformat(), m.period_end.isoformat(),
         repr(float(m.baseline_kwh)), repr(float(m.actual_kwh)), m.method, m.domain]
    )
    return "sha256:" + hashlib.sha256(canon).hexdigest()


def credit_account(node: str, labels: dict[str, str], settings: LedgerSettings) -> str:
    account = labels.get(settings.account_label, "").strip()
    if account:
        return account if ":" in account else f"client:{account}"
    return f"node:{node}"


def check(m: ev.Measurement, settings: LedgerSettings) -> str | None:
    """Why a measurement may not be minted, or None."""
    for name, value in (("baseline_kwh", m.baseline_kwh), ("actual_kwh", m.actual_kwh)):
        if not math.isfinite(value):
            return f"{name} is {value}: not a number"
        if value < 0:
            return f"{name} is negative ({value})"
    if m.period_end <= m.period_start:
        return f"period ends ({m.period_end.isoformat()}) before it starts ({m.period_start.isoformat()})"
    kwh = saved_kwh(m)
    if kwh < 0:
        return f"negative saving: actual {m.actual_kwh} kWh exceeds baseline {m.baseline_kwh} kWh"
    if kwh == 0:
        return "no saving: actual equals baseline"
    if kwh > settings.max_saved_kwh:
        return f"implausible saving: {kwh} kWh in one measurement, above [ledger] max_saved_kwh = {settings.max_saved_kwh}"
    if micro_credits(kwh, settings.rate) <= 0:
        return f"saving of {kwh} kWh is worth less than one micro-credit at rate {settings.rate}"
    return None


def transfer_for(measured: ev.EnergyMeasured, account: str, settings: LedgerSettings, source: str) -> LedgerTransfer:
    m = measured.data
    kwh = saved_kwh(m)
    t = Transfer(
        transfer_id=transfer_id_for(m.measurement_id),
        cause_id=m.measurement_id,
        debit_account=settings.issuer,
        credit_account=account,
        micro_credits=micro_credits(kwh, settings.rate),
        kwh=kwh,
        rate=float(settings.rate),
        cause_digest=cause_digest(m),
    )
    return LedgerTransfer.new(t, source=source, cause=measured)


def rejection(cause_id: str, reason: str, source: str, cause: ev.Event | None, key: str) -> ev.LedgerRejected:
    # One id per (cause event, reason kind): a redelivery re-publishes the same id.
    return ev.LedgerRejected.new(
        ev.LedgerRejection(cause_id=cause_id, reason=reason[:2000]),
        source=source,
        cause=cause,
        id=derived_id("ledger.rejected", cause.id if cause else cause_id, key),
    )


# --------------------------------------------------------------------------- minting


@dataclass(frozen=True)
class Minted:
    status: str  # new | duplicate | conflict
    seq: int
    existing: LedgerTransfer | None = None


TRANSFER_CODEC = Codec([LedgerTransfer])


async def mint(bus: Bus, transfer: LedgerTransfer, timeout: float = 5.0) -> Minted:
    """Publish `transfer` on its own subject only if the subject is empty (expected last
    subject sequence 0). Like `Bus.publish_once`, but compares with this module's codec
    (the catalog's Transfer would drop `cause_digest`)."""
    subject = transfer.subject()
    try:
        body = codec.sign(transfer, bus.key) if bus.key else codec.encode(transfer)
        ack = await bus.js.publish(subject, body, timeout=timeout, headers=bus.headers(transfer, expect_new=True))
        return Minted("duplicate" if ack.duplicate else "new", ack.seq)
    except Exception as exc:
        from scf.bus.client import map_error

        err = map_error(exc, subject)
        if not isinstance(err, PublishConflict):
            raise err from None
    msg = await bus.js.get_last_msg("LEDGER", subject)
    existing = TRANSFER_CODEC.decode(msg.data)
    assert isinstance(existing, LedgerTransfer)
    same = msgspec.json.encode(existing.data) == msgspec.json.encode(transfer.data)
    return Minted("duplicate" if same else "conflict", msg.seq or 0, existing)


@dataclass
class Decided:
    """What one measurement message comes to, before anything is published."""

    msg: object
    measured: ev.EnergyMeasured | None = None
    transfer: LedgerTransfer | None = None
    rejections: list[ev.Event] = field(default_factory=list)
    poison: str | None = None


class Ledger:
    """The ledger process: measurement in, transfer (or rejection) out.

    `run` is the process's loop: it fetches up to `[ledger] batch` measurements, decides
    each (verify, rules, amount), mints the new transfers in *atomic batches* (one write —
    and one fsync on a `sync_interval: always` server — per batch; every message still
    carries `Nats-Expected-Last-Subject-Sequence: 0`), publishes the rejections, then acks.
    A batch the server refuses as a whole (one of its causes is already minted: a repeat)
    is minted one by one with `mint`, which tells new from repeat from conflict. Any
    failure falls back to handling each message alone (`handle`, with the runner's rules:
    nak with backoff, the DLQ after max_deliver). Ack comes after publish, always: a crash
    anywhere redelivers, and the expected sequence makes the repeat harmless.
    """

    def __init__(self, bus: Bus, trust: TrustList, settings: LedgerSettings = LedgerSettings()) -> None:
        self.bus, self.trust, self.settings = bus, trust, settings
        self.plain = Codec([ev.EnergyMeasured])
        self.verified = Codec([ev.EnergyMeasured], trust=trust, require_signature=True, role="node")
        self.counts: dict[str, int] = defaultdict(int)
        self._labels: dict[str, tuple[float, dict[str, str]]] = {}
        self.spec = dataclasses.replace(LEDGER_CONSUMER, ack_wait=settings.ack_wait)

    async def labels(self, node: str) -> dict[str, str]:
        import time

        hit = self._labels.get(node)
        if hit and time.monotonic() - hit[0] < 30.0:
            return hit[1]
        info = await nodes_mod.get_node(self.bus, node)
        labels = info.labels if info else {}
        self._labels[node] = (time.monotonic(), labels)
        return labels

    def decode(self, msg):
        return msg  # verification needs the raw bytes; a bad signature is a rejection, not poison

    # ------------------------------------------------------------------ deciding
    async def decide(self, msg) -> Decided:
        src = self.bus.source
        try:
            measured = self.verified.decode(msg.data)
        except SignatureError as exc:
            try:
                unverified = self.plain.decode(msg.data)
            except DecodeError as exc2:
                return Decided(msg, poison=f"not an energy.measured event: {exc2}")
            assert isinstance(unverified, ev.EnergyMeasured)
            reason = f"unsigned or untrusted measurement: {exc}"
            mid = unverified.data.measurement_id
            return Decided(msg, unverified, rejections=[rejection(mid, reason, src, unverified, "signature")])
        except DecodeError as exc:
            return Decided(msg, poison=f"not an energy.measured event: {exc}")
        assert isinstance(measured, ev.EnergyMeasured)
        m = measured.data
        entry = self.trust.keys.get(measured.kid or "")
        signer = entry.name if entry else ""
        if self.settings.require_signer_is_node and signer != m.node:
            reason = (
                f"measurement for node {m.node!r} signed by key {measured.kid} named {signer!r}: "
                "a node may only report its own savings (trust its key under its node id)"
            )
            return Decided(msg, measured, rejections=[rejection(m.measurement_id, reason, src, measured, "signer")])
        reason = check(m, self.settings)
        if reason is not None:
            return Decided(msg, measured, rejections=[rejection(m.measurement_id, reason, src, measured, "invalid")])
        account = credit_account(m.node, await self.labels(m.node), self.settings)
        return Decided(msg, measured, transfer=transfer_for(measured, account, self.settings, src))

    async def settle(self, d: Decided) -> list[ev.Event]:
        """Mint one decided transfer on its own (expected sequence 0); the rejection to
        publish when the cause was minted before with other content."""
        assert d.transfer is not None and d.measured is not None
        transfer, m = d.transfer, d.measured.data
        minted = await mint(self.bus, transfer)
        self.counts[minted.status] += 1
        if minted.status != "conflict":
            return []
        e = minted.existing.data if minted.existing else None
        return [
            rejection(
                m.measurement_id,
                f"conflict: cause {m.measurement_id} was already minted as transfer {transfer.data.transfer_id} "
                f"(LEDGER seq {minted.seq}: {e.micro_credits if e else '?'} µcr to {e.credit_account if e else '?'}, "
                f"digest {e.cause_digest if e else '?'}) and this measurement differs: refused",
                self.bus.source, d.measured, f"conflict:{cause_digest(m)}",
            )
        ]

    # ------------------------------------------------------------------ one message (fallback, Runner)
    async def handle(self, msg, delivery: Delivery | None = None) -> list[ev.Event]:
        from scf.bus.runner import Poison

        d = await self.decide(msg)
        if d.poison is not None:
            raise Poison(d.poison)
        if d.rejections:
            self.counts["rejected"] += 1
            return d.rejections
        return await self.settle(d)

    def runner(self, pause=None, **kw) -> Runner:
        """The per-message path in the standard runner (one mint round trip per message)."""
        return Runner(
            self.bus, self.spec, self.handle, decode=self.decode,
            concurrency=max(1, self.settings.concurrency), pause=pause, **kw,
        )

    # ------------------------------------------------------------------ the batched loop
    async def run(self, stop, pause=None, fetch_timeout: float = 1.0) -> None:
        from scf.bus.runner import Pull, race

        # Pull rides out server restarts (fetch errors back off and re-bind, never raise);
        # the fallback runner's `process` never raises either.
        pull = Pull(self.bus, self.spec)
        fallback = self.runner(pause=pause)  # for its per-message retry / DLQ rules
        try:
            while not stop.is_set():
                if pause is not None and pause.engaged:
                    await race(pause.wait_clear(), stop)
                    continue
                msgs = await pull.fetch(1, fetch_timeout, stop)
                if not msgs:
                    continue
                # Wait (up to fetch_timeout) for the first measurement alone, then take what
                # else is there, up to a batch, waiting at most `gather_s` for it.
                if self.settings.batch > 1:
                    msgs += await pull.fetch(self.settings.batch - 1, self.settings.gather_s, stop)
                try:
                    await self.handle_batch(msgs)
                except Exception as exc:
                    log.warning("ledger batch of %d failed (%s: %s): handling one by one", len(msgs), type(exc).__name__, exc)
                    for msg in msgs:
                        await fallback.process(msg)
        finally:
            await pull.close()

    async def handle_batch(self, msgs: list) -> None:
        decided = [await self.decide(msg) for msg in msgs]
        poison = [d for d in decided if d.poison is not None]
        for d in poison:
            await dlq.dead_letter(self.bus, d.msg, stream=self.spec.stream, consumer=self.spec.durable, error=d.poison or "")
        out: list[ev.Event] = []
        first: dict[str, Decided] = {}
        later: list[Decided] = []
        for d in decided:
            if d.rejections:
                self.counts["rejected"] += 1
                out += d.rejections
            elif d.transfer is not None:
                # The first decision per cause goes into the atomic batch; a repeat inside
                # the same batch is settled after it (and found a duplicate or a conflict).
                tid = d.transfer.data.transfer_id
                if tid in first:
                    later.append(d)
                else:
                    first[tid] = d
        batch = list(first.values())
        if batch:
            committed = await commit_atomic(self.bus, [d.transfer for d in batch])  # type: ignore[misc]
            if committed:
                self.counts["new"] += len(batch)
            else:
                results = await asyncio.gather(*(self.settle(d) for d in batch))
                out += [e for r in results for e in r]
        for d in later:
            out += await self.settle(d)
        if out:
            await self.bus.publish_many(out)
        for d in decided:
            if d.poison is None:
                await d.msg.ack()


async def commit_atomic(bus: Bus, transfers: list[LedgerTransfer], timeout: float = 10.0) -> bool:
    """Publish `transfers` (distinct subjects) as atomic batches of at most 1000, each
    message with expected last subject sequence 0: all stored or none. False when the
    server refuses a batch (a cause already minted, or a stream without allow_atomic):
    then nothing of that batch is stored and the caller mints one by one. Mirrors
    `Bus.publish_batch`, which this becomes once `cause_digest` is in the catalog (its
    one-by-one fallback compares payloads through the catalog's types)."""
    from scf.bus.client import EXPECTED_LAST_SUBJECT_SEQ, SCF_TYPE
    from scf.bus.ids import new_id

    if len(transfers) > 1000:
        halves = [transfers[i : i + 1000] for i in range(0, len(transfers), 1000)]
        return all([await commit_atomic(bus, h, timeout) for h in halves])
    if len(transfers) == 1:
        return False  # one message: the plain expected-sequence publish is as cheap
    batch_id = new_id().replace("-", "")
    last = len(transfers)
    for i, t in enumerate(transfers, 1):
        headers = {"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(i), EXPECTED_LAST_SUBJECT_SEQ: "0",
                   SCF_TYPE: t.type_name()}
        body = codec.sign(t, bus.key) if bus.key else codec.encode(t)
        if i < last:
            await bus.nc.publish(t.subject(), body, headers=headers)
            continue
        headers["Nats-Batch-Commit"] = "1"
        reply = await bus.nc.request(t.subject(), body, timeout=timeout, headers=headers)
        ack = msgspec.json.decode(reply.data)
        if "error" in ack or ack.get("count") != last:
            log.debug("atomic batch refused (%s): minting one by one", ack.get("error"))
            return False
        return True
    return False


# --------------------------------------------------------------------------- the projection


@dataclass(frozen=True)
class Entry:
    seq: int
    subject: str
    transfer: Transfer
    at: str


async def read_transfers(bus: Bus) -> list[Entry]:
    out = []
    async for msg in nodes_mod.scan(bus, "LEDGER", "ledger.transfer.>"):
        e = TRANSFER_CODEC.decode(msg.data)
        assert isinstance(e, LedgerTransfer)
        out.append(Entry(msg.metadata.sequence.stream, msg.subject, e.data, e.at.isoformat()))
    return out


def balances(entries: list[Entry]) -> dict[str, int]:
    """Account → balance in micro-credits (credits positive, debits negative)."""
    bal: dict[str, int] = defaultdict(int)
    for e in entries:
        bal[e.transfer.debit_account] -= e.transfer.micro_credits
        bal[e.transfer.credit_account] += e.transfer.micro_credits
    return dict(bal)


def fmt_credits(micro: int) -> str:
    sign = "-" if micro < 0 else ""
    q, r = divmod(abs(micro), MICRO)
    return f"{sign}{q}.{r:06d}"


@dataclass
class VerifyReport:
    transfers: int = 0
    accounts: int = 0
    debits: int = 0
    credits: int = 0
    measurements: int = 0
    rejections: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        head = (
            f"{self.transfers} transfers, {self.accounts} accounts, debits {fmt_credits(self.debits)} = "
            f"credits {fmt_credits(self.credits)}; {self.measurements} measurements, {self.rejections} rejections in the log"
        )
        if self.ok:
            return [f"ok: {head}"]
        return [f"FAILED: {len(self.problems)} problem(s); {head}"] + [f"  {p}" for p in self.problems[:200]]


async def verify(bus: Bus, check_causes: bool = True) -> VerifyReport:
    """Recompute the books from the log and check them:

    * every transfer is balanced (one debit, one credit of the same positive integer
      amount, two distinct accounts) and the debits of all accounts equal the credits;
    * every transfer sits on the subject of its id, and its id is the one derived from
      its cause: no cause can have two subjects;
    * no cause was minted twice (one transfer per cause id, one message per subject);
    * its amount recomputes from kWh × rate;
    * (check_causes) its cause is a measurement in the DEPLOY log whose saving and content
      digest match the transfer."""
    report = VerifyReport()
    entries = await read_transfers(bus)
    report.transfers = len(entries)
    by_cause: dict[str, list[Entry]] = defaultdict(list)
    by_subject: dict[str, int] = defaultdict(int)
    for e in entries:
        t = e.transfer
        by_cause[t.cause_id].append(e)
        by_subject[e.subject] += 1
        if t.micro_credits <= 0:
            report.problems.append(f"seq {e.seq}: transfer {t.transfer_id} moves {t.micro_credits} µcr (must be positive)")
        if t.debit_account == t.credit_account:
            report.problems.append(f"seq {e.seq}: transfer {t.transfer_id} debits and credits the same account {t.debit_account}")
        if e.subject != f"ledger.transfer.{t.transfer_id}":
            report.problems.append(f"seq {e.seq}: transfer {t.transfer_id} sits on subject {e.subject}")
        if t.transfer_id != transfer_id_for(t.cause_id):
            report.problems.append(f"seq {e.seq}: transfer id {t.transfer_id} is not derived from its cause {t.cause_id}")
        if micro_credits(t.kwh, t.rate) != t.micro_credits:
            report.problems.append(
                f"seq {e.seq}: {t.kwh} kWh × {t.rate} is {micro_credits(t.kwh, t.rate)} µcr, the transfer says {t.micro_credits}"
            )
        report.debits += t.micro_credits
        report.credits += t.micro_credits
    for cause, items in by_cause.items():
        if len(items) > 1:
            report.problems.append(f"cause {cause} minted {len(items)} times (seqs {', '.join(str(i.seq) for i in items)})")
    for subject, n in by_subject.items():
        if n > 1:
            report.problems.append(f"subject {subject} holds {n} transfers")
    bal = balances(entries)
    report.accounts = len(bal)
    debit_side = -sum(v for v in bal.values() if v < 0)
    credit_side = sum(v for v in bal.values() if v > 0)
    if sum(bal.values()) != 0 or debit_side != credit_side:
        report.problems.append(f"balances do not sum to zero: debits {debit_side} µcr, credits {credit_side} µcr")
    async for msg in nodes_mod.scan(bus, "LEDGER", "ledger.rejected.>"):
        report.rejections += 1
    if check_causes:
        plain = Codec([ev.EnergyMeasured])
        digests: dict[str, set[str]] = defaultdict(set)
        async for msg in nodes_mod.scan(bus, "DEPLOY", "energy.measured.>"):
            try:
                m = plain.decode(msg.data)
            except DecodeError:
                continue
            assert isinstance(m, ev.EnergyMeasured)
            report.measurements += 1
            digests[m.data.measurement_id].add(cause_digest(m.data))
        for cause, items in by_cause.items():
            t = items[0].transfer
            seen = digests.get(cause)
            if not seen:
                report.problems.append(f"transfer {t.transfer_id}: its cause {cause} is not a measurement in the DEPLOY log")
            elif t.cause_digest and t.cause_digest not in seen:
                report.problems.append(f"transfer {t.transfer_id}: no measurement {cause} in the log has digest {t.cause_digest}")
    return report
