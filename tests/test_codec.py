"""The event contract: round-trips, golden files, upcasting, boundary decoders."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scf.bus import codec
from scf.bus import events as ev
from scf.bus.errors import DecodeError, UnknownEventType

GOLDEN = Path(__file__).parent / "golden"

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
st.register_type_strategy(float, finite)
utc_times = st.datetimes(
    min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2100, 1, 1), timezones=st.just(dt.timezone.utc)
)
st.register_type_strategy(dt.datetime, utc_times)


def struct_strategy(cls):
    """Every field drawn from its type (hypothesis would otherwise reuse msgspec's default factories)."""
    return st.fixed_dictionaries({f.name: st.from_type(f.type) for f in msgspec.structs.fields(cls)}).map(lambda kw: cls(**kw))


def _all_payloads(base):
    for sub in base.__subclasses__():
        yield sub
        yield from _all_payloads(sub)


for _cls in set(_all_payloads(ev.Payload)):
    st.register_type_strategy(_cls, st.deferred(lambda c=_cls: struct_strategy(c)))


def envelope(cls):
    return st.builds(
        cls,
        id=st.uuids().map(str),
        at=utc_times,
        source=st.text(min_size=1, max_size=20),
        correlation_id=st.none() | st.text(max_size=10),
        causation_id=st.none() | st.text(max_size=10),
        data=st.from_type(msgspec.structs.fields(cls)[-1].type),
    )


@pytest.mark.parametrize("cls", ev.ALL_EVENTS, ids=lambda c: c.type_name())
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_type_round_trips(cls, data):
    event = data.draw(envelope(cls))
    encoded = codec.encode(event)
    assert codec.decode(encoded) == event
    # the per-boundary decoder for just this type agrees
    assert codec.Codec([cls]).decode(encoded) == event
    assert event.subject().split(".")[0] in {
        "fossil", "intent", "code", "state", "verdict", "work", "job", "checkpoint", "control", "gear", "emergency", "deploy", "energy", "ledger", "dlq", "proof", "contract", "strike",
    }


def test_every_type_has_a_golden_file():
    names = {p.name.rsplit(".v", 1)[0] for p in GOLDEN.glob("*.json")}
    assert names == set(ev.EVENT_TYPES)


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.json")), ids=lambda p: p.name)
def test_golden_files_decode(path):
    event = codec.decode(path.read_bytes())
    assert event.type_name() == path.name.rsplit(".v", 1)[0]
    assert event.v == codec.current_version(type(event))  # old versions come back upcast
    assert event.id and event.at.tzinfo is not None


def test_gear_changed_v1_is_upcast_to_v2():
    event = codec.decode((GOLDEN / "gear.changed.v1.json").read_bytes())
    assert isinstance(event, ev.GearChanged)
    assert event.v == 2
    assert event.data == ev.GearChange(from_gear=None, to_gear="HYPER", by="alice", reason="")


def test_v1_with_impossible_level_is_refused():
    bad = (GOLDEN / "gear.changed.v1.json").read_bytes().replace(b'"level": 3', b'"level": 9')
    with pytest.raises(DecodeError, match="level 9"):
        codec.decode(bad)


def test_newer_version_than_known_is_refused():
    newer = (GOLDEN / "gear.changed.v2.json").read_bytes().replace(b'"v": 2', b'"v": 7')
    with pytest.raises(DecodeError, match="newer than this build knows"):
        codec.decode(newer)


def test_boundary_decoder_refuses_other_types_by_name():
    only_verdicts = codec.Codec([ev.VerdictIssued])
    with pytest.raises(UnknownEventType, match="'intent.created' is not accepted here: expected verdict.issued"):
        only_verdicts.decode((GOLDEN / "intent.created.v1.json").read_bytes())


def test_errors_carry_the_path_to_the_bad_value():
    bad = (GOLDEN / "job.progress.v1.json").read_bytes().replace(b'"step": 100', b'"step": "lots"')
    with pytest.raises(DecodeError, match=r"Expected `int`, got `str` - at `\$.data.step`"):
        codec.decode(bad)


def test_fossil_content_id_covers_the_content():
    f = codec.decode((GOLDEN / "fossil.recorded.v1.json").read_bytes()).data
    assert ev.fossil_content_id(f.content()) == f.fossil_id
    changed = msgspec.structs.replace(f.content(), energy=f.energy + 1)
    assert ev.fossil_content_id(changed) != f.fossil_id


def test_derived_ids_are_deterministic_per_cause():
    cause = codec.decode((GOLDEN / "intent.created.v1.json").read_bytes())
    verdict = ev.Verdict(verdict_id="v", subject_id="int-1", subject_type="intent", decision="APPROVE", gate="regulator")
    a = ev.VerdictIssued.new(verdict, source="x", cause=cause)
    b = ev.VerdictIssued.new(verdict, source="y", cause=cause)
    assert a.id == b.id and a.causation_id == cause.id and a.correlation_id == "corr-1"
    other = ev.VerdictIssued.new(msgspec.structs.replace(verdict, verdict_id="w"), source="x", cause=cause)
    assert other.id != a.id
