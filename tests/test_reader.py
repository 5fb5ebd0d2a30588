"""`StreamReader` against a real nats-server: a range of a stream in order, each message
once; the whole stream; a subject nothing matches; several filters, a start time, headers
only; `scan` stops at the end as it stood when the read began; `follow` catches up, then
keeps going, across a server restart; failures say what failed."""

from __future__ import annotations

import asyncio

import pytest

from scf.bus.client import Bus
from scf.bus.errors import SCFError, StreamNotFound
from scf.bus.reader import ReadStalled, StreamMsg, StreamReader, read
from scf.bus.server import ServerProcess, free_port
from scf.bus.settings import Settings
from scf.bus.streams import ensure
from tests.conftest import wait_for

pytestmark = pytest.mark.anyio


async def test_stream_reader_reads_a_range_in_order(bus):
    for i in range(1, 301):
        await bus.js.publish(f"job.progress.r{i % 3}", str(i).encode())
    seen: list[tuple[int, int]] = []
    reader = StreamReader(bus.nc, bus.js, "TRAINING", "job.progress.r1", start_seq=10, end_seq=200)
    stats = await reader.scan(lambda m: seen.append((int(m.data), m.seq)))
    want = [i for i in range(10, 201) if i % 3 == 1]
    assert [d for d, _ in seen] == want and [s for _, s in seen] == want
    assert (stats.messages, stats.passes, stats.last_seq) == (len(want), 1, want[-1])

    everything: list[int] = []
    await StreamReader(bus.nc, bus.js, "TRAINING", "job.>").scan(lambda m: everything.append(m.seq))
    assert everything == list(range(1, 301))
    nothing: list[int] = []
    await StreamReader(bus.nc, bus.js, "TRAINING", "job.none").scan(lambda m: nothing.append(m.seq))
    assert nothing == []


async def test_a_missing_stream_names_the_fix(bus):
    with pytest.raises(StreamNotFound, match="stream NOPE does not exist: run `scf streams ensure`"):
        await StreamReader(bus.nc, bus.js, "NOPE", "x.>").scan(lambda m: None)


async def test_filters_start_time_headers_and_what_a_message_carries(bus):
    for i in range(1, 31):
        await bus.js.publish(f"job.{('started', 'progress', 'failed')[i % 3]}.j{i}", str(i).encode(), headers={"X-N": str(i)})
    msgs = await read(bus, "TRAINING", ["job.started.>", "job.failed.>"])
    assert [m.seq for m in msgs] == [i for i in range(1, 31) if i % 3 != 1]
    first = msgs[0]
    assert isinstance(first, StreamMsg) and first.subject == "job.failed.j2" and first.data == b"2"
    stored = (await bus.js.get_msg("TRAINING", 2)).time
    assert first.headers["X-N"] == "2" and first.time == stored

    at = (await bus.js.get_msg("TRAINING", 21)).time  # messages stored from then on
    seqs = [m.seq for m in await read(bus, "TRAINING", "job.>", start_time=at)]
    assert 19 <= seqs[0] <= 21 and seqs == list(range(seqs[0], 31))  # (the server's clock may repeat a microsecond)
    assert [m.seq for m in await read(bus, "TRAINING", start_seq=28)] == [28, 29, 30]  # no filter: the whole stream

    bodies = await read(bus, "TRAINING", "job.progress.>", headers_only=True)
    assert [m.seq for m in bodies] == list(range(1, 31, 3)) and {m.data for m in bodies} == {b""}
    assert bodies[0].headers["X-N"] == "1"


async def test_scan_stops_at_the_end_as_it_stood_when_the_read_began(bus):
    for i in range(50):
        await bus.js.publish(f"job.progress.j{i}", b"x")
    seen: list[int] = []

    async def slow_and_busy(m: StreamMsg) -> None:  # an async callback, awaited in order
        seen.append(m.seq)
        if m.seq == 1:
            for j in range(20):  # written while the scan runs: not part of it
                await bus.js.publish(f"job.progress.late{j}", b"y")

    stats = await StreamReader(bus.nc, bus.js, "TRAINING", "job.>").scan(slow_and_busy)
    assert seen == list(range(1, 51)) and stats.last_seq == 50


async def test_a_failing_callback_ends_the_read_with_its_error(bus):
    for i in range(5):
        await bus.js.publish(f"job.progress.j{i}", b"x")

    def boom(m: StreamMsg) -> None:
        if m.seq == 3:
            raise ValueError("seq 3 is bad")

    with pytest.raises(ValueError, match="seq 3 is bad"):
        await StreamReader(bus.nc, bus.js, "TRAINING", "job.>").scan(boom)


async def test_follow_catches_up_then_keeps_going(bus):
    for i in range(10):
        await bus.js.publish(f"job.progress.j{i}", b"x")
    seen: list[int] = []
    caught: list[int] = []
    stop = asyncio.Event()
    reader = StreamReader(bus.nc, bus.js, "TRAINING", "job.progress.>")
    task = asyncio.create_task(reader.follow(lambda m: seen.append(m.seq), stop, on_caught_up=lambda: caught.append(len(seen))))
    await wait_for(lambda: reader.caught_up.is_set(), 10, "the follow to catch up")
    assert caught == [10]
    await bus.js.publish("job.started.j0", b"not mine")
    for i in range(5):
        await bus.js.publish(f"job.progress.k{i}", b"x")
    await wait_for(lambda: len(seen) == 15, 10, "the new messages")
    assert seen == list(range(1, 11)) + list(range(12, 17)) and caught == [10]
    stop.set()
    stats = await asyncio.wait_for(task, 10)
    assert stats.last_seq == 16


async def test_follow_on_an_empty_subject_is_caught_up_at_once(bus):
    stop = asyncio.Event()
    reader = StreamReader(bus.nc, bus.js, "TRAINING", "job.>")
    task = asyncio.create_task(reader.follow(lambda m: None, stop))
    await wait_for(lambda: reader.caught_up.is_set(), 10, "an empty view to be caught up")
    stop.set()
    await asyncio.wait_for(task, 10)


@pytest.mark.timeout(120)
async def test_follow_rides_out_a_server_restart_and_scan_says_what_failed(tmp_path, caplog):
    server = ServerProcess(tmp_path / "nats", free_port()).start()
    settings = Settings(home=str(tmp_path / "home"), nats_url=server.url, source="test")
    bus = await Bus.connect(settings, "test")
    try:
        await ensure(bus.js)
        for i in range(20):
            await bus.js.publish(f"job.progress.j{i}", b"x")
        seen: list[int] = []
        stop = asyncio.Event()
        reader = StreamReader(bus.nc, bus.js, "TRAINING", "job.>", stall=5.0)
        task = asyncio.create_task(reader.follow(lambda m: seen.append(m.seq), stop))
        await wait_for(lambda: len(seen) == 20, 10, "the follow to catch up")
        server.stop()
        await asyncio.sleep(1.0)  # an outage of a set length, not a wait for a condition: the follow must survive it
        assert not task.done()
        server.start()
        await wait_for(lambda: bus.nc.is_connected, 30, "the client to reconnect")

        async def published() -> bool:
            try:
                await bus.js.publish("job.progress.after", b"y", timeout=2)
                return True
            except Exception:
                return False

        await wait_for(published, 30, "JetStream back")
        await wait_for(lambda: seen and seen[-1] >= 21, 30, "the message written after the restart")
        assert seen[:20] == list(range(1, 21)) and seen == sorted(set(seen))  # in order, each once
        assert reader.stats.passes >= 2 and not task.done()
        stop.set()
        await asyncio.wait_for(task, 10)

        server.stop()
        with pytest.raises(ReadStalled, match=r"reading TRAINING job\.> failed for 2 s at seq 0 \(.+\): check the connection to NATS and retry"):
            await StreamReader(bus.nc, bus.js, "TRAINING", "job.>", patience=2.0).scan(lambda m: None)
    finally:
        await bus.close()
        server.stop()


async def test_held_out_fossils_without_the_loader_say_what_failed(bus, monkeypatch):
    """The verifier's held-out read once fell back silently to a split of its own."""
    import sys

    from scf.producers.verify import heldout_fossils

    monkeypatch.setitem(sys.modules, "scf.ml.loader", None)  # import fails
    with pytest.raises(SCFError, match=r"^cannot pick the held-out fossils of grid:case14: scf\.ml\.loader does not import \(.+\): "
                       r"reinstall SCF with its train extra \(`pip install 'scf\[train\]'`\)$"):
        await heldout_fossils(bus, "grid:case14", 10)


async def test_a_push_consumer_someone_else_aims_at_the_readers_inbox_is_ignored(bus, monkeypatch):
    """Deliveries on the reader's inbox count only when they come from the consumer it created:
    an operator who saw the inbox (it may subscribe to `_INBOX.>`) and aims a push consumer of
    another stream (or another consumer of the same stream) at it feeds nothing in, and does not
    force the reader onto a new consumer either."""
    from nats.js import api

    for i in range(1, 6):
        await bus.js.publish(f"job.progress.p{i}", str(i).encode())
    await bus.js.publish("control.stop", b"forged")
    inbox = "_INBOX.watched.reader"
    monkeypatch.setattr(bus.nc, "new_inbox", lambda: inbox)
    seen: list[bytes] = []
    stop = asyncio.Event()
    reader = StreamReader(bus.nc, bus.js, "TRAINING", "job.>")
    follower = asyncio.ensure_future(reader.follow(lambda m: seen.append(m.data), stop))
    try:
        await wait_for(lambda: len(seen) == 5, 30, "the reader to catch up")
        for stream, subject in (("CONTROL", "control.stop"), ("TRAINING", "job.progress.p1")):
            await bus.js.add_consumer(stream, api.ConsumerConfig(
                deliver_subject=inbox, ack_policy=api.AckPolicy.NONE, filter_subject=subject,
                deliver_policy=api.DeliverPolicy.ALL))

        async def delivered_both() -> bool:
            infos = [c for s in ("CONTROL", "TRAINING") for c in await bus.js.consumers_info(s) if c.config.deliver_subject == inbox]
            return sum(c.delivered.consumer_seq for c in infos) >= 2 + 5  # the reader's 5, and one of each of the others

        await wait_for(delivered_both, 30, "the stray consumers to deliver onto the inbox")
        await bus.js.publish("job.progress.p6", b"6")
        await wait_for(lambda: len(seen) == 6, 30, "the reader to take the next genuine message")
        assert seen == [b"1", b"2", b"3", b"4", b"5", b"6"]
        assert reader.stats.passes == 1  # not even taken for a gap that forces a new consumer
    finally:
        stop.set()
        await follower
