"""The daemon's pure decisions: control commands, orient, gears, the control file, promotion."""

from __future__ import annotations

import datetime as dt

import msgspec
import pytest

from scf.bus import control, gears
from scf.bus import events as ev
from scf.bus.errors import DecodeError, SignatureError
from scf.bus.signing import SigningKey, TrustList
from scf.producers.control_file import ControlFileError, parse
from scf.producers.daemon import (
    TRAIN_INTENT_PARAMS,
    CommandContext,
    ControlState,
    DomainCount,
    SubjectRuling,
    TrainMark,
    decide_control,
    mark_of,
    orient,
    train_intent_id,
)
from scf.producers.verify import Verification, VerifySettings, compare, decide_promotion

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def ctx(subject: str, body: bytes = b"{}", seq: int = 7, sandbox: bool = False) -> CommandContext:
    return CommandContext(seq, subject, body, "daemon@test", sandbox, NOW)


def apply(state: ControlState, subject: str, body: bytes = b"{}", *, trust=None, headers=None, sandbox=False, holds=None, seq=7):
    verb = subject.removeprefix("control.")
    try:
        received = control.decode(subject, body, headers, trust, require_signature=verb == "release_emergency")
    except (DecodeError, SignatureError) as exc:
        received = exc
    return decide_control(state, received, ctx(subject, body, seq, sandbox), holds or {})


def only(events, cls):
    assert len(events) == 1, events
    assert isinstance(events[0], cls), events
    return events[0]


# --------------------------------------------------------------------------- gears


def test_gear_table_matches_design():
    assert [g for g in gears.GEAR_TABLE] == list(ev.GEARS)
    assert [gears.spec(g).heartbeat_s for g in ev.GEARS] == [5.0, 1.0, 0.1, 0.05]
    assert gears.needs_human("STANDARD", "train") and gears.needs_human("STANDARD", "deploy")
    assert not gears.needs_human("ACCELERATED", "train") and gears.needs_human("ACCELERATED", "deploy")
    assert not gears.needs_human("HYPER", "train") and not gears.needs_human("HYPER", "deploy")
    assert gears.spec("STANDARD").hypotheses == 1 < gears.spec("ACCELERATED").hypotheses < gears.spec("HYPER").hypotheses
    assert gears.spec("SINGULARITY").sandbox_only
    assert gears.normalise("accelerated") == "ACCELERATED" and gears.normalise("3") == "HYPER"
    with pytest.raises(gears.UnknownGear):
        gears.normalise("LUDICROUS")


def test_gear_state_decoding_is_forgiving_and_strict_by_default():
    assert gears.decode_state(None).gear == "STANDARD"
    assert gears.decode_state(b"HYPER").gear == "HYPER"
    assert gears.decode_state(b"{garbage").gear == "STANDARD"
    assert gears.decode_state(b'{"gear": "WARP"}').gear == "STANDARD"
    s = gears.GearState(gear="ACCELERATED", by="alice")
    assert gears.decode_state(gears.encode_state(s)) == s


# --------------------------------------------------------------------------- control verbs


def test_shift_gear_changes_gear_and_records_who():
    state, events = apply(ControlState(), "control.shift_gear", b'{"level": "ACCELERATED", "by": "alice", "reason": "bulk"}')
    e = only(events, ev.GearChanged)
    assert (e.data.from_gear, e.data.to_gear, e.data.by, e.data.reason) == ("STANDARD", "ACCELERATED", "alice", "bulk")
    assert state.gear == "ACCELERATED" and state.applied_seq == 7
    assert e.causation_id == "CONTROL:7" and e.subject() == "gear.changed"


def test_effect_ids_are_derived_from_the_command():
    a = apply(ControlState(), "control.stop")[1][0]
    b = apply(ControlState(), "control.stop")[1][0]
    c = apply(ControlState(), "control.stop", seq=8)[1][0]
    assert a.id == b.id != c.id


@pytest.mark.parametrize(
    "subject, body, state, reason",
    [
        ("control.warp", b"{}", ControlState(), "unknown control verb 'warp'"),
        ("control.shift_gear", b"{not json", ControlState(), "malformed JSON in control.shift_gear"),
        ("control.shift_gear", b'{"level": "WARP"}', ControlState(), "unknown gear 'WARP'"),
        ("control.shift_gear", b'{"gear": "HYPER"}', ControlState(), "malformed control.shift_gear command"),
        ("control.shift_gear", b'{"level": "SINGULARITY"}', ControlState(), "SINGULARITY is refused: this deployment is not a sandbox"),
        ("control.shift_gear", b'{"level": "STANDARD"}', ControlState(), "already in gear STANDARD"),
        ("control.stop", b"{}", ControlState(stopped=True), "already stopped"),
        ("control.resume", b"{}", ControlState(), "not stopped"),
        ("control.emergency_stop", b"{}", ControlState(emergency=True, emergency_by="bob"), "already engaged (by bob"),
        ("control.release_emergency", b"{}", ControlState(emergency=True), "missing signature"),
        ("control.approve", b'{"subject_id": "nope"}', ControlState(), "nothing is held with id 'nope'"),
        ("control.approve", b"{}", ControlState(), "malformed control.approve command"),
    ],
)
def test_bad_commands_become_rejections(subject, body, state, reason):
    new, events = apply(state, subject, body, trust=TrustList())
    e = only(events, ev.ControlRejected)
    assert reason in e.data.reason, e.data.reason
    assert e.data.command_subject == subject and e.data.body == body.decode() and e.data.command_seq == 7
    assert new.applied_seq == 7
    assert msgspec.structs.replace(new, applied_seq=state.applied_seq) == state  # nothing else changed


def test_singularity_in_a_sandbox():
    state, events = apply(ControlState(gear="HYPER"), "control.shift_gear", b'{"level": "SINGULARITY"}', sandbox=True)
    assert only(events, ev.GearChanged).data.to_gear == "SINGULARITY" and state.gear == "SINGULARITY"


def test_stop_resume_and_emergency_cycle():
    key = SigningKey.generate("op")
    trust = TrustList()
    trust.trust(key.public_b64, "op", ["operator"])
    s, e = apply(ControlState(), "control.stop", b'{"reason": "maintenance"}')
    assert s.stopped and only(e, ev.DaemonStopped).data.reason == "maintenance"
    s, e = apply(s, "control.resume")
    assert not s.stopped and only(e, ev.DaemonResumed)
    s, e = apply(s, "control.emergency_stop", b'{"reason": "storm", "by": "carol"}')
    assert s.emergency and s.emergency_reason == "storm" and only(e, ev.EmergencyEngaged).data.origin == "control"
    # unsigned, or signed by an unknown key, or by a key without the operator role: refused
    _, e = apply(s, "control.release_emergency", trust=trust)
    assert "missing signature" in only(e, ev.ControlRejected).data.reason
    subject, body, headers = control.encode(control.ReleaseEmergency(reason="clear"), SigningKey.generate("mallory"))
    _, e = apply(s, subject, body, trust=trust, headers=headers)
    assert "unknown signing key" in only(e, ev.ControlRejected).data.reason
    node = SigningKey.generate("node")
    trust.trust(node.public_b64, "node", ["node"])
    subject, body, headers = control.encode(control.ReleaseEmergency(), node)
    _, e = apply(s, subject, body, trust=trust, headers=headers)
    assert "lacks the 'operator' role" in only(e, ev.ControlRejected).data.reason
    subject, body, headers = control.encode(control.ReleaseEmergency(reason="clear"), key)
    s2, e = apply(s, subject, body, trust=trust, headers=headers)
    assert not s2.emergency and only(e, ev.EmergencyReleased).data.by == "op"  # the signer, not the claimed `by`


def test_gears_never_lift_the_emergency_stop():
    s = ControlState(emergency=True)
    for level in ("ACCELERATED", "HYPER"):
        s, _ = apply(s, "control.shift_gear", f'{{"level": "{level}"}}'.encode())
        assert s.emergency
    s, _ = apply(s, "control.shift_gear", b'{"level": "SINGULARITY"}', sandbox=True)
    assert s.emergency and s.gear == "SINGULARITY"


def held(sid="train-x-000001", final=False, decision="HOLD", gate="gear", by="safety", causation=None):
    return {sid: SubjectRuling(sid, "intent", decision, final, gate, by, "train", "grid:case14", causation)}


def test_approve_and_reject_a_held_intent():
    _, e = apply(ControlState(), "control.approve", b'{"subject_id": "train-x-000001", "by": "alice"}', holds=held())
    v = only(e, ev.VerdictIssued).data
    assert (v.decision, v.gate, v.final, v.kind, v.domain, v.subject_type) == ("APPROVE", "human", True, "train", "grid:case14", "intent")
    assert e[0].subject() == "verdict.intent.approve"
    _, e = apply(ControlState(), "control.reject", b'{"subject_id": "train-x-000001", "reason": "not now"}', holds=held())
    v = only(e, ev.VerdictIssued).data
    assert v.decision == "REJECT" and "not now" in v.reasons[0] and e[0].subject() == "verdict.intent.reject"


def test_approve_refuses_decided_subjects_but_is_idempotent_for_itself():
    decided = held(final=True, decision="REJECT", gate="regulator")
    _, e = apply(ControlState(), "control.approve", b'{"subject_id": "train-x-000001"}', holds=decided)
    assert "already decided: REJECT by safety (gate regulator)" in only(e, ev.ControlRejected).data.reason
    mine = held(final=True, decision="APPROVE", gate="human", by="alice", causation="CONTROL:7")
    state, e = apply(ControlState(), "control.approve", b'{"subject_id": "train-x-000001"}', holds=mine)
    assert e == [] and state.applied_seq == 7


# --------------------------------------------------------------------------- orient


def test_orient_emits_one_intent_per_domain_over_threshold():
    counts = {"grid:case14": DomainCount(domain="grid:case14", total=250, last_seq=900), "hvac:office3": DomainCount(domain="hvac:office3", total=10)}
    intents = orient(counts, {}, "HYPER", {}, source="d", now=NOW)
    assert len(intents) == 1
    i = intents[0].data
    assert i.intent_id == train_intent_id("grid:case14", 1) == "train-grid_case14-000001"
    assert i.kind == "train" and i.gear == "HYPER"
    assert i.params["hypotheses"] == 16 and i.params["fossils"] == 250 and i.params["fossil_seq"] == 900 and i.params["threshold"] == 200
    assert intents[0].subject() == "intent.created.train.train-grid_case14-000001"
    # same inputs, same event id: a second daemon or a restart publishes the same event
    assert orient(counts, {}, "HYPER", {}, source="d", now=NOW)[0].id == intents[0].id
    assert set(i.params) == set(TRAIN_INTENT_PARAMS)
    mark = mark_of(i)
    assert mark == TrainMark(generation=1, fossils=250, intent_id=i.intent_id, fossil_seq=900)
    assert orient(counts, {"grid:case14": mark}, "HYPER", {}, source="d") == []
    counts["grid:case14"].total = 450
    nxt = orient(counts, {"grid:case14": mark}, "HYPER", {}, source="d")
    assert [n.data.intent_id for n in nxt] == ["train-grid_case14-000002"] and nxt[0].data.params["new_fossils"] == 200


def test_orient_carries_the_configured_model_config_and_dispatch_keeps_only_that():
    from scf.consumers.dispatch import job_config

    counts = {"d": DomainCount(domain="d", total=600)}
    [intent] = orient(counts, {}, "HYPER", {}, source="x", train_config={"steps": 300, "hidden": 64})
    assert intent.data.params["steps"] == 300 and intent.data.params["generation"] == 1
    assert job_config(intent.data.params)[0] == {"hidden": 64, "steps": 300}


def test_orient_threshold_depends_on_gear_and_overrides():
    counts = {"d": DomainCount(domain="d", total=600)}
    assert orient(counts, {}, "STANDARD", {}, source="x") == []
    assert len(orient(counts, {}, "ACCELERATED", {}, source="x")) == 1
    assert len(orient(counts, {}, "STANDARD", {"STANDARD": 5}, source="x")) == 1


# --------------------------------------------------------------------------- control file


def test_control_file_commands_map_to_subjects():
    out = parse(b'{"command": "SHIFT_GEAR", "payload": {"level": "ACCELERATED"}}')
    assert [(o.subject, msgspec.json.decode(o.body)) for o in out] == [("control.shift_gear", {"level": "ACCELERATED"})]
    assert [o.subject for o in parse(b'{"command": "STOP"}')] == ["control.stop"]
    assert [o.subject for o in parse(b'[{"command": "emergency-stop"}, {"command": "RESUME"}]')] == ["control.emergency_stop", "control.resume"]
    assert parse(b"  \n") == []
    for bad in (b"{nope", b'{"payload": {}}', b'{"command": "a.b"}', b'{"command": "STOP", "extra": 1}'):
        with pytest.raises(ControlFileError):
            parse(bad)


# --------------------------------------------------------------------------- promotion decision


def produced(cid="ck-2"):
    info = ev.CheckpointInfo(checkpoint_id=cid, job_id="j", domain="grid:case14", uri="obj://scf_artifacts/x", sha256="ab", size=3)
    return ev.CheckpointProduced.new(info, source="worker")


def prod(version=3, cid="ck-1"):
    return ev.Promotion(checkpoint_id=cid, domain="grid:case14", alias="production", version=version, uri="u", sha256="cd")


def test_promotion_beats_production_by_margin():
    cfg = VerifySettings(margin=0.05)
    good = Verification("ck-2", True, [], {"heldout_dsm": 0.90, "violation_rate": 0.01}, "ck-1", {"heldout_dsm": 1.0, "violation_rate": 0.02})
    event = produced()
    out = decide_promotion(event, prod(), good, cfg, source="d")
    assert [type(e) for e in out] == [ev.CheckpointVerified, ev.CheckpointPromoted]
    p = out[1].data
    assert (p.version, p.previous_checkpoint_id, p.alias) == (4, "ck-1", "production")
    assert out[0].data.baseline_metrics["heldout_dsm"] == 1.0
    assert decide_promotion(event, prod(), good, cfg, source="d")[1].id == out[1].id  # redelivery-safe


def test_promotion_rejections_carry_every_reason():
    cfg = VerifySettings(margin=0.05)
    close = Verification("ck-2", True, [], {"heldout_dsm": 0.97, "violation_rate": 0.5}, "ck-1", {"heldout_dsm": 1.0, "violation_rate": 0.02})
    out = decide_promotion(produced(), prod(), close, cfg, source="d")
    r = only(out, ev.CheckpointRejected).data.reasons
    assert any("does not beat production's 1 by the margin 5.0%" in x for x in r) and any("violation_rate 0.5" in x for x in r)
    broken = Verification("ck-2", False, ["digest mismatch: artifact has sha256 00, the event says ab"])
    assert only(decide_promotion(produced(), prod(), broken, cfg, source="d"), ev.CheckpointRejected).data.reasons == broken.reasons
    assert compare({"heldout_dsm": float("nan")}, None, cfg)


def test_first_checkpoint_is_promoted_as_version_one():
    v = Verification("ck-1", True, [], {"heldout_dsm": 2.0})
    out = decide_promotion(produced("ck-1"), None, v, VerifySettings(), source="d")
    assert out[1].data.version == 1 and out[1].data.previous_checkpoint_id is None
