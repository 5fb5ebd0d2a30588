"""Every `scf run X` process exits promptly on SIGTERM whatever its nats-server's state.

The shutdown contract (docs/architecture.md, "Stopping a process"): SIGTERM/SIGINT stops the
process's loops, which get one bounded deadline in all to finish (not one per loop), then
the connection is closed with a timeout; a process that could not finish its loops or drain
its connection (the server gone) exits 1 with one line saying so, and a second SIGTERM/SIGINT
ends it at once (exit 128 + the signal). Before the fix `scf run daemon` hung in its shutdown
for as long as nats-py went on reconnecting to a server that was gone (11 minutes seen,
then killed by hand), and further SIGTERMs changed nothing.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scf.bus.client import Bus
from scf.bus.streams import KEY_DAEMON, ensure
from tests.conftest import spawn, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]

# generous: a bound on an awaited exit under a loaded machine, not a speed claim
EXIT_WAIT_S = 90


async def _daemon_ready(bus: Bus) -> bool:
    try:
        return (await (await bus.kv("scf_state")).get(KEY_DAEMON)) is not None
    except Exception:  # noqa: BLE001 - not written yet
        return False


async def _consumer_ready(bus: Bus, stream: str, durable: str) -> bool:
    try:
        await bus.js.consumer_info(stream, durable)
        return True
    except Exception:  # noqa: BLE001 - not created yet
        return False


def _log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def _exited(proc: subprocess.Popen, log: Path, what: str) -> int:
    try:
        await wait_for(lambda: proc.poll() is not None, EXIT_WAIT_S, what)
    except AssertionError:
        proc.kill()  # not left behind, reconnecting to a server that is gone
        proc.wait()
        raise AssertionError(f"{what}: still running {EXIT_WAIT_S} s after SIGTERM\n{_log(log)[-3000:]}") from None
    return proc.returncode


async def _started(name: str, settings, scf_env, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """`scf run NAME` as a real process, awaited until it is connected and working."""
    log = tmp_path / f"{name}.log"
    bus = await Bus.connect(settings, "test")
    await ensure(bus.js)
    proc = spawn([sys.executable, "-m", "scf.cli.main", "run", name], scf_env, log)
    try:
        if name == "daemon":
            await wait_for(lambda: proc.poll() is not None or _daemon_ready(bus), 60, "the daemon's liveness entry")
        else:
            await wait_for(lambda: proc.poll() is not None or _consumer_ready(bus, "INTENTS", name), 60, f"{name}'s consumer")
    except AssertionError:
        proc.kill()
        proc.wait()
        raise
    finally:
        await bus.close()
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited {proc.returncode} while starting\n{_log(log)[-3000:]}")
    return proc, log


@pytest.mark.parametrize("name", ["daemon", "safety"])
async def test_sigterm_with_the_server_gone(name, nats_server, settings, scf_env, tmp_path):
    proc, log = await _started(name, settings, scf_env, tmp_path)
    nats_server.kill()
    await wait_for(lambda: proc.poll() is not None or "nats: disconnected" in _log(log), 60, "the process to see the server gone")
    assert proc.poll() is None, f"{name} exited when its server went away\n{_log(log)[-3000:]}"
    proc.send_signal(signal.SIGTERM)
    code = await _exited(proc, log, name)
    text = _log(log)
    assert code == 1, f"{name}: exit {code}\n{text[-3000:]}"  # it could not drain: not a clean stop
    assert "shutdown incomplete" in text, text[-3000:]


@pytest.mark.parametrize("name", ["daemon", "safety"])
async def test_sigterm_with_the_server_up_is_a_clean_stop(name, settings, scf_env, tmp_path):
    proc, log = await _started(name, settings, scf_env, tmp_path)
    proc.send_signal(signal.SIGTERM)
    code = await _exited(proc, log, name)
    assert code == 0, f"{name}: exit {code}\n{_log(log)[-3000:]}"


def _stubborn(scf_env, tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "stubborn.log"
    return spawn([sys.executable, "-m", "tests.procs.stubborn", *args], scf_env, log), log


async def test_a_loop_that_ignores_its_stop_is_cancelled_at_the_deadline(settings, scf_env, tmp_path):
    proc, log = _stubborn(scf_env, tmp_path, "--drain", "0.5", "--ignore-cancel")
    await wait_for(lambda: proc.poll() is not None or "stubborn: running" in _log(log), 60, "the process to run")
    proc.send_signal(signal.SIGTERM)
    code = await _exited(proc, log, "stubborn")
    text = _log(log)
    assert code == 1, f"exit {code}\n{text}"
    assert "shutdown incomplete: main.<locals>.stubborn still running 0.5 s after the stop: cancelled" in text, text
    assert "obliging" not in text, text  # the loop that stopped is not blamed


async def test_a_second_sigterm_exits_at_once(settings, scf_env, tmp_path):
    proc, log = _stubborn(scf_env, tmp_path, "--drain", "3600")  # the first stop alone would wait an hour
    await wait_for(lambda: proc.poll() is not None or "stubborn: running" in _log(log), 60, "the process to run")
    proc.send_signal(signal.SIGTERM)
    await wait_for(lambda: proc.poll() is not None or "SIGTERM: stopping" in _log(log), 60, "the first SIGTERM to be taken")
    assert proc.poll() is None, _log(log)
    proc.send_signal(signal.SIGTERM)
    code = await _exited(proc, log, "stubborn")
    assert code == 128 + signal.SIGTERM, f"exit {code}\n{_log(log)}"
    assert "SIGTERM again while stopping: exiting now" in _log(log), _log(log)


class _EngagesAfterTheFetch:
    """A pause gate (the emergency stop) clear when the runner first looks (it fetches),
    engaged for good from then on (the fetched messages are held)."""

    def __init__(self) -> None:
        self.looks = 0

    @property
    def engaged(self) -> bool:
        self.looks += 1
        return self.looks > 1

    async def wait_clear(self) -> None:
        await asyncio.Event().wait()


@pytest.mark.parametrize("batched", [False, True])
async def test_a_message_held_by_a_pause_is_given_back_on_a_stop(bus, batched):
    """A runner holding messages through an emergency stop ends on its stop (before: it
    waited for the gate to clear, the whole drain deadline) and gives them back."""
    from scf.bus import events as ev
    from scf.bus.runner import Runner
    from scf.bus.streams import ConsumerSpec

    for i in range(3):
        await bus.publish(ev.IntentCreated.new(ev.Intent(intent_id=f"h{i}", kind="train", domain="grid:case9"), source="test"))
    handled: list[str] = []

    deliveries: list[int] = []

    async def handle(event, d):
        handled.append(event.data.intent_id)
        deliveries.append(d.deliveries)
        return []

    spec = ConsumerSpec("INTENTS", "held", ("intent.created.>",), ack_wait=600)  # no redelivery but a give-back
    runner = Runner(bus, spec, handle, pause=_EngagesAfterTheFetch(), batch=3, batched=batched)
    stop = asyncio.Event()
    running = asyncio.create_task(runner.run(stop))

    async def in_hand() -> bool:
        try:
            info = await bus.js.consumer_info("INTENTS", "held")
        except Exception:  # noqa: BLE001 - not created yet
            return False
        return info.num_ack_pending == 3 and info.num_pending == 0

    await wait_for(in_hand, 30, "the three messages to be in hand, held by the pause")
    stop.set()
    await asyncio.wait_for(running, 30)  # a bound on the awaited end, not a speed claim

    assert handled == []  # nothing was handled through the pause
    # given back (nak'ed): the next runner has them at once, not after the 600 s ack_wait
    again = Runner(bus, spec, handle, batch=3, batched=batched)
    stop = asyncio.Event()
    running = asyncio.create_task(again.run(stop))
    try:
        await wait_for(lambda: len(handled) == 3, 60, "the messages given back to be handled by the next runner")
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
    assert sorted(handled) == ["h0", "h1", "h2"]
    # the second delivery; batched, the third when the batch taken ahead (still asked for)
    # got the nak'ed messages and gave them back in turn
    assert all(n in ((2, 3) if batched else (2,)) for n in deliveries), deliveries
