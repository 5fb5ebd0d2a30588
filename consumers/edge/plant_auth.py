"""Signed setpoints on MQTT (docs/plants.md, "Authenticity"): the edge node signs each
setpoint with its Ed25519 key; the plant (or a BMS/SCADA bridge) verifies it before it
parses the setpoint and refuses a forged, altered, unsigned, stale or replayed one.

Wire format (one MQTT payload, JSON):

    {"kid": "<key id>", "sig": "<base64 Ed25519>", "body": "<the setpoint JSON, as text>"}

The signature covers `topic + "\\n" + body` (UTF-8 bytes; the same rule as signed control
commands on NATS, bus/signing.command_message), so a setpoint for one site cannot be
replayed on another. The body is the setpoint with two more fields: `ctr`, a counter that
rises with every setpoint the key signs (microseconds since the epoch, or one more than the
last: monotonic across restarts without state), and `issued_at` (RFC 3339, UTC). The
verifier keeps the highest `ctr` accepted per key and refuses any at or below it
(replayed), and refuses a setpoint issued more than `window_s` before it arrives or more
than `skew_s` after (stale or from a wrong clock): after a restart of the verifier a
captured setpoint is still refused once it is older than the window.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import msgspec

from scf.bus.errors import ConfigError, SignatureError
from scf.bus.signing import SigningKey, TrustList, command_message

UTC = dt.timezone.utc


class Duplicate(SignatureError):
    """The last accepted message delivered again (MQTT QoS 1 is at least once; a retained
    message can arrive live and again on subscription): nothing new, ignore it."""


class Sealed(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kid: str
    sig: str
    body: str


class Fresh(msgspec.Struct, frozen=True):
    ctr: int
    issued_at: dt.datetime


SEALED = msgspec.json.Decoder(Sealed)
FRESH = msgspec.json.Decoder(Fresh)


def is_sealed(payload: bytes) -> bool:
    return payload.lstrip().startswith(b'{"kid"')


class Signer:
    """The edge side: seals each setpoint under the node's key."""

    def __init__(self, key: SigningKey) -> None:
        self.key = key
        self._last = 0

    def seal(self, topic: str, setpoint: msgspec.Struct, now: dt.datetime | None = None) -> bytes:
        ctr = max(self._last + 1, time.time_ns() // 1000)
        self._last = ctr
        issued = (now or dt.datetime.now(UTC)).astimezone(UTC)
        body = msgspec.json.encode({**msgspec.structs.asdict(setpoint), "ctr": ctr, "issued_at": issued}).decode()
        sig = self.key.sign(command_message(topic, body.encode()))
        return msgspec.json.encode(Sealed(kid=self.key.kid, sig=sig, body=body))


class Verifier:
    """The plant side: `open(topic, payload)` returns the verified body (bytes) or raises
    `SignatureError` with one line saying why the setpoint is refused. (The edge verifies a
    plant's signed telemetry with the same class: `role=None`, no age limit.)"""

    def __init__(self, trust: TrustList, *, window_s: float = 60.0, skew_s: float = 5.0, role: str | None = "node") -> None:
        self.trust, self.window_s, self.skew_s, self.role = trust, window_s, skew_s, role
        self.last: dict[str, int] = {}
        self._last_body: dict[str, bytes] = {}

    def open(self, topic: str, payload: bytes, now: dt.datetime | None = None) -> bytes:
        what, only = ("telemetry", "only telemetry signed by a trusted key is") if topic.endswith("/telemetry") else \
            ("setpoint", "only setpoints signed by a trusted key are")
        if not is_sealed(payload):
            raise SignatureError(f"unsigned {what}: {only} accepted here (docs/plants.md, Authenticity)")
        try:
            sealed = SEALED.decode(payload)
        except msgspec.DecodeError as exc:
            raise SignatureError(f"malformed signed {what} ({exc}): send {{\"kid\", \"sig\", \"body\"}}") from None
        body = sealed.body.encode()
        signer = self.trust.verify(command_message(topic, body), sealed.sig, sealed.kid, self.role)  # before the body is parsed
        try:
            fresh = FRESH.decode(body)
        except msgspec.DecodeError as exc:
            raise SignatureError(f"signed {what} from {signer} lacks its ctr or issued_at ({exc})") from None
        issued = fresh.issued_at if fresh.issued_at.tzinfo else fresh.issued_at.replace(tzinfo=UTC)
        age = ((now or dt.datetime.now(UTC)) - issued).total_seconds()
        if age > self.window_s:
            raise SignatureError(f"stale {what} from {signer}: issued {age:.0f} s ago, beyond the {self.window_s:g} s window (replayed?)")
        if age < -self.skew_s:
            raise SignatureError(f"{what} from {signer} issued {-age:.0f} s in the future: check the sender's clock")
        if fresh.ctr == self.last.get(sealed.kid) and body == self._last_body.get(sealed.kid):
            raise Duplicate(f"{what} ctr {fresh.ctr} from {signer} delivered again")
        if fresh.ctr <= self.last.get(sealed.kid, 0):
            raise SignatureError(f"replayed {what} from {signer}: ctr {fresh.ctr} is not above the last accepted {self.last[sealed.kid]}")
        self.last[sealed.kid], self._last_body[sealed.kid] = fresh.ctr, body
        return body


def unsealed(payload: bytes) -> bytes:
    """The body of a sealed payload without verifying it (a plant that trusts no key:
    broker logins are then its only boundary), else the payload as it is."""
    if is_sealed(payload):
        try:
            return SEALED.decode(payload).body.encode()
        except msgspec.DecodeError:
            return payload
    return payload


def load_trust(paths: list[str]) -> TrustList:
    """The node keys a plant accepts: `.pub` files (base64 raw Ed25519, from `scf keys new`)
    or trust lists (`trusted.json`); each `.pub` key gets the node role."""
    trust = TrustList()
    for text in paths:
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"--trust {text}: no such file: pass a node's .pub file (scf keys new NAME) or a trusted.json")
        if path.suffix == ".json":
            for kid, entry in TrustList.load(path).keys.items():
                trust.keys[kid] = entry
        else:
            trust.trust(path.read_text(), name=path.stem, roles=["node"])
    return trust
