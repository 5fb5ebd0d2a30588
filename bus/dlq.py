"""The DLQ: the one writer every consumer calls, and reading / redriving dead letters.

Writing (`dead_letter`). An entry always fits: it keeps the original's stream, sequence,
subject, deliveries, error, headers, sha256 `digest` and `size`, and its body inline only
when the whole entry fits the server's `max_payload` (less room for headers and the
signature); otherwise the first bytes that fit, with `truncated` set. The original stays
on its stream (limits streams keep it), which is where a redrive reads it from. Nothing on
this path raises: a failed write is logged and the message is nak'ed with a delay, so it
comes back; it is terminated only once its entry is stored.

Only services may write the DLQ (nats/users.conf): a process logged in as another user
(worker, edge) does not try; it terminates the message with the reason (the server's
MSG_TERMINATED advisory carries it) after logging it. The worker has already published
`job.failed` (final) by then, the edge agent its `deploy.failed`.

Redrive (`retry`) republishes a message only when it is a genuine copy of what was on its
stream: the original is read back by (stream, seq) and must have the entry's subject and
digest, and it is the original's body and headers that are republished, never the
entry's. When the original is gone (work-queue, limits, deleted), the entry is redriven
only if it holds the whole body (not truncated, digest matches) and is signed by a key the
trust list holds with the `release` or `operator` role (a control-plane key, never a node
key); otherwise the redrive is refused with the reason.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from nats.js.api import Header
from nats.js.errors import NotFoundError

from scf.bus import codec
from scf.bus import events as ev
from scf.bus.client import SCF_REDRIVE_FOR, Bus
from scf.bus.codec import Codec
from scf.bus.errors import DecodeError, SCFError, SignatureError
from scf.bus.ids import derived_id
from scf.bus.reader import read
from scf.bus.signing import TrustList
from scf.bus.streams import STREAM_BY_NAME, ConsumerSpec, stream_for_subject

log = logging.getLogger("scf.dlq")

_codec = Codec([ev.DeadLettered])

# Room left under max_payload for the NATS headers (Nats-Msg-Id, Scf-Type) and the
# envelope's signature fields, which are added after the entry is sized.
HEADROOM = 2048
ERROR_CHARS = 4000
HEADER_VALUE_CHARS = 512
MAX_HEADERS = 64
# Roles whose signature makes an entry trustworthy on its own (a control-plane key).
ENTRY_SIGNER_ROLES = ("release", "operator")
# Headers that must not travel with a redrive: they would make the copy fail or join a batch.
_DROPPED_ON_REDRIVE = (
    Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value,
    Header.EXPECTED_LAST_SEQUENCE.value,
    Header.EXPECTED_LAST_MSG_ID.value,
    Header.EXPECTED_STREAM.value,
    Header.BATCH_ID.value,
    Header.BATCH_SEQUENCE.value,
    Header.BATCH_COMMIT.value,
)


class RedriveRefused(SCFError):
    """A dead letter that is not a provable copy of a message on its stream."""


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def may_write(bus: Bus) -> bool:
    """Whether this connection's user may publish on dlq.> (only `service`, or no auth)."""
    user = urlparse(bus.settings.url.split(",")[0].strip()).username
    return user in (None, "", "service")


def _trim_headers(headers: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in list(headers.items())[:MAX_HEADERS]:
        out[str(k)[:HEADER_VALUE_CHARS]] = str(v)[:HEADER_VALUE_CHARS]
    return out


def entry_for(
    *, stream: str, consumer: str, subject: str, seq: int, deliveries: int, error: str,
    headers: dict[str, str], payload: bytes, max_payload: int,
) -> ev.DeadLetter:
    """The dead letter for one message, sized to fit `max_payload` with room to spare."""
    whole = ev.DeadLetter(
        stream=stream, consumer=consumer, subject=subject, seq=seq, deliveries=deliveries,
        error=error[:ERROR_CHARS], headers=_trim_headers(headers), payload=payload,
        digest=digest(payload), size=len(payload), truncated=False,
    )
    limit = max(1024, max_payload - HEADROOM)
    if len(_encoded(whole)) <= limit:
        return whole
    empty = ev.DeadLetter(**{**_fields(whole), "payload": b"", "truncated": True})
    room = limit - len(_encoded(empty))
    if room < 64:  # the headers alone are too large: keep the SCF and NATS ones only
        keep = {k: v for k, v in whole.headers.items() if k.lower().startswith(("nats-", "scf-"))}
        empty = ev.DeadLetter(**{**_fields(empty), "headers": dict(list(keep.items())[:8])})
        room = limit - len(_encoded(empty))
    keep_bytes = max(0, (room * 3) // 4 - 8)  # JSON carries bytes as base64 (4 chars per 3 bytes)
    return ev.DeadLetter(**{**_fields(empty), "payload": payload[:keep_bytes]})


def _fields(d: ev.DeadLetter) -> dict[str, Any]:
    return {f: getattr(d, f) for f in d.__struct_fields__}


def _encoded(d: ev.DeadLetter) -> bytes:
    return codec.encode(ev.DeadLettered.new(d, source="x" * 64, id="0" * 36))


async def dead_letter(bus: Bus, msg: Any, *, stream: str, consumer: str, error: str, retry_delay: float = 5.0) -> bool:
    """Copy `msg` (a JetStream message) to the DLQ, then terminate it. True when stored.

    Never raises: when the entry cannot be stored (server unreachable, permission, …) the
    message is nak'ed with `retry_delay` and comes back; it is logged either way."""
    try:
        meta = msg.metadata
        seq, deliveries = meta.sequence.stream, meta.num_delivered
    except Exception:  # noqa: BLE001 - not a JetStream message (cannot happen from a pull consumer)
        seq, deliveries = 0, 0
    data = msg.data or b""
    if not may_write(bus):
        log.error("%s: %s seq %s cannot be handled (%s); this user may not write the DLQ (only services may): "
                  "terminated, digest %s, %d bytes", consumer, stream, seq, error[:500], digest(data), len(data))
        await _settle(msg, b"+TERM " + f"{consumer}: {error}"[:1000].encode(errors="replace"))
        return False
    try:
        entry = entry_for(
            stream=stream, consumer=consumer, subject=msg.subject, seq=seq, deliveries=deliveries, error=error,
            headers=dict(msg.headers or {}), payload=data, max_payload=bus.nc.max_payload or 1024 * 1024,
        )
        dead = ev.DeadLettered.new(entry, source=bus.source, id=derived_id("dlq", stream, consumer, seq))
        await bus.publish(dead)
    except Exception as exc:  # noqa: BLE001 - the DLQ write path must never raise: the message comes back
        log.warning("%s: %s seq %s could not be dead-lettered (%s: %s): left for redelivery in %.0fs",
                    consumer, stream, seq, type(exc).__name__, exc, retry_delay)
        await _settle(msg, None, retry_delay)
        return False
    log.error("%s: %s seq %s to the DLQ%s: %s", consumer, stream, seq,
              f" (body cut to {len(entry.payload)} of {entry.size} bytes)" if entry.truncated else "", error[:500])
    await _settle(msg, b"+TERM")
    return True


async def give_back(bus: Bus, msg: Any, spec: ConsumerSpec, why: str) -> bool:
    """A message taken and not handled (`why`: a stop): nak'ed, so it is redelivered at once.
    On the last delivery the server allows (`spec.config().max_deliver`, one above the
    runner's own limit) a nak would never bring it back, nor bring it to the DLQ: it is
    dead-lettered instead, with the reason: True when it was (stored). Never raises."""
    try:
        delivered = msg.metadata.num_delivered
    except Exception:  # noqa: BLE001 - not a JetStream message (cannot happen from a pull consumer)
        delivered = 0
    last = spec.config().max_deliver
    if 0 < last <= delivered:
        return await dead_letter(bus, msg, stream=spec.stream, consumer=spec.durable,
                                 error=f"{why} on its last delivery ({delivered} of {last}): dead-lettered instead of given back")
    try:
        await msg.nak()
    except Exception:  # noqa: BLE001 - connection gone: ack_wait redelivers
        pass
    return False


async def _settle(msg: Any, term: bytes | None, delay: float = 0.0) -> None:
    """Terminate (`term` is the ack body, optionally with a reason) or nak with a delay;
    a failure here (connection gone) is left to ack_wait, which redelivers."""
    try:
        if term is None:
            await msg.nak(delay=delay)
        elif term == b"+TERM":
            await msg.term()
        else:
            # "+TERM <reason>" (nats-server >= 2.11): the MSG_TERMINATED advisory carries it.
            # nats-py's Msg.term() takes no reason, so the ack is sent as Msg.term() would.
            await msg._client.publish(msg.reply, term)
            msg._ackd = True
    except Exception as exc:  # noqa: BLE001 - settling is best effort: ack_wait redelivers
        log.warning("settling %s failed (%s: %s): it is redelivered after ack_wait", msg.subject, type(exc).__name__, exc)


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class DeadEntry:
    seq: int
    event: ev.DeadLettered | None  # None: the DLQ holds something that is not an SCF dead letter
    subject: str = ""
    size: int = 0
    problem: str = ""
    raw: bytes = b""

    def line(self) -> str:
        if self.event is None:
            return f"{self.seq:>6}  undecodable ({self.size} bytes on {self.subject}): {self.problem[:120]}"
        d = self.event.data
        cut = f" (body cut: {len(d.payload)}/{d.size} B)" if d.truncated else ""
        return f"{self.seq:>6}  {d.consumer:<20} {d.stream}#{d.seq:<8} {d.subject:<40} x{d.deliveries}  {d.error[:120]}{cut}"


def _entry(seq: int, subject: str, data: bytes) -> DeadEntry:
    try:
        event = _codec.decode(data)
    except Exception as exc:  # noqa: BLE001 - any bytes may sit on dlq.>: list them, never fail the listing
        return DeadEntry(seq, None, subject, len(data), f"{type(exc).__name__}: {exc}", data)
    assert isinstance(event, ev.DeadLettered)
    return DeadEntry(seq, event, subject, len(data), "", data)


async def list_dead(bus: Bus, limit: int = 1000) -> list[DeadEntry]:
    """The first `limit` dead letters, oldest first."""
    return [_entry(m.seq, m.subject, m.data) for m in await read(bus, "DLQ", limit=limit)]


async def get_dead(bus: Bus, seq: int) -> DeadEntry:
    try:
        msg = await bus.js.get_msg("DLQ", seq) if seq > 0 else None
    except NotFoundError:
        msg = None
    if msg is None:
        raise SCFError(f"no dead letter with DLQ seq {seq}: list them with `scf dlq ls`")
    return _entry(seq, msg.subject or "", msg.data or b"")


async def drop(bus: Bus, seq: int) -> str:
    await get_dead(bus, seq)
    await bus.js.delete_msg("DLQ", seq)
    return f"removed DLQ seq {seq}"


# --------------------------------------------------------------------------- redrive


def _refuse(seq: int, why: str) -> RedriveRefused:
    return RedriveRefused(f"DLQ seq {seq} not redriven: {why}")


async def genuine(bus: Bus, entry: DeadEntry, trust: TrustList | None) -> tuple[bytes, dict[str, str], str]:
    """The body and headers to redrive for `entry`, and where they came from, or
    RedriveRefused naming why the entry is not a provable copy of a message."""
    seq = entry.seq
    if entry.event is None:
        raise _refuse(seq, f"not an SCF dead letter ({entry.problem[:200]}): remove it with `scf dlq drop {seq}`")
    d = entry.event.data
    if d.stream not in STREAM_BY_NAME or d.stream == "DLQ":
        raise _refuse(seq, f"it names stream {d.stream!r}, which is not an SCF stream that can be redriven")
    try:
        holder = stream_for_subject(d.subject)
    except KeyError:
        holder = ""
    if holder != d.stream:
        raise _refuse(seq, f"its subject {d.subject!r} is not stored by stream {d.stream} (forged entry?)")
    try:
        await bus.js.consumer_info(d.stream, d.consumer)
    except NotFoundError:
        raise _refuse(seq, f"it names consumer {d.consumer!r}, which {d.stream} does not have (forged entry?)") from None
    original = None
    if d.seq > 0:
        try:
            original = await bus.js.get_msg(d.stream, d.seq)
        except NotFoundError:
            original = None
    if original is not None:
        body = original.data or b""
        if original.subject != d.subject:
            raise _refuse(seq, f"{d.stream} seq {d.seq} holds {original.subject!r}, the entry names {d.subject!r} (forged entry?)")
        expect = d.digest or ("" if d.truncated else digest(d.payload))
        if digest(body) != expect:
            raise _refuse(seq, f"{d.stream} seq {d.seq} has digest {digest(body)}, the entry {expect or 'none'} (forged entry?)")
        return body, dict(original.headers or {}), f"{d.stream} seq {d.seq}"
    gone = f"{d.stream} seq {d.seq} is no longer on its stream"
    if d.truncated or not d.digest or digest(d.payload) != d.digest:
        raise _refuse(seq, f"{gone} and the entry does not hold its whole body")
    if trust is None:
        raise _refuse(seq, f"{gone} and no trust list was given to check the entry's signature")
    try:
        signed = Codec([ev.DeadLettered], trust=trust, require_signature=True).decode(entry.raw)
    except (DecodeError, SignatureError) as exc:
        raise _refuse(seq, f"{gone} and the entry is not signed by a trusted key ({exc})") from None
    key = trust.keys.get(signed.kid or "")
    if key is None or not set(key.roles) & set(ENTRY_SIGNER_ROLES):
        raise _refuse(seq, f"{gone} and the entry's signer holds none of the roles {', '.join(ENTRY_SIGNER_ROLES)}")
    return d.payload, dict(d.headers), f"the signed entry ({key.name or signed.kid})"


async def retry(bus: Bus, seq: int, trust: TrustList | None = None) -> str:
    """Republish the original message for the consumer that failed it, then remove the
    dead letter. Only a genuine copy is redriven (see `genuine`). The copy gets a new
    Nats-Msg-Id (the original's would be deduplicated) and `Scf-Redrive-For: <consumer>`,
    so other consumers of the stream skip it; the event inside is unchanged, so effects
    derived from it keep their ids."""
    entry = await get_dead(bus, seq)
    body, headers, origin = await genuine(bus, entry, trust)
    assert entry.event is not None
    d = entry.event.data
    headers = {k: v for k, v in headers.items() if k not in _DROPPED_ON_REDRIVE}
    headers[Header.MSG_ID.value] = f"{headers.get(Header.MSG_ID.value, d.subject)}:redrive:{seq}"
    headers[SCF_REDRIVE_FOR] = d.consumer
    await bus.js.publish(d.subject, body, headers=headers)
    await bus.js.delete_msg("DLQ", seq)
    return f"redrove DLQ seq {seq} to {d.subject} for {d.consumer} (from {origin})"


__all__ = ["dead_letter", "entry_for", "digest", "may_write", "list_dead", "get_dead", "drop", "retry", "genuine",
           "DeadEntry", "RedriveRefused"]
