"""The Parquet archive on disk: its layout, atomic writes, its position, compaction, hashes.

    <archive>/
      stream=FOSSILS/date=2026-11-22/FOSSILS-000000000001-000000005000.parquet
      stream=_empty/date=1970-01-01/_empty-000000000000-000000000000.parquet   (zero rows: keeps
                                                                              the views valid on
                                                                              an empty archive)
      scf.duckdb              the views, for an analyst's own DuckDB (see projections.views)
      .locks/ .journal/ .staging/   bookkeeping (hidden from the views' glob)

A file holds the messages of one stream, one UTC date (of the JetStream timestamp) and one
contiguous run of sequences; its name carries the first and last sequence it holds. The
archive's position in a stream is the largest last sequence over that stream's files: the
position is recorded *with* the data, by the same rename that makes the data visible. A file
is written to a hidden temporary name, fsynced, renamed into place and its directory fsynced,
so a crash leaves either the whole file or nothing, and a restart resumes exactly after the
last archived sequence. Changes that replace files (compaction, a rebuild) go through a small
journal that is rolled forward after a crash.

Rows are a deterministic function of the messages (no processing-time column): replaying a
stream from sequence 1 reproduces the same rows, whatever the file boundaries.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from scf.bus.codec import Wire
from scf.bus.errors import SCFError
from scf.bus.headers import SCF_KID, SCF_SIG
from scf.bus.streams import STREAMS

# Streams the archive keeps. JOBS is a work-queue stream: a second consumer would take work
# from the GPU workers, and every item on it is mirrored as job.dispatched in TRAINING.
# KV_* and OBJ_* streams (buckets, the object store) are state, not the log.
SKIPPED_STREAMS: dict[str, str] = {"JOBS": "work-queue stream; its items are mirrored as job.dispatched in TRAINING"}
ARCHIVED_STREAMS: tuple[str, ...] = tuple(s.name for s in STREAMS if s.name not in SKIPPED_STREAMS)

SCHEMA_VERSION = 1
UTC = "UTC"
SCHEMA = pa.schema(
    [
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("subject", pa.string(), nullable=False),
        pa.field("type", pa.string(), nullable=False),
        pa.field("v", pa.int32()),
        pa.field("id", pa.string()),
        pa.field("at", pa.timestamp("us", tz=UTC)),
        pa.field("source", pa.string()),
        pa.field("correlation_id", pa.string()),
        pa.field("causation_id", pa.string()),
        pa.field("kid", pa.string()),
        pa.field("signed", pa.bool_(), nullable=False),
        pa.field("published_at", pa.timestamp("us", tz=UTC), nullable=False),
        pa.field("headers", pa.string()),
        pa.field("payload", pa.string(), nullable=False),
    ],
    metadata={b"scf.archive.schema": str(SCHEMA_VERSION).encode()},
)

EMPTY_STREAM = "_empty"
ROW_GROUP_ROWS = 122_880
_DICTIONARY_COLUMNS = ("type", "v", "source", "kid", "signed")  # DuckDB's own row-group size: one scan thread per row group
_NAME = re.compile(r"^(?P<stream>.+)-(?P<first>\d+)-(?P<last>\d+)\.parquet$")
_NS_PER_DAY = 86_400 * 1_000_000_000


class ArchiveError(SCFError):
    """The archive directory cannot be used as asked."""


class ArchiveBusy(ArchiveError):
    pass


class ArchiveWriteFailed(ArchiveError):
    """Writing a file failed (a full disk, a file size limit, an I/O error). Nothing was
    half-written: the temporary file is gone, and `written` lists the files of the batch that
    were made durable before the failure (the position moved past them only)."""

    def __init__(self, path: Path, cause: BaseException, written: list["ArchiveFile"] | None = None) -> None:
        self.path, self.cause, self.written = Path(path), cause, list(written or [])
        super().__init__(f"cannot write {self.path}: {self.reason}: free space there (or lift the file size limit)")

    @property
    def reason(self) -> str:
        """Why, in a few words: `No space left on device`, `File too large`, …"""
        code = getattr(self.cause, "errno", None)
        if not code:  # pyarrow and DuckDB put the errno in their message
            m = re.search(r"\[errno (\d+)\]", str(self.cause), re.I)
            code = int(m.group(1)) if m else None
        if code:
            return os.strerror(code)
        text = (str(self.cause).strip() or type(self.cause).__name__).splitlines()[0]
        return text.rsplit(": ", 1)[-1]


# --------------------------------------------------------------------------- messages → rows


@dataclass(frozen=True, slots=True)
class RawMessage:
    """One stored message as JetStream delivered it."""

    seq: int
    ts_ns: int  # the JetStream timestamp (nanoseconds since the epoch, UTC)
    subject: str
    data: bytes
    headers: dict[str, str] | None


_envelope = msgspec.json.Decoder(Wire)  # the bus's own envelope, payload kept as raw bytes
_headers_encoder = msgspec.json.Encoder(order="sorted")


def _plain_payload(body: bytes) -> bytes:
    """The body of a message that is not an event envelope (a control command), as JSON text."""
    if not body.strip():
        return b"null"
    try:
        msgspec.json.decode(body)
        body.decode()
        return body
    except (msgspec.DecodeError, UnicodeDecodeError):
        return msgspec.json.encode(body.decode("utf-8", errors="replace"))


def _decode_or_none(body: bytes) -> Wire | None:
    try:
        return _envelope.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def to_table(
    seq: pa.Array | Sequence[int],
    ts_ns: pa.Array | Sequence[int],
    subjects: Sequence[str],
    bodies: Sequence[bytes],
    headers: Sequence[dict[str, str] | None],
) -> pa.Table:
    """Rows for messages given column-wise (in sequence order). Envelopes get typed envelope
    columns and their `data` kept byte for byte as `payload`; any other message (a plain-JSON
    control command) gets type = its subject, payload = its body, null envelope columns.

    This is the archive's hot path: per message, one msgspec decode and a handful of list
    comprehensions; everything else is vectorised in Arrow."""
    decode = _envelope.decode
    try:
        envs: list[Wire | None] = [decode(b) for b in bodies]
    except (msgspec.DecodeError, msgspec.ValidationError):
        envs = [_decode_or_none(b) for b in bodies]
    enc = _headers_encoder.encode
    hdr = pa.array([enc(h) if h else None for h in headers], pa.binary()).cast(pa.string())
    if all(e is not None for e in envs):
        types = pa.array([e.type for e in envs], pa.string())  # type: ignore[union-attr]
        cols = [
            pa.array([e.v for e in envs], pa.int32()),  # type: ignore[union-attr]
            pa.array([e.id for e in envs], pa.string()),  # type: ignore[union-attr]
            _timestamps([e.at for e in envs]),  # type: ignore[union-attr]
            pa.array([e.source for e in envs], pa.string()),  # type: ignore[union-attr]
            pa.array([e.correlation_id for e in envs], pa.string()),  # type: ignore[union-attr]
            pa.array([e.causation_id for e in envs], pa.string()),  # type: ignore[union-attr]
            pa.array([e.kid for e in envs], pa.string()),  # type: ignore[union-attr]
            pa.array([e.sig is not None for e in envs], pa.bool_()),  # type: ignore[union-attr]
        ]
        payload = pa.array([bytes(e.data) for e in envs], pa.binary())  # type: ignore[union-attr]
    else:
        types = pa.array([e.type if e else s for e, s in zip(envs, subjects)], pa.string())
        cols = [
            pa.array([e.v if e else None for e in envs], pa.int32()),
            pa.array([e.id if e else None for e in envs], pa.string()),
            _timestamps([e.at if e else None for e in envs]),
            pa.array([e.source if e else None for e in envs], pa.string()),
            pa.array([e.correlation_id if e else None for e in envs], pa.string()),
            pa.array([e.causation_id if e else None for e in envs], pa.string()),
            pa.array([e.kid if e else (h or {}).get(SCF_KID) for e, h in zip(envs, headers)], pa.string()),
            pa.array([e.sig is not None if e else bool((h or {}).get(SCF_SIG)) for e, h in zip(envs, headers)], pa.bool_()),
        ]
        payload = pa.array([bytes(e.data) if e else _plain_payload(b) for e, b in zip(envs, bodies)], pa.binary())
    try:
        payload_text = payload.cast(pa.string())  # validates UTF-8 in C++
    except pa.ArrowInvalid:
        payload_text = pa.array([p.decode("utf-8", errors="replace") for p in payload.to_pylist()], pa.string())
    seq_arr = seq if isinstance(seq, pa.Array) else pa.array(seq, pa.int64())
    ts_arr = ts_ns if isinstance(ts_ns, pa.Array) else pa.array(ts_ns, pa.int64())
    published = pc.divide(ts_arr.cast(pa.int64()), 1000).cast(pa.timestamp("us", tz=UTC))
    columns = [
        seq_arr.cast(pa.int64()),
        pa.array(subjects, pa.string()),
        types,
        *cols[:7],
        cols[7],
        published,
        hdr,
        payload_text,
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def messages_table(messages: Sequence[RawMessage]) -> pa.Table:
    """`to_table` for a list of RawMessage."""
    return to_table(
        [m.seq for m in messages], [m.ts_ns for m in messages], [m.subject for m in messages],
        [m.data for m in messages], [m.headers for m in messages],
    )


def parse_replies(replies: Sequence[str]) -> tuple[pa.Array, pa.Array, pa.Array, pa.Array]:
    """(stream seq, consumer seq, timestamp ns, pending) of JetStream ack subjects, vectorised:
    `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>` (and the v2 form
    with domain and account hash, `$JS.ACK.<domain>.<hash>.<stream>…`, 12 tokens)."""
    parts = pc.split_pattern(pa.array(replies, pa.string()), ".")
    n_tokens = pc.list_value_length(parts)
    if pc.all(pc.equal(n_tokens, 9)).as_py():
        idx = (5, 6, 7, 8)
        return tuple(pc.list_element(parts, i).cast(pa.int64()) for i in idx)  # type: ignore[return-value]
    out = []
    for v1, v2 in ((5, 7), (6, 8), (7, 9), (8, 10)):
        out.append(pc.if_else(pc.equal(n_tokens, 9), pc.list_element(parts, v1), pc.list_element(parts, v2)).cast(pa.int64()))
    return tuple(out)  # type: ignore[return-value]


def _timestamps(values: list[str | None]) -> pa.Array:
    text = pa.array(values, pa.string())
    try:
        return text.cast(pa.timestamp("us", tz=UTC))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # one odd `at`: null for that row only
        out = []
        for v in values:
            try:
                out.append(pa.scalar(v, pa.string()).cast(pa.timestamp("us", tz=UTC)).value if v is not None else None)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                out.append(None)
        return pa.array(out, pa.int64()).cast(pa.timestamp("us", tz=UTC))


# --------------------------------------------------------------------------- files


@dataclass(frozen=True, order=True)
class ArchiveFile:
    stream: str
    first: int
    last: int
    date: str
    path: Path = field(compare=False)

    @property
    def name(self) -> str:
        return self.path.name


def file_name(stream: str, first: int, last: int) -> str:
    return f"{stream}-{first:012d}-{last:012d}.parquet"


@dataclass
class CompactReport:
    stream: str
    merged: int = 0  # files merged away
    written: int = 0  # files written
    rows: int = 0

    def line(self) -> str:
        if not self.merged:
            return f"{self.stream}: nothing to compact"
        return f"{self.stream}: merged {self.merged} files into {self.written} ({self.rows} rows, unchanged)"


class ArchiveStore:
    """One archive directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()

    # ------------------------------------------------------------------ layout
    def stream_dir(self, stream: str) -> Path:
        return self.root / f"stream={stream}"

    def partition_dir(self, stream: str, date: str) -> Path:
        return self.stream_dir(stream) / f"date={date}"

    @property
    def database_path(self) -> Path:
        return self.root / "scf.duckdb"

    def exists(self) -> bool:
        return (self.root / f"stream={EMPTY_STREAM}").is_dir()

    def ensure(self) -> None:
        """Create the directory and the zero-row file that keeps the views valid when empty."""
        for sub in (".locks", ".journal", ".staging"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        empty = self.partition_dir(EMPTY_STREAM, "1970-01-01") / file_name(EMPTY_STREAM, 0, 0)
        if not empty.exists():
            try:
                self._write_atomic(SCHEMA.empty_table(), empty)
            except OSError as exc:
                raise ArchiveWriteFailed(empty, exc) from exc

    def require(self) -> None:
        if not self.exists():
            raise ArchiveError(f"no archive at {self.root}: start `scf run archive` or build one with `scf replay`")

    def streams(self) -> list[str]:
        if not self.root.is_dir():
            return []
        out = []
        for entry in os.scandir(self.root):
            if entry.is_dir() and entry.name.startswith("stream=") and entry.name != f"stream={EMPTY_STREAM}":
                out.append(entry.name.removeprefix("stream="))
        return sorted(out)

    def files(self, stream: str) -> list[ArchiveFile]:
        """The stream's files in sequence order."""
        out: list[ArchiveFile] = []
        base = self.stream_dir(stream)
        if not base.is_dir():
            return out
        for part in os.scandir(base):
            if not (part.is_dir() and part.name.startswith("date=")):
                continue
            date = part.name.removeprefix("date=")
            for entry in os.scandir(part.path):
                m = _NAME.match(entry.name)
                if m and m.group("stream") == stream:
                    out.append(ArchiveFile(stream, int(m.group("first")), int(m.group("last")), date, Path(entry.path)))
        out.sort()
        return out

    def all_files(self, streams: Iterable[str] | None = None) -> list[ArchiveFile]:
        out: list[ArchiveFile] = []
        for s in streams if streams is not None else self.streams():
            out += self.files(s)
        return out

    def position(self, stream: str) -> int:
        """The last archived sequence of `stream` (0 when none)."""
        files = self.files(stream)
        return max((f.last for f in files), default=0)

    # ------------------------------------------------------------------ locks
    @contextlib.contextmanager
    def lock(self, stream: str, purpose: str = "write") -> Iterator[None]:
        """An exclusive lock per (stream, purpose), held by this process until exit.
        `write`: the one process appending to the stream's files; `maintain`: compaction."""
        (self.root / ".locks").mkdir(parents=True, exist_ok=True)
        path = self.root / ".locks" / f"{stream}.{purpose}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                raise ArchiveBusy(
                    f"archive stream {stream} is locked for {purpose} by {holder}: stop that process "
                    f"(`scf run archive` or a running compact / replay) and try again"
                ) from None
            with contextlib.suppress(OSError):  # the holder's note is informative (a full disk)
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    # ------------------------------------------------------------------ writing
    def _write_atomic(self, table: pa.Table, final: Path) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            self._write_tmp(table, tmp)
            os.replace(tmp, final)
        except BaseException:
            # A full disk (ENOSPC), a file size limit (EFBIG), an I/O error: leave nothing
            # half-written behind; the caller decides whether to retry.
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)

    @staticmethod
    def _write_tmp(table: pa.Table, tmp: Path) -> None:
        # Dictionary-encode only the low-cardinality columns (ids and payloads would just
        # overflow the dictionary and fall back); zstd level 1 compresses these rows as well
        # as the default level, faster.
        dictionary = list(_DICTIONARY_COLUMNS)
        if table.num_rows and pc.count_distinct(table.column("subject")).as_py() * 4 < table.num_rows:
            dictionary.append("subject")
        pq.write_table(
            table,
            tmp,
            compression="zstd",
            compression_level=1,
            use_dictionary=dictionary,
            row_group_size=ROW_GROUP_ROWS,
            sorting_columns=[pq.SortingColumn(0)],
        )
        _fsync_path(tmp)

    def append(self, stream: str, table: pa.Table) -> list[ArchiveFile]:
        """Write rows of `stream` (in sequence order, all after the current position) as one
        file per run of one date. Files are made durable one after the other in sequence
        order, so a crash between two leaves no gap."""
        if table.num_rows == 0:
            return []
        written: list[ArchiveFile] = []
        for date, part in _split_by_date(table):
            seqs = part.column("seq")
            first, last = seqs[0].as_py(), seqs[-1].as_py()
            pdir = self.partition_dir(stream, date)
            new_dir = not pdir.exists()
            path = pdir / file_name(stream, first, last)
            try:
                self._write_atomic(part, path)
                if new_dir:
                    _fsync_dir(pdir.parent)
                    _fsync_dir(self.root)
            except OSError as exc:  # pyarrow's IO errors are OSErrors too
                raise ArchiveWriteFailed(path, exc, written) from exc
            written.append(ArchiveFile(stream, first, last, date, path))
        return written

    @contextlib.contextmanager
    def database_lock(self) -> Iterator[None]:
        """Held while `scf.duckdb` is written (waits for another writer: it takes a second)."""
        (self.root / ".locks").mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".locks" / "scf.duckdb.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def clean_database_temporary(self) -> int:
        """Remove the `.scf.duckdb.*.tmp` (and their `.wal`) a failed or killed write left
        behind (the caller holds `database_lock`)."""
        removed = 0
        if self.root.is_dir():
            for p in self.root.glob(f".{self.database_path.name}.*.tmp*"):
                if p.name.endswith((".tmp", ".tmp.wal")):
                    p.unlink(missing_ok=True)
                    removed += 1
        return removed

    def clean_temporary(self, stream: str) -> int:
        """Remove temporary files a crash left behind (the caller holds the write lock)."""
        removed = 0
        base = self.stream_dir(stream)
        if not base.is_dir():
            return 0
        for part in base.iterdir():
            if part.is_dir():
                for p in part.glob(".*.tmp"):
                    p.unlink(missing_ok=True)
                    removed += 1
        return removed

    # ------------------------------------------------------------------ replacing files
    def staging(self, stream: str) -> Path:
        d = self.root / ".staging" / f"{stream}-{uuid.uuid4().hex[:12]}"
        d.mkdir(parents=True)
        return d

    def commit(self, stream: str, adds: Sequence[tuple[Path, Path]], removes: Sequence[Path]) -> None:
        """Replace files as one journaled change: `adds` are (staged file, final path), then
        `removes` are deleted. A crash midway is rolled forward by `recover`."""
        targets = {Path(final) for _, final in adds}
        journal = {
            "adds": [[str(s), str(f)] for s, f in adds],
            "removes": [str(p) for p in removes if Path(p) not in targets],
        }
        jdir = self.root / ".journal"
        jdir.mkdir(parents=True, exist_ok=True)
        jpath = jdir / f"{stream}.json"
        tmp = jdir / f".{stream}.json.tmp"
        try:
            tmp.write_text(json.dumps(journal))
            _fsync_path(tmp)
            os.replace(tmp, jpath)
        except OSError as exc:  # nothing was changed yet
            tmp.unlink(missing_ok=True)
            raise ArchiveWriteFailed(jpath, exc) from exc
        _fsync_dir(jdir)
        self._roll_forward(jpath)

    def recover(self, stream: str) -> bool:
        """Finish a journaled change a crash interrupted and drop abandoned staging dirs.
        The caller holds the stream's `maintain` lock."""
        jpath = self.root / ".journal" / f"{stream}.json"
        done = False
        if jpath.exists():
            self._roll_forward(jpath)
            done = True
        staging = self.root / ".staging"
        if staging.is_dir():
            for d in staging.glob(f"{stream}-*"):
                shutil.rmtree(d, ignore_errors=True)
        return done

    def _roll_forward(self, jpath: Path) -> None:
        journal = json.loads(jpath.read_text())
        dirs: set[Path] = set()
        for staged, final in journal["adds"]:
            s, f = Path(staged), Path(final)
            if s.exists():
                f.parent.mkdir(parents=True, exist_ok=True)
                os.replace(s, f)
                dirs.add(f.parent)
        for p in journal["removes"]:
            Path(p).unlink(missing_ok=True)
            dirs.add(Path(p).parent)
        for d in dirs:
            if d.exists():
                _fsync_dir(d)
                if not any(d.iterdir()):
                    d.rmdir()
        jpath.unlink()
        _fsync_dir(jpath.parent)

    # ------------------------------------------------------------------ compaction
    def compact(
        self, stream: str, *, target_rows: int = 1_000_000, small_rows: int | None = None, date: str | None = None
    ) -> CompactReport:
        """Merge runs of small files of one date into files of up to `target_rows`, without
        changing a row. A file is small under `small_rows` (default: half the target)."""
        small = small_rows if small_rows is not None else target_rows // 2
        report = CompactReport(stream)
        with self.lock(stream, "maintain"):
            self.recover(stream)
            files = [f for f in self.files(stream) if date is None or f.date == date]
            counts = {f.path: pq.ParquetFile(f.path).metadata.num_rows for f in files}
            runs: list[list[ArchiveFile]] = []
            run: list[ArchiveFile] = []
            total = 0
            for f in files:
                n = counts[f.path]
                joinable = run and run[-1].date == f.date and n < small and total + n <= target_rows
                if joinable:
                    run.append(f)
                    total += n
                    continue
                if len(run) > 1:
                    runs.append(run)
                run, total = ([f], n) if n < small else ([], 0)
            if len(run) > 1:
                runs.append(run)
            if not runs:
                return report
            stage = self.staging(stream)
            adds: list[tuple[Path, Path]] = []
            removes: list[Path] = []
            try:
                for run in runs:
                    table = pa.concat_tables([pq.read_table(f.path, schema=SCHEMA) for f in run])
                    final = self.partition_dir(stream, run[0].date) / file_name(stream, run[0].first, run[-1].last)
                    staged = stage / final.name
                    try:
                        self._write_atomic(table, staged)
                    except OSError as exc:
                        raise ArchiveWriteFailed(staged, exc) from exc
                    adds.append((staged, final))
                    removes += [f.path for f in run]
                    report.merged += len(run)
                    report.written += 1
                    report.rows += table.num_rows
                self.commit(stream, adds, removes)
            except ArchiveWriteFailed:
                # Nothing journaled: the files are unchanged; the staged copies go (they only
                # take room). Once journaled, the staging stays for `recover` to roll forward.
                shutil.rmtree(stage, ignore_errors=True)
                raise
            shutil.rmtree(stage, ignore_errors=True)
        return report

    def try_recover(self, stream: str) -> None:
        """`recover` unless a compaction or rebuild holds the stream (it recovers itself)."""
        try:
            with self.lock(stream, "maintain"):
                self.recover(stream)
        except ArchiveBusy:
            pass

    # ------------------------------------------------------------------ reading and hashing
    def read(self, stream: str, *, min_seq: int = 1, max_seq: int | None = None) -> pa.Table:
        files = [f for f in self.files(stream) if f.last >= min_seq and (max_seq is None or f.first <= max_seq)]
        if not files:
            return SCHEMA.empty_table()
        table = pa.concat_tables([pq.read_table(f.path, schema=SCHEMA) for f in files])
        seq = table.column("seq")
        mask = pc.greater_equal(seq, min_seq)
        if max_seq is not None:
            mask = pc.and_(mask, pc.less_equal(seq, max_seq))
        return table.filter(mask)

    def content_hash(self, streams: Iterable[str] | None = None, *, max_seq: dict[str, int] | None = None) -> str:
        """sha256 over every row (stream, then sequence order), independent of how rows are
        split into files: equal hashes mean equal archives."""
        h = hashlib.sha256()
        for stream in sorted(streams if streams is not None else self.streams()):
            h.update(f"stream={stream}\n".encode())
            limit = (max_seq or {}).get(stream)
            first = True
            for f in self.files(stream):
                if limit is not None and f.first > limit:
                    continue
                for batch in pq.ParquetFile(f.path).iter_batches(batch_size=8_192):
                    if limit is not None and batch.column("seq")[-1].as_py() > limit:
                        batch = batch.filter(pc.less_equal(batch.column("seq"), limit))
                    if batch.num_rows == 0:
                        continue
                    # The JSON list of this batch's rows without its brackets: joined with
                    # commas, the same bytes whatever the batch and file boundaries.
                    if not first:
                        h.update(b",")
                    h.update(_rows_json(batch)[1:-1])
                    first = False
        return h.hexdigest()

    def files_hash(self, files: Iterable[ArchiveFile]) -> str:
        """sha256 over (relative path, sha256 of bytes) of each file, in path order."""
        h = hashlib.sha256()
        for f in sorted(files, key=lambda f: str(f.path)):
            rel = f.path.relative_to(self.root).as_posix()
            h.update(f"{rel}\0{_file_sha256(f.path)}\n".encode())
        return h.hexdigest()


def _rows_json(batch: pa.RecordBatch) -> bytes:
    """A batch's values as a JSON list of rows (timestamps as integers)."""
    cols = []
    for name in SCHEMA.names:
        col = batch.column(name)
        if pa.types.is_timestamp(col.type):
            col = col.cast(pa.int64())
        cols.append(col.to_pylist())
    return msgspec.json.encode(list(zip(*cols)))


def _split_by_date(table: pa.Table) -> list[tuple[str, pa.Table]]:
    """Contiguous runs of rows with the same UTC date of `published_at`."""
    ns = table.column("published_at").cast(pa.int64()).to_numpy() * 1000
    days = ns // _NS_PER_DAY
    import numpy as np

    cuts = [0, *(np.flatnonzero(np.diff(days)) + 1).tolist(), len(days)]
    out = []
    for a, b in zip(cuts, cuts[1:]):
        date = pc.strftime(table.column("published_at")[a], format="%Y-%m-%d").as_py()
        out.append((date, table.slice(a, b - a)))
    return out


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
