"""Processes SIGTERMed while their nats-server is frozen stop within the shutdown contract.

docs/architecture.md "Stopping a process": a loop awaits the stop together with each of its
waits (`bus.runner.until_stopped`), rather than checking it between them. Each process here
runs for real against a real nats-server, its waits made frequent by scf.toml; once it is
up, the server is frozen (SIGSTOP: the connection stays open, nothing is ever answered) and
the process SIGTERMed while its loops wait on the server: the worker's liveness refresh,
the edge agent's registry entry and meter report, the regiment's pass, the control-file
watcher's publish. Each exits within STOP_BOUND_S (DRAIN_S + CLOSE_S + LEFTOVER_S) with the
contract's one `Error: shutdown incomplete` line naming the connection, no loop sat out to
the DRAIN_S deadline, the log says the wait was cut by the stop, and it holds no traceback
(the connection closed hard at CLOSE_S is quiet). Before, each sat out
its waits (5 s a JetStream request, a KV put, a publish): measured with
benchmarks/bench_stop_frozen.py (3 runs), SIGTERM to exit, worker 14.7-15.7 s, edge
8.7-9.1 s, the regiment 25.1-25.3 s (its loop cancelled at DRAIN_S), the watcher 23.8-23.9 s
(a traceback, an unbounded close); after: 5.1-7.1 s, 5 s of it the close cut at CLOSE_S.

Also here: a message a handler hands back at the stop (`Stopping`: the daemon's control
command) is given back as the runner's own stop path does, never dead-lettered as a
failure; `Bus.kv` says a timeout is a timeout, not a missing bucket.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from scf.bus import events as ev
from scf.bus.client import Bus
from scf.bus.codec import Codec
from scf.bus.dlq import list_dead
from scf.bus.errors import ServerError, StreamNotFound
from scf.bus.runner import Runner, Stopping, event_decoder
from scf.bus.server import ServerProcess, free_port
from scf.bus.settings import Settings, init_home
from scf.bus.streams import ConsumerSpec, ensure
from scf.consumers.dispatch import WORKERS_BUCKET
from scf.consumers.nodes import NODES_BUCKET
from scf.producers.regiment import KEY_REGIMENT
from tests.conftest import freeze, spawn, wait_for
from tests.test_server_restart import STOP_BOUND_S, Keys, start_process, stop, timed_stop

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]

TOML = "[worker]\nheartbeat = 0.3\n[edge]\nregister_every_s = 0.3\nmeter_poll_s = 0.3\n[regiment]\nheartbeat_s = 0.3\n"

# the process, and the log lines that say which of its waits the stop cut
CASES = {
    "worker": ["worker liveness refresh cut by the stop"],
    "edge": ["registry entry not rewritten: cut by the stop", "stopped while reporting meter readings"],
    "regiment": ["cut by the stop"],
    "control-file": ["stopped while sending its commands"],
}


def start(name: str, env: dict[str, str], tmp_path: Path) -> tuple:
    """The process and its log file."""
    if name == "worker":
        argv = [sys.executable, "-m", "scf.cli.main", "run", "worker", "--pool", "t", "--device", "cpu"]
    elif name == "edge":
        argv = [sys.executable, "-m", "scf.cli.main", "run", "edge", "--node", "n1", "--dir", str(tmp_path / "edge")]
    elif name == "control-file":
        argv = [sys.executable, "-m", "scf.cli.main", "control", "watch-file", str(tmp_path / "control.json"), "--poll", "0.3"]
    else:
        return start_process(env, name, tmp_path), tmp_path / f"{name}.log"
    return spawn(argv, env, tmp_path / f"{name}.log"), tmp_path / f"{name}.log"


async def is_up(bus: Bus, name: str, log: Path) -> bool:
    """Its liveness / registry / progress entry is on the server (the watcher: its first line)."""
    if name == "control-file":
        return "watching" in log.read_text(errors="replace")
    bucket, key = {"worker": (WORKERS_BUCKET, None), "edge": (NODES_BUCKET, None), "regiment": ("scf_state", KEY_REGIMENT)}[name]
    try:
        kv = await bus.js.key_value(bucket)
        return bool((await kv.get(key)).value) if key else bool(await kv.keys())
    except Exception:  # noqa: BLE001 - not yet
        return False


def give_work(name: str, tmp_path: Path) -> None:
    """Work that waits on the frozen server: a meter reading to report, a command to send."""
    if name == "edge":
        (tmp_path / "edge" / "meter").mkdir(parents=True, exist_ok=True)
        (tmp_path / "edge" / "meter" / "r1.json").write_text(json.dumps({
            "period_start": "2026-11-01T00:00:00Z", "period_end": "2026-11-01T01:00:00Z",
            "baseline_kwh": 10.0, "actual_kwh": 8.0, "uncalibrated": True}))
    elif name == "control-file":
        (tmp_path / "control.json").write_text(json.dumps({"command": "SHIFT_GEAR", "payload": {"level": "ACCELERATED"}}))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
async def test_a_process_sigtermed_with_its_server_frozen_stops_within_its_bounds(tmp_path, name):
    server = ServerProcess(tmp_path / "nats", free_port()).start()
    settings = Settings(home=str(tmp_path / "home"), nats_url=server.url, source="test")
    init_home(settings)
    keys = Keys(settings)  # the release key (the regiment's) and the node's, trusted
    keys.node("n1")
    keys.release.save(settings.keys_dir)
    (settings.home_path / "scf.toml").write_text(TOML)
    env = dict(os.environ, NATS_URL=server.url, SCF_HOME=settings.home, PYTHONUNBUFFERED="1", SCF_LOG="INFO")
    env.pop("SCF_KEY", None)
    bus = await Bus.connect(settings, "test")
    await ensure(bus.js)
    proc, log = start(name, env, tmp_path)
    text = lambda: log.read_text(errors="replace")  # noqa: E731
    frozen = False
    try:
        try:
            await wait_for(lambda: proc.poll() is not None or is_up(bus, name, log), 120, f"{name} to be up")
            assert proc.poll() is None, text()[-4000:]
        finally:
            await bus.close()
        freeze(server.proc)
        frozen = True
        give_work(name, tmp_path)
        # a frozen server cannot say when a process waits on it: its loops (every 0.3 s) are
        # inside such a wait well within this
        await asyncio.sleep(1.5)
        code, seconds = timed_stop(proc)
        out = text()
        assert seconds <= STOP_BOUND_S, (seconds, out[-6000:])
        lines = [ln for ln in out.splitlines() if ln.startswith("Error: shutdown incomplete")]
        assert code == 1 and len(lines) == 1, (code, out[-6000:])  # it could not drain: not a clean stop
        assert "the connection did not close within" in lines[0], lines
        assert "still running" not in lines[0], lines  # no loop sat out the stop to the DRAIN_S deadline
        # the hard close is quiet: before, nats-py's drain cancelled at CLOSE_S left asyncio's
        # '_GatheringFuture exception was never retrieved' and a traceback in every log
        assert "was never retrieved" not in out and "Traceback" not in out, out[-6000:]
        for said in CASES[name]:  # the stop cut the wait on the server (before: a timeout, 5 s each, ended it)
            assert said in out, (said, out[-6000:])
    finally:
        if frozen:
            server.proc.send_signal(signal.SIGCONT)
        stop(proc)
        server.stop()


@pytest.mark.parametrize("batched", [False, True])
async def test_a_message_handed_back_at_the_stop_is_never_dead_lettered(bus, batched):
    """A handler that raises `Stopping` (the daemon's control command cut by SIGTERM) gives
    its message back: nak'ed, not counted as a failure. Before, the runner treated it as one
    and dead-lettered it on the runner's last delivery (here the second)."""
    await bus.publish(ev.IntentCreated.new(ev.Intent(intent_id="s1", kind="train", domain="grid:case9"), source="test"))
    seen: list[int] = []

    async def handle(event: ev.IntentCreated, d) -> list[ev.Event]:
        seen.append(d.deliveries)
        if d.deliveries < 3:  # the server's last delivery (one above the runner's max_deliver)
            raise Stopping("stopped while applying: given back for the next start")
        return []

    spec = ConsumerSpec("INTENTS", "handback", ("intent.created.>",), ack_wait=30.0, max_deliver=2)
    runner = Runner(bus, spec, handle, decode=event_decoder(Codec([ev.IntentCreated])), batched=batched, backoff_base=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await wait_for(lambda: runner.stats.handled == 1, 30, "the message handled on its third delivery")
    finally:
        stop.set()
        await task
    assert seen == [1, 2, 3]
    assert runner.stats.dead_lettered == 0 and runner.stats.retried == 0 and await list_dead(bus) == []


async def test_bus_kv_says_a_timeout_is_a_timeout_and_a_missing_bucket_is_missing(tmp_path):
    server = ServerProcess(tmp_path / "nats", free_port()).start()
    settings = Settings(home=str(tmp_path / "home"), nats_url=server.url, source="test")
    init_home(settings)
    bus = await Bus.connect(settings, "test")
    try:
        with pytest.raises(StreamNotFound, match=r"KV bucket nope does not exist: run `scf streams ensure`"):
            await bus.kv("nope")
        freeze(server.proc)
        try:
            with pytest.raises(ServerError, match=r"KV bucket scf_state: no answer from nats-server in 5 s \(a timeout, not a missing bucket\)") as err:
                await bus.kv("scf_state")
            assert not isinstance(err.value, StreamNotFound) and "\n" not in str(err.value)
            assert len(str(err.value)) <= 120  # all of it in the emergency gate's line (bus/emergency.py)
        finally:
            server.proc.send_signal(signal.SIGCONT)
    finally:
        await bus.close()
        server.stop()
