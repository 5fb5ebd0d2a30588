"""Reading and redriving dead letters (the DLQ stream)."""

from __future__ import annotations

from dataclasses import dataclass

from nats.js.errors import NotFoundError

from scf.bus import events as ev
from scf.bus.client import MSG_ID, SCF_REDRIVE_FOR, Bus
from scf.bus.codec import Codec
from scf.bus.errors import SCFError

_codec = Codec([ev.DeadLettered])


@dataclass(frozen=True)
class DeadEntry:
    seq: int
    event: ev.DeadLettered

    def line(self) -> str:
        d = self.event.data
        return f"{self.seq:>6}  {d.consumer:<20} {d.stream}#{d.seq:<8} {d.subject:<40} x{d.deliveries}  {d.error[:120]}"


async def list_dead(bus: Bus, limit: int = 1000) -> list[DeadEntry]:
    info = await bus.js.stream_info("DLQ")
    out: list[DeadEntry] = []
    seq = info.state.first_seq
    while seq and seq <= info.state.last_seq and len(out) < limit:
        try:
            msg = await bus.js.get_msg("DLQ", seq, next=True)
        except NotFoundError:
            break
        out.append(DeadEntry(msg.seq, _codec.decode(msg.data)))  # type: ignore[arg-type]
        seq = (msg.seq or seq) + 1
    return out


async def get_dead(bus: Bus, seq: int) -> DeadEntry:
    try:
        msg = await bus.js.get_msg("DLQ", seq)
    except NotFoundError:
        raise SCFError(f"no dead letter with DLQ seq {seq}: list them with `scf dlq ls`") from None
    return DeadEntry(seq, _codec.decode(msg.data))  # type: ignore[arg-type]


async def retry(bus: Bus, seq: int) -> str:
    """Republish the original message for the consumer that failed it, then remove the
    dead letter. The copy gets a new Nats-Msg-Id (the original's would be deduplicated)
    and `Scf-Redrive-For: <consumer>`, so other consumers of the stream skip it; the event
    inside is unchanged, so effects derived from it keep their ids."""
    entry = await get_dead(bus, seq)
    d = entry.event.data
    headers = dict(d.headers)
    headers[MSG_ID] = f"{headers.get(MSG_ID, d.subject)}:redrive:{seq}"
    headers[SCF_REDRIVE_FOR] = d.consumer
    await bus.js.publish(d.subject, d.payload, headers=headers)
    await bus.js.delete_msg("DLQ", seq)
    return f"redrove DLQ seq {seq} to {d.subject} for {d.consumer}"
