"""The transparency log: an RFC 9162 Merkle tree over every archived event, stored as C2SP
tlog tiles, with signed checkpoints and inclusion / consistency proofs (docs/proofs.md).

    $SCF_HOME/proofs/tlog/
      tile/<L>/<N>[.p/<W>]    hash tiles (https://c2sp.org/tlog-tiles): 256 hashes of level 8L each
      order.bin               per leaf: the archived row it is (u16 stream code, u64 sequence)
      state.json              size, root, origin, per-stream positions, the watermark, late ranges
      checkpoints/<size>.note the signed checkpoints (C2SP signed notes), one per size signed
      .lock                   one writer at a time

The leaves are the archive's rows, each encoded as an *entry* (`entry_bytes`: canonical JSON
of the row and its stream). Their order — the one a rebuild from the archive reproduces:

    rows sorted by (t, stream name, stream sequence)

where t is the row's JetStream timestamp in microseconds, made non-decreasing within its
stream (a running maximum). The log appends in rounds: a round logs every archived row with
t < W, where the watermark W is a time before which no stream can still produce a row (for
a stream the archive trails: its last archived t; for a stream the archive holds whole: the
server's time from its stream info, less one second). Every round's rows come after all
earlier rounds' rows in that order, so the log is append-only and equals the sorted archive.
A row that arrives below the watermark anyway (a server clock stepped back by more than the
margin, a stream newly archived) is logged in the next round at t = W and recorded as a
*late range* in state.json and in the checkpoint events, so a rebuild still reproduces it.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import msgspec
import numpy as np

from scf.bus.errors import SCFError
from scf.projections import proofcheck as pc
from scf.projections.store import _fsync_dir

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
HASH = 32
ORDER_DTYPE = np.dtype([("stream", "<u2"), ("seq", "<u8")])
MARGIN_US = 1_000_000  # a caught-up stream's bound: the server's time less this
FAR_FUTURE = (1 << 62)


class TlogError(SCFError):
    """The transparency log cannot do what was asked (the message says why and what to do)."""


# --------------------------------------------------------------------------- proofs over nodes


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


class TreeProofs:
    """RFC 9162 §2.1 proof generation over `node(level, index)`: the hash of the complete
    subtree of 2**level leaves starting at leaf index << level (each O(log n) nodes)."""

    size: int

    def node(self, level: int, index: int) -> bytes:  # pragma: no cover - subclasses
        raise NotImplementedError

    def _range(self, lo: int, hi: int) -> bytes:
        n = hi - lo
        if n & (n - 1) == 0:
            level = n.bit_length() - 1
            return self.node(level, lo >> level)
        k = _split(n)
        return pc.node_hash(self._range(lo, lo + k), self._range(lo + k, hi))

    def _check(self, size: int) -> None:
        if size < 0 or size > self.size:
            raise TlogError(f"tree size {size} is beyond the log's size {self.size}")

    def root(self, size: int | None = None) -> bytes:
        size = self.size if size is None else size
        self._check(size)
        return pc.EMPTY_ROOT if size == 0 else self._range(0, size)

    def inclusion(self, index: int, size: int) -> list[bytes]:
        self._check(size)
        if not 0 <= index < size:
            raise TlogError(f"leaf {index} is not in a tree of size {size}")
        path, lo, hi = [], 0, size
        while hi - lo > 1:
            k = _split(hi - lo)
            if index < lo + k:
                path.append(self._range(lo + k, hi))
                hi = lo + k
            else:
                path.append(self._range(lo, lo + k))
                lo += k
        return path[::-1]

    def consistency(self, old: int, new: int) -> list[bytes]:
        self._check(new)
        if not 0 <= old <= new:
            raise TlogError(f"tree size {old} is not at most {new}")
        if old == 0 or old == new:
            return []
        path, lo, hi, m, whole = [], 0, new, old, True
        while True:
            n = hi - lo
            if m == n:
                if not whole:
                    path.append(self._range(lo, hi))
                break
            k = _split(n)
            if m <= k:
                path.append(self._range(lo + k, hi))
                hi = lo + k
            else:
                path.append(self._range(lo, lo + k))
                lo, m, whole = lo + k, m - k, False
        return path[::-1]


class MemoryTree(TreeProofs):
    """A tree held in memory (every level): tests, small logs, the audit's reference."""

    def __init__(self, leaves: Sequence[bytes] = ()) -> None:
        self.levels: list[list[bytes]] = [list(leaves)]
        self.size = len(leaves)
        while len(self.levels[-1]) > 1:
            b = self.levels[-1]
            self.levels.append([pc.node_hash(b[i], b[i + 1]) for i in range(0, len(b) - 1, 2)])

    def node(self, level: int, index: int) -> bytes:
        return self.levels[level][index]


# --------------------------------------------------------------------------- tiles


def tile_path(level: int, index: int, width: int = TILE_WIDTH) -> str:
    """C2SP tlog-tiles path of a hash tile: `tile/<L>/<N>` (N in x-prefixed groups of three
    digits, e.g. x001/x234/067) and `.p/<W>` for a partial tile of width W."""
    digits = f"{index:03d}"
    digits = "0" * (-len(digits) % 3) + digits
    groups = [digits[i : i + 3] for i in range(0, len(digits), 3)]
    n = "/".join([f"x{g}" for g in groups[:-1]] + [groups[-1]])
    path = f"tile/{level}/{n}"
    return path if width == TILE_WIDTH else f"{path}.p/{width}"


def _subtree_root(hashes: bytes) -> bytes:
    """Root of a complete subtree given its 2**k leaf-level hashes, concatenated."""
    level = [hashes[i : i + HASH] for i in range(0, len(hashes), HASH)]
    while len(level) > 1:
        level = [pc.node_hash(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


class TileTree(TreeProofs):
    """The tree stored as hash tiles under `root`, with the right edge (the incomplete tile of
    each tile level) in memory. Full tiles are written as they fill and never change."""

    def __init__(self, root: Path, size: int = 0) -> None:
        self.dir = Path(root)
        self.size = 0
        self.edge: list[bytearray] = [bytearray()]
        self._written: list[Path] = []
        self._cache: dict[tuple[int, int], bytes] = {}
        if size:
            self._load_edge(size)

    # ---------------------------------------------------------------- reading
    def _count(self, tlevel: int, size: int | None = None) -> int:
        """How many hashes of level 8*tlevel a tree of `size` has."""
        return (self.size if size is None else size) >> (TILE_HEIGHT * tlevel)

    def _read_tile(self, tlevel: int, index: int, need: int) -> bytes:
        key = (tlevel, index)
        got = self._cache.get(key)
        if got is not None and len(got) >= need * HASH:
            return got
        full = self.dir / tile_path(tlevel, index)
        data = b""
        for _ in range(3):  # a writer may replace a partial tile by a wider one (or the full tile) meanwhile
            try:
                data = full.read_bytes()
                break
            except FileNotFoundError:
                pass
            pdir = self.dir / (tile_path(tlevel, index) + ".p")
            try:
                widths = sorted(int(p.name) for p in pdir.iterdir() if p.name.isdigit() and int(p.name) >= need)
                if widths:
                    data = (pdir / str(widths[0])).read_bytes()
                break
            except FileNotFoundError:
                continue
        if len(data) < need * HASH:
            raise TlogError(
                f"tile {tile_path(tlevel, index)} is missing or short under {self.dir}: "
                f"rebuild the log from the archive (`scf proof rebuild`)"
            )
        if len(data) == TILE_WIDTH * HASH:
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = data
        return data

    def hashes(self, tlevel: int, start: int, count: int) -> bytes:
        """`count` consecutive hashes of level 8*tlevel from index `start` (within one tile)."""
        tindex, off = divmod(start, TILE_WIDTH)
        edge_index = self._count(tlevel) // TILE_WIDTH
        if tlevel < len(self.edge) and tindex == edge_index:
            data = bytes(self.edge[tlevel])
        else:
            data = self._read_tile(tlevel, tindex, off + count)
        return data[off * HASH : (off + count) * HASH]

    def node(self, level: int, index: int) -> bytes:
        tlevel, k = divmod(level, TILE_HEIGHT)
        hashes = self.hashes(tlevel, index << k, 1 << k)
        if len(hashes) != HASH << k:
            raise TlogError(f"node ({level}, {index}) is not in the stored tree: rebuild the log (`scf proof rebuild`)")
        return hashes if k == 0 else _subtree_root(hashes)

    def leaf(self, index: int) -> bytes:
        return self.node(0, index)

    def leaf_range(self, start: int, count: int) -> bytes:
        """The hashes of leaves [start, start + count), concatenated."""
        out = []
        while count > 0:
            n = min(count, TILE_WIDTH - start % TILE_WIDTH)
            out.append(self.hashes(0, start, n))
            start, count = start + n, count - n
        return b"".join(out)

    def _load_edge(self, size: int) -> None:
        self.size = size
        self.edge = []
        tlevel = 0
        while True:
            count = self._count(tlevel, size)
            if count == 0 and tlevel > 0:
                break
            w = count % TILE_WIDTH
            self.edge.append(bytearray(self._read_tile(tlevel, count // TILE_WIDTH, w)[: w * HASH]) if w else bytearray())
            if count < TILE_WIDTH:
                break
            tlevel += 1

    # ---------------------------------------------------------------- appending
    def append(self, leaf_hashes: bytes) -> None:
        """Append leaves given as concatenated 32-byte hashes."""
        pos, n = 0, len(leaf_hashes)
        while pos < n:
            e = self.edge[0]
            take = min(TILE_WIDTH * HASH - len(e), n - pos)
            e += leaf_hashes[pos : pos + take]
            pos += take
            self.size += take // HASH
            if len(e) == TILE_WIDTH * HASH:
                self._complete(0)

    def _complete(self, tlevel: int) -> None:
        data = bytes(self.edge[tlevel])
        index = self._count(tlevel) // TILE_WIDTH - 1
        self._write(tile_path(tlevel, index), data)
        self.edge[tlevel] = bytearray()
        if tlevel + 1 == len(self.edge):
            self.edge.append(bytearray())
        up = self.edge[tlevel + 1]
        up += _subtree_root(data)
        if len(up) == TILE_WIDTH * HASH:
            self._complete(tlevel + 1)

    def _write(self, rel: str, data: bytes) -> None:
        path = self.dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        self._written.append(path)

    def flush(self) -> None:
        """Write the partial tiles of the right edge and make every written tile durable."""
        for tlevel, e in enumerate(self.edge):
            w = len(e) // HASH
            if w:
                self._write(tile_path(tlevel, self._count(tlevel) // TILE_WIDTH, w), bytes(e))
        if len(self._written) > 16 and _syncfs(self.dir):
            pass  # Linux: one syncfs for the whole filesystem instead of a fsync per tile
        else:
            for p in self._written:
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            for d in {p.parent for p in self._written}:
                _fsync_dir(d)
        self._written.clear()

    def prune_partials(self) -> None:
        """Remove partial tiles other than the current edge's (after the state is saved)."""
        keep = set()
        for tlevel, e in enumerate(self.edge):
            if e:
                keep.add(self.dir / tile_path(tlevel, self._count(tlevel) // TILE_WIDTH, len(e) // HASH))
        tile = self.dir / "tile"
        if not tile.is_dir():
            return
        for pdir in tile.rglob("*.p"):
            for p in pdir.iterdir():
                if p not in keep:
                    p.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                pdir.rmdir()


def _syncfs(path: Path) -> bool:
    """syncfs(2) on the filesystem holding `path` (Linux); False where it is not available."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        return libc.syncfs(fd) == 0
    except AttributeError:
        return False
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- entries


class Entry(msgspec.Struct, frozen=True, array_like=False):
    """One archived row as a leaf's bytes (canonical JSON, keys in this order; times in
    microseconds since the epoch, UTC). `payload` is the event's data as JSON text."""

    stream: str
    seq: int
    subject: str
    type: str
    v: int | None
    id: str | None
    at: int | None
    source: str | None
    correlation_id: str | None
    causation_id: str | None
    kid: str | None
    signed: bool
    published_at: int
    headers: str | None
    payload: str


_entry_encoder = msgspec.json.Encoder()
_COLUMNS = ("seq", "subject", "type", "v", "id", "at", "source", "correlation_id", "causation_id", "kid", "signed", "published_at", "headers", "payload")


def entries(stream: str, table) -> list[bytes]:
    """Entry bytes of archive rows (a pyarrow Table or RecordBatch with the archive's schema)."""
    import pyarrow as pa

    cols = []
    for name in _COLUMNS:
        col = table.column(name)
        if pa.types.is_timestamp(col.type):
            col = col.cast(pa.int64())
        cols.append(col.to_pylist())
    enc = _entry_encoder.encode
    return [enc(Entry(stream, *row)) for row in zip(*cols)]


def leaf_hashes(items: Iterable[bytes]) -> bytes:
    sha = hashlib.sha256
    return b"".join([sha(b"\x00" + e).digest() for e in items])


# --------------------------------------------------------------------------- ordering


class StreamPos(msgspec.Struct, frozen=True):
    seq: int = 0  # last logged sequence
    t: int = 0  # its ordering time (µs)


class LateRange(msgspec.Struct, frozen=True):
    """Rows of `stream` with sequences in (after, upto] were logged at time `t` (they
    arrived below the watermark)."""

    stream: str
    after: int
    upto: int
    t: int


class State(msgspec.Struct, kw_only=True):
    origin: str
    size: int = 0
    root: str = base64.b64encode(pc.EMPTY_ROOT).decode()
    streams: list[str] = []  # stream codes of order.bin: index → name
    positions: dict[str, StreamPos] = {}
    watermark: int = 0
    late: list[LateRange] = []


@dataclass
class _Pending:
    """Rows of one stream read but not yet logged."""

    t: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    seq: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tables: list = field(default_factory=list)  # pyarrow tables, concatenated lazily
    done: bool = False  # the archive has no more rows of this stream


def _times(stream: str, seqs: np.ndarray, published_us: np.ndarray, prev_t: int, late: list[LateRange]) -> np.ndarray:
    t = np.maximum.accumulate(np.concatenate(([prev_t], published_us)))[1:]
    for r in late:
        if r.stream == stream:
            m = (seqs > r.after) & (seqs <= r.upto)
            if m.any():
                t = np.where(m, np.maximum(t, r.t), t)
    return t


class _Merge:
    """The k-way merge of the archive's streams in the log's order, from given positions."""

    def __init__(
        self, store, streams: Sequence[str], positions: dict[str, StreamPos], late: list[LateRange], batch_rows: int,
        hook: "_LateHook | None" = None,
    ) -> None:
        """With `hook`, rows read below its watermark are placed at the watermark and recorded."""
        self.store, self.late, self.batch_rows, self.hook = store, late, batch_rows, hook
        self.streams = sorted(streams)
        self.positions = {s: positions.get(s, StreamPos()) for s in self.streams}
        self.pending = {s: _Pending() for s in self.streams}
        self.iters = {s: self._batches(s, self.positions[s].seq) for s in self.streams}

    def _batches(self, stream: str, after: int) -> Iterator:
        import pyarrow.compute as pac
        import pyarrow.parquet as pq

        for f in self.store.files(stream):
            if f.last <= after:
                continue
            for batch in pq.ParquetFile(f.path).iter_batches(batch_size=self.batch_rows):
                if batch.column("seq")[0].as_py() <= after:
                    batch = batch.filter(pac.greater(batch.column("seq"), after))
                if batch.num_rows:
                    yield batch

    def _fill(self, stream: str) -> bool:
        p = self.pending[stream]
        batch = next(self.iters[stream], None)
        if batch is None:
            p.done = True
            return False
        import pyarrow as pa

        seqs = batch.column("seq").to_numpy().astype(np.int64)
        pub = batch.column("published_at").cast(pa.int64()).to_numpy()
        prev = int(p.t[-1]) if len(p.t) else self.positions[stream].t
        t = _times(stream, seqs, pub, prev, self.late)
        if self.hook is not None and self.hook.watermark and t[0] < self.hook.watermark:
            k = int(np.searchsorted(t, self.hook.watermark, "left"))
            after = int(p.seq[-1]) if len(p.seq) else self.positions[stream].seq
            self.hook.record(stream, after, int(seqs[k - 1]))
            t[:k] = self.hook.watermark
        p.t = np.concatenate((p.t, t))
        p.seq = np.concatenate((p.seq, seqs))
        p.tables.append(pa.Table.from_batches([batch]))
        return True

    def last_t(self, stream: str) -> int | None:
        """The ordering time of the stream's last archived row (None: the archive has none)."""
        files = self.store.files(stream)
        if not files:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        tab = pq.read_table(files[-1].path, columns=["seq", "published_at"])
        pub = tab.column("published_at").cast(pa.int64()).to_numpy()
        seqs = tab.column("seq").to_numpy()
        prev = self.positions[stream].t
        return int(_times(stream, seqs, pub, prev, self.late)[-1]) if len(pub) else prev

    def rounds(self, bound: int) -> Iterator[tuple[np.ndarray, np.ndarray, list[bytes], np.ndarray]]:
        """Yield (stream ranks, seqs, entries, times) chunks of the rows with t < bound, in order."""
        while True:
            for s in self.streams:
                if not len(self.pending[s].t) and not self.pending[s].done:
                    self._fill(s)
            # Rows below `cut` are all in hand: an unread row of stream s comes after its
            # pending rows, so its time is at least their last time.
            cut = bound
            for s in self.streams:
                p = self.pending[s]
                if not p.done and len(p.t):
                    cut = min(cut, int(p.t[-1]))
            taken: list[tuple[str, np.ndarray, np.ndarray, list]] = []
            for s in self.streams:
                p = self.pending[s]
                if not len(p.t):
                    continue
                k = int(np.searchsorted(p.t, cut, "left"))
                if k == 0:
                    continue
                import pyarrow as pa

                table = pa.concat_tables(p.tables) if len(p.tables) > 1 else p.tables[0]
                taken.append((s, p.t[:k], p.seq[:k], entries(s, table.slice(0, k))))
                rest = table.slice(k)
                p.tables = [rest] if rest.num_rows else []
                p.t, p.seq = p.t[k:], p.seq[k:]
                self.positions[s] = StreamPos(int(taken[-1][2][-1]), int(taken[-1][1][-1]))
            if taken:
                yield _order(self.streams, taken)
                continue
            if cut >= bound:
                return
            # Nothing below the cut: read more of the streams that hold it there.
            filled = False
            for s in self.streams:
                p = self.pending[s]
                if not p.done and len(p.t) and int(p.t[-1]) == cut:
                    self._fill(s)
                    filled = True
            if not filled:
                return


def _order(streams: list[str], taken: list[tuple[str, np.ndarray, np.ndarray, list]]):
    rank = {s: i for i, s in enumerate(streams)}
    t = np.concatenate([x[1] for x in taken])
    seq = np.concatenate([x[2] for x in taken])
    r = np.concatenate([np.full(len(x[1]), rank[x[0]], np.int64) for x in taken])
    ents = [e for x in taken for e in x[3]]
    perm = np.lexsort((seq, r, t))
    return r[perm], seq[perm], [ents[i] for i in perm], t[perm]


class _LateHook:
    """Records rows that arrive below the watermark as late ranges of the state."""

    def __init__(self, state: "State") -> None:
        self.state, self.watermark, self.count = state, state.watermark, 0

    def record(self, stream: str, after: int, upto: int) -> None:
        self.state.late.append(LateRange(stream, after, upto, self.watermark))
        self.count += upto - after


# --------------------------------------------------------------------------- the log


@dataclass
class SyncReport:
    appended: int
    size: int
    watermark: int
    late: int = 0

    def line(self) -> str:
        extra = f"; {self.late} rows arrived below the watermark (recorded as late ranges)" if self.late else ""
        return f"appended {self.appended} leaves: tree size {self.size}{extra}"


class TransparencyLog:
    """The log in `directory`, over the archive `store`. Open it with `with TransparencyLog(...)`
    (takes the writer lock) to sync; reading proofs needs no lock."""

    def __init__(self, directory: str | Path, store, *, origin: str | None = None) -> None:
        self.dir = Path(directory)
        self.store = store
        self.state_path = self.dir / "state.json"
        if self.state_path.exists():
            try:
                self.state = msgspec.json.decode(self.state_path.read_bytes(), type=State)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise TlogError(f"{self.state_path} is malformed ({exc}): rebuild the log (`scf proof rebuild`)") from None
            if origin and origin != self.state.origin:
                raise TlogError(f"the log at {self.dir} has origin {self.state.origin!r}, not {origin!r}: a log's origin never changes")
        else:
            self.state = State(origin=origin or "scf.local/tlog")
        self.tree = TileTree(self.dir, self.state.size)
        self._lock_fd: int | None = None

    # ---------------------------------------------------------------- locking
    def __enter__(self) -> "TransparencyLog":
        self.lock()
        return self

    def __exit__(self, *exc) -> None:
        self.unlock()

    def lock(self, wait: float = 30.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TlogError(f"the log at {self.dir} is busy (another `scf proof` or `scf run tlog` holds it): try again") from None
                time.sleep(0.05)
        self._lock_fd = fd
        # Re-read: another writer may have appended since we opened.
        if self.state_path.exists():
            self.state = msgspec.json.decode(self.state_path.read_bytes(), type=State)
        self.tree = TileTree(self.dir, self.state.size)
        self._check_order_file()

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---------------------------------------------------------------- order file
    @property
    def order_path(self) -> Path:
        return self.dir / "order.bin"

    def _check_order_file(self) -> None:
        want = self.state.size * ORDER_DTYPE.itemsize
        have = self.order_path.stat().st_size if self.order_path.exists() else 0
        if have < want:
            raise TlogError(f"{self.order_path} is shorter than the log: rebuild the log (`scf proof rebuild`)")
        if have > want:  # a crash after appending, before the state was saved
            os.truncate(self.order_path, want)

    def order(self) -> np.ndarray:
        if not self.order_path.exists() or self.state.size == 0:
            return np.zeros(0, ORDER_DTYPE)
        return np.memmap(self.order_path, ORDER_DTYPE, "r", shape=(self.state.size,))

    def find(self, stream: str, seq: int) -> int:
        """The leaf index of an archived row; TlogError when it is not logged (yet)."""
        if stream not in self.state.streams:
            raise TlogError(f"no row of stream {stream} is in the log yet: run `scf proof sync` (or wait for `scf run tlog`)")
        code = self.state.streams.index(stream)
        o = self.order()
        hits = np.flatnonzero((o["stream"] == code) & (o["seq"] == seq))
        if not len(hits):
            raise TlogError(f"{stream} seq {seq} is not in the log yet (size {self.state.size}): run `scf proof sync` and try again")
        return int(hits[0])

    def locate(self, index: int) -> tuple[str, int]:
        rec = self.order()[index]
        return self.state.streams[int(rec["stream"])], int(rec["seq"])

    # ---------------------------------------------------------------- appending
    def sync(self, bounds: dict[str, int | None] | None = None, *, watermark: int | None = None, batch_rows: int = 65_536) -> SyncReport:
        """Append every archived row below the watermark. `bounds`: stream → the time before
        which it can produce no new row (`bounds_from_bus`); without them (offline), each
        stream is bounded by its last archived row; `watermark` sets the bound itself (a
        rebuild). Call with the lock held."""
        if self._lock_fd is None:
            raise TlogError("sync needs the log's lock: use `with TransparencyLog(...) as log`")
        streams = sorted(set(self.store.streams()) | set(bounds or {}))
        with contextlib.ExitStack() as locks:
            for s in streams:  # compaction must not swap a stream's files while we read them
                with contextlib.suppress(FileNotFoundError):
                    locks.enter_context(self.store.lock(s, "maintain"))
            late = _LateHook(self.state)
            merge = _Merge(self.store, streams, self.state.positions, list(self.state.late), batch_rows, late)
            bound = FAR_FUTURE
            for s in streams:
                b = (bounds or {}).get(s)
                if b is None:  # bounded by its last archived row
                    last = merge.last_t(s)
                    if last is not None:
                        bound = min(bound, last)
                else:
                    bound = min(bound, int(b))
            if watermark is not None:
                bound = watermark
            bound = max(bound, self.state.watermark)
            code_of = np.array([self._code(s) for s in merge.streams], np.uint16)
            appended = 0
            order_fh = open(self.order_path, "ab")
            try:
                for ranks, seqs, ents, _ in merge.rounds(bound):
                    rec = np.zeros(len(ents), ORDER_DTYPE)
                    rec["stream"] = code_of[ranks]
                    rec["seq"] = seqs
                    self.tree.append(leaf_hashes(ents))
                    order_fh.write(rec.tobytes())
                    appended += len(ents)
                order_fh.flush()
                os.fsync(order_fh.fileno())
            finally:
                order_fh.close()
            self.tree.flush()
            self.state.positions = {**self.state.positions, **merge.positions}
            self.state.size = self.tree.size
            self.state.root = base64.b64encode(self.tree.root()).decode()
            if bound < FAR_FUTURE:
                self.state.watermark = max(self.state.watermark, bound)
            self._save_state()
            self.tree.prune_partials()
        return SyncReport(appended, self.state.size, self.state.watermark, late.count)

    def rebuild(self) -> SyncReport:
        """Throw the stored tree away and append again from the archive, up to the watermark
        the log had reached (same origin, same late ranges, same signed checkpoints); then
        `audit` says whether the archive reproduced every signed checkpoint. Lock held."""
        old = self.state
        shutil.rmtree(self.dir / "tile", ignore_errors=True)
        self.order_path.unlink(missing_ok=True)
        self.state = State(origin=old.origin, late=list(old.late))
        self._save_state()
        self.tree = TileTree(self.dir, 0)
        report = self.sync(watermark=old.watermark)
        self.state.watermark = old.watermark
        self._save_state()
        return report

    def restore(self, note: str, verifier_key: str, late: Sequence[LateRange] = ()) -> SyncReport:
        """Rebuild a log that lost its directory from the archive and its newest signed
        checkpoint (with the late ranges the checkpoint event carries): append exactly the
        checkpoint's leaves, check the root, keep the note. Lock held, log empty."""
        if self.state.size:
            raise TlogError(f"the log at {self.dir} is not empty: use `scf proof rebuild` to rebuild it in place")
        cp = pc.open_checkpoint(note, pc.parse_verifier_key(verifier_key))
        self.state = State(origin=cp.origin, late=list(late))
        # The live log's sizes are watermark boundaries: all rows with t < W. Find W for this
        # size: the time of the first row after it (none: everything).
        streams = sorted(self.store.streams())
        merge = _Merge(self.store, streams, {}, self.state.late, 65_536)
        seen, cut, prev = 0, FAR_FUTURE, None
        for _, _, ents, t in merge.rounds(FAR_FUTURE):
            if seen + len(ents) > cp.size:
                k = cp.size - seen
                cut = int(t[k])
                before = int(t[k - 1]) if k > 0 else prev
                if before is not None and before == cut:
                    raise TlogError(
                        f"checkpoint {cp.size} does not end at a time boundary of the archive: "
                        f"the archive differs from the log that signed it (`scf proof audit`)"
                    )
                break
            seen += len(ents)
            prev = int(t[-1]) if len(t) else prev
        report = self.sync(watermark=cut)
        if cut == FAR_FUTURE and prev is not None:  # the archive ends with the checkpoint
            self.state.watermark = prev + 1
            self._save_state()
        if self.state.size != cp.size or self.tree.root(cp.size) != cp.root:
            raise TlogError(
                f"the archive does not reproduce checkpoint {cp.size} (rebuilt {self.state.size} leaves, "
                f"root {'differs' if self.state.size >= cp.size else 'unknown'}): the archive lost or changed rows"
            )
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        (self.checkpoints_dir / f"{cp.size}.note").write_text(note)
        return report

    def _code(self, stream: str) -> int:
        if stream not in self.state.streams:
            self.state.streams.append(stream)
        return self.state.streams.index(stream)

    def _save_state(self) -> None:
        tmp = self.dir / ".state.json.tmp"
        with open(tmp, "wb") as fh:
            fh.write(msgspec.json.format(msgspec.json.encode(self.state)))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_path)
        _fsync_dir(self.dir)

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoints_dir(self) -> Path:
        return self.dir / "checkpoints"

    def sign_checkpoint(self, key, size: int | None = None) -> str:
        """The signed note of the checkpoint at `size` (default: the current size), saved
        under checkpoints/. Ed25519 is deterministic: signing again gives the same bytes."""
        size = self.state.size if size is None else size
        cp = pc.Checkpoint(self.state.origin, size, self.tree.root(size))
        body = cp.body()
        sig = base64.b64decode(key.sign(body.encode()))
        note = body + "\n" + pc.signature_line(self.state.origin, key.public_raw, sig)
        path = self.checkpoints_dir / f"{size}.note"
        if path.exists() and path.read_text() != note:
            old = pc.parse_checkpoint(path.read_text().split("\n\n")[0] + "\n")
            if old.root != cp.root:
                raise TlogError(f"the log's root at size {size} differs from the checkpoint signed before: the log or the archive was rewritten (`scf proof audit`)")
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_text(note)
            os.replace(tmp, path)
        return path.read_text()

    def checkpoint_note(self, size: int) -> str:
        path = self.checkpoints_dir / f"{size}.note"
        if not path.exists():
            sizes = ", ".join(str(s) for s in self.signed_sizes()[-5:]) or "none"
            raise TlogError(f"no checkpoint of size {size} was signed (the latest: {sizes}): use a size from `scf proof checkpoint`")
        return path.read_text()

    def signed_sizes(self) -> list[int]:
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(int(p.stem) for p in self.checkpoints_dir.glob("*.note") if p.stem.isdigit())

    # ---------------------------------------------------------------- proofs
    def inclusion_bundle(self, index: int, size: int | None = None) -> dict:
        """The offline-checkable proof that leaf `index` is in the signed checkpoint of `size`
        (default: the latest signed checkpoint)."""
        sizes = self.signed_sizes()
        if size is None:
            if not sizes or sizes[-1] <= index:
                raise TlogError(f"no signed checkpoint covers leaf {index} yet: run `scf proof checkpoint` first")
            size = sizes[-1]
        note = self.checkpoint_note(size)
        stream, seq = self.locate(index)
        rows = self.store.read(stream, min_seq=seq, max_seq=seq)
        if rows.num_rows != 1:
            raise TlogError(f"{stream} seq {seq} (leaf {index}) is missing from the archive: the archive lost a row (`scf proof audit`)")
        entry = entries(stream, rows)[0]
        if pc.leaf_hash(entry) != self.tree.leaf(index):
            raise TlogError(f"{stream} seq {seq} in the archive differs from the row the log recorded at leaf {index}: the archive was altered (`scf proof audit`)")
        return {
            "kind": "scf.proof.inclusion/v1",
            "checkpoint": note,
            "leaf_index": index,
            "tree_size": size,
            "entry": base64.b64encode(entry).decode(),
            "proof": [base64.b64encode(h).decode() for h in self.tree.inclusion(index, size)],
        }

    def events_bundle(self, indices: Sequence[int], size: int | None = None) -> dict:
        """Inclusion proofs of several leaves against one signed checkpoint: what a strike's
        JSON proof embeds so that a client verifies its events offline."""
        if not indices:
            raise TlogError("no events to prove")
        sizes = self.signed_sizes()
        if size is None:
            if not sizes or sizes[-1] <= max(indices):
                raise TlogError(f"no signed checkpoint covers leaf {max(indices)} yet: run `scf proof checkpoint` first")
            size = sizes[-1]
        bundles = [self.inclusion_bundle(i, size) for i in indices]
        return {
            "kind": "scf.proof.events/v1",
            "checkpoint": bundles[0]["checkpoint"],
            "tree_size": size,
            "events": [{k: b[k] for k in ("leaf_index", "entry", "proof")} for b in bundles],
        }

    def consistency_bundle(self, old: int, new: int) -> dict:
        return {
            "kind": "scf.proof.consistency/v1",
            "old": self.checkpoint_note(old),
            "new": self.checkpoint_note(new),
            "proof": [base64.b64encode(h).decode() for h in self.tree.consistency(old, new)],
        }

    # ---------------------------------------------------------------- audit
    def audit(self, batch_rows: int = 65_536) -> "AuditReport":
        """Recompute the log's leaves from the archive (in the log's order, from the start)
        and compare them, and every signed checkpoint, with what the log stored."""
        streams = sorted(set(self.store.streams()) | set(self.state.streams))
        merge = _Merge(self.store, streams, {}, self.state.late, batch_rows)
        size = self.state.size
        report = AuditReport(size=size)
        signed = [s for s in self.signed_sizes()]
        wanted = iter(signed)
        next_size = next(wanted, None)
        while next_size == 0:
            next_size = next(wanted, None)
        roots: dict[int, bytes] = {0: pc.EMPTY_ROOT}
        compact = CompactRange()
        i = 0
        for ranks, seqs, ents, _ in merge.rounds(FAR_FUTURE):
            n = min(len(ents), max(0, size - i))
            if n == 0:
                break
            hashes = leaf_hashes(ents[:n])
            if report.first_bad is None:
                stored = self.tree.leaf_range(i, n)
                if stored != hashes:
                    j = next(k for k in range(n) if stored[k * HASH : (k + 1) * HASH] != hashes[k * HASH : (k + 1) * HASH])
                    stream, seq = self.locate(i + j)
                    report.first_bad = i + j
                    report.detail = (
                        f"leaf {i + j}: the log recorded {stream} seq {seq}; the archive's row at that place "
                        f"({streams[int(ranks[j])]} seq {int(seqs[j])}) hashes differently"
                    )
            for k in range(n):
                compact.append(hashes[k * HASH : (k + 1) * HASH])
                while next_size is not None and compact.size == next_size:
                    roots[next_size] = compact.root()
                    next_size = next(wanted, None)
            i += n
        if i < size and report.first_bad is None:
            stream, seq = self.locate(i)
            report.first_bad = i
            report.detail = f"the archive holds only {i} of the log's {size} leaves: {stream} seq {seq} onwards is missing"
        for s in signed:
            cp = pc.parse_checkpoint(self.checkpoint_note(s).split("\n\n")[0] + "\n")
            if roots.get(s) == cp.root:
                report.checkpoints_ok += 1
            else:
                report.checkpoints_bad.append(s)
        return report


class CompactRange:
    """The roots of the complete subtrees of a growing tree's right edge: the root of any
    prefix in O(log n) memory (RFC 9162's MTH, computed while streaming leaves)."""

    def __init__(self) -> None:
        self.stack: list[tuple[int, bytes]] = []
        self.size = 0

    def append(self, h: bytes) -> None:
        size, cur = 1, h
        while self.stack and self.stack[-1][0] == size:
            cur, size = pc.node_hash(self.stack.pop()[1], cur), size * 2
        self.stack.append((size, cur))
        self.size += 1

    def root(self) -> bytes:
        if not self.stack:
            return pc.EMPTY_ROOT
        cur = self.stack[-1][1]
        for _, h in reversed(self.stack[:-1]):
            cur = pc.node_hash(h, cur)
        return cur


@dataclass
class AuditReport:
    size: int
    first_bad: int | None = None
    detail: str = ""
    checkpoints_ok: int = 0
    checkpoints_bad: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.first_bad is None and not self.checkpoints_bad

    def lines(self) -> list[str]:
        if self.ok:
            return [f"the archive reproduces all {self.size} leaves and the {self.checkpoints_ok} signed checkpoints"]
        out = []
        if self.first_bad is not None:
            out.append(f"MISMATCH at {self.detail}")
        if self.checkpoints_bad:
            out.append(f"signed checkpoints the archive does not reproduce: sizes {', '.join(map(str, self.checkpoints_bad[:10]))}")
        return out


# --------------------------------------------------------------------------- bounds from the server


async def bounds_from_bus(bus, store, streams: Iterable[str]) -> dict[str, int | None]:
    """Each archived stream's bound (µs): a stream the archive holds whole can produce no row
    before the server's time (its stream info's `ts`) less a margin; one the archive trails is
    bounded by its next message, at or after its last archived row (None: ask the archive);
    an empty stream the archive has never seen, by the server's time."""
    out: dict[str, int | None] = {}
    for s in streams:
        try:
            reply = await bus.nc.request(f"$JS.API.STREAM.INFO.{s}", b"", timeout=5.0)
            info = json.loads(reply.data)
        except Exception as exc:  # noqa: BLE001 - a missing stream or a timeout: this stream stays offline-bounded
            raise TlogError(f"cannot read stream {s}'s info ({exc}): is the server up (`scf server status`)?") from None
        if "error" in info:
            continue  # the stream no longer exists: nothing more can come
        last = int(info["state"].get("last_seq", 0))
        server_now = _rfc3339_us(info.get("ts"))
        if store.position(s) >= last and server_now is not None:
            out[s] = server_now - MARGIN_US
        else:
            out[s] = None
            if not store.files(s):  # nothing archived yet: its first message bounds it
                first = _rfc3339_us(info["state"].get("first_ts"))
                out[s] = first if first is not None else 0
    return out


def _rfc3339_us(text: str | None) -> int | None:
    if not text or text.startswith("0001-"):
        return None
    import datetime as dt

    main, _, frac = text.rstrip("Z").partition(".")
    base = dt.datetime.fromisoformat(main).replace(tzinfo=dt.timezone.utc)
    us = int((frac + "000000")[:6]) if frac else 0
    return int(base.timestamp()) * 1_000_000 + us


# --------------------------------------------------------------------------- the service: settings, keys, publishing

DEFAULT_KEY = "tlog"


def log_dir(settings) -> Path:
    return settings.path("proofs", "tlog")


def log_key(settings, name: str = DEFAULT_KEY, *, create: bool = True):
    """The log's signing key `$SCF_HOME/keys/<name>.key`, created on first use."""
    from scf.bus.signing import SigningKey

    path = Path(name) if Path(name).suffix == ".key" else settings.keys_dir / f"{name}.key"
    if not path.exists() and create and path.parent == settings.keys_dir:
        SigningKey.generate(path.stem).save(settings.keys_dir)
    return SigningKey.load(path)


def open_log(settings, archive_dir: str | Path | None = None, key=None) -> TransparencyLog:
    from scf.projections.archive import archive_root
    from scf.projections.store import ArchiveStore

    directory = log_dir(settings)
    origin = None
    if not (directory / "state.json").exists():
        key = key or log_key(settings)
        origin = f"scf.local/tlog/{key.kid[:8]}"
    return TransparencyLog(directory, ArchiveStore(archive_root(settings, archive_dir)), origin=origin)


def verifier_key_of(log: TransparencyLog, key) -> str:
    return pc.verifier_key(log.state.origin, key.public_raw)


def checkpoint_event(log: TransparencyLog, note: str, key, source: str):
    from scf.bus import events as ev

    cp = pc.parse_checkpoint(note.split("\n\n")[0] + "\n")
    data = ev.LogCheckpoint(
        origin=cp.origin,
        size=cp.size,
        root=base64.b64encode(cp.root).decode(),
        note=note,
        verifier_key=verifier_key_of(log, key),
        late=[ev.LateRows(r.stream, r.after, r.upto, r.t) for r in log.state.late],
    )
    return ev.ProofCheckpoint.new(data, source=source)


@dataclass
class CheckpointResult:
    sync: SyncReport
    note: str
    published: str  # "new" | "duplicate" | "not published"

    def line(self) -> str:
        return f"{self.sync.line()}; checkpoint {self.sync.size} signed ({self.published})"


async def checkpoint(settings, bus=None, *, archive_dir=None, key_name: str = DEFAULT_KEY, publish: bool = True) -> CheckpointResult:
    """Sync the log (bounded by the server's streams when `bus` is given), sign a checkpoint
    of its size and publish it as a `proof.checkpoint` event (once per size)."""
    import asyncio

    from scf.projections.archive import archive_settings, archived_streams

    key = log_key(settings, key_name)
    log = open_log(settings, archive_dir, key)
    bounds = None
    if bus is not None:
        bounds = await bounds_from_bus(bus, log.store, archived_streams(archive_settings(settings)))

    def work() -> tuple[SyncReport, str]:
        with log:
            report = log.sync(bounds)
            return report, log.sign_checkpoint(key)

    report, note = await asyncio.to_thread(work)
    status = "not published"
    if publish and bus is not None:
        once = await bus.publish_once(checkpoint_event(log, note, key, bus.source))
        if once.status == "conflict":
            raise TlogError(
                f"a different checkpoint of size {report.size} was already published for {log.state.origin}: "
                f"the log forked or was rebuilt differently (`scf proof audit`)"
            )
        status = once.status
    return CheckpointResult(report, note, status)


async def restore_from_bus(settings, bus, *, archive_dir=None, key_name: str = DEFAULT_KEY) -> SyncReport:
    """`scf proof rebuild --from-bus`: the log directory is gone; rebuild it from the archive
    and the newest `proof.checkpoint` event, whose note must verify with this host's log key."""
    import asyncio

    from scf.bus import codec
    from scf.bus import events as ev

    key = log_key(settings, key_name, create=False)
    try:
        msg = await bus.js.get_last_msg("PROOFS", "proof.checkpoint.>")
    except Exception as exc:  # noqa: BLE001 - nats-py raises several kinds for "no message"
        raise TlogError(f"no proof.checkpoint event on PROOFS ({exc}): nothing to restore from; start a new log with `scf proof checkpoint`") from None
    event = codec.Codec([ev.ProofCheckpoint]).decode(msg.data)
    mine = verifier_key_of_origin(event.data.origin, key)
    if event.data.verifier_key != mine:
        raise TlogError(f"the newest checkpoint on PROOFS was signed by {event.data.verifier_key.split('+')[0]}, not by this host's log key {key_name}: restore on the host that holds its key")
    from scf.projections.archive import archive_root
    from scf.projections.store import ArchiveStore

    log = TransparencyLog(log_dir(settings), ArchiveStore(archive_root(settings, archive_dir)))
    late = [LateRange(r.stream, r.after, r.upto, r.t) for r in event.data.late]

    def work() -> SyncReport:
        with log:
            return log.restore(event.data.note, mine, late)

    return await asyncio.to_thread(work)


def verifier_key_of_origin(origin: str, key) -> str:
    return pc.verifier_key(origin, key.public_raw)


async def run_tlog(settings, *, interval: float = 60.0, archive_dir=None, key_name: str = DEFAULT_KEY, stop=None) -> None:
    """`scf run tlog`: sync, sign and publish a checkpoint every `interval` seconds (only
    when the log grew), until SIGTERM / SIGINT / `stop`."""
    import asyncio
    import logging

    from scf.bus.client import Bus
    from scf.bus.runner import run_all

    log = logging.getLogger("scf.tlog")
    bus = await Bus.connect(settings, "scf-tlog")

    async def loop(stop_ev: asyncio.Event) -> None:
        last = -1
        while not stop_ev.is_set():
            try:
                result = await checkpoint(settings, bus, archive_dir=archive_dir, key_name=key_name)
                if result.sync.size != last:
                    last = result.sync.size
                    log.info("%s", result.line())
            except SCFError as exc:  # a busy log or archive, a rewritten archive: said once per round, retried
                log.warning("tlog: %s", exc)
            except (OSError, ValueError) as exc:  # a full disk, an unreadable Parquet file (pyarrow's errors are these)
                log.warning("tlog: cannot read the archive or write the log (%s): retrying next round", exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop_ev.wait(), interval)

    await run_all(bus, [loop], stop)


# --------------------------------------------------------------------------- finding an event


def find_event(log: TransparencyLog, ref: str) -> int:
    """The leaf index of an event: `STREAM:SEQ`, or an event id looked up in the archive."""
    stream, sep, seq = ref.partition(":")
    if sep and seq.isdigit() and stream.isupper():
        return log.find(stream, int(seq))
    import duckdb

    root = log.store.root
    files = [str(f.path) for f in log.store.all_files()]
    if not files:
        raise TlogError(f"event {ref} is not in the archive at {root} (it is empty)")
    con = duckdb.connect()
    try:
        rows = con.execute(
            "SELECT stream, seq FROM read_parquet(?, hive_partitioning = true) WHERE id = ? ORDER BY stream, seq",
            [files, ref],
        ).fetchall()
    finally:
        con.close()
    if not rows:
        raise TlogError(f"no event with id {ref} in the archive at {root}: check the id (or pass STREAM:SEQ), or wait for the archive")
    return log.find(rows[0][0], int(rows[0][1]))
