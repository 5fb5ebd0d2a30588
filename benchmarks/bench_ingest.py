"""Fossil ingest benchmark: `scf fossils ingest` (validate every line + publish once per
content id) vs raw nats-py `publish_async` of the same events, same server, same run.

    python benchmarks/bench_ingest.py [--n 50000] [--domain grid:case14] [--n-always 10000]

Shards are synthesized once (`domains.fossils.synth_shards`, cached under the temp dir).
The baseline publishes the *pre-encoded* `fossil.recorded` events (no reading, no
validation) with the same subjects and headers (`Nats-Msg-Id`, expected last subject
sequence 0) through nats-py's `publish_async`, all in flight, then awaits every ack.
Ingest reads the shards from disk, validates every line (`domains.fossils.validate_line`:
schema, content id, provenance, bounds), encodes the events and publishes them (atomic
batches of 1000 when the stream allows them, else pipelined), writes its progress files.
Both run against a fresh stream, twice: on a default server (lazy fsync) and on one with
`sync_interval: always` (nats/prod.conf; `--n-always` lines, pipelined single publishes
are slow there). Ingest is measured with its process pool (auto) and inline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec  # noqa: E402

from scf.bus import events as ev  # noqa: E402
from scf.bus.client import EXPECTED_LAST_SUBJECT_SEQ, MSG_ID, SCF_TYPE, Bus  # noqa: E402
from scf.bus.server import ServerProcess, free_port  # noqa: E402
from scf.bus.settings import Settings, init_home  # noqa: E402
from scf.bus.streams import ensure  # noqa: E402
from scf.producers.ingest import ingest, validate_batch  # noqa: E402


def shards_for(domain: str, n: int, seed: int) -> Path:
    from scf.domains.fossils import synth_shards

    out = Path(tempfile.gettempdir()) / "scf-bench-fossils" / f"{domain.replace(':', '_')}-{n}-{seed}"
    if not (out / ".done").exists():
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        synth_shards(domain, n, out, shard_size=10_000, seed=seed, processes=os.cpu_count() or 1)
        (out / ".done").write_text("")
        print(f"synthesized {n} fossils of {domain} in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    return out


def lines_of(shards: Path, limit: int | None = None) -> list[bytes]:
    out: list[bytes] = []
    for p in sorted(shards.glob("*.ndjson")):
        out += p.read_bytes().splitlines()
        if limit and len(out) >= limit:
            return out[:limit]
    return out


def raw_payloads(lines: list[bytes]) -> list[tuple[str, bytes, dict[str, str]]]:
    dec = msgspec.json.Decoder(ev.Fossil)
    enc = msgspec.json.Encoder()
    at = ev.utcnow()
    out = []
    for line in lines:
        f = dec.decode(line)
        e = ev.FossilRecorded(id=f.fossil_id, at=at, source="bench", data=f)
        out.append((e.subject(), enc.encode(e), {MSG_ID: f.fossil_id, SCF_TYPE: "fossil.recorded", EXPECTED_LAST_SUBJECT_SEQ: "0"}))
    return out


async def fresh_stream(bus: Bus) -> None:
    """A new FOSSILS stream (a purge keeps the duplicate window's message ids)."""
    await bus.js.delete_stream("FOSSILS")
    await ensure(bus.js)


async def raw_rate(bus: Bus, payloads) -> float:
    await fresh_stream(bus)
    t = time.perf_counter()
    futs = [await bus.js.publish_async(s, b, headers=h) for s, b, h in payloads]
    acks = await asyncio.gather(*futs)
    rate = len(payloads) / (time.perf_counter() - t)
    assert sum(not a.duplicate for a in acks) == len(payloads)
    return rate


async def ingest_rate(bus: Bus, home: Path, shards: Path, workers: int | None, expect: int) -> tuple[float, int]:
    await fresh_stream(bus)
    shutil.rmtree(home, ignore_errors=True)
    settings = Settings(home=str(home), nats_url=bus.settings.nats_url, source="bench")
    init_home(settings)
    t = time.perf_counter()
    report = await ingest(bus, [shards], settings=settings, workers=workers)
    rate = report.lines / (time.perf_counter() - t)
    assert report.recorded == expect and report.balanced, report.summary()
    return rate, report.lines


async def on_server(tmp: Path, name: str, shards: Path, n: int, config: str | None, repeat: int) -> dict:
    conf = None
    if config:
        conf = tmp / f"{name}.conf"
        conf.write_text(config)
    server = ServerProcess(tmp / name, free_port(), config=conf).start()
    try:
        bus = await Bus.connect(Settings(home=str(tmp / "h"), nats_url=server.url, source="bench"), "bench")
        await ensure(bus.js)
        sub = shards
        if n < len(lines_of(shards)):
            sub = tmp / f"sub-{n}"
            sub.mkdir(exist_ok=True)
            (sub / "fossils-00000.ndjson").write_bytes(b"\n".join(lines_of(shards, n)) + b"\n")
        payloads = raw_payloads(lines_of(sub))
        raw = max([await raw_rate(bus, payloads) for _ in range(repeat)])
        workers = max(1, min(8, (os.cpu_count() or 2) - 1))
        pooled = max([(await ingest_rate(bus, tmp / "home", sub, workers, len(payloads)))[0] for _ in range(repeat)])
        inline = max([(await ingest_rate(bus, tmp / "home", sub, 0, len(payloads)))[0] for _ in range(repeat)])
        await bus.close()
    finally:
        server.stop()
    return {
        "server": name,
        "lines": len(payloads),
        "raw_publish_async_per_s": round(raw),
        "ingest_pool_per_s": round(pooled),
        "pool_workers": workers,
        "ingest_inline_per_s": round(inline),
        "ratio_pool": round(pooled / raw, 2),
        "ratio_inline": round(inline / raw, 2),
    }


def validate_only_rate(shards: Path, n: int = 10_000) -> float:
    lines = lines_of(shards, n)
    validate_batch(lines[:10], 1, "bench", ev.utcnow().isoformat())
    t = time.perf_counter()
    validate_batch(lines, 1, "bench", ev.utcnow().isoformat())
    return len(lines) / (time.perf_counter() - t)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--n-always", type=int, default=10_000, help="lines for the sync_interval: always server")
    ap.add_argument("--domain", default="grid:case14")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=2, help="best of N for each rate")
    args = ap.parse_args()
    shards = shards_for(args.domain, args.n, args.seed)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        lazy = await on_server(tmp, "lazy", shards, args.n, None, args.repeat)
        always = await on_server(tmp, "always", shards, min(args.n, args.n_always), "jetstream { sync_interval: always }\n", args.repeat)
    result = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}",
        "domain": args.domain,
        "validate_only_per_s_one_process": round(validate_only_rate(shards)),
        "runs": [lazy, always],
    }
    print(json.dumps(result, indent=2))
    print()
    print("| server | lines | raw publish_async | ingest (pool) | ratio | ingest (inline) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in (lazy, always):
        print(
            f"| {r['server']} | {r['lines']} | {r['raw_publish_async_per_s']:,}/s | {r['ingest_pool_per_s']:,}/s | **{r['ratio_pool']}×** | "
            f"{r['ingest_inline_per_s']:,}/s | {r['ratio_inline']}× |"
        )


if __name__ == "__main__":
    asyncio.run(main())
