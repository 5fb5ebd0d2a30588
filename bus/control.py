"""Control commands: plain JSON on `control.<verb>`, from the CLI or any NATS client.

    nats pub control.shift_gear '{"level": "ACCELERATED"}'
    nats pub control.stop '{}'
    nats pub control.emergency_stop '{"reason": "storm"}'

Unknown fields are refused (a typo must not be silently ignored). A signed command
carries `Scf-Sig` / `Scf-Kid` headers: Ed25519 over `subject + "\\n" + body`, checked
against the trust list before the body is parsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import msgspec

from scf.bus.errors import DecodeError, SignatureError
from scf.bus.signing import SigningKey, TrustList, command_message


class Command(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    by: str = ""  # who sent it (free text; the signature, when present, is the proof)
    reason: str = ""
    nonce: str = ""  # optional: makes two identical commands distinct


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


@dataclass(frozen=True)
class Received:
    command: Command
    subject: str
    signer: str | None  # the trusted signer's name, when signed and verified


def encode(command: Command, key: SigningKey | None = None) -> tuple[str, bytes, dict[str, str]]:
    """(subject, body, headers) for a command, signed when a key is given."""
    subject = SUBJECT_OF[type(command)]
    body = msgspec.json.encode(command)
    headers: dict[str, str] = {}
    if key is not None:
        from scf.bus.client import SCF_KID, SCF_SIG

        headers = {SCF_SIG: key.sign(command_message(subject, body)), SCF_KID: key.kid}
    return subject, body, headers


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
    return Received(command, subject, signer)
