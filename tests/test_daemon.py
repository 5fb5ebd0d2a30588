"""The daemon against a real nats-server: control verbs, rejections, orient, restarts,
approvals with the safety gate, and the processes as a user runs them."""

from __future__ import annotations

import json
import signal
import sys

import msgspec
import pytest

from scf.bus import gears
from scf.bus.emergency import read_state
from scf.bus.streams import KEY_DAEMON
from scf.producers.daemon import DaemonSettings, Liveness
from tests.conftest import spawn, stream_count, wait_for
from tests.daemon_support import (
    add_fossils,
    events,
    operator_key,
    running_daemon,
    running_safety,
    send,
    wait_events,
)

pytestmark = pytest.mark.anyio

FAST = DaemonSettings(train_threshold={"STANDARD": 5, "ACCELERATED": 5, "HYPER": 5, "SINGULARITY": 5}, verify_checkpoints="off")


async def test_each_control_verb_emits_its_event(bus, settings):
    key = operator_key(settings)
    async with running_daemon(settings, FAST):
        await send(settings, "shift_gear", {"level": "ACCELERATED", "by": "alice", "reason": "bulk run"})
        [g] = await wait_events(bus, "CONTROL", "gear.changed", 1)
        assert (g.data.from_gear, g.data.to_gear, g.data.by, g.data.reason) == ("STANDARD", "ACCELERATED", "alice", "bulk run")
        await wait_for(lambda: _gear(bus, "ACCELERATED"), 10, "scf_state/gear = ACCELERATED")

        await send(settings, "stop", {"reason": "maintenance"})
        [s] = await wait_events(bus, "CONTROL", "gear.daemon.stopped", 1)
        assert s.data.reason == "maintenance"
        await send(settings, "resume")
        await wait_events(bus, "CONTROL", "gear.daemon.resumed", 1)

        await send(settings, "emergency_stop", {"reason": "storm"})
        [e] = await wait_events(bus, "CONTROL", "emergency.engaged", 1)
        assert e.data.reason == "storm" and e.data.origin == "control"
        await wait_for(lambda: _emergency(bus, True), 10, "the KV mirror to say engaged")
        assert (await read_state(bus)).event_id == e.id

        await send(settings, "release_emergency", {"reason": "clear"}, key=key)
        [r] = await wait_events(bus, "CONTROL", "emergency.released", 1)
        assert r.data.by == "alice"
        await wait_for(lambda: _emergency(bus, False), 10, "the KV mirror to say released")
        assert await events(bus, "CONTROL", "control.rejected") == []


async def test_bad_commands_become_control_rejected(bus, settings):
    cases = [
        ("warp_drive", b"{}", "unknown control verb 'warp_drive'"),
        ("shift_gear", b"{this is not json", "malformed JSON in control.shift_gear"),
        ("shift_gear", b'{"level": "PLAID"}', "unknown gear 'PLAID'"),
        ("shift_gear", b'{"level": "SINGULARITY"}', "SINGULARITY is refused: this deployment is not a sandbox"),
        ("shift_gear", b'{"level": "STANDARD"}', "already in gear STANDARD"),
        ("emergency_stop", b'{"reason": "test"}', None),  # engages: the release below needs a signature
        ("release_emergency", b'{"reason": "unsigned"}', "missing signature"),
        ("approve", b'{"subject_id": "nothing-like-this"}', "nothing is held with id 'nothing-like-this'"),
        ("resume", b"{}", "the daemon is not stopped"),
    ]
    async with running_daemon(settings, FAST):
        for verb, body, _ in cases:
            await send(settings, verb, body)
        want = [reason for _, _, reason in cases if reason]
        rejected = await wait_events(bus, "CONTROL", "control.rejected", len(want))
    assert [r.data.command_subject for r in rejected] == [f"control.{v}" for v, _, reason in cases if reason]
    for r, reason in zip(rejected, want):
        assert reason in r.data.reason, (reason, r.data.reason)
    assert rejected[1].data.body == "{this is not json"
    assert (await read_state(bus)).engaged  # the unsigned release changed nothing


async def test_singularity_in_a_sandbox_deployment(bus, settings):
    sandbox = msgspec.structs.replace(settings, sandbox=True)
    async with running_daemon(sandbox, FAST):
        await send(settings, "shift_gear", {"level": "SINGULARITY"})
        [g] = await wait_events(bus, "CONTROL", "gear.changed", 1)
        assert g.data.to_gear == "SINGULARITY"


async def test_orient_emits_one_intent_and_a_restart_duplicates_nothing(bus, settings):
    await send(settings, "shift_gear", {"level": "HYPER"})  # applied when the daemon starts
    await add_fossils(bus, "grid:case14", 0, 7)
    await add_fossils(bus, "hvac:office3", 0, 3)
    async with running_daemon(settings, FAST) as daemon:
        [i] = await wait_events(bus, "INTENTS", "intent.created.train.>", 1)
        assert i.data.intent_id == "train-grid_case14-000001" and i.data.domain == "grid:case14"
        assert i.data.params["fossils"] == 7 and i.data.params["hypotheses"] == 16 and i.data.gear == "HYPER"
        pulses = daemon.pulses
        await wait_for(lambda: daemon.pulses >= pulses + 5, 10, "five more pulses")
        live = msgspec.json.decode((await (await bus.kv("scf_state")).get(KEY_DAEMON)).value, type=Liveness)
        assert live.gear == "HYPER" and live.pending == {"grid:case14": 0, "hvac:office3": 3} and live.ready
    assert len(await events(bus, "INTENTS", "intent.created.>")) == 1

    # restart: same gear, no duplicate; new fossils past the threshold give generation 2
    async with running_daemon(settings, FAST) as daemon:
        assert daemon.state.gear == "HYPER"
        await wait_for(lambda: daemon.ready and daemon.pulses >= 5, 10, "the restarted daemon to pulse")
        assert len(await events(bus, "INTENTS", "intent.created.>")) == 1
        await add_fossils(bus, "grid:case14", 100, 5)
        intents = await wait_events(bus, "INTENTS", "intent.created.>", 2)
        assert intents[1].data.intent_id == "train-grid_case14-000002" and intents[1].data.params["new_fossils"] == 5

    # a second restart after a stop: the stop is remembered, no intent while stopped
    await send(settings, "stop")
    async with running_daemon(settings, FAST) as daemon:
        await wait_for(lambda: daemon.state.stopped, 10, "the stop to be applied")
    async with running_daemon(settings, FAST) as daemon:
        assert daemon.state.stopped and daemon.state.gear == "HYPER"
        await add_fossils(bus, "grid:case14", 200, 6)
        await wait_for(lambda: daemon.pulses >= 10, 10, "ten pulses")
        assert len(await events(bus, "INTENTS", "intent.created.>")) == 2
        await send(settings, "resume")
        await wait_events(bus, "INTENTS", "intent.created.>", 3)
    gear_changes = await events(bus, "CONTROL", "gear.changed")
    assert len(gear_changes) == 1


async def test_standard_holds_training_until_a_human_approves(bus, settings):
    await add_fossils(bus, "grid:case14", 0, 5)
    async with running_safety(settings), running_daemon(settings, FAST):
        [hold] = await wait_events(bus, "VERDICTS", "verdict.intent.hold", 1)
        v = hold.data
        assert (v.subject_id, v.gate, v.final, v.kind) == ("train-grid_case14-000001", "gear", False, "train")
        assert await events(bus, "VERDICTS", "verdict.intent.approve") == []

        await send(settings, "approve", {"subject_id": v.subject_id, "by": "alice", "reason": "looks fine"})
        [ok] = await wait_events(bus, "VERDICTS", "verdict.intent.approve", 1)
        assert (ok.data.decision, ok.data.gate, ok.data.final, ok.data.kind, ok.data.domain) == ("APPROVE", "human", True, "train", "grid:case14")
        assert ok.data.subject_id == v.subject_id and "looks fine" in ok.data.reasons[0]

        await send(settings, "reject", {"subject_id": v.subject_id})  # already decided: refused
        [r] = await wait_events(bus, "CONTROL", "control.rejected", 1)
        assert "already decided: APPROVE by alice (gate human)" in r.data.reason


async def test_hyper_approves_training_without_a_human(bus, settings):
    async with running_safety(settings) as gate, running_daemon(settings, FAST):
        await send(settings, "shift_gear", {"level": "HYPER"})
        await wait_for(lambda: gate.view.gear == "HYPER", 10, "the gate to see HYPER")
        await add_fossils(bus, "grid:case14", 0, 5)
        [ok] = await wait_events(bus, "VERDICTS", "verdict.intent.approve", 1)
        assert (ok.data.decision, ok.data.gate, ok.data.final, ok.data.kind) == ("APPROVE", "regulator", True, "train")
        assert await events(bus, "VERDICTS", "verdict.intent.hold") == []


async def test_processes_and_the_control_file(bus, settings, scf_env, tmp_path):
    """`scf run daemon` and `scf control watch-file` as real processes."""
    control_file = tmp_path / "data" / "scf" / "control.json"
    control_file.parent.mkdir(parents=True)
    daemon = spawn([sys.executable, "-m", "scf.cli.main", "run", "daemon"], scf_env, tmp_path / "daemon.log")
    watcher = spawn([sys.executable, "-m", "scf.cli.main", "control", "watch-file", str(control_file), "--poll", "0.1"], scf_env, tmp_path / "watch.log")
    try:
        control_file.write_text(json.dumps({"command": "SHIFT_GEAR", "payload": {"level": "ACCELERATED"}}))
        [g] = await wait_events(bus, "CONTROL", "gear.changed", 1, timeout=40)
        assert g.data.to_gear == "ACCELERATED"
        control_file.write_text(json.dumps({"command": "STOP"}))
        await wait_events(bus, "CONTROL", "gear.daemon.stopped", 1, timeout=30)
        control_file.write_text(json.dumps({"command": "WARP"}))
        [r] = await wait_events(bus, "CONTROL", "control.rejected", 1, timeout=30)
        assert "unknown control verb 'warp'" in r.data.reason
    finally:
        for p in (watcher, daemon):
            p.send_signal(signal.SIGTERM)
        try:
            # awaited, not p.wait(): the test's loop keeps running; the bound is generous (a
            # loaded machine), the processes' own is 27 s (docs/architecture.md, stopping a process)
            await wait_for(lambda: watcher.poll() is not None and daemon.poll() is not None, 90, "both to exit after SIGTERM")
        finally:
            for p in (watcher, daemon):
                if p.poll() is None:
                    p.kill()  # not left behind for the rest of the run, reconnecting to a stopped server
                    p.wait()
    for p, name in ((watcher, "watch"), (daemon, "daemon")):
        assert p.returncode == 0, f"{name}: {p.returncode}\n" + (tmp_path / f"{name}.log").read_text()[-2000:]
    # a restarted watcher does not resend the file it already sent
    before = await stream_count(bus, "CONTROL", "control.>")
    watcher = spawn([sys.executable, "-m", "scf.cli.main", "control", "watch-file", str(control_file), "--once"], scf_env, tmp_path / "watch2.log")
    assert watcher.wait(30) == 0
    assert "sent 0 command(s)" in (tmp_path / "watch2.log").read_text()
    assert await stream_count(bus, "CONTROL", "control.>") == before


async def _gear(bus, want: str) -> bool:
    return (await gears.read_gear(bus)).gear == want


async def _emergency(bus, engaged: bool) -> bool:
    return (await read_state(bus)).engaged == engaged


async def test_liveness_is_a_kv_entry_not_events(bus, settings):
    async with running_daemon(settings, FAST) as daemon:
        await wait_for(lambda: daemon.pulses >= 1, 10, "a pulse")
        entry = await (await bus.kv("scf_state")).get(KEY_DAEMON)
        live = msgspec.json.decode(entry.value, type=Liveness)
        assert live.gear == "STANDARD" and live.heartbeat_s == 5.0 and not live.stopped
    info = await bus.js.stream_info("CONTROL")
    assert info.state.messages == 0  # no heartbeat events


async def test_rebuild_knows_the_last_applied_command(bus, settings):
    from scf.producers.daemon import rebuild_control

    async with running_daemon(settings, FAST) as daemon:
        await send(settings, "stop")
        seq = await send(settings, "shift_gear", {"level": "HYPER"})
        await wait_events(bus, "CONTROL", "gear.changed", 1)
        await wait_for(lambda: daemon.state.applied_seq == seq, 10, "the shift to be applied")
    state = await rebuild_control(bus)
    assert (state.gear, state.stopped, state.applied_seq) == ("HYPER", True, seq)
    # a redelivery of an applied command (a crash between publish and ack) is not applied twice
    async with running_daemon(settings, FAST) as daemon:
        class Redelivered:
            subject, stream_seq, headers = "control.shift_gear", seq, {}

        class Msg:
            data = b'{"level": "HYPER"}'

        await daemon.on_control(Msg(), Redelivered())
        assert await events(bus, "CONTROL", "control.rejected") == []
