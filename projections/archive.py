"""The archive process: every stream, followed into Parquet (see projections.store).

`scf run archive` follows each archived stream with an *ordered consumer* that starts right
after the archive's position (the largest sequence in the stream's files). There is no
durable consumer and nothing to acknowledge: the archive's position is a function of its
files only, so deleting or restoring files moves it, a crash cannot separate "written" from
"acknowledged", and the server holds no state for the archive (docs/archive.md says why this
beats a durable consumer here).

Messages are buffered per stream and written as one file per `flush_rows` messages or
`flush_seconds`, whichever comes first (and on SIGTERM). A write that fails (a full disk, a
file size limit) leaves no temporary file, keeps the messages in memory (the buffer is
bounded: back-pressure holds the server) and is retried with backoff, with a one-line status
logged at most every `WriteTrouble.every` seconds; the position never moves past what is on
disk, so nothing is lost even if the process is stopped meanwhile. `replay` catches the archive up
once, or rebuilds a stream's files from a sequence on, through a staging directory and a
journaled swap. `lag_lines` tells `scf status` how far the archive trails each stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import msgspec
import pyarrow as pa
from nats.js import api
from nats.js.errors import NotFoundError

from scf.bus.client import Bus
from scf.bus.natsfix import parse_headers, rx_parser, sid_of
from scf.bus.rx import Sink
from scf.bus.settings import Settings
from scf.projections.store import (
    ARCHIVED_STREAMS,
    SKIPPED_STREAMS,
    ArchiveError,
    ArchiveFile,
    ArchiveStore,
    ArchiveWriteFailed,
    parse_replies,
    to_table,
)

log = logging.getLogger("scf.archive")
HEARTBEAT_S = 5.0  # the raw ordered consumer's idle heartbeat (the server's) ; 3 missed: resubscribe


def _quiet_done(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("a flow-control reply failed: %s", task.exception())


class ArchiveSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[archive]` in scf.toml."""

    dir: str = ""  # default: $SCF_HOME/archive
    flush_rows: int = 50_000  # a file per this many messages …
    flush_seconds: float = 2.0  # … or after this long, whichever comes first
    compact_rows: int = 1_000_000  # compaction merges small files into files of up to this many rows
    auto_compact_files: int = 64  # the process compacts a date once it wrote this many small files there (0: never)
    streams: list[str] = []  # default: every stream except JOBS
    # Who turns a batch into Parquet: "process" (a child forked per batch: its Python does not
    # hold the GIL the receiving needs; POSIX), "thread" (a worker thread of this process) or
    # "auto": process on Linux, thread elsewhere (`forks_writer`). Default "thread": on a quiet
    # 2-core host the forked writer ingested no faster (0.653x vs 0.651x the raw replay) for
    # 15 % more CPU (benchmarks/RESULTS.md "Bus speed", lead's run); it can pay where cores are free.
    writer: str = "thread"
    fork_min_rows: int = 5000  # smaller batches are written in a thread anyway (a fork costs ~10-50 ms)

    def __post_init__(self) -> None:
        if self.writer not in WRITERS:
            raise ValueError(f"[archive] writer = {self.writer!r}: use one of {', '.join(WRITERS)}")


WRITERS = ("auto", "process", "thread")


def forks_writer(writer: str, platform: str = sys.platform) -> bool:
    """Whether `[archive] writer` means a child forked per batch on `platform`. "auto" forks
    on Linux only: on macOS a fork without exec in a process with threads (the event loop's
    executor, DuckDB's and pyarrow's pools) may crash or hang in the child (the system
    libraries are not fork-safe; Python itself spawns there), so it writes in a thread."""
    return hasattr(os, "fork") and (writer == "process" or (writer == "auto" and platform.startswith("linux")))
_FORKING = threading.Lock()  # held by a writer from its pipe to the fork (`_write_forked`)
FORKED_WRITE_TIMEOUT = 300.0  # seconds a forked writer may take before it is killed (the batch is retried)


def archive_settings(settings: Settings) -> ArchiveSettings:
    return settings.section("archive", ArchiveSettings)


def archive_root(settings: Settings, override: str | Path | None = None) -> Path:
    if override:
        return Path(override).expanduser().absolute()
    cfg = archive_settings(settings)
    if cfg.dir:
        p = Path(cfg.dir).expanduser()
        return p if p.is_absolute() else settings.home_path / p
    return settings.archive_dir


def archived_streams(cfg: ArchiveSettings, only: Iterable[str] | None = None) -> list[str]:
    wanted = list(only) if only else (cfg.streams or list(ARCHIVED_STREAMS))
    for s in wanted:
        if s in SKIPPED_STREAMS:
            raise ArchiveError(f"stream {s} is not archived ({SKIPPED_STREAMS[s]})")
        if s.startswith(("KV_", "OBJ_")):
            raise ArchiveError(f"stream {s} is a KV bucket or object store, not part of the log: it is not archived")
    return wanted


# --------------------------------------------------------------------------- failed writes


class WriteTrouble:
    """Failed writes of the whole process, reported as one status line at most every
    `every` seconds (however many streams are stuck), and retried with backoff."""

    def __init__(self, every: float = 5.0, retry_min: float = 0.5, retry_max: float = 5.0) -> None:
        self.every, self.retry_min, self.retry_max = every, retry_min, retry_max
        self.stuck: dict[str, tuple[str, int | None, float]] = {}  # what -> (reason, messages held, since)
        self._logged = float("-inf")

    def retry_in(self, failures: int) -> float:
        return min(self.retry_max, self.retry_min * 2 ** max(0, failures - 1))

    def failed(self, what: str, exc: ArchiveWriteFailed, held: int | None = None) -> None:
        """`what`: a stream (with the messages it holds in memory) or another file."""
        since = self.stuck.get(what, ("", 0, time.monotonic()))[2]
        self.stuck[what] = (exc.reason, held, since)
        now = time.monotonic()
        if now - self._logged >= self.every:
            self._logged = now
            parts = ", ".join(
                f"{w} ({n} messages, {now - t:.0f}s)" if n is not None else f"{w} ({now - t:.0f}s)"
                for w, (_, n, t) in sorted(self.stuck.items())
            )
            self.say(
                f"archive cannot write to {exc.path.parent}: {exc.reason}; holding {parts}; retrying "
                f"(nothing is lost: the position is the files; free space to resume)"
            )

    def recovered(self, stream: str, rows: int) -> None:
        if stream in self.stuck:
            _, _, since = self.stuck.pop(stream)
            self.say(f"archive writes {stream} again: {rows} messages written after {time.monotonic() - since:.0f}s of failed writes")

    def say(self, line: str) -> None:
        log.warning("%s", line)


# --------------------------------------------------------------------------- following a stream


@dataclass
class StreamStats:
    stream: str
    start_seq: int = 0
    position: int = 0
    messages: int = 0
    files: int = 0
    resubscribes: int = 0
    compactions: int = 0


class StreamFollower:
    """Follows one stream from `start_seq` and appends its messages to `store`.

    With `until_caught_up`, stops once it has written every message the stream held (the
    replay); otherwise runs until `stop` is set, then writes what it holds and returns."""

    def __init__(
        self,
        bus: Bus,
        store: ArchiveStore,
        stream: str,
        start_seq: int,
        cfg: ArchiveSettings,
        *,
        until_caught_up: bool = False,
        on_write: Callable[[StreamStats], None] | None = None,
        trouble: WriteTrouble | None = None,
    ) -> None:
        self.bus, self.store, self.stream, self.cfg = bus, store, stream, cfg
        self.until_caught_up = until_caught_up
        self.on_write = on_write
        self.trouble = trouble or WriteTrouble()
        self._failures = 0  # consecutive failed writes
        self._retry_at = 0.0
        self.stats = StreamStats(stream, start_seq=start_seq, position=start_seq - 1)
        self._buffer: list = []  # nats Msg objects, parsed in bulk when written
        self._first_at = 0.0
        self._last_seq = start_seq - 1  # last sequence written
        self._last_dseq = 0  # consumer sequence of the last message written
        self._caught_up = False  # the last message received said nothing was pending
        self._gap = False
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._sub = None
        self._sink: Sink | None = None  # our receive path's (None: nats-py's ordered consumer)
        self._heard = 0.0
        self._reconnects = 0
        self._fc_held: str | None = None
        self._small_files: dict[str, int] = {}
        self.forked = forks_writer(cfg.writer)

    # ------------------------------------------------------------------ subscription
    async def _subscribe(self) -> None:
        self._last_dseq = 0
        self._gap = False
        if rx_parser(self.bus.nc) is not None:
            await self._subscribe_raw()
            return
        cfg = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self._last_seq + 1,
            inactive_threshold=60.0,
        )
        self._sub = await self.bus.js.subscribe(
            "", stream=self.stream, ordered_consumer=True, cb=self._on_msg, config=cfg, idle_heartbeat=5.0
        )

    async def _subscribe_raw(self) -> None:
        """The ordered consumer on our receive path (bus/rx.py): an ephemeral push consumer
        (no acks, in memory, flow control, idle heartbeats) onto a private inbox whose
        messages the connection's parser appends raw to a sink; `_take` moves them into the
        buffer once per socket read. A delivery gap (consumer sequence), a reconnection or
        `HEARTBEAT_S` × 3 of silence resubscribes after the last message written."""
        nc = self.bus.nc
        sink = Sink()
        sink.on_flush = self._take
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        rx_parser(nc).sinks[sid_of(sub)] = sink  # type: ignore[union-attr]
        self._sub, self._sink = sub, sink
        self._heard, self._reconnects = time.monotonic(), nc.stats.get("reconnects", 0)
        self._fc_held = None
        cfg = api.ConsumerConfig(
            deliver_subject=inbox,
            ack_policy=api.AckPolicy.NONE,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self._last_seq + 1,
            flow_control=True,
            idle_heartbeat=HEARTBEAT_S,
            mem_storage=True,
            num_replicas=1,
            max_deliver=1,
            inactive_threshold=60.0,
        )
        try:
            await self.bus.js.add_consumer(self.stream, cfg)
        except BaseException:
            await self._unsubscribe()
            raise

    def _take(self) -> None:
        """The sink's flush (the read loop calls it once per socket read; it must not raise):
        the raw messages into the buffer, then the flow-control replies and heartbeats."""
        sink = self._sink
        self._heard = time.monotonic()
        items = sink.items
        if items:
            sink.items = []
            buf = self._buffer
            if not buf:
                self._first_at = self._heard
            buf.extend(items)
            if self.until_caught_up and items[-1][1].endswith(b".0"):  # pending == 0: the stream's end for now
                self._caught_up = True
                self._wake.set()
            if len(buf) >= self.cfg.flush_rows:
                self._wake.set()
        if sink.statuses:
            statuses, sink.statuses = sink.statuses, []
            for reply, hdr in statuses:
                if reply:  # a flow-control request: answered once what came before it is taken
                    if len(self._buffer) >= 2 * self.cfg.flush_rows:
                        self._fc_held = reply.decode()  # back-pressure: the server waits for room
                    else:
                        self._send(reply.decode())
                elif b"Nats-Consumer-Stalled" in hdr:  # a heartbeat naming a stalled flow-control reply
                    stalled = (parse_headers(hdr) or {}).get("Nats-Consumer-Stalled")
                    if stalled:
                        self._send(stalled)

    def _send(self, subject: str) -> None:
        task = asyncio.ensure_future(self.bus.nc.publish(subject, b""))
        task.add_done_callback(_quiet_done)

    def _room_made(self) -> None:
        if self._fc_held is not None and len(self._buffer) < 2 * self.cfg.flush_rows:
            held, self._fc_held = self._fc_held, None
            self._send(held)

    def _lost(self) -> bool:
        """Our raw consumer is lost: the connection came back (a server restart loses it) or
        nothing, not even a heartbeat, came for three heartbeats."""
        if self._sink is None or self._sub is None:
            return False
        if self.bus.nc.stats.get("reconnects", 0) != self._reconnects:
            return True
        return time.monotonic() - self._heard > 3 * HEARTBEAT_S and self._fc_held is None

    async def _unsubscribe(self) -> None:
        if self._sub is not None:
            if self._sink is not None:
                ps = rx_parser(self.bus.nc)
                if ps is not None:
                    ps.sinks.pop(sid_of(self._sub), None)
                self._sink = None
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_msg(self, msg) -> None:
        # The hot path: keep the message; sequences, timestamps and payloads are parsed in
        # bulk (vectorised) when the batch is written.
        buf = self._buffer
        if not buf:
            self._first_at = time.monotonic()
        buf.append(msg)
        if self.until_caught_up and msg.reply.endswith(".0"):  # pending == 0: the stream's end for now
            self._caught_up = True
            self._wake.set()
        if len(buf) >= self.cfg.flush_rows:
            self._wake.set()
            if len(buf) >= 2 * self.cfg.flush_rows:
                # Back-pressure: not returning holds the flow-control reply, so the server waits.
                self._room.clear()
                await self._room.wait()

    # ------------------------------------------------------------------ the loop
    async def run(self, stop: asyncio.Event) -> StreamStats:
        await self._subscribe()
        if self.until_caught_up:
            # Nothing to read only if the stream ends before our start. (The consumer's
            # num_pending is no proof: messages already sent to us but not yet received
            # count as delivered, and a replay would stop short of them under load.)
            last = (await self.bus.js.stream_info(self.stream)).state.last_seq
            if last <= self._last_seq and not self._buffer:
                self._caught_up = True
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                if self.until_caught_up and self._caught_up and not self._buffer:
                    break
                timeout = 1.0
                if self._buffer:
                    due_at = max(self._first_at + self.cfg.flush_seconds, self._retry_at)
                    timeout = max(0.0, due_at - time.monotonic())
                waker = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({waker, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                waker.cancel()
                self._wake.clear()
                due = self._buffer and time.monotonic() >= self._retry_at and (
                    len(self._buffer) >= self.cfg.flush_rows
                    or time.monotonic() - self._first_at >= self.cfg.flush_seconds
                    or (self.until_caught_up and self._caught_up)
                )
                if due:
                    await self._flush()
                if not self._gap and self._lost():
                    self._gap = True
                    log.warning("%s: the consumer was lost (a reconnection or silence): resubscribing after seq %s",
                                self.stream, self._last_seq)
                if self._gap:
                    await self._unsubscribe()
                    self._buffer = []
                    self._room.set()
                    self.stats.resubscribes += 1
                    log.warning("%s: delivery gap after seq %s: resubscribing", self.stream, self._last_seq)
                    await self._subscribe()
        finally:
            stopper.cancel()
            await self._unsubscribe()
            while self._buffer and not self._gap:
                held = len(self._buffer)
                await self._flush(final=True)
                if len(self._buffer) >= held:  # the write failed: kept for the next start
                    break
        return self.stats

    async def _flush(self, final: bool = False) -> None:
        rows = self.cfg.flush_rows
        if self._sink is not None and len(self._buffer) > rows:
            # our receive path hands over a socket read at a time, so the buffer may hold more
            # than a file's worth: one file per flush_rows, the rest left for the next round
            batch, self._buffer = self._buffer[:rows], self._buffer[rows:]
            self._first_at = time.monotonic()
            self._wake.set()
        else:
            batch, self._buffer = self._buffer, []
        self._room.set()
        self._room_made()
        if not batch:
            return
        # a small batch (a quiet stream flushed by time) costs little GIL and more to fork
        write = self._write_forked if self.forked and len(batch) >= self.cfg.fork_min_rows else self._write
        try:
            written, n, gap = await asyncio.to_thread(write, batch)
        except ArchiveWriteFailed as exc:
            self._write_failed(exc, batch, final)
            return
        if self._failures:
            self._failures, self._retry_at = 0, 0.0
            self.trouble.recovered(self.stream, n)
        if gap:
            self._gap = True  # the loop resubscribes after the last message written
        if n:
            self.stats.messages += n
            self.stats.files += len(written)
            self.stats.position = self._last_seq
            if self.on_write:
                self.on_write(self.stats)
        if self.cfg.auto_compact_files > 0 and not self.until_caught_up:
            for f in written:
                if n < self.cfg.compact_rows // 2:
                    k = self._small_files.get(f.date, 0) + 1
                    self._small_files[f.date] = k
                    if k >= self.cfg.auto_compact_files:
                        self._small_files[f.date] = 0
                        await asyncio.to_thread(self._compact, f.date)

    def _write_failed(self, exc: ArchiveWriteFailed, batch: list, final: bool) -> None:
        """Keep the batch (the part of it not on disk) for the next attempt."""
        if exc.written:
            self.stats.messages += getattr(exc, "rows", 0)
            self.stats.files += len(exc.written)
            self.stats.position = self._last_seq
        if self.until_caught_up:  # a one-shot replay reports and stops; it resumes where it stopped
            raise ArchiveError(f"{exc}; then run the replay again (it resumes after seq {self._last_seq})") from None
        self._buffer = batch + self._buffer
        self._failures += 1
        self._retry_at = time.monotonic() + self.trouble.retry_in(self._failures)
        self.trouble.failed(self.stream, exc, len(self._buffer))
        if final:
            self.trouble.say(
                f"{self.stream}: stopping with {len(self._buffer)} messages not written; the stream still holds them "
                f"and the next start archives them from seq {self._last_seq + 1}"
            )

    def _write(self, batch: list) -> tuple[list, int, bool]:
        """Parse, check and write a batch (in a worker thread): (files, rows written, gap)."""
        import numpy as np

        raw = bool(batch) and isinstance(batch[0], tuple)  # our receive path's (subject, reply, header block, payload)
        sseq, dseq, ts, _pending = parse_replies([m[1] for m in batch] if raw else [m.reply for m in batch])
        s, d = sseq.to_numpy(), dseq.to_numpy()
        # A consumer's deliveries are numbered 1, 2, 3 …: a jump means a message was lost
        # between the server and us (a new consumer, after nats-py's ordered-consumer reset,
        # starts again at 1). Stream sequences only increase: anything at or below what we
        # already hold is a redelivery, skipped.
        prev_d = np.concatenate(([self._last_dseq], d[:-1]))
        jumps = np.flatnonzero((d != prev_d + 1) & (d != 1))
        end = int(jumps[0]) if len(jumps) else len(batch)
        seen = np.maximum.accumulate(np.concatenate(([self._last_seq], s[:-1])))
        new = np.flatnonzero(s[:end] > seen[:end])
        if len(new) == 0:
            if end:
                self._last_dseq = int(d[end - 1])
            return [], 0, bool(len(jumps))
        if len(new) < len(batch):
            idx = pa.array(new)
            sseq, ts = sseq.take(idx), ts.take(idx)
            batch = [batch[i] for i in new.tolist()]
        if raw:
            table = to_table(sseq, ts, [m[0].decode() for m in batch], [m[3] for m in batch], [parse_headers(m[2]) for m in batch])
        else:
            table = to_table(sseq, ts, [m.subject for m in batch], [m.data for m in batch], [m.headers for m in batch])
        try:
            written = self.store.append(self.stream, table)
        except ArchiveWriteFailed as exc:
            # The position moves past the files made durable only; the delivery numbering is
            # left as it was, so the retry parses the same batch the same way.
            if exc.written:
                self._last_seq = exc.written[-1].last
                exc.rows = int(np.count_nonzero(s[new] <= self._last_seq))  # type: ignore[attr-defined]
            raise
        if end:
            self._last_dseq = int(d[end - 1])
        self._last_seq = int(s[new[-1]])
        return written, len(new), bool(len(jumps))

    def _write_forked(self, batch: list) -> tuple[list, int, bool]:
        """`_write` in a child forked for this batch (called from a worker thread). The child
        sees the batch as it is (copy-on-write, nothing serialised), writes the files and
        reports what it wrote, the positions it moved to, or its failure, as JSON on a pipe;
        this process only waits (without the GIL) and takes the positions over. Files are made
        durable by the child before it reports; a child that dies or hangs leaves the position
        at what is on disk and the batch is retried, as a failed write."""
        parent = os.getpid()
        # one writer forks at a time, its pipe's write end closed here before the next: a
        # child forked meanwhile by another stream's writer would hold it, and this writer
        # would see its report's end only when that child ended
        with _FORKING:
            r, w = os.pipe()
            pid = os.fork()
            if pid != 0:
                os.close(w)
        if pid == 0:  # the child: no logging, no event loop, no NATS; out through os._exit
            try:
                # not the event loop's signal handling (its wakeup fd is the parent's): a
                # SIGTERM or SIGINT ends the child, and the parent sees a failed write
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                _die_with(parent)
                os.close(r)
                data = json.dumps(self._child_write(batch)).encode()
                while data:
                    data = data[os.write(w, data):]
            finally:
                os._exit(0)
        report = b""
        try:
            deadline = time.monotonic() + FORKED_WRITE_TIMEOUT
            while True:
                if not select.select([r], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    os.kill(pid, signal.SIGKILL)
                    break
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                report += chunk
        finally:
            os.close(r)
            _, status = os.waitpid(pid, 0)
        return self._take_report(report, status)

    def _child_write(self, batch: list) -> dict:
        try:
            written, n, gap = self._write(batch)
        except ArchiveWriteFailed as exc:
            return {"failed": {"path": str(exc.path), "errno": getattr(exc.cause, "errno", None), "message": str(exc.cause),
                               "written": [_file_row(f) for f in exc.written], "rows": getattr(exc, "rows", 0)},
                    "last_seq": self._last_seq, "last_dseq": self._last_dseq}
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it there
            return {"error": f"{type(exc).__name__}: {exc}"}
        return {"files": [_file_row(f) for f in written], "n": n, "gap": gap,
                "last_seq": self._last_seq, "last_dseq": self._last_dseq}

    def _take_report(self, report: bytes, status: int) -> tuple[list, int, bool]:
        try:
            got = json.loads(report) if report else None
        except ValueError:
            got = None
        if got is None:  # killed, crashed, hung: what it made durable is on disk, the rest is retried
            self._last_seq = max(self._last_seq, self.store.position(self.stream))
            why = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.waitstatus_to_exitcode(status)}"
            raise ArchiveWriteFailed(self.store.stream_dir(self.stream), OSError(f"the writer process ended without a report ({why})"))
        if "error" in got:
            raise ArchiveError(f"{self.stream}: the writer process failed: {got['error']}")
        self._last_seq, self._last_dseq = got["last_seq"], got["last_dseq"]
        if "failed" in got:
            f = got["failed"]
            cause = OSError(f["errno"], f["message"]) if f["errno"] else OSError(f["message"])
            exc = ArchiveWriteFailed(Path(f["path"]), cause, [_file_of(x) for x in f["written"]])
            exc.rows = f["rows"]  # type: ignore[attr-defined]
            raise exc
        return [_file_of(x) for x in got["files"]], got["n"], got["gap"]

    def _compact(self, date: str) -> None:
        from scf.projections.store import ArchiveBusy

        try:
            report = self.store.compact(self.stream, target_rows=self.cfg.compact_rows, date=date)
            self.stats.compactions += 1
            log.info("%s", report.line())
        except ArchiveBusy:
            pass
        except ArchiveWriteFailed as exc:  # the small files stay as they are; compacted later
            log.warning("%s: compaction skipped: %s", self.stream, exc)


def _die_with(parent: int) -> None:
    """In a forked writer: be killed when the archive process dies (Linux PR_SET_PDEATHSIG).
    An orphan would hold the stream's write lock (its inherited descriptor) and keep writing
    while a restarted archive is refused the lock; killed, it leaves at most a temporary
    file, removed at the next start."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the child ends when its batch is written
        return
    if os.getppid() != parent:  # the archive died before the request took effect
        os._exit(1)


def _file_row(f: ArchiveFile) -> list:
    return [f.stream, f.first, f.last, f.date, str(f.path)]


def _file_of(row: list) -> ArchiveFile:
    return ArchiveFile(row[0], row[1], row[2], row[3], Path(row[4]))


# --------------------------------------------------------------------------- the process


@contextlib.contextmanager
def gc_tuned():
    """Fewer garbage collections while archiving. A follower holds up to a batch of messages
    (tens of thousands of objects) between writes; with the default thresholds the collector
    walks them again and again (about 1.5 µs per message). The archive makes few reference
    cycles, so collecting rarely costs nothing in memory."""
    import gc

    before = gc.get_threshold()
    gc.set_threshold(100_000, 50, 1_000)
    try:
        yield
    finally:
        gc.set_threshold(*before)


async def _check_streams(bus: Bus, streams: list[str]) -> None:
    for s in streams:
        try:
            await bus.js.stream_info(s)
        except NotFoundError:
            raise ArchiveError(f"stream {s} does not exist: run `scf streams ensure`") from None


def prepare(store: ArchiveStore) -> None:
    """Create the archive directory, its zero-row file and the DuckDB file with the views;
    remove the temporary files of a failed or killed database write. Raises
    ArchiveWriteFailed when the disk is full."""
    from scf.projections import views

    try:
        store.root.mkdir(parents=True, exist_ok=True)
        with store.database_lock():
            store.clean_database_temporary()
        store.ensure()
    except OSError as exc:  # no room even for a directory or a lock file
        raise ArchiveWriteFailed(store.root, exc) from exc
    views.write_database(store.root)


async def _prepare_when_possible(store: ArchiveStore, trouble: WriteTrouble, stop: asyncio.Event) -> None:
    """`prepare` again until it succeeds (the process started on a full disk)."""
    failures = 1
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), trouble.retry_in(failures))
        if stop.is_set():
            return
        try:
            await asyncio.to_thread(prepare, store)
            trouble.stuck.pop("scf.duckdb", None)
            trouble.say(f"archive wrote {store.database_path} after {failures} failed attempts")
            return
        except ArchiveWriteFailed as exc:
            failures += 1
            trouble.failed("scf.duckdb", exc)


async def run_archive(
    settings: Settings,
    *,
    archive_dir: str | Path | None = None,
    streams: Iterable[str] | None = None,
    stop: asyncio.Event | None = None,
    ready: Callable[[dict[str, int]], None] | None = None,
) -> list[StreamStats]:
    """`scf run archive`: follow every archived stream until SIGTERM / SIGINT / `stop`."""
    from scf.bus.runner import run_all

    cfg = archive_settings(settings)
    names = archived_streams(cfg, streams)
    store = ArchiveStore(archive_root(settings, archive_dir))
    trouble = WriteTrouble()
    loops: list[Callable[[asyncio.Event], object]] = []
    try:
        prepare(store)
    except ArchiveWriteFailed as exc:  # a full disk: archive anyway, retry the views database
        trouble.failed("scf.duckdb", exc)
        loops.append(lambda stop: _prepare_when_possible(store, trouble, stop))
    bus = await Bus.connect(settings, "scf-archive")
    followers: list[StreamFollower] = []
    with contextlib.ExitStack() as locks:
        try:
            await _check_streams(bus, names)
            for s in names:
                locks.enter_context(store.lock(s, "write"))
                store.try_recover(s)
                store.clean_temporary(s)
                followers.append(StreamFollower(bus, store, s, store.position(s) + 1, cfg, trouble=trouble))
        except BaseException:
            await bus.close()
            raise
        if ready:
            ready({f.stream: f.stats.position for f in followers})
        log.info("archiving %s into %s", ", ".join(names), store.root)
        with gc_tuned():
            await run_all(bus, [f.run for f in followers] + loops, stop)
    return [f.stats for f in followers]


@dataclass
class ReplayReport:
    stream: str
    from_seq: int
    rows: int = 0
    files: int = 0
    replaced_files: int = 0
    mode: str = "catch-up"
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        if self.mode == "catch-up":
            return f"{self.stream}: archived {self.rows} messages from seq {self.from_seq} in {self.files} files"
        return (
            f"{self.stream}: rebuilt from seq {self.from_seq}: {self.rows} messages in {self.files} files "
            f"(replaced {self.replaced_files} files)" + "".join(f"; {n}" for n in self.notes)
        )


async def replay(
    settings: Settings,
    *,
    archive_dir: str | Path | None = None,
    streams: Iterable[str] | None = None,
    from_seq: int | None = None,
    rebuild: bool = False,
    force: bool = False,
) -> list[ReplayReport]:
    """Read streams from JetStream into the archive once, then return.

    Without `from_seq` / `rebuild`: catch up (archive what is not archived yet). With them:
    rebuild each stream's files from `from_seq` (1 for `rebuild`) into a staging directory,
    then swap them in with one journaled change. A rebuild that would drop rows the stream no
    longer holds (max_age, deleted messages) is refused unless `force`."""
    cfg = archive_settings(settings)
    names = archived_streams(cfg, streams)
    if from_seq is not None and from_seq < 1:
        raise ArchiveError(f"--from-seq {from_seq}: sequences start at 1")
    if rebuild and from_seq is None:
        from_seq = 1
    store = ArchiveStore(archive_root(settings, archive_dir))
    prepare(store)
    # Read-mostly work: a larger buffer than the live process makes fewer, larger files.
    cfg = msgspec.structs.replace(cfg, flush_rows=max(cfg.flush_rows, 200_000), flush_seconds=3600.0)
    bus = await Bus.connect(settings, "scf-replay")
    reports = []
    try:
        await _check_streams(bus, names)
        with gc_tuned():
            for s in names:
                if from_seq is None:
                    reports.append(await _catch_up(bus, store, s, cfg))
                else:
                    reports.append(await _rebuild(bus, store, s, from_seq, cfg, force))
    finally:
        await bus.close()
    return reports


async def _catch_up(bus: Bus, store: ArchiveStore, stream: str, cfg: ArchiveSettings) -> ReplayReport:
    with store.lock(stream, "write"):
        store.try_recover(stream)
        store.clean_temporary(stream)
        start = store.position(stream) + 1
        follower = StreamFollower(bus, store, stream, start, cfg, until_caught_up=True)
        stats = await follower.run(asyncio.Event())
    return ReplayReport(stream, start, rows=stats.messages, files=stats.files)


async def _rebuild(bus: Bus, store: ArchiveStore, stream: str, from_seq: int, cfg: ArchiveSettings, force: bool) -> ReplayReport:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    report = ReplayReport(stream, from_seq, mode="rebuild")
    with store.lock(stream, "write"), store.lock(stream, "maintain"):
        store.recover(stream)
        store.clean_temporary(stream)
        old = [f for f in store.files(stream) if f.last >= from_seq]
        old_rows = 0
        stage_dir = store.staging(stream)
        stage = ArchiveStore(stage_dir)
        for f in old:
            table = pq.read_table(f.path)
            if f.first < from_seq:  # the part before from_seq stays as it is
                stage.append(stream, table.filter(pc.less(table.column("seq"), from_seq)))
            old_rows += int(pc.sum(pc.greater_equal(table.column("seq"), from_seq)).as_py() or 0)
        follower = StreamFollower(bus, stage, stream, from_seq, cfg, until_caught_up=True)
        stats = await follower.run(asyncio.Event())
        if stats.messages < old_rows and not force:
            import shutil

            shutil.rmtree(stage_dir, ignore_errors=True)
            raise ArchiveError(
                f"stream {stream} now holds {stats.messages} messages from seq {from_seq} but the archive has "
                f"{old_rows}: the stream lost messages (max_age, deletes) that only the archive keeps; "
                f"the archive is unchanged (pass --force to rebuild anyway and drop them)"
            )
        if stats.messages < old_rows:
            report.notes.append(f"dropped {old_rows - stats.messages} rows the stream no longer holds")
        adds = []
        for f in stage.files(stream):
            adds.append((f.path, store.partition_dir(stream, f.date) / f.path.name))
        store.commit(stream, adds, [f.path for f in old])
        store.recover(stream)  # removes the staging directory
        report.rows, report.files, report.replaced_files = stats.messages, len(adds), len(old)
    return report


# --------------------------------------------------------------------------- freshness


async def lag_lines(bus: Bus, settings: Settings) -> list[str]:
    """Lines for `scf status`: how far the archive trails each archived stream."""
    try:
        cfg = archive_settings(settings)
        root = archive_root(settings)
        names = archived_streams(cfg)
    except Exception as exc:  # noqa: BLE001 - a bad [archive] table must not break `scf status`
        return [f"archive      {exc}"]
    store = ArchiveStore(root)
    if not store.exists():
        return [f"archive      none at {root}: start `scf run archive`"]
    lines = [f"archive      {root}  (stream: archived seq / stream last seq, lag in messages)"]
    now = time.time()
    for s in names:
        files = store.files(s)
        pos = max((f.last for f in files), default=0)
        try:
            last = (await bus.js.stream_info(s)).state.last_seq
        except NotFoundError:
            lines.append(f"  {s:<12} stream missing")
            continue
        age = ""
        if files:
            newest = max(f.path.stat().st_mtime for f in files[-3:])
            age = f", last file {_ago(now - newest)} ago"
        lag = max(0, last - pos)
        state = "up to date" if lag == 0 else f"lag {lag}"
        lines.append(f"  {s:<12} {pos:>10} / {last:<10} {state}  ({len(files)} files{age})")
    return lines


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"
