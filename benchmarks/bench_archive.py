"""Archive benchmarks: ratios and numbers measured in the same run, on the same machine.

    python benchmarks/bench_archive.py ingest [--n 200000] [--rounds 3]
    python benchmarks/bench_archive.py queries [--events 1000000] [--keep DIR]
    python benchmarks/bench_archive.py all [--record]      (--record appends to benchmarks/RESULTS.md)

1. ingest: `scf run archive`'s stream follower (ordered consumer → Arrow → zstd Parquet,
   fsync + rename per file) vs a raw nats-py ordered-consumer replay of the same stream that
   only counts the messages (the fastest way nats-py can read a stream; its own connection,
   nats-py's stock parser), both reading every fossil of a FOSSILS stream of `n` messages —
   goal ≥ 0.8×; also vs the same count-only replay through SCF's receive path (bus/rx.py);
2. queries over an archive of `events` archived events (written straight into Parquet by
   projections.sample.write_archive, the standard sample mix): the `cfr` and `balances`
   views and the CFR dataset build, each in a fresh process: wall time, rows scanned per
   second (rows in the partitions the query reads, and all archived events / time), peak
   RSS of the process — goal: bounded, under 1 GiB; plus `balances` over a ledger of
   1M transfers (the worst case for that view).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scf.bus import events as ev  # noqa: E402
from scf.bus.client import Bus  # noqa: E402
from scf.bus.server import ServerProcess, free_port  # noqa: E402
from scf.bus.settings import Settings  # noqa: E402
from scf.bus.streams import ensure  # noqa: E402

# --------------------------------------------------------------------------- ingest


def _fossils(n: int, seed: int = 1):
    from scf.projections import sample

    # Fossil-only history: the FOSSILS stream is the big one in practice.
    out = []
    i = 0
    base = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    import random

    rng = random.Random(seed)
    while len(out) < n:
        content = ev.FossilContent(
            domain="grid:case14",
            context=[round(rng.uniform(0, 100), 3) for _ in range(4)],
            state=[round(rng.uniform(-1, 1), 4) for _ in range(6)],
            energy=round(rng.uniform(50, 150), 3),
            observed_at=base + dt.timedelta(seconds=i),
            provenance=ev.Provenance(source="meter-1", verifier="bounds", verified=True),
        )
        f = ev.Fossil(**{k: getattr(content, k) for k in content.__struct_fields__}, fossil_id=ev.fossil_content_id(content))
        out.append(ev.FossilRecorded.new(f, source="bench"))
        i += 1
    del sample
    return out


async def _raw_replay(url: str, stream: str, n: int) -> tuple[float, float]:
    """nats-py's own ordered consumer on a connection of its own with nats-py's stock parser
    (not SCF's receive path, bus/rx.py): the goal's baseline."""
    import nats

    nc = await nats.connect(url)
    got = 0
    done = asyncio.Event()

    async def cb(msg) -> None:
        nonlocal got
        got += 1
        if got >= n:
            done.set()

    t, c = time.perf_counter(), time.process_time()
    sub = await nc.jetstream().subscribe("", stream=stream, ordered_consumer=True, cb=cb)
    await done.wait()
    elapsed, cpu = time.perf_counter() - t, time.process_time() - c
    await sub.unsubscribe()
    await nc.close()
    return n / elapsed, cpu / n * 1e6


async def _rx_replay(bus: Bus, stream: str, n: int) -> tuple[float, float]:
    """The same count-only ordered replay through SCF's receive path (bus/rx.py): a raw push
    consumer (flow control answered) into a sink — what the archive's receiving costs
    without its writing. Absent from a tree without bus/rx.py: (0, 0)."""
    try:
        from scf.bus.natsfix import rx_parser, sid_of
        from scf.bus.rx import Sink
    except ImportError:
        return 0.0, 0.0
    from nats.js import api

    nc = bus.nc
    sink = Sink()
    got = 0
    done = asyncio.Event()

    def take() -> None:
        nonlocal got
        got += len(sink.items)
        sink.items = []
        for reply, _hdr in sink.statuses:
            if reply:
                asyncio.ensure_future(nc.publish(reply.decode(), b""))
        sink.statuses = []
        if got >= n:
            done.set()

    sink.on_flush = take
    inbox = nc.new_inbox()
    t, c = time.perf_counter(), time.process_time()
    sub = await nc.subscribe(inbox)
    rx_parser(nc).sinks[sid_of(sub)] = sink
    await bus.js.add_consumer(stream, api.ConsumerConfig(
        deliver_subject=inbox, ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.ALL, flow_control=True,
        idle_heartbeat=5.0, mem_storage=True, num_replicas=1, max_deliver=1, inactive_threshold=10.0))
    await done.wait()
    elapsed, cpu = time.perf_counter() - t, time.process_time() - c
    rx_parser(nc).sinks.pop(sid_of(sub), None)
    await sub.unsubscribe()
    return n / elapsed, cpu / n * 1e6


def _children_cpu() -> float:
    """CPU time of this process's reaped children (the archive's forked writers; the
    nats-server child is not reaped while it runs, so it is not in it)."""
    t = os.times()
    return t.children_user + t.children_system


async def _archive_replay(bus: Bus, stream: str, n: int, root: Path, writer: str | None = None) -> tuple[float, float, int]:
    from scf.projections.archive import ArchiveSettings, StreamFollower, gc_tuned
    from scf.projections.store import ArchiveStore

    store = ArchiveStore(root)
    store.ensure()
    # the live process's defaults (a file per 50 000 messages, `[archive] writer`'s default) unless told
    cfg = ArchiveSettings(writer=writer) if writer else ArchiveSettings()
    t, c = time.perf_counter(), time.process_time() + _children_cpu()
    follower = StreamFollower(bus, store, stream, 1, cfg, until_caught_up=True)
    with gc_tuned():  # as in `scf run archive` and `scf replay`
        stats = await follower.run(asyncio.Event())
    elapsed, cpu = time.perf_counter() - t, time.process_time() + _children_cpu() - c
    assert stats.messages == n, (stats.messages, n)
    assert store.position(stream) == n
    return n / elapsed, cpu / n * 1e6, stats.files


async def bench_ingest(n: int, rounds: int, with_forked: bool = False) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="scf-bench-archive-"))
    server = ServerProcess(tmp / "nats", free_port()).start()
    try:
        settings = Settings(home=str(tmp / "home"), nats_url=server.url, source="bench")
        bus = await Bus.connect(settings, "bench")
        await ensure(bus.js)
        t = time.perf_counter()
        events = _fossils(n)
        for i in range(0, n, 50_000):
            await bus.publish_many(events[i : i + 50_000])
        publish_s = time.perf_counter() - t
        del events
        info = await bus.js.stream_info("FOSSILS")
        raw, arc, raw_cpu, arc_cpu, files = [], [], [], [], 0
        thr, thr_cpu = [], []  # the writer forked per batch (`[archive] writer = "process"`), with --forked-writer
        rx, rx_cpu = [], []
        for r in range(rounds):  # interleaved, so all see the same background load
            rate, cpu = await _raw_replay(server.url, "FOSSILS", n)
            raw.append(rate)
            raw_cpu.append(cpu)
            rate, cpu = await _rx_replay(bus, "FOSSILS", n)
            rx.append(rate)
            rx_cpu.append(cpu)
            rate, cpu, files = await _archive_replay(bus, "FOSSILS", n, tmp / f"archive-{r}")
            arc.append(rate)
            arc_cpu.append(cpu)
            shutil.rmtree(tmp / f"archive-{r}", ignore_errors=True)
            if with_forked:
                rate, cpu, _ = await _archive_replay(bus, "FOSSILS", n, tmp / f"archive-t{r}", writer="process")
                thr.append(rate)
                thr_cpu.append(cpu)
                shutil.rmtree(tmp / f"archive-t{r}", ignore_errors=True)
        await bus.close()
        raw_med, arc_med = statistics.median(raw), statistics.median(arc)
        thread = {
            "forked_writer_per_s": [round(x) for x in thr],
            "forked_writer_ratio": round(statistics.median(thr) / raw_med, 3),
            "forked_writer_cpu_us_per_msg": round(statistics.median(thr_cpu), 2),
        } if thr else {}
        return {
            "messages": n,
            "stream_bytes": info.state.bytes,
            "publish_s": round(publish_s, 1),
            "raw_ordered_replay_per_s": [round(x) for x in raw],
            "archive_ingest_per_s": [round(x) for x in arc],
            "raw_median_per_s": round(raw_med),
            "archive_median_per_s": round(arc_med),
            "ratio": round(arc_med / raw_med, 3),
            "ratio_best": round(max(arc) / max(raw), 3),
            "raw_cpu_us_per_msg": round(statistics.median(raw_cpu), 2),
            "archive_cpu_us_per_msg": round(statistics.median(arc_cpu), 2),
            "cpu_ratio": round(statistics.median(raw_cpu) / statistics.median(arc_cpu), 3),
            "files_per_run": files,
            # the same count-only replay through SCF's own receive path (bus/rx.py): the
            # archive against it says what the writing costs; against the raw nats-py replay
            # (the goal's baseline) it also gains from receiving faster than nats-py
            "rx_replay_per_s": [round(x) for x in rx],
            "rx_median_per_s": round(statistics.median(rx)),
            "rx_cpu_us_per_msg": round(statistics.median(rx_cpu), 2),
            "ratio_vs_rx_replay": round(arc_med / statistics.median(rx), 3) if rx[0] else None,
            "cpu_ratio_vs_rx_replay": round(statistics.median(rx_cpu) / statistics.median(arc_cpu), 3) if rx[0] else None,
            # the stream filled by the bus's pipelined publisher (publish_many, 4000 in flight),
            # the fastest way SCF's producers write: the archive must never fall behind it
            "fill_per_s": round(n / publish_s),
            "archive_vs_fill": round(arc_med / (n / publish_s), 2),
            **thread,
        }
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- queries


_CHILD = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, {root!r})
    from scf.projections import views, cfr
    what, archive = sys.argv[1], sys.argv[2]
    t = time.perf_counter()
    if what == "dataset":
        ds = cfr.build(archive, sys.argv[3])
        rows = ds.counts["tuples"]
    else:
        con = views.connect(archive)
        rel = con.sql(f"SELECT * FROM {{what}}")
        rows = 0
        for b in rel.to_arrow_reader(100_000):
            rows += b.num_rows
        con.close()
    elapsed = time.perf_counter() - t
    # VmHWM: this process's peak resident set (ru_maxrss would include the parent's, from
    # before the exec)
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print("RESULT " + json.dumps({{"rows": rows, "seconds": elapsed, "peak_rss_mib": hwm / 1024}}))
    """
)


def _child(what: str, archive: Path, extra: list[str] | None = None) -> dict:
    code = _CHILD.format(root=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code, what, str(archive), *(extra or [])], capture_output=True, text=True, check=True)
    line = next(l for l in reversed(out.stdout.splitlines()) if l.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def _partition_rows(archive: Path, streams: list[str]) -> int:
    import pyarrow.parquet as pq

    from scf.projections.store import ArchiveStore

    store = ArchiveStore(archive)
    return sum(pq.ParquetFile(f.path).metadata.num_rows for s in streams for f in store.files(s))


def _ledger_only(n: int):
    from scf.bus.ids import derived_id

    at = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    for i in range(n):
        tid = derived_id("bench-transfer", i)
        yield ev.LedgerTransfer.new(
            ev.Transfer(
                transfer_id=tid, cause_id=derived_id("bench-m", i), debit_account="issuance:negentropy",
                credit_account=f"client:{i % 1000}", micro_credits=1_000 + i % 977, kwh=0.002, rate=0.5,
            ),
            source="bench", id=tid, at=at + dt.timedelta(seconds=i),
        )


def bench_queries(events: int, keep: Path | None) -> dict:
    from scf.projections import sample, views
    from scf.projections.store import ArchiveStore

    tmp = Path(tempfile.mkdtemp(prefix="scf-bench-queries-"))
    archive = keep or tmp / "archive"
    result: dict = {}
    try:
        store = ArchiveStore(archive)
        if not store.exists() or sum(store.position(s) for s in store.streams()) < events:
            shutil.rmtree(archive, ignore_errors=True)
            t = time.perf_counter()
            it = sample.history(cycles=events, seed=11)
            seqs = sample.write_archive(store, (x for _, x in zip(range(events), it)), batch=200_000)
            result["archive_write_s"] = round(time.perf_counter() - t, 1)
            result["archive_events"] = sum(seqs.values())
        else:
            result["archive_events"] = sum(store.position(s) for s in store.streams())
        views.write_database(archive)
        result["archive_bytes"] = sum(f.path.stat().st_size for f in store.all_files())
        total = result["archive_events"]
        for view, streams in (("cfr", ["INTENTS", "VERDICTS"]), ("balances", ["LEDGER"])):
            runs = [_child(view, archive) for _ in range(2)]
            best = min(runs, key=lambda r: r["seconds"])
            scanned = _partition_rows(archive, streams)
            result[view] = {
                "rows_out": best["rows"],
                "seconds": round(best["seconds"], 3),
                "rows_scanned": scanned,
                "rows_scanned_per_s": round(scanned / best["seconds"]),
                "archive_events_per_s": round(total / best["seconds"]),
                "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs)),
            }
        ds = _child("dataset", archive, [str(tmp / "cfr-out")])
        result["dataset_cfr"] = {
            "tuples": ds["rows"],
            "seconds": round(ds["seconds"], 2),
            "archive_events_per_s": round(total / ds["seconds"]),
            "peak_rss_mib": round(ds["peak_rss_mib"]),
        }
        ledger = ArchiveStore(tmp / "ledger-archive")
        t = time.perf_counter()
        sample.write_archive(ledger, _ledger_only(1_000_000), batch=200_000)
        views.write_database(ledger.root)
        write_s = time.perf_counter() - t
        runs = [_child("balances", ledger.root) for _ in range(2)]
        best = min(runs, key=lambda r: r["seconds"])
        result["balances_1M_transfers"] = {
            "rows_out": best["rows"],
            "seconds": round(best["seconds"], 3),
            "rows_scanned_per_s": round(1_000_000 / best["seconds"]),
            "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs)),
            "write_s": round(write_s, 1),
        }
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- output


def _machine() -> str:
    import pyarrow

    from scf.bus.server import binary

    try:
        import duckdb

        duck = f"duckdb {duckdb.__version__}, "
    except ImportError:  # the ingest benchmark does not need it (a bare benchmark machine)
        duck = ""

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        import psutil

        mem = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        pass
    server = subprocess.run([binary(), "--version"], capture_output=True, text=True).stdout.strip()
    return (f"{platform.machine()}, {os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}, "
            f"{server}, {duck}pyarrow {pyarrow.__version__}, {dt.date.today()}")


def _markdown(ingest: dict | None, queries: dict | None, argv: str) -> str:
    out = [f"## Archive (issue 3) — `python benchmarks/bench_archive.py {argv}`", "", f"Machine: {_machine()} (shared with other work).", ""]
    if ingest:
        out += [
            "| measure | archive | baseline | ratio | goal |",
            "|---|---|---|---|---|",
            f"| ingest {ingest['messages']:,} fossils (msgs/s, median of {len(ingest['raw_ordered_replay_per_s'])}) | "
            f"{ingest['archive_median_per_s']:,} (ordered consumer → Parquet, fsync per file, {ingest['files_per_run']} files) | "
            f"raw nats-py ordered replay, count only: {ingest['raw_median_per_s']:,} | **{ingest['ratio']:.2f}×** (best/best {ingest['ratio_best']:.2f}×) | ≥ 0.8× |",
            f"| client CPU per message (µs, this process, threads and forked writers included) | {ingest['archive_cpu_us_per_msg']} | {ingest['raw_cpu_us_per_msg']} | "
            f"{ingest['cpu_ratio']:.2f}× (rate on an idle core) | |",
            f"| ingest vs the same replay through SCF's receive path (bus/rx.py), count only (msgs/s; CPU µs) | "
            f"{ingest['archive_median_per_s']:,}; {ingest['archive_cpu_us_per_msg']} | {ingest['rx_median_per_s']:,}; {ingest['rx_cpu_us_per_msg']} | "
            f"{ingest['ratio_vs_rx_replay']}× (CPU {ingest['cpu_ratio_vs_rx_replay']}×) | |",
            f"| ingest vs filling the stream (msgs/s) | {ingest['archive_median_per_s']:,} | `publish_many` of the same fossils: "
            f"{ingest['fill_per_s']:,} | **{ingest['archive_vs_fill']:.2f}×** | ≥ 1× |",
            "",
        ]
    if queries:
        n = queries["archive_events"]
        out += [
            f"Queries over {n:,} archived events ({queries['archive_bytes'] / 2**20:.0f} MiB of Parquet), each in a fresh process:",
            "",
            "| query | rows out | time | rows scanned/s | archived events/s | peak RSS |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name in ("cfr", "balances"):
            q = queries[name]
            out.append(f"| `SELECT * FROM {name}` | {q['rows_out']:,} | {q['seconds']:.2f} s | {q['rows_scanned_per_s']:,} ({q['rows_scanned']:,} rows read) | "
                       f"{q['archive_events_per_s']:,} | {q['peak_rss_mib']} MiB |")
        d = queries["dataset_cfr"]
        out.append(f"| `scf dataset cfr` (JSONL + Parquet + card) | {d['tuples']:,} tuples | {d['seconds']:.2f} s | | {d['archive_events_per_s']:,} | {d['peak_rss_mib']} MiB |")
        b = queries["balances_1M_transfers"]
        out.append(f"| `balances` over 1,000,000 ledger transfers | {b['rows_out']:,} | {b['seconds']:.2f} s | {b['rows_scanned_per_s']:,} | | {b['peak_rss_mib']} MiB |")
        out.append("")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["ingest", "queries", "all"])
    ap.add_argument("--n", type=int, default=200_000, help="messages for the ingest benchmark")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--forked-writer", action="store_true",
                    help="also run the archive with its writer forked per batch (`[archive] writer = \"process\"`), interleaved")
    ap.add_argument("--events", type=int, default=1_000_000, help="archived events for the query benchmark")
    ap.add_argument("--keep", type=Path, default=None, help="keep (and reuse) the query benchmark's archive here")
    ap.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = ap.parse_args()
    ingest = queries = None
    if args.what in ("ingest", "all"):
        ingest = asyncio.run(bench_ingest(args.n, args.rounds, args.forked_writer))
        print(json.dumps({"ingest": ingest}, indent=2))
    if args.what in ("queries", "all"):
        queries = bench_queries(args.events, args.keep)
        print(json.dumps({"queries": queries}, indent=2))
    md = _markdown(ingest, queries, " ".join(sys.argv[1:]).replace("--record", "").strip())
    print(md)
    if args.record:
        path = ROOT / "benchmarks" / "RESULTS.md"
        with open(path, "a") as fh:
            fh.write("\n" + md)
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
