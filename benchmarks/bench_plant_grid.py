"""Grid control-loop benchmark: simulated plant-hours per second through the edge's grid
loop (telemetry, decide, repair in the ramp/outage window, envelope, setpoint), against
the bare grid site stepping under the status quo (same run, same machine); and what
signing the setpoints costs.

    python benchmarks/bench_plant_grid.py [--hours 48] [--mqtt]

Rows (grid:case30, 15-minute control period, seed 3):
* **bare site** (baseline): `GridSite.apply` under the status-quo rule, no loop machinery
  (each step includes the site's N-1 nadir, an SFR integration);
* **loop, status quo** / **loop, deployed OPF decision**: `GridControlLoop` on the
  in-process site (the decision from hour 24: repair each step, envelope, no M&V);
* **over MQTT, unsigned** / **signed** (`--mqtt`, needs `mosquitto`): `scf run plant
  --domain grid:case30` as its own process through a local broker, lock-step; signed: the
  edge seals every setpoint and the plant verifies it (`--trust`);
* **seal + verify** of one setpoint, against encoding it as plain JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
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

import msgspec  # noqa: E402
import numpy as np  # noqa: E402

from scf.consumers.edge.control import ControlSettings  # noqa: E402
from scf.consumers.edge.grid_control import GridControlLoop  # noqa: E402
from scf.consumers.edge.grid_plant import GRID_TELEMETRY, GridSetpoint, GridSimPlant, GridSite, GridSiteOptions  # noqa: E402
from scf.consumers.edge.plant import MqttPlant, PlantEnded  # noqa: E402
from scf.domains import grid_dynamics as gd  # noqa: E402
from tests.test_plant_grid import installed, opf_schedule  # noqa: E402

DOMAIN = "grid:case30"


def bare(hours: float) -> float:
    site = GridSite(GridSiteOptions(domain=DOMAIN, hours=hours))
    start = time.perf_counter()
    while not site.ended:
        t = site.last
        site.apply(gd.status_quo_setpoint(site.plant, np.asarray(t.pg_mw), np.asarray(t.available), np.asarray(t.load_mw)))
    return hours / (time.perf_counter() - start)


async def loop_rate(hours: float, model: bool, plant=None) -> float:
    d = Path(tempfile.mkdtemp(prefix="bench-grid-"))
    try:
        settings = ControlSettings(domain=DOMAIN, min_history_hours=24, report_hours=1e9)
        item = installed(d, "ck-opf", opf_schedule()) if model else None
        plant = plant or GridSimPlant(GridSiteOptions(domain=DOMAIN, hours=hours))
        loop = GridControlLoop(plant, "bench", d, settings, current=lambda: item if loop.last_seq >= 96 else None)
        first = 97 if model else 1
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
        print(f"#   {steps} periods timed in {elapsed:.2f} s", file=sys.stderr)
        return steps * 0.25 / elapsed
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def mqtt_rate(hours: float, signed: bool) -> float | None:
    from scf.bus.signing import SigningKey
    from scf.consumers.edge.plant_auth import Signer
    from tests.plant_support import Mosquitto

    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        return None
    tmp = Path(tempfile.mkdtemp(prefix="bench-mqtt-"))
    broker = Mosquitto(tmp)
    key = SigningKey.generate("bench")
    key.save(tmp / "keys")
    argv = [sys.executable, "-m", "scf.cli.main", "run", "plant", "--mqtt", broker.address, "--site", "bench", "--domain", DOMAIN,
            "--hours", str(hours)] + (["--trust", str(tmp / "keys" / "bench.pub")] if signed else [])
    env = dict(os.environ, SCF_HOME=str(tmp / "home"))
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    try:
        plant = await MqttPlant("127.0.0.1", broker.port, "bench", decoder=GRID_TELEMETRY, signer=Signer(key) if signed else None).connect()
        try:
            return await loop_rate(hours, model=True, plant=plant)
        finally:
            await plant.close()
    finally:
        proc.terminate()
        proc.wait(10)
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def seal_cost(n: int = 2000) -> tuple[float, float]:
    """(µs to encode a setpoint as plain JSON, µs to seal and verify it)."""
    from scf.bus.signing import SigningKey, TrustList
    from scf.consumers.edge.plant_auth import Signer, Verifier

    key = SigningKey.generate("n1")
    trust = TrustList()
    trust.trust(key.public_b64, "n1", ["node"])
    signer, verifier = Signer(key), Verifier(trust)
    sp = GridSetpoint(seq=1, pg_mw=[40.1, 40.2, 25.3, 27.4, 15.5, 20.6], controller="ck-opf")
    topic = "scf/plant/bench/setpoint"
    start = time.perf_counter()
    for _ in range(n):
        msgspec.json.decode(msgspec.json.encode(sp), type=GridSetpoint)
    plain = (time.perf_counter() - start) / n * 1e6
    now = dt.datetime.now(dt.timezone.utc)
    start = time.perf_counter()
    for _ in range(n):
        msgspec.json.decode(verifier.open(topic, signer.seal(topic, sp, now=now), now=now), type=GridSetpoint)
    return plain, (time.perf_counter() - start) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=48.0)
    ap.add_argument("--mqtt", action="store_true", help="also through a local mosquitto and `scf run plant`, unsigned and signed")
    args = ap.parse_args()
    print(f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}; {DOMAIN}, {args.hours:g} simulated hours, 15-min control period")
    base = bare(args.hours)
    rows = [("bare site (baseline)", base)]
    rows.append(("loop, status quo", asyncio.run(loop_rate(args.hours, model=False))))
    rows.append(("loop, deployed OPF decision", asyncio.run(loop_rate(args.hours, model=True))))
    if args.mqtt:
        for signed in (False, True):
            rate = asyncio.run(mqtt_rate(args.hours, signed))
            if rate is not None:
                rows.append((f"over MQTT, {'signed (edge seals, plant verifies)' if signed else 'unsigned'}", rate))
    print("| path | plant-h/s | vs bare site |\n|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} | {rate / base:.3f}× |")
    plain, sealed = seal_cost()
    print(f"\n| one setpoint | µs | vs plain JSON |\n|---|---|---|\n| encode + decode, plain JSON (baseline) | {plain:.1f} | 1.0× |\n"
          f"| seal + verify + decode (Ed25519) | {sealed:.1f} | {sealed / plain:.0f}× |")


if __name__ == "__main__":
    main()
