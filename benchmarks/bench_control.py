"""Control-plane benchmark: how long a control command takes to be applied, at each gear.

    python benchmarks/bench_control.py [--n 200]

A real nats-server and a real `scf run daemon` process (SCF_SANDBOX=1, so SINGULARITY is
allowed). For each gear in turn:

* **command → effect**: `--n` commands, one at a time, alternating `control.stop` /
  `control.resume`, published as plain JSON with nats-py; the clock runs from the publish
  call until the effect event (`gear.daemon.stopped` / `resumed`) reaches a core NATS
  subscriber. Commands are consumed by the daemon's durable consumer, not paced by the
  heartbeat, so this should be flat across gears.
* **fossil → intent** (the pulse): with a threshold of one fossil, one fossil is recorded
  at a random phase of the pulse and the clock runs until its `intent.created.train.*`
  arrives; this one waits for the next pulse, so it follows the gear's heartbeat
  (expected: mean half a heartbeat, max one heartbeat).

Baseline (same run, same server): a JetStream publish with its ack, one at a time — the
floor any command pays before the daemon even sees it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
import nats  # noqa: E402

from scf.bus import gears  # noqa: E402
from scf.bus.client import Bus  # noqa: E402
from scf.bus.server import ServerProcess, free_port  # noqa: E402
from scf.bus.settings import Settings, init_home  # noqa: E402
from scf.bus.streams import KEY_DAEMON, ensure  # noqa: E402
from tests.daemon_support import fossil  # noqa: E402

ORIENT_SAMPLES = {"STANDARD": 4, "ACCELERATED": 10, "HYPER": 30, "SINGULARITY": 30}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="commands per gear")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-control-"))
    server = ServerProcess(tmp / "nats", free_port()).start()
    daemon = None
    try:
        settings = Settings(home=str(tmp / "home"), nats_url=server.url, source="bench")
        init_home(settings)
        (tmp / "home" / "scf.toml").write_text(
            "[daemon]\nverify_checkpoints = \"off\"\n"
            "train_threshold = { STANDARD = 1, ACCELERATED = 1, HYPER = 1, SINGULARITY = 1 }\n"
        )
        bus = await Bus.connect(settings, "bench")
        await ensure(bus.js)
        env = dict(os.environ, NATS_URL=server.url, SCF_HOME=settings.home, SCF_SANDBOX="1", PYTHONUNBUFFERED="1")
        env.pop("SCF_KEY", None)
        log = open(tmp / "daemon.log", "wb")
        daemon = subprocess.Popen([sys.executable, "-m", "scf.cli.main", "run", "daemon"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

        kv = await bus.kv("scf_state")
        deadline = time.monotonic() + 60
        while True:
            try:
                entry = await kv.get(KEY_DAEMON)
                if msgspec.json.decode(entry.value).get("ready"):
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the daemon did not become ready: see {tmp / 'daemon.log'}")
            await asyncio.sleep(0.1)

        nc = await nats.connect(server.url)
        js = nc.jetstream()
        effects: asyncio.Queue = asyncio.Queue()
        intents: asyncio.Queue = asyncio.Queue()
        async def on_effect(m) -> None:
            effects.put_nowait((time.perf_counter(), m.subject))

        async def on_intent(m) -> None:
            intents.put_nowait(time.perf_counter())

        await nc.subscribe("gear.>", cb=on_effect)
        await nc.subscribe("intent.created.>", cb=on_intent)
        await nc.flush()

        # baseline: one awaited JetStream publish at a time (a command nobody applies)
        base = []
        for i in range(args.n):
            t0 = time.perf_counter()
            await js.publish("control.bench_noop", b"{}")
            base.append(time.perf_counter() - t0)
        # the daemon rejects control.bench_noop (unknown verb): let those drain first
        await asyncio.sleep(1.0)

        rows = []
        fossil_i = 0
        rng = random.Random(0)
        for gear in ev_gears():
            if gear != "STANDARD":
                await js.publish("control.shift_gear", json.dumps({"level": gear}).encode())
                while True:
                    _, subject = await asyncio.wait_for(effects.get(), 30)
                    if subject == "gear.changed":
                        break
            lat = []
            for i in range(args.n):
                verb, want = ("stop", "gear.daemon.stopped") if i % 2 == 0 else ("resume", "gear.daemon.resumed")
                t0 = time.perf_counter()
                await js.publish(f"control.{verb}", b"{}")
                while True:
                    t1, subject = await asyncio.wait_for(effects.get(), 30)
                    if subject == want:
                        break
                lat.append(t1 - t0)
            if args.n % 2:  # leave the daemon running
                await js.publish("control.resume", b"{}")
                await asyncio.wait_for(effects.get(), 30)
            while not intents.empty():
                intents.get_nowait()
            orient = []
            hb = gears.spec(gear).heartbeat_s
            for _ in range(ORIENT_SAMPLES[gear]):
                await asyncio.sleep(rng.uniform(0, hb))  # a random phase against the pulse
                e = fossil("grid:case14", fossil_i)
                fossil_i += 1
                t0 = time.perf_counter()
                await bus.publish(e)
                t1 = await asyncio.wait_for(intents.get(), 30)
                orient.append(t1 - t0)
            rows.append((gear, lat, orient))
            print(f"{gear:<12} command→effect p50 {pct(lat, 50) * 1e3:6.2f} ms  p99 {pct(lat, 99) * 1e3:6.2f} ms   "
                  f"fossil→intent mean {statistics.mean(orient) * 1e3:7.1f} ms (heartbeat {gears.spec(gear).heartbeat_s * 1e3:.0f} ms)", flush=True)

        b50, b99 = pct(base, 50), pct(base, 99)
        print()
        print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, load {os.getloadavg()[0]:.2f}")
        print(f"baseline: one awaited JetStream publish: p50 {b50 * 1e3:.2f} ms, p99 {b99 * 1e3:.2f} ms (n={args.n})")
        print()
        print("| gear | heartbeat | command → applied effect p50 | p99 | p50 / publish-ack p50 | fossil → intent mean (max) | samples |")
        print("|---|---|---|---|---|---|---|")
        for gear, lat, orient in rows:
            hb = gears.spec(gear).heartbeat_s
            print(f"| {gear} | {hb * 1e3:g} ms | {pct(lat, 50) * 1e3:.2f} ms | {pct(lat, 99) * 1e3:.2f} ms | "
                  f"{pct(lat, 50) / b50:.1f}× | {statistics.mean(orient) * 1e3:.0f} ms ({max(orient) * 1e3:.0f} ms) | {len(lat)} / {len(orient)} |")
        await nc.close()
        await bus.close()
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(30)
        server.stop()


def ev_gears() -> list[str]:
    from scf.bus.events import GEARS

    return list(GEARS)


if __name__ == "__main__":
    asyncio.run(main())
