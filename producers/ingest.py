"""Fossil ingest: NDJSON shards → `fossil.recorded` (once per content id, ever) and
`fossil.rejected` (one per bad line), with a quarantine copy of every bad line.

Every line read ends in exactly one of three counts, per shard and in total:

    lines == recorded + duplicate + rejected

* **recorded** — a valid fossil stored for the first time, on its own subject
  `fossil.recorded.<domain_token>.<hex>` with `Nats-Expected-Last-Subject-Sequence: 0` and
  `Nats-Msg-Id = fossil_id`;
* **duplicate** — a valid fossil that is already on the bus: the same content earlier in
  this run (JetStream's duplicate window answers `duplicate`), or from any earlier run,
  however long ago (the server refuses the publish with err_code 10071, "wrong last
  sequence"). Not an error: the fossil is recorded, once;
* **rejected** — a line that is not a valid fossil (`domains.fossils.check_line`:
  malformed JSON, schema, unknown fields with `strict`, missing provenance, unknown domain,
  content id mismatch, verifier failed, shape, out of bounds, an implausible energy). It
  becomes a `fossil.rejected` event (reason `"<code>: <detail>"`, the shard path, the
  1-based line number, the raw line cut to 64 KiB, id derived from (shard sha256, line) so
  a re-read inside the duplicate window adds nothing) and is appended to
  `$SCF_HOME/fossil_vault/quarantine/<stem>.<sha12>.ndjson` (the whole line, verbatim,
  however long) with its reason in `<stem>.<sha12>.reasons.ndjson`.

Fields a fossil does not have are dropped from accepted lines and counted per field name
(`unknown_fields` in the report); `strict` refuses such lines instead.

Resumable: after each batch is acknowledged, `$SCF_HOME/fossil_vault/ingest/<sha256>.json`
records the shard's byte offset, line count, counts and quarantine sizes. A re-run
continues from there (the quarantine files are cut back to the recorded sizes first, so
nothing is copied twice); a finished shard is skipped. Publishing is idempotent, so a
crash between an acknowledgement and the progress write only turns a few `recorded` of
the resumed batch into `duplicate`.

Throughput: lines are validated (and their events encoded) in a process pool when the
input is large, while this process keeps up to `window` publishes in flight; see
benchmarks/bench_ingest.py.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import datetime as dt
import functools
import math
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import msgspec

from scf.bus import codec
from scf.bus import events as ev
from scf.bus.client import EXPECTED_LAST_SUBJECT_SEQ, MSG_ID, SCF_TYPE, Bus, PipelinedPublisher, PubReply
from scf.bus.errors import SCFError
from scf.bus.files import atomic_write
from scf.bus.files import sha256_file as file_digest
from scf.bus.ids import derived_id

ERR_WRONG_LAST_SEQUENCE = 10071
RAW_LIMIT = 64 * 1024
SHARD_SUFFIXES = (".ndjson", ".jsonl")


class IngestError(SCFError):
    """Ingest cannot go on (the bus refused a publish, a path is missing …)."""


class IngestSettings(msgspec.Struct, frozen=True, kw_only=True):
    """`[ingest]` in scf.toml."""

    block_bytes: int = 4 << 20  # bytes read per batch (a batch's lines are validated together)
    max_batch_lines: int = 8192
    window: int = 4000  # publishes in flight
    workers: int = -1  # validation processes: -1 auto (inline for small inputs), 0 inline
    auto_workers_above: int = 32 << 20  # auto: use processes when the input is larger
    recheck: bool = False  # run the domain's own check again on every fossil
    ack_timeout: float = 30.0
    atomic_batch: int = 1000  # fossils per atomic batch (0: never; used when the stream allows it)
    strict: bool = False  # refuse lines with fields a fossil does not have (default: drop and count them)
    max_line_bytes: int = 1 << 20  # a longer line is rejected (too_long) unread: it streams to the quarantine
    energy_bounds: dict[str, tuple[float, float]] = {}  # per domain: the plausible energy range (default: from its physics)


def check_settings(cfg: IngestSettings) -> None:
    """Refuse an [ingest] table that cannot work, naming the key and the fix."""
    from scf import domains

    if cfg.max_line_bytes < 0:
        raise IngestError(f"[ingest] max_line_bytes = {cfg.max_line_bytes}: give a size in bytes (0: no limit)")
    for name, bounds in cfg.energy_bounds.items():
        if name not in domains.names():
            raise IngestError(f"[ingest] energy_bounds names an unknown domain {name!r}: use one of {', '.join(domains.names())}")
        lo, hi = bounds
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise IngestError(f"[ingest] energy_bounds for {name!r} is [{lo}, {hi}]: give a finite [LOW, HIGH] with LOW < HIGH")


# --------------------------------------------------------------------------- progress files


class ShardProgress(msgspec.Struct, kw_only=True):
    sha256: str
    path: str
    offset: int = 0  # bytes consumed (always at a line boundary)
    lines: int = 0
    recorded: int = 0
    duplicate: int = 0
    rejected: int = 0
    reasons: dict[str, int] = {}
    unknown_fields: dict[str, int] = {}  # accepted lines with fields a fossil does not have, per field
    quarantine_bytes: int = 0
    reasons_bytes: int = 0
    complete: bool = False
    started_at: str = ""
    updated_at: str = ""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()




# --------------------------------------------------------------------------- reports


@dataclass
class ShardReport:
    path: str
    sha256: str
    bytes: int
    lines: int = 0  # lines read in this run
    recorded: int = 0
    duplicate: int = 0
    rejected: int = 0
    reasons: collections.Counter = field(default_factory=collections.Counter)
    unknown_fields: collections.Counter = field(default_factory=collections.Counter)  # dropped, per field name
    skipped: bool = False  # finished by an earlier run: not read again
    resumed_from_line: int = 0  # lines done by earlier runs when this one started
    total: ShardProgress | None = None  # cumulative over all runs

    @property
    def balanced(self) -> bool:
        return self.lines == self.recorded + self.duplicate + self.rejected


@dataclass
class IngestReport:
    shards: list[ShardReport] = field(default_factory=list)
    seconds: float = 0.0

    def _sum(self, attr: str) -> int:
        return sum(getattr(s, attr) for s in self.shards)

    @property
    def lines(self) -> int:
        return self._sum("lines")

    @property
    def recorded(self) -> int:
        return self._sum("recorded")

    @property
    def duplicate(self) -> int:
        return self._sum("duplicate")

    @property
    def rejected(self) -> int:
        return self._sum("rejected")

    @property
    def reasons(self) -> collections.Counter:
        out: collections.Counter = collections.Counter()
        for s in self.shards:
            out.update(s.reasons)
        return out

    @property
    def unknown_fields(self) -> collections.Counter:
        out: collections.Counter = collections.Counter()
        for s in self.shards:
            out.update(s.unknown_fields)
        return out

    @property
    def skipped(self) -> int:
        return sum(1 for s in self.shards if s.skipped)

    @property
    def balanced(self) -> bool:
        return all(s.balanced for s in self.shards)

    @property
    def lines_per_s(self) -> float:
        return self.lines / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        text = (
            f"{self.lines} lines from {len(self.shards) - self.skipped} shards in {self.seconds:.1f}s "
            f"({self.lines_per_s:,.0f}/s): {self.recorded} recorded, {self.duplicate} duplicate, {self.rejected} rejected"
        )
        if self.skipped:
            text += f"; {self.skipped} shards already ingested (skipped; --force reads them again)"
        return text

    def reason_lines(self) -> list[str]:
        return [f"  {n:>8}  {r}" for r, n in self.reasons.most_common()]

    def unknown_field_lines(self) -> list[str]:
        """Fields dropped from accepted lines (`--strict` refuses such lines)."""
        return [f"  {n:>8}  line(s) with unknown field {name!r} (dropped; --strict refuses them)" for name, n in self.unknown_fields.most_common()]


@dataclass(frozen=True)
class IngestProgress:
    """What a progress callback sees after each acknowledged batch."""

    shard: str
    bytes_done: int  # over all shards of this run (for a bar with total = IngestPlan.bytes)
    lines: int
    recorded: int
    duplicate: int
    rejected: int


# --------------------------------------------------------------------------- validation (pure)

# A validated batch: records are (line, fossil_id, subject, encoded event) and rejects are
# (line, code, message, raw cut to RAW_LIMIT, fossil_id or None); unknown counts the fields
# dropped from accepted lines. Plain values: they cross process borders.
Record = tuple[int, str, str, bytes]
Reject = tuple[int, str, str, bytes, "str | None"]
Validated = tuple[list[Record], list[Reject], dict[str, int]]


class _IdOnly(msgspec.Struct):
    fossil_id: str | None = None


_id_decoder = msgspec.json.Decoder(_IdOnly)
_encoder = msgspec.json.Encoder()


def _claimed_id(raw: bytes) -> str | None:
    try:
        return _id_decoder.decode(raw).fossil_id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def validate_batch(
    lines: Sequence[bytes],
    first_line: int,
    source: str,
    at: str,
    recheck: bool = False,
    strict: bool = False,
    energy_bounds: dict[str, tuple[float, float]] | None = None,
) -> Validated:
    """Validate NDJSON lines; encode a `fossil.recorded` event for each valid one.
    Pure and picklable: runs inline or in a worker process."""
    from scf.domains.fossils import FossilInvalid, check_line

    at_time = dt.datetime.fromisoformat(at)
    records: list[Record] = []
    rejects: list[Reject] = []
    unknown: collections.Counter = collections.Counter()
    for i, raw in enumerate(lines):
        n = first_line + i
        if isinstance(raw, LongLine):
            message = (
                f"too_long: the line is {raw.length:,} bytes, longer than any fossil ([ingest] max_line_bytes); "
                "it was not parsed; the whole line is in the quarantine"
            )
            rejects.append((n, "too_long", message, raw.head, None))
            continue
        try:
            fossil, dropped = check_line(raw, recheck=recheck, strict=strict, energy_bounds=energy_bounds)
            unknown.update(dropped)
        except FossilInvalid as exc:
            rejects.append((n, exc.reason, str(exc), bytes(raw[:RAW_LIMIT]), _claimed_id(raw)))
            continue
        except Exception as exc:  # noqa: BLE001 - a validator bug must not stop the run: the line is rejected
            rejects.append((n, "schema", f"schema: {type(exc).__name__}: {exc}", bytes(raw[:RAW_LIMIT]), _claimed_id(raw)))
            continue
        event = ev.FossilRecorded(id=fossil.fossil_id, at=at_time, source=source, data=fossil)
        subject = f"fossil.recorded.{_domain_token(fossil.domain)}.{fossil.fossil_id[7:]}"  # == event.subject()
        records.append((n, fossil.fossil_id, subject, _encoder.encode(event)))
    return records, rejects, dict(unknown)


@functools.lru_cache(maxsize=256)
def _domain_token(domain: str) -> str:
    return ev.domain_token(domain)


def _first_domain(path: Path) -> str | None:
    """The domain named on a shard's first line (None when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return msgspec.json.decode(f.readline(), type=_DomainOnly).domain
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


class _DomainOnly(msgspec.Struct):
    domain: str = ""


def _init_validator(domain: str | None) -> None:
    """Pool initializer: import the validator and build the domain once per process."""
    from scf import domains

    if domain:
        try:
            domains.get(domain)
        except Exception:  # noqa: BLE001 - only a warm-up: an unknown or broken domain is reported line by line
            pass


def _validate_job(args: tuple) -> Validated:
    return validate_batch(*args)


# --------------------------------------------------------------------------- reading shards


def find_shards(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, and `*.ndjson` / `*.jsonl` under directories (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SHARD_SUFFIXES)
            if not found:
                raise IngestError(f"{p} holds no *.ndjson or *.jsonl shard: write some with `scf fossils synth`")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise IngestError(f"no file or directory at {p}: check the path")
    seen: set[Path] = set()
    unique = []
    for p in out:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(p)
    return unique


def sha256_file(path: Path) -> str:
    return file_digest(path)[0]


class LongLine(NamedTuple):
    """A line longer than `[ingest] max_line_bytes`, by position: its bytes are never held
    in memory; its head goes into the `fossil.rejected` event, the whole line is copied
    from the shard into the quarantine in chunks."""

    offset: int  # where the line starts in the shard
    length: int  # its bytes, without the newline
    head: bytes  # its first RAW_LIMIT bytes


def iter_batches(
    path: Path, offset: int, first_line: int, block: int, max_lines: int, max_line: int = 0
) -> Iterator[tuple[int, int, list]]:
    """(first line number, offset after the batch, lines) from byte `offset` on; lines
    without their newline; a last line without a newline counts. A line longer than
    `max_line` bytes (0: no limit) comes as a `LongLine`: it is skipped over, never read
    into memory whole."""
    limit = max_line if max_line > 0 else 1 << 62
    with open(path, "rb") as f:
        f.seek(offset)
        pending: list = []  # lines read, not yet yielded
        line = first_line
        done = offset  # file offset after the lines yielded so far
        carry, carry_at = b"", offset  # a partial line and where it starts
        unterminated = False  # the file's last line has no newline (it is in `pending`)
        eof = False

        def add(parts: list[bytes], at: int) -> None:
            if max(map(len, parts)) <= limit:
                pending.extend(parts)
                return
            for p in parts:
                pending.append(p if len(p) <= limit else LongLine(at, len(p), p[:RAW_LIMIT]))
                at += len(p) + 1

        while not eof:
            data = f.read(block)
            if not data:
                eof = True
                if carry:
                    parts = carry.split(b"\n")
                    last = parts.pop()
                    if parts:
                        add(parts, carry_at)
                    if last:
                        add([last], carry_at + len(carry) - len(last))
                        unterminated = True
                    carry = b""
            else:
                buf = carry + data if carry else data
                buf_at = carry_at
                parts = buf.split(b"\n")
                carry = parts.pop()
                carry_at = buf_at + len(buf) - len(carry)
                if parts:
                    add(parts, buf_at)
                if len(carry) > limit:  # a long line whose end is further on: skip to it
                    at, length, head = carry_at, len(carry), carry[:RAW_LIMIT]
                    carry = b""
                    while True:
                        data = f.read(block)
                        if not data:
                            eof = unterminated = True
                            pending.append(LongLine(at, length, head))
                            break
                        i = data.find(b"\n")
                        piece = data if i < 0 else data[:i]
                        if len(head) < RAW_LIMIT:
                            head += piece[: RAW_LIMIT - len(head)]
                        length += len(piece)
                        if i < 0:
                            continue
                        pending.append(LongLine(at, length, head))
                        carry, carry_at = data[i + 1 :], at + length + 1
                        break
            while pending:  # what each read completed, in groups of max_lines (as read, block by block)
                group, pending = pending[:max_lines], pending[max_lines:]
                done += sum(len(p) if isinstance(p, bytes) else p.length for p in group) + len(group)
                if eof and unterminated and not pending:
                    done -= 1  # no newline after the file's last line
                yield line, done, group
                line += len(group)


# --------------------------------------------------------------------------- pipelined publishing


# --------------------------------------------------------------------------- the ingester


class _Quarantine:
    """An append-only file opened on the first write (clean shards leave no file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = None

    def __enter__(self) -> "_Quarantine":
        return self

    def __exit__(self, *exc) -> None:
        if self.f is not None:
            self.f.close()

    def write(self, data: bytes) -> None:
        if self.f is None:
            self.f = open(self.path, "ab")
        self.f.write(data)

    def sync(self) -> None:
        if self.f is not None:
            self.f.flush()
            os.fsync(self.f.fileno())

    def size(self) -> int:
        if self.f is not None:
            return self.f.tell()
        return self.path.stat().st_size if self.path.exists() else 0


@dataclass
class _Part:
    """Records of a batch sent together: one atomic batch, or one by one (`one_by_one`)."""

    start: int  # index into _Batch.records
    end: int
    futures: list[asyncio.Future]
    one_by_one: bool


@dataclass
class _Batch:
    first_line: int
    end_offset: int
    nlines: int
    records: list[Record]
    rejects: list[Reject]
    unknown: dict[str, int] = field(default_factory=dict)
    rejected_lines: list = field(default_factory=list)  # whole (bytes, or a LongLine to copy), for the quarantine
    parts: list[_Part] = field(default_factory=list)
    reject_futures: list[asyncio.Future] = field(default_factory=list)
    reject_sends: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)


class Ingester:
    def __init__(
        self,
        bus: Bus,
        *,
        home: Path,
        config: IngestSettings | None = None,
        force: bool = False,
        on_progress: Callable[[IngestProgress], None] | None = None,
    ) -> None:
        self.bus = bus
        self.cfg = config or IngestSettings()
        self.force = force
        self.on_progress = on_progress
        self.progress_dir = home / "fossil_vault" / "ingest"
        self.quarantine_dir = home / "fossil_vault" / "quarantine"
        self.progress_dir.mkdir(parents=True, exist_ok=True)
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        self._pool: concurrent.futures.Executor | None = None
        self._nworkers = 0
        self._bytes_done = 0

    # ------------------------------------------------------------------ entry point
    async def run(self, paths: Iterable[str | os.PathLike]) -> IngestReport:
        t0 = time.perf_counter()
        shards = find_shards(paths)
        total_bytes = sum(p.stat().st_size for p in shards)
        workers = self._nworkers = self._workers(total_bytes)
        report = IngestReport()
        self._pub = await PipelinedPublisher(self.bus.nc, self.cfg.window).start()
        self._atomic = self.cfg.atomic_batch > 1 and await self._stream_allows_atomic()
        try:
            if workers > 0:
                # forkserver, not fork: this process has threads (OpenBLAS's, the event
                # loop's executor), and forking a threaded process can deadlock the child.
                method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    workers, mp_context=multiprocessing.get_context(method),
                    initializer=_init_validator, initargs=(_first_domain(shards[0]) if shards else None,),
                )
            for path in shards:
                try:
                    report.shards.append(await self._shard(path))
                except OSError as exc:  # a full disk (quarantine, progress), an unreadable shard
                    file = f" ({exc.filename})" if exc.filename else ""
                    raise IngestError(
                        f"ingest of {path} stopped: {exc.strerror or exc}{file}: free space or fix permissions "
                        f"(shards, {self.quarantine_dir.parent}) and run ingest again (it resumes after the last "
                        "acknowledged batch; nothing is recorded or quarantined twice)"
                    ) from None
        finally:
            await self._pub.close()
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
        report.seconds = time.perf_counter() - t0
        return report

    async def _stream_allows_atomic(self) -> bool:
        try:
            info = await self.bus.js.stream_info("FOSSILS")
        except Exception as exc:  # noqa: BLE001 - any failure is the same one-line error
            raise IngestError(f"cannot read the FOSSILS stream ({exc}): run `scf streams ensure`") from None
        return bool(getattr(info.config, "allow_atomic", False))

    def _workers(self, total_bytes: int) -> int:
        if self.cfg.workers >= 0:
            return self.cfg.workers
        if total_bytes < self.cfg.auto_workers_above:
            return 0
        return max(1, min(8, (os.cpu_count() or 2) - 1))

    # ------------------------------------------------------------------ one shard
    def _progress_path(self, sha: str) -> Path:
        return self.progress_dir / f"{sha}.json"

    def _load_progress(self, path: Path, sha: str) -> ShardProgress:
        p = self._progress_path(sha)
        if not self.force and p.exists():
            try:
                return msgspec.json.decode(p.read_bytes(), type=ShardProgress)
            except msgspec.DecodeError:
                pass  # unreadable: start the shard over (publishing is idempotent)
        return ShardProgress(sha256=sha, path=str(path.resolve()), started_at=_now())

    def _save_progress(self, prog: ShardProgress) -> None:
        prog.updated_at = _now()
        atomic_write(self._progress_path(prog.sha256), msgspec.json.encode(prog))

    async def _shard(self, path: Path) -> ShardReport:
        sha = await asyncio.to_thread(sha256_file, path)
        size = path.stat().st_size
        prog = self._load_progress(path, sha)
        rep = ShardReport(path=str(path.resolve()), sha256=sha, bytes=size, resumed_from_line=prog.lines, total=prog)
        if prog.complete:
            rep.skipped = True
            self._bytes_done += size
            return rep
        stem = path.name.rsplit(".", 1)[0]
        qpath = self.quarantine_dir / f"{stem}.{sha[:12]}.ndjson"
        rpath = self.quarantine_dir / f"{stem}.{sha[:12]}.reasons.ndjson"
        for qp, keep in ((qpath, prog.quarantine_bytes), (rpath, prog.reasons_bytes)):
            if qp.exists() and qp.stat().st_size > keep:
                with open(qp, "r+b") as f:
                    f.truncate(keep)  # drop what a crashed run copied after its last checkpoint
        self._bytes_done += prog.offset
        source = self.bus.source
        at = dt.datetime.now(dt.timezone.utc).isoformat()
        loop = asyncio.get_running_loop()
        # With a pool, smaller batches keep every validator busy and the publisher fed.
        block = min(self.cfg.block_bytes, 1 << 20) if self._pool is not None else self.cfg.block_bytes
        batches = iter_batches(path, prog.offset, prog.lines + 1, block, self.cfg.max_batch_lines, self.cfg.max_line_bytes)

        # Validation runs ahead (in the pool) while earlier batches are published.
        ahead = max(2, 2 * self._nworkers)
        pending_validation: collections.deque = collections.deque()
        unsettled: collections.deque[_Batch] = collections.deque()
        exhausted = False

        def submit_next() -> bool:
            try:
                first, end, lines = next(batches)
            except StopIteration:
                return False
            args = (lines, first, source, at, self.cfg.recheck, self.cfg.strict, dict(self.cfg.energy_bounds))
            fut = loop.run_in_executor(self._pool, _validate_job, args) if self._pool else None
            pending_validation.append((first, end, len(lines), fut, args))
            return True

        with _Quarantine(qpath) as qf, _Quarantine(rpath) as rf:
            while True:
                while not exhausted and len(pending_validation) < ahead:
                    exhausted = not submit_next()
                if not pending_validation:
                    break
                first, end, nlines, fut, args = pending_validation.popleft()
                records, rejects, unknown = await fut if fut is not None else validate_batch(*args)
                lines = args[0]
                batch = _Batch(first, end, nlines, records, rejects, unknown, [lines[r[0] - first] for r in rejects])
                await self._publish(batch, rep.path, sha)
                unsettled.append(batch)
                if len(unsettled) > 1:
                    await self._settle(unsettled.popleft(), prog, rep, qf, rf)
            while unsettled:
                await self._settle(unsettled.popleft(), prog, rep, qf, rf)
        prog.complete = True
        self._save_progress(prog)
        return rep

    # ------------------------------------------------------------------ publishing
    @staticmethod
    def _record_headers(fid: str) -> dict[str, str]:
        return {MSG_ID: fid, SCF_TYPE: "fossil.recorded", EXPECTED_LAST_SUBJECT_SEQ: "0"}

    def _record_body(self, body: bytes) -> bytes:
        return codec.sign(codec.ANY.decode(body), self.bus.key) if self.bus.key is not None else body

    async def _send_one_by_one(self, records: Sequence[Record]) -> list[asyncio.Future]:
        return [await self._pub.publish(subject, self._record_body(body), self._record_headers(fid)) for _, fid, subject, body in records]

    async def _publish(self, batch: _Batch, shard: str, sha: str) -> None:
        recs = batch.records
        size = self.cfg.atomic_batch if self._atomic else 0
        for start in range(0, len(recs), size or max(1, len(recs))):
            part = recs[start : start + size] if size else recs
            if size and len(part) > 1:
                items = [(subject, self._record_body(body)) for _, _, subject, body in part]
                fut = await self._pub.publish_atomic(items, {SCF_TYPE: "fossil.recorded"})
                batch.parts.append(_Part(start, start + len(part), [fut], one_by_one=False))
            else:
                batch.parts.append(_Part(start, start + len(part), await self._send_one_by_one(part), one_by_one=True))
        for n, _code, message, raw, fid in batch.rejects:
            event = ev.FossilRejected.new(
                ev.FossilRejection(shard=shard, line=n, reason=message, raw=raw.decode("utf-8", "replace"), fossil_id=fid),
                source=self.bus.source,
                id=derived_id("fossil.rejected", sha, n),
            )
            send = (event.subject(), self.bus._body(event), Bus.headers(event))
            batch.reject_sends.append(send)
            batch.reject_futures.append(await self._pub.publish(*send))

    async def _wait(self, futures: list[asyncio.Future], resend=None) -> list[PubReply | None]:
        """Replies of `futures`. What gets no answer in time is sent again with
        `resend(i)` (publishing is idempotent), or, without `resend`, answered None."""
        for attempt in range(3):
            _, pending = await asyncio.wait(futures, timeout=self.cfg.ack_timeout) if futures else (set(), set())
            if not pending:
                return [f.result() for f in futures]
            if resend is None:
                for f in pending:
                    self._pub.forget(f)
                return [None if f in pending else f.result() for f in futures]
            if attempt == 2:
                break
            for i, f in enumerate(futures):
                if f in pending:
                    self._pub.forget(f)
                    futures[i] = await resend(i)
        raise IngestError(
            f"publishes were not acknowledged in {self.cfg.ack_timeout:.0f}s three times: check NATS and run ingest again (it resumes)"
        )

    async def _count_records(self, batch: _Batch) -> tuple[int, int]:
        recorded = duplicate = 0
        for part in batch.parts:
            recs = batch.records[part.start : part.end]
            if not part.one_by_one:
                (reply,) = await self._wait(part.futures)
                if reply is not None and reply.error is None and reply.count == len(recs):
                    recorded += len(recs)
                    continue
                # Refused as a whole (a fossil already stored, or twice in the batch) or
                # unanswered: send its fossils one by one, which sorts new from duplicate.
                part.futures = await self._send_one_by_one(recs)

            async def resend(i: int, recs=recs) -> asyncio.Future:
                return (await self._send_one_by_one([recs[i]]))[0]

            replies = await self._wait(part.futures, resend)
            for rec, reply in zip(recs, replies):
                assert reply is not None
                err = reply.error
                if err is None:
                    duplicate += reply.duplicate
                    recorded += not reply.duplicate
                elif err.err_code == ERR_WRONG_LAST_SEQUENCE:
                    duplicate += 1  # recorded by an earlier run, however long ago
                else:
                    raise IngestError(
                        f"publishing {rec[2]} failed: {err.description} (code {err.code}, err_code {err.err_code}); "
                        "fix the bus and run ingest again (it resumes)"
                    )
        return recorded, duplicate

    async def _settle(self, batch: _Batch, prog: ShardProgress, rep: ShardReport, qf, rf) -> None:
        recorded, duplicate = await self._count_records(batch)

        async def resend(i: int) -> asyncio.Future:
            return await self._pub.publish(*batch.reject_sends[i])

        for reply in await self._wait(batch.reject_futures, resend):
            assert reply is not None
            if reply.error is not None:
                raise IngestError(
                    f"publishing a fossil.rejected failed: {reply.error.description} (code {reply.error.code}, "
                    f"err_code {reply.error.err_code}); run ingest again (it resumes)"
                )
        for (n, code, message, _raw, _fid), whole in zip(batch.rejects, batch.rejected_lines):
            # Verbatim, however long (the event carries at most RAW_LIMIT bytes).
            if isinstance(whole, LongLine):
                size = await asyncio.to_thread(_copy_range, Path(rep.path), whole.offset, whole.length, qf)
            else:
                qf.write(whole)
                size = len(whole)
            qf.write(b"\n")
            rf.write(_encoder.encode({"line": n, "reason": code, "detail": message, "shard": rep.path, "bytes": size}) + b"\n")
            rep.reasons[code] += 1
            prog.reasons[code] = prog.reasons.get(code, 0) + 1
        for name, k in batch.unknown.items():
            rep.unknown_fields[name] += k
            prog.unknown_fields[name] = prog.unknown_fields.get(name, 0) + k
        qf.sync()
        rf.sync()
        rejected = len(batch.rejects)
        rep.lines += batch.nlines
        rep.recorded += recorded
        rep.duplicate += duplicate
        rep.rejected += rejected
        prog.lines += batch.nlines
        prog.recorded += recorded
        prog.duplicate += duplicate
        prog.rejected += rejected
        self._bytes_done += batch.end_offset - prog.offset
        prog.offset = batch.end_offset
        prog.quarantine_bytes = qf.size()
        prog.reasons_bytes = rf.size()
        self._save_progress(prog)
        if self.on_progress is not None:
            self.on_progress(IngestProgress(rep.path, self._bytes_done, rep.lines, rep.recorded, rep.duplicate, rep.rejected))

def _copy_range(src: Path, offset: int, length: int, out: "_Quarantine", chunk: int = 1 << 20) -> int:
    """Copy `length` bytes of `src` from `offset` to `out`, a chunk at a time."""
    copied = 0
    with open(src, "rb") as f:
        f.seek(offset)
        while copied < length:
            data = f.read(min(chunk, length - copied))
            if not data:
                raise IngestError(f"{src} changed while it was ingested (ends before byte {offset + length}): run ingest again")
            out.write(data)
            copied += len(data)
    return copied


async def ingest(
    bus: Bus,
    paths: Iterable[str | os.PathLike],
    *,
    settings=None,
    home: Path | None = None,
    force: bool = False,
    workers: int | None = None,
    strict: bool | None = None,
    on_progress: Callable[[IngestProgress], None] | None = None,
) -> IngestReport:
    """Ingest the shards under `paths` (files or directories); see the module doc.
    `strict` (default: `[ingest] strict`) refuses lines with unknown fields."""
    cfg = settings.section("ingest", IngestSettings) if settings is not None else IngestSettings()
    if workers is not None:
        cfg = msgspec.structs.replace(cfg, workers=workers)
    if strict is not None:
        cfg = msgspec.structs.replace(cfg, strict=strict)
    check_settings(cfg)
    root = home or (settings.home_path if settings is not None else bus.settings.home_path)
    return await Ingester(bus, home=Path(root), config=cfg, force=force, on_progress=on_progress).run(paths)


def plan_bytes(paths: Iterable[str | os.PathLike]) -> int:
    """Total bytes of the shards under `paths` (for a progress bar)."""
    return sum(p.stat().st_size for p in find_shards(paths))


__all__ = ["ingest", "Ingester", "IngestReport", "ShardReport", "IngestProgress", "IngestSettings", "IngestError", "validate_batch", "find_shards", "plan_bytes"]
