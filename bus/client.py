"""Connecting to NATS and publishing events.

`Bus` bundles the connection, its JetStream context, the settings and this process's
identity. Publishing always sets `Nats-Msg-Id` to the event id (so a retried publish is
stored once within the stream's duplicate window); `publish_once` adds
`Nats-Expected-Last-Subject-Sequence: 0` on a per-entity subject, so an entity is recorded
once, ever, whatever the window; server errors become the project's exceptions with the
server's codes kept.

One publisher, three ways: one event (`publish`, `publish_once`: both through `_send`),
many pipelined (`publish_many`), and atomic batches (`commit_batch`: all or none, optionally
fenced on the stream's last sequence; `publish_batch`: the same, falling back to
`publish_once` per event when a batch is refused). Every atomic batch is written by
`PipelinedPublisher.publish_atomic`, which fossil ingest uses directly.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import (
    BadSubjectError,
    ConnectionClosedError,
    ConnectionDrainingError,
    MaxPayloadError,
    NoRespondersError,
    NoServersError,
    OutboundBufferLimitError,
)
from nats.errors import TimeoutError as NatsTimeout
from nats.js import api
from nats.js.errors import APIError, BadRequestError, NoStreamResponseError, NotFoundError

from scf.bus import codec, natsfix
from scf.bus import events as ev
from scf.bus.errors import NatsUnavailable, PublishConflict, ServerError, StreamNotFound, redact_url
from scf.bus.headers import (  # noqa: F401 - the header names, also re-exported here
    BATCH_COMMIT,
    BATCH_ID,
    BATCH_SEQUENCE,
    EXPECTED_LAST_SEQ,
    EXPECTED_LAST_SUBJECT_SEQ,
    MSG_ID,
    SCF_KID,
    SCF_REDRIVE_FOR,
    SCF_SIG,
    SCF_TYPE,
)
from scf.bus.ids import PUBLIC_IDS, Ids, new_id, service_ids
from scf.bus.settings import Settings
from scf.bus.signing import SigningKey
from scf.bus.streams import stream_for_subject

log = logging.getLogger("scf.bus")
natsfix.install()  # a malformed header block must not end a connection's read loop (bus/natsfix.py)

try:  # nats-py's own check of a publish subject (whitespace, CR/LF): the frames must pass it too
    from nats.aio.client import _validate_subject as validate_subject
except ImportError:  # pragma: no cover - another nats-py

    def validate_subject(subject: str) -> None:
        if not subject or any(c.isspace() for c in subject):
            raise BadSubjectError


# JetStream error codes we act on.
ERR_WRONG_LAST_SEQUENCE = 10071
ERR_STREAM_NOT_FOUND = 10059


async def connect(settings: Settings, name: str = "scf", timeout: float = 2.0) -> NATS:
    """Connect, or fail with one line naming the URL and how to start the embedded server."""

    throttle = Throttle(1.0)

    refused: dict[str, None] = {}  # subjects the server refused this login to publish (newest last)

    async def _report(exc: Exception) -> None:
        # Permission violations and similar server errors must be visible; the same error
        # repeated (a server down: "Connect call failed" per attempt) at most once a second.
        throttle.warn(log, str(exc)[:200], "nats: %s", exc)
        text = str(exc)
        mark = text.lower().find(PUBLISH_REFUSED)
        if mark >= 0:  # -ERR 'Permissions Violation for Publish to "SUBJECT"': the publish's request times out
            refused[text[mark + len(PUBLISH_REFUSED):].split('"', 1)[0]] = None
            while len(refused) > 256:
                refused.pop(next(iter(refused)))

    client: list[NATS] = []  # set once connected

    async def _disconnected() -> None:
        if client and client[0].is_closed:  # a deliberate close() calls this too: nothing to say
            return
        log.warning("nats: disconnected from %s: reconnecting (forever, with backoff)", _redact(settings.url))

    async def _reconnected() -> None:
        log.warning("nats: reconnected to %s", _redact(settings.url))

    await _probe(settings.url, timeout)
    from urllib.parse import urlparse

    user = urlparse(settings.url.split(",")[0].strip()).username
    # Restricted users (worker, edge, analyst) may only receive replies on their own
    # inbox prefix (nats/users.conf): _INBOX.<user>.>
    extra = {"inbox_prefix": f"_INBOX.{user}".encode()} if user and user != "service" else {}
    try:
        nc = NATS()
        natsfix.use_rx_parser(nc)  # our receive path (bus/rx.py); the rest of the connection is nats-py's
        await nc.connect(
            settings.url,
            name=name,
            **extra,
            connect_timeout=timeout,
            # ride out a server restart: reconnect forever, backing off (reconnect_backoff),
            # and hold up to 8 MiB of publishes/acks meanwhile
            max_reconnect_attempts=-1,
            allow_reconnect=True,
            reconnect_to_server_handler=reconnect_backoff,
            pending_size=8 * 1024 * 1024,
            error_cb=_report,
            disconnected_cb=_disconnected,
            reconnected_cb=_reconnected,
        )
    except (NoServersError, OSError, asyncio.TimeoutError, NatsTimeout) as exc:
        raise NatsUnavailable(settings.url, type(exc).__name__) from None
    client.append(nc)
    nc.scf_refused = refused  # type: ignore[attr-defined] - read by Bus._send to name a refusal
    return nc


PUBLISH_REFUSED = 'permissions violation for publish to "'


def refused_publish(nc: NATS, subject: str, login: str | None) -> ServerError | None:
    """The one-line error for a publish whose request timed out because the server refused
    this login the subject (nats-py reports the refusal only to the error callback)."""
    if subject not in getattr(nc, "scf_refused", {}):
        return None
    return ServerError(f"nats-server refused login {login or '(none)'!r} publishing to {subject}: "
                       "use a login nats/users.conf allows on it (docs/nats.md)")


class Throttle:
    """Log a repeated message at most once per `interval` seconds per key, saying how many
    were held back (a server restart must not flood the log)."""

    def __init__(self, interval: float = 1.0, max_keys: int = 256) -> None:
        self.interval, self.max_keys = interval, max_keys
        self._last: dict[str, tuple[float, int]] = {}

    def warn(self, logger: logging.Logger, key: str, fmt: str, *args: object, level: int = logging.WARNING) -> bool:
        now = time.monotonic()
        last, held = self._last.get(key, (-1e18, 0))
        if now - last < self.interval:
            self._last[key] = (last, held + 1)
            return False
        if len(self._last) >= self.max_keys:
            self._last.clear()
        self._last[key] = (now, 0)
        logger.log(level, fmt + (f" ({held} more like it held back)" if held else ""), *args)
        return True


def reconnect_backoff(servers: list, info: dict) -> tuple[object, float]:
    """nats-py's reconnect_to_server_handler: the server tried least, after an exponential
    delay with jitter (0.1 s doubling to 2 s) -- nats-py's own reconnect_time_wait is fixed."""
    server = min(servers, key=lambda s: s.reconnects)
    delay = min(2.0, 0.1 * 2 ** min(server.reconnects, 5))
    return server, delay * random.uniform(0.5, 1.0)


def login_user(url: str) -> str | None:
    """The user a NATS URL logs in as (None: no user, a dev server without auth)."""
    from urllib.parse import urlparse

    part = url.split(",")[0].strip()
    return urlparse(part if "://" in part else f"nats://{part}").username


# Logins that hold no id key and may not read the streams they publish into (nats/users.conf):
# their effects take public ids and their duplicate acks cannot be checked (docs/security.md).
RESTRICTED_LOGINS = ("worker", "edge")
# Logins that may hold the deployment's id key: the services (and a dev server without users).
SERVICE_LOGINS = (None, "service")


def _redact(url: str) -> str:
    return redact_url(url)


async def _probe(url: str, timeout: float) -> None:
    """Fail fast when no server of the URL list accepts TCP (nats-py would retry forever)."""
    from urllib.parse import urlparse

    last = ""
    for part in url.split(","):
        u = urlparse(part.strip() if "://" in part else f"nats://{part.strip()}")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(u.hostname, u.port or 4222), timeout)
            writer.close()
            return
        except (OSError, asyncio.TimeoutError) as exc:
            last = "connection refused" if isinstance(exc, ConnectionRefusedError) else (type(exc).__name__)
    raise NatsUnavailable(url, last)


def map_error(exc: Exception, subject: str = "") -> Exception:
    if isinstance(exc, (NoRespondersError, NoStreamResponseError)):
        return StreamNotFound(f"no stream stores subject {subject!r}: run `scf streams ensure`", 503)
    if isinstance(exc, NotFoundError):
        return StreamNotFound(exc.description or "stream not found: run `scf streams ensure`", exc.code, exc.err_code)
    if isinstance(exc, APIError):
        if exc.err_code == ERR_WRONG_LAST_SEQUENCE:
            return PublishConflict(f"{subject} already holds a message ({exc.description})", exc.code, exc.err_code)
        return ServerError(exc.description or str(exc), exc.code, exc.err_code)
    return exc


# --------------------------------------------------------------------------- pipelined publishing
# nats-py's `publish_async` leaves its future pending forever when the server answers with
# an error, so a refused publish could hang its caller; this publisher resolves every
# future with the server's reply (errors included, as data) and decodes acks with msgspec.


class PubError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class PubReply(msgspec.Struct):
    """A JetStream publish acknowledgement, or its error."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    count: int = 0  # messages committed by an atomic batch
    error: PubError | None = None


_reply_decoder = msgspec.json.Decoder(PubReply)
# `Bus.publish_many` writes frames of up to this many messages (or about this many bytes),
# and has at most FRAMES_IN_FLIGHT of them unanswered (≈ the 4000 publishes in flight before)
FRAME_MESSAGES = 1000
FRAME_BYTES = 1 << 20
FRAMES_IN_FLIGHT = 4
_NO_RESPONDERS = PubReply(error=PubError(503, 0, "no stream stores this subject: run `scf streams ensure`"))


class PipelinedPublisher:
    """JetStream publishes with many in flight, each answered by a future of `PubReply`.

    nats-py's `publish_async` leaves its future pending forever when the server answers
    with an error (its reply handler raises inside the callback), so an expected-sequence
    refusal could never be seen; this publisher resolves every future with the server's
    reply (errors included, as data) and decodes acks with msgspec. Upstream:
    nats-io/nats.py#703 and #985 (fix proposed in #994); drop this workaround once a
    released nats-py resolves error acks on the future."""

    def __init__(self, nc, max_pending: int = 4000) -> None:
        self.nc = nc
        self._sem = asyncio.Semaphore(max_pending)
        self._futures: dict[str, asyncio.Future] = {}
        self._prefix = ""
        self._sub = None
        self._n = 0
        # `publish_frames` needs nats-py's internal write path (2.9 – 2.16); without it the
        # batch is published message by message through `publish`
        self.frames = can_write_frames(nc)

    async def start(self) -> "PipelinedPublisher":
        self._prefix = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self._prefix + ".*", cb=self._on_reply, pending_msgs_limit=-1, pending_bytes_limit=-1)
        return self

    async def close(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # noqa: BLE001 - closing finishes whatever state the connection is in
                pass
        for fut in self._futures.values():  # a frame's tokens share one `_Batch`: its future
            (fut.fut if isinstance(fut, _Batch) else fut).cancel()
        self._futures.clear()

    async def publish(self, subject: str, body: bytes, headers: dict[str, str]) -> asyncio.Future:
        check_payload(self.nc, len(body), header_size(headers))
        await self._sem.acquire()
        self._n += 1
        token = str(self._n)
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda _f: self._sem.release())
        self._futures[token] = fut
        try:
            await self.nc.publish(subject, body, reply=f"{self._prefix}.{token}", headers=headers)
        except BaseException:
            self._futures.pop(token, None)
            fut.cancel()
            raise
        return fut

    async def publish_atomic(
        self, items: Sequence[tuple[str, bytes]], extra: dict[str, str] | None = None, *,
        types: Sequence[str] | None = None, expected_last_seq: int | None = None,
    ) -> asyncio.Future:
        """One atomic batch (nats-server >= 2.12, `allow_atomic` on the stream): stored as
        one write, all or nothing; each message expects its subject to be empty (and, with
        `expected_last_seq`, the stream its last sequence: the server reads it on the first
        message only). `extra` goes on every message, `types[i]` as `Scf-Type` on the i-th.
        The future's reply has `count` on success, an error when the batch was refused."""
        batch_id = new_id().replace("-", "")
        last = len(items)
        if not last:
            raise ValueError("an atomic batch needs at least one message")
        every = {EXPECTED_LAST_SUBJECT_SEQ: "0", **(extra or {})}
        # the blocks built from parts encoded once (the common case), else message by message
        blocks: list[bytes | None] | None = _atomic_blocks(batch_id, every, last, types, expected_last_seq) if self.frames else None
        if blocks is None:
            headers_of: list[dict[str, str]] = []
            for i in range(1, last + 1):
                headers = {BATCH_ID: batch_id, BATCH_SEQUENCE: str(i), **every}
                if types is not None:
                    headers[SCF_TYPE] = types[i - 1]
                if i == 1 and expected_last_seq is not None:
                    headers[EXPECTED_LAST_SEQ] = str(expected_last_seq)
                if i == last:
                    headers[BATCH_COMMIT] = "1"
                headers_of.append(headers)
            blocks = [encode_headers(h) for h in headers_of] if self.frames else [None]
        if None in blocks:  # nats-py's own publish, message by message
            for (_, body), headers in zip(items, headers_of):  # none written unless all fit
                check_payload(self.nc, len(body), header_size(headers))
            for (subject, body), headers in zip(items[:-1], headers_of):
                await self.nc.publish(subject, body, headers=headers)
            return await self.publish(items[-1][0], items[-1][1], headers_of[-1])
        # One write: every message but the last without a reply, the commit with one.
        self._n += 1
        token = str(self._n)
        fut = asyncio.get_running_loop().create_future()
        parts: list[bytes] = []
        size = 0
        for i, ((subject, body), block) in enumerate(zip(items, blocks), 1):
            check_payload(self.nc, len(body), len(block))  # type: ignore[arg-type]
            validate_subject(subject)
            reply = f" {self._prefix}.{token}" if i == last else ""
            parts += (f"HPUB {subject}{reply} {len(block)} {len(block) + len(body)}\r\n".encode(), block, body, b"\r\n")  # type: ignore[arg-type]
            size += len(body)
        await self._sem.acquire()
        fut.add_done_callback(lambda _f: self._sem.release())
        self._futures[token] = fut
        try:
            await write_frames(self.nc, b"".join(parts), last, size)
        except BaseException:
            self._futures.pop(token, None)
            fut.cancel()
            raise
        return fut

    async def publish_frames(self, items: Sequence[tuple[str, bytes, bytes]]) -> asyncio.Future:
        """Many publishes, written on the connection in one call and answered by one future:
        the list of their `PubReply`s, in order, once the server has answered every one.
        `items`: (subject, body, header block as `header_block` makes it). The frames are
        the bytes nats-py's `publish` writes (HPUB with a reply inbox each), built here in
        one join instead of one `publish` (validation, header encoding, a future, a flush
        request) a message; every message is still acknowledged by the server on its own."""
        nc = self.nc
        if not self.frames:
            futs = [await self.publish(subject, body, _parse_block(block)) for subject, body, block in items]
            return asyncio.ensure_future(asyncio.gather(*futs))
        first = self._n + 1
        batch = _Batch(first, len(items), asyncio.get_running_loop().create_future())
        parts: list[bytes] = []
        prefix, size = self._prefix, 0
        for i, (subject, body, block) in enumerate(items, first):
            n_hdr = len(block)
            check_payload(nc, len(body), n_hdr)
            validate_subject(subject)
            parts += (f"HPUB {subject} {prefix}.{i} {n_hdr} {n_hdr + len(body)}\r\n".encode(), block, body, b"\r\n")
            size += len(body)
        blob = b"".join(parts)
        self._n += len(items)
        futures = self._futures
        for i in range(first, first + len(items)):
            futures[str(i)] = batch  # type: ignore[assignment]
        try:
            await write_frames(nc, blob, len(items), size)
        except BaseException:
            self.forget(batch.fut)
            raise
        return batch.fut

    def forget(self, fut: asyncio.Future) -> None:
        for token, f in list(self._futures.items()):
            if f is fut or (isinstance(f, _Batch) and f.fut is fut):
                del self._futures[token]
        if not fut.done():
            fut.cancel()

    async def _on_reply(self, msg) -> None:
        token = msg.subject[len(self._prefix) + 1 :]
        fut = self._futures.pop(token, None)
        if fut is None or fut.done():
            return
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            reply = _NO_RESPONDERS
        else:
            try:
                reply = _reply_decoder.decode(msg.data)
            except msgspec.DecodeError as exc:
                reply = PubReply(error=PubError(0, 0, f"unreadable publish ack: {exc}"))
        if isinstance(fut, _Batch):
            fut.answer(int(token), reply)
        else:
            fut.set_result(reply)


def check_payload(nc, body: int, headers: int) -> None:
    """MaxPayloadError unless a message of `body` bytes with a header block of `headers`
    bytes fits the server's max_payload. The server counts both (and closes the connection
    over a message too big, losing every publish and ack in flight); nats-py's `publish`
    checks the body alone, so every publish of this module checks here first."""
    if body + headers > (nc.max_payload or 1 << 20):
        raise MaxPayloadError


def header_size(headers: dict[str, str] | None) -> int:
    """The bytes of the header block nats-py's `publish` writes for `headers` (cleaned as it
    cleans them); 0 without headers."""
    if not headers:
        return 0
    n = len(_HDR_START) + 2
    for k, v in headers.items():
        key = k.strip()
        if key:
            n += len(key.encode()) + len(v.strip().encode()) + 4  # "k: v\r\n"; CR/LF become spaces
    return n


async def write_frames(nc, blob: bytes, messages: int, size: int) -> None:
    """Write protocol frames of `messages` publishes (`size` payload bytes) on the connection
    as nats-py's `publish` does for one: refused when the connection is closed or draining,
    or reconnecting with its buffer full; otherwise queued and the flusher kicked."""
    if nc.is_closed:
        raise ConnectionClosedError
    if nc.is_draining_pubs:
        raise ConnectionDrainingError
    if not nc.is_connected and (nc._max_pending_size <= 0 or len(blob) + nc._pending_data_size > nc._max_pending_size):
        raise OutboundBufferLimitError
    nc.stats["out_msgs"] += messages
    nc.stats["out_bytes"] += size
    await nc._send_command(blob)
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()


def can_write_frames(nc) -> bool:
    """Whether `nc` has the nats-py internals `write_frames` uses (nats-py 2.9 – 2.16)."""
    return all(hasattr(nc, a) for a in ("_send_command", "_flush_pending", "_flush_queue", "_max_payload", "_pending_data_size"))


async def ack_many(nc, msgs: Sequence) -> None:
    """`msg.ack()` for each JetStream message of `msgs`, written as one frame: the same
    fire-and-forget acknowledgement (an empty publish to the message's reply subject), about
    0.5 µs a message instead of 4. Raises nats-py's error before acking anything when one of
    them cannot be acked (not a JetStream message, or acked already)."""
    if not msgs:
        return
    if not can_write_frames(nc):
        for m in msgs:
            await m.ack()
        return
    for m in msgs:
        m._check_reply()
    await write_frames(nc, b"".join([b"PUB %s 0\r\n\r\n" % m.reply.encode() for m in msgs]), len(msgs), 0)
    for m in msgs:
        m._ackd = True


class _Batch:
    """The replies of one `publish_frames` call: one future for all of them."""

    __slots__ = ("first", "replies", "left", "fut")

    def __init__(self, first: int, n: int, fut: asyncio.Future) -> None:
        self.first, self.left, self.fut = first, n, fut
        self.replies: list[PubReply | None] = [None] * n

    def done(self) -> bool:
        return self.fut.done()

    def answer(self, token: int, reply: PubReply) -> None:
        i = token - self.first
        if self.replies[i] is None:
            self.replies[i] = reply
            self.left -= 1
            if self.left == 0:
                self.fut.set_result(self.replies)


_HDR_START = b"NATS/1.0\r\n"
_block_tails: dict[str, bytes] = {}


def header_block(msg_id: str, type_name: str) -> bytes | None:
    """The header block nats-py's `publish` writes for {Nats-Msg-Id: msg_id, Scf-Type:
    type_name}, byte for byte; None when a value needs nats-py's cleaning (surrounding
    whitespace, a line break, an unprintable character): then publish it through nats-py."""
    tail = _block_tails.get(type_name)
    if tail is None:
        if not _plain_value(type_name):
            return None
        tail = _block_tails.setdefault(type_name, f"\r\n{SCF_TYPE}: {type_name}\r\n\r\n".encode())
    if not _plain_value(msg_id):
        return None
    return b"%s%s: %s%s" % (_HDR_START, _MSG_ID_B, msg_id.encode(), tail)


_MSG_ID_B = MSG_ID.encode()
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # nats-py's rule for a header name


def encode_headers(headers: dict[str, str]) -> bytes | None:
    """The header block nats-py's `publish` writes for `headers`, byte for byte; None when a
    name or value needs nats-py's cleaning or checks (see `header_block`)."""
    lines = []
    for k, v in headers.items():
        if not (_HEADER_NAME.fullmatch(k) and _plain_value(v)):
            return None
        lines.append(f"{k}: {v}\r\n")
    return _HDR_START + "".join(lines).encode() + b"\r\n"


_PER_MESSAGE = frozenset({BATCH_ID, BATCH_SEQUENCE, EXPECTED_LAST_SEQ, BATCH_COMMIT})


def _atomic_blocks(
    batch_id: str, every: dict[str, str], last: int, types: Sequence[str] | None, expected_last_seq: int | None,
) -> list[bytes] | None:
    """The header blocks of an atomic batch's `last` messages, byte for byte what
    `encode_headers` gives for {Nats-Batch-Id, Nats-Batch-Sequence: i, **every, Scf-Type:
    types[i-1], Nats-Expected-Last-Sequence (the first), Nats-Batch-Commit: 1 (the last)}:
    `every` and each type encoded once, not once per message. None when a value needs
    nats-py's cleaning (see `encode_headers`) or `every` names a header set per message: then
    the caller builds each message's headers."""
    if _PER_MESSAGE.intersection(every) or (types is not None and SCF_TYPE in every):
        return None
    common = encode_headers(every)
    if common is None or not _plain_value(batch_id):
        return None
    lines: dict[str, bytes] = {}
    if types is not None:
        for t in set(types):
            if not _plain_value(t):
                return None
            lines[t] = f"{SCF_TYPE}: {t}\r\n".encode()
    head = f"{BATCH_ID}: {batch_id}\r\n{BATCH_SEQUENCE}: ".encode()
    mid = common[len(_HDR_START) : -2]  # the lines of `every`
    first = f"{EXPECTED_LAST_SEQ}: {expected_last_seq}\r\n".encode() if expected_last_seq is not None else b""
    commit = f"{BATCH_COMMIT}: 1\r\n".encode()
    return [
        b"%s%s%d\r\n%s%s%s%s\r\n" % (_HDR_START, head, i, mid, lines[types[i - 1]] if types is not None else b"",
                                     first if i == 1 else b"", commit if i == last else b"")
        for i in range(1, last + 1)
    ]


def _plain_value(value: str) -> bool:
    return bool(value) and value.isprintable() and value.strip() == value


def _parse_block(block: bytes) -> dict[str, str]:
    """The headers of a `header_block` (for the message-by-message fallback)."""
    lines = block.decode().split("\r\n")[1:]
    return dict(line.split(": ", 1) for line in lines if line)




def reply_error(err: PubError, subject: str) -> Exception:
    if err.err_code == ERR_WRONG_LAST_SEQUENCE:
        return PublishConflict(f"{subject} already holds a message ({err.description})", err.code, err.err_code)
    if err.code == 503 or err.err_code == ERR_STREAM_NOT_FOUND:
        return StreamNotFound(f"no stream stores subject {subject!r}: run `scf streams ensure`", err.code, err.err_code)
    return ServerError(err.description or "publish refused", err.code, err.err_code)


@dataclass(frozen=True)
class Published:
    stream: str
    seq: int
    duplicate: bool
    # with the duplicate check (on by default where the login may read the stream): the event
    # as stored when the stream's `duplicate` ack named a message that was not this event (an
    # id taken first by someone else) and it was published again under another id
    reissued: ev.Event | None = None


@dataclass(frozen=True)
class Once:
    """The outcome of `publish_once`."""

    status: Literal["new", "duplicate", "conflict"]
    seq: int
    existing: ev.Event | None = None  # what the subject already held (duplicate / conflict)
    reissued: ev.Event | None = None  # published under another id: its id was taken first (see Published)


class Bus:
    """A process's connection. `ids` derives its effects' ids: keyed with the deployment's id
    key (`$SCF_HOME/keys/ids.key`) when the login is a service's and the file is there, public
    otherwise. `verify_duplicates` (default: every login but worker and edge, which may not
    read the streams they write) makes every publish check a `duplicate` ack against what
    the stream holds (`verify_duplicate`)."""

    def __init__(
        self, nc: NATS, settings: Settings, *, key: SigningKey | None = None, ids: Ids | None = None,
        verify_duplicates: bool | None = None,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.settings = settings
        self.source = settings.source or "scf"
        self.key = key
        self.login = login_user(settings.url)
        if ids is None:
            ids = service_ids(settings.keys_dir) if self.login in SERVICE_LOGINS else PUBLIC_IDS
        self.ids = ids
        restricted = self.login in RESTRICTED_LOGINS or (self.login or "").startswith("edge-")  # a box's own login (ops/natsconf.py)
        self.verify_duplicates = not restricted if verify_duplicates is None else verify_duplicates
        self._pipeline: PipelinedPublisher | None = None

    @classmethod
    async def connect(
        cls, settings: Settings, name: str = "scf", key: SigningKey | None = None, ids: Ids | None = None
    ) -> "Bus":
        if ids is None and login_user(settings.url) in SERVICE_LOGINS:
            ids = service_ids(settings.keys_dir)  # an unsafe key file is refused before connecting
        return cls(await connect(settings, name), settings, key=key, ids=ids)

    async def close(self) -> None:
        if self._pipeline is not None:
            await self._pipeline.close()
            self._pipeline = None
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception:  # noqa: BLE001 - already closing, or the server is gone: close hard
                await self.nc.close()

    async def __aenter__(self) -> "Bus":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ----------------------------------------------------------------- publishing
    def _body(self, event: ev.Event) -> bytes:
        return codec.sign(event, self.key) if self.key else codec.encode(event)

    @staticmethod
    def headers(event: ev.Event, *, expect_new: bool = False) -> dict[str, str]:
        h = {MSG_ID: event.id, SCF_TYPE: event.type_name()}
        if expect_new:
            h[EXPECTED_LAST_SUBJECT_SEQ] = "0"
        return h

    def _verify(self, verify: bool | None) -> bool:
        return self.verify_duplicates if verify is None else verify

    async def _send(self, event: ev.Event, headers: dict[str, str], timeout: float):
        """One event, one acknowledgement (nats-py's); refusals mapped to SCF errors."""
        subject = event.subject()
        body = self._body(event)
        check_payload(self.nc, len(body), header_size(headers))  # nats-py counts the body alone
        try:
            return await self.js.publish(subject, body, timeout=timeout, headers=headers)
        except Exception as exc:  # noqa: BLE001 - mapped (a refusal, no stream); anything else re-raised as it is
            if isinstance(exc, (NatsTimeout, asyncio.TimeoutError)):
                refused = refused_publish(self.nc, subject, self.login)
                if refused is not None:
                    raise refused from None
            raise map_error(exc, subject) from None

    async def publish(self, event: ev.Event, *, timeout: float = 5.0, verify: bool | None = None) -> Published:
        """Publish one event. A `duplicate` ack is checked against what the stream holds
        (`verify_duplicate`) unless verify=False or the login may not read the stream
        (`verify_duplicates`)."""
        ack = await self._send(event, self.headers(event), timeout)
        out = Published(ack.stream, ack.seq, bool(ack.duplicate))
        return await self.verify_duplicate(event, out, timeout=timeout) if self._verify(verify) else out

    # ----------------------------------------------------------------- duplicate acks
    async def stored_is(self, event: ev.Event, stream: str, seq: int) -> bool | None:
        """Whether the message at (stream, seq) is `event`: same subject, type and id; None
        when the stream no longer holds that sequence (a work queue's taken item: nobody but
        services writes those, and a gone message pre-empts nothing that could be read)."""
        try:
            msg = await self.js.get_msg(stream, seq)
        except NotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - re-raised as SCF's own error, with its one-line fix
            raise map_error(exc, event.subject()) from None
        if msg.subject != event.subject():
            return False
        try:
            stored = codec.decode(msg.data or b"")
        except Exception:  # noqa: BLE001 - not an SCF event at all: certainly not this one
            return False
        return type(stored) is type(event) and stored.id == event.id

    def _reissue_ids(self, event: ev.Event) -> list[str]:
        """The ids to publish `event` under when its own was taken: first one derived from it
        with the id key (stable: a redelivered input finds its own re-issue and keeps it),
        then a random one (the key leaked, or no key)."""
        return ([self.ids.derive("reissue", event.id)] if self.ids.keyed else []) + [new_id()]

    async def verify_duplicate(
        self, event: ev.Event, published: Published, *, timeout: float = 5.0, expect_new: bool = False
    ) -> Published:
        """Never take a `duplicate` ack on trust: JetStream deduplicates by `Nats-Msg-Id`
        across the whole stream, so anyone who may publish into the stream could have taken
        this id first with other content on another subject. When the message the ack names
        is not this event, publish the event again under another id (logged; `_reissue_ids`)
        and return it in `reissued`."""
        if not published.duplicate or await self.stored_is(event, published.stream, published.seq) is not False:
            return published
        for fresh_id in self._reissue_ids(event):
            fresh = msgspec.structs.replace(event, id=fresh_id)
            log.warning(
                "%s %s: the stream holds another message under this id (%s seq %d): published again as %s",
                event.type_name(), event.id, published.stream, published.seq, fresh.id,
            )
            ack = await self._send(fresh, self.headers(fresh, expect_new=expect_new), timeout)
            again = Published(ack.stream, ack.seq, bool(ack.duplicate), reissued=fresh)
            if not again.duplicate or await self.stored_is(fresh, again.stream, again.seq) is not False:
                return again
            published = again
        raise ServerError(f"{event.type_name()} {event.id}: every id tried is taken by another message on {published.stream}")

    async def pipeline(self) -> PipelinedPublisher:
        if self._pipeline is None:
            self._pipeline = await PipelinedPublisher(self.nc).start()
        return self._pipeline

    async def publish_many(self, events: Iterable[ev.Event], *, timeout: float = 30.0, verify: bool | None = None) -> list[Published]:
        """Pipelined publishing (up to 4000 unacknowledged at once), all acked on return.
        A refusal raises the mapped error; an ack that never comes raises ServerError after
        `timeout` (the events are safe to publish again: their ids dedup). Every `duplicate`
        ack is checked against what the stream holds (`verify_duplicate`) unless
        verify=False or the login may not read the stream (`verify_duplicates`)."""
        pub = await self.pipeline()
        sent = list(events)
        if not sent:
            return []
        subjects = [e.subject() for e in sent]
        blocks = [header_block(e.id, e.type_name()) for e in sent]
        futures: list[asyncio.Future] = []
        try:
            if None in blocks:  # an id that needs nats-py's header cleaning: message by message
                for event, subject in zip(sent, subjects):
                    futures.append(await pub.publish(subject, self._body(event), self.headers(event)))
                replies = await asyncio.wait_for(asyncio.gather(*futures), timeout)
            else:
                # Frames of up to FRAME_MESSAGES messages (or about FRAME_BYTES), one write
                # and one future each; at most FRAMES_IN_FLIGHT unanswered at once.
                chunk: list[tuple[str, bytes, bytes]] = []
                size = 0
                for event, subject, block in zip(sent, subjects, blocks):
                    body = self._body(event)
                    chunk.append((subject, body, block))  # type: ignore[arg-type]
                    size += len(body)
                    if len(chunk) >= FRAME_MESSAGES or size >= FRAME_BYTES:
                        await self._send_frames(pub, chunk, futures, timeout)
                        chunk, size = [], 0
                if chunk:
                    await self._send_frames(pub, chunk, futures, timeout)
                done = await asyncio.wait_for(asyncio.gather(*futures), timeout)
                replies = [r for part in done for r in part]
        except asyncio.TimeoutError:
            for f in futures:
                pub.forget(f)
            for subject in subjects:
                refused = refused_publish(self.nc, subject, self.login)
                if refused is not None:
                    raise refused from None
            raise ServerError(f"no publish acknowledgement within {timeout:.0f}s from {_redact(self.settings.url)}: is the server up?") from None
        out = []
        for reply, subject in zip(replies, subjects):
            if reply.error is not None:
                raise reply_error(reply.error, subject)
            out.append(Published(reply.stream, reply.seq, reply.duplicate))
        if self._verify(verify):
            out = [await self.verify_duplicate(e, p) if p.duplicate else p for e, p in zip(sent, out)]
        return out

    @staticmethod
    async def _send_frames(pub: PipelinedPublisher, chunk: list, futures: list[asyncio.Future], timeout: float) -> None:
        if len(futures) >= FRAMES_IN_FLIGHT:  # the window is full: wait for the oldest frame's replies
            oldest = futures[-FRAMES_IN_FLIGHT]
            if not oldest.done():
                await asyncio.wait_for(asyncio.shield(oldest), timeout)
        futures.append(await pub.publish_frames(chunk))

    async def publish_once(self, event: ev.Event, *, timeout: float = 5.0, verify: bool | None = None) -> Once:
        """Publish on the event's per-entity subject only if the subject is empty.

        Returns "new"; "duplicate" when the subject already holds an event with the same
        payload (the effect already happened: treat as done); "conflict" when it holds a
        different payload for the same entity (refuse and report). A `duplicate` ack (the
        server matched the id before it looked at the subject) is checked like `publish`'s:
        an id someone else took on another subject gets the event published again under
        another id (`reissued`)."""
        subject = event.subject()
        try:
            ack = await self._send(event, self.headers(event, expect_new=True), timeout)
            if not ack.duplicate:
                return Once("new", ack.seq)
            if not self._verify(verify):
                return Once("duplicate", ack.seq)
            got = await self.verify_duplicate(
                event, Published(ack.stream, ack.seq, True), timeout=timeout, expect_new=True
            )
            if got.reissued is None:
                return Once("duplicate", ack.seq)
            return Once("duplicate" if got.duplicate else "new", got.seq, reissued=got.reissued)
        except PublishConflict:
            pass  # the subject holds something: the same payload, or another
        existing_msg = await self.js.get_last_msg(stream_for_subject(subject), subject)
        existing = codec.decode(existing_msg.data)
        same = msgspec.json.encode(existing.data) == msgspec.json.encode(event.data)  # type: ignore[attr-defined]
        return Once("duplicate" if same else "conflict", existing_msg.seq or 0, existing)

    async def publish_batch(
        self, events: Sequence[ev.Event], *, size: int = 1000, timeout: float = 10.0, concurrency: int = 1
    ) -> list[Once]:
        """Per-entity events (each on its own subject, e.g. fossils) in atomic batches.

        Every message carries `Nats-Expected-Last-Subject-Sequence: 0`, so each entity is
        stored once, ever; a batch is committed as one write, which on a server with
        `sync_interval: always` costs one fsync per batch instead of one per event (the
        server refuses Nats-Msg-Id inside atomic batches: per-subject uniqueness replaces
        it). The stream needs `allow_atomic` (StreamSpec.atomic). When a batch is refused
        as a whole — one entity already stored, two events for one entity, or a stream
        without atomic publishing — its events are published one by one with
        `publish_once`, which sorts new from duplicate from conflict, up to `concurrency`
        at once (1: in order on the stream too). The returned list is in the events' order.
        """
        out: list[Once] = []
        sem = asyncio.Semaphore(max(1, concurrency))

        async def once(event: ev.Event) -> Once:
            async with sem:
                return await self.publish_once(event, timeout=timeout)

        for start in range(0, len(events), size):
            chunk = events[start : start + size]
            seqs = await self.commit_batch(chunk, timeout=timeout)
            if seqs is None:
                if concurrency <= 1:
                    for event in chunk:
                        out.append(await self.publish_once(event, timeout=timeout))
                else:
                    out.extend(await asyncio.gather(*(once(e) for e in chunk)))
            else:
                out.extend(Once("new", s) for s in seqs)
        return out

    async def commit_batch(
        self, events: Sequence[ev.Event], *, expected_last_seq: int | None = None, timeout: float = 10.0
    ) -> list[int] | None:
        """Per-entity events stored as one atomic batch — all (their stream sequences) or
        none (None: the server refused it) — each expecting its subject to be empty; with
        `expected_last_seq`, also only if the stream's last sequence is that (a fencing
        token: nothing was written to the stream since the caller last looked). Batches of
        more than 1000 are committed as consecutive chunks, each fenced on the one before
        (all or none per chunk). No one-by-one fallback: the caller decides."""
        out: list[int] = []
        for start in range(0, len(events), 1000):
            seqs = await self._commit_batch(events[start : start + 1000], timeout, expected_last_seq)
            if seqs is None:
                return None
            out += seqs
            if expected_last_seq is not None and seqs:
                expected_last_seq = seqs[-1]
        return out

    async def _commit_batch(
        self, chunk: Sequence[ev.Event], timeout: float, expected_last_seq: int | None = None
    ) -> list[int] | None:
        if not chunk:
            return []
        if len(chunk) == 1 and expected_last_seq is not None:
            # One message: a plain publish carries both expectations, without the atomic
            # batch's extra server round (about 10x faster alone).
            return await self._commit_one(chunk[0], timeout, expected_last_seq)
        pub = await self.pipeline()
        fut = await pub.publish_atomic(
            [(e.subject(), self._body(e)) for e in chunk], types=[e.type_name() for e in chunk], expected_last_seq=expected_last_seq
        )
        try:
            reply: PubReply = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pub.forget(fut)
            for e in chunk:
                refused = refused_publish(self.nc, e.subject(), self.login)
                if refused is not None:
                    raise refused from None
            raise NatsTimeout from None
        if reply is _NO_RESPONDERS:
            raise reply_error(reply.error, chunk[-1].subject())  # type: ignore[arg-type]
        if reply.error is not None or reply.count != len(chunk):
            log.debug("atomic batch refused (%s): the caller decides", reply.error)
            return None
        return list(range(reply.seq - len(chunk) + 1, reply.seq + 1))

    async def _commit_one(self, event: ev.Event, timeout: float, expected_last_seq: int) -> list[int] | None:
        headers = {EXPECTED_LAST_SUBJECT_SEQ: "0", EXPECTED_LAST_SEQ: str(expected_last_seq), SCF_TYPE: event.type_name()}
        try:
            ack = await self._send(event, headers, timeout)
        except PublishConflict:  # the subject holds something, or the stream moved on: refused
            return None
        return [ack.seq]

    # ----------------------------------------------------------------- reading
    async def last(self, subject: str) -> tuple[int, ev.Event] | None:
        """The last event on a subject, or None."""
        try:
            msg = await self.js.get_last_msg(stream_for_subject(subject), subject)
        except NotFoundError:
            return None
        except BadRequestError as exc:
            raise map_error(exc, subject) from None
        return msg.seq or 0, codec.decode(msg.data)

    async def stream_last_seq(self, stream: str) -> int:
        try:
            info = await self.js.stream_info(stream)
        except Exception as exc:  # noqa: BLE001 - re-raised as SCF's own error, with its one-line fix
            raise map_error(exc) from None
        return info.state.last_seq

    async def kv(self, bucket: str):
        """The KV bucket `bucket`; one line saying what went wrong otherwise: the bucket
        missing (StreamNotFound), the server not answering in time or away, another
        answer of the server (ServerError)."""
        from nats.js.errors import BucketNotFoundError

        try:
            return await self.js.key_value(bucket)
        except (BucketNotFoundError, NotFoundError):
            raise StreamNotFound(f"KV bucket {bucket} does not exist: run `scf streams ensure`") from None
        except (NatsTimeout, asyncio.TimeoutError):
            # short enough for the emergency gate's 120 characters of it
            raise ServerError(f"KV bucket {bucket}: no answer from nats-server in {getattr(self.js, '_timeout', 5.0):g} s "
                              "(a timeout, not a missing bucket): check it (`scf status`)") from None
        except (NoRespondersError, NoStreamResponseError):
            raise ServerError(f"KV bucket {bucket}: no JetStream answered (nats-server without JetStream, or restarting): "
                              "check its `-js` flag and its log, then try again", 503) from None
        except (ConnectionClosedError, ConnectionDrainingError, OutboundBufferLimitError) as exc:
            raise ServerError(f"KV bucket {bucket}: not connected to nats-server ({type(exc).__name__}): "
                              "check that it runs (`scf status`), then try again", 503) from None
        except APIError as exc:
            raise ServerError(f"KV bucket {bucket}: nats-server answered {exc.description or exc}: check the bucket "
                              "(`scf streams ensure`) and the server's log", exc.code, exc.err_code) from None


__all__ = ["Bus", "connect", "Published", "Once", "MSG_ID", "EXPECTED_LAST_SUBJECT_SEQ", "api"]
