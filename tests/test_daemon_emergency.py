"""The emergency stop end to end: engaged by control.emergency_stop, mirrored in KV, honoured
by an EmergencyGate-paused consumer (and by the host's lock file); nothing is handled until
the release, then everything is handled once. The daemon creates no intent meanwhile."""

from __future__ import annotations

import asyncio
import time

import pytest

from scf.bus import events as ev
from scf.bus.client import Bus
from scf.bus.emergency import EmergencyGate, read_state
from scf.bus.runner import Runner
from scf.bus.streams import ConsumerSpec
from scf.producers.daemon import DaemonSettings
from tests.conftest import wait_for
from tests.daemon_support import add_fossils, events, operator_key, running_daemon, send, wait_events

pytestmark = pytest.mark.anyio

FAST = DaemonSettings(train_threshold={"HYPER": 5, "STANDARD": 5}, verify_checkpoints="off")
# A stand-in for an effectful consumer (dispatch): acts on final approvals.
EFFECTS = ConsumerSpec("VERDICTS", "test-effects", ("verdict.intent.approve",), ack_wait=5.0)


def approval(i: int) -> ev.VerdictIssued:
    v = ev.Verdict(verdict_id=f"v{i}", subject_id=f"intent-{i}", subject_type="intent", decision="APPROVE", gate="regulator", kind="train")
    return ev.VerdictIssued.new(v, source="safety")


async def observe_nothing_happens(check, seconds: float) -> None:
    """An absence can only be observed for a while: `check` must hold for the whole window."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert check()
        await asyncio.sleep(0.05)  # sampling interval: an absence is observed over a window


async def test_emergency_stop_pauses_effects_and_releases_them_once(bus, settings):
    key = operator_key(settings)
    consumer_bus = await Bus.connect(settings, "effects")
    gate = await EmergencyGate(consumer_bus, settings.emergency_lock, poll=0.05).start()
    handled: list[str] = []

    async def act(event: ev.VerdictIssued, delivery) -> None:
        handled.append(event.data.subject_id)

    runner = Runner(consumer_bus, EFFECTS, act, pause=gate, fetch_timeout=0.2)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        async with running_daemon(settings, FAST) as daemon:
            await send(settings, "shift_gear", {"level": "HYPER"})
            await bus.publish(approval(0))
            await wait_for(lambda: handled == ["intent-0"], 10, "the consumer to work before the stop")

            await send(settings, "emergency_stop", {"reason": "drill"})
            await wait_for(lambda: gate.engaged, 10, "the gate to see the KV mirror")
            state = await read_state(bus)
            assert state.engaged and state.reason == "drill"

            await bus.publish_many([approval(i) for i in range(1, 6)])
            await add_fossils(bus, "grid:case14", 0, 8)  # over the threshold: no intent while engaged

            async def waiting() -> bool:
                info = await bus.js.consumer_info("VERDICTS", EFFECTS.durable)
                return info.num_pending + info.num_ack_pending == 5

            await wait_for(waiting, 10, "the five approvals to wait at the consumer")
            await wait_for(lambda: daemon.fossils.counts.get("grid:case14") is not None and daemon.fossils.counts["grid:case14"].total == 8, 10, "the daemon to count the fossils")
            await observe_nothing_happens(lambda: handled == ["intent-0"], 1.5)
            assert await events(bus, "INTENTS", "intent.created.>") == []

            # no gear, approval or rule lifts it
            await send(settings, "shift_gear", {"level": "STANDARD"})
            await wait_events(bus, "CONTROL", "gear.changed", 2)
            assert gate.engaged and (await read_state(bus)).engaged

            await send(settings, "release_emergency", {"reason": "drill over"}, key=key)
            await wait_for(lambda: len(handled) == 6, 15, "every waiting approval to be handled")
            assert handled == [f"intent-{i}" for i in range(6)]  # in order, once each
            [intent] = await wait_events(bus, "INTENTS", "intent.created.>", 1)
            assert intent.data.params["fossils"] == 8

            # the host's lock file stops this host's consumers even with the KV released
            settings.emergency_lock.write_text("maintenance")
            await wait_for(lambda: gate.engaged, 5, "the gate to see the lock file")
            await bus.publish(approval(6))
            await observe_nothing_happens(lambda: len(handled) == 6, 1.0)
            settings.emergency_lock.unlink()
            await wait_for(lambda: len(handled) == 7, 10, "the approval after the lock file is gone")
        await observe_nothing_happens(lambda: len(handled) == 7, 0.5)  # nothing twice
        assert len(set(handled)) == 7
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await gate.stop()
        await consumer_bus.close()


async def test_emergency_state_survives_a_daemon_restart(bus, settings):
    async with running_daemon(settings, FAST):
        await send(settings, "emergency_stop", {"reason": "storm"})
        await wait_events(bus, "CONTROL", "emergency.engaged", 1)
    kv = await bus.kv("scf_state")
    await kv.delete("emergency")  # a lost cache: the log is the truth
    assert not (await read_state(bus)).engaged
    async with running_daemon(settings, FAST) as daemon:
        assert daemon.state.emergency and daemon.state.emergency_reason == "storm"
        assert (await read_state(bus)).engaged
        await send(settings, "emergency_stop", {"reason": "again"})
        [r] = await wait_events(bus, "CONTROL", "control.rejected", 1)
        assert "already engaged (by anonymous: storm)" in r.data.reason
