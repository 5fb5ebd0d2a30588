"""Control commands: plain JSON on `control.<verb>`, from the CLI or any NATS client.

    nats pub control.shift_gear '{"level": "ACCELERATED"}'
    nats pub control.stop '{}'
    nats pub control.emergency_stop '{"reason": "storm"}'

Unknown fields are refused (a typo must not be silently ignored). A signed command
carries `Scf-Sig` / `Scf-Kid` headers: Ed25519 over `subject + "\\n" + body`, checked
against the trust list before the body is parsed.

Replay protection: a signed command also carries `nonce` (random, unique per signing key)
and `issued_at` (RFC 3339 with a timezone) inside the signed body; `encode` and `sign_json`
fill both. The daemon's `ReplayGuard` refuses a signed command whose `issued_at` lies
outside a window around the time the stream stored it, or whose (key id, nonce) an earlier
CONTROL message already carried. Bodies over `MAX_COMMAND_BYTES` are refused.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, Any, Union

import msgspec

from scf.bus.errors import DecodeError, SCFError, SignatureError
from scf.bus.signing import SigningKey, TrustList, command_message


class Command(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    by: str = ""  # who sent it (free text; the signature, when present, is the proof)
    reason: str = ""
    nonce: str = ""  # unique per signing key; required on signed commands (replay protection)
    issued_at: Annotated[dt.datetime, msgspec.Meta(tz=True)] | None = None  # when it was signed; required on signed commands


class ShiftGear(Command, frozen=True, kw_only=True):
    level: str


class Stop(Command, frozen=True, kw_only=True):
    pass


class Resume(Command, frozen=True, kw_only=True):
    pass


class EmergencyStop(Command, frozen=True, kw_only=True):
    pass


class ReleaseEmergency(Command, frozen=True, kw_only=True):
    pass


class Approve(Command, frozen=True, kw_only=True):
    subject_id: str


class Reject(Command, frozen=True, kw_only=True):
    subject_id: str


class RollbackCommand(Command, frozen=True, kw_only=True):
    node: str
    to: str | int | None = None  # a checkpoint id or a version number; None = the previous one


VERBS: dict[str, type[Command]] = {
    "shift_gear": ShiftGear,
    "stop": Stop,
    "resume": Resume,
    "emergency_stop": EmergencyStop,
    "release_emergency": ReleaseEmergency,
    "approve": Approve,
    "reject": Reject,
    "rollback": RollbackCommand,
}
SUBJECT_OF: dict[type[Command], str] = {cls: f"control.{verb}" for verb, cls in VERBS.items()}
AnyCommand = Union[tuple(VERBS.values())]  # type: ignore[valid-type]
_DECODERS = {verb: msgspec.json.Decoder(cls) for verb, cls in VERBS.items()}

# Subjects under control.> that carry events, not commands.
EVENT_SUBJECTS = ("control.rejected",)
# A command body larger than this is refused (its effects must fit in a NATS message).
MAX_COMMAND_BYTES = 64 * 1024
MAX_NONCE = 128


class ReplayError(SCFError):
    """A signed command that was already applied, or is too old / too far in the future."""


def new_nonce() -> str:
    return secrets.token_hex(16)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class Received:
    command: Command
    subject: str
    signer: str | None  # the trusted signer's name, when signed and verified
    kid: str | None = None  # the verified signing key's id


def encode(command: Command, key: SigningKey | None = None) -> tuple[str, bytes, dict[str, str]]:
    """(subject, body, headers) for a command, signed when a key is given (a signed command
    gets a fresh nonce and the current time as issued_at when it has none)."""
    subject = SUBJECT_OF[type(command)]
    headers: dict[str, str] = {}
    if key is None:
        return subject, msgspec.json.encode(command), headers
    command = msgspec.structs.replace(command, nonce=command.nonce or new_nonce(), issued_at=command.issued_at or _utcnow())
    body = msgspec.json.encode(command)
    return subject, body, signature_headers(subject, body, key)


def signature_headers(subject: str, body: bytes, key: SigningKey) -> dict[str, str]:
    from scf.bus.client import SCF_KID, SCF_SIG

    return {SCF_SIG: key.sign(command_message(subject, body)), SCF_KID: key.kid}


def sign_json(subject: str, payload: dict[str, Any], key: SigningKey) -> tuple[bytes, dict[str, str]]:
    """Sign a command given as a JSON object (the control file): adds `nonce` and
    `issued_at` when absent, returns (body, headers)."""
    stamped = dict(payload)
    if not stamped.get("nonce"):
        stamped["nonce"] = new_nonce()
    if not stamped.get("issued_at"):
        stamped["issued_at"] = _utcnow()
    body = msgspec.json.encode(stamped)
    return body, signature_headers(subject, body, key)


def decode(
    subject: str,
    body: bytes,
    headers: dict[str, str] | None,
    trust: TrustList | None = None,
    *,
    require_signature: bool = False,
) -> Received:
    """Verify (if signed or required), then parse. Raises DecodeError / SignatureError
    with a one-line reason suitable for `control.rejected`."""
    from scf.bus.client import SCF_KID, SCF_SIG

    verb = subject.removeprefix("control.")
    decoder = _DECODERS.get(verb)
    if decoder is None:
        raise DecodeError(f"unknown control verb {verb!r}: use one of {', '.join(VERBS)}")
    headers = headers or {}
    body = body or b""
    if len(body) > MAX_COMMAND_BYTES:
        raise DecodeError(
            f"{subject} body is {len(body)} bytes, over the {MAX_COMMAND_BYTES}-byte limit for commands: shorten it (e.g. the reason)"
        )
    signer = None
    if headers.get(SCF_SIG) or require_signature:
        if trust is None:
            raise SignatureError("signed commands need a trust list on this host: `scf keys trust`")
        signer = trust.verify(command_message(subject, body), headers.get(SCF_SIG), headers.get(SCF_KID), "operator")
    try:
        command = decoder.decode(body or b"{}")
    except msgspec.ValidationError as exc:
        raise DecodeError(f"malformed {subject} command: {exc}") from None
    except msgspec.DecodeError as exc:
        raise DecodeError(f"malformed JSON in {subject}: {exc}") from None
    return Received(command, subject, signer, headers.get(SCF_KID) if signer is not None else None)


class ReplayGuard:
    """Refuses replayed signed commands (pure; the daemon feeds it the CONTROL log).

    A signed command is accepted only if its `issued_at` lies in
    [stored_at - window, stored_at + skew] (`stored_at`: when the stream stored it, the
    server's clock) and no earlier CONTROL message carried a validly signed command with the
    same (key id, nonce). Entries older than window + 2 * skew before the newest one are
    forgotten: a replay that old fails the window check anyway.
    """

    def __init__(self, window_s: float = 300.0, skew_s: float = 30.0) -> None:
        self.window = dt.timedelta(seconds=window_s)
        self.skew = dt.timedelta(seconds=skew_s)
        self._seen: OrderedDict[tuple[str, str], tuple[int, dt.datetime]] = OrderedDict()
        self._newest: dt.datetime | None = None

    @property
    def horizon(self) -> dt.timedelta:
        """How far back (from now) the log must be read to rebuild the guard."""
        return self.window + 2 * self.skew

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, received: Received, seq: int, stored_at: dt.datetime) -> None:
        """Raise ReplayError (one line: what and how to fix) unless `received` may be applied."""
        if received.kid is None:
            return  # unsigned: nothing to prove (anyone may send it again anyway)
        cmd, subject = received.command, received.subject
        if not cmd.nonce or cmd.issued_at is None:
            raise ReplayError(
                f"signed {subject} has no {'nonce' if not cmd.nonce else 'issued_at'}: signed commands need both "
                "(`scf control …` fills them; see docs/control.md)"
            )
        if len(cmd.nonce) > MAX_NONCE:
            raise ReplayError(f"signed {subject} has a nonce of {len(cmd.nonce)} characters: use at most {MAX_NONCE}")
        age = (stored_at - cmd.issued_at).total_seconds()
        if age > self.window.total_seconds():
            raise ReplayError(
                f"signed {subject} was issued at {cmd.issued_at.isoformat()}, {age:.0f} s before it reached CONTROL: "
                f"older than the {self.window.total_seconds():.0f} s window (a replay or a late send): sign a new command"
            )
        if -age > self.skew.total_seconds():
            raise ReplayError(
                f"signed {subject} claims to be issued at {cmd.issued_at.isoformat()}, {-age:.0f} s after it reached CONTROL: "
                f"beyond the {self.skew.total_seconds():.0f} s clock skew allowed: fix the sender's clock"
            )
        first = self._seen.get((received.kid, cmd.nonce))
        if first is not None and first[0] != seq:
            raise ReplayError(
                f"replayed {subject}: key {received.kid} used nonce {cmd.nonce} before (CONTROL seq {first[0]}): "
                "sign a new command"
            )

    def record(self, received: Received, seq: int, stored_at: dt.datetime) -> None:
        """Remember a signed command that passed `check` (applied or rejected on its merits)."""
        if received.kid is None or not received.command.nonce:
            return
        self._seen.setdefault((received.kid, received.command.nonce), (seq, stored_at))
        if self._newest is None or stored_at > self._newest:
            self._newest = stored_at
        cutoff = self._newest - self.horizon
        while self._seen:
            _, (_, at) = next(iter(self._seen.items()))
            if at >= cutoff:
                break
            self._seen.popitem(last=False)

    def observe(self, subject: str, body: bytes, headers: dict[str, str] | None, trust: TrustList | None, seq: int,
                stored_at: dt.datetime) -> bool:
        """Rebuilding from the log: record a stored command if it is validly signed and
        passes the checks (as it would have when it was applied). Returns whether recorded."""
        from scf.bus.client import SCF_SIG

        if subject in EVENT_SUBJECTS or not (headers or {}).get(SCF_SIG) or trust is None:
            return False
        try:
            received = decode(subject, body, headers, trust)
            self.check(received, seq, stored_at)
        except SCFError:
            return False
        self.record(received, seq, stored_at)
        return received.kid is not None


# --------------------------------------------------------------------------- rebuilding a guard
# Every process that applies signed commands (the daemon; the deploy planner for
# control.rollback) rebuilds its ReplayGuard from the CONTROL log at start, so a replay is
# refused across restarts too.


async def read_recent_commands(bus, guard: ReplayGuard, trust: TrustList | None, subject: str = "control.>") -> int:
    """Feed `guard` every signed command on `subject` that CONTROL stored within the guard's
    horizon before the latest one (server time); returns how many it recorded."""
    from nats.js.errors import NotFoundError

    from scf.bus.reader import StreamMsg, StreamReader  # here: the command codec stays free of NATS

    try:
        last = await bus.js.get_last_msg("CONTROL", subject)
    except NotFoundError:
        return 0
    if last.time is None or not last.seq:
        return 0
    recorded = 0

    def handle(msg: StreamMsg) -> None:
        nonlocal recorded
        if guard.observe(msg.subject, msg.data, msg.headers, trust, msg.seq, msg.time):
            recorded += 1

    await StreamReader(bus.nc, bus.js, "CONTROL", subject, start_time=last.time - guard.horizon, end_seq=last.seq).scan(handle)
    return recorded
