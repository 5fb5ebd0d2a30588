"""Safety-gate benchmark: verdicts per second on a mixed stream.

    python benchmarks/bench_safety.py [--n 3000]

The stream (published to INTENTS before the gate starts): 40 % intents (train / optimise /
deploy / an unknown kind, grid and HVAC domains, context facts in scf_context), 40 % code
proposals (the ethics corpus of tests/data/ethics, malicious and benign, in turn), 20 %
proposed states of grid:case14 (feasible reference dispatches and perturbed ones).

* **gate**: `SafetyGate` (what `scf run safety` runs), in this process, with its durable
  consumer: the clock runs from the runner's start until VERDICTS holds N verdicts;
  at concurrency 1 and at the default (8).
* **decide floor** (baseline, same run): the pure `decide(view, event)` over the same
  events in a loop — rules, AST analysis, physics — without NATS: the CPU the gate must pay.
  Per type as well, to show where the time goes.

On a shared machine the load changes from second to second, so the floor is measured right
before and right after every gate run and each run's ratio is taken against the mean of its
two floors (`--rounds` runs per concurrency, median ratio reported). The CPU columns compare
this process's CPU time (the gate's, plus the bench's 10 ms polling) with the floor's: the
cost on an idle core, much less exposed to the other work (the server's CPU is not in it).
The gate's CPU is taken over the same window as its clock (since 2026-12-02: before, it also
counted connecting, reading the rules, the gear and the facts, and closing the connection,
which the floor does not pay: a fixed ≈ 20–50 ms against the gate), and the bench looks at
the runner's count every 2 ms (was 10: up to 10 ms added to a run of ≈ 0.5 s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from scf import domains  # noqa: E402
from scf.bus import events as ev  # noqa: E402
from scf.bus import gears  # noqa: E402
from scf.bus.client import Bus  # noqa: E402
from scf.bus.server import ServerProcess, free_port  # noqa: E402
from scf.bus.settings import Settings, init_home  # noqa: E402
from scf.bus.streams import ConsumerSpec, ensure  # noqa: E402
from scf.consumers.safety import GateView, SafetyGate, SafetySettings, decide  # noqa: E402

CORPUS = ROOT / "tests" / "data" / "ethics"


def mixed(n: int) -> list[ev.Event]:
    codes = [p.read_text() for p in sorted((CORPUS / "malicious").glob("*.py")) + sorted((CORPUS / "benign").glob("*.py"))]
    grid = domains.get("grid:case14")
    rng = np.random.default_rng(0)
    states = []
    for k in range(40):
        c = grid.sample_context(rng)
        x = grid.reference_solution(c)
        if k % 2:
            x = x + rng.normal(0, 15, size=x.shape)
        states.append((c.tolist(), np.clip(x, *grid.state_bounds).tolist()))
    kinds = ["train", "optimise", "deploy", "train", "optimise", "mine_crypto"]
    doms = ["grid:case14", "hvac:office3"]
    out: list[ev.Event] = []
    for i in range(n):
        r = i % 10
        if r < 4:
            intent = ev.Intent(intent_id=f"bench-{i}", kind=kinds[i % len(kinds)], domain=doms[i % 2], params={"hypotheses": 4})
            out.append(ev.IntentCreated.new(intent, source="bench"))
        elif r < 8:
            out.append(ev.CodeProposed.new(ev.CodeProposal(proposal_id=f"code-{i}", intent_id="bench", code=codes[i % len(codes)]), source="bench"))
        else:
            c, x = states[i % len(states)]
            out.append(ev.StateProposed.new(ev.StateProposal(proposal_id=f"state-{i}", domain="grid:case14", context=c, state=x), source="bench"))
    return out


async def run_gate(settings: Settings, events: list[ev.Event], concurrency: int, durable: str, batched: bool = True) -> tuple[float, float]:
    """(wall s, CPU s) from the runner's start until it has handled every event: the same
    window for both (connecting, reading the rules and the gear, closing are outside it, as
    they are outside the floor's)."""
    bus = await Bus.connect(settings, "bench-gate")
    gate = SafetyGate(bus, SafetySettings(concurrency=concurrency))
    await gate.start()
    spec = ConsumerSpec("INTENTS", durable, ("intent.>", "code.>", "state.>"))
    runner = gate.runner(spec)
    runner.batched = batched  # False: the runner's per-message path (what the gate ran before it was batched)
    stop = asyncio.Event()
    t0, c0 = time.perf_counter(), time.process_time()
    task = asyncio.create_task(runner.run(stop))
    while runner.stats.handled < len(events):
        await asyncio.sleep(0.002)
        if task.done():
            task.result()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    stop.set()
    await task
    await gate.stop()
    await bus.close()
    return dt, cpu


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2, help="gate runs per concurrency, each between two floor runs")
    ap.add_argument("--per-message", action="store_true", help="also run the gate on the runner's per-message path (the gate before batching)")
    args = ap.parse_args()
    events = mixed(args.n)

    # the pure floor, per type and overall
    view = GateView(gear="ACCELERATED", facts={"grid.state": "normal"})
    for e in events[:50]:  # warm caches (domain build, regexes)
        decide(view, e)

    def floor_run() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        for e in events:
            decide(view, e)
        return time.perf_counter() - t0, time.process_time() - c0

    floor, floor_cpu = floor_run()
    per_type = {}
    for cls in (ev.IntentCreated, ev.CodeProposed, ev.StateProposed):
        sub = [e for e in events if isinstance(e, cls)]
        t = time.perf_counter()
        for e in sub:
            decide(view, e)
        per_type[cls.type_name()] = len(sub) / (time.perf_counter() - t)

    modes = [True, False] if args.per_message else [True]
    # (batched, concurrency) -> [(gate s, floor s, gate cpu, floor cpu)]
    results: dict[tuple[bool, int], list[tuple[float, float, float, float]]] = {(b, c): [] for b in modes for c in (1, 8)}
    decisions: dict[str, int] = {}
    # a fresh server per run: verdict ids derive from the events (dedup); modes interleaved
    for conc, batched in [(c, b) for c in (1, 8) for _ in range(args.rounds) for b in modes]:
        tmp = Path(tempfile.mkdtemp(prefix="bench-safety-"))
        server = ServerProcess(tmp / "nats", free_port()).start()
        try:
            settings = Settings(home=str(tmp / "home"), nats_url=server.url, source="bench")
            init_home(settings)
            bus = await Bus.connect(settings, "bench")
            await ensure(bus.js)
            await (await bus.kv("scf_context")).put("grid.state", b"normal")
            await gears.write_gear(bus, gears.GearState(gear="ACCELERATED"))
            await bus.publish_many(events)
            before = floor_run()
            gate_s, gate_cpu = await run_gate(settings, events, conc, f"bench-safety-{conc}", batched)
            after = floor_run()
            results[(batched, conc)].append((gate_s, (before[0] + after[0]) / 2, gate_cpu, (before[1] + after[1]) / 2))
            info = await bus.js.stream_info("VERDICTS")
            assert info.state.messages == len(events), info.state.messages
            if not decisions:
                sub = await bus.js.subscribe("verdict.>", stream="VERDICTS", ordered_consumer=True)
                for _ in range(len(events)):
                    m = await sub.next_msg(timeout=5)
                    k = m.subject.split(".", 1)[1]
                    decisions[k] = decisions.get(k, 0) + 1
            await bus.close()
        finally:
            server.stop()

    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, load {os.getloadavg()[0]:.2f}")
    print(f"stream: {args.n} events (40 % intents, 40 % code, 20 % states); verdicts: "
          + ", ".join(f"{k} {v}" for k, v in sorted(decisions.items())))
    print()
    print("| measure | verdicts/s | vs decide floor (median of runs; each run against its own floors) | CPU µs/verdict | CPU vs floor |")
    print("|---|---|---|---|---|")
    fl = args.n / floor
    print(f"| decide floor (pure, no NATS), first run | {fl:,.0f} | 1.00× | {floor_cpu / args.n * 1e6:.0f} | 1.00× |")
    for (batched, conc), runs in results.items():
        ratios = sorted(f / g for g, f, _, _ in runs)
        cpu = sorted(fc / gc for _, _, gc, fc in runs)
        rates = ", ".join(f"{args.n / g:,.0f}" for g, _, _, _ in runs)
        floors = ", ".join(f"{args.n / f:,.0f}" for _, f, _, _ in runs)
        how = "batched (`scf run safety`)" if batched else "per-message runner (before)"
        print(f"| gate, {how}, concurrency {conc} | {rates} (floors {floors}) | **{statistics.median(ratios):.2f}×** "
              f"({', '.join(f'{r:.2f}' for r in ratios)}) | {statistics.median([gc for _, _, gc, _ in runs]) / args.n * 1e6:.0f} | "
              f"{statistics.median(cpu):.2f}× |")
    for name, rate in per_type.items():
        print(f"| decide floor, {name} only | {rate:,.0f} | | | |")


if __name__ == "__main__":
    asyncio.run(main())
