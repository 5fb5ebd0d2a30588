"""SCF's own receive path (bus/rx.py, natsfix.RxParser): what it hands over is what nats-py
would have, byte for byte; pull batches end on the server's status; redelivery, a deleted
consumer, a server restart mid-fetch, huge and malformed messages. A real nats-server each."""

from __future__ import annotations

import asyncio
import os

import nats
import pytest

from scf.bus import natsfix
from scf.bus.client import Bus, ack_many
from scf.bus.natsfix import MALFORMED, RxParser, parse_headers, rx_parser, sid_of
from scf.bus.runner import Delivery, Pull
from scf.bus.rx import RxMsg, Sink, ack_meta, status_of
from scf.bus.server import ServerProcess, free_port
from scf.bus.settings import Settings
from scf.bus.streams import ConsumerSpec, ensure
from tests.conftest import wait_for
from tests.test_attack_headers import POISON_HEADERS, raw_publish

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


def test_the_nats_py_internals_the_receive_path_hooks_into_are_there():
    """bus/natsfix.py wraps private parts of nats-py 2.16: a new nats-py that moves them must
    fail here, not silently in production."""
    from importlib.metadata import version

    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.protocol.parser import Parser

    assert version("nats-py") == "2.16.0", "nats-py moved: re-check every hook in bus/natsfix.py"
    for name in ("_process_msg", "_process_headers", "_parse_header_lines", "_process_ping", "_process_pong",
                 "_process_info", "_process_err"):
        assert callable(getattr(Client, name)), name
    nc = Client()
    assert isinstance(nc._ps, Parser) and isinstance(nc._subs, dict) and "in_msgs" in nc.stats
    assert hasattr(nc._ps, "buf") and callable(nc._ps.reset)
    assert set(Msg.__dataclass_fields__) >= {"_client", "subject", "reply", "data", "headers", "_metadata", "_ackd", "_sid"}
    assert natsfix.use_rx_parser(nc) is nc._ps and isinstance(nc._ps, RxParser)


HEADER_BLOCKS = [
    None,
    b"",
    b"NATS/1.0\r\n\r\n",
    b"NATS/1.0\r\nNats-Msg-Id: abc\r\nScf-Type: fossil.recorded\r\n\r\n",
    b"NATS/1.0\r\nName:Value\r\nTabbed:\tv \r\nBad Name: x\r\nCtl\x1c: y\r\nNul\x00: z\r\n: empty\r\nno colon\r\n\r\n",
    "NATS/1.0\r\nUtf: väl\r\nNäme: x\r\n\r\n".encode(),
    b"NATS/1.0\r\nBroken: \xff\xfe\r\n\r\n",
    b"NATS/1.0 404 No Messages\r\n\r\n",
    b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 3\r\nNats-Pending-Bytes: 10\r\n\r\n",
    b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 1016\r\nNats-Last-Stream: 1024\r\n\r\n",
    b"NATS/1.0 100 FlowControl Request\r\n\r\n",
    b"NATS/1.0 503\r\n\r\n",
    b"NATS/1.0 abc Weird\r\n\r\n",
    b"XXXX\r\n\r\n",  # 8 bytes, no NATS/1.0 line: nats-py itself raises (bus/natsfix.py)
    b"NATS/1.0",
    b"garbage that is not a header block at all\r\n\r\n",
]


async def test_lazy_header_parsing_gives_what_nats_py_gives_for_every_block():
    from nats.aio.client import Client

    nc = Client()
    for block in HEADER_BLOCKS:
        want = await nc._process_headers(block)
        got = parse_headers(block)
        assert got == want, (block, got, want)
    assert MALFORMED in parse_headers(b"XXXX\r\n\r\n")


def test_ack_metadata_from_both_forms_of_the_ack_subject():
    assert ack_meta("$JS.ACK.FOSSILS.arch.3.1234.17.1700000000000000000.9") == (1234, 3)
    assert ack_meta("$JS.ACK.dom.ACCHASH.FOSSILS.arch.2.55.7.1700000000000000000.0") == (55, 2)
    assert ack_meta("$JS.ACK.dom.ACCHASH.FOSSILS.arch.2.55.7.1700000000000000000.0.rand") == (55, 2)
    with pytest.raises(ValueError, match="not a JetStream ack subject"):
        ack_meta("_INBOX.x.y")
    assert status_of(b"NATS/1.0 409 Consumer Deleted\r\n\r\n") == ("409", "Consumer Deleted")
    assert status_of(b"NATS/1.0 503\r\n\r\n") == ("503", "")


def spec(durable: str, max_deliver: int = 3, ack_wait: float = 30.0) -> ConsumerSpec:
    return ConsumerSpec("INTENTS", durable, ("intent.created.>",), ack_wait=ack_wait, max_deliver=max_deliver)


async def test_raw_sink_and_nats_py_receive_the_same_bytes_huge_small_malformed(bus, settings):
    """Messages of every size (empty, one byte, around the 32 KiB read and the 64 KiB
    gathering thresholds, the server's max_payload), with and without headers, one with a malformed header
    block: a sink on our parser and a nats-py subscription on a stock connection get the same
    subjects, replies, bodies and (parsed) headers, in order."""
    stock = await nats.connect(settings.nats_url)
    try:
        ours: list[RxMsg] = []
        sink = Sink()

        def take() -> None:
            ours.extend(RxMsg(bus.nc, *t) for t in sink.items)
            sink.items = []

        sink.on_flush = take
        sub = await bus.nc.subscribe("rx.test.>")
        rx_parser(bus.nc).sinks[sid_of(sub)] = sink
        theirs: list = []

        async def cb(msg) -> None:
            theirs.append(msg)

        await stock.subscribe("rx.test.>", cb=cb)
        await bus.nc.flush()
        await stock.flush()
        top = bus.nc.max_payload - 200  # room for the headers
        sizes = [0, 1, 2, 100, 32_766, 32_768, 32_800, 65_535, 65_600, 200_000, top]
        rnd = os.urandom(top + 20)
        sent = []
        for i, size in enumerate(sizes):
            body = rnd[i : i + size]
            hdr = {"Nats-Msg-Id": f"id-{i}", "X-Odd": "väl"} if i % 2 else None
            await bus.nc.publish(f"rx.test.{i}", body, reply=f"reply.{i}" if i % 3 else "", headers=hdr)
            sent.append(body)
        await bus.nc.flush()  # ours out before the raw one
        raw_publish(settings.nats_url, "rx.test.bad", POISON_HEADERS, b"body")
        await wait_for(lambda: len(ours) == len(sizes) + 1 and len(theirs) == len(sizes) + 1, 30, "every message")
        # one publisher's messages come in its order on either connection; the raw publisher's
        # one (another connection) is not ordered against them: seen once passing a big one
        in_order = [f"rx.test.{i}" for i in range(len(sizes))]
        for got in (ours, theirs):
            assert [m.subject for m in got if m.subject != "rx.test.bad"] == in_order
        theirs_by_subject = {m.subject: m for m in theirs}
        for a in ours:
            b = theirs_by_subject[a.subject]
            assert (a.subject, a.reply, a.data, a.headers) == (b.subject, b.reply, b.data, b.headers)
        by_subject = {m.subject: m for m in ours}
        assert [by_subject[f"rx.test.{i}"].data for i in range(len(sizes))] == sent
        bad = by_subject["rx.test.bad"]
        assert MALFORMED in bad.headers and bad.data == b"body"
        # the same connection's other subscriptions still go through nats-py
        assert (await bus.nc.request("$JS.API.INFO", b"", timeout=5)).data
        rx_parser(bus.nc).sinks.pop(sid_of(sub))
        await sub.unsubscribe()
    finally:
        await stock.close()


async def intents(bus: Bus, n: int, tag: str = "i") -> None:
    from tests.test_runner_batched import intent

    await bus.publish_many([intent(f"{tag}{k}") for k in range(n)])


async def test_pull_batches_redelivery_and_an_empty_consumer(bus):
    """Full batches while the stream has them, every message once in order; a nak'ed message
    comes back with its delivery count; an empty consumer answers with an empty batch."""
    await intents(bus, 130)
    pull = Pull(bus, spec("rx-pull"))
    stop = asyncio.Event()
    try:
        sizes, seqs, redelivered = [], [], []
        while len(seqs) < 131:  # 130 messages, the first of them twice (nak'ed once)
            msgs = await pull.fetch(50, 5.0, stop)
            assert msgs and all(isinstance(m, RxMsg) for m in msgs)
            sizes.append(len(msgs))
            ds = [Delivery(m, m.subject) for m in msgs]
            seqs += [d.stream_seq for d in ds]
            assert [d.stream_seq for d in ds] == [m.metadata.sequence.stream for m in msgs]
            assert [d.deliveries for d in ds] == [m.metadata.num_delivered for m in msgs]
            assert all(m.headers.get("Nats-Msg-Id") for m in msgs)
            redelivered += [d.stream_seq for d in ds if d.deliveries > 1]
            if len(seqs) == len(msgs):
                await msgs[0].nak()
                msgs = msgs[1:]
            await ack_many(bus.nc, msgs)
        assert sizes[:2] == [50, 50] and sum(sizes) == 131
        assert sorted(set(seqs)) == list(range(1, 131)) and redelivered == [1]
        assert await pull.fetch(50, 0.3, stop) == []
    finally:
        await pull.close()
    info = await bus.js.consumer_info("INTENTS", "rx-pull")
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_a_long_poll_takes_a_message_published_while_it_waits_and_the_rest_of_the_batch(bus):
    pull = Pull(bus, spec("rx-wait"))
    stop = asyncio.Event()
    try:
        assert await pull.fetch(10, 0.2, stop) == []  # binds; nothing there
        waiting = asyncio.ensure_future(pull.fetch(10, 10.0, stop))

        async def polling() -> bool:  # the long poll is in the server's hands
            return (await bus.js.consumer_info("INTENTS", "rx-wait")).num_waiting >= 1

        await wait_for(polling, 10, "the long poll to wait at the server")
        await intents(bus, 5, "w")
        msgs = await waiting
        assert 1 <= len(msgs) <= 5
        rest = await pull.fetch(10, 1.0, stop)
        assert len(msgs) + len(rest) == 5
        await ack_many(bus.nc, msgs + rest)
    finally:
        await pull.close()


async def test_a_deleted_consumer_is_bound_again(bus):
    pull = Pull(bus, spec("rx-del"))
    stop = asyncio.Event()
    await intents(bus, 3, "d")
    try:
        first = await pull.fetch(1, 5.0, stop)
        await ack_many(bus.nc, first)
        await bus.js.delete_consumer("INTENTS", "rx-del")
        got: list = []

        async def refetched() -> bool:
            got.extend(await pull.fetch(10, 1.0, stop))
            return len(got) >= 3  # a new consumer (ensure_consumer) starts over: all three again

        await wait_for(refetched, 30, "the pull to bind a new consumer")
        await ack_many(bus.nc, got)
    finally:
        await pull.close()


async def test_a_server_restart_mid_fetch_is_ridden_out(tmp_path):
    server = ServerProcess(tmp_path / "nats", free_port()).start()
    settings = Settings(home=str(tmp_path / "home"), nats_url=server.url, source="test")
    bus = await Bus.connect(settings, "test")
    try:
        await ensure(bus.js)
        pull = Pull(bus, spec("rx-restart"))
        stop = asyncio.Event()
        assert await pull.fetch(10, 0.2, stop) == []
        waiting = asyncio.ensure_future(pull.fetch(10, 3.0, stop))
        server.stop()
        assert await waiting == []  # the request is lost with the connection: an empty batch, no exception
        server.start()
        await wait_for(lambda: bus.nc.is_connected, 30, "the reconnection")
        await intents(bus, 4, "r")
        got: list = []

        async def fetched() -> bool:
            got.extend(await pull.fetch(10, 1.0, stop))
            return len(got) >= 4

        await wait_for(fetched, 60, "the messages published after the restart")
        assert sorted(m.data for m in got) == sorted({m.data for m in got})
        await ack_many(bus.nc, got)
        await pull.close()
    finally:
        await bus.close()
        server.stop()


async def test_the_archive_rides_out_a_server_restart_and_holds_back_the_server_when_full(tmp_path):
    """The archive's raw ordered consumer (projections/archive.py on bus/rx.py): a buffer of
    two files' worth holds the flow-control reply (the server waits, nothing is lost); a
    server restart loses the consumer and the follower resubscribes after the last message
    written; every message ends up archived once, in order."""
    from scf.projections.archive import ArchiveSettings, StreamFollower
    from scf.projections.store import ArchiveStore
    from tests.test_runner_batched import intent

    server = ServerProcess(tmp_path / "nats", free_port()).start()
    settings = Settings(home=str(tmp_path / "home"), nats_url=server.url, source="test")
    bus = await Bus.connect(settings, "test")
    store = ArchiveStore(tmp_path / "archive")
    store.ensure()
    stop = asyncio.Event()
    try:
        await ensure(bus.js)
        await bus.publish_many([intent(f"a{k}") for k in range(3000)])
        follower = StreamFollower(bus, store, "INTENTS", 1, ArchiveSettings(flush_rows=200, flush_seconds=0.2))
        holds: list[int] = []
        take = follower._take

        def watched_take() -> None:  # how full the buffer got (the hold is what bounds it)
            take()
            holds.append(len(follower._buffer))

        follower._take = watched_take  # type: ignore[method-assign]
        task = asyncio.create_task(follower.run(stop))
        await wait_for(lambda: store.position("INTENTS") == 3000, 60, "the first 3000 archived")
        server.stop()
        server.start()
        await wait_for(lambda: bus.nc.is_connected, 30, "the reconnection")

        async def jetstream_up() -> bool:
            try:
                return (await bus.js.stream_info("INTENTS")).state.messages == 3000
            except Exception:  # noqa: BLE001 - JetStream still recovering
                return False

        await wait_for(jetstream_up, 30, "JetStream to be back")
        await bus.publish_many([intent(f"b{k}") for k in range(500)])
        await wait_for(lambda: store.position("INTENTS") == 3500, 60, "the 500 published after the restart archived")
        stop.set()
        stats = await task
        assert stats.resubscribes >= 1
        assert max(holds) < 2 * 200 + 3000  # bounded by the hold (and the server's flow-control window)
        import pyarrow.parquet as pq

        seqs = sorted(s for f in (tmp_path / "archive").rglob("*.parquet") for s in pq.read_table(f, columns=["seq"])["seq"].to_pylist())
        assert seqs == list(range(1, 3501))
    finally:
        stop.set()
        await bus.close()
        server.stop()


async def test_the_parser_gives_the_same_messages_however_the_reads_cut_the_stream():
    """The protocol bytes cut at every kind of boundary (inside a control line, a header
    block, a payload, the CRLF after it; one byte at a time; one 200 KiB message gathered in
    chunks): a sink gets every message whole, in order; +OK lines go to nats-py's parser."""
    from nats.aio.client import Client

    nc = Client()  # never connected: the parser alone, fed bytes
    ps = natsfix.use_rx_parser(nc)
    sink = Sink()
    got: list = []

    def take() -> None:
        got.extend(sink.items)
        sink.items = []

    sink.on_flush = take
    ps.sinks[7] = sink
    big = os.urandom(200_000)
    msgs = [
        (b"a.b", b"", None, b"hello"),
        (b"a.c", b"$JS.ACK.S.c.1.2.3.4.0", b"NATS/1.0\r\nNats-Msg-Id: x\r\n\r\n", b"body with\r\nCRLF inside"),
        (b"a.d", b"", b"NATS/1.0\r\nK: v\r\n\r\n", b""),
        (b"a.e", b"r", None, big),
        (b"a.f", b"", None, b""),
    ]
    wire = b"+OK\r\n"
    for subject, reply, hdr, body in msgs:
        r = b" " + reply if reply else b""
        if hdr is None:
            wire += b"MSG %s 7%s %d\r\n%s\r\n" % (subject, r, len(body), body)
        else:
            wire += b"HMSG %s 7%s %d %d\r\n%s%s\r\n" % (subject, r, len(hdr), len(hdr) + len(body), hdr, body)
        wire += b"+OK\r\n"
    for cut in (len(wire), 1, 2, 3, 5, 7, 13, 4096, 32_768):
        got.clear()
        ps.reset()
        for i in range(0, len(wire), cut):
            await ps.parse(wire[i : i + cut])
        assert got == msgs, cut
        assert ps._rest == b"" and not ps._need and not ps.buf
    assert nc.stats["in_msgs"] == 9 * len(msgs)
