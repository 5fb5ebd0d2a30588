"""Simulator benchmark: simulated plant-hours per second, 1,000 scenarios in one batch
against the same simulator run one scenario at a time (same run, same machine).

    python benchmarks/bench_simulate.py [--scenarios 1000] [--hours 24] [--loop 20]

* **batched**: `dynamics.simulate(domain, scenarios=N, hours=H)`, end to end (disturbances,
  the closed loop, for grids the frequency event, the Arrow tables), timed once.
* **one at a time** (baseline): the same call with `scenarios=1`, for `--loop` seeds in a
  row; its rate (plant-hours / s) is what a Python loop over scenarios would reach.

Plant-hours: scenarios x simulated hours. HVAC: office3 under the thermostat at 5-minute
steps. Grid: case14 (DC-OPF dispatch at 5-minute steps + a 60 s frequency event after the
largest unit trips) and case118 (the same on 54 units).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scf.domains import dynamics  # noqa: E402


def rate(domain: str, scenarios: int, hours: float, seed: int = 0, controller: str | None = None) -> float:
    start = time.perf_counter()
    dynamics.simulate(domain, scenarios=scenarios, hours=hours, seed=seed, controller=controller)
    return scenarios * hours / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", type=int, default=1000)
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--loop", type=int, default=20, help="scenarios simulated one at a time for the baseline")
    ap.add_argument("--domains", default="hvac:office3,grid:case14,grid:case118")
    args = ap.parse_args()
    print(f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
    print(f"# {args.scenarios} scenarios x {args.hours:g} h batched; baseline: {args.loop} scenarios one at a time")
    print("| domain | batched (plant-h/s) | one at a time (plant-h/s) | ratio |")
    print("|---|---|---|---|")
    for domain in args.domains.split(","):
        rate(domain, 2, 1.0)  # warm: imports, the domain's matrices, HiGHS
        single = sum(args.hours for _ in range(args.loop)) / sum(args.hours / rate(domain, 1, args.hours, seed=i) for i in range(args.loop))
        batched = rate(domain, args.scenarios, args.hours)
        print(f"| {domain} | {batched:,.0f} | {single:,.0f} | **{batched / single:.0f}x** |", flush=True)


if __name__ == "__main__":
    main()
