"""Stream fossils for training: sharded, shuffled, split across ranks and workers, resumable.

How the data is cut up (deterministic, from the files alone):

* A source is cut into *units*: byte ranges of shard files (`ShardSource`); a record
  belongs to the unit where its line starts. Units are small enough that there are at
  least 4 per slot.
* A *slot* is one (rank, worker): slot = rank * num_workers + worker, of
  S = world_size * num_workers (a worker is a DataLoader worker decoding NDJSON, or with
  the columnar cache one of the slots this process serves in the same turns). In epoch e the units are permuted with seed (seed, e) and
  slot s takes units s, s+S, s+2S, … of that permutation: every record goes to exactly one
  slot per epoch, and no slot reads another's bytes.
* A unit is read as *windows* of `shuffle_buffer` bytes (the records whose line starts in
  the window); each window is decoded at once (msgspec `decode_lines`) and emitted in a
  permutation seeded by (seed, epoch, unit, window). So the shuffle is: units in random
  order, records in random order within a window — memory stays flat (one window per
  worker plus the prefetched batches) however large the data.

The columnar cache: a `ShardSource` decodes each shard once into numpy arrays (states,
contexts and energies per (state, context) size, and per record the byte offset where its
line starts, its domain and its split), stored as .npy files under `<root>/.columnar/
<sha256 of the shard>/` and memory-mapped. A shard that changes has another digest, so
its stale arrays are never read (and are pruned). Batches are then cut from the arrays —
the same records, in the same order, at the same positions as decoding the NDJSON would
give (a window's records are those whose offset lies in it), so resuming and sharding are
unchanged; memory stays one window's gather per worker plus the page cache. Given a device
(`FossilLoader(device=)`) and a budget they fit, the records are instead copied there once
(`DeviceColumns`) and batches gathered there from the same row indices.

Resuming: a slot's position is [unit, window, row] — its `unit`-th unit of this epoch,
the `window`-th window of that unit, and `row` records of that window's permutation
already emitted. `FossilLoader.state_dict()` is {"epoch", "positions": {slot: position},
and the layout it is valid for (seed, rank, world_size, num_workers)}; a position is
recorded when a batch is *handed to the caller*, so a state saved after consuming batch b
resumes with the batch after b: nothing repeats and nothing is skipped. Resuming needs the
same files, seed, world_size and num_workers (checked). The state also keeps `turn`, the
slot whose batch the DataLoader's round-robin hands out next, so a resumed run yields the
very batches, in the very order, that the uninterrupted run would have.
"""

from __future__ import annotations

import collections
import gc
import hashlib
import json
import math
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Protocol

import msgspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scf.bus.errors import SCFError
from scf.bus.files import atomic_write

DEFAULT_WINDOW = 8 << 20  # bytes of NDJSON shuffled together (about 2-3k case118 fossils)
MAX_UNIT = 256 << 20
COLUMNAR_FORMAT = 1  # bump when the cached arrays change meaning
DECODE_CHUNK = 32 << 20  # bytes of a shard decoded at once while building its columns


class LoaderError(SCFError):
    pass


class NoFossils(LoaderError):
    """The source holds no fossil of the requested domain and split."""


class FossilRow(msgspec.Struct, gc=False):
    """The fields training reads; the decoder skips the rest of a Fossil line. Not tracked
    by the garbage collector (it holds no cycles), which keeps collections cheap."""

    fossil_id: str
    domain: str
    context: list[float]
    state: list[float]
    energy: float


_row_decoder = msgspec.json.Decoder(FossilRow)


def in_split(fossil_id: str, split: str | None) -> bool:
    """Whether a fossil belongs to `split`: "heldout" when its id ends in 0 (1 in 16), else "train"."""
    return split is None or (fossil_id[-1] == "0") == (split == "heldout")


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Unit:
    key: str  # the shard's name
    start: int  # position range [start, end) in the source's units (bytes for shards)
    end: int


class FossilSource(Protocol):
    """Where fossils come from. `ShardSource` reads NDJSON files; a FOSSILS-stream source
    implements the same four methods with stream sequences as positions."""

    def units(self, min_units: int) -> list[Unit]: ...

    def windows(self, unit: Unit, window: int) -> int: ...

    def read(self, unit: Unit, index: int, window: int) -> bytes: ...

    def lineage(self, hashes: bool = True) -> dict: ...


class ShardSource:
    """A directory of `*.ndjson` shards (uncompressed: units are byte ranges).

    `cache`: where decoded columns are kept (None: `<root>/.columnar`; False: never build
    them, batches decode the NDJSON as they go)."""

    def __init__(self, root: str | os.PathLike, cache: str | os.PathLike | None | bool = None) -> None:
        self.root = Path(root)
        self.cache = None if cache is False else Path(cache) if cache not in (None, True) else self.root / ".columnar"
        self._columns: dict[str, ShardColumns] = {}
        self._digests: dict[str, str] = {}
        if not self.root.is_dir():
            raise LoaderError(f"no shard directory at {self.root}: write shards with `scf fossils synth` or pass the right path")
        self.files = sorted(p.name for p in self.root.glob("*.ndjson"))
        if not self.files:
            raise LoaderError(f"{self.root} holds no *.ndjson shard: write shards with `scf fossils synth`")
        self.sizes = [(self.root / f).stat().st_size for f in self.files]

    def __repr__(self) -> str:
        return f"ShardSource({str(self.root)!r}, {len(self.files)} shards, {sum(self.sizes)} bytes)"

    def units(self, min_units: int) -> list[Unit]:
        total = sum(self.sizes)
        size = max(1, min(MAX_UNIT, math.ceil(total / (4 * max(1, min_units)))))
        return [
            Unit(name, a, min(a + size, n)) for name, n in zip(self.files, self.sizes) for a in range(0, n, size)
        ]

    def windows(self, unit: Unit, window: int) -> int:
        return max(1, math.ceil((unit.end - unit.start) / window))

    def read(self, unit: Unit, index: int, window: int) -> bytes:
        """The complete lines that start in [unit.start + index*window, …+window) ∩ unit."""
        lo = unit.start + index * window
        hi = min(lo + window, unit.end)
        with open(self.root / unit.key, "rb") as f:
            if lo > 0:
                f.seek(lo - 1)
                f.readline()  # skip the line that started before lo
            first = f.tell()
            if first >= hi:
                return b""
            data = f.read(hi - first)
            if data and not data.endswith(b"\n"):
                data += f.readline()  # finish the last line that starts before hi
        return data

    def lineage(self, hashes: bool = True) -> dict:
        """What the data was: shard names, sizes and (with `hashes`) sha256 of each."""
        shards = []
        for name, size in zip(self.files, self.sizes):
            entry: dict = {"name": name, "bytes": size}
            if hashes:
                entry["sha256"] = self.sha256(name)
            shards.append(entry)
        return {"kind": "shards", "root": str(self.root), "shards": shards}

    # ------------------------------------------------------------ the columnar cache

    def sha256(self, name: str) -> str:
        """The shard's digest; remembered in the cache's index against the file's size,
        mtime and inode, so an unchanged shard is hashed once."""
        path = self.root / name
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        index = self._index()
        known = index.get(name)
        if known and known.get("stamp") == stamp:
            return known["sha256"]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(4 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        if self.cache is not None:
            index[name] = {"stamp": stamp, "sha256": digest}
            try:
                self.cache.mkdir(parents=True, exist_ok=True)
                atomic_write(self.cache / "index.json", json.dumps(index, sort_keys=True).encode())
            except OSError:
                pass  # a read-only directory: hash again next time
        return digest

    def _index(self) -> dict:
        if self.cache is None:
            return {}
        try:
            return json.loads((self.cache / "index.json").read_text())
        except (OSError, ValueError):
            return {}

    def prepare(self) -> None:
        """Build the columns of every shard now (before DataLoader workers start, so that
        they only read them), and remove columns of shards no longer here."""
        if self.cache is None:
            return
        keep = {self.sha256(name) for name in self.files}
        for name in self.files:
            self.columns(name)
        if self.cache.is_dir():
            for d in self.cache.iterdir():
                if d.is_dir() and len(d.name) == 64 and d.name not in keep:
                    shutil.rmtree(d, ignore_errors=True)

    def columns(self, name: str) -> ShardColumns | None:
        """The shard's decoded columns (memory-mapped), built on first use; None without a cache."""
        if self.cache is None:
            return None
        cols = self._columns.get(name)
        if cols is not None:
            return cols
        digest = self.sha256(name)
        where = self.cache / digest
        cols = ShardColumns.load(where)
        if cols is None:
            cols = ShardColumns.build(self.root / name)
            try:
                cols.save(where)
                cols = ShardColumns.load(where) or cols
            except OSError:
                pass  # cannot write here: keep the arrays in memory for this process
        self._columns[name] = cols
        return cols


class ShardColumns:
    """One shard decoded: per record (in file order) the byte offset where its line
    starts, its domain (an index into `domains`), whether it is held out, and its row in
    its group's arrays; per group (records of one (state, context) size) the float32
    arrays state (n, d), context (n, m) and energy (n,). Lines that do not decode are not
    records (as when decoding the NDJSON)."""

    ARRAYS = ("offsets", "domain", "heldout", "group", "local")

    def __init__(self, offsets, domain, heldout, group, local, domains, states, contexts, energies) -> None:
        self.offsets, self.domain, self.heldout, self.group, self.local = offsets, domain, heldout, group, local
        self.domains, self.states, self.contexts, self.energies = domains, states, contexts, energies

    def __len__(self) -> int:
        return len(self.offsets)

    def code(self, domain: str) -> int:
        return self.domains.index(domain) if domain in self.domains else -1

    def span(self, lo: int, hi: int) -> tuple[int, int]:
        """The records whose line starts in [lo, hi): rows [i, j)."""
        i, j = np.searchsorted(self.offsets, (lo, hi))
        return int(i), int(j)

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(state, context, energy) arrays of records `rows` (one group) and their rows in them."""
        groups = self.group[rows]
        g = int(groups[0])
        if (groups != g).any():
            raise _ragged(self.states[g].shape[1], self.contexts[g].shape[1], self.domains[int(self.domain[rows[0]])], groups, self)
        return self.states[g], self.contexts[g], self.energies[g], self.local[rows]

    @classmethod
    def build(cls, path: Path) -> ShardColumns:
        offsets, domain, heldout, group, local = [], [], [], [], []
        domains: dict[str, int] = {}
        groups: dict[tuple[int, int], int] = {}
        parts: list[tuple[list, list, list]] = []
        base = 0
        with open(path, "rb") as f:
            while True:
                data = f.read(DECODE_CHUNK)
                if not data:
                    break
                if not data.endswith(b"\n"):
                    data += f.readline()
                rows, starts = _decode_with_offsets(data)
                for row, start in zip(rows, starts.tolist()):
                    shape = (len(row.state), len(row.context))
                    g = groups.setdefault(shape, len(groups))
                    if g == len(parts):
                        parts.append(([], [], []))
                    st, cx, en = parts[g]
                    offsets.append(base + start)
                    domain.append(domains.setdefault(row.domain, len(domains)))
                    heldout.append(row.fossil_id[-1:] == "0")
                    group.append(g)
                    local.append(len(en))
                    st.append(row.state)
                    cx.append(row.context)
                    en.append(row.energy)
                base += len(data)
        shapes = sorted(groups, key=groups.get)
        return cls(
            np.asarray(offsets, dtype=np.int64), np.asarray(domain, dtype=np.int16), np.asarray(heldout, dtype=bool),
            np.asarray(group, dtype=np.int16), np.asarray(local, dtype=np.int64), list(domains),
            [np.asarray(p[0], dtype=np.float32).reshape(-1, d) for p, (d, _) in zip(parts, shapes)],
            [np.asarray(p[1], dtype=np.float32).reshape(-1, m) for p, (_, m) in zip(parts, shapes)],
            [np.asarray(p[2], dtype=np.float32) for p in parts],
        )

    def save(self, where: Path) -> None:
        """Write the arrays as .npy files into `where`, atomically (a directory renamed into place)."""
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{where.name[:12]}-", dir=where.parent))
        try:
            for name in self.ARRAYS:
                np.save(tmp / f"{name}.npy", getattr(self, name))
            for g in range(len(self.states)):
                np.save(tmp / f"state-{g}.npy", self.states[g])
                np.save(tmp / f"context-{g}.npy", self.contexts[g])
                np.save(tmp / f"energy-{g}.npy", self.energies[g])
            meta = {"format": COLUMNAR_FORMAT, "domains": self.domains, "groups": len(self.states), "records": len(self)}
            (tmp / "meta.json").write_text(json.dumps(meta))
            try:
                os.replace(tmp, where)
            except OSError:
                if not (where / "meta.json").exists():  # another process put it there first: use theirs
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, where: Path) -> ShardColumns | None:
        try:
            meta = json.loads((where / "meta.json").read_text())
            if meta.get("format") != COLUMNAR_FORMAT:
                return None
            arrays = [np.load(where / f"{name}.npy", mmap_mode="r") for name in cls.ARRAYS]
            per = [[np.load(where / f"{kind}-{g}.npy", mmap_mode="r") for g in range(meta["groups"])] for kind in ("state", "context", "energy")]
        except (OSError, ValueError, KeyError):
            return None
        return cls(*arrays, list(meta["domains"]), *per)


def _decode_with_offsets(data: bytes) -> tuple[list[FossilRow], np.ndarray]:
    """The records of whole lines `data` and the offset where each one's line starts."""
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(buf == 10)
    starts = np.concatenate(([0], ends + 1))[: len(ends) + (0 if data.endswith(b"\n") else 1)]
    ends = np.concatenate((ends, [len(data)]))[: len(starts)]
    rows = _decode(data)
    if len(rows) == len(starts) and (ends > starts).all():
        return rows, starts
    rows, kept = [], []  # blank or bad lines: line by line
    for a, b in zip(starts.tolist(), ends.tolist()):
        line = data[a:b]
        if not line.strip():
            continue
        try:
            rows.append(_row_decoder.decode(line))
            kept.append(a)
        except msgspec.DecodeError:
            continue
    return rows, np.asarray(kept, dtype=np.int64)


def _ragged(d: int, m: int, domain: str, groups, cols: ShardColumns) -> LoaderError:
    return LoaderError(
        f"fossils of {domain} have {d} state / {m} context values, others in the same batch "
        f"{', '.join(f'{cols.states[g].shape[1]} / {cols.contexts[g].shape[1]}' for g in sorted(set(groups.tolist())) if cols.states[g].shape[1] != d or cols.contexts[g].shape[1] != m)}: "
        "pass domain= to read one domain"
    )


def as_source(source: FossilSource | str | os.PathLike) -> FossilSource:
    return ShardSource(source) if isinstance(source, (str, os.PathLike)) else source


# --------------------------------------------------------------------------- one slot's stream


@dataclass(frozen=True)
class _Plan:
    source: FossilSource
    domain: str | None
    seed: int
    window: int
    split: str | None

    def slot_units(self, epoch: int, slot: int, slots: int) -> list[tuple[int, Unit]]:
        units = self.source.units(slots)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(units))
        return [(int(i), units[i]) for i in order[slot::slots]]

    def windows(self, epoch: int, slot: int, slots: int, start=(0, 0, 0)):
        """The slot's windows from `start`, each as (kept rows in shuffled order, their
        indices in the window's permutation, (unit, window, rows in window, windows in unit))."""
        units = self.slot_units(epoch, slot, slots)
        k0, w0, r0 = start
        split = self.split
        for k in range(k0, len(units)):
            uid, unit = units[k]
            n_win = self.source.windows(unit, self.window)
            for w in range(w0 if k == k0 else 0, n_win):
                rows = _decode(self.source.read(unit, w, self.window))
                order = np.random.default_rng([self.seed, epoch, uid, w]).permutation(len(rows))
                first = r0 if (k, w) == (k0, w0) else 0
                shuffled = [rows[i] for i in order[first:].tolist()]
                if self.domain is None and split is None:
                    kept, index = shuffled, range(first, len(rows))
                else:
                    index = [
                        i for i, row in enumerate(shuffled, first)
                        if (self.domain is None or row.domain == self.domain) and in_split(row.fossil_id, split)
                    ]  # fmt: skip
                    kept = [shuffled[i - first] for i in index]
                yield kept, index, (k, w, len(rows), n_win)

    def rows(self, epoch: int, slot: int, slots: int, start=(0, 0, 0)) -> Iterator[tuple[FossilRow, tuple[int, int, int]]]:
        """(row, position after it) for the slot, from `start`; filtered rows are passed over."""
        for kept, index, where in self.windows(epoch, slot, slots, start):
            for row, i in zip(kept, index):
                yield row, _after(i, where)


def _after(i: int, where: tuple[int, int, int, int]) -> tuple[int, int, int]:
    """The position after row `i` of window `where` = (unit, window, rows, windows)."""
    k, w, n, n_win = where
    return (k, w, i + 1) if i + 1 < n else ((k, w + 1, 0) if w + 1 < n_win else (k + 1, 0, 0))


def _decode(data: bytes) -> list[FossilRow]:
    """The rows of a window. The collector is paused meanwhile: the thousands of float lists
    a window makes would trigger collections that find nothing (+25% decode rate)."""
    if not data:
        return []
    paused = gc.isenabled()
    gc.disable()
    try:
        return _row_decoder.decode_lines(data)
    except msgspec.DecodeError:  # a bad line: keep the good ones (ingest should have caught it)
        rows = []
        for line in data.splitlines():
            try:
                if line.strip():
                    rows.append(_row_decoder.decode(line))
            except msgspec.DecodeError:
                continue
        return rows
    finally:
        if paused:
            gc.enable()


def _slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def iterate_fossils(
    source: FossilSource | str | os.PathLike,
    *,
    domain: str | None = None,
    seed: int = 0,
    shuffle_buffer: int = DEFAULT_WINDOW,
    rank: int = 0,
    world_size: int = 1,
    state: dict | None = None,
    split: str | None = None,
) -> Iterator[FossilRow]:
    """One epoch of this process's share of the fossils, shuffled (see the module doc).

    Inside a DataLoader worker the share is that worker's slot. `state` is a
    `FossilLoader.state_dict()`: the epoch and this slot's position to resume from."""
    worker, workers = _slot()
    slot, slots = rank * workers + worker, world_size * workers
    epoch = state["epoch"] if state else 0
    start = tuple(state["positions"].get(str(slot), (0, 0, 0))) if state else (0, 0, 0)
    plan = _Plan(as_source(source), domain, seed, shuffle_buffer, split)
    for row, _ in plan.rows(epoch, slot, slots, start):
        yield row


# --------------------------------------------------------------------------- minibatches


class Batch(NamedTuple):
    state: torch.Tensor  # (B, state_dim) float32
    context: torch.Tensor  # (B, context_dim) float32
    energy: torch.Tensor  # (B,) float32


def _cuts(plan: _Plan, epoch: int, slot: int, slots: int, start, size: int) -> Iterator[tuple[list[tuple[ShardColumns, np.ndarray]], tuple[int, int, int]]]:
    """A slot's batches of one epoch from `start`, as row indices into the shards' cached
    columns: per batch the (columns, rows) pieces in batch order and the position after it.
    The windows' records, permutations and positions are those of the NDJSON path."""
    source = plan.source
    units = plan.slot_units(epoch, slot, slots)
    k0, w0, r0 = start
    pieces: list[tuple[ShardColumns, np.ndarray]] = []
    have, pos = 0, start
    for k in range(k0, len(units)):
        uid, unit = units[k]
        cols = source.columns(unit.key)
        code = cols.code(plan.domain) if plan.domain is not None else None
        n_win = source.windows(unit, plan.window)
        for w in range(w0 if k == k0 else 0, n_win):
            lo = unit.start + w * plan.window
            i, j = cols.span(lo, min(lo + plan.window, unit.end))
            n = j - i
            if n == 0:
                continue
            first = r0 if (k, w) == (k0, w0) else 0
            rows = np.random.default_rng([plan.seed, epoch, uid, w]).permutation(n)[first:] + i
            keep = np.ones(len(rows), dtype=bool)
            if code is not None:
                keep &= cols.domain[rows] == code
            if plan.split is not None:
                keep &= cols.heldout[rows] == (plan.split == "heldout")
            index = np.flatnonzero(keep) + first  # positions in the window's permutation
            rows = rows[keep]
            where = (k, w, n, n_win)
            at = 0
            while at < len(rows):
                take = min(size - have, len(rows) - at)
                pieces.append((cols, rows[at : at + take]))
                have += take
                at += take
                pos = _after(int(index[at - 1]), where)
                if have == size:
                    yield pieces, pos
                    pieces, have = [], 0
    if pieces:
        yield pieces, pos


def _round_robin(streams: list[Iterator]) -> Iterator:
    """The items of `streams` in turns, one from each, passing over those that have ended:
    the order in which a DataLoader hands out its workers' batches."""
    active = list(streams)
    while active:
        for it in list(active):
            try:
                yield next(it)
            except StopIteration:
                active.remove(it)


class DeviceColumns:
    """The records a loader reads (its domain and split), copied once onto one device: per
    (state, context) size a state (n, d), context (n, m) and energy (n,) tensor, and per
    shard each record's row in them (-1: not read). A batch is then gathered there from
    its row indices (`batch`): no per-batch copy of the data through the host. Built only
    when `nbytes` fits the loader's device budget (`FossilLoader`'s `device_budget`); the
    copy goes one shard at a time, so host memory holds one shard's records meanwhile."""

    def __init__(self, source: ShardSource, domain: str | None, split: str | None) -> None:
        """The layout only (rows, sizes, bytes); `to(device)` copies the records."""
        # per shard (by its columns' identity): the columns, each record's row in its size's
        # tensors (-1: not read), and per group the index of its size in `shapes`
        self.rows: dict[int, tuple[ShardColumns, np.ndarray, np.ndarray]] = {}
        self.picks: list[tuple[ShardColumns, int, int, np.ndarray, int]] = []  # (columns, group, size, local rows, first row)
        sizes: dict[tuple[int, int], int] = {}
        counts: list[int] = []
        for name in source.files:
            cols = source.columns(name)
            keep = _kept(cols, domain, split)
            rid = np.full(len(cols), -1, dtype=np.int64)
            size = np.empty(len(cols.states), dtype=np.int64)
            for g in range(len(cols.states)):
                z = size[g] = sizes.setdefault((cols.states[g].shape[1], cols.contexts[g].shape[1]), len(sizes))
                counts += [0] * (z + 1 - len(counts))
                sel = np.flatnonzero(keep & (cols.group == g))
                if len(sel):
                    rid[sel] = counts[z] + np.arange(len(sel))
                    self.picks.append((cols, g, z, np.asarray(cols.local[sel]), counts[z]))
                    counts[z] += len(sel)
            self.rows[id(cols)] = (cols, rid, size)
        self.shapes = sorted(sizes, key=sizes.get)
        self.counts = counts
        self.nbytes = sum(4 * n * (d + m + 1) for n, (d, m) in zip(counts, self.shapes))
        self.device: torch.device | None = None
        self.tensors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def to(self, device: str | torch.device) -> DeviceColumns:
        """Copy the records onto `device`, one shard's group at a time."""
        self.device = device = torch.device(device)
        self.tensors = [
            (torch.empty(n, d, device=device), torch.empty(n, m, device=device), torch.empty(n, device=device))
            for n, (d, m) in zip(self.counts, self.shapes)
        ]
        for cols, g, z, local, first in self.picks:
            for dst, src in zip(self.tensors[z], (cols.states[g], cols.contexts[g], cols.energies[g])):
                dst[first : first + len(local)].copy_(torch.from_numpy(np.ascontiguousarray(src[local])))
        return self

    def batch(self, pieces: list[tuple[ShardColumns, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch of (columns, rows) `pieces` gathered on the device (pieces of several sizes: LoaderError)."""
        ids, size = [], None
        for cols, rows in pieces:
            rid, sizes = self.rows[id(cols)][1:]
            groups = cols.group[rows]
            g = int(groups[0])
            if (groups != g).any():
                raise _ragged(cols.states[g].shape[1], cols.contexts[g].shape[1], cols.domains[int(cols.domain[rows[0]])], groups, cols)
            if size is not None and sizes[g] != size:
                raise _mixed({self.shapes[size], self.shapes[sizes[g]]})
            size = int(sizes[g])
            ids.append(rid[rows])
        index = torch.empty(sum(map(len, ids)), dtype=torch.int64, pin_memory=self.device.type == "cuda")
        np.concatenate(ids, out=index.numpy())
        index = index.to(self.device, non_blocking=True)  # from pinned memory: no host sync
        state, context, energy = self.tensors[size]
        return state.index_select(0, index), context.index_select(0, index), energy.index_select(0, index)


def _kept(cols: ShardColumns, domain: str | None, split: str | None) -> np.ndarray:
    """Which records of a shard a loader of `domain` and `split` reads."""
    keep = np.ones(len(cols), dtype=bool)
    if domain is not None:
        keep &= np.asarray(cols.domain) == cols.code(domain)
    if split is not None:
        keep &= np.asarray(cols.heldout) == (split == "heldout")
    return keep


def _mixed(shapes) -> LoaderError:
    listed = ", ".join(f"{d} / {m}" for d, m in sorted(shapes))
    return LoaderError(f"one batch would hold fossils of several sizes (state / context {listed}): pass domain= to read one domain")


class _BatchStream(IterableDataset):
    """Yields (state, context, energy, slot, position) batches of one epoch, per worker."""

    def __init__(self, plan: _Plan, epoch: int, rank: int, world_size: int, batch_size: int, positions: dict, turn: int) -> None:
        self.plan, self.epoch, self.rank, self.world_size = plan, epoch, rank, world_size
        self.batch_size, self.positions, self.turn = batch_size, positions, turn

    def __iter__(self):
        worker, workers = _slot()
        # worker w serves this rank's slot (w + turn) % workers: the DataLoader asks workers
        # round-robin from worker 0, so a resumed epoch continues with the slot whose turn it was
        slot, slots = self.rank * workers + (worker + self.turn) % workers, self.world_size * workers
        start = tuple(self.positions.get(str(slot), (0, 0, 0)))
        size, batch, dims, pos = self.batch_size, [], None, start
        for kept, index, where in self.plan.windows(self.epoch, slot, slots, start):
            j = 0
            while j < len(kept):
                take = min(size - len(batch), len(kept) - j)
                batch.extend(kept[j : j + take])
                j += take
                pos = _after(index[j - 1], where)
                if len(batch) == size:
                    dims = _check_dims(batch, dims)
                    yield (*_collate(batch), slot, pos)
                    batch = []
        if batch:
            _check_dims(batch, dims)
            yield (*_collate(batch), slot, pos)


def _stack(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], pin: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch from (state, context, energy arrays, rows) pieces, each row copied once,
    straight into the batch's tensors (page-locked with `pin`, ready for a non-blocking
    copy to the GPU); pieces of different sizes are a LoaderError."""
    shapes = {(p[0].shape[1], p[1].shape[1]) for p in parts}
    if len(shapes) > 1:
        raise _mixed(shapes)
    (d, m), n = shapes.pop(), sum(len(p[3]) for p in parts)
    out = (torch.empty(n, d, pin_memory=pin), torch.empty(n, m, pin_memory=pin), torch.empty(n, pin_memory=pin))
    views = [t.numpy() for t in out]
    at = 0
    for state, context, energy, rows in parts:
        k = len(rows)
        for src, dst in zip((state, context, energy), views):
            np.take(src, rows, axis=0, out=dst[at : at + k])
        at += k
    return out


def _check_dims(rows: list[FossilRow], dims: tuple[int, int] | None) -> tuple[int, int]:
    """The (state, context) sizes shared by `rows` (and by `dims`, from earlier batches)."""
    first = dims or (len(rows[0].state), len(rows[0].context))
    for row in rows[:1] if dims else rows:  # within a batch np.array finds ragged rows
        shape = (len(row.state), len(row.context))
        if shape != first:
            raise LoaderError(
                f"fossil {row.fossil_id} of {row.domain} has {shape[0]} state / {shape[1]} context values, "
                f"others {first[0]} / {first[1]}: pass domain= to read one domain"
            )
    return first


def _collate(rows: list[FossilRow]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        state = np.array([r.state for r in rows], dtype=np.float32)  # (B, d)
        context = np.array([r.context for r in rows], dtype=np.float32)  # (B, m)
    except ValueError:  # ragged: rows of several sizes in one batch
        _check_dims(rows, None)
        raise
    energy = np.array([r.energy for r in rows], dtype=np.float32)  # (B,)
    return torch.from_numpy(state), torch.from_numpy(context), torch.from_numpy(energy)


class FossilLoader:
    """Minibatches of (state, context, energy) over epochs; `state_dict()` to resume.

    `epochs=None` repeats forever (training counts steps). `num_workers=0` reads in this
    process (one slot per rank).

    With the columnar cache (`ShardSource`'s default) batches are cut in this process, the
    rank's `num_workers` slots served in the turns a DataLoader would give its workers (the
    same batches, order and `state_dict()`), each batch gathered by one of `gather_threads`
    threads (None: `num_workers`, else 2 when pinning, else 0: as it is asked for),
    `prefetch_factor` batches per thread ahead, straight into pinned memory with
    `pin_memory`. Without it, DataLoader workers decode the NDJSON.

    `device` (e.g. "cuda"): where the batches are wanted. When the records this loader
    reads take at most `device_budget` bytes there (None: a quarter of the device's free
    memory on CUDA, 1 GiB elsewhere; 0: never), they are copied onto it once
    (`DeviceColumns`) and each batch is gathered there from its row indices: nothing per
    batch through the host but the indices. Otherwise batches stay on the host (pinned for
    CUDA) and memory stays flat in the data. `resident` says which it was (None before the
    first iteration).

    `drop_last`: a slot's short last batch of an epoch is passed over (unless it is the
    slot's only batch of that epoch), so every batch has `batch_size` records, as a step
    captured in a CUDA graph or compiled for one shape wants; up to batch_size - 1 records
    per slot then sit out an epoch (others each epoch: the order is shuffled anew)."""

    def __init__(
        self,
        source: FossilSource | str | os.PathLike,
        *,
        domain: str | None = None,
        batch_size: int = 256,
        seed: int = 0,
        shuffle_buffer: int = DEFAULT_WINDOW,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        split: str | None = None,
        epochs: int | None = 1,
        state: dict | None = None,
        pin_memory: bool = False,
        prefetch_factor: int = 4,
        columnar: bool = True,
        device: str | torch.device | None = None,
        device_budget: int | None = None,
        gather_threads: int | None = None,
        drop_last: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise LoaderError(f"rank {rank} is outside world_size {world_size}: pass 0 <= rank < world_size")
        if split not in (None, "train", "heldout"):
            raise LoaderError(f"split {split!r} is unknown: use None, 'train' or 'heldout'")
        self.plan = _Plan(as_source(source), domain, seed, shuffle_buffer, split)
        self.batch_size, self.rank, self.world_size, self.num_workers = batch_size, rank, world_size, num_workers
        self.epochs, self.prefetch_factor = epochs, prefetch_factor
        self.device, self.device_budget = (torch.device(device) if device is not None else None), device_budget
        self.pin_memory = pin_memory or (self.device is not None and self.device.type == "cuda")
        self.gather_threads = (num_workers or (2 if self.pin_memory else 0)) if gather_threads is None else gather_threads
        self.drop_last = drop_last
        self.resident: bool | None = None
        self._on_device: DeviceColumns | None = None
        # batches from the shards' cached columns where the source keeps them (ShardSource)
        self.columnar = columnar and getattr(self.plan.source, "cache", None) is not None
        self.epoch, self.positions, self.turn = 0, {}, 0
        if state is not None:
            self.load_state_dict(state)

    @property
    def source(self) -> FossilSource:
        return self.plan.source

    def __iter__(self) -> Iterator[Batch]:
        if self.columnar:
            self.plan.source.prepare()  # decode once, here
        if self.resident is None:
            self._on_device = self._place()
            self.resident = self._on_device is not None
        while self.epochs is None or self.epoch < self.epochs:
            workers = max(1, self.num_workers)
            for state, context, energy, slot, pos in self._columnar_epoch() if self.columnar else self._decoding_epoch():
                if self.drop_last and len(energy) < self.batch_size and str(int(slot)) in self.positions:
                    continue  # the slot's short last batch of the epoch (not its only one): passed over
                self.positions[str(int(slot))] = [int(v) for v in pos]
                self.turn = (int(slot) - self.rank * workers + 1) % workers
                yield Batch(state, context, energy)
            self.epoch += 1
            self.positions, self.turn = {}, 0

    def _place(self) -> DeviceColumns | None:
        """The records on `device` when asked for and within the budget, else None."""
        if self.device is None or not self.columnar:
            return None
        budget = self.device_budget
        if budget is None:
            budget = torch.cuda.mem_get_info(self.device)[0] // 4 if self.device.type == "cuda" else 1 << 30
        if budget <= 0:
            return None
        plan = self.plan
        columns = DeviceColumns(plan.source, plan.domain, plan.split)
        return columns.to(self.device) if columns.nbytes <= budget else None

    def _decoding_epoch(self):
        """One epoch's (state, context, energy, slot, position), decoding the NDJSON in DataLoader workers (or none)."""
        stream = _BatchStream(self.plan, self.epoch, self.rank, self.world_size, self.batch_size, dict(self.positions), self.turn)
        extra = {"prefetch_factor": self.prefetch_factor, "persistent_workers": False} if self.num_workers else {}
        yield from DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory, **extra)

    def _columnar_epoch(self):
        """The same from the columnar cache, in this process: the rank's slots in the
        DataLoader's turns (worker w serves slot (w + turn) % workers, see `_BatchStream`),
        each batch gathered on the device (resident) or into host memory by `gather_threads`
        threads, `prefetch_factor` batches per thread ahead (none: as it is asked for)."""
        workers, slots = max(1, self.num_workers), self.world_size * max(1, self.num_workers)
        epoch, positions, size = self.epoch, dict(self.positions), self.batch_size

        def cuts(slot: int):
            for pieces, pos in _cuts(self.plan, epoch, slot, slots, tuple(positions.get(str(slot), (0, 0, 0))), size):
                yield pieces, slot, pos

        planned = _round_robin([cuts(self.rank * workers + (w + self.turn) % workers) for w in range(workers)])
        if self.resident:
            for pieces, slot, pos in planned:
                yield (*self._on_device.batch(pieces), slot, pos)
            return
        pin = self.pin_memory

        def gather(pieces):
            return _stack([cols.gather(rows) for cols, rows in pieces], pin)

        threads = self.gather_threads
        if not threads:
            for pieces, slot, pos in planned:
                yield (*gather(pieces), slot, pos)
            return
        ahead: collections.deque = collections.deque()
        with ThreadPoolExecutor(threads, thread_name_prefix="scf-loader") as pool:
            try:
                for pieces, slot, pos in planned:
                    ahead.append((pool.submit(gather, pieces), slot, pos))
                    if len(ahead) > threads * self.prefetch_factor:
                        done, slot, pos = ahead.popleft()
                        yield (*done.result(), slot, pos)
                while ahead:
                    done, slot, pos = ahead.popleft()
                    yield (*done.result(), slot, pos)
            finally:
                for done, _, _ in ahead:
                    done.cancel()

    def state_dict(self) -> dict:
        return {
            "format": 1,
            "epoch": self.epoch,
            "positions": {k: list(v) for k, v in self.positions.items()},
            "turn": self.turn,
            "seed": self.plan.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "shuffle_buffer": self.plan.window,
        }

    def load_state_dict(self, state: dict) -> None:
        layout = {"seed": self.plan.seed, "rank": self.rank, "world_size": self.world_size,
                  "num_workers": self.num_workers, "shuffle_buffer": self.plan.window}
        differ = {k: (state.get(k), v) for k, v in layout.items() if state.get(k) != v}
        if differ:
            what = ", ".join(f"{k} saved {a} now {b}" for k, (a, b) in differ.items())
            raise LoaderError(f"loader state was saved for another layout ({what}): resume with the same settings")
        self.epoch = int(state["epoch"])
        self.positions = {str(k): [int(v) for v in p] for k, p in state["positions"].items()}
        self.turn = int(state.get("turn", 0))


def stream_minibatches(source: FossilSource | str | os.PathLike, **kwargs) -> FossilLoader:
    """`FossilLoader(source, **kwargs)`: iterate it for `Batch(state, context, energy)`
    float32 tensors; keep it to call `state_dict()`."""
    return FossilLoader(source, **kwargs)


def load_arrays(source, *, domain: str | None = None, split: str | None = None, limit: int | None = None, seed: int = 0):
    """Up to `limit` records as numpy float32 arrays (state, context, energy), one pass."""
    loader = FossilLoader(source, domain=domain, split=split, seed=seed, batch_size=4096, epochs=1)
    parts, n = [], 0
    for batch in loader:
        parts.append(batch)
        n += len(batch.energy)
        if limit is not None and n >= limit:
            break
    if not parts:
        raise NoFossils(f"no {split or ''} fossils{' of ' + domain if domain else ''} in {loader.source}: check the domain and the data")
    cat = [torch.cat(t)[:limit].numpy() for t in zip(*parts)]
    return cat[0], cat[1], cat[2]
