"""Publishing: dedup by Nats-Msg-Id, per-entity exactly-once, server errors mapped."""

from __future__ import annotations

import msgspec
import pytest

from scf.bus import events as ev
from scf.bus.errors import PublishConflict, StreamNotFound
from scf.bus.streams import STREAMS, ensure
from tests.conftest import stream_count

pytestmark = pytest.mark.anyio


def intent(i: str, **params) -> ev.IntentCreated:
    return ev.IntentCreated.new(ev.Intent(intent_id=i, kind="train", domain="grid:case9", params=params), source="test")


async def test_same_event_published_twice_is_stored_once(bus):
    e = intent("a")
    first = await bus.publish(e)
    second = await bus.publish(e)
    assert not first.duplicate and second.duplicate and second.seq == first.seq
    assert await stream_count(bus, "INTENTS") == 1


async def test_publish_many_dedups_within_a_batch(bus):
    events = [intent(f"i{n}") for n in range(200)]
    acks = await bus.publish_many(events + events[:50])
    assert sum(a.duplicate for a in acks) == 50
    assert await stream_count(bus, "INTENTS") == 200


async def test_expected_sequence_conflict_raises_the_projects_error(bus):
    e = intent("once")
    await bus.publish(e)
    again = msgspec.structs.replace(e, id="another-id")  # a different message for the same subject
    from scf.bus.client import map_error

    with pytest.raises(Exception) as raw:
        await bus.js.publish(again.subject(), b"{}", headers=bus.headers(again, expect_new=True))
    mapped = map_error(raw.value, again.subject())
    assert isinstance(mapped, PublishConflict)
    assert (mapped.code, mapped.err_code) == (400, 10071)
    assert "already holds a message" in str(mapped)


async def test_publish_once_new_duplicate_conflict(bus):
    e = intent("x", steps=10)
    assert (await bus.publish_once(e)).status == "new"
    # same event again (dedup window): duplicate
    assert (await bus.publish_once(e)).status == "duplicate"
    # same content under a new event id (as after the dedup window): still a duplicate
    same_content = msgspec.structs.replace(e, id="later-id")
    res = await bus.publish_once(same_content)
    assert res.status == "duplicate" and res.existing is not None and res.existing.id == e.id
    # different content for the same entity: a conflict, reported with what is there
    different = intent("x", steps=11)
    res = await bus.publish_once(different)
    assert res.status == "conflict" and res.existing.data.params == {"steps": 10}
    assert await stream_count(bus, "INTENTS") == 1


async def test_publish_without_a_stream_names_the_fix(settings):
    from scf.bus.client import Bus

    b = await Bus.connect(settings, "test")
    try:
        with pytest.raises(StreamNotFound, match="scf streams ensure"):
            await b.publish(intent("nostream"))
    finally:
        await b.close()


async def test_streams_ensure_is_idempotent_and_reports_drift(bus):
    report = await ensure(bus.js)
    assert not report.created and not report.updated
    assert len(report.unchanged) >= len(STREAMS)
    # someone changes a stream by hand: ensure puts it back and says what differed
    info = await bus.js.stream_info("LEDGER")
    cfg = info.config
    cfg.duplicate_window = 5.0
    cfg.description = "edited"
    await bus.js.update_stream(cfg)
    report = await ensure(bus.js)
    assert sorted(report.updated["stream LEDGER"]) == ["description", "duplicate_window"]
    assert (await bus.js.stream_info("LEDGER")).config.duplicate_window == 120.0


def fossil(i: int) -> ev.FossilRecorded:
    import datetime as dt

    content = ev.FossilContent(
        domain="grid:case9", context=[float(i)], state=[1.0], energy=2.0,
        observed_at=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
        provenance=ev.Provenance(source="t", verifier="v", verified=True),
    )
    return ev.FossilRecorded.new(ev.Fossil(**msgspec.structs.asdict(content), fossil_id=ev.fossil_content_id(content)), source="test")


async def test_atomic_batches_store_each_entity_once(bus):
    first = [fossil(i) for i in range(2500)]
    res = await bus.publish_batch(first)
    assert [r.status for r in res] == ["new"] * 2500
    assert [r.seq for r in res] == list(range(1, 2501))
    # a re-run with some old and some new entities (and one entity twice): the refused
    # batch falls back to one by one, and each entity is still stored once
    again = [fossil(i) for i in range(2400, 2600)] + [fossil(2599)]
    res = await bus.publish_batch(again)
    assert [r.status for r in res] == ["duplicate"] * 100 + ["new"] * 100 + ["duplicate"]
    assert await stream_count(bus, "FOSSILS") == 2600
