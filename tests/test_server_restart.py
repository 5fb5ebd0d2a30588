"""Every process rides out a nats-server restart (issue 10, defect 7).

`scf run daemon`, `scf run ledger` and the runner's test consumer (tests/procs) run as real
processes against a nats-server that is stopped (SIGTERM) and later SIGKILLed, each time
restarted on the same port and store; after the first stop a bare nats-server without
JetStream holds the port for a while, so every fetch fails. Before the fix a fetch raised
ServiceUnavailableError (or a connection error) that nothing caught and the processes
exited 1. Now: the failures are logged (at most once a second), work sent after each
restart is done, and no process ever exits.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time

import msgspec
import pytest

from scf.bus import codec
from scf.bus import events as ev
from scf.bus.client import Bus
from scf.bus.server import ServerProcess, binary, free_port, port_open
from scf.bus.settings import Settings, init_home
from scf.bus.streams import CONSUMERS, KEY_DAEMON, ensure
from scf.consumers.energy import measurement_event
from tests.conftest import freeze, spawn, stream_count, wait_for
from tests.daemon_support import fossil
from tests.mv_support import passing_mv
from tests.test_deploy_helpers import STOP_BOUND_S, Keys, logs, start_process, stop, timed_stop

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]

CONSUMER = [sys.executable, "-m", "tests.procs.effect_consumer"]


def intent(i: str) -> ev.IntentCreated:
    return ev.IntentCreated.new(ev.Intent(intent_id=i, kind="train", domain="grid:case9"), source="test")


def measurement(hour: int) -> ev.EnergyMeasured:
    start = dt.datetime(2026, 11, 1, hour, tzinfo=dt.timezone.utc)
    return measurement_event("n1", period_start=start, period_end=start + dt.timedelta(hours=1),
                             baseline_kwh=10.0, actual_kwh=8.0, method="metered-vs-baseline", source="meter",
                             **passing_mv(10.0, 8.0))


async def consumer_exists(bus: Bus, stream: str, durable: str) -> bool:
    try:
        await bus.js.consumer_info(stream, durable)
        return True
    except Exception:
        return False


async def test_daemon_ledger_and_a_runner_ride_out_server_restarts(tmp_path):
    server = ServerProcess(tmp_path / "nats", free_port()).start()
    settings = Settings(home=str(tmp_path / "home"), nats_url=server.url, source="test")
    init_home(settings)
    env = dict(os.environ, NATS_URL=server.url, SCF_HOME=settings.home, PYTHONUNBUFFERED="1", SCF_LOG="INFO")
    env.pop("SCF_KEY", None)
    keys = Keys(settings)
    k1 = keys.node("n1")
    (settings.home_path / "scf.toml").write_text("[ledger]\nack_wait = 5.0\n")
    bus = await Bus.connect(settings, "test")
    await ensure(bus.js)
    procs = {
        "consumer": spawn(CONSUMER + ["--log", str(tmp_path / "handled.log")], env, tmp_path / "consumer.log"),
        "ledger": start_process(env, "ledger", tmp_path),
        "daemon": start_process(env, "daemon", tmp_path),
    }

    def log_of(name: str) -> str:
        return (tmp_path / ("consumer.log" if name == "consumer" else f"{name}.log")).read_text(errors="replace")

    def alive() -> None:
        for name, p in procs.items():
            assert p.poll() is None, f"{name} exited {p.returncode}\n{logs(tmp_path)}"

    try:
        for stream, durable in (("INTENTS", "effect"), ("DEPLOY", CONSUMERS["ledger"].durable),
                                ("CONTROL", CONSUMERS["daemon-control"].durable)):
            await wait_for(lambda: consumer_exists(bus, stream, durable), 60, f"consumer {stream}/{durable}")
        # The daemon has started once it logs its state (its durable exists before that);
        # a restart *during* its start is the next two tests'.
        await wait_for(lambda: "daemon: gear" in log_of("daemon"), 90, "the daemon to finish starting")
        await bus.close()

        for round_, (how, verb, effect) in enumerate(
            [("stop", "stop", "gear.daemon.stopped"), ("kill", "resume", "gear.daemon.resumed")], start=1
        ):
            server.stop() if how == "stop" else server.kill()
            for name in procs:  # every process has seen the server go
                await wait_for(lambda: "disconnected from" in log_of(name), 30, f"{name} to notice the server is gone")
            alive()
            if round_ == 1:
                # The server comes back without JetStream first (as while it recovers its
                # store): every fetch now fails with ServiceUnavailableError / no responders.
                t0 = time.monotonic()
                bare = subprocess.Popen([binary(), "--addr", "127.0.0.1", "--port", str(server.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                try:
                    for name in procs:
                        # a gated consumer may instead close its emergency gate first (the
                        # state unreadable: fail closed), and then it fetches nothing
                        await wait_for(lambda: "fetch failed" in log_of(name) or "emergency gate closed" in log_of(name),
                                       60, f"{name} to meet a failing fetch or close its emergency gate")
                    alive()
                finally:
                    bare.terminate()
                    bare.wait(10)
                elapsed = time.monotonic() - t0
                for name in procs:  # logged at most once a second (per kind of error)
                    lines = [ln for ln in log_of(name).splitlines() if "fetch failed" in ln]
                    kinds = {ln.split("fetch failed (")[1].split(":")[0] for ln in lines}
                    assert len(lines) <= len(kinds) * (elapsed + 2) * 2, (name, elapsed, lines)
            server.start()
            bus = await Bus.connect(settings, "test")
            try:
                await bus.publish(intent(f"after-{round_}"))
                await bus.js.publish("energy.measured.n1", codec.sign(measurement(round_), k1))
                await bus.js.publish(f"control.{verb}", json.dumps({"reason": f"round {round_}"}).encode())

                async def done() -> bool:
                    return (
                        await stream_count(bus, "VERDICTS") == round_
                        and await stream_count(bus, "LEDGER", "ledger.transfer.>") == round_
                        and await stream_count(bus, "CONTROL", effect) == 1
                    )
                await wait_for(done, 120, f"the work sent after restart {round_} ({how}) to be done")
                alive()
            finally:
                await bus.close()
        text = logs(tmp_path)
        assert "Traceback" not in text, text
    except AssertionError as exc:  # say what the processes said
        raise AssertionError(f"{exc}\n{logs(tmp_path)}\n--- nats-server\n{server.log.read_text(errors='replace')[-2000:]}") from None
    finally:
        stopped = {name: timed_stop(p) for name, p in procs.items()}
        server.stop()
    codes = {name: code for name, (code, _) in stopped.items()}
    assert codes == {"consumer": 0, "ledger": 0, "daemon": 0}, logs(tmp_path)
    for name, (_, seconds) in stopped.items():  # the shutdown contract's bound, after the restarts
        assert seconds <= STOP_BOUND_S, (name, seconds, logs(tmp_path))


async def test_the_daemon_stops_within_its_bounds_after_a_restart_when_the_server_stops_answering(tmp_path):
    """After a server restart (SIGKILL, started again, a command applied) the server stops
    answering (SIGSTOP: the connection stays open, no request is ever answered) and the
    daemon is SIGTERMed. Every wait of its loops ends at the stop and its close is cut at
    CLOSE_S: it exits within the shutdown contract's bound, with the one line that names the
    connection and no loop cancelled at the deadline. Before the fix its loops sat out their
    5 s JetStream timeouts and nats-py's drain swallowed the close's timeout (a 10 s flush
    more): 20 s, and exit 0 as if everything had been drained."""
    server = ServerProcess(tmp_path / "nats", free_port()).start()
    settings = Settings(home=str(tmp_path / "home"), nats_url=server.url, source="test")
    init_home(settings)
    env = dict(os.environ, NATS_URL=server.url, SCF_HOME=settings.home, PYTHONUNBUFFERED="1", SCF_LOG="INFO")
    env.pop("SCF_KEY", None)
    bus = await Bus.connect(settings, "test")
    await ensure(bus.js)
    await bus.close()
    daemon = start_process(env, "daemon", tmp_path)
    text = lambda: (tmp_path / "daemon.log").read_text(errors="replace")  # noqa: E731
    frozen = False
    try:
        await wait_for(lambda: "daemon: gear" in text(), 90, "the daemon to finish starting")
        server.kill()
        await wait_for(lambda: "disconnected from" in text(), 30, "the daemon to notice the server is gone")
        server.start()
        bus = await Bus.connect(settings, "test")
        try:
            await bus.js.publish("control.stop", json.dumps({"reason": "after the restart"}).encode())
            await wait_for(lambda: stream_count(bus, "CONTROL", "gear.daemon.stopped"), 60, "the command sent after the restart")
        finally:
            await bus.close()
        freeze(server.proc)
        frozen = True
        code, seconds = timed_stop(daemon)
        log = text()
        assert seconds <= STOP_BOUND_S, (seconds, log[-6000:])
        assert code == 1, (code, log[-6000:])  # it could not drain: not a clean stop
        line = [ln for ln in log.splitlines() if ln.startswith("Error: shutdown incomplete")]
        assert len(line) == 1 and "the connection did not close within" in line[0], log[-6000:]
        assert "still running" not in line[0], line  # no loop sat out the stop
    finally:
        if frozen:
            server.proc.send_signal(signal.SIGCONT)
        stop(daemon)
        server.stop()


async def test_the_emergency_gate_sees_a_stop_engaged_across_a_restart(tmp_path):
    """The gate's KV watch is an ordered consumer that nats-py resets only after missed
    heartbeats (a stop engaged right after a restart reached a running gate ~20 s late);
    the gate also re-reads the entry every second, and a failed re-read keeps its state."""
    from scf.bus.emergency import EmergencyGate, EmergencyState, write_state

    server = ServerProcess(tmp_path / "nats", free_port()).start()
    settings = Settings(home=str(tmp_path / "home"), nats_url=server.url, source="test")
    init_home(settings)
    bus = await Bus.connect(settings, "gate")
    await ensure(bus.js)
    gate = await EmergencyGate(bus, settings.emergency_lock).start()
    try:
        await write_state(bus, EmergencyState(True, "before"))
        await wait_for(lambda: gate.engaged, 10, "the gate to see the stop")
        server.kill()
        await wait_for(lambda: not bus.nc.is_connected, 10, "the gate's connection to drop")
        assert gate.engaged  # the server away: the gate keeps the state it has (fails closed)
        server.start()
        other = await Bus.connect(settings, "operator")
        try:
            await write_state(other, EmergencyState(False, "released after the restart"))
            await wait_for(lambda: not gate.engaged, 10, "the gate to see the release")
            await write_state(other, EmergencyState(True, "engaged after the restart"))
            await wait_for(lambda: gate.engaged, 10, "the gate to see the stop engaged after the restart")
            assert gate.reason == "engaged after the restart"
        finally:
            await other.close()
    finally:
        await gate.stop()
        await bus.close()
        server.stop()



# --------------------------------------------------------------------------- the daemon's start

DOMAIN, GENERATIONS = "grid:case9", 20_000


async def long_log(tmp_path) -> tuple[ServerProcess, Settings, dict[str, str]]:
    """A server whose log the daemon takes seconds to rebuild from: 20 000 train intents of
    one domain, 3 kB each (the last one counted 10 fossils), and 59 fossils, one short of a
    training."""
    from scf.producers.daemon import train_intent_id

    server = ServerProcess(tmp_path / "nats", free_port()).start()
    settings = Settings(home=str(tmp_path / "home"), nats_url=server.url, source="test")
    init_home(settings)
    env = dict(os.environ, NATS_URL=server.url, SCF_HOME=settings.home, PYTHONUNBUFFERED="1", SCF_LOG="INFO")
    env.pop("SCF_KEY", None)
    (settings.home_path / "scf.toml").write_text('[daemon]\ntrain_threshold = {STANDARD = 50}\nverify_checkpoints = "off"\n')
    bus = await Bus.connect(settings, "test")
    try:
        await ensure(bus.js)
        note = "x" * 3000  # bulk: reading the log takes the daemon seconds, not a blink
        trained = [ev.IntentCreated.new(ev.Intent(intent_id=train_intent_id(DOMAIN, g), kind="train", domain=DOMAIN,
                                                  params={"generation": g, "fossils": 10, "note": note}), source="test")
                   for g in range(1, GENERATIONS + 1)]
        for i in range(0, GENERATIONS, 2000):
            await bus.publish_many(trained[i:i + 2000])
        await bus.publish_many([fossil(DOMAIN, i) for i in range(59)])
    finally:
        await bus.close()
    return server, settings, env


async def state_is_the_logs(settings: Settings) -> None:
    """The started daemon counted the fossils once and knows the last generation: 49 new
    fossils pending; the 50th makes generation 20 001 (not 1, not a second intent)."""
    from scf.producers.daemon import Liveness, train_intent_id

    bus = await Bus.connect(settings, "test")
    try:
        async def liveness() -> Liveness | None:
            try:
                entry = await (await bus.kv("scf_state")).get(KEY_DAEMON)
            except Exception:
                return None
            return msgspec.json.decode(entry.value, type=Liveness)

        async def ready() -> bool:
            live = await liveness()
            return live is not None and live.ready

        await wait_for(ready, 60, "the daemon to be ready")
        assert (await liveness()).pending == {DOMAIN: 49}  # type: ignore[union-attr]
        assert await stream_count(bus, "INTENTS") == GENERATIONS
        await bus.publish(fossil(DOMAIN, 59))

        async def trained() -> bool:
            return await stream_count(bus, "INTENTS") == GENERATIONS + 1

        await wait_for(trained, 60, "the next train intent")
        last = await bus.last("intent.created.train.>")
        assert last is not None and isinstance(last[1], ev.IntentCreated)
        assert last[1].data.intent_id == train_intent_id(DOMAIN, GENERATIONS + 1)
        assert (last[1].data.params["fossils"], last[1].data.params["new_fossils"]) == (60, 50)
    finally:
        await bus.close()


def without_jetstream(port: int) -> subprocess.Popen:
    """A bare nats-server on `port`: connections work, every JetStream request fails."""
    return subprocess.Popen([binary(), "--addr", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


@contextlib.asynccontextmanager
async def daemon_process(env: dict[str, str], tmp_path, server: ServerProcess):
    """`scf run daemon`, and a reader of its log; on the way out it is stopped (thawed
    first) and must exit 0, and a failed assertion shows its log."""
    log_path = tmp_path / "daemon.log"
    daemon = start_process(env, "daemon", tmp_path)

    def text() -> str:
        return log_path.read_text(errors="replace") if log_path.exists() else ""

    try:
        yield daemon, text
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- daemon\n{text()[-6000:]}") from None
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGCONT)
        code = stop(daemon)
        server.stop()
    assert code == 0, text()[-6000:]


async def back_with_jetstream(server: ServerProcess, settings: Settings, daemon: subprocess.Popen, text) -> None:
    """The real server returns: the daemon finishes starting, with the log's state."""
    server.start()
    await wait_for(lambda: "daemon: gear" in text(), 120, "the daemon to finish starting")
    await state_is_the_logs(settings)
    assert daemon.poll() is None and "Traceback" not in text(), text()


async def test_the_daemon_start_rides_out_a_restart_while_it_rebuilds_a_long_log(tmp_path):
    """`Daemon.start()` reads its log before it applies anything; a server restart meanwhile
    once made it exit 1. The daemon is frozen (SIGSTOP) as soon as it starts rebuilding, the
    server restarts (first without JetStream, as while it recovers its store), the daemon
    thaws and carries on: the state it ends with is the log's, counted once."""
    server, settings, env = await long_log(tmp_path)
    async with daemon_process(env, tmp_path, server) as (daemon, text):
        await wait_for(lambda: "rebuilding its state from the log" in text(), 90, "the daemon to start rebuilding")
        daemon.send_signal(signal.SIGSTOP)
        assert "daemon: gear" not in text()  # frozen mid-start
        server.stop()
        bare = without_jetstream(server.port)
        try:
            daemon.send_signal(signal.SIGCONT)
            await wait_for(lambda: "daemon start interrupted" in text() or "retrying from seq" in text(), 60,
                           "the daemon to meet the server without JetStream")
            assert daemon.poll() is None, text()
        finally:
            bare.terminate()
            bare.wait(10)
        await back_with_jetstream(server, settings, daemon, text)


async def test_a_daemon_started_while_jetstream_is_away_starts_when_it_is_back(tmp_path):
    """Started while the port is held by a server without JetStream, the daemon's start fails
    at once and is tried again with backoff, logged at most once a second; with the real
    server back it rebuilds the long log from scratch and ends with the log's state."""
    server, settings, env = await long_log(tmp_path)
    server.stop()
    bare = without_jetstream(server.port)
    await wait_for(lambda: port_open("127.0.0.1", server.port), 20, "the server without JetStream")
    t0 = time.monotonic()
    async with daemon_process(env, tmp_path, server) as (daemon, text):
        try:
            await wait_for(lambda: text().count("daemon start interrupted") >= 2, 60, "two tries to start")
            assert daemon.poll() is None, text()
        finally:
            bare.terminate()
            bare.wait(10)
        elapsed = time.monotonic() - t0
        lines = [ln for ln in text().splitlines() if "daemon start interrupted" in ln]
        assert len(lines) <= elapsed + 1, (elapsed, lines)  # at most once a second
        await back_with_jetstream(server, settings, daemon, text)


async def reading(bus: Bus, stream: str, subject: str) -> bool:
    """Whether a reader's consumer (unnamed, no acks: bus/reader.py) reads `subject` of `stream` now."""
    return any(c.config.filter_subject == subject and not c.config.durable_name for c in await bus.js.consumers_info(stream))


@pytest.mark.slow
async def test_the_daemon_stops_within_its_bounds_while_it_rebuilds_with_its_server_gone(tmp_path):
    """SIGTERMed while it reads a long log at its start, its server gone (SIGKILL), the daemon
    exits within the contract's bound, no loop cancelled at the deadline. Before the fix the
    start's reads went on retrying (a read gives up after a minute without the server) and
    the start was cancelled at DRAIN_S: 'Daemon.run still running 20 s after the stop'."""
    server, settings, env = await long_log(tmp_path)
    daemon = start_process(env, "daemon", tmp_path)
    text = lambda: (tmp_path / "daemon.log").read_text(errors="replace")  # noqa: E731
    try:
        bus = await Bus.connect(settings, "test")
        try:
            # frozen inside its read of the trainings (its consumer on INTENTS delivers 60 MB)
            await wait_for(lambda: reading(bus, "INTENTS", "intent.created.train.>"), 90, "the daemon to read its trainings")
            daemon.send_signal(signal.SIGSTOP)
        finally:
            await bus.close()
        server.kill()
        daemon.send_signal(signal.SIGCONT)
        await wait_for(lambda: "retrying from seq" in text(), 60, "the daemon's read to meet the server gone")
        assert "daemon: gear" not in text()  # still starting
        code, seconds = timed_stop(daemon)
        log = text()
        assert seconds <= STOP_BOUND_S, (seconds, log[-6000:])
        line = [ln for ln in log.splitlines() if ln.startswith("Error: shutdown incomplete")]
        assert code == 1 and len(line) == 1, (code, log[-6000:])  # not drained: the server is gone
        assert "still running" not in line[0], line  # the start ended at the stop
    finally:
        stop(daemon)
        server.stop()
