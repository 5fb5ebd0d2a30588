"""Encoding and decoding events: one typed decoder per boundary, upcasting, signatures.

Fast path: `Codec.decode` decodes straight into the declared event types. Slow paths,
taken only when needed: a message whose `v` is older than its class (upcast through the
registered upcasters), and a signed message (or any message where signatures are
required), whose signature is checked on the raw payload bytes before the payload is parsed.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Union

import msgspec

from scf.bus import events as ev
from scf.bus.errors import DecodeError, SignatureError, UnknownEventType
from scf.bus.signing import SigningKey, TrustList

_json_encoder = msgspec.json.Encoder()


def encode(event: ev.Event) -> bytes:
    return _json_encoder.encode(event)


# ---------------------------------------------------------------------------- upcasting

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
# (type, from_version) -> function turning that version's `data` into the next version's.
UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def upcaster(type_name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    def register(fn: Upcaster) -> Upcaster:
        UPCASTERS[(type_name, from_version)] = fn
        return fn

    return register


@upcaster("gear.changed", 1)
def _gear_changed_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    # v1 carried the gear as a level number (1 = STANDARD … 4 = SINGULARITY) and no origin.
    old = msgspec.convert(data, ev.GearChangeV1)
    if not 1 <= old.level <= len(ev.GEARS):
        raise DecodeError(f"gear.changed v1 has level {old.level}: expected 1 to {len(ev.GEARS)}")
    return {"from_gear": None, "to_gear": ev.GEARS[old.level - 1], "by": old.by, "reason": ""}


_VERSIONS: dict[type, int] = {}


def current_version(cls: type[ev.Event]) -> int:
    v = _VERSIONS.get(cls)
    if v is None:
        v = _VERSIONS[cls] = next(f.default for f in msgspec.structs.fields(cls) if f.name == "v")
    return v


class _Peek(msgspec.Struct):
    type: str = ""
    v: int = 1


class Wire(msgspec.Struct, kw_only=True):
    """The envelope as it travels, its payload left as raw bytes: for signatures, upcasting,
    and readers of the log that keep the payload as published (the archive)."""

    type: str
    id: str
    v: int = 1
    at: str
    source: str
    correlation_id: str | None = None
    causation_id: str | None = None
    sig: str | None = None
    kid: str | None = None
    data: msgspec.Raw


class _Header(msgspec.Struct, array_like=True):
    type: str
    id: str
    v: int
    at: str
    source: str
    correlation_id: str | None
    causation_id: str | None
    kid: str | None


def _canonical(w: Wire) -> bytes:
    header = _Header(w.type, w.id, w.v, w.at, w.source, w.correlation_id, w.causation_id, w.kid)
    return b"scf-event-v1\n" + msgspec.json.encode(header) + b"\n" + bytes(w.data)


def canonical_bytes(event_or_wire: bytes) -> bytes:
    """The bytes a signature covers, from an encoded event."""
    return _canonical(msgspec.json.decode(event_or_wire, type=Wire))


def sign(event: ev.Event, key: SigningKey) -> bytes:
    """Encode `event` signed with `key`. The payload bytes are kept exactly as signed."""
    wire = msgspec.json.decode(encode(event), type=Wire)
    wire.kid = key.kid
    wire.sig = key.sign(_canonical(wire))
    return msgspec.json.encode(wire)


class Codec:
    """A typed decoder for one boundary: the event types a consumer accepts."""

    def __init__(
        self,
        types: Iterable[type[ev.Event]] = ev.ALL_EVENTS,
        *,
        trust: TrustList | None = None,
        require_signature: bool = False,
        role: str | None = None,
    ) -> None:
        self.types = tuple(types)
        self.by_name = {cls.type_name(): cls for cls in self.types}
        union = self.types[0] if len(self.types) == 1 else Union[self.types]
        self._decoder = msgspec.json.Decoder(union)
        self.trust = trust
        self.require_signature = require_signature
        self.role = role
        if require_signature and trust is None:
            raise ValueError("require_signature needs a trust list")

    def decode(self, buf: bytes) -> ev.Event:
        if self.trust is not None:
            return self._decode_verified(buf)
        try:
            event = self._decoder.decode(buf)
        except msgspec.ValidationError as exc:
            return self._slow(buf, exc)
        except msgspec.DecodeError as exc:
            raise DecodeError(f"not a JSON event ({exc})") from None
        cls = type(event)
        if event.v != current_version(cls):
            return self._slow(buf, None)
        return event

    def _decode_verified(self, buf: bytes) -> ev.Event:
        try:
            wire = msgspec.json.decode(buf, type=Wire)
        except msgspec.DecodeError as exc:
            raise DecodeError(f"not an SCF event envelope ({exc})") from None
        if wire.sig is not None or self.require_signature:
            assert self.trust is not None
            self.trust.verify(_canonical(wire), wire.sig, wire.kid, self.role)
        cls = self.by_name.get(wire.type)
        if cls is None:
            raise UnknownEventType(self._unknown(wire.type))
        return self._build(cls, wire.v, buf, bytes(wire.data))

    def _slow(self, buf: bytes, error: Exception | None) -> ev.Event:
        try:
            peek = msgspec.json.decode(buf, type=_Peek)
        except msgspec.DecodeError as exc:
            raise DecodeError(f"not an SCF event envelope ({exc})") from None
        cls = self.by_name.get(peek.type)
        if cls is None:
            if peek.type in ev.EVENT_TYPES:
                raise UnknownEventType(f"event type {peek.type!r} is not accepted here: expected {self._expected()}")
            raise UnknownEventType(self._unknown(peek.type))
        if peek.v == current_version(cls) or (peek.type, peek.v) not in UPCASTERS:
            if error is None:
                raise DecodeError(f"{peek.type} v{peek.v} is newer than this build knows (v{current_version(cls)}): upgrade scf")
            raise DecodeError(f"invalid {peek.type} event: {error}")
        wire = msgspec.json.decode(buf, type=Wire)
        return self._build(cls, peek.v, buf, bytes(wire.data))

    def _build(self, cls: type[ev.Event], version: int, buf: bytes, data: bytes) -> ev.Event:
        target = current_version(cls)
        if version == target:
            try:
                return msgspec.json.decode(buf, type=cls)
            except msgspec.ValidationError as exc:
                raise DecodeError(f"invalid {cls.type_name()} event: {exc}") from None
        if version > target:
            raise DecodeError(f"{cls.type_name()} v{version} is newer than this build knows (v{target}): upgrade scf")
        payload = msgspec.json.decode(data)
        while version < target:
            step = UPCASTERS.get((cls.type_name(), version))
            if step is None:
                raise DecodeError(f"no upcaster for {cls.type_name()} v{version}")
            payload = step(payload)
            version += 1
        env = msgspec.json.decode(buf, type=Wire)
        try:
            return msgspec.convert(
                {
                    "type": env.type,
                    "id": env.id,
                    "v": target,
                    "at": env.at,
                    "source": env.source,
                    "correlation_id": env.correlation_id,
                    "causation_id": env.causation_id,
                    "sig": env.sig,
                    "kid": env.kid,
                    "data": payload,
                },
                cls,
            )
        except msgspec.ValidationError as exc:
            raise DecodeError(f"invalid {cls.type_name()} event after upcasting: {exc}") from None

    def _expected(self) -> str:
        return ", ".join(sorted(self.by_name))

    def _unknown(self, name: str) -> str:
        if not name:
            return "message has no event type: expected an SCF event envelope with a \"type\" field"
        return f"unknown event type {name!r}: expected one of {self._expected()}"


ANY = Codec()


def decode(buf: bytes) -> ev.Event:
    return ANY.decode(buf)


__all__ = ["Codec", "encode", "decode", "sign", "canonical_bytes", "UPCASTERS", "upcaster", "SignatureError"]
