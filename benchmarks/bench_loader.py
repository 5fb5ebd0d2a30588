"""Fossil loader throughput against raw msgspec decoding, and its memory as the data grows.

    python benchmarks/bench_loader.py                      # case118, 20k/40k/80k fossils
    python benchmarks/bench_loader.py --sizes 100000,400000 --workers 2

For each size: shards of realistic case118 fossils are written (a few hundred synthesized
observations re-timestamped, so every line is a distinct fossil with its own content id);
then, each in a fresh process so peak RSS is its own,
  raw    — read every shard and `msgspec.json.Decoder(Fossil).decode_lines` it;
  loader — one epoch of `FossilLoader` (window shuffle, float32 tensors of batch_size),
           from the shards' columnar cache (built first, timed apart as `build_s`: the
           one-off decode) or, with `--columnar off`, decoding the NDJSON as it goes;
           `--gather-threads` for the host gather; `--device cpu` keeps the records in a
           `DeviceColumns` copy (in RAM here) and gathers from it, `--device meta` measures
           only the host's share of that path (row indices; the gathers cost nothing on
           "meta"), what the training thread pays per batch when the data sits on a GPU.
Prints a table and one JSON line per size. Goal: loader ≥ 0.7× raw records/s, and peak RSS
flat as the data grows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_shards(out: Path, domain: str, n: int, shard_size: int, seed: int = 0) -> int:
    import msgspec
    import numpy as np

    from scf import domains
    from scf.domains.fossils import SHARD_PATTERN, to_fossil

    d = domains.get(domain)
    base = d.synthesize(np.random.default_rng(seed), 256)
    start = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    encoder = msgspec.json.Encoder()
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for k, first in enumerate(range(0, n, shard_size)):
        buf = bytearray()
        for i in range(first, min(n, first + shard_size)):
            encoder.encode_into(to_fossil(d, base[i % len(base)], start + i * d.sample_interval, f"synth:{domain}"), buf, -1)
            buf += b"\n"
        (out / SHARD_PATTERN.format(k)).write_bytes(buf)
        total += len(buf)
    return total


def peak_rss_mb() -> tuple[float, float]:
    """(this process, its largest child) peak RSS in MB (Linux reports KiB)."""
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    )


def run_raw(shards: Path) -> dict:
    import msgspec

    from scf.bus.events import Fossil

    decoder = msgspec.json.Decoder(Fossil)
    t0, n, size = time.perf_counter(), 0, 0
    for path in sorted(shards.glob("*.ndjson")):
        data = path.read_bytes()
        size += len(data)
        n += len(decoder.decode_lines(data))
    return {"records": n, "bytes": size, "seconds": time.perf_counter() - t0}


def run_loader(shards: Path, domain: str, batch: int, workers: int, columnar: bool = True, device: str | None = None,
               gather_threads: int | None = None) -> dict:
    from scf.ml.loader import FossilLoader

    loader = FossilLoader(shards, domain=domain, batch_size=batch, num_workers=workers, epochs=1, columnar=columnar,
                          device=device or None, gather_threads=gather_threads)
    size = sum(p.stat().st_size for p in shards.glob("*.ndjson"))
    t0 = time.perf_counter()
    if columnar:
        loader.source.prepare()  # decoded once (a no-op when the cache is there)
    t1, n = time.perf_counter(), 0
    batches = iter(loader)
    first = next(batches)  # (with --device: the records copied there first, timed apart as place_s)
    t2, n = time.perf_counter(), first.energy.shape[0]
    for b in batches:
        n += b.energy.shape[0]
    seconds = (time.perf_counter() - t2) * n / max(1, n - first.energy.shape[0])  # the first batch's share at the rate of the rest
    return {"records": n, "bytes": size, "seconds": seconds, "build_s": t1 - t0, "place_s": t2 - t1, "resident": loader.resident}


def child(args) -> None:
    """Run one measurement in this (fresh) process and print it as JSON."""
    if args.child == "raw":
        result = run_raw(Path(args.dir))
    else:
        result = run_loader(Path(args.dir), args.domain, args.batch, args.workers, args.columnar == "on", args.device,
                            args.gather_threads)
    result["rss_mb"], result["child_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def measure(kind: str, shards: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--dir", str(shards), "--domain", args.domain,
           "--batch", str(args.batch), "--workers", str(args.workers), "--columnar", args.columnar, "--device", args.device]
    if args.gather_threads is not None:
        cmd += ["--gather-threads", str(args.gather_threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="20000,40000,80000", help="fossil counts, comma-separated")
    p.add_argument("--domain", default="grid:case118")
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: in-process)")
    p.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best is kept")
    p.add_argument("--columnar", choices=["on", "off"], default="on", help="batches from the columnar cache (on) or the NDJSON (off)")
    p.add_argument("--device", default="", help="'' (batches on the host), cpu or meta (the records in a DeviceColumns copy there)")
    p.add_argument("--gather-threads", type=int, default=None, help="host gather threads (default: the loader's)")
    p.add_argument("--child", choices=["raw", "loader"], help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    print(f"{'fossils':>8} {'MB':>7} {'raw rec/s':>10} {'raw MB/s':>9} {'loader rec/s':>12} {'loader MB/s':>11} {'ratio':>6} {'loader RSS MB':>13} {'worker RSS MB':>13}")
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            shards = Path(tmp) / f"n{n}"
            write_shards(shards, args.domain, n, args.shard_size)
            raw = min((measure("raw", shards, args) for _ in range(args.repeat)), key=lambda r: r["seconds"])
            builds = [measure("loader", shards, args) for _ in range(args.repeat)]  # the first run builds the cache
            loader = min(builds, key=lambda r: r["seconds"])
            assert raw["records"] == loader["records"] == n, (raw, loader)
            mb = raw["bytes"] / 1e6
            row = {
                "fossils": n,
                "mb": round(mb, 1),
                "raw_records_per_s": round(n / raw["seconds"]),
                "raw_mb_per_s": round(mb / raw["seconds"], 1),
                "loader_records_per_s": round(n / loader["seconds"]),
                "loader_mb_per_s": round(mb / loader["seconds"], 1),
                "ratio": round(raw["seconds"] / loader["seconds"], 2),
                "raw_peak_rss_mb": round(raw["rss_mb"], 1),
                "loader_peak_rss_mb": round(loader["rss_mb"], 1),
                "loader_worker_peak_rss_mb": round(loader["child_rss_mb"], 1),
                "workers": args.workers,
                "columnar": args.columnar,
                "columnar_build_s": round(builds[0]["build_s"], 2),
                "device": args.device or None,
                "resident": loader["resident"],
                "place_s": round(loader["place_s"], 2),
                "gather_threads": args.gather_threads,
                "batch": args.batch,
            }
            print(f"{n:>8} {mb:>7.1f} {row['raw_records_per_s']:>10} {row['raw_mb_per_s']:>9} {row['loader_records_per_s']:>12} "
                  f"{row['loader_mb_per_s']:>11} {row['ratio']:>6} {row['loader_peak_rss_mb']:>13} {row['loader_worker_peak_rss_mb']:>13}")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
