"""`scf status`: streams, consumers and the DLQ at a glance."""

from __future__ import annotations

from nats.js.errors import NotFoundError

from scf.bus.client import Bus
from scf.bus.errors import redact_url
from scf.bus.streams import STREAMS


async def collect(bus: Bus) -> list[str]:
    lines = [f"NATS {redact_url(bus.settings.url)}"]
    lines.append(f"{'stream':<12} {'messages':>10} {'last seq':>10}   consumers (pending / ack-pending)")
    for spec in STREAMS:
        try:
            info = await bus.js.stream_info(spec.name)
        except NotFoundError:
            lines.append(f"{spec.name:<12} missing: run `scf streams ensure`")
            continue
        consumers = []
        for c in await bus.js.consumers_info(spec.name):
            consumers.append(f"{c.name} {c.num_pending}/{c.num_ack_pending}")
        lines.append(f"{spec.name:<12} {info.state.messages:>10} {info.state.last_seq:>10}   {', '.join(consumers) or '-'}")
    try:
        dlq = await bus.js.stream_info("DLQ")
        lines.append(f"DLQ size: {dlq.state.messages}" + ("  (see `scf dlq ls`)" if dlq.state.messages else ""))
    except NotFoundError:
        pass
    return lines
