"""Control-loop benchmark: simulated plant-hours per second through the edge control loop
(telemetry, decide, repair, envelope, monitor, setpoint), against the bare simulator
stepping the same site under the same thermostat (same run, same machine).

    python benchmarks/bench_plant.py [--hours 96] [--mqtt]

Rows (one site, office3, 15-minute control period, seed 10):
* **bare plant** (baseline): `HvacPlant.step` in a Python loop under the thermostat, no loop machinery;
* **loop, status quo**: `ControlLoop` on the in-process `SimPlant`, no model deployed;
* **loop, deployed decision**: a day-ahead decision from hour 24 (repair each hour, the
  envelope and the monitor each period), no M&V; timed after the first model period (which
  calibrates the site's model once, 1-3 s);
* **loop + M&V**: the same with a measurement every 24 h (calibration once, a
  counterfactual simulation per measurement);
* **over MQTT** (`--mqtt`, needs `mosquitto`): `scf run plant` as a separate process
  through a local broker, lock-step.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from scf.consumers.edge.control import ControlLoop, ControlSettings  # noqa: E402
from scf.consumers.edge.plant import HvacSite, MqttPlant, PlantEnded, SimPlant  # noqa: E402
from tests.plant_support import installed  # noqa: E402


def bare(hours: float) -> float:
    from scf.domains.hvac_dynamics import thermostat

    site = HvacSite(ControlSettings(sim_hours=hours).site())
    rule = thermostat(site.plant)
    start = time.perf_counter()
    while not site.ended:
        k = site.seq
        u = rule(k, site.state, site.dist.at(k))
        site.state, _ = site.plant.step(site.state, u, site.dist.at(k), site.dist.at(k + 1))
        site.seq += 1
    return hours / (time.perf_counter() - start)


async def loop_rate(hours: float, model: bool, mv: bool, plant=None) -> float:
    d = Path(tempfile.mkdtemp(prefix="bench-plant-"))
    try:
        settings = ControlSettings(sim_hours=hours, min_history_hours=24, report_hours=24 if mv else 1e9)
        item = installed(d, "ck-bench", "good") if model else None
        plant = plant or SimPlant(settings.site())
        loop = ControlLoop(plant, "bench", d, settings, current=lambda: item if loop.last_seq >= 96 else None)
        # timed from the second period under the model (the first calibrates the site's
        # model once, 1-3 s: reported apart) to the end: the steady-state rate
        first = 98 if model else 1
        steps, start = 0, None
        while True:
            try:
                tel = await plant.telemetry(loop.last_seq)
            except PlantEnded:
                break
            loop.last_seq = tel.seq
            if tel.seq == first:
                start = time.perf_counter()
            await plant.write(await loop.step(tel))
            steps += start is not None
            if isinstance(plant, MqttPlant) and tel.seq >= hours * 4 - 1:
                break
        elapsed = time.perf_counter() - start
        if mv:
            assert loop.measured, "no measurement was made"
        print(f"#   {steps} periods timed in {elapsed:.2f} s", file=sys.stderr)
        return steps * settings.sim_step_minutes / 60.0 / elapsed
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def mqtt_rate(hours: float) -> float | None:
    from tests.plant_support import Mosquitto

    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        return None
    tmp = Path(tempfile.mkdtemp(prefix="bench-mqtt-"))
    broker = Mosquitto(tmp)
    proc = subprocess.Popen([sys.executable, "-m", "scf.cli.main", "run", "plant", "--mqtt", broker.address, "--site", "bench",
                             "--hours", str(hours)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        plant = await MqttPlant("127.0.0.1", broker.port, "bench").connect()
        try:
            return await loop_rate(hours, model=True, mv=False, plant=plant)
        finally:
            await plant.close()
    finally:
        proc.terminate()
        proc.wait(10)
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=96.0)
    ap.add_argument("--mqtt", action="store_true", help="also through a local mosquitto and `scf run plant`")
    args = ap.parse_args()
    print(f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}; {args.hours:g} simulated hours, 15-min control period")
    base = bare(args.hours)
    rows = [("bare plant (baseline)", base)]
    rows.append(("loop, status quo", asyncio.run(loop_rate(args.hours, model=False, mv=False))))
    rows.append(("loop, deployed decision", asyncio.run(loop_rate(args.hours, model=True, mv=False))))
    rows.append(("loop + M&V (24 h reports)", asyncio.run(loop_rate(args.hours, model=True, mv=True))))
    if args.mqtt:
        r = asyncio.run(mqtt_rate(args.hours))
        if r is not None:
            rows.append(("loop over MQTT (scf run plant)", r))
    print("| path | plant-h/s | vs bare plant |")
    print("|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r:,.0f} | {r / base:.3f}× |")


if __name__ == "__main__":
    main()
