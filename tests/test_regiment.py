"""`scf run regiment` as a real process: it strikes a due contract at the gear's heartbeat,
reports its progress in `scf_state/regiment` (what `scf status --watch` shows), pauses on
the emergency stop and resumes when it is released; the pure `regiment_line`."""

from __future__ import annotations

import msgspec
import pytest

from scf.bus.client import Bus
from scf.bus.emergency import EmergencyState, write_state
from scf.ops.status_view import regiment_line, snapshot
from scf.producers import contracts
from tests.conftest import stream_count, wait_for
from tests.test_deploy_helpers import Keys, logs, start_process, stop

pytestmark = pytest.mark.anyio
ACME = {"contract_id": "acme", "client": "ACME", "domain": "hvac:office3", "nodes": ["edge-a"],
        "constraints": {"T_out": 9.0, "preheat_hours": 3}, "schedule_s": 0}


async def progress(bus) -> dict:
    kv = await bus.kv("scf_state")
    try:
        entry = await kv.get("regiment")
    except Exception:  # noqa: BLE001 - not written yet
        return {}
    return msgspec.json.decode(entry.value) if entry and entry.value else {}


async def test_regiment_process_strikes_reports_and_obeys_the_emergency_stop(bus, settings, scf_env, tmp_path):
    keys = Keys(settings)
    keys.release.save(settings.keys_dir)  # as release.key: the regiment signs capsules and proofs with it
    with open(settings.home_path / "scf.toml", "a") as fh:
        fh.write('\n[regiment]\nmeasure = "none"\nwait_s = 5.0\nheartbeat_s = 0.5\n')
    op = await Bus.connect(settings, "operator", key=keys.operator)  # the regiment strikes operator-signed contracts only
    try:
        await contracts.add(op, contracts.parse_doc(ACME))
    finally:
        await op.close()
    await contracts.add(bus, contracts.parse_doc(dict(ACME, contract_id="forged")))  # unsigned: never struck
    logd = tmp_path / "logs"
    logd.mkdir()
    await write_state(bus, EmergencyState(engaged=True, reason="drill", by="test"))
    procs = [start_process(scf_env, "safety", logd), start_process(scf_env, "regiment", logd)]
    try:
        await wait_for(lambda: _paused(bus), 40, "the regiment to report the emergency stop")
        assert await stream_count(bus, "INTENTS") == 0  # nothing proposed while the stop is engaged
        assert regiment_line(msgspec.json.encode(await progress(bus)).decode()).startswith("paused: ")
        await write_state(bus, EmergencyState(engaged=False, by="test"))
        await wait_for(lambda: _statuses(bus, {"awaiting-approval": 1}), 60, "a strike held for a human")
        assert await stream_count(bus, "INTENTS", "state.proposed.>") == 24
        assert await stream_count(bus, "INTENTS", "intent.created.deploy.>") == 1
        snap = await snapshot(bus)
        assert "awaiting-approval 1" in snap.regiment and "of 1 contracts" in snap.regiment  # the unsigned one is not counted
    except BaseException:
        print(logs(logd))
        raise
    finally:
        for p in procs:
            stop(p)


async def _paused(bus) -> bool:
    return bool((await progress(bus)).get("paused"))


async def _statuses(bus, want: dict) -> bool:
    return (await progress(bus)).get("statuses") == want


def test_regiment_line():
    assert regiment_line(None) == "not running"
    assert regiment_line("{") == "unreadable progress record"
    line = regiment_line('{"pass_no": 3, "finished_at": "x", "done": 2, "due": 2, "contracts": 5, "statuses": {"measured": 2}}')
    assert line == "pass 3 done: 2/2 due of 5 contracts (measured 2)"


async def test_the_demo_step_ends_with_a_strike_and_its_proof(bus, settings, scf_env, tmp_path):
    """ops/demo_strike.py at HYPER (the demo's gear): no human in the loop, the gate still rules."""
    from scf.bus.gears import GearState, write_gear
    from scf.ops.demo_strike import strike_step
    from tests.test_deploy_helpers import start_edge

    keys = Keys(settings)
    keys.release.save(settings.keys_dir)
    keys.node("site-a")
    await write_gear(bus, GearState(gear="HYPER"))
    logd = tmp_path / "logs"
    logd.mkdir()
    procs = [start_process(scf_env, "safety", logd), start_process(scf_env, "deploy", logd),
             start_edge(scf_env, "site-a", tmp_path / "site-a", logd, {"domain": "hvac:office3"})]
    lines: list[str] = []
    try:
        path = await strike_step(bus, settings, lines.append, "site-a", wait_s=60.0)
        assert path.is_file() and lines[0].startswith("   contract demo-client registered")
        assert lines[-1].startswith(f"   proof {path}: signed by a release key,") and "match the log" in lines[-1]
        assert ": measured (capsule capsule-demo-client-" in lines[1]
    except BaseException:
        print(logs(logd))
        raise
    finally:
        for p in procs:
            stop(p)
