"""The one way to read a stream: `StreamReader`. In stream order, each message once, as
fast as the connection allows, riding out a server restart.

    reader = StreamReader(bus.nc, bus.js, "FOSSILS", "fossil.recorded.grid_case14.>", start_seq=1)
    stats = await reader.scan(lambda m: ...)      # to the last message when the read began (or `stop`)
    await reader.follow(on_message, stop)          # the same, then every new one until `stop` is set
    msgs = await read(bus, "LEDGER", "ledger.transfer.>")   # scan into a list

`on_message(m)` gets a `StreamMsg` (`seq`, `subject`, `data`, `headers`, `time`: when the
stream stored it); it may be a coroutine function, and it is awaited before the next
message is handed over. What to read: one subject filter or several (wildcards allowed;
none: the whole stream), from `start_seq` or from `start_time`, up to `end_seq`, `limit`
messages, or (`scan`) the last message that matched when the read began. The artifact
store reads Object Store chunks with it, the GPU worker a job's fossils, the daemon its
views of the log, the ledger its index, the trust view the TRUST stream, `scf dlq ls` the
dead letters.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

from nats.js import api
from nats.js.errors import NotFoundError, ServiceUnavailableError

from scf.bus.client import Throttle
from scf.bus.errors import SCFError, StreamNotFound
from scf.bus.stopping import Stopping, until_stopped

log = logging.getLogger("scf.reader")


@dataclass
class ReadStats:
    messages: int = 0
    bytes: int = 0
    last_seq: int = 0
    passes: int = 0  # consumers used (1 unless a gap, a stall or a server restart forced a resume)
    seconds: float = 0.0


class ReadStalled(SCFError):
    """A read that stalled, lost messages or could not reach the server for longer than it
    was allowed."""


class StreamMsg:
    """One message as the stream stored it."""

    __slots__ = ("seq", "subject", "data", "headers", "_ts")

    def __init__(self, seq: int, subject: str, data: bytes, headers: dict[str, str] | None, ts_ns: int) -> None:
        self.seq, self.subject, self.data, self._ts = seq, subject, data, ts_ns
        self.headers: dict[str, str] = headers or {}

    @property
    def time(self) -> dt.datetime:
        """When the stream stored the message (the server's clock, to the microsecond)."""
        s, ns = divmod(self._ts, 1_000_000_000)
        return dt.datetime.fromtimestamp(s, dt.timezone.utc) + dt.timedelta(microseconds=ns // 1000)

    def __repr__(self) -> str:
        return f"StreamMsg(seq={self.seq}, subject={self.subject!r}, {len(self.data)} bytes)"


OnMessage = Callable[[StreamMsg], "None | Awaitable[None]"]


def _ack_tokens(reply: str) -> tuple[int, int, int, int]:
    """(stream seq, consumer seq, timestamp ns, pending) from a JetStream ack subject (v1 or v2)."""
    t = reply.split(".")
    if len(t) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return int(t[5]), int(t[6]), int(t[7]), int(t[8])
    # $JS.ACK.<domain>.<acc>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>[.<rand>]
    return int(t[7]), int(t[8]), int(t[9]), int(t[10])


def _ack_origin(reply: str) -> tuple[str, str]:
    """(stream, consumer) named by a JetStream ack subject (v1 or v2)."""
    t = reply.split(".")
    return (t[2], t[3]) if len(t) == 9 else (t[4], t[5])


def describe(exc: BaseException) -> str:
    """One line for a bus error (nats-py's own str() of a 503 is all `None`s)."""
    if isinstance(exc, ServiceUnavailableError):
        return "ServiceUnavailableError: JetStream is not answering (server restarting, or JetStream off)"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Pass:
    """What one consumer delivered: where it ended and why."""

    def __init__(self, last: int) -> None:
        self.last = last
        self.cseq = 0
        self.consumer = ""  # the consumer's name, once the server has answered its creation
        self.progress = time.monotonic()
        self.gap = False
        self.stalled = False
        self.error: BaseException | None = None
        self.done = asyncio.Event()  # finished (scan) or ended early (gap, callback error)


class StreamReader:
    """Read the messages of `stream` matching `subject` (one filter, several, or "" for all)
    from `start_seq` (or `start_time`) in stream order, each once.

    The consumer is the kind every reading role may create (nats/users.conf grants
    `$JS.API.CONSUMER.CREATE.<stream>` and `$JS.FC.<stream>.>`): an unnamed ephemeral push
    consumer onto this connection's inbox, no acks, in memory, with flow control and idle
    heartbeats (`headers_only` delivers the headers and subjects without the bodies).
    Flow-control requests are answered when every message before them has been handed
    over, so the server never runs more than its flow-control window ahead. A gap in the
    consumer sequence (a slow-consumer drop), a reconnection (a server restart loses the
    consumer) or `stall` seconds without a message or heartbeat end a pass; the next pass
    starts a new consumer after the last message handed over. Failing requests (the server
    away, JetStream recovering) are backed off (0.1 s doubling to 5 s) and logged at most
    once a second. `scan` gives up with `ReadStalled` after `max_passes` stalls or gaps, or
    `patience` seconds without reaching the server; `follow` never does. Consumers are
    never deleted by request (readers may lack that permission): unsubscribing ends their
    interest and the server removes them."""

    BACKOFF_MAX = 5.0

    def __init__(
        self,
        nc,
        js,
        stream: str,
        subject: str | Sequence[str] = "",
        *,
        start_seq: int = 1,
        start_time: dt.datetime | None = None,
        end_seq: int = 0,
        headers_only: bool = False,
        stall: float = 10.0,
        max_passes: int = 5,
        patience: float = 60.0,
        limit: int | None = None,
        heartbeat: float = 2.0,
    ) -> None:
        self.nc, self.js, self.stream = nc, js, stream
        self.subjects = (subject,) if isinstance(subject, str) else tuple(subject)
        self.start_seq, self.start_time, self.end_seq = max(1, start_seq), start_time, end_seq
        self.headers_only = headers_only
        self.stall, self.max_passes, self.patience, self.heartbeat = stall, max_passes, patience, heartbeat
        self.stats = ReadStats()
        self.caught_up = asyncio.Event()  # set once everything there was at the start has been handed over
        self.live = False  # a consumer is delivering now
        self.failed = asyncio.Event()  # the last attempt to start a consumer failed (`problem` says why)
        self.problem = ""
        self._progress = asyncio.Event()
        self._budget = limit  # how many messages to hand over (scan: at most those there at the start)
        self._throttle = Throttle(1.0)

    @property
    def what(self) -> str:
        return f"{self.stream} {','.join(s for s in self.subjects if s) or '(all subjects)'}"

    # ------------------------------------------------------------------ the two reads
    async def scan(self, on_message: OnMessage, stop: asyncio.Event | None = None) -> ReadStats:
        """Hand every matching message to `on_message`, in order, up to `end_seq` (or
        `limit` messages, or the last matching message when the read began, or until
        `stop` is set: a reader that has what it needs), and return what was read."""
        return await self._read(on_message, stop, following=False)

    async def follow(self, on_message: OnMessage, stop: asyncio.Event, on_caught_up: Callable[[], None] | None = None) -> ReadStats:
        """Like `scan`, then keep handing over new messages until `stop` is set (a live
        view). `on_caught_up()` is called once, when everything the stream held at the
        start has been handed over (`caught_up` is set then too). A failing `on_message`
        ends the follow with its exception."""
        return await self._read(on_message, stop, on_caught_up, following=True)

    # ------------------------------------------------------------------ passes
    async def _read(self, on_message: OnMessage, stop: asyncio.Event | None, on_caught_up=None, *, following: bool) -> ReadStats:
        t0 = time.perf_counter()
        last = self.start_seq - 1
        troubles = 0
        delay = 0.1
        reached = time.monotonic()  # when the server last answered
        while stop is None or not stop.is_set():
            if self._finished(last):
                break
            self.stats.passes += 1
            try:
                p = await self._pass(last, on_message, stop, on_caught_up, following)
            except StreamNotFound as exc:
                if not following:
                    raise
                self._failed(str(exc))
                p = None
            except (asyncio.CancelledError, SCFError):
                raise
            except Exception as exc:  # noqa: BLE001 - the server away or restarting: backed off and retried
                if not following and time.monotonic() - reached > self.patience:
                    raise ReadStalled(
                        f"reading {self.what} failed for {self.patience:.0f} s at seq {last} ({describe(exc)}): "
                        "check the connection to NATS and retry"
                    ) from None
                self._failed(f"reading {self.what}: {describe(exc)}: retrying from seq {last + 1}")
                p = None
            if p is None:
                await self._sleep(delay, stop)
                delay = min(delay * 2, self.BACKOFF_MAX)
                continue
            reached, delay = time.monotonic(), 0.1
            if p.error is not None:
                raise p.error
            if p.last > last:
                troubles = 0
            last = p.last
            if p.done.is_set() and not p.gap:
                break  # scan: finished
            if stop is not None and stop.is_set():
                break
            if p.gap or p.stalled:
                troubles += 1
                if not following and troubles >= self.max_passes:
                    raise ReadStalled(
                        f"reading {self.what} stalled {troubles} times at seq {last}: check the connection to NATS and retry"
                    )
                self._warn(f"reading {self.what}: {'messages dropped' if p.gap else 'stalled'} after seq {last}: resuming")
        self.stats.last_seq = max(self.stats.last_seq, last)
        self.stats.seconds = time.perf_counter() - t0
        return self.stats

    def _finished(self, last: int) -> bool:
        return (self._budget is not None and self.stats.messages >= self._budget) or bool(self.end_seq and last >= self.end_seq)

    def _mark_caught_up(self, on_caught_up) -> None:
        if not self.caught_up.is_set():
            self.caught_up.set()
            if on_caught_up is not None:
                on_caught_up()

    async def _pass(self, last: int, on_message: OnMessage, stop: asyncio.Event | None, on_caught_up, following: bool) -> _Pass:
        p = _Pass(last)
        nc = self.nc
        reconnects = nc.stats.get("reconnects", 0)

        async def on_msg(msg) -> None:
            if p.done.is_set() or (stop is not None and stop.is_set()):
                return
            p.progress = time.monotonic()
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
            stream, consumer = _ack_origin(msg.reply)
            if stream != self.stream or (p.consumer and consumer != p.consumer):
                return  # not from the consumer this pass created (a push consumer someone else aimed at this inbox)
            self.live = True  # delivering: the consumer's creation can be answered after its first messages
            sseq, cseq, ts, left = _ack_tokens(msg.reply)
            if cseq != p.cseq + 1:
                p.gap = True  # a dropped message: resume after the last good one
                p.done.set()
                return
            p.cseq = cseq
            if self.end_seq and sseq > self.end_seq:
                p.done.set()
                return
            if self._budget is None and not following:
                self._budget = self.stats.messages + 1 + left  # the end as it stands now
            try:
                r = on_message(StreamMsg(sseq, msg.subject, msg.data, hdr, ts))
                if inspect.isawaitable(r):
                    await r
            except Exception as exc:  # noqa: BLE001 - handed back to the caller of scan / follow
                p.error = exc
                p.done.set()
                return
            p.last = sseq
            self.stats.messages += 1
            self.stats.bytes += len(msg.data)
            self.stats.last_seq = sseq
            self._progress.set()
            if left == 0:
                self._mark_caught_up(on_caught_up)
            if not following and (left == 0 or self._finished(sseq)):
                p.done.set()
            elif following and self.end_seq and sseq >= self.end_seq:
                p.done.set()

        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
        try:
            info = await self._add_consumer(inbox, last, stop)
            if info is None:
                return p  # stopped while the server was asked (a follow's stop: never a 5 s wait)
            p.consumer = info.name
            self.live, self.problem = True, ""
            self.failed.clear()
            if not info.num_pending and not info.delivered.consumer_seq:
                self._mark_caught_up(on_caught_up)  # nothing (more) matches
                if not following:
                    p.done.set()
                    return p
            stop_wait = asyncio.ensure_future(stop.wait()) if stop is not None else None
            try:
                while not p.done.is_set() and not (stop is not None and stop.is_set()):
                    waiters: list[Any] = [asyncio.ensure_future(p.done.wait())]
                    await asyncio.wait(waiters + ([stop_wait] if stop_wait else []), timeout=min(1.0, self.stall),
                                       return_when=asyncio.FIRST_COMPLETED)
                    for w in waiters:
                        w.cancel()
                    if p.done.is_set():
                        break
                    if nc.stats.get("reconnects", 0) != reconnects:
                        break  # the server restarted (or we moved): the consumer is gone, resume on a new one
                    if time.monotonic() - p.progress > self.stall:
                        p.stalled = True
                        break
            finally:
                if stop_wait is not None:
                    stop_wait.cancel()
        finally:
            self.live = False
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - a closed connection has no interest left: the server drops the consumer
                pass
        return p

    async def _add_consumer(self, inbox: str, last: int, stop: asyncio.Event | None = None):
        """The pass's consumer (its info), created by request; None when `stop` came first."""
        by_time = self.start_time is not None and last < self.start_seq
        subjects = [s for s in self.subjects if s]
        cfg = api.ConsumerConfig(
            deliver_subject=inbox,
            ack_policy=api.AckPolicy.NONE,
            deliver_policy=api.DeliverPolicy.BY_START_TIME if by_time else api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=None if by_time else last + 1,
            opt_start_time=self.start_time if by_time else None,
            filter_subject=subjects[0] if len(subjects) == 1 else None,
            filter_subjects=subjects if len(subjects) > 1 else None,
            headers_only=self.headers_only or None,
            flow_control=True,
            idle_heartbeat=self.heartbeat,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=max(5.0, 2 * self.heartbeat),
        )
        try:
            return await until_stopped(self.js.add_consumer(self.stream, cfg), stop)
        except Stopping:
            return None
        except NotFoundError:
            raise StreamNotFound(f"stream {self.stream} does not exist: run `scf streams ensure`") from None

    async def reached(self, seq: int, timeout: float = 5.0) -> bool:
        """Wait until the message at `seq` (or a later one) has been handed over (read your
        writes: `seq` from a publish ack or the subject's last message); False after `timeout`."""
        deadline = time.monotonic() + timeout
        while self.stats.last_seq < seq:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), left)
            except asyncio.TimeoutError:
                pass
        return True

    # ------------------------------------------------------------------ helpers
    def _failed(self, problem: str) -> None:
        self.problem = problem
        self.failed.set()
        self._warn(problem)

    def _warn(self, line: str) -> None:
        self._throttle.warn(log, "read", "%s", line)  # at most one line a second; the rest are counted

    @staticmethod
    async def _sleep(delay: float, stop: asyncio.Event | None) -> None:
        if stop is None:
            await asyncio.sleep(delay)
            return
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except asyncio.TimeoutError:
            pass


async def last_seq(js, stream: str, subject: str) -> int:
    """The stream sequence of the last message on `subject` (wildcards allowed), or 0."""
    try:
        msg = await js.get_last_msg(stream, subject)
    except NotFoundError:
        return 0
    return msg.seq or 0


async def read(bus, stream: str, subject: str | Sequence[str] = "", **kw: Any) -> list[StreamMsg]:
    """Every message of `stream` on `subject` up to the last one when the read began
    (`StreamReader.scan`), as a list; `kw` as StreamReader's."""
    out: list[StreamMsg] = []
    await StreamReader(bus.nc, bus.js, stream, subject, **kw).scan(out.append)
    return out
