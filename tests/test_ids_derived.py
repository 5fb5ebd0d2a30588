"""Derived and keyed ids are computed faster than the standard library, and must stay the
same ids, bit for bit: JetStream dedups a redelivered input's effects by them, and ids
already in the log (transfer ids, verdict ids) are recomputed by `scf ledger verify`."""

from __future__ import annotations

import hashlib
import hmac
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scf.bus.ids import SCF_NAMESPACE, derived_id, keyed_id


def stdlib_derived(*parts: object) -> str:
    """`derived_id` as it was written before uuid_utils: the reference."""
    return str(uuid.uuid5(SCF_NAMESPACE, "\x1f".join(str(p) for p in parts)))


def stdlib_keyed(key: bytes, *parts: object) -> str:
    digest = bytearray(hmac.new(key, "\x1f".join(str(p) for p in parts).encode(), hashlib.sha256).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x80
    digest[8] = (digest[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(digest)))


part = st.one_of(st.text(), st.integers(), st.floats(allow_nan=False), st.none())


@settings(max_examples=400, deadline=None)
@given(st.lists(part, max_size=5))
def test_derived_id_is_the_standard_librarys_uuid5(parts):
    assert derived_id(*parts) == stdlib_derived(*parts)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=16, max_size=64), st.lists(part, max_size=4))
def test_keyed_id_is_unchanged(key, parts):
    assert keyed_id(key, *parts) == stdlib_keyed(key, *parts)


def test_known_ids_stay_put():
    # fixed points (computed with `uuid.uuid5`): ids of this shape are in every existing log
    assert derived_id("ledger.transfer", "cause-1") == "3d9f7a36-b13d-5c7b-bcaa-931d0ea547c8"
    assert derived_id("verdict", "intent", "i-1", "0192") == "5eda3139-37d8-595f-9ea6-5a919f1b2094"
    assert derived_id() == str(uuid.uuid5(SCF_NAMESPACE, ""))
    assert uuid.UUID(derived_id("x")).version == 5


def test_a_lone_surrogate_fails_as_in_the_standard_library():
    with pytest.raises(UnicodeEncodeError):
        stdlib_derived("a\udc80")
    with pytest.raises(UnicodeEncodeError):
        derived_id("a\udc80")


@settings(max_examples=200, deadline=None)
@given(st.uuids(), st.text())
def test_uuid5_is_the_standard_librarys(namespace, name):
    from scf.bus.ids import uuid5

    assert uuid5(namespace, name) == str(uuid.uuid5(namespace, name))


@settings(max_examples=200, deadline=None)
@given(st.text(), st.text(), st.integers(), st.integers())
def test_a_measurements_cause_id_is_unchanged(node, meter, start, end):
    from scf.consumers.energy import CAUSE_NAMESPACE, cause_id

    expected = str(uuid.uuid5(CAUSE_NAMESPACE, "\x1f".join(["energy.cause", node, meter, str(start), str(end)])))
    assert cause_id(node, meter, start, end) == expected
