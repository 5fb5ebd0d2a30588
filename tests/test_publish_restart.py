"""`Bus.publish_many` (frames, one reply future a frame) across a nats-server SIGKILL and
restart mid-batch: the call ends within its timeout with every ack or one error naming the
server, never hangs on replies lost with the connection, and publishing the same events
again stores each exactly once (at-least-once; their ids dedup)."""

from __future__ import annotations

import asyncio

import pytest

from scf.bus import events as ev
from scf.bus.client import Bus
from scf.bus.errors import ServerError
from scf.bus.server import ServerProcess, free_port
from scf.bus.settings import Settings, init_home
from scf.bus.streams import ensure
from tests.conftest import stream_count, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(200)]


def intent(i: str) -> ev.IntentCreated:
    return ev.IntentCreated.new(ev.Intent(intent_id=i, kind="train", domain="grid:case9"), source="test")


async def test_publish_many_across_a_server_kill_ends_and_a_retry_stores_each_once(tmp_path):
    server = ServerProcess(tmp_path / "nats", free_port()).start()
    settings = Settings(home=str(tmp_path / "home"), nats_url=server.url, source="test")
    init_home(settings)
    bus = await Bus.connect(settings, "test")
    try:
        await ensure(bus.js)
        events = [intent(f"r{k}") for k in range(30000)]
        task = asyncio.create_task(bus.publish_many(events, timeout=4.0))
        await wait_for(lambda: bus.nc.stats["in_msgs"] > 100, 60, "some acks in")
        server.kill()
        server.start()
        try:  # every ack (all came in before the kill or after the restart), or the one error
            assert len(await asyncio.wait_for(task, 60)) == len(events)  # 60: a hang fails, not the 4 s
        except ServerError as exc:
            assert "no publish acknowledgement within 4s" in str(exc)
        await wait_for(lambda: bus.nc.is_connected, 60, "reconnected")
        again = await bus.publish_many(events, timeout=30.0)
        assert len(again) == len(events)
        assert await stream_count(bus, "INTENTS") == len(events)
    finally:
        await bus.close()
        server.stop()
