"""Bus benchmarks: ratios against raw nats-py measured in the same run, on the same server.

    python benchmarks/bench_bus.py [--n 20000]
    python benchmarks/bench_bus.py --only-fetch        (SCF's Pull + ack_many vs nats-py's fetch + ack, CPU a message)

1. publish: SCF `Bus.publish_many` (encode + Nats-Msg-Id + pipelined acks) vs raw nats-py
   `publish_async` of the same pre-encoded payloads and headers — goal ≥ 0.9×;
2. consume: the SCF runner (decode + handler + ack) vs raw `fetch` + ack — goal ≥ 0.8×;
3. publish latency (one event, awaited ack): p50 / p99;
4. durability: the same publish against a server with `sync_interval: always` (as in
   nats/prod.conf): unbatched (one awaited publish at a time), pipelined, and atomic
   batches of per-entity events (`Bus.publish_batch`, one fsync per batch of 1000), as
   ratios of the lazy-fsync pipelined rate — goal ≥ 0.5×.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from scf.bus import codec  # noqa: E402
from scf.bus import events as ev  # noqa: E402
from scf.bus.client import Bus  # noqa: E402
from scf.bus.headers import MSG_ID  # noqa: E402
from scf.bus.runner import Runner  # noqa: E402
from scf.bus.server import ServerProcess, free_port  # noqa: E402
from scf.bus.settings import Settings  # noqa: E402
from scf.bus.streams import ConsumerSpec, ensure  # noqa: E402


def make_events(n: int, tag: str) -> list[ev.Event]:
    return [
        ev.JobProgress.new(
            ev.JobProgressData(job_id=f"{tag}-{i % 50}", step=i, total_steps=n, loss=1.0 / (i + 1), samples_per_s=1234.5),
            source="bench",
        )
        for i in range(n)
    ]


async def purge(js) -> None:
    await js.purge_stream("TRAINING")


async def bench_publish(bus: Bus, n: int, chunk: int = 0) -> dict:
    """`chunk`: publish_many called on slices of this many events, one after the other (the
    safety gate publishes a batch's verdicts, ≤ 128, per call); 0: all in one call. The CPU
    columns: this process's CPU time per message (the server's is not in it)."""
    events = make_events(n, "scf")
    await purge(bus.js)
    step = chunk or n
    t, c = time.perf_counter(), time.process_time()
    for i in range(0, n, step):
        await bus.publish_many(events[i : i + step])
    scf_rate, scf_cpu = n / (time.perf_counter() - t), (time.process_time() - c) / n * 1e6

    raw_events = make_events(n, "raw")
    payloads = [(e.subject(), codec.encode(e), {MSG_ID: e.id}) for e in raw_events]
    await purge(bus.js)
    t, c = time.perf_counter(), time.process_time()
    for i in range(0, n, step):
        futs = [await bus.js.publish_async(s, b, headers=h) for s, b, h in payloads[i : i + step]]
        await asyncio.gather(*futs)
    raw_rate, raw_cpu = n / (time.perf_counter() - t), (time.process_time() - c) / n * 1e6
    return {"scf_publish_per_s": round(scf_rate), "raw_publish_async_per_s": round(raw_rate), "publish_ratio": round(scf_rate / raw_rate, 3),
            "scf_publish_cpu_us": round(scf_cpu, 1), "raw_publish_cpu_us": round(raw_cpu, 1),
            "publish_cpu_ratio": round(raw_cpu / scf_cpu, 3), "publish_chunk": chunk}


async def bench_consume(bus: Bus, n: int) -> dict:
    await purge(bus.js)
    await bus.publish_many(make_events(n, "c"))

    # raw: fetch + ack
    await bus.js.add_consumer("TRAINING", ConsumerSpec("TRAINING", "raw-bench", ("job.>",)).config())
    psub = await bus.js.pull_subscribe_bind(durable="raw-bench", stream="TRAINING")
    t = time.perf_counter()
    got = 0
    while got < n:
        msgs = await psub.fetch(256, timeout=5)
        for m in msgs:
            await m.ack()
        got += len(msgs)
    raw_rate = n / (time.perf_counter() - t)
    await psub.unsubscribe()

    # SCF runner: decode into typed events, call the handler, ack
    stop = asyncio.Event()
    seen = 0

    async def handle(event, delivery):
        nonlocal seen
        seen += 1
        if seen >= n:
            stop.set()
        return None

    runner = Runner(bus, ConsumerSpec("TRAINING", "scf-bench", ("job.>",)), handle, batch=256)
    t = time.perf_counter()
    await runner.run(stop)
    scf_rate = n / (time.perf_counter() - t)
    return {"scf_consume_per_s": round(scf_rate), "raw_fetch_ack_per_s": round(raw_rate), "consume_ratio": round(scf_rate / raw_rate, 3)}


async def bench_fetch(bus: Bus, url: str, n: int, batch: int = 500) -> dict:
    """Fetch + ack of `n` small events in batches of `batch`: `runner.Pull.fetch` (SCF's
    receive path, bus/rx.py, when the tree has it) + `ack_many`, against nats-py's own
    `fetch(batch)` + `ack()` on a connection of its own (nats-py's stock parser); the same
    stream and server, one after the other. Client CPU per message (µs, this process)."""
    import nats

    from scf.bus.client import ack_many
    from scf.bus.runner import Pull

    await purge(bus.js)
    await bus.publish_many(make_events(n, "f"))
    tag = str(time.monotonic_ns())
    pull = Pull(bus, ConsumerSpec("TRAINING", f"scf-fetch-{tag}", ("job.>",)))
    stop = asyncio.Event()
    got = 0
    t, c = time.perf_counter(), time.process_time()
    while got < n:
        msgs = await pull.fetch(batch, 5.0, stop)
        await ack_many(bus.nc, msgs)
        got += len(msgs)
    scf_s, scf_cpu = time.perf_counter() - t, time.process_time() - c
    await pull.close()

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_consumer("TRAINING", ConsumerSpec("TRAINING", f"raw-fetch-{tag}", ("job.>",)).config())
    psub = await js.pull_subscribe_bind(durable=f"raw-fetch-{tag}", stream="TRAINING")
    got = 0
    t, c = time.perf_counter(), time.process_time()
    while got < n:
        msgs = await psub.fetch(batch, timeout=5)
        for m in msgs:
            await m.ack()
        got += len(msgs)
    raw_s, raw_cpu = time.perf_counter() - t, time.process_time() - c
    await psub.unsubscribe()
    await nc.close()
    return {"scf_fetch_ack_per_s": round(n / scf_s), "raw_fetch_ack_per_s": round(n / raw_s),
            "scf_fetch_cpu_us": round(scf_cpu / n * 1e6, 2), "raw_fetch_cpu_us": round(raw_cpu / n * 1e6, 2),
            "fetch_cpu_ratio": round(raw_cpu / scf_cpu, 3), "fetch_batch": batch}


async def bench_latency(bus: Bus, n: int) -> dict:
    lat = []
    for e in make_events(n, "lat"):
        t = time.perf_counter()
        await bus.publish(e)
        lat.append((time.perf_counter() - t) * 1e3)
    lat.sort()
    return {"publish_p50_ms": round(statistics.median(lat), 3), "publish_p99_ms": round(lat[int(len(lat) * 0.99) - 1], 3)}


def make_fossils(n: int, tag: str) -> list[ev.Event]:
    import datetime as dt

    import msgspec

    out = []
    for i in range(n):
        c = ev.FossilContent(
            domain="grid:case14", context=[float(i), 2.0, 3.0], state=[1.0, 2.0], energy=float(i),
            observed_at=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
            provenance=ev.Provenance(source=f"bench:{tag}", verifier="v", verified=True),
        )
        out.append(ev.FossilRecorded.new(ev.Fossil(**msgspec.structs.asdict(c), fossil_id=ev.fossil_content_id(c)), source="bench"))
    return out


async def rates_on(server: ServerProcess, n: int) -> tuple[float, float, float]:
    settings = Settings(home=str(server.store), nats_url=server.url, source="bench")
    bus = await Bus.connect(settings)
    await ensure(bus.js)
    try:
        events = make_events(n, "dur-b")
        t = time.perf_counter()
        await bus.publish_many(events)
        batched = n / (time.perf_counter() - t)
        single = make_events(max(200, n // 20), "dur-s")
        t = time.perf_counter()
        for e in single:
            await bus.publish(e)
        unbatched = len(single) / (time.perf_counter() - t)
        fossils = make_fossils(n, "atomic")
        t = time.perf_counter()
        await bus.publish_batch(fossils)
        atomic = n / (time.perf_counter() - t)
    finally:
        await bus.close()
    return batched, unbatched, atomic


async def bench_durability(tmp: Path, n: int) -> dict:
    lazy = ServerProcess(tmp / "lazy", free_port()).start()
    try:
        lazy_b, lazy_s, lazy_a = await rates_on(lazy, n)
    finally:
        lazy.stop()
    conf = tmp / "fsync.conf"
    conf.write_text("jetstream { sync_interval: always }\n")
    always = ServerProcess(tmp / "always", free_port(), config=conf).start()
    try:
        al_b, al_s, al_a = await rates_on(always, n)
    finally:
        always.stop()
    return {
        "lazy_batched_per_s": round(lazy_b),
        "lazy_unbatched_per_s": round(lazy_s),
        "fsync_always_batched_per_s": round(al_b),
        "fsync_always_unbatched_per_s": round(al_s),
        "lazy_atomic_batch_per_s": round(lazy_a),
        "fsync_always_atomic_batch_per_s": round(al_a),
        "fsync_atomic_batch_vs_lazy_ratio": round(al_a / lazy_b, 3),
        "fsync_batched_vs_lazy_ratio": round(al_b / lazy_b, 3),
        "fsync_unbatched_vs_lazy_ratio": round(al_s / lazy_b, 3),
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3, help="take the best of N runs for each ratio")
    ap.add_argument("--only-publish", action="store_true", help="only the publish comparison (with CPU columns)")
    ap.add_argument("--chunk", type=int, default=0, help="publish_many on slices of this many events (0: one call)")
    ap.add_argument("--only-fetch", action="store_true", help="only fetch + ack: SCF's Pull vs nats-py's fetch (CPU columns)")
    args = ap.parse_args()
    if args.only_fetch or args.only_publish:  # one comparison, `--repeat` times, on its own server
        with tempfile.TemporaryDirectory() as d:
            server = ServerProcess(Path(d) / "main", free_port()).start()
            try:
                bus = await Bus.connect(Settings(home=d, nats_url=server.url, source="bench"))
                await ensure(bus.js)
                for _ in range(args.repeat):
                    row = await (bench_fetch(bus, server.url, args.n) if args.only_fetch else bench_publish(bus, args.n, args.chunk))
                    print(json.dumps(row), flush=True)
                await bus.close()
            finally:
                server.stop()
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        server = ServerProcess(tmp / "main", free_port()).start()
        try:
            settings = Settings(home=str(tmp), nats_url=server.url, source="bench")
            bus = await Bus.connect(settings)
            await ensure(bus.js)
            pubs = [await bench_publish(bus, args.n) for _ in range(args.repeat)]
            cons = []
            for i in range(args.repeat):
                r = await bench_consume(bus, args.n)
                cons.append(r)
                await bus.js.delete_consumer("TRAINING", "raw-bench")
                await bus.js.delete_consumer("TRAINING", "scf-bench")
            lat = await bench_latency(bus, 2000)
            await bus.close()
        finally:
            server.stop()
        dur = await bench_durability(tmp, args.n)
    result = {
        "machine": f"{platform.node()} {platform.machine()} {platform.python_version()}",
        "n": args.n,
        **max(pubs, key=lambda r: r["publish_ratio"]),
        **max(cons, key=lambda r: r["consume_ratio"]),
        **lat,
        **dur,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
