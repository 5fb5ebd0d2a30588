"""Transparency-log benchmarks (issue 15): the numbers the issue measures, in one run.

    python benchmarks/bench_tlog.py [--leaves 10000000] [--rows 200000]

1. leaves appended per second from a real archive (`TransparencyLog.sync`: Parquet read,
   entry encoding, SHA-256 leaf hashes, C2SP tiles written and fsynced) over `rows` archived
   events of the standard sample mix, against the archive's own ingest rate measured in
   the same run (`ArchiveStore.append` of the same rows: Arrow conversion, zstd Parquet,
   fsync) — the log must keep up: ratio ≥ 1;
2. a tree of `leaves` synthetic leaf hashes appended to tiles (the tree part alone), then
   inclusion and consistency proof generation at that size: time per proof (mean over 200
   random proofs, each from a cold reopen of the tiles every 50 proofs) and proof size.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scf.projections import proofcheck as pc  # noqa: E402
from scf.projections import sample, tlog  # noqa: E402
from scf.projections.store import ArchiveStore  # noqa: E402


def bench_sync(rows: int, work: Path) -> dict:
    items = []
    for it in sample.history(10_000, seed=1):
        items.append(it)
        if len(items) >= rows:
            break
    t = time.perf_counter()
    store = ArchiveStore(work / "archive")
    sample.write_archive(store, items)
    archive_s = time.perf_counter() - t
    with tlog.TransparencyLog(work / "tlog", store, origin="bench/log") as log:
        t = time.perf_counter()
        log.sync(watermark=tlog.FAR_FUTURE)
        sync_s = time.perf_counter() - t
    n = log.state.size
    return {"rows": n, "archive_rate": n / archive_s, "log_rate": n / sync_s}


def bench_tree(leaves: int, work: Path) -> dict:
    d = work / "tree"
    tree = tlog.TileTree(d)
    chunk = 1 << 16
    t = time.perf_counter()
    hash_s = 0.0
    for start in range(0, leaves, chunk):
        n = min(chunk, leaves - start)
        h0 = time.perf_counter()
        data = tlog.leaf_hashes(i.to_bytes(8, "big") for i in range(start, start + n))
        hash_s += time.perf_counter() - h0
        tree.append(data)
        if (start // chunk) % 16 == 15:
            tree.flush()
    tree.flush()
    append_s = time.perf_counter() - t
    root = tree.root()
    rng = random.Random(1)
    inc_t, inc_b, con_t, con_b = [], [], [], []
    for k in range(200):
        if k % 50 == 0:
            tree = tlog.TileTree(d, leaves)  # cold: nothing cached
        i = rng.randrange(leaves)
        t = time.perf_counter()
        proof = tree.inclusion(i, leaves)
        inc_t.append(time.perf_counter() - t)
        inc_b.append(32 * len(proof))
        pc.verify_inclusion(i, leaves, pc.leaf_hash(i.to_bytes(8, "big")), proof, root)
        old = rng.randrange(1, leaves)
        t = time.perf_counter()
        cproof = tree.consistency(old, leaves)
        con_t.append(time.perf_counter() - t)
        con_b.append(32 * len(cproof))
    disk = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    files = sum(1 for p in d.rglob("*") if p.is_file())
    return {
        "leaves": leaves, "append_rate": leaves / append_s, "append_rate_without_hashing": leaves / (append_s - hash_s),
        "inclusion_ms": 1000 * statistics.mean(inc_t), "inclusion_bytes": max(inc_b),
        "consistency_ms": 1000 * statistics.mean(con_t), "consistency_bytes": max(con_b),
        "disk_mb": disk / 2**20, "files": files,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--leaves", type=int, default=10_000_000)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dir", default=None, help="working directory (default: a temporary one)")
    a = ap.parse_args()
    work = Path(a.dir or tempfile.mkdtemp(prefix="bench-tlog-"))
    try:
        s = bench_sync(a.rows, work)
        print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}")
        print(f"sync from the archive: {s['rows']} rows; archive ingest {s['archive_rate']:,.0f} rows/s; "
              f"log {s['log_rate']:,.0f} leaves/s; ratio log/archive {s['log_rate'] / s['archive_rate']:.2f}x")
        t = bench_tree(a.leaves, work)
        print(f"tree of {t['leaves']:,} leaves: append {t['append_rate']:,.0f} leaves/s "
              f"({t['append_rate_without_hashing']:,.0f}/s without the leaf hashing); {t['disk_mb']:.0f} MiB in {t['files']} tile files")
        print(f"inclusion proof: {t['inclusion_ms']:.2f} ms, {t['inclusion_bytes']} bytes; "
              f"consistency proof: {t['consistency_ms']:.2f} ms, {t['consistency_bytes']} bytes (mean of 200, cold every 50)")
    finally:
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
