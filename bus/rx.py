"""The receive path of our own: raw deliveries, batch pull fetches, cheap JetStream metadata.

nats-py receives a message in ≈ 12 µs of CPU (a quiet core; 20–50 µs under load): a regular
expression per protocol line, a bytearray consumed piece by piece, every header block parsed
(≈ 35 % of it), a `Msg` dataclass, an `asyncio.Queue` hop and a task wake-up per message, and
for a pull `fetch` a future, a timer and a uuid per message. Here (docs/architecture.md,
"The receive path"):

* the connection's parser is `natsfix.RxParser` (every SCF connection: bus.client.connect):
  MSG/HMSG parsed with bytes.find/split; a subscription with a `Sink` gets its messages
  appended raw — (subject, reply, header block, payload) — and one `flush()` per socket
  read; the others go to nats-py as before;
* `PullInbox.fetch(n)` asks a durable pull consumer for a batch (one request) and waits
  once, until the batch is complete or the server's status ends the request (404 no
  messages, 408 expired; 409/503 are errors): no Msg object, no queue, no per-message
  future; the messages are handed over as `RxMsg` — a nats-py `Msg` (ack, nak, term,
  in_progress, metadata work as nats-py's) whose headers are parsed when first read;
* `ack_meta(reply)`: the stream sequence and delivery count from the ack subject.

Connecting, authentication, TLS, reconnects (nats-py re-subscribes a sink's subscription:
the sink is keyed by its sid), ping/pong and errors stay nats-py's.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from nats.aio.msg import Msg

from scf.bus.errors import SCFError
from scf.bus.natsfix import parse_headers, rx_parser, sid_of

_UNPARSED = object()


class RxMsg(Msg):
    """A delivered message as nats-py's `Msg` (so `ack`, `nak(delay)`, `term`,
    `in_progress`, `metadata`, `bus.client.ack_many` and the DLQ treat it as theirs), built
    without the dataclass's __init__, its headers parsed on first read."""

    _hdr: bytes | None = None
    _h: Any = _UNPARSED

    def __init__(self, nc, subject: bytes, reply: bytes, hdr: bytes | None, data: bytes) -> None:  # noqa: D107
        self._client, self.subject, self.reply, self.data, self._hdr = nc, subject.decode(), reply.decode(), data, hdr

    @property  # type: ignore[override]
    def headers(self) -> dict[str, str] | None:  # type: ignore[override]
        h = self._h
        if h is _UNPARSED:
            h = self._h = parse_headers(self._hdr)
        return h

    @headers.setter
    def headers(self, value: dict[str, str] | None) -> None:
        self._h = value

    def has_header(self, name: bytes) -> bool:
        """Whether the raw header block mentions `name` (a cheap pre-check before parsing)."""
        if self._h is not _UNPARSED:
            return bool(self._h) and name.decode() in self._h
        return self._hdr is not None and name in self._hdr


def ack_meta(reply: str) -> tuple[int, int]:
    """(stream sequence, delivery count) of a JetStream ack subject:
    `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>` or the form with
    domain and account hash (`$JS.ACK.<domain>.<hash>.<stream>…`, 11 or 12 tokens)."""
    t = reply.split(".")
    if len(t) == 9:
        return int(t[5]), int(t[4])
    if len(t) >= 11:
        return int(t[7]), int(t[6])
    raise ValueError(f"not a JetStream ack subject: {reply!r}")


def status_of(hdr: bytes) -> tuple[str, str]:
    """(code, description) of a status message's header block (`NATS/1.0 404 No Messages`)."""
    eol = hdr.find(b"\r\n")
    line = hdr[9:eol if eol >= 0 else len(hdr)].decode("utf-8", "replace")
    code, _, desc = line.partition(" ")
    return code.strip(), desc.strip()


class Sink:
    """Where the parser puts a subscription's messages: `items` (raw tuples, in order),
    `statuses` (status messages: (reply, header block)); `flush()` once per socket read.
    A waiter (`wait`) is woken when `want` items are here or a status came."""

    __slots__ = ("items", "statuses", "waiter", "want", "on_flush")

    def __init__(self) -> None:
        self.items: list[tuple[bytes, bytes, bytes | None, bytes]] = []
        self.statuses: list[tuple[bytes, bytes]] = []
        self.waiter: asyncio.Future | None = None
        self.want = 0
        self.on_flush: Any = None

    def status(self, subject: bytes, reply: bytes, hdr: bytes) -> None:
        self.statuses.append((reply, hdr))

    def flush(self) -> None:
        w = self.waiter
        if w is not None and not w.done() and (len(self.items) >= self.want or self.statuses):
            w.set_result(None)
        if self.on_flush is not None:
            self.on_flush()

    async def wait(self, want: int, timeout: float) -> bool:
        """Until `want` items are here or a status came (True), or `timeout` (False)."""
        if len(self.items) >= want or self.statuses:
            return True
        self.want = want
        self.waiter = w = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await w
            return True
        except TimeoutError:
            return False
        finally:
            self.waiter = None


class RxUnavailable(SCFError):
    """The connection has no RxParser (not connected through bus.client.connect)."""


class PullStatus(SCFError):
    """A pull request ended by an error status (409 consumer deleted, 503 no responders …)."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(f"{code} {description}".strip())
        self.code, self.description = code, description

    @property
    def gone(self) -> bool:
        """The consumer (or JetStream) is not there: bind again."""
        return self.code == "503" or (self.code == "409" and "deleted" in self.description.lower())


class PullInbox:
    """Batch fetches from one durable pull consumer through a sink on a private inbox."""

    ENDS = {"404", "408"}  # no messages / the request expired: the batch is what came
    IGNORED = {"100"}  # heartbeats
    SILENT_AFTER_S = 1.0  # a no-wait request unanswered for this long counts as silence

    def __init__(self, nc, stream: str, durable: str, api_prefix: str = "$JS.API") -> None:
        self.nc = nc
        self.nms = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.sink = Sink()
        self.sub: Any = None
        self.inbox = ""
        self.silent = 0  # no-wait requests left unanswered in a row (the server away or the interest lost)

    async def open(self) -> None:
        ps = rx_parser(self.nc)
        if ps is None:
            raise RxUnavailable("this connection has no SCF receive path (connect through bus.client.connect)")
        self.inbox = self.nc.new_inbox()
        self.sub = await self.nc.subscribe(self.inbox)
        ps.sinks[sid_of(self.sub)] = self.sink

    async def unsubscribe(self) -> None:
        await self.close()

    async def close(self) -> None:
        sub, self.sub = self.sub, None
        if sub is None:
            return
        ps = rx_parser(self.nc)
        if ps is not None:
            ps.sinks.pop(sid_of(sub), None)
        await sub.unsubscribe()

    def _take(self, k: int) -> list[RxMsg]:
        items = self.sink.items
        if not items:
            return []
        mine, self.sink.items = (items, []) if len(items) <= k else (items[:k], items[k:])
        nc = self.nc
        return [RxMsg(nc, s, r, h, d) for s, r, h, d in mine]

    def _ended(self) -> tuple[bool, PullStatus | None]:
        """(whether a status ended the request, the error it carries)."""
        statuses, self.sink.statuses = self.sink.statuses, []
        ended, error = False, None
        for _reply, hdr in statuses:
            code, desc = status_of(hdr)
            if code in self.IGNORED:
                continue
            ended = True
            if code not in self.ENDS and error is None:
                error = PullStatus(code, desc)
        return ended, error

    async def _request(self, k: int, timeout: float, *, no_wait: bool) -> bool:
        """Ask for `k` messages and wait until they are here, a status ends the request or
        `timeout`; True when the server had none (404/408 before any message)."""
        self.sink.statuses.clear()
        if no_wait:
            body = b'{"batch":%d,"no_wait":true}' % k
        else:  # a long poll: the server's expiry just before ours, so its 408 ends the wait
            expires = max(1_000_000, int(timeout * 0.95e9) - 10_000_000)
            body = json.dumps({"batch": k, "expires": expires}).encode()
        await self.nc.publish(self.nms, body, self.inbox)
        answered = await self.sink.wait(k, timeout)
        ended, error = self._ended()
        if no_wait and timeout >= self.SILENT_AFTER_S:  # a short wait may end before a busy server answers
            self.silent = 0 if answered else self.silent + 1
        if error is not None:
            raise error
        return ended and not self.sink.items

    async def fetch(self, n: int, timeout: float) -> list[RxMsg]:
        """Up to `n` messages: those already here (late replies to an earlier request), then
        what the server has now (one no-wait request); when it has none, one long poll of up
        to `timeout` for the first, and what else is there then. Raises PullStatus on an
        error status."""
        out = self._take(n)
        if len(out) < n:
            none = await self._request(n - len(out), timeout, no_wait=True)
            out += self._take(n - len(out))
            if none and not out:
                await self._request(1, timeout, no_wait=False)
                out += self._take(1)
                if out and n > 1:
                    await self._request(n - 1, timeout, no_wait=True)
                    out += self._take(n - 1)
        return out
