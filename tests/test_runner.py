"""The consumer runner under faults, with real consumer processes and a real nats-server."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from scf.bus import events as ev
from scf.bus.dlq import list_dead
from scf.bus.headers import MSG_ID
from tests.conftest import scf, spawn, stream_count, wait_for

pytestmark = pytest.mark.anyio

CONSUMER = [sys.executable, "-m", "tests.procs.effect_consumer"]


def intent(i: str, **params) -> ev.IntentCreated:
    return ev.IntentCreated.new(ev.Intent(intent_id=i, kind="train", domain="grid:case9", params=params), source="test")


def handled(log: Path) -> list[tuple[str, int]]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        if not line.startswith("exit"):
            i, d = line.split()
            out.append((i, int(d)))
    return out


async def verdicts_for(bus, intent_id: str) -> int:
    return await stream_count(bus, "VERDICTS", "verdict.intent.approve")


async def test_sigkill_mid_handler_redelivers_and_the_effect_happens_once(bus, scf_env, tmp_path):
    log = tmp_path / "handled.log"
    await bus.publish(intent("k1", block=str(tmp_path)))
    p1 = spawn(CONSUMER + ["--log", str(log), "--ack-wait", "2"], scf_env, tmp_path / "p1.out")
    marker = tmp_path / "started-k1"
    await wait_for(marker.exists, 30, "the handler to publish its effect and hang")
    p1.send_signal(signal.SIGKILL)
    p1.wait()
    assert await stream_count(bus, "VERDICTS") == 1  # the effect happened, the ack did not
    p2 = spawn(CONSUMER + ["--log", str(log), "--ack-wait", "2"], scf_env, tmp_path / "p2.out")
    try:
        async def acked() -> bool:
            info = await bus.js.consumer_info("INTENTS", "effect")
            return info.num_ack_pending == 0 and info.num_pending == 0 and len(handled(log)) == 2
        await wait_for(acked, 40, "the redelivered message to be handled and acked")
    finally:
        p2.terminate()
        p2.wait(15)
    assert handled(log) == [("k1", 1), ("k1", 2)]  # handled twice …
    assert await stream_count(bus, "VERDICTS") == 1  # … effect once


async def test_poison_and_exhausted_messages_go_to_the_dlq_with_their_error(bus, scf_env, tmp_path):
    log = tmp_path / "handled.log"
    await bus.js.publish("intent.created.train.garbage", b"{not json", headers={MSG_ID: "garbage-1"})
    await bus.publish(intent("p1", poison=True))
    await bus.publish(intent("f1", fail=True))
    await bus.publish(intent("ok1"))
    proc = spawn(CONSUMER + ["--log", str(log), "--max-deliver", "3"], scf_env, tmp_path / "c.out")
    try:
        async def three_dead() -> bool:
            return await stream_count(bus, "DLQ") == 3
        await wait_for(three_dead, 40, "three dead letters")
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
    dead = {d.event.data.subject: d.event.data for d in await list_dead(bus)}
    assert "not a JSON event" in dead["intent.created.train.garbage"].error
    assert dead["intent.created.train.garbage"].payload == b"{not json"
    assert dead["intent.created.train.garbage"].headers[MSG_ID] == "garbage-1"
    assert dead["intent.created.train.p1"].error.startswith("Poison: this intent can never be handled")
    assert dead["intent.created.train.p1"].deliveries == 1
    assert "failed after 3 deliveries: RuntimeError: handler failed on purpose" in dead["intent.created.train.f1"].error
    assert [d for i, d in handled(log) if i == "f1"] == [1, 2, 3]
    assert await stream_count(bus, "VERDICTS") == 1  # only ok1 had an effect
    info = await bus.js.consumer_info("INTENTS", "effect")
    assert info.num_ack_pending == 0 and info.num_pending == 0  # terminated, not left hanging


async def test_sigterm_drains_without_losing_or_repeating_a_message(bus, scf_env, tmp_path):
    log = tmp_path / "handled.log"
    n = 60
    await bus.publish_many([intent(f"d{i}", work_ms=20) for i in range(n)])
    p1 = spawn(CONSUMER + ["--log", str(log), "--concurrency", "4"], scf_env, tmp_path / "p1.out")
    await wait_for(lambda: len(handled(log)) >= 10, 30, "some messages handled")
    p1.send_signal(signal.SIGTERM)
    assert p1.wait(20) == 0  # drained and exited cleanly
    first = len(handled(log))
    assert first < n
    p2 = spawn(CONSUMER + ["--log", str(log), "--concurrency", "4"], scf_env, tmp_path / "p2.out")
    try:
        await wait_for(lambda: len(handled(log)) >= n, 60, "the rest handled by a second process")
        async def settled() -> bool:
            info = await bus.js.consumer_info("INTENTS", "effect")
            return info.num_ack_pending == 0 and info.num_pending == 0
        await wait_for(settled, 20, "every message acked")
    finally:
        p2.terminate()
        p2.wait(15)
    ids = [i for i, _ in handled(log)]
    assert sorted(ids) == sorted(f"d{i}" for i in range(n))  # none lost, none handled twice
    assert await stream_count(bus, "VERDICTS") == n


async def test_dlq_retry_redrives_to_the_failed_consumer_only(bus, scf_env, tmp_path):
    log = tmp_path / "handled.log"
    other_log = tmp_path / "other.log"
    gate = tmp_path / "fixed"
    await bus.publish(intent("r1", fail_until=str(gate)))
    proc = spawn(CONSUMER + ["--log", str(log), "--max-deliver", "2"], scf_env, tmp_path / "c.out")
    other = spawn(CONSUMER + ["--log", str(other_log), "--durable", "other", "--max-deliver", "50"], scf_env, tmp_path / "o.out")
    try:
        async def dead() -> bool:
            return await stream_count(bus, "DLQ") == 1
        await wait_for(dead, 30, "the failing message in the DLQ")
        gate.write_text("fixed")  # the cause of the failure is repaired
        await wait_for(lambda: ("r1", 1) in handled(other_log) or any(i == "r1" for i, _ in handled(other_log)), 30, "the other consumer to handle r1")
        entries = await list_dead(bus)
        result = scf("dlq", "retry", str(entries[0].seq), env=scf_env)
        assert result.returncode == 0, result.stderr
        assert f"redrove DLQ seq {entries[0].seq} to intent.created.train.r1 for effect" in result.stdout

        async def effect_done() -> bool:
            return await stream_count(bus, "DLQ") == 0 and [i for i, _ in handled(log)].count("r1") == 3
        await wait_for(effect_done, 30, "the redriven message handled")
        async def settled() -> bool:
            info = await bus.js.consumer_info("INTENTS", "other")
            return info.num_pending == 0 and info.num_ack_pending == 0
        await wait_for(settled, 20, "the other consumer to skip the redrive")
    finally:
        for p in (proc, other):
            p.terminate()
            p.wait(15)
    # the other consumer handled only the original r1 (deliveries 1..k, until the fix), never
    # the redrive meant for "effect", which would have started again at delivery 1
    ds = [d for i, d in handled(other_log) if i == "r1"]
    assert ds == list(range(1, len(ds) + 1))
    assert await stream_count(bus, "VERDICTS") == 1  # both consumers derived the same effect id
