"""Read a stream from a sequence to its end, in order, each message once, as fast as the
connection allows: `StreamReader`.

    reader = StreamReader(bus.nc, bus.js, "FOSSILS", "fossil.recorded.grid_case14.>", start_seq=1)
    stats = await reader.scan(lambda data, seq: ...)     # to the last message (or end_seq)

The artifact store reads Object Store chunks with it, the GPU worker a job's fossils. It
uses the one consumer kind every reading role may create (an unnamed ephemeral push
consumer with flow control), so it works under nats/users.conf as written.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

from nats.js import api
from nats.js.errors import NotFoundError

from scf.bus.errors import SCFError, StreamNotFound


@dataclass
class ReadStats:
    messages: int = 0
    bytes: int = 0
    last_seq: int = 0
    passes: int = 0  # consumers used (1 unless a gap or a stall forced a resume)
    seconds: float = 0.0


class ReadStalled(SCFError):
    """A read that stalled (or lost messages) on every pass it was allowed."""


def _ack_tokens(reply: str) -> tuple[int, int, int]:
    """(stream seq, consumer seq, pending) from a JetStream ack subject (v1 or v2)."""
    t = reply.split(".")
    if len(t) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return int(t[5]), int(t[6]), int(t[8])
    # $JS.ACK.<domain>.<acc>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>[.<rand>]
    return int(t[7]), int(t[8]), int(t[10])


class StreamReader:
    """Read the messages of `stream` matching `subject` from `start_seq` (to `end_seq`,
    inclusive, when > 0) as fast as the connection allows, in stream order, each once.

    The consumer is the kind every reading role may create (nats/users.conf grants
    `$JS.API.CONSUMER.CREATE.<stream>` and `$JS.FC.<stream>.>`): an unnamed ephemeral push
    consumer onto this connection's inbox, no acks, in memory, with flow control and idle
    heartbeats. Flow-control requests are answered when every message before them has
    been handed over, so the server never runs more than its flow-control window ahead.
    `on_message(data, stream_seq)` runs on the event loop, in order. A gap in the consumer
    sequence (a slow-consumer drop) or `stall` seconds without a message or heartbeat end
    the pass; the next pass starts a new consumer after the last message handed over (at
    most `max_passes`). Consumers are never deleted by request (readers may lack that
    permission): unsubscribing ends their interest and the server removes them."""

    def __init__(
        self,
        nc,
        js,
        stream: str,
        subject: str,
        *,
        start_seq: int = 1,
        end_seq: int = 0,
        stall: float = 10.0,
        max_passes: int = 5,
        expected: int | None = None,
        heartbeat: float = 2.0,
    ) -> None:
        self.nc, self.js, self.stream, self.subject = nc, js, stream, subject
        self.start_seq, self.end_seq = max(1, start_seq), end_seq
        self.stall, self.max_passes, self.heartbeat = stall, max_passes, heartbeat
        self.expected = expected  # stop after this many messages (an object's chunk count)
        self.stats = ReadStats()

    async def scan(self, on_message: Callable[[bytes, int], None]) -> ReadStats:
        """Hand every matching message to `on_message(data, stream_seq)`, in order, up to
        `end_seq` (or the stream's last message when the read started, or `expected`
        messages), and return what was read."""
        t0 = time.perf_counter()
        last = self.start_seq - 1
        while True:
            self.stats.passes += 1
            finished, last = await self._pass(last, on_message)
            if finished:
                break
            if self.stats.passes >= self.max_passes:
                raise ReadStalled(
                    f"reading {self.stream} {self.subject} stalled {self.stats.passes} times at seq {last}: "
                    "check the connection to NATS and retry"
                )
        self.stats.last_seq = last
        self.stats.seconds = time.perf_counter() - t0
        return self.stats

    def _done_reading(self) -> bool:
        return self.expected is not None and self.stats.messages >= self.expected

    async def _pass(self, last: int, on_message: Callable[[bytes, int], None]) -> tuple[bool, int]:
        if self._done_reading() or (self.end_seq and last >= self.end_seq):
            return True, last
        state = {"last": last, "cseq": 0, "progress": time.monotonic(), "gap": False}
        done = asyncio.Event()
        nc = self.nc

        async def on_msg(msg) -> None:
            if done.is_set():
                return
            state["progress"] = time.monotonic()
            hdr = msg.headers
            if hdr and hdr.get("Status") == "100":  # flow control request, or idle heartbeat
                if msg.reply:
                    await nc.publish(msg.reply, b"")
                stalled = hdr.get(api.Header.CONSUMER_STALLED.value)
                if stalled:
                    await nc.publish(stalled, b"")
                return
            if not msg.reply or not msg.reply.startswith("$JS.ACK."):
                return
            sseq, cseq, left = _ack_tokens(msg.reply)
            if cseq != state["cseq"] + 1:
                state["gap"] = True  # a dropped message: resume after the last good one
                done.set()
                return
            state["cseq"] = cseq
            if self.end_seq and sseq > self.end_seq:
                done.set()
                return
            on_message(msg.data, sseq)
            state["last"] = sseq
            self.stats.messages += 1
            self.stats.bytes += len(msg.data)
            if left == 0 or (self.end_seq and sseq >= self.end_seq) or self._done_reading():
                done.set()

        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
        try:
            cfg = api.ConsumerConfig(
                deliver_subject=inbox,
                ack_policy=api.AckPolicy.NONE,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=last + 1,
                filter_subject=self.subject,
                flow_control=True,
                idle_heartbeat=self.heartbeat,
                mem_storage=True,
                num_replicas=1,
                inactive_threshold=max(5.0, 2 * self.heartbeat),
            )
            try:
                info = await self.js.add_consumer(self.stream, cfg)
            except NotFoundError:
                raise StreamNotFound(f"stream {self.stream} does not exist: run `scf streams ensure`") from None
            if not info.num_pending and not info.delivered.consumer_seq:
                return True, last  # nothing (more) matches
            while not done.is_set():
                try:
                    await asyncio.wait_for(done.wait(), timeout=min(1.0, self.stall))
                except asyncio.TimeoutError:
                    if time.monotonic() - state["progress"] > self.stall:
                        break  # stalled: resume on a new consumer
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - a closed connection has no interest left: the server drops the consumer
                pass
        return done.is_set() and not state["gap"], state["last"]
