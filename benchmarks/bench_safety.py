"""Safety-gate benchmark: verdicts per second on a mixed stream.

    python benchmarks/bench_safety.py [--n 3000]

The stream (published to INTENTS before the gate starts): 40 % intents (train / optimise /
deploy / an unknown kind, grid and HVAC domains, context facts in scf_context), 40 % code
proposals (the ethics corpus of tests/data/ethics, malicious and benign, in turn), 20 %
proposed states of grid:case14 (feasible reference dispatches and perturbed ones).

* **gate**: `SafetyGate` (what `scf run safety` runs), in this process, with its durable
  consumer: the clock runs from the runner's start until it has handled N events; at
  concurrency 1 (in the loop, in order) and at the default (8) with `decide` in the loop
  and in forked decide workers (`--workers`, default "0,auto": `[safety] decide_workers`).
* **decide floor** (baseline, same run): the pure `decide(view, event)` over the same
  events in a loop, in one process — rules, AST analysis, physics — without NATS: the CPU
  the gate must pay. Per type as well, to show where the time goes.

On a shared machine the load changes from second to second, so the floor is measured right
before and right after every gate run and each run's ratio is taken against the mean of its
two floors (`--rounds` runs per configuration, configurations interleaved, median ratio
reported, the load average at each run's start printed). The CPU columns compare the gate's
CPU — this process's plus its decide workers' — with the floor's, over the same window as
the clock (connecting, reading the rules, the gear and the facts, forking the workers and
closing are outside it, as they are outside the floor's); the nats-server's CPU is shown
apart. The end of a run is seen when the runner counts the last event (no polling: polls
cost the gate CPU). Every run's verdicts are read back and must be the same in every
configuration (a digest of their contents).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
import numpy as np  # noqa: E402

from scf import domains  # noqa: E402
from scf.bus import codec, gears  # noqa: E402
from scf.bus import events as ev  # noqa: E402
from scf.bus.client import Bus  # noqa: E402
from scf.bus.runner import RunnerStats  # noqa: E402
from scf.bus.server import ServerProcess, free_port  # noqa: E402
from scf.bus.settings import Settings, init_home  # noqa: E402
from scf.bus.streams import ConsumerSpec, ensure  # noqa: E402
from scf.consumers import safety as safety_mod  # noqa: E402
from scf.consumers.safety import GateView, SafetyGate, SafetySettings, decide  # noqa: E402

try:
    from scf.consumers.safety import decide_workers
except ImportError:  # a tree from before the decide workers (this script run against it, for a before/after)
    decide_workers = None

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


# --decide-cpu: the CPU of each `decide` call (this thread's), by event type, in the floor's
# loop and inside the gate's runs (in the loop only): where = "floor" | "gate"
DECIDE_CPU: dict[tuple[str, str], list[float]] = {}
_WHERE = ["floor"]
_decide = decide


def timed_decide(view, event, **kw):
    c0 = time.thread_time()
    out = _decide(view, event, **kw)
    acc = DECIDE_CPU.setdefault((_WHERE[0], event.type_name()), [0.0, 0])
    acc[0] += time.thread_time() - c0
    acc[1] += 1
    return out


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def run_delay() -> float:
    """Seconds this thread has waited on a run queue, runnable but not running (Linux; 0 elsewhere)."""
    try:
        return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def proc_cpu(pid: int) -> float | None:
    """A process's CPU seconds so far (Linux /proc; None elsewhere)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


class _Counted(RunnerStats):
    """The runner's counters, setting `done` when `n` messages are handled."""

    def __init__(self, n: int, done: asyncio.Event) -> None:
        object.__setattr__(self, "_n", n)
        object.__setattr__(self, "_done", done)
        super().__init__()

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "handled" and value >= self._n:
            self._done.set()


async def run_gate(settings: Settings, events: list[ev.Event], concurrency: int, durable: str, batched: bool = True,
                   workers: int = 0) -> tuple[float, float, float, float]:
    """(wall s, CPU s of this process, CPU s of its decide workers, s this thread waited on a
    run queue) from the runner's start
    until it has handled every event: the same window for all (connecting, reading the rules
    and the gear, forking the workers, closing are outside it, as they are outside the
    floor's; the workers' CPU is read when they have exited: they do nothing outside the
    window but start and stop)."""
    bus = await Bus.connect(settings, "bench-gate")
    pool = {"decide_workers": workers} if "decide_workers" in SafetySettings.__struct_fields__ else {}
    gate = SafetyGate(bus, SafetySettings(concurrency=concurrency, **pool))
    await gate.start()
    kids0 = children_cpu()
    spec = ConsumerSpec("INTENTS", durable, ("intent.>", "code.>", "state.>"))
    runner = gate.runner(spec)
    runner.batched = batched  # False: the runner's per-message path (what the gate ran before it was batched)
    stop, all_in = asyncio.Event(), asyncio.Event()
    runner.stats = _Counted(len(events), all_in)  # the end seen when it comes, not by polling (the polls cost the gate CPU)
    t0, c0, q0 = time.perf_counter(), time.process_time(), run_delay()
    task = asyncio.create_task(runner.run(stop))
    waiter = asyncio.create_task(all_in.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if not all_in.is_set():
        task.result()  # the runner ended first: its error
    dt, cpu, queued = time.perf_counter() - t0, time.process_time() - c0, run_delay() - q0
    stop.set()
    await task
    await gate.stop()  # reaps the workers: their CPU is in RUSAGE_CHILDREN from here
    await bus.close()
    return dt, cpu, children_cpu() - kids0, queued


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2, help="gate runs per concurrency, each between two floor runs")
    ap.add_argument("--workers", default="0,auto",
                    help="decide workers to run the gate with at concurrency 8, comma-separated (auto: what `decide_workers = -1` gives here)")
    ap.add_argument("--decide-cpu", action="store_true",
                    help="time each decide call (thread CPU) in the floor's loop and inside the gate (decide in the loop): is it dearer there?")
    ap.add_argument("--per-message", action="store_true", help="also run the gate on the runner's per-message path (the gate before batching)")
    args = ap.parse_args()
    events = mixed(args.n)

    # the pure floor, per type and overall
    view = GateView(gear="ACCELERATED", facts={"grid.state": "normal"})
    for e in events[:50]:  # warm caches (domain build, regexes)
        decide(view, e)

    rule = timed_decide if args.decide_cpu else decide

    def floor_run() -> tuple[float, float]:
        _WHERE[0] = "floor"
        t0, c0 = time.perf_counter(), time.process_time()
        for e in events:
            rule(view, e)
        return time.perf_counter() - t0, time.process_time() - c0

    floor, floor_cpu = floor_run()
    per_type = {}
    for cls in (ev.IntentCreated, ev.CodeProposed, ev.StateProposed):
        sub = [e for e in events if isinstance(e, cls)]
        t = time.perf_counter()
        for e in sub:
            decide(view, e)
        per_type[cls.type_name()] = len(sub) / (time.perf_counter() - t)

    auto = decide_workers(SafetySettings(concurrency=8)) if decide_workers is not None else 0
    pools = sorted({auto if w == "auto" else int(w) for w in args.workers.split(",")})
    # (batched, concurrency, decide workers); the per-message path and concurrency 1 rule in the loop
    configs = [(True, 1, 0)] + [(True, 8, w) for w in pools]
    if args.per_message:
        configs += [(False, 1, 0), (False, 8, 0)]
    # config -> [(gate s, floor s, gate cpu, floor cpu, workers' cpu, server cpu, run-queue wait)]
    results: dict[tuple[bool, int, int], list[tuple[float, float, float, float, float, float, float]]] = {c: [] for c in configs}
    decisions: dict[str, int] = {}
    rulings: set[str] = set()  # a digest of every run's verdicts: the same in every configuration
    loads = []
    # a fresh server per run: verdict ids derive from the events (dedup); configurations interleaved
    for _, (batched, conc, workers) in [(r, c) for r in range(args.rounds) for c in configs]:
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
            loads.append(os.getloadavg()[0])
            before = floor_run()
            s0 = proc_cpu(server.proc.pid)
            if args.decide_cpu and not workers:
                _WHERE[0] = "gate"
                safety_mod.decide = timed_decide
            try:
                gate_s, gate_cpu, kids_cpu, queued = await run_gate(settings, events, conc, f"bench-safety-{conc}", batched, workers)
            finally:
                safety_mod.decide = _decide
            s1 = proc_cpu(server.proc.pid)
            after = floor_run()
            results[(batched, conc, workers)].append((gate_s, (before[0] + after[0]) / 2, gate_cpu, (before[1] + after[1]) / 2,
                                                      kids_cpu, (s1 - s0) if s0 is not None and s1 is not None else float("nan"), queued))
            info = await bus.js.stream_info("VERDICTS")
            assert info.state.messages == len(events), info.state.messages
            sub = await bus.js.subscribe("verdict.>", stream="VERDICTS", ordered_consumer=True)
            verdicts = [codec.decode((await sub.next_msg(timeout=5)).data).data for _ in range(len(events))]
            digest = hashlib.sha256()
            for body in sorted(msgspec.json.encode(v) for v in verdicts):
                digest.update(body)
            rulings.add(digest.hexdigest())
            if not decisions:
                for v in verdicts:
                    k = f"{v.subject_type}.{v.decision.lower()}"
                    decisions[k] = decisions.get(k, 0) + 1
            await bus.close()
        finally:
            server.stop()
    assert len(rulings) == 1, f"the verdicts differ between configurations: {len(rulings)} digests"
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores ({cores()} usable), Python {platform.python_version()}, "
          f"load average {min(loads):.1f}-{max(loads):.1f} at the runs' starts (median {statistics.median(loads):.1f})")
    print(f"stream: {args.n} events (40 % intents, 40 % code, 20 % states); verdicts (the same in every run): "
          + ", ".join(f"{k} {v}" for k, v in sorted(decisions.items())))
    print()
    print("Wall: verdicts/s against the floor measured right before and after the run. CPU: the floor's CPU over the "
          "gate's (this process plus its decide workers; the server's not counted, shown apart).")
    print()
    print("Gate's wall split (this process's main thread, share of the wall): running (its CPU), runnable but waiting "
          "for a CPU (the run queue: the machine's load), and waiting on the server or the workers (the rest).")
    print()
    print("| measure | verdicts/s (floors) | wall vs floor, median (runs) | CPU µs/verdict: gate + workers | CPU vs floor, median (runs) "
          "| server CPU µs/verdict | gate wall: running / run queue / waiting |")
    print("|---|---|---|---|---|---|---|")
    print(f"| decide floor (pure, no NATS, one process), first run | {args.n / floor:,.0f} | 1.00× | {floor_cpu / args.n * 1e6:.0f} | 1.00× | | |")
    for (batched, conc, workers), runs in results.items():
        ratios = sorted(f / g for g, f, *_ in runs)
        cpu = sorted(fc / (gc + kc) for _, _, gc, fc, kc, *_ in runs)
        rates = ", ".join(f"{args.n / r[0]:,.0f}" for r in runs)
        floors = ", ".join(f"{args.n / r[1]:,.0f}" for r in runs)
        how = "batched (`scf run safety`)" if batched else "per-message runner (before)"
        where = f"{workers} decide workers" if workers else "decide in the loop"
        gc = statistics.median([r[2] for r in runs]) / args.n * 1e6
        kc = statistics.median([r[4] for r in runs]) / args.n * 1e6
        sc = statistics.median([r[5] for r in runs]) / args.n * 1e6
        run_share = statistics.median([r[2] / r[0] for r in runs])
        queue_share = statistics.median([r[6] / r[0] for r in runs])
        wait_share = statistics.median([max(0.0, 1 - (r[2] + r[6]) / r[0]) for r in runs])
        print(f"| gate, {how}, concurrency {conc}, {where} | {rates} ({floors}) | **{statistics.median(ratios):.2f}×** "
              f"({', '.join(f'{r:.2f}' for r in ratios)}) | {gc:.0f} + {kc:.0f} | {statistics.median(cpu):.2f}× "
              f"({', '.join(f'{r:.2f}' for r in cpu)}) | {sc:.0f} | {run_share:.0%} / {queue_share:.0%} / {wait_share:.0%} |")
    for name, rate in per_type.items():
        print(f"| decide floor, {name} only | {rate:,.0f} | | | | | |")
    if args.decide_cpu:
        print()
        print("`decide`'s own CPU a call (thread CPU, every call of every run), in the floor's loop and inside the gate's runs (decide in the loop):")
        print()
        print("| event type | floor µs (calls) | inside the gate µs (calls) | gate / floor |")
        print("|---|---|---|---|")
        for name in per_type:
            f, g = DECIDE_CPU.get(("floor", name), [0.0, 0]), DECIDE_CPU.get(("gate", name), [0.0, 0])
            if f[1] and g[1]:
                print(f"| {name} | {f[0] / f[1] * 1e6:.0f} ({f[1]}) | {g[0] / g[1] * 1e6:.0f} ({g[1]}) | {(g[0] / g[1]) / (f[0] / f[1]):.2f}× |")


if __name__ == "__main__":
    asyncio.run(main())
