"""`Bus.publish_many` writes its publishes as frames (`PipelinedPublisher.publish_frames`):
the same bytes nats-py's `publish` writes, one write and one future per frame, every
message still acknowledged by the server on its own."""

from __future__ import annotations

import base64

import msgspec
import pytest

from scf.bus import client
from scf.bus import events as ev
from scf.bus.client import MSG_ID, SCF_TYPE, header_block
from scf.bus.errors import StreamNotFound
from tests.conftest import stream_count, wait_for

pytestmark = pytest.mark.anyio


def intent(i: str) -> ev.IntentCreated:
    return ev.IntentCreated.new(ev.Intent(intent_id=i, kind="train", domain="grid:case9"), source="test")


async def test_frames_store_what_nats_py_stores(bus):
    # one event through nats-py's own publish, one through the frames: same header bytes
    a, b = intent("a"), intent("b")
    await bus.js.publish(a.subject(), bus._body(a), headers=bus.headers(a))
    [ack] = await bus.publish_many([b])
    via_nats = await bus.js.get_msg("INTENTS", 1)
    via_frames = await bus.js.get_msg("INTENTS", ack.seq)
    assert base64.b64decode(via_frames.hdrs) == base64.b64decode(via_nats.hdrs).replace(a.id.encode(), b.id.encode())
    assert via_frames.headers == {MSG_ID: b.id, SCF_TYPE: b.type_name()}
    assert via_frames.data == bus._body(b) and via_frames.subject == b.subject()


async def test_many_frames_in_order_with_a_small_window(bus, monkeypatch):
    monkeypatch.setattr(client, "FRAME_MESSAGES", 7)
    monkeypatch.setattr(client, "FRAMES_IN_FLIGHT", 2)
    events = [intent(f"i{n}") for n in range(100)]
    acks = await bus.publish_many(events + events[:30])
    assert [a.seq for a in acks[:100]] == list(range(1, 101))  # every reply matched to its own message
    assert [a.seq for a in acks[100:]] == list(range(1, 31)) and all(a.duplicate for a in acks[100:])
    assert await stream_count(bus, "INTENTS") == 100
    assert not bus._pipeline._futures  # every token answered and released


async def test_an_id_that_needs_cleaning_goes_through_nats_py(bus):
    odd = msgspec.structs.replace(intent("odd"), id=" padded-id ")
    assert header_block(odd.id, odd.type_name()) is None
    [ack] = await bus.publish_many([odd])
    stored = await bus.js.get_msg("INTENTS", ack.seq)
    assert stored.headers[MSG_ID] == "padded-id"  # nats-py strips a header value: as before


async def test_a_refused_frame_raises_the_projects_error(bus, monkeypatch):
    pub = await bus.pipeline()
    [reply] = await (await pub.publish_frames([("nowhere.at.all", b"{}", header_block("id-1", "t"))]))
    assert reply.error is not None and reply.error.code == 503
    monkeypatch.setattr(ev.IntentCreated, "subject", lambda self: "nowhere.at.all")
    with pytest.raises(StreamNotFound, match="scf streams ensure"):
        await bus.publish_many([intent("x")])


async def test_ack_many_acks_them_all_in_one_write(bus):
    from nats.errors import MsgAlreadyAckdError

    from scf.bus.client import ack_many
    from scf.bus.streams import ConsumerSpec, ensure_consumer

    await bus.publish_many([intent(f"k{n}") for n in range(20)])
    spec = ConsumerSpec("INTENTS", "acks", ("intent.>",), ack_wait=600.0)
    await ensure_consumer(bus.js, spec)
    psub = await bus.js.pull_subscribe_bind(durable="acks", stream="INTENTS")
    msgs = await psub.fetch(20, timeout=5)
    assert len(msgs) == 20
    await msgs[0].ack()
    with pytest.raises(MsgAlreadyAckdError):  # refused before anything is acked
        await ack_many(bus.nc, msgs)
    await ack_many(bus.nc, msgs[1:])
    await bus.nc.flush()  # the server has the acks; JetStream applies them to the consumer asynchronously

    async def all_acked() -> bool:
        info = await bus.js.consumer_info("INTENTS", "acks")
        return info.num_ack_pending == 0 and info.ack_floor.stream_seq == 20

    await wait_for(all_acked, 10, "the 19 acks of one write to be applied")


def fossil(i: int) -> ev.FossilRecorded:
    import datetime as dt

    c = ev.FossilContent(domain="grid:case14", context=[float(i)], state=[1.0], energy=float(i),
                         observed_at=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
                         provenance=ev.Provenance(source="test", verifier="v", verified=True))
    return ev.FossilRecorded.new(ev.Fossil(**msgspec.structs.asdict(c), fossil_id=ev.fossil_content_id(c)), source="test")


@pytest.mark.parametrize("extra", [None, {"X-Odd": " padded "}])  # the second: nats-py's publish, message by message
async def test_an_atomic_batch_as_one_write_is_all_or_none(bus, extra):
    from scf.bus.client import encode_headers

    assert encode_headers({"X-Odd": " padded "}) is None and encode_headers({"A": "b"}) == b"NATS/1.0\r\nA: b\r\n\r\n"
    pub = await bus.pipeline()
    events = [fossil(i) for i in range(5)]
    reply = await (await pub.publish_atomic([(e.subject(), bus._body(e)) for e in events], extra,
                                            types=[e.type_name() for e in events]))
    assert reply.error is None and reply.count == 5
    stored = await bus.js.get_msg("FOSSILS", reply.seq)
    assert stored.headers[SCF_TYPE] == "fossil.recorded" and stored.data == bus._body(events[-1])
    if extra:
        assert stored.headers["X-Odd"] == "padded"
    # one entity already stored: the whole batch is refused, nothing of it is written
    again = [fossil(10), events[0], fossil(11)]
    assert await bus.commit_batch(again) is None
    assert await stream_count(bus, "FOSSILS") == 5


async def test_a_frame_over_the_servers_max_payload_is_refused_here_not_by_the_server(bus):
    """The server counts a message's header block in max_payload (and closes the connection
    over it, taking every publish and ack in flight with it); nats-py's own check counts the
    body only. A body that fits alone but not with its headers is refused before anything
    is written: MaxPayloadError, the connection kept."""
    import asyncio

    from nats.errors import MaxPayloadError

    limit = bus.nc.max_payload
    pub = await bus.pipeline()
    block = header_block("id-big", "intent.created")
    body = b"x" * (limit - len(block) + 1)  # fits alone, not with its header block
    with pytest.raises(MaxPayloadError):
        await asyncio.wait_for(pub.publish_frames([("intent.created.big", body, block)]), 10)
    with pytest.raises(MaxPayloadError):
        await asyncio.wait_for(pub.publish_atomic([("fossil.recorded.big", body)]), 10)
    with pytest.raises(MaxPayloadError):  # nats-py's publish, message by message (an id it cleans)
        await asyncio.wait_for(pub.publish("intent.created.big", body, {MSG_ID: " id-big ", SCF_TYPE: "intent.created"}), 10)
    await bus.nc.flush()
    assert bus.nc.stats["reconnects"] == 0 and bus.nc.is_connected
    assert not pub._futures  # nothing left waiting for a reply
    # what fits with its headers still goes
    [reply] = await asyncio.wait_for(await pub.publish_frames([("intent.created.fits", body[: -200], block)]), 10)
    assert reply.error is None and reply.seq == 1


async def test_closing_with_a_frame_unanswered_cancels_it_and_still_drains(bus):
    """A frame's replies share one `_Batch`: closing the publisher with one unanswered
    cancels its future (it raised AttributeError, and `Bus.close` then skipped the drain
    that flushes the acks still queued)."""
    import asyncio

    pub = await bus.pipeline()
    await pub._sub.unsubscribe()  # the replies go nowhere: the frame stays unanswered
    fut = await pub.publish_frames([("intent.created.c", b"{}", header_block("id-c", "t"))])
    await bus.close()
    assert fut.cancelled() and bus.nc.is_closed
    with pytest.raises(asyncio.CancelledError):
        await fut



async def test_header_blocks_are_nats_pys_bytes_or_left_to_it(bus):
    """For any id, type and extra header (hostile ones included: CR/LF, NUL, non-ASCII,
    padding), `header_block` / `encode_headers` give exactly the bytes nats-py's `publish`
    writes, or None (then nats-py writes them, cleaning CR/LF to spaces): no value can end
    its header line early and start a protocol line of its own."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from scf.bus.client import encode_headers

    hostile = st.sampled_from(list("ab-_.:é€ \t\r\n\x00\x85\u2028"))
    values = st.text(alphabet=hostile | st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
    cases: list[tuple[dict[str, str], bytes | None]] = []

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(msg_id=values, type_name=values, extra=values)
    def collect(msg_id: str, type_name: str, extra: str) -> None:
        cases.append(({MSG_ID: msg_id, SCF_TYPE: type_name}, header_block(msg_id, type_name)))
        cases.append(({MSG_ID: msg_id, "X-Extra": extra}, encode_headers({MSG_ID: msg_id, "X-Extra": extra})))

    collect()
    nc, sent = bus.nc, []
    real = nc._send_command

    async def capture(cmd, priority=False):  # what nats-py would write, kept here instead
        sent.append(bytes(cmd))

    nc._send_command = capture
    try:
        for headers, ours in cases:
            await nc.publish("h.s", b"x", headers=headers)
            frame = sent.pop()
            block = frame[frame.index(b"\r\n") + 2 : -len(b"x\r\n")]
            if ours is not None:
                assert ours == block, headers
            assert block.count(b"\r\n") == len(headers) + 2  # the first line, one a header, the blank line
            assert b"\r" not in block.replace(b"\r\n", b"") and b"\n" not in block.replace(b"\r\n", b"")
    finally:
        nc._send_command = real
    assert any(ours is None for _, ours in cases) and any(ours is not None for _, ours in cases)
