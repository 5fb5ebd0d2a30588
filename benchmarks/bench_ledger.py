"""Ledger benchmark: transfers per second into the ledger.

    python benchmarks/bench_ledger.py [--n 10000] [--fsync]

N signed `energy.measured` events (4 nodes) are published first; then the ledger, in this
process, mints them — `batched`: `Ledger.run`, the loop `scf run ledger` runs (atomic
batches of transfers); `runner`: the per-message path (`Ledger.runner`, one expected-
sequence publish per transfer, `--concurrency` at once); the clock runs from the
runner's start until LEDGER holds N transfers and the consumer has nothing pending.
Then every measurement is re-sent with a new envelope id (a repeat beyond any dedup
window): the time until the ledger has acknowledged them all as already done.

Baselines (same run, same machine): the *verify floor* — decoding and checking the Ed25519
signature of the N measurements in a plain loop, the CPU any ledger of signed measurements
pays at least, measured right before and right after the ledger's run (the ratio is against
their mean: on a shared machine the load moves); and raw nats-py `publish_async` of N pre-encoded transfers with
`Nats-Expected-Last-Subject-Sequence: 0` — the cost of the exactly-once mints alone,
without verification, decoding, rules or acks.

`--fsync` runs against a server with `sync_interval: always` (nats/prod.conf). `--sign`: the
ledger signs every transfer it mints, as `scf run ledger` does (its bus opens with its key:
one Ed25519 signature a transfer); without it (the default, and every figure recorded before
2026-12-02) the transfers go unsigned, so the default flatters the ledger by that signature.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scf.bus import codec  # noqa: E402
from scf.bus import events as ev  # noqa: E402
from scf.bus.client import Bus  # noqa: E402
from scf.bus.headers import EXPECTED_LAST_SUBJECT_SEQ, MSG_ID  # noqa: E402
from scf.bus.ids import new_id  # noqa: E402
from scf.bus.server import ServerProcess, free_port  # noqa: E402
from scf.bus.settings import Settings  # noqa: E402
from scf.bus.signing import SigningKey, TrustList  # noqa: E402
from scf.bus.streams import ensure  # noqa: E402
from scf.consumers.energy import measurement_event  # noqa: E402
from scf.consumers.ledger import Ledger, LedgerSettings, transfer_for  # noqa: E402
from tests.mv_support import passing_mv  # noqa: E402 (a passing Guideline 14 calibration: the ledger mints only those)


def measurements(n: int, nodes: list[str]) -> list[ev.EnergyMeasured]:
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    out = []
    for i in range(n):
        start = t0 + dt.timedelta(minutes=15 * i)
        baseline, actual = 10.0 + (i % 7), 8.0 + (i % 5) * 0.25
        out.append(
            measurement_event(nodes[i % len(nodes)], period_start=start, period_end=start + dt.timedelta(minutes=15),
                              baseline_kwh=baseline, actual_kwh=actual, method="bench", source="bench",
                              **passing_mv(baseline, actual))
        )
    return out


async def publish_signed(bus: Bus, events: list[ev.EnergyMeasured], keys: dict[str, SigningKey]) -> None:
    futs = []
    for e in events:
        futs.append(await bus.js.publish_async(e.subject(), codec.sign(e, keys[e.data.node]), headers=Bus.headers(e)))
        if len(futs) >= 4096:
            await asyncio.gather(*futs)
            futs = []
    await asyncio.gather(*futs)


async def drained(bus: Bus) -> bool:
    info = await bus.js.consumer_info("DEPLOY", "ledger")
    return info.num_pending == 0 and info.num_ack_pending == 0


async def until(pred, timeout: float = 600.0) -> None:
    end = time.monotonic() + timeout
    while not await pred():
        if time.monotonic() > end:
            raise TimeoutError("benchmark condition not reached")
        await asyncio.sleep(0.02)


async def run_ledger(bus: Bus, trust: TrustList, settings: LedgerSettings, n_expected: int, stats: dict, key: str, mode: str) -> Ledger:
    ledger = Ledger(bus, trust, settings)
    stop = asyncio.Event()
    t, c = time.perf_counter(), time.process_time()
    if mode == "batched":
        task = asyncio.create_task(ledger.run(stop, fetch_timeout=0.2))
    else:
        task = asyncio.create_task(ledger.runner(fetch_timeout=0.2).run(stop))

    async def done() -> bool:
        return sum(ledger.counts.values()) >= n_expected and await drained(bus)

    await until(done)
    stats[key] = time.perf_counter() - t
    stats[key + "_cpu"] = time.process_time() - c  # this process: the ledger (and the bench's polling)
    stop.set()
    await task
    return ledger


async def bench(url: str, n: int, concurrency: int, mode: str, verify_threads: int = LedgerSettings().verify_threads,
                sign: bool = False) -> dict:
    settings = Settings(home=tempfile.mkdtemp(prefix="scf-bench-"), nats_url=url, source="bench")
    bus = await Bus.connect(settings, "bench", key=SigningKey.generate("ledger") if sign else None)
    await ensure(bus.js)
    nodes = [f"node-{i}" for i in range(4)]
    keys = {n_: SigningKey.generate(n_) for n_ in nodes}
    trust = TrustList()
    for name, k in keys.items():
        trust.trust(k.public_b64, name, ["node"])
    events = measurements(n, nodes)
    # The CPU floor: decoding and verifying the Ed25519 signature of every measurement,
    # nothing else (no NATS, no rules, no mint) — what any exactly-once ledger of signed
    # measurements must pay at least.
    raws = [codec.sign(e, keys[e.data.node]) for e in events]
    verifier = codec.Codec([ev.EnergyMeasured], trust=trust, require_signature=True, role="node")

    def floor() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        for r in raws:
            verifier.decode(r)
        return time.perf_counter() - t0, time.process_time() - c0

    # The same in two threads, half each: above 1x only if verification releases the GIL
    # (what `[ledger] verify_threads` counts on) and a second core is free.
    import threading

    halves = [raws[: len(raws) // 2], raws[len(raws) // 2 :]]
    threads = [threading.Thread(target=lambda rs: [verifier.decode(r) for r in rs], args=(h,)) for h in halves]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    verify2_s = time.perf_counter() - t0
    await publish_signed(bus, events, keys)
    stats: dict = {}
    ls = LedgerSettings(rate=0.37, concurrency=concurrency, verify_threads=verify_threads)
    verify_before = floor()
    load = os.getloadavg()[0]
    ledger = await run_ledger(bus, trust, ls, n, stats, "mint_s", mode)
    assert ledger.counts["new"] == n, ledger.counts
    # the floor again right after (on a shared machine the load moves from second to second):
    # the ledger is compared with the mean of the floors before and after it
    verify_after = floor()
    verify_s, verify_cpu = (verify_before[0] + verify_after[0]) / 2, (verify_before[1] + verify_after[1]) / 2
    info = await bus.js.stream_info("LEDGER")
    assert info.state.messages == n

    # Repeats with new envelope ids: every one must be acknowledged as already done.
    repeats = [ev.EnergyMeasured.new(e.data, source="bench", id=new_id()) for e in events]
    await publish_signed(bus, repeats, keys)
    ledger2 = await run_ledger(bus, trust, ls, n, stats, "repeat_s", mode)
    assert ledger2.counts["duplicate"] == n and (await bus.js.stream_info("LEDGER")).state.messages == n

    # Baseline: raw expected-seq-0 publishes of the same transfers, on fresh subjects.
    raw = []
    for e in events:
        t = transfer_for(e, f"node:{e.data.node}", ls, "bench")
        t = ev.LedgerTransfer.new(catalog_transfer(t), source="bench")
        raw.append((t.subject(), codec.encode(t), {MSG_ID: t.id, EXPECTED_LAST_SUBJECT_SEQ: "0"}))
    t0 = time.perf_counter()
    futs = []
    for s, b, h in raw:
        futs.append(await bus.js.publish_async(s, b, headers=h))
        if len(futs) >= 4096:
            await asyncio.gather(*futs)
            futs = []
    await asyncio.gather(*futs)
    raw_s = time.perf_counter() - t0
    await bus.close()
    return {
        "mode": mode,
        "verify_threads": ledger.verify_threads,  # as resolved (-1: by the CPUs this process may use)
        "load_average": round(load, 2),
        "transfers_signed": sign,
        "n": n,
        "ledger_transfers_per_s": round(n / stats["mint_s"]),
        "ledger_repeats_acknowledged_per_s": round(n / stats["repeat_s"]),
        "verify_floor_per_s": round(n / verify_s),
        "verify_floor_before_after_per_s": [round(n / verify_before[0]), round(n / verify_after[0])],
        "verify_2_threads_per_s": round(n / verify2_s),
        "ratio_vs_verify_floor": round((n / stats["mint_s"]) / (n / verify_s), 3),
        # client CPU per measurement (µs): the ledger's own cost, less exposed to the other
        # work on a shared machine than the wall-clock rates (the server's CPU is not in it)
        "ledger_cpu_us": round(stats["mint_s_cpu"] / n * 1e6, 1),
        "verify_floor_cpu_us": round(verify_cpu / n * 1e6, 1),
        "cpu_ratio_vs_verify_floor": round(verify_cpu / stats["mint_s_cpu"], 3),
        "raw_expected_seq_publish_per_s": round(n / raw_s),
        "ratio_vs_raw_publish": round((n / stats["mint_s"]) / (n / raw_s), 3),
    }


def catalog_transfer(t):
    d = t.data
    return ev.Transfer(transfer_id="raw-" + d.transfer_id, cause_id=d.cause_id, debit_account=d.debit_account,
                       credit_account=d.credit_account, micro_credits=d.micro_credits, kwh=d.kwh, rate=d.rate)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=LedgerSettings().concurrency, help="the per-message path's concurrency")
    ap.add_argument("--verify-threads", type=int, default=LedgerSettings().verify_threads,
                    help="[ledger] verify_threads (-1, the default: by the CPUs this process may use)")
    ap.add_argument("--mode", choices=["batched", "runner", "both"], default="both",
                    help="batched: `scf run ledger` (atomic batches); runner: the per-message path")
    ap.add_argument("--fsync", action="store_true", help="server with sync_interval: always")
    ap.add_argument("--sign", action="store_true", help="the ledger signs its transfers, as `scf run ledger` does")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        conf = None
        if a.fsync:
            conf = Path(tmp) / "fsync.conf"
            conf.write_text("jetstream { sync_interval: always }\n")
        results = []
        for i, mode in enumerate(["batched", "runner"] if a.mode == "both" else [a.mode]):
            server = ServerProcess(Path(tmp) / f"store{i}", free_port(), config=conf).start()
            try:
                result = await bench(server.url, a.n, a.concurrency, mode, a.verify_threads, a.sign)
            finally:
                server.stop()
            result["fsync_always"] = a.fsync
            result["machine"] = f"{platform.machine()} {platform.system()} {os.cpu_count()} cpus, python {platform.python_version()}"
            results.append(result)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
