"""SIGTERM-to-exit of `scf` processes whose nats-server is frozen (SIGSTOP).

    .venv/bin/python benchmarks/bench_stop_frozen.py [--procs worker,edge,regiment,control-file]

A real nats-server, real processes (`scf run worker`, `scf run edge` with a node key and a
meter reading dropped after the freeze, `scf run regiment`, `scf control watch-file` with a
command written after the freeze); their waits made frequent ([worker] heartbeat, [edge]
register_every_s / meter_poll_s, [regiment] heartbeat_s: 0.3 s) so each is inside a wait
on the server when it is SIGTERMed. Once every process is up (its liveness / registry /
progress entry on the server), the server is frozen, 1.5 s later every process is
SIGTERMed at once; printed: each one's seconds from the signal to its exit, its exit code
and its `Error: shutdown incomplete` line (the contract: docs/architecture.md "Stopping a
process"; its bound DRAIN_S + CLOSE_S + LEFTOVER_S = 27 s). To measure older code, run it
with PYTHONPATH pointing at a directory that holds that tree as `scf/`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROCS = ("worker", "edge", "regiment", "control-file")


def argv_of(name: str, tmp: Path) -> list[str]:
    cli = [sys.executable, "-m", "scf.cli.main"]
    return {
        "worker": cli + ["run", "worker", "--pool", "bench", "--device", "cpu"],
        "edge": cli + ["run", "edge", "--node", "n1", "--dir", str(tmp / "edge")],
        "regiment": cli + ["run", "regiment"],
        "control-file": cli + ["control", "watch-file", str(tmp / "control.json"), "--poll", "0.3"],
    }[name]


async def up(bus, name: str, log: Path) -> bool:
    """Whether `name` is up: its entry written on the server (the watcher: its first line)."""
    from scf.consumers.dispatch import WORKERS_BUCKET
    from scf.consumers.nodes import NODES_BUCKET
    from scf.producers.regiment import KEY_REGIMENT

    bucket, key = {"worker": (WORKERS_BUCKET, None), "edge": (NODES_BUCKET, None), "regiment": ("scf_state", KEY_REGIMENT)}.get(name, (None, None))
    if bucket is None:
        return "watching" in log.read_text(errors="replace")
    try:
        kv = await bus.js.key_value(bucket)
        if key is not None:
            return bool((await kv.get(key)).value)
        return bool(await kv.keys())
    except Exception:  # noqa: BLE001 - not yet
        return False


async def main(names: list[str]) -> list[dict]:
    from scf.bus.client import Bus
    from scf.bus.server import ServerProcess, free_port
    from scf.bus.settings import Settings, init_home
    from scf.bus.signing import SigningKey
    from scf.bus.streams import ensure
    from scf.bus.trust import TrustList

    tmp = Path(tempfile.mkdtemp(prefix="scf-stop-frozen-"))
    server = ServerProcess(tmp / "nats", free_port()).start()
    settings = Settings(home=str(tmp / "home"), nats_url=server.url, source="bench")
    init_home(settings)
    trust = TrustList.load(settings.keys_dir / "trusted.json")
    for name, roles in (("release", ["release"]), ("n1", ["node"])):
        key = SigningKey.generate(name)
        key.save(settings.keys_dir)
        trust.trust(key.public_b64, name, roles)
    trust.save()
    (settings.home_path / "scf.toml").write_text(
        "[worker]\nheartbeat = 0.3\n[edge]\nregister_every_s = 0.3\nmeter_poll_s = 0.3\n[regiment]\nheartbeat_s = 0.3\n")
    env = dict(os.environ, NATS_URL=server.url, SCF_HOME=settings.home, PYTHONUNBUFFERED="1", SCF_LOG="INFO")
    env.pop("SCF_KEY", None)
    bus = await Bus.connect(settings, "bench")
    await ensure(bus.js)
    procs, logs = {}, {}
    for name in names:
        logs[name] = tmp / f"{name}.log"
        procs[name] = subprocess.Popen(argv_of(name, tmp), env=env, stdout=logs[name].open("w"), stderr=subprocess.STDOUT)
    rows = []
    try:
        deadline = time.monotonic() + 180
        for name in names:
            while not await up(bus, name, logs[name]):
                if procs[name].poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{name} did not come up:\n{logs[name].read_text(errors='replace')[-3000:]}")
                await asyncio.sleep(0.2)
        await bus.close()
        server.proc.send_signal(signal.SIGSTOP)
        if "edge" in names:  # a reading to report: the meter's publish waits on the frozen server
            (tmp / "edge" / "meter").mkdir(parents=True, exist_ok=True)
            (tmp / "edge" / "meter" / "r1.json").write_text(json.dumps({
                "period_start": "2026-11-01T00:00:00Z", "period_end": "2026-11-01T01:00:00Z",
                "baseline_kwh": 10.0, "actual_kwh": 8.0, "uncalibrated": True}))
        if "control-file" in names:  # a command to send: the watcher's publish waits on the frozen server
            (tmp / "control.json").write_text(json.dumps({"command": "SHIFT_GEAR", "payload": {"level": "ACCELERATED"}}))
        await asyncio.sleep(1.5)  # every loop is now inside a wait on the server (no way to ask a frozen one)
        t0 = time.monotonic()
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        left = dict(procs)
        while left:
            for name, p in list(left.items()):
                if p.poll() is not None:
                    text = logs[name].read_text(errors="replace")
                    line = next((ln for ln in text.splitlines() if ln.startswith("Error: shutdown incomplete")), "")
                    rows.append({"process": name, "seconds": round(time.monotonic() - t0, 2), "code": p.returncode, "line": line})
                    del left[name]
                elif time.monotonic() - t0 > 60:
                    p.kill()
            await asyncio.sleep(0.05)
    finally:
        server.proc.send_signal(signal.SIGCONT)
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        server.stop()
    return sorted(rows, key=lambda r: names.index(r["process"]))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", default=",".join(PROCS))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    out = asyncio.run(main([p for p in a.procs.split(",") if p]))
    if a.json:
        print(json.dumps(out))
    for r in out:
        print(f"{r['process']:>13}  {r['seconds']:6.2f} s  exit {r['code']}  {r['line'][:200]}")
