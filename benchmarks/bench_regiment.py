"""Regiment benchmark: one pass over N contracts (default 1000), time per contract and what
bounds it, against one strike alone measured in the same run.

    python benchmarks/bench_regiment.py [--contracts 1000] [--concurrency 4] [--edges 4] [--measure sim|none]

Real parts: a nats-server, `scf run safety`, `scf run deploy` and E `scf run edge` agents
as processes; the gear is HYPER (no human in the loop: the gate still rules on every state
and deploy intent); the contracts (office3, outdoor temperatures spread over 5-13 °C) are
spread round-robin over the E nodes. Each strike: 24 certified LPs, the gate's checks
offline and 24 `state.proposed` ruled by the running gate, a signed capsule promoted and
deployed (the edge agent fetches, verifies and activates it), and with `--measure sim` the
capsule run on the simulated site by the edge control loop (48 h: 24 h of status-quo
history, then the capsule; M&V).

Printed: the single strike (baseline) and the pass: wall time, contracts per minute, time
per contract, the ratio to the baseline, and the mean seconds per phase (`setup`,
`optimise`, `verify_offline`, `gate`, `capsule_and_approval`, `deploy`, `measure`,
`proof`) — the phase that dominates is what bounds the pass.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scf.bus.client import Bus  # noqa: E402
from scf.bus.gears import GearState, write_gear  # noqa: E402
from scf.bus.server import ServerProcess, free_port  # noqa: E402
from scf.bus.settings import load  # noqa: E402
from scf.bus.streams import ensure  # noqa: E402
from scf.producers import contracts, regiment  # noqa: E402
from scf.producers import strike as st  # noqa: E402
from tests.test_deploy_helpers import Keys, node_runs, start_edge, start_process, stop  # noqa: E402

PHASES = ("setup", "optimise", "verify_offline", "gate", "capsule_and_approval", "deploy", "measure", "proof")


def phases(results) -> dict[str, float]:
    ok = [r for r in results if r.timings]
    return {p: sum(r.timings.get(p, 0.0) for r in ok) / max(1, len(ok)) for p in PHASES}


async def main(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="scf-bench-regiment-"))
    server = ServerProcess(tmp / "store", free_port())
    server.start()
    os.environ.update({"SCF_HOME": str(tmp / "home"), "NATS_URL": server.url})
    settings = load(home=tmp / "home").with_source("bench")
    settings.keys_dir.mkdir(parents=True, exist_ok=True)
    keys = Keys(settings)
    nodes = [f"edge-{i}" for i in range(args.edges)]
    for n in nodes:
        keys.node(n)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    logd = tmp / "logs"
    logd.mkdir()
    bus = await Bus.connect(settings, "bench")
    await ensure(bus.js)
    await write_gear(bus, GearState(gear="HYPER"))
    procs = [start_process(env, "safety", logd), start_process(env, "deploy", logd)]
    procs += [start_edge(env, n, tmp / n, logd, {"domain": "hvac:office3"}) for n in nodes]
    try:
        for n in nodes:
            while not await node_runs(bus, n, None):
                await asyncio.sleep(0.2)
        op = await Bus.connect(settings, "operator", key=keys.operator)  # the regiment strikes operator-signed contracts
        for i in range(args.contracts + 1):
            doc = {"contract_id": f"c{i:05d}", "client": f"client {i}", "domain": "hvac:office3", "nodes": [nodes[i % len(nodes)]],
                   "constraints": {"T_out": 5.0 + (i % 9), "preheat_hours": 3}, "schedule_s": 0}
            await contracts.add(op, contracts.parse_doc(doc))
        await op.close()
        opts = st.StrikeOptions(measure=args.measure, wait_s=120.0, sim_hours=48.0, history_hours=24.0)
        first = (await contracts.load(bus, "c00000"))["c00000"]
        t0 = time.perf_counter()
        base = await st.strike(bus, settings, first.spec, key=keys.release, trust=keys.trust, opts=opts, contract_seq=first.seq,
                               contract_event_id=first.event_id)
        single = time.perf_counter() - t0
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; measure={args.measure}, "
              f"edges={args.edges}, concurrency={args.concurrency}")
        print(f"single strike (baseline): {single:.2f} s, status {base.status}; phases "
              + ", ".join(f"{p} {base.timings.get(p, 0.0):.2f}" for p in PHASES))
        t0 = time.perf_counter()
        report = await regiment.one_pass(bus, settings, key=keys.release, trust=keys.trust, opts=opts, concurrency=args.concurrency)
        wall = time.perf_counter() - t0
        per = wall / max(1, report.due)
        print(f"pass: {report.contracts} contracts, {report.due} due, {report.statuses()} in {wall:.1f} s: "
              f"{60 * report.due / wall:.1f} contracts/min, {per:.2f} s per contract ({per / single:.2f}x the single strike)")
        mean = phases(report.results)
        top = max(mean, key=mean.get)
        print("mean seconds per phase in the pass: " + ", ".join(f"{p} {mean[p]:.2f}" for p in PHASES) + f"  (bound: {top})")
    finally:
        for p in procs:
            stop(p)
        await bus.close()
        server.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contracts", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--edges", type=int, default=4)
    ap.add_argument("--measure", choices=st.MEASURE_MODES, default="sim")
    asyncio.run(main(ap.parse_args()))
