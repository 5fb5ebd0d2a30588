"""The negentropy ledger: `scf run ledger`.

Each verified `energy.measured` becomes one balanced double-entry transfer — debit the
issuing account, credit the node's (or its client's) account, `micro_credits` =
saved kWh × rate × 10⁶, an integer — published on its own subject
`ledger.transfer.<transfer_id>` with `Nats-Expected-Last-Subject-Sequence: 0`, where
`transfer_id` is derived from the cause alone. The cause is derived here from the
normalised content — (node, meter, period in UTC microseconds), `consumers/energy.py` —
never taken from the id a node supplies. So a cause is minted once, ever: JetStream itself
refuses a second message on that subject, whatever the redelivery, the restart, the
process that crashed between publishing and acking, or the duplicate window.

* A period that overlaps a minted period of the same (node, meter) is refused
  (`ledger.rejected` "overlap: …", naming the transfer it overlaps).
* A repeat whose content is identical (same normalised content, same amount and accounts)
  is acknowledged as already done.
* A repeat with different content for the same cause is refused: `ledger.rejected`
  ("conflict: …"), the first transfer stands.
* Unsigned, untrusted, wrongly signed (a node key signing for another node), negative,
  zero, non-finite (also `null` in the JSON) or implausible (beyond `[ledger]
  max_saved_kwh`) savings are rejected with `ledger.rejected` and the reason — never the
  DLQ: a rejection is a business outcome.

Every transfer names its **unit**, the instrument it is minted in: what its kWh are kWh
of (`UNITS`: electricity, fuel), from the measurement's stated `unit` or, when it states
none, from `[ledger] meter_units` for its meter; a measurement of no known unit, or one that
contradicts its meter's, is rejected. Credits of different units are never added together:
balances and verification are per (account, unit) (docs/ledger.md, "Units").

Balances are a projection of the LEDGER stream (`balances`, `scf ledger balance`);
`verify` recomputes everything from the log (`scf ledger verify`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal

import msgspec

from scf.bus import dlq
from scf.bus import events as ev
from scf.bus.client import Bus, Once, ack_many
from scf.bus.codec import Codec
from scf.bus.errors import DecodeError, SCFError, SignatureError
from scf.bus.events import LedgerTransfer, Transfer
from scf.bus.ids import derived_id
from scf.bus.reader import read
from scf.bus.runner import Delivery, Runner
from scf.bus.signing import TrustList
from scf.bus.streams import CONSUMERS, ConsumerSpec
from scf.consumers import nodes as nodes_mod
from scf.consumers.energy import (
    DEFAULT_METER,
    MAX_KWH,
    Cause,
    calibration_problem,
    content_digest,
    iso_micros,
    norm_meter,
    norm_method,
    normalise,
    utc_micros,
)

log = logging.getLogger("scf.ledger")

MICRO = 1_000_000

# The instruments: what a transfer's kWh are kWh of. A kWh of fuel is not a kWh of
# electricity (a unit of 35 % efficiency burns ~2.9 of the one per one of the other), so each
# is minted, balanced and verified apart; nothing here converts one into the other
# (docs/ledger.md, "Units": why no primary-energy or CO2e factor).
ELECTRIC = "kwh-electric"
FUEL = "kwh-fuel"
UNITS: dict[str, str] = {
    ELECTRIC: "kWh of electricity (final energy at the site's meter)",
    FUEL: "kWh of fuel (thermal input to the generating units, as their fuel meters read it)",
}


def norm_unit(unit: str) -> str:
    return " ".join(unit.split()).casefold()


def _known_units() -> str:
    return ", ".join(f"{u} ({d})" for u, d in UNITS.items())


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
    # threads verifying a batch's signatures (Ed25519 verification releases the GIL: on a free
    # core the threads verify side by side, and the next batch is verified while one is
    # minted); 1 = in the loop, one after the other; -1 = 2 where the process may use two
    # CPUs or more, else 1 (`verify_threads_for`)
    verify_threads: int = -1
    # M&V (docs/mv.md): every measurement must state a baseline calibrated to ASHRAE Guideline
    # 14 and its uncertainty (IPMVP Option D). `false` accepts plain meter-vs-baseline readings
    # without either: not IPMVP Option D compliant (a measurement that states a calibration or
    # an Option D method is still checked).
    require_calibration: bool = True
    max_fsu: float = 0.5  # the saving's stated uncertainty may be at most this fraction of it (Guideline 14)
    # The unit of a measurement that states none, by its meter (UNITS; docs/ledger.md "Units"):
    # HVAC sites meter electricity on their main meter, grid sites report fuel on `fuel`. A
    # meter not listed here must state its unit; a stated unit must agree with its meter's.
    meter_units: dict[str, str] = msgspec.field(default_factory=lambda: {"main": ELECTRIC, "fuel": FUEL})

    def __post_init__(self) -> None:
        for meter, unit in self.meter_units.items():
            if norm_unit(unit) not in UNITS:
                raise ValueError(f"meter_units.{meter} = {unit!r} is not a unit the ledger knows: use one of {', '.join(UNITS)}")


class LedgerError(SCFError):
    pass


def verify_threads_for(settings: LedgerSettings) -> int:
    """The verifying threads `settings` asks for on this host. -1: two where the process may
    use two CPUs or more, else one. Measured (benchmarks/RESULTS.md, issue 16, goal 4): on
    the quiet 2-CPU VM, with nats-server on the same two CPUs, two threads mint 0.64-0.72x the
    one-thread verify floor against 0.53-0.56x with one (five runs each, 2026-12-03), on two
    pinned CPUs of a quiet 16-core host 0.86x against 0.54x, for about 6 % more CPU a
    measurement (session 6's loaded VM had measured no gain; its 2-CPU default was one). The
    CPUs the process may use, not the load: a load average lags, counts this process too,
    and would fix at start a choice made under a passing load."""
    if settings.verify_threads >= 1:
        return settings.verify_threads
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return 2 if cpus >= 2 else 1


VERIFY_CHUNK_MIN = 32  # a batch is verified in threads only in chunks of at least this many
AHEAD_WAIT_S = 0.002  # how long taking the next batch (while one is handled) waits for it
TAKE_AHEAD = True  # take (and verify) the next batch while one is handled (verify_threads > 1)


async def _give_back(bus: Bus, spec: ConsumerSpec, msgs: list, verifying: asyncio.Future) -> None:
    """A batch taken ahead and not handled (a stop): nak'ed, so it is redelivered at once
    (to the next process) instead of after ack_wait; a measurement on the server's last
    delivery, which a nak would lose, dead-lettered instead (`dlq.give_back`)."""
    verifying.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await verifying
    for m in msgs:
        await dlq.give_back(bus, m, spec, "stopped")


async def _keep_alive(msgs: list, ack_wait: float) -> None:
    """In-progress acks for the messages in hand (`msgs`, read at each round: it may grow),
    every third of ack_wait, until cancelled: held, not redelivered, and no delivery spent."""
    interval = max(0.5, ack_wait / 3)
    while True:
        await asyncio.sleep(interval)
        for m in msgs:
            with contextlib.suppress(Exception):  # settled or connection gone: ack_wait takes over
                await m.in_progress()


@dataclass(frozen=True)
class _Failed:
    """A body whose verified decode raised `exc` (in a verifying thread)."""

    exc: Exception


LEDGER_CONSUMER = CONSUMERS["ledger"]  # DEPLOY energy.measured.>
LEDGER_STREAM = "LEDGER"


# --------------------------------------------------------------------------- pure rules


TRANSFER_CODEC = Codec([LedgerTransfer])


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
    return _micro(kwh, dec(rate))


_ONE = Decimal(1)


def _micro(kwh: float, rate: Decimal) -> int:
    """`micro_credits` with the rate as `dec(rate)` already."""
    return int((dec(kwh) * rate * MICRO).quantize(_ONE, rounding=ROUND_HALF_EVEN))


# sha256 over the *normalised* content (consumers/energy.py): `10:00Z` and `11:00+01:00`,
# `Metered` and `metered` are one claim, whatever ids the node put on it.
cause_digest = content_digest


def credit_account(node: str, labels: dict[str, str], settings: LedgerSettings) -> str:
    account = labels.get(settings.account_label, "").strip()
    if account:
        return account if ":" in account else f"client:{account}"
    return f"node:{node}"


def account_problem(node: str, account: str, settings: LedgerSettings) -> str | None:
    """Why a node's registry label may not name `account`: a node's credits go to a client
    account (`client:…`) or its own (`node:<id>`), never to the issuer or another node."""
    if account == f"node:{node}" or (account.startswith("client:") and len(account) > len("client:")):
        return None
    return (f"node {node}'s registry label {settings.account_label}={account!r} names no client account: "
            f"credits go to client:<name> (label {settings.account_label}=<name>) or node:{node}")


_MAIN_ONLY = frozenset({DEFAULT_METER})


def allowed_meters(labels: dict[str, str]) -> set[str]:
    """The node's main meter, plus those its (signed) registry entry lists: `meters=a,b`."""
    return {DEFAULT_METER} | {norm_meter(x) for x in labels.get("meters", "").split(",") if x.strip()}


def unit_of(m: ev.Measurement, meter: str, settings: LedgerSettings) -> tuple[str, str | None]:
    """(the unit the measurement is minted in, None) or ("", why it has no known unit).
    `meter`: the normalised meter."""
    meter_unit = _meter_units(tuple(settings.meter_units.items())).get(meter)
    stated = norm_unit(m.unit)
    if stated:
        if stated not in UNITS:
            what = "ambiguous: kWh of what?" if stated in ("kwh", "kw h", "kw·h") else "not a unit the ledger knows"
            return "", (f"unknown unit {m.unit!r} ({what}): state the unit the kWh are measured in, one of "
                        f"{_known_units()}")
        if meter_unit is not None and stated != meter_unit:
            return "", (f"unit {stated} contradicts meter {meter}, which measures {meter_unit} ([ledger] meter_units): "
                        f"report {stated} on a meter of that unit, or correct the unit")
        return stated, None
    if meter_unit is None:
        return "", (f"no unit: meter {meter!r} of node {m.node} has none in [ledger] meter_units and the measurement "
                    f"states none: state unit = one of {_known_units()}, or map the meter in [ledger] meter_units")
    return meter_unit, None


@functools.lru_cache(maxsize=16)
def _meter_units(items: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """`[ledger] meter_units` normalised (meter → unit), once per setting."""
    return {norm_meter(k): norm_unit(v) for k, v in items}


def check(m: ev.Measurement, settings: LedgerSettings, cause: Cause | None = None) -> str | None:
    """Why a measurement may not be minted, or None. `cause`: `normalise(m)`, when the
    caller has it already."""
    return priced_check(m, settings, cause)[0]


def priced_check(
    m: ev.Measurement, settings: LedgerSettings, cause: Cause | None = None, rate: Decimal | None = None,
) -> tuple[str | None, float, int]:
    """(`check`'s answer, the saving in kWh, its micro-credits): the amount computed once for
    the rules and the transfer. `rate`: `dec(settings.rate)`, when the caller has it already.
    The kWh and micro-credits are 0 when the rules stop before pricing."""
    for name, value in (("baseline_kwh", m.baseline_kwh), ("actual_kwh", m.actual_kwh)):
        if not math.isfinite(value):
            return f"{name} is {value}: not a number", 0.0, 0
        if value < 0:
            return f"{name} is negative ({value})", 0.0, 0
        if value > MAX_KWH:
            return f"{name} is {value:g} kWh: absurd for one reading (above {MAX_KWH:g})", 0.0, 0
    c = cause or normalise(m)  # compared as UTC microseconds: a naive and an aware time compare too
    if c.end_us <= c.start_us:
        return f"period ends ({m.period_end.isoformat()}) before it starts ({m.period_start.isoformat()})", 0.0, 0
    kwh = saved_kwh(m)
    if kwh < 0:
        return f"negative saving: actual {m.actual_kwh} kWh exceeds baseline {m.baseline_kwh} kWh", kwh, 0
    if kwh == 0:
        return "no saving: actual equals baseline", kwh, 0
    if kwh > settings.max_saved_kwh:
        return (f"implausible saving: {kwh} kWh in one measurement, above [ledger] max_saved_kwh = {settings.max_saved_kwh}",
                kwh, 0)
    micro = _micro(kwh, dec(settings.rate) if rate is None else rate)
    if micro <= 0:
        return f"saving of {kwh} kWh is worth less than one micro-credit at rate {settings.rate}", kwh, micro
    return mv_problem(m, kwh, settings), kwh, micro


def mv_problem(m: ev.Measurement, kwh: float, settings: LedgerSettings) -> str | None:
    """The calibration rule (IPMVP Option D, ASHRAE Guideline 14; docs/mv.md): every
    measurement — unless `[ledger] require_calibration = false`, and then still one that
    states a calibration or an Option D method — is minted only with a passing calibration
    and a stated uncertainty no larger than `max_fsu` of the saving."""
    if m.calibration is None and "option-d" not in norm_method(m.method) and not settings.require_calibration:
        return None
    if (problem := calibration_problem(m.calibration, m.uncertainty_kwh, m.confidence)) is not None:
        return problem
    u = m.uncertainty_kwh
    if u > settings.max_fsu * kwh:
        return (f"saving too uncertain: ±{u:.3g} kWh at {m.confidence:.0%} confidence is more than "
                f"{settings.max_fsu:.0%} of the {kwh:.3g} kWh saved (ASHRAE Guideline 14)")
    return None


def transfer_for(
    measured: ev.EnergyMeasured, account: str, settings: LedgerSettings, source: str, *,
    cause: Cause | None = None, cause_id: str | None = None, unit: str | None = None,
    priced: tuple[float, int] | None = None,
) -> LedgerTransfer:
    """The transfer for a checked measurement. Its cause is derived here from the
    normalised content; the node's `measurement_id` is never trusted. `cause` and
    `cause_id`: `normalise(m)` and its id, when the caller has them already (the hot path
    derives each once). `unit`: `unit_of(m, …)` (resolved here when not given; a measurement
    of no known unit must have been rejected before). `priced`: (kWh, micro-credits) as
    `priced_check` computed them."""
    m = measured.data
    c = cause or normalise(m)
    if unit is None:
        unit, problem = unit_of(m, c.meter, settings)
        if problem is not None:
            raise LedgerError(problem)
    cid = cause_id or c.id
    if priced is None:
        kwh = saved_kwh(m)
        micro = micro_credits(kwh, settings.rate)
    else:
        kwh, micro = priced
    tid = transfer_id_for(cid)
    t = Transfer(
        transfer_id=tid,
        cause_id=cid,
        debit_account=settings.issuer,
        credit_account=account,
        micro_credits=micro,
        kwh=kwh,
        rate=float(settings.rate),
        cause_digest=cause_digest(m, c),
        node=c.node,
        meter=c.meter,
        period_start_us=c.start_us,
        period_end_us=c.end_us,
        unit=unit,
    )
    # `LedgerTransfer.new(t, source=source, cause=measured)`, its id derived as `Event.new`
    # derives it (the cause's id, the type, "transfer_id=<id>": `_payload_key`), built here
    # without looking the payload's key up field by field.
    return LedgerTransfer(
        id=derived_id(measured.id, _TRANSFER_TYPE, "transfer_id=" + tid),
        at=ev.utcnow(),
        source=source,
        correlation_id=measured.correlation_id or measured.id,
        causation_id=measured.id,
        data=t,
    )


_TRANSFER_TYPE = LedgerTransfer.type_name()


def rejection(cause_id: str, reason: str, source: str, cause: ev.Event | None, key: str) -> ev.LedgerRejected:
    # One id per (cause event, reason kind): a redelivery re-publishes the same id.
    return ev.LedgerRejected.new(
        ev.LedgerRejection(cause_id=cause_id, reason=reason[:2000]),
        source=source,
        cause=cause,
        id=derived_id("ledger.rejected", cause.id if cause else cause_id, key),
    )


# --------------------------------------------------------------------------- minted periods


@dataclass(frozen=True)
class Claim:
    """A minted period of one (node, meter)."""

    start_us: int
    end_us: int
    cause_id: str
    transfer_id: str
    seq: int

    def period(self) -> str:
        return f"[{iso_micros(self.start_us)}, {iso_micros(self.end_us)})"


class Periods:
    """Minted periods per (node, meter), sorted by start: what the ledger checks a new
    cause against so that no energy is credited twice. Rebuilt from the LEDGER stream at
    start (each transfer records its normalised cause) and extended on every mint."""

    def __init__(self) -> None:
        self._claims: dict[tuple[str, str], list[Claim]] = defaultdict(list)
        self._starts: dict[tuple[str, str], list[int]] = defaultdict(list)  # the claims' starts, for bisecting
        self._causes: set[str] = set()
        self.minted: dict[str, int] = {}  # transfer id (its subject) → LEDGER seq, for every transfer
        self._accounts: dict[str, tuple[int, str]] = {}  # node → (seq, account) of its latest transfer

    def __len__(self) -> int:
        return sum(len(v) for v in self._claims.values())

    def overlapping(self, key: tuple[str, str], start_us: int, end_us: int, cause: str) -> Claim | None:
        """A claim of another cause whose period intersects [start, end), or None."""
        claims = self._claims.get(key)
        if not claims:
            return None
        i = bisect.bisect_left(self._starts[key], end_us)  # claims[:i] start before `end`
        for c in reversed(claims[max(0, i - 4) : i]):  # sorted, disjoint: only the last few can reach `start`
            if c.end_us > start_us and c.cause_id != cause:
                return c
        return None

    def add(self, key: tuple[str, str], claim: Claim) -> None:
        if claim.cause_id in self._causes:  # a cause is one (node, meter, period): never twice
            return
        self._causes.add(claim.cause_id)
        starts = self._starts[key]
        i = bisect.bisect_right(starts, claim.start_us)  # where `bisect.insort(…, key=start_us)` puts it
        starts.insert(i, claim.start_us)
        self._claims[key].insert(i, claim)

    def add_transfer(self, t: Transfer, seq: int) -> None:
        self.minted.setdefault(t.transfer_id, seq)
        if t.node and t.period_end_us > t.period_start_us:
            self.add((t.node, t.meter), Claim(t.period_start_us, t.period_end_us, t.cause_id, t.transfer_id, seq))
        if t.node and seq >= self._accounts.get(t.node, (-1, ""))[0]:
            self._accounts[t.node] = (seq, t.credit_account)

    def last_account(self, node: str) -> str | None:
        """The account the node's latest transfer credited, if any."""
        hit = self._accounts.get(node)
        return hit[1] if hit else None


def overlap_reason(c: Cause, claim: Claim) -> str:
    return (
        f"overlap: node {c.node} meter {c.meter} period {c.period()} overlaps transfer {claim.transfer_id} "
        f"(cause {claim.cause_id}, period {claim.period()}, LEDGER seq {claim.seq}): energy is credited once; "
        "report each period once, without overlaps"
    )


class _LooseData(msgspec.Struct):
    node: object = None
    meter: object = None
    period_start: object = None
    period_end: object = None


class _LooseEvent(msgspec.Struct):
    """Enough of an `energy.measured` that failed to decode to reject it with a reason."""

    type: str = ""
    data: _LooseData | None = None


def loose_cause(buf: bytes) -> tuple[str, str] | None:
    """(cause id, what it names) of a payload that claims to be an energy.measured but does
    not decode (null / non-finite energy, a wrong type): None when it does not even claim."""
    try:
        loose = msgspec.json.decode(buf, type=_LooseEvent)
    except msgspec.DecodeError:
        return None
    if loose.type != ev.EnergyMeasured.type_name():
        return None
    d = loose.data
    try:
        if d is None or not isinstance(d.node, str):
            raise ValueError("no node")
        start = msgspec.convert(d.period_start, dt.datetime)
        end = msgspec.convert(d.period_end, dt.datetime)
        meter = norm_meter(d.meter if isinstance(d.meter, str) else "")
        c = Cause(d.node, meter, utc_micros(start), utc_micros(end))
        return c.id, f"node {c.node} meter {c.meter} period {c.period()}"
    except (msgspec.ValidationError, TypeError, ValueError, OverflowError):
        return "unreadable-" + hashlib.sha256(buf).hexdigest()[:32], "an unreadable measurement"


@dataclass
class Decided:
    """What one measurement message comes to, before anything is published."""

    msg: object
    measured: ev.EnergyMeasured | None = None
    cause: Cause | None = None
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
    is minted one by one (`Bus.publish_batch` falls back to `Bus.publish_once`, which tells
    new from repeat from conflict). Any failure falls back to handling each message alone
    (`handle`, with the runner's rules: nak with backoff, the DLQ after max_deliver). Ack
    comes after publish, always: a crash anywhere redelivers, and the expected sequence
    makes the repeat harmless.

    The cause is derived from the normalised content (`energy.normalise`), and a cause
    whose period overlaps a minted period of the same (node, meter) is rejected: `periods`
    holds them, rebuilt from the LEDGER stream before the first decision and extended on
    every mint, under one lock per (node, meter) on the per-message path.
    """

    def __init__(self, bus: Bus, trust: TrustList, settings: LedgerSettings = LedgerSettings()) -> None:
        # What `check` needs (Guideline 14's criteria, consumers/energy.calibration_problem), imported
        # with the process instead of by its first decision: numpy comes with it (≈ 0.1 s of CPU,
        # 0.3 s on a loaded host), a cost of the process's start, not of its first measurement.
        import scf.domains.mv  # noqa: F401

        self.bus, self.trust, self.settings = bus, trust, settings
        self.plain = Codec([ev.EnergyMeasured])
        self.verified = Codec([ev.EnergyMeasured], trust=trust, require_signature=True, role="node")
        self.counts: dict[str, int] = defaultdict(int)
        self._labels: dict[str, tuple[float, nodes_mod.NodeInfo | None]] = {}
        self._newest: dict[str, nodes_mod.NodeInfo] = {}
        self.spec = dataclasses.replace(LEDGER_CONSUMER, ack_wait=settings.ack_wait)
        self.periods = Periods()
        self._loaded = False
        self._load_lock = asyncio.Lock()
        # settings read once, not per measurement
        self._units = _meter_units(tuple(settings.meter_units.items()))
        self._rate = dec(settings.rate)
        self.verify_threads = verify_threads_for(settings)
        # node → (the labels object it was derived from, allowed meters, account, account problem):
        # recomputed whenever `labels` gives another object (refetched)
        self._views: dict[str, tuple[dict[str, str], set[str], str, str | None]] = {}
        self.last_seq = 0  # the LEDGER sequence the index covers: the fencing token of every mint
        self._write_lock = asyncio.Lock()  # one mint at a time in this process

    async def load(self) -> None:
        """Rebuild the minted periods from the LEDGER stream (once, before deciding)."""
        if self._loaded:
            return
        async with self._load_lock:
            if self._loaded:
                return
            last = await self.bus.stream_last_seq(LEDGER_STREAM)
            entries = await read_transfers(self.bus)
            for e in entries:
                self.periods.add_transfer(e.transfer, e.seq)
            self.last_seq = last
            self._loaded = True
            log.info("ledger: %d minted periods loaded from %d transfers (LEDGER seq %d)", len(self.periods),
                     len(entries), last)

    async def catch_up(self) -> bool:
        """Index what was written to LEDGER since `last_seq` (by another ledger, by our own
        unacknowledged publishes, rejections); False when nothing was."""
        last = await self.bus.stream_last_seq(LEDGER_STREAM)
        if last <= self.last_seq:
            return False
        found = await read(self.bus, LEDGER_STREAM, "ledger.transfer.>", start_seq=self.last_seq + 1, end_seq=last)
        for m in found:
            e = TRANSFER_CODEC.decode(m.data)
            if isinstance(e, LedgerTransfer):
                self.periods.add_transfer(e.data, m.seq)
        log.info("ledger: caught up LEDGER seqs %d..%d (%d transfers written elsewhere)", self.last_seq + 1, last, len(found))
        self.last_seq = last
        return True

    async def labels(self, node: str) -> dict[str, str] | None:
        """The node's labels from its registry entry, believed only when signed by the
        node's own trusted key (an `edge` login may write any entry); None without such an
        entry. While this ledger runs, the newest entry it believed stands when the
        registry later holds none (deleted, forged) or an older one (a replay)."""
        hit = self._labels.get(node)
        if hit and time.monotonic() - hit[0] < 30.0:
            return hit[1].labels if hit[1] else None
        info = await nodes_mod.get_node(self.bus, node, trust=self.trust)
        newest = self._newest.get(node)  # the newest entry believed while this ledger runs
        older = (info is not None and newest is not None and info.updated_at is not None
                 and newest.updated_at is not None and info.updated_at < newest.updated_at)
        if newest is not None and (info is None or older):
            if info is not None:
                log.warning("scf_nodes/%s: an older entry (%s) replaced a newer one (%s): keeping the newer", node,
                            info.updated_at, newest.updated_at)
            info = newest
        elif info is not None:
            self._newest[node] = info
        self._labels[node] = (time.monotonic(), info)
        return info.labels if info else None

    def decode(self, msg):
        return msg  # verification needs the raw bytes; a bad signature is a rejection, not poison

    # ------------------------------------------------------------------ deciding
    def _verify_each(self, bodies: list[bytes]) -> list:
        """`verified.decode` of each body: the event, or the exception it raised (kept, so
        `decide` handles it exactly as if it had decoded the message itself)."""
        out: list = []
        for b in bodies:
            try:
                out.append(self.verified.decode(b))
            except Exception as exc:  # noqa: BLE001 - re-raised per message by `decide`
                out.append(_Failed(exc))
        return out

    async def verify_batch(self, msgs: list) -> list:
        """`_verify_each` for a fetched batch, split over `[ledger] verify_threads` threads
        when the batch is large enough to pay for them."""
        bodies = [m.data for m in msgs]
        threads = self.verify_threads
        if threads == 1 or len(bodies) < 2 * VERIFY_CHUNK_MIN:
            return self._verify_each(bodies)
        size = max(VERIFY_CHUNK_MIN, -(-len(bodies) // threads))
        parts = await asyncio.gather(*(asyncio.to_thread(self._verify_each, bodies[i : i + size])
                                       for i in range(0, len(bodies), size)))
        return [r for part in parts for r in part]

    async def decide(self, msg, verified=None) -> Decided:
        """Verify, check and price one measurement (no overlap check: that needs the
        minted periods, see `claim`). `verified`: the message's `verify_batch` result, when
        its batch was verified together."""
        if verified is None:
            verified = self._verify_each([msg.data])[0]
        return self.decide_now(msg, verified, await self.believed([verified]))

    async def decide_batch(self, msgs: list, checked: list) -> list[Decided]:
        """`decide` for a verified batch (`checked`: its `verify_batch` result): the registry
        labels read once per node, then every decision without an await."""
        believed = await self.believed(checked)
        return [self.decide_now(msg, v, believed) for msg, v in zip(msgs, checked)]

    async def believed(self, checked: list) -> dict[str, dict[str, str] | None]:
        """`labels(node)` of every node that `decide_now` may credit in `checked`: those of
        its verified measurements signed by the node's own key (or by any trusted key when
        `require_signer_is_node` is off). The trust list may change while a label is read
        (the trust view runs beside): the nodes are looked up again until none is missing,
        so `decide_now`, which runs right after without an await, finds each it needs."""
        out: dict[str, dict[str, str] | None] = {}
        while True:
            keys, own = self.trust.keys, self.settings.require_signer_is_node
            missing: dict[str, None] = {}
            for v in checked:
                if isinstance(v, ev.EnergyMeasured) and v.data.node not in out:
                    entry = keys.get(v.kid or "")
                    if not own or (entry is not None and entry.name == v.data.node):
                        missing[v.data.node] = None
            if not missing:
                return out
            for node in missing:
                out[node] = await self.labels(node)

    def decide_now(self, msg, verified, believed_of: dict[str, dict[str, str] | None]) -> Decided:
        """`decide` with the message verified (`verify_batch`'s result for it) and its node's
        labels read (`believed`)."""
        src = self.bus.source
        try:
            if isinstance(verified, _Failed):
                raise verified.exc
            measured = verified
        except SignatureError as exc:
            try:
                unverified = self.plain.decode(msg.data)
            except DecodeError as exc2:
                return self._undecodable(msg, exc2)
            assert isinstance(unverified, ev.EnergyMeasured)
            reason = f"unsigned or untrusted measurement: {exc}"
            cid = normalise(unverified.data).id
            return Decided(msg, unverified, rejections=[rejection(cid, reason, src, unverified, "signature")])
        except DecodeError as exc:
            return self._undecodable(msg, exc)
        assert isinstance(measured, ev.EnergyMeasured)
        m = measured.data
        c = normalise(m)
        cid = c.id  # a uuid5: derived once per measurement
        entry = self.trust.keys.get(measured.kid or "")
        signer = entry.name if entry else ""
        if self.settings.require_signer_is_node and signer != m.node:
            reason = (
                f"measurement for node {m.node!r} signed by key {measured.kid} named {signer!r}: "
                "a node may only report its own savings (trust its key under its node id)"
            )
            return Decided(msg, measured, c, rejections=[rejection(cid, reason, src, measured, "signer")])
        reason, kwh, micro = priced_check(m, self.settings, c, self._rate)
        if reason is not None:
            return Decided(msg, measured, c, rejections=[rejection(cid, reason, src, measured, "invalid")])
        believed = believed_of[m.node]
        if believed is None:
            allowed: set[str] | frozenset[str] = _MAIN_ONLY
            # No entry signed by the node (none yet, deleted or overwritten by another edge
            # login): the account its latest transfer credited, else its own.
            account = self.periods.last_account(m.node) or f"node:{m.node}"
            problem = None
        else:
            allowed, account, problem = self._view(m.node, believed)
        if c.meter not in allowed:
            reason = (f"unknown meter {c.meter!r} of node {m.node}: a node reports its main meter, or those its "
                      f"signed registry entry lists (label meters={c.meter})")
            return Decided(msg, measured, c, rejections=[rejection(cid, reason, src, measured, "meter")])
        unit = self._units.get(c.meter) if not m.unit else None
        if unit is None:  # a stated unit, or a meter of no unit: `unit_of` says which, or why not
            unit, reason = unit_of(m, c.meter, self.settings)
            if reason is not None:
                return Decided(msg, measured, c, rejections=[rejection(cid, reason, src, measured, "unit")])
        if believed is None:
            problem = account_problem(m.node, account, self.settings)
        if problem is not None:
            return Decided(msg, measured, c, rejections=[rejection(cid, problem, src, measured, "account")])
        return Decided(msg, measured, c, transfer=transfer_for(measured, account, self.settings, src, cause=c, cause_id=cid,
                                                                unit=unit, priced=(kwh, micro)))

    def _view(self, node: str, labels: dict[str, str]) -> tuple[set[str], str, str | None]:
        """(allowed meters, account, why the account may not be credited) for a node's believed
        labels, derived once per labels object."""
        hit = self._views.get(node)
        if hit is None or hit[0] is not labels:
            account = credit_account(node, labels, self.settings)
            hit = self._views[node] = (labels, allowed_meters(labels), account, account_problem(node, account, self.settings))
        return hit[1], hit[2], hit[3]

    def _undecodable(self, msg, exc: Exception) -> Decided:
        """A payload that claims to be an energy.measured but does not decode (null or
        non-finite energy, a field of the wrong type) is a business rejection with the
        reason; anything else has no cause to reject and is poison (the DLQ)."""
        found = loose_cause(msg.data)
        if found is None:
            return Decided(msg, poison=f"not an energy.measured event: {exc}")
        cid, what = found
        reason = (f"unreadable measurement ({what}): {exc}; energy must be a finite number of kWh "
                  "(JSON null is how encoders write NaN and infinity)")
        key = "undecodable:" + hashlib.sha256(msg.data).hexdigest()
        return Decided(msg, rejections=[rejection(cid, reason, self.bus.source, None, key)])

    def overlap(self, d: Decided, pending: Periods) -> Claim | None:
        """A minted period (or one `pending` earlier in the same mint) of another cause that
        `d`'s period overlaps, or None."""
        assert d.cause is not None
        c = d.cause
        cid = d.transfer.data.cause_id if d.transfer is not None else c.id  # c.id, derived once already
        hit = self.periods.overlapping(c.key, c.start_us, c.end_us, cid)
        if hit is None:
            hit = pending.overlapping(c.key, c.start_us, c.end_us, cid)  # sorted and disjoint too: a bisection
        return hit

    async def mint(self, ds: list[Decided]) -> list[ev.Event]:
        """Mint the transfers of `ds`, in order, as one atomic batch fenced on `last_seq`:
        stored only if nothing was written to LEDGER since this ledger last looked.

        Causes already minted are settled as repeats (nothing written); a period that
        overlaps a minted one, or one earlier in `ds`, is rejected; a second decision for
        a cause in `ds` is settled as a repeat after the commit. Refused, the ledger catches
        up (indexing what another writer minted meanwhile) and decides `ds` again from the
        start. So two ledgers running at once cannot both mint overlapping periods. Returns
        the rejections to publish. Call under `_write_lock`."""
        out: list[ev.Event] = []
        todo = [d for d in ds if d.transfer is not None]
        tid = lambda d: d.transfer.data.transfer_id  # noqa: E731
        for _attempt in range(10):
            repeats = [d for d in todo if tid(d) in self.periods.minted]
            if repeats:
                out += await self.repeats(repeats)
                todo = [d for d in todo if tid(d) not in self.periods.minted]
            fresh: list[Decided] = []
            later: list[Decided] = []
            refused: list[tuple[Decided, Claim]] = []
            pending = Periods()  # the periods this mint stores (disjoint: each checked against those before)
            fresh_tids: set[str] = set()
            for d in todo:
                if tid(d) in fresh_tids:  # the same cause again: a repeat of what this mint stores
                    later.append(d)
                    continue
                hit = self.overlap(d, pending)
                if hit is not None:
                    refused.append((d, hit))
                    continue
                fresh.append(d)
                fresh_tids.add(tid(d))
                c = d.cause
                assert c is not None
                pending.add(c.key, Claim(c.start_us, c.end_us, d.transfer.data.cause_id, tid(d), 0))  # type: ignore[union-attr]
            seqs = await self.bus.commit_batch([d.transfer for d in fresh], expected_last_seq=self.last_seq) if fresh else []  # type: ignore[misc]
            if seqs is None:
                if not await self.catch_up():
                    raise LedgerError(
                        f"LEDGER refused a batch of {len(fresh)} transfers although nothing was written since seq "
                        f"{self.last_seq} and none of their subjects is known: is `allow_atomic` on? (`scf streams ensure`)"
                    )
                continue  # decide them all again against what was minted meanwhile
            for d, seq in zip(fresh, seqs):
                self.periods.add_transfer(d.transfer.data, seq)  # type: ignore[union-attr]
            if seqs:
                self.counts["new"] += len(fresh)
                self.last_seq = max(self.last_seq, seqs[-1])
            for d, hit in refused:
                c = d.cause
                assert c is not None and d.measured is not None
                self.counts["rejected"] += 1
                out.append(rejection(c.id, overlap_reason(c, hit), self.bus.source, d.measured, f"overlap:{hit.cause_id}"))
            if later:
                out += await self.repeats(later)
            return out
        raise LedgerError("LEDGER kept changing under 10 attempts to mint: is a second ledger running? (run one)")

    async def repeats(self, ds: list[Decided]) -> list[ev.Event]:
        """Causes already minted: the same content is acknowledged as done, other content
        refused ("conflict"). Reads the existing transfers, writes nothing."""

        async def one(d: Decided) -> list[ev.Event]:
            assert d.transfer is not None
            seq = self.periods.minted[d.transfer.data.transfer_id]
            existing = TRANSFER_CODEC.decode((await self.bus.js.get_msg(LEDGER_STREAM, seq)).data)
            same = isinstance(existing, LedgerTransfer) and (
                msgspec.json.encode(existing.data) == msgspec.json.encode(d.transfer.data))
            return self._settled(d, Once("duplicate" if same else "conflict", seq, existing))

        return [e for r in await asyncio.gather(*(one(d) for d in ds)) for e in r]

    def published(self, acks: list) -> None:
        """Move `last_seq` over this ledger's own publishes (rejections) when they are the
        next sequences of the stream; otherwise the next mint catches up."""
        seqs = sorted(a.seq for a in acks if not a.duplicate)
        if seqs and seqs == list(range(self.last_seq + 1, self.last_seq + 1 + len(seqs))):
            self.last_seq = seqs[-1]

    def _settled(self, d: Decided, once: Once) -> list[ev.Event]:
        assert d.transfer is not None and d.measured is not None and d.cause is not None
        transfer, m, c = d.transfer, d.measured.data, d.cause
        self.counts[once.status] += 1
        if once.status != "conflict":
            return []
        e = once.existing.data if isinstance(once.existing, LedgerTransfer) else None
        if e is not None:
            self.periods.add_transfer(e, once.seq)
        return [
            rejection(
                c.id,
                f"conflict: cause {c.id} ({c.node} meter {c.meter} {c.period()}) was already minted as transfer "
                f"{transfer.data.transfer_id} (LEDGER seq {once.seq}: {e.micro_credits if e else '?'} µcr to "
                f"{e.credit_account if e else '?'}, digest {e.cause_digest if e else '?'}) and this measurement differs: refused",
                self.bus.source, d.measured, f"conflict:{cause_digest(m)}",
            )
        ]

    # ------------------------------------------------------------------ one message (fallback, Runner)
    async def handle(self, msg, delivery: Delivery | None = None) -> list[ev.Event]:
        from scf.bus.runner import Poison

        await self.load()
        d = await self.decide(msg)
        if d.poison is not None:
            raise Poison(d.poison)
        if d.rejections:
            self.counts["rejected"] += 1
            return d.rejections
        async with self._write_lock:  # check and mint as one step
            return await self.mint([d])

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
        # The next batch, taken while this one is handled, its signatures being verified in
        # threads meanwhile (verify_threads > 1): the verification overlaps this batch's
        # rules, mint and acks where a core is free. Kept alive through a pause (given back,
        # each pause would spend one of its deliveries: past max_deliver a measurement is never
        # delivered again nor dead-lettered), given back (nak'ed) on a stop. `ahead` holds them
        # in order: the next one, and the one in hand when a pause or a stop came before it was
        # minted.
        ahead: list[tuple[list, asyncio.Future]] = []
        # The previous batch's mint, rejections and acks, in flight while this batch is decided:
        # the wait for the server's answer to the atomic mint overlaps the next batch's rules.
        # (Deciding reads no minted period — overlaps and repeats are settled by `mint`, one
        # batch after the other, under the write lock — except a registry-less node's last
        # account, which a batch of that node's own transfers leaves as it was.)
        settling: asyncio.Task | None = None
        try:
            while not stop.is_set():
                if pause is not None and pause.engaged:
                    waiting = [m for batch, _ in ahead for m in batch]
                    alive = asyncio.create_task(_keep_alive(waiting, self.spec.ack_wait)) if waiting else None
                    try:
                        await race(pause.wait_clear(), stop)
                    finally:
                        if alive is not None:
                            alive.cancel()
                    continue
                if ahead:
                    msgs, verifying = ahead.pop(0)
                else:
                    msgs = await pull.fetch(1, fetch_timeout, stop)
                    if not msgs:
                        continue
                    # Wait (up to fetch_timeout) for the first measurement alone, then take what
                    # else is there, up to a batch, waiting at most `gather_s` for it.
                    if self.settings.batch > 1:
                        msgs += await pull.fetch(self.settings.batch - 1, self.settings.gather_s, stop)
                    verifying = asyncio.ensure_future(self.verify_batch(msgs))
                # the batch in hand and the one taken ahead kept alive while this one is handled
                held = list(msgs)
                alive: asyncio.Task | None = asyncio.create_task(_keep_alive(held, self.spec.ack_wait))
                try:
                    if (not ahead and TAKE_AHEAD and self.verify_threads > 1 and self.settings.batch > 1
                            and len(msgs) >= 2 * VERIFY_CHUNK_MIN):
                        following = await pull.fetch(self.settings.batch, AHEAD_WAIT_S, stop)  # what is there already
                        if following:
                            held += following
                            ahead.append((following, asyncio.ensure_future(self.verify_batch(following))))
                    decided: list[Decided] | Exception
                    try:
                        await self.load()
                        decided = await self.decide_batch(msgs, await verifying)
                    except Exception as exc:  # noqa: BLE001 - settled below: each message alone
                        decided = exc
                    if settling is not None:
                        task, settling = settling, None
                        await task  # never raises: one batch minted after the other
                    if stop.is_set() or (pause is not None and pause.engaged):
                        # stopped or paused while the batch before was minted: this one is not
                        # minted now; held (decided again once the pause clears) or given back
                        ahead.insert(0, (msgs, verifying))
                        continue
                    settling = asyncio.create_task(self._settle_or_fall_back(msgs, decided, fallback, alive))
                    alive = None  # cancelled by the settle, once this batch is acked
                finally:
                    if alive is not None:
                        alive.cancel()
        finally:
            if settling is not None:
                await settling
            for batch in ahead:
                await _give_back(self.bus, self.spec, *batch)
            await pull.close()

    async def _settle_or_fall_back(self, msgs: list, decided: list[Decided] | Exception, fallback: Runner,
                                   alive: asyncio.Task) -> None:
        """`settle_batch` for a decided batch; a batch whose deciding or settling failed is
        handled message by message, by the runner's rules. Never raises an Exception."""
        try:
            if isinstance(decided, Exception):
                raise decided
            await self.settle_batch(decided)
        except Exception as exc:  # noqa: BLE001 - any batch failure: each message alone, by the runner's rules
            log.warning("ledger batch of %d failed (%s: %s): handling one by one", len(msgs), type(exc).__name__, exc)
            for msg in msgs:
                await fallback.process(msg)
        finally:
            alive.cancel()

    async def handle_batch(self, msgs: list, checked: list | None = None) -> None:
        """Decide, mint, publish the rejections, then ack a batch; `checked`: its
        `verify_batch` result, when the caller verified it already."""
        await self.load()
        if checked is None:
            checked = await self.verify_batch(msgs)
        await self.settle_batch(await self.decide_batch(msgs, checked))

    async def settle_batch(self, decided: list[Decided]) -> None:
        """Dead-letter the poison, mint the transfers, publish the rejections, then ack: a
        decided batch."""
        poison = [d for d in decided if d.poison is not None]
        for d in poison:
            await dlq.dead_letter(self.bus, d.msg, stream=self.spec.stream, consumer=self.spec.durable, error=d.poison or "")
        out: list[ev.Event] = []
        for d in decided:
            if d.rejections:
                self.counts["rejected"] += 1
                out += d.rejections
        async with self._write_lock:
            # One fenced atomic write for the batch (repeats and overlaps inside it settled).
            out += await self.mint(decided)
            if out:
                self.published(await self.bus.publish_many(out))
        await ack_many(self.bus.nc, [d.msg for d in decided if d.poison is None])  # one write for the batch's acks


# --------------------------------------------------------------------------- the projection


@dataclass(frozen=True)
class Entry:
    seq: int
    subject: str
    transfer: Transfer
    at: str


async def read_transfers(bus: Bus) -> list[Entry]:
    out = []
    for msg in await read(bus, LEDGER_STREAM, "ledger.transfer.>"):
        e = TRANSFER_CODEC.decode(msg.data)
        assert isinstance(e, LedgerTransfer)
        out.append(Entry(msg.seq, msg.subject, e.data, e.at.isoformat()))
    return out


def balances_by_unit(entries: list[Entry]) -> dict[str, dict[str, int]]:
    """Unit → account → balance in micro-credits (credits positive, debits negative). Each
    unit is its own instrument: its balances sum to zero on their own. Transfers minted
    before units were recorded come under "" (unit not recorded)."""
    out: dict[str, dict[str, int]] = {}
    for e in entries:
        bal = out.setdefault(e.transfer.unit, defaultdict(int))
        bal[e.transfer.debit_account] -= e.transfer.micro_credits
        bal[e.transfer.credit_account] += e.transfer.micro_credits
    return {u: dict(b) for u, b in out.items()}


def balances(entries: list[Entry], unit: str | None = None) -> dict[str, int]:
    """Account → balance in micro-credits of one unit (credits positive, debits negative).
    `unit` None: the ledger's only unit; a ledger holding several refuses to add them up
    (LedgerError naming them): pass the unit, or use `balances_by_unit`."""
    by_unit = balances_by_unit(entries)
    if unit is None:
        if len(by_unit) > 1:
            raise LedgerError(f"the ledger holds credits of several units ({', '.join(sorted(u or '(not recorded)' for u in by_unit))}): "
                              "they are not added together; name the unit")
        return next(iter(by_unit.values()), {})
    return by_unit.get(norm_unit(unit), {})


def unit_label(unit: str) -> str:
    return unit or "(unit not recorded)"


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
    issued: dict[str, int] = field(default_factory=dict)  # unit → micro-credits minted in it

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        units = "; ".join(f"{unit_label(u)} {fmt_credits(v)}" for u, v in sorted(self.issued.items()))
        head = (
            f"{self.transfers} transfers, {self.accounts} accounts, debits = credits in each unit"
            f"{' (' + units + ')' if units else ''}; {self.measurements} measurements, {self.rejections} rejections in the log"
        )
        if self.ok:
            return [f"ok: {head}"]
        return [f"FAILED: {len(self.problems)} problem(s); {head}"] + [f"  {p}" for p in self.problems[:200]]


async def verify(bus: Bus, check_causes: bool = True, trust=None, settings: LedgerSettings | None = None) -> VerifyReport:
    """Recompute the books from the log and check them:

    * every transfer is balanced (one debit, one credit of the same positive integer
      amount, two distinct accounts) and the debits of all accounts equal the credits;
    * every transfer sits on the subject of its id, and its id is the one derived from
      its cause: no cause can have two subjects;
    * its cause id is the one derived from its normalised content (node, meter, period),
      and no two transfers of one (node, meter) cover overlapping periods;
    * no cause was minted twice (one transfer per cause id, one message per subject);
    * its amount recomputes from kWh × rate; its unit is one the ledger knows (or none
      recorded, before units), and each unit's balances sum to zero on their own;
    * (check_causes) its cause is a measurement in the DEPLOY log — signed by the node's
      own trusted key when `trust` is given — whose normalised content and digest match,
      and whose unit (stated, else its meter's in `settings.meter_units`) is the
      transfer's."""
    report = VerifyReport()
    entries = await read_transfers(bus)
    report.transfers = len(entries)
    by_cause: dict[str, list[Entry]] = defaultdict(list)
    by_subject: dict[str, int] = defaultdict(int)
    periods: dict[tuple[str, str], list[Entry]] = defaultdict(list)
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
        if not t.node or t.period_end_us <= t.period_start_us:
            report.problems.append(
                f"seq {e.seq}: transfer {t.transfer_id} names no normalised cause (node {t.node!r}, meter {t.meter!r}, "
                f"period {t.period_start_us}..{t.period_end_us} µs): it cannot be checked against double minting"
            )
        else:
            expected = Cause(t.node, t.meter, t.period_start_us, t.period_end_us)
            if t.meter != norm_meter(t.meter) or t.cause_id != expected.id:
                report.problems.append(
                    f"seq {e.seq}: cause id {t.cause_id} of transfer {t.transfer_id} does not match its normalised content "
                    f"(node {t.node}, meter {t.meter}, period {expected.period()}: cause {expected.id})"
                )
            periods[(t.node, t.meter)].append(e)
        if micro_credits(t.kwh, t.rate) != t.micro_credits:
            report.problems.append(
                f"seq {e.seq}: {t.kwh} kWh × {t.rate} is {micro_credits(t.kwh, t.rate)} µcr, the transfer says {t.micro_credits}"
            )
        if t.unit and t.unit not in UNITS:
            report.problems.append(f"seq {e.seq}: transfer {t.transfer_id} is in unit {t.unit!r}, not one the ledger knows ({', '.join(UNITS)})")
        report.debits += t.micro_credits
        report.credits += t.micro_credits
        report.issued[t.unit] = report.issued.get(t.unit, 0) + t.micro_credits
    for cause, items in by_cause.items():
        if len(items) > 1:
            report.problems.append(f"cause {cause} minted {len(items)} times (seqs {', '.join(str(i.seq) for i in items)})")
    for subject, n in by_subject.items():
        if n > 1:
            report.problems.append(f"subject {subject} holds {n} transfers")
    for (node, meter), items in periods.items():
        items.sort(key=lambda e: (e.transfer.period_start_us, e.seq))
        reach: Entry | None = None  # the transfer reaching furthest so far
        for e in items:
            t = e.transfer
            if reach is not None and t.period_start_us < reach.transfer.period_end_us and t.cause_id != reach.transfer.cause_id:
                r = reach.transfer
                report.problems.append(
                    f"seqs {reach.seq} and {e.seq}: transfers {r.transfer_id} and {t.transfer_id} credit overlapping periods of "
                    f"node {node} meter {meter}: [{iso_micros(r.period_start_us)}, {iso_micros(r.period_end_us)}) and "
                    f"[{iso_micros(t.period_start_us)}, {iso_micros(t.period_end_us)})"
                )
            if reach is None or t.period_end_us > reach.transfer.period_end_us:
                reach = e
    for unit, bal in sorted(balances_by_unit(entries).items()):
        report.accounts += len(bal)
        debit_side = -sum(v for v in bal.values() if v < 0)
        credit_side = sum(v for v in bal.values() if v > 0)
        if sum(bal.values()) != 0 or debit_side != credit_side:
            report.problems.append(f"balances of {unit_label(unit)} do not sum to zero: debits {debit_side} µcr, credits {credit_side} µcr")
    report.rejections += len(await read(bus, LEDGER_STREAM, "ledger.rejected.>", headers_only=True))
    if check_causes:
        plain = Codec([ev.EnergyMeasured])
        verified = Codec([ev.EnergyMeasured], trust=trust, require_signature=True, role="node") if trust is not None else None
        digests: dict[str, set[str]] = defaultdict(set)
        units: dict[tuple[str, str], set[str]] = defaultdict(set)  # (cause, digest) → the measurements' units
        ls = settings or LedgerSettings()
        for msg in await read(bus, "DEPLOY", "energy.measured.>"):
            try:
                m = plain.decode(msg.data)
            except DecodeError:
                continue
            assert isinstance(m, ev.EnergyMeasured)
            report.measurements += 1
            if verified is not None:
                try:
                    verified.decode(msg.data)
                except (DecodeError, SignatureError):
                    continue
                entry = trust.keys.get(m.kid or "")
                if entry is None or entry.name != m.data.node:
                    continue
            c = normalise(m.data)
            digests[c.id].add(cause_digest(m.data))
            unit, _ = unit_of(m.data, c.meter, ls)
            units[(c.id, cause_digest(m.data))].add(unit)
        signed = " signed by its node's trusted key" if verified is not None else ""
        for cause, items in by_cause.items():
            t = items[0].transfer
            seen = digests.get(cause)
            if not seen:
                report.problems.append(f"transfer {t.transfer_id}: its cause {cause} is not a measurement{signed} in the DEPLOY log")
            elif t.cause_digest not in seen:
                report.problems.append(
                    f"transfer {t.transfer_id}: no measurement of cause {cause} in the log has digest {t.cause_digest or '(none)'}"
                )
            elif t.unit and t.unit not in units[(cause, t.cause_digest)]:
                found = ", ".join(sorted(u or "no known unit" for u in units[(cause, t.cause_digest)]))
                report.problems.append(
                    f"transfer {t.transfer_id} is minted in {t.unit}, but its measurement (cause {cause}) is in {found}"
                )
    return report
