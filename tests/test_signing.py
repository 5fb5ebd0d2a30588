"""Signatures: verified on bytes before parsing; tampered, unknown-key and missing refused."""

from __future__ import annotations

import pytest

from scf.bus import codec, control
from scf.bus import events as ev
from scf.bus.errors import SignatureError
from scf.bus.signing import SigningKey, TrustList


@pytest.fixture
def keys(tmp_path):
    op = SigningKey.generate("alice")
    op.save(tmp_path / "keys")
    trust = TrustList.load(tmp_path / "keys" / "trusted.json")
    trust.trust(op.public_b64, "alice", ["operator", "release"])
    trust.save()
    return SigningKey.load(tmp_path / "keys" / "alice.key"), TrustList.load(tmp_path / "keys" / "trusted.json")


def promotion() -> ev.CheckpointPromoted:
    return ev.CheckpointPromoted.new(
        ev.Promotion(checkpoint_id="c1", domain="grid:case9", alias="production", version=2, uri="file:///x", sha256="ab" * 32),
        source="test",
    )


def test_signed_event_verifies_after_a_save_and_reload(keys):
    key, trust = keys
    signed = codec.sign(promotion(), key)
    decoded = codec.Codec([ev.CheckpointPromoted], trust=trust, require_signature=True, role="release").decode(signed)
    assert decoded.kid == key.kid and decoded.data.version == 2


def test_tampered_payload_is_refused(keys):
    key, trust = keys
    signed = codec.sign(promotion(), key)
    tampered = signed.replace(b'"version":2', b'"version":3')
    assert tampered != signed
    with pytest.raises(SignatureError, match="bad signature from key .*: the message was altered"):
        codec.Codec(trust=trust).decode(tampered)


def test_tampered_envelope_is_refused(keys):
    key, trust = keys
    signed = codec.sign(promotion(), key)
    with pytest.raises(SignatureError, match="bad signature"):
        codec.Codec(trust=trust).decode(signed.replace(b'"source":"test"', b'"source":"evil"'))


def test_unknown_key_is_refused(keys):
    _, trust = keys
    stranger = SigningKey.generate("mallory")
    with pytest.raises(SignatureError, match=f"unknown signing key {stranger.kid}: add it to the trust list"):
        codec.Codec(trust=trust).decode(codec.sign(promotion(), stranger))


def test_missing_signature_is_refused_where_required(keys):
    _, trust = keys
    plain = codec.encode(promotion())
    assert codec.Codec(trust=trust).decode(plain).sig is None  # allowed where not required
    with pytest.raises(SignatureError, match="missing signature"):
        codec.Codec(trust=trust, require_signature=True).decode(plain)


def test_role_is_enforced(keys):
    _, trust = keys
    node = SigningKey.generate("node-a")
    trust.trust(node.public_b64, "node-a", ["node"])
    with pytest.raises(SignatureError, match="lacks the 'release' role"):
        codec.Codec(trust=trust, role="release").decode(codec.sign(promotion(), node))


def test_signature_is_checked_before_the_payload_is_parsed(keys):
    key, trust = keys
    signed = codec.sign(promotion(), key)
    # break the payload's *type* but keep the JSON valid: a typed parse would raise a
    # DecodeError; verification must come first and raise SignatureError.
    broken = signed.replace(b'"version":2', b'"version":"two"')
    with pytest.raises(SignatureError):
        codec.Codec(trust=trust).decode(broken)


def test_signed_control_commands(keys):
    key, trust = keys
    subject, body, headers = control.encode(control.ReleaseEmergency(reason="clear", by="alice"), key)
    received = control.decode(subject, body, headers, trust, require_signature=True)
    assert received.signer == "alice" and isinstance(received.command, control.ReleaseEmergency)
    # the signature covers the subject: replaying it on another verb fails
    with pytest.raises(SignatureError, match="bad signature"):
        control.decode("control.resume", body, headers, trust)
    with pytest.raises(SignatureError, match="missing signature"):
        control.decode(subject, body, {}, trust, require_signature=True)
