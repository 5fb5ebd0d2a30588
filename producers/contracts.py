"""Client contracts as facts on the log (docs/value-loop.md).

A contract is what a field engineer writes for a site: the client, the domain, the edge
nodes that will run its capsules, the constraints (loads or a load profile, outages,
derates, comfort bands, a budget, the objective) and how often the regiment strikes it
again. It lives on CONTRACTS as `contract.registered / updated / ended` events; its
current state is the fold of its subject's events.

The constraints are validated here, at the boundary, into typed structs: a bad field is
refused with its exact path (`$.constraints.comfort.occupied[0]`) and then checked by the
optimiser's own `problem()` builder (unknown bus names, bands upside down, ...), so a
contract on the log always maps to a problem.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Literal, Union

import msgspec

from scf.bus import events as ev
from scf.bus.codec import Codec
from scf.bus.errors import SCFError
from scf.bus.files import InputTooLarge, load_yaml, read_bounded
from scf.bus.ids import derived_id, subject_token

NumberMap = dict[str, float]


class ContractError(SCFError):
    """A contract that cannot be accepted: the message names the field and the fix."""


# --------------------------------------------------------------------------- constraints


class Comfort(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    occupied: tuple[float, float] | None = None  # [low, high] °C
    unoccupied: tuple[float, float] | None = None


class HvacHour(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One hour of an HVAC profile: what differs from the contract's constants."""

    hour: int
    T_out: float | None = None
    occupancy: Union[list[float], NumberMap, None] = None


class HvacConstraints(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    T_out: float = 8.0  # outdoor °C (the profile may set it per hour)
    occupancy: Union[list[float], NumberMap, None] = None  # per zone, occupied hours; default the domain's
    T0: Union[list[float], NumberMap, None] = None  # zone temperatures now; default the comfort band's middle
    comfort: Comfort | None = None
    previous: Union[list[float], NumberMap, None] = None
    budget: float | None = None  # kWh per hour at most
    profile: list[HvacHour] = []  # per-hour overrides
    occupied_hours: tuple[int, int] = (8, 18)  # [start, end) when occupancy applies
    preheat_hours: int = 2  # hours before the occupied start held to the occupied band (the zones arrive in it)
    objective: Literal["energy"] = "energy"


class GridHour(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    hour: int
    load_scale: float | None = None
    loads: NumberMap | None = None


class Outages(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    branches: list[str] = []
    generators: list[Union[str, int]] = []


class Derates(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    branches: NumberMap = {}
    generators: NumberMap = {}


class GridConstraints(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    loads: NumberMap | None = None  # {bus: MW} over the nominal loads
    load_scale: float | None = None
    outages: Outages | None = None
    derates: Derates | None = None
    previous: Union[list[float], NumberMap, None] = None
    budget: float | None = None  # $/h at most
    profile: list[GridHour] = []  # hourly load profile (one decision row per entry)
    objective: Literal["cost"] = "cost"


Constraints = Union[HvacConstraints, GridConstraints]


class ContractDoc(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The file `scf contract add` reads (JSON or YAML)."""

    contract_id: str
    client: str
    domain: str
    nodes: list[str] = []
    constraints: dict = {}
    schedule_s: float = 86_400.0


MAX_DOC = 1 << 20  # bytes: a contract document is a page; a larger file is refused unread
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def _kind(domain: str) -> str:
    from scf import domains

    try:
        return domains.get(domain).kind
    except Exception as exc:  # noqa: BLE001 - unknown domain: one line
        raise ContractError(f"$.domain: {exc}") from None


def parse_constraints(domain: str, raw: dict | str | bytes) -> Constraints:
    """The typed constraints of `domain`, or ContractError naming the exact bad path."""
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
            raise ContractError(f"$.constraints is not JSON ({str(exc)[:100]}): write a JSON object") from None
    if not isinstance(raw, dict):
        raise ContractError(f"$.constraints must be an object, got {type(raw).__name__}")
    kind = _kind(domain)
    typ = HvacConstraints if kind == "hvac" else GridConstraints
    try:
        c = msgspec.convert(raw, typ)
    except msgspec.ValidationError as exc:
        raise ContractError(_with_root(str(exc), "$.constraints")) from None
    for i, h in enumerate(c.profile):
        if not 0 <= h.hour < 24:
            raise ContractError(f"$.constraints.profile[{i}].hour = {h.hour}: an hour of the day is 0..23")
    # The optimiser's own checks (names, bands, ramps) on every hour the strike will solve.
    from scf.producers import optimize as opt

    target = opt.target(domain=domain)
    for hour in hours(c):
        try:
            opt.problem(target, problem_spec(target, c, hour))
        except opt.OptimizeError as exc:
            raise ContractError(f"$.constraints (hour {hour}): {exc}") from None
    return c


def _with_root(message: str, root: str) -> str:
    """msgspec says `at $.x.y`; the contract's constraints live under `root`."""
    return message.replace("`$", f"`{root}", 1) if "`$" in message else f"{message} - at `{root}`"


def canonical(c: Constraints) -> str:
    return msgspec.json.encode(msgspec.to_builtins(c), order="sorted").decode()


def hours(c: Constraints) -> list[int]:
    """The hours the strike solves: every hour of the day for HVAC (the capsule holds one
    decision row per hour), the profile's hours (or the nominal hour 0) for the grid."""
    if isinstance(c, HvacConstraints):
        return list(range(24))
    return sorted({h.hour for h in c.profile}) or [0]


def problem_spec(domain, c: Constraints, hour: int) -> dict:
    """The optimiser's problem spec (`scf.producers.optimize.problem`) for one hour."""
    if isinstance(c, HvacConstraints):
        zones = domain.building.zones
        b = domain.building
        occupied = c.occupied_hours[0] <= hour < c.occupied_hours[1]
        prof = next((h for h in c.profile if h.hour == hour), None)
        t_out = prof.T_out if prof is not None and prof.T_out is not None else c.T_out
        occ = prof.occupancy if prof is not None and prof.occupancy is not None else c.occupancy
        if occ is None:
            occ = [1.0] * len(zones)
        if not occupied and (prof is None or prof.occupancy is None):
            occ = [0.0] * len(zones)
        band = c.comfort.occupied if c.comfort is not None and c.comfort.occupied else b.occupied_band
        night = c.comfort.unoccupied if c.comfort is not None and c.comfort.unoccupied else b.unoccupied_band
        preheat = c.occupied_hours[0] - c.preheat_hours <= hour < c.occupied_hours[0]
        # Without measured zone temperatures, each hour starts where the status quo leaves
        # the zones: the low end of the band in force (a conservative one-step plan).
        start = float((band if occupied else night)[0])
        comfort = {k: list(v) for k, v in (("occupied", band), ("unoccupied", night))}
        if preheat:  # a ramp from the night's low to the day's low, one step per preheat hour
            k = hour - (c.occupied_hours[0] - c.preheat_hours)
            step = (float(band[0]) - float(night[0])) / c.preheat_hours
            start = float(night[0]) + k * step
            comfort["unoccupied"] = [start + step, float(band[1])]
        t0 = c.T0 if c.T0 is not None else [start] * len(zones)
        spec: dict = {"T_out": t_out, "hour": float(hour), "occupancy": occ, "T0": t0}
        if c.comfort is not None or preheat:
            spec["comfort"] = comfort
    else:
        prof = next((h for h in c.profile if h.hour == hour), None)
        spec = {}
        loads = prof.loads if prof is not None and prof.loads is not None else c.loads
        scale = prof.load_scale if prof is not None and prof.load_scale is not None else c.load_scale
        if loads is not None:
            spec["loads"] = dict(loads)
        if scale is not None:
            spec["load_scale"] = scale
        if c.outages is not None:
            spec["outages"] = msgspec.to_builtins(c.outages)
        if c.derates is not None:
            spec["derates"] = msgspec.to_builtins(c.derates)
    if c.previous is not None:
        spec["previous"] = c.previous
    if c.budget is not None:
        spec["budget"] = c.budget
    return spec


# --------------------------------------------------------------------------- documents


def read_doc(path: Path) -> ContractDoc:
    """A contract file (JSON, or YAML by its suffix), validated; errors name the path."""
    import yaml

    try:
        text = read_bounded(path, MAX_DOC, "contract file").decode("utf-8", errors="replace")
    except InputTooLarge as exc:
        raise ContractError(str(exc)) from None
    except OSError as exc:
        raise ContractError(f"{path}: cannot read it ({exc.strerror})") from None
    try:
        raw = load_yaml(text) if Path(path).suffix in (".yaml", ".yml") else json.loads(text)
    except (ValueError, yaml.YAMLError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0]
        raise ContractError(f"{path}: not valid {'YAML' if Path(path).suffix in ('.yaml', '.yml') else 'JSON'} ({why})") from None
    return parse_doc(raw)


def parse_doc(raw) -> ContractDoc:
    try:
        doc = msgspec.convert(raw, ContractDoc)
    except msgspec.ValidationError as exc:
        raise ContractError(str(exc)) from None
    if not _ID.match(doc.contract_id):
        raise ContractError(f"$.contract_id = {doc.contract_id!r}: use letters, digits, - and _ (at most 64)")
    if not (math.isfinite(doc.schedule_s) and doc.schedule_s >= 0):  # NaN/Infinity (Python's JSON reads them) went on the log as null
        raise ContractError(f"$.schedule_s = {doc.schedule_s}: seconds between strikes, a finite number, 0 or more")
    for i, n in enumerate(doc.nodes):
        if not _ID.match(n):
            raise ContractError(f"$.nodes[{i}] = {n!r}: a node id (letters, digits, - and _)")
    parse_constraints(doc.domain, doc.constraints)
    return doc


def spec_of(doc: ContractDoc, *, by: str = "", status: str = "active", reason: str = "") -> ev.ContractSpec:
    c = parse_constraints(doc.domain, doc.constraints)
    return ev.ContractSpec(contract_id=doc.contract_id, client=doc.client, domain=doc.domain, nodes=list(doc.nodes),
                           constraints=canonical(c), schedule_s=doc.schedule_s, status=status, by=by, reason=reason)  # type: ignore[arg-type]


def spec_sha256(spec: ev.ContractSpec) -> str:
    """The hash of what a strike depends on (not who registered it or why)."""
    body = {"contract_id": spec.contract_id, "client": spec.client, "domain": spec.domain, "nodes": sorted(spec.nodes),
            "constraints": json.loads(spec.constraints)}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------- the log

CODEC = Codec([ev.ContractRegistered, ev.ContractUpdated, ev.ContractEnded])


class Contract(msgspec.Struct, frozen=True, kw_only=True):
    """A contract's state: its latest spec and the log positions it was read from."""

    spec: ev.ContractSpec
    seq: int  # CONTRACTS sequence of the latest event
    event_id: str
    history: list[tuple[int, str, str]] = []  # (seq, type, event id)

    @property
    def active(self) -> bool:
        return self.spec.status == "active"


def _subjects(contract_id: str) -> list[str]:
    t = subject_token(contract_id)
    return [f"contract.registered.{t}", f"contract.updated.{t}", f"contract.ended.{t}"]


async def load(bus, contract_id: str | None = None, trust=None) -> dict[str, Contract]:
    """Every contract (or one) folded from CONTRACTS. With `trust`, only events signed by an
    operator key count (what the regiment acts on: nobody else's contract is struck)."""
    from scf.bus.reader import read

    codec = CODEC if trust is None else Codec([ev.ContractRegistered, ev.ContractUpdated, ev.ContractEnded], trust=trust,
                                              require_signature=True, role="operator")

    subjects = _subjects(contract_id) if contract_id else ["contract.>"]
    out: dict[str, Contract] = {}
    for m in await read(bus, "CONTRACTS", subjects):
        try:
            e = codec.decode(m.data)
        except Exception:  # noqa: BLE001 - a malformed or unsigned entry is skipped (the writer validated it)
            continue
        cid = e.data.contract_id
        prev = out.get(cid)
        if prev is None and isinstance(e, ev.ContractEnded):
            continue
        # prev is None and an update: the first event of this view (the registration's id was
        # taken by an event the view does not count, e.g. an unsigned squatter): it registers
        # a signed event republished later (a replay: past the duplicate window or under
        # another message id) must not roll the terms back: each event id counts once, and
        # a contract is registered once (tests/test_attack_contracts.py)
        if prev is not None and (isinstance(e, ev.ContractRegistered) or any(h[2] == e.id for h in prev.history)):
            continue
        if prev is not None and prev.spec.status == "ended":
            continue
        hist = (prev.history if prev else []) + [(m.seq, e.type_name(), e.id)]
        out[cid] = Contract(spec=e.data, seq=m.seq, event_id=e.id, history=hist)
    return out


async def get(bus, contract_id: str, trust=None) -> Contract:
    found = (await load(bus, contract_id, trust)).get(contract_id)
    if found is None:
        signed = " signed by an operator key (SCF_KEY)" if trust is not None else ""
        raise ContractError(f"no contract {contract_id!r}{signed}: register it with `scf contract add FILE` (see `scf contract ls`)")
    return found


async def add(bus, doc: ContractDoc, *, by: str = "", trust=None) -> tuple[str, ev.Event, int]:
    """Register the contract, or record an update when it exists with other content.
    Returns (what, event, seq): what is "registered", "updated" or "unchanged". With
    `trust` (a signing bus: the trust list and its own key), the contract as the regiment
    sees it: operator-signed events only, so an unsigned registration someone published
    first neither makes this one "unchanged" nor keeps it from counting."""
    spec = spec_of(doc, by=by)
    existing = (await load(bus, doc.contract_id, trust)).get(doc.contract_id)
    if existing is None:
        event = ev.ContractRegistered.new(spec, source=bus.source, id=derived_id("contract.registered", doc.contract_id))
        once = await bus.publish_once(event)
        if once.status == "new":
            return "registered", event, once.seq
        existing = (await load(bus, doc.contract_id, trust)).get(doc.contract_id)
        if existing is None:  # the registration's subject holds an event this view ignores: register by an update
            event = ev.ContractUpdated.new(spec, source=bus.source, id=derived_id("contract.updated", doc.contract_id, once.seq))
            return "registered", event, (await bus.publish(event)).seq
    if existing.spec.status == "ended":
        raise ContractError(f"contract {doc.contract_id} has ended: register it under a new id")
    if spec_sha256(existing.spec) == spec_sha256(spec) and existing.spec.schedule_s == spec.schedule_s:
        return "unchanged", ev.ContractRegistered.new(existing.spec, source=bus.source, id=existing.event_id), existing.seq
    event = ev.ContractUpdated.new(spec, source=bus.source, id=derived_id("contract.updated", doc.contract_id, existing.seq))
    return "updated", event, (await bus.publish(event)).seq


async def end(bus, contract_id: str, *, by: str = "", reason: str = "", trust=None) -> tuple[ev.ContractEnded, int]:
    """End the contract; with `trust`, as the regiment's (signed) view holds it (see `add`)."""
    existing = await get(bus, contract_id, trust)
    if existing.spec.status == "ended":
        raise ContractError(f"contract {contract_id} has already ended")
    spec = msgspec.structs.replace(existing.spec, status="ended", by=by, reason=reason)
    event = ev.ContractEnded.new(spec, source=bus.source, id=derived_id("contract.ended", contract_id))
    return event, (await bus.publish(event)).seq
