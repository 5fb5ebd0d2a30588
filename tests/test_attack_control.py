"""Attacks on the control plane (issue 10, defects 1, 2 and 3), run as the tester ran them:
a real nats-server with the production users of nats/users.conf, a real `scf run daemon`
process (SIGKILLed and restarted), and the attacker as the `operator` login.

* a captured signed `control.release_emergency`, republished as is, must not release the
  emergency stop again, neither before nor after a daemon restart;
* a command the daemon cannot apply must end as `control.rejected`, and a command that a
  crashed daemon left undecided must not be skipped because a later one was applied;
* junk published with `Nats-Msg-Id` set to the ids of future effects must not pre-empt the
  real `emergency.engaged` (whether the ids were guessed or the id key leaked).
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shutil
import signal
import subprocess
import sys
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nats
import pytest

from scf.bus import control
from scf.bus import events as ev
from scf.bus.client import MSG_ID, Bus
from scf.bus.emergency import read_state
from scf.bus.ids import derived_id, keyed_id, load_id_key
from scf.bus.settings import Settings, init_home
from scf.bus.streams import KEY_DAEMON, ensure
from tests.conftest import spawn, wait_for
from tests.daemon_support import events, operator_key
from tests.test_nats_configs import (
    NATS_DIR,
    USERS,
    WORKER_PASSWORD,
    Server,
    base_env,
    connect,
    free_port,
    start_server,
    users_env,
    violation,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]


# --------------------------------------------------------------------------- the deployment


@dataclass
class Deployment:
    """nats-server with users.conf (no TLS), SCF_HOME for the service host, the daemon process."""

    server: Server
    passwords: dict[str, str]
    home: Path
    logs: Path
    daemon: subprocess.Popen | None = None
    starts: int = 0
    cleanup: list = field(default_factory=list)

    def url(self, user: str) -> str:
        return self.server.url(user, self.passwords[user])

    @property
    def settings(self) -> Settings:
        return Settings(home=str(self.home), nats_url=self.url("service"), source="test")

    def env(self) -> dict[str, str]:
        return {**base_env(), "NATS_URL": self.url("service"), "SCF_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}

    @property
    def daemon_log(self) -> Path:
        return self.logs / "daemon.log"

    async def start_daemon(self, bus: Bus) -> None:
        self.starts += 1
        self.daemon = spawn([sys.executable, "-m", "scf.cli.main", "run", "daemon"], self.env(), self.daemon_log)
        pid = self.daemon.pid

        async def live() -> bool:
            assert self.daemon is not None and self.daemon.poll() is None, f"the daemon exited: {self.daemon_log.read_text()[-2000:]}"
            with suppress(Exception):
                entry = await (await bus.kv("scf_state")).get(KEY_DAEMON)
                return msgspec.json.decode(entry.value).get("pid") == pid
            return False

        await wait_for(live, 60, "the daemon's liveness entry")

    def kill_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGKILL)
            self.daemon.wait(10)

    async def restart_daemon(self, bus: Bus) -> None:
        self.kill_daemon()
        await self.start_daemon(bus)


def make_deployment(tmp_path: Path, extra_conf: str = "") -> Deployment:
    workdir = tmp_path / "nats"
    workdir.mkdir()
    shutil.copy(NATS_DIR / "users.conf", workdir / "users.conf")
    port = free_port()
    (workdir / "server.conf").write_text(
        f'listen: 127.0.0.1:{port}\njetstream {{ store_dir: "{workdir / "store"}" }}\n{extra_conf}\ninclude users.conf\n'
    )
    passwords = {user: "p" + secrets.token_hex(12) for user in USERS}
    passwords["worker"] = WORKER_PASSWORD
    server = start_server("prod-users", ["-c", str(workdir / "server.conf")], {**base_env(), **users_env(passwords)}, workdir, port)
    home = tmp_path / "home"
    d = Deployment(server, passwords, home, tmp_path)
    init_home(d.settings)
    (home / "scf.toml").write_text('[daemon]\nverify_checkpoints = "off"\n')
    return d


@pytest.fixture
def deployment(tmp_path: Path, request):
    d = make_deployment(tmp_path, getattr(request, "param", ""))
    try:
        yield d
    finally:
        d.kill_daemon()
        d.server.stop()


@pytest.fixture
async def service(deployment: Deployment):
    bus = await Bus.connect(deployment.settings, "test-service")
    await ensure(bus.js)
    yield bus
    await bus.close()


@pytest.fixture
async def operator(deployment: Deployment):
    """The attacker: a plain nats-py client logged in as the production `operator` user."""
    nc = await nats.connect(deployment.url("operator"), name="operator", inbox_prefix="_INBOX.operator")
    yield nc
    await nc.close()


async def send(nc, subject: str, body: bytes, headers: dict[str, str] | None = None) -> int:
    ack = await nc.jetstream().publish(subject, body, headers=headers or None)
    assert ack.stream == "CONTROL"
    return ack.seq


async def decision(bus: Bus, seq: int, timeout: float = 30.0) -> ev.Event:
    """The event that records what the daemon did with command `seq` (an effect or control.rejected)."""
    found: list[ev.Event] = []

    async def decided() -> bool:
        effects = [e for subject in ("gear.>", "emergency.>", "control.rejected") for e in await events(bus, "CONTROL", subject)]
        found[:] = [e for e in effects if e.causation_id == f"CONTROL:{seq}"]
        return bool(found)

    await wait_for(decided, timeout, f"the daemon's decision on CONTROL seq {seq}")
    assert len(found) == 1, f"one decision per command, got {[e.type_name() for e in found]}"
    return found[0]


async def rejected(bus: Bus, seq: int) -> str:
    e = await decision(bus, seq)
    assert isinstance(e, ev.ControlRejected), f"CONTROL seq {seq} was applied as {e.type_name()}, not rejected"
    assert e.data.command_seq == seq
    return e.data.reason


async def engaged(bus: Bus, want: bool) -> None:
    await wait_for(lambda: _engaged(bus, want), 30, f"scf_state/emergency engaged={want}")


async def _engaged(bus: Bus, want: bool) -> bool:
    return (await read_state(bus)).engaged == want


# --------------------------------------------------------------------------- 1: replay


async def test_a_replayed_signed_release_is_refused_before_and_after_a_restart(deployment, service, operator):
    key = operator_key(deployment.settings)
    await deployment.start_daemon(service)

    await send(operator, "control.emergency_stop", b'{"reason": "storm"}')
    await engaged(service, True)
    subject, body, headers = control.encode(control.ReleaseEmergency(reason="clear", by="alice"), key)
    captured = (subject, body, dict(headers))
    assert b'"nonce"' in body and b'"issued_at"' in body  # filled by encode because it signs
    first = await send(operator, *captured)
    assert isinstance(await decision(service, first), ev.EmergencyReleased)
    await engaged(service, False)
    await send(operator, "control.emergency_stop", b'{"reason": "storm again"}')
    await engaged(service, True)

    # the attack: the captured release, republished byte for byte by an operator login
    replay = await send(operator, *captured)
    assert "replayed" in await rejected(service, replay)
    assert (await read_state(service)).engaged

    # the seen set is rebuilt from the log: a restarted daemon refuses it too
    await deployment.restart_daemon(service)
    replay = await send(operator, *captured)
    assert "replayed" in await rejected(service, replay)
    assert (await read_state(service)).engaged

    # outside the window (an old capture), ahead of the server's clock, or without a nonce
    now = ev.utcnow()
    old = control.encode(control.ReleaseEmergency(reason="old", issued_at=now - dt.timedelta(minutes=10)), key)
    assert "older than the 300 s window" in await rejected(service, await send(operator, *old))
    ahead = control.encode(control.ReleaseEmergency(reason="ahead", issued_at=now + dt.timedelta(minutes=10)), key)
    assert "clock skew" in await rejected(service, await send(operator, *ahead))
    bare = b'{"reason": "no nonce"}'
    reason = await rejected(service, await send(operator, subject, bare, control.signature_headers(subject, bare, key)))
    assert "has no nonce" in reason
    assert (await read_state(service)).engaged
    assert len(await events(service, "CONTROL", "emergency.released")) == 1

    # a fresh signed release still works
    fresh = await send(operator, *control.encode(control.ReleaseEmergency(reason="really clear"), key))
    assert isinstance(await decision(service, fresh), ev.EmergencyReleased)
    await engaged(service, False)


# --------------------------------------------------------------------------- 2: never skipped


async def test_a_command_near_max_payload_is_rejected_and_the_next_one_applied(deployment, service, operator):
    await deployment.start_daemon(service)
    huge = msgspec.json.encode({"reason": "x" * 1_000_000})
    big = await send(operator, "control.emergency_stop", huge)
    shift = await send(operator, "control.shift_gear", b'{"level": "ACCELERATED"}')
    reason = await rejected(service, big)
    assert f"body is {len(huge)} bytes" in reason
    [r] = [e for e in await events(service, "CONTROL", "control.rejected") if e.data.command_seq == big]
    assert len(r.data.body.encode()) <= control.MAX_COMMAND_BYTES
    assert isinstance(await decision(service, shift), ev.GearChanged)
    assert not (await read_state(service)).engaged
    assert deployment.daemon is not None and deployment.daemon.poll() is None  # still running


@pytest.mark.parametrize("deployment", ["max_payload: 15200"], indirect=True)
async def test_a_command_whose_effect_cannot_be_published_ends_as_control_rejected_in_order(deployment, service, operator):
    """The tester's mechanism on a server with a small max_payload: the body fits, its
    effect does not. It used to be nak'ed, overtaken by the next command and then skipped
    as 'applied before'; now it is retried in place and rejected with the error, and the
    next command is applied after it."""
    await deployment.start_daemon(service)
    body = msgspec.json.encode({"reason": "x" * 15_000})
    stop = await send(operator, "control.emergency_stop", body)
    shift = await send(operator, "control.shift_gear", b'{"level": "ACCELERATED"}')
    reason = await rejected(service, stop)
    assert reason.startswith("could not be applied after 5 attempts") and "payload" in reason.lower()
    change = await decision(service, shift)
    assert isinstance(change, ev.GearChanged)
    [r] = [e for e in await events(service, "CONTROL", "control.rejected") if e.data.command_seq == stop]
    assert r.causation_id == f"CONTROL:{stop}"
    assert await _seq_of(service, r) < await _seq_of(service, change)  # decided in order
    assert deployment.daemon is not None and deployment.daemon.poll() is None


async def _seq_of(bus: Bus, e: ev.Event) -> int:
    found = await bus.last(e.subject())
    assert found is not None
    return found[0]


async def test_a_command_left_undecided_by_a_crash_is_applied_after_a_later_one(deployment, service, operator):
    """The log a crashed daemon leaves: command A (emergency stop) undecided, the later
    command B applied (its effect is stored, its ack was lost). A new daemon must apply A,
    not skip it as 'applied before' because B's sequence is higher."""
    a = await send(operator, "control.emergency_stop", b'{"reason": "storm"}')
    b = await send(operator, "control.shift_gear", b'{"level": "ACCELERATED"}')
    ref = f"CONTROL:{b}"
    change = ev.GearChanged(
        id=keyed_id(load_id_key(deployment.settings.keys_dir), ref, "gear.changed", ""), at=ev.utcnow(), source="daemon@crashed",
        correlation_id=ref, causation_id=ref, data=ev.GearChange(from_gear="STANDARD", to_gear="ACCELERATED", by="anonymous"),
    )
    await service.publish(change)

    await deployment.start_daemon(service)
    assert isinstance(await decision(service, a), ev.EmergencyEngaged)
    await engaged(service, True)
    assert len(await events(service, "CONTROL", "gear.changed")) == 1  # B not applied twice
    assert await events(service, "CONTROL", "control.rejected") == []  # nor rejected as "already in gear"


# --------------------------------------------------------------------------- 3: pre-empted effect ids


async def _preempt(operator, service: Bus, n: int, effect_id) -> int:
    """Publish `n` junk messages on a control subject the daemon does not apply, each with
    Nats-Msg-Id set to the id the emergency.engaged of a future command would get; returns
    the sequence the next command will have."""
    start = (await service.js.stream_info("CONTROL")).state.last_seq
    first_target = start + n + 1
    for i in range(n):
        await send(operator, "control.rollback", b"junk", {MSG_ID: effect_id(f"CONTROL:{first_target + i}")})
    return first_target


async def test_guessed_effect_ids_cannot_pre_empt_the_emergency_stop(deployment, service, operator):
    await deployment.start_daemon(service)
    # the public scheme of the tester's attack: UUIDv5 over SCF's namespace and CONTROL:<seq>
    target = await _preempt(operator, service, 10, lambda ref: derived_id(ref, "emergency.engaged", ""))
    seq = await send(operator, "control.emergency_stop", b'{"reason": "storm"}')
    assert seq == target
    stop = await decision(service, seq)
    assert isinstance(stop, ev.EmergencyEngaged)
    assert stop.id != derived_id(f"CONTROL:{seq}", "emergency.engaged", "")
    await engaged(service, True)
    await deployment.restart_daemon(service)
    assert (await read_state(service)).engaged and (await read_state(service)).event_id == stop.id


async def test_a_leaked_id_key_still_cannot_pre_empt_the_emergency_stop(deployment, service, operator):
    """Even with the id key (a leak), a `duplicate` ack is not taken on trust: the daemon
    sees that the stream holds junk under that id and publishes the effect under a fresh one."""
    await deployment.start_daemon(service)
    leaked = load_id_key(deployment.settings.keys_dir)
    target = await _preempt(operator, service, 5, lambda ref: keyed_id(leaked, ref, "emergency.engaged", ""))
    seq = await send(operator, "control.emergency_stop", b'{"reason": "storm"}')
    assert seq == target
    stop = await decision(service, seq)
    assert isinstance(stop, ev.EmergencyEngaged)
    assert stop.id != keyed_id(leaked, f"CONTROL:{seq}", "emergency.engaged", "")  # re-issued under a fresh id
    await engaged(service, True)
    assert (await read_state(service)).event_id == stop.id
    assert "published again as" in deployment.daemon_log.read_text()
    await deployment.restart_daemon(service)
    state = await read_state(service)
    assert state.engaged and state.event_id == stop.id


async def test_duplicate_acks_are_checked_against_the_stream(deployment, service, operator):
    """The mechanism in the shared publish path (Bus.publish / publish_many, verify=True)."""
    e = ev.EmergencyEngaged.new(ev.EmergencyChange(by="t", reason="r", origin="control"), source="test")
    await send(operator, "control.rollback", b"junk", {MSG_ID: e.id})
    p = await service.publish(e, verify=True)
    assert p.reissued is not None and p.reissued.id != e.id and not p.duplicate
    got = await service.js.get_msg("CONTROL", p.seq)
    assert got.subject == "emergency.engaged" and msgspec.json.decode(got.data)["id"] == p.reissued.id
    # a genuine duplicate (a retried publish of the same event) is recognised as one
    again = await service.publish(p.reissued, verify=True)
    assert again.duplicate and again.reissued is None and again.seq == p.seq
    e2 = ev.EmergencyReleased.new(ev.EmergencyChange(by="t", reason="r", origin="control"), source="test")
    await send(operator, "control.rollback", b"junk", {MSG_ID: e2.id})
    [p2] = await service.publish_many([e2], verify=True)
    assert p2.reissued is not None and (await service.js.get_msg("CONTROL", p2.seq)).subject == "emergency.released"
    # the check is on by default (a service login may read the stream) …
    e3 = ev.EmergencyReleased.new(ev.EmergencyChange(by="t", reason="r3", origin="control"), source="test")
    await send(operator, "control.rollback", b"junk", {MSG_ID: e3.id})
    assert (await service.publish(e3)).reissued is not None
    # … and verify=False is the old behaviour: the junk's ack is taken for the event
    e4 = ev.EmergencyReleased.new(ev.EmergencyChange(by="t", reason="r4", origin="control"), source="test")
    await send(operator, "control.rollback", b"junk", {MSG_ID: e4.id})
    assert (await service.publish(e4, verify=False)).duplicate


@pytest.mark.parametrize("user", ["operator", "worker", "edge", "analyst"])
async def test_only_services_may_publish_effect_subjects(deployment, service, user):
    inbox = f"_INBOX.{user}"
    conn = await connect(deployment.url(user), inbox_prefix=inbox, name=user)
    try:
        for subject in ("gear.changed", "gear.daemon.stopped", "emergency.engaged", "emergency.released", "control.rejected"):
            await conn.nc.publish(subject, b"{}")
            await conn.wait_for_error(violation("Publish", subject))
    finally:
        await conn.nc.close()
    info = await service.js.stream_info("CONTROL")
    assert info.state.messages == 0


# --------------------------------------------------------------------------- the pure parts


def test_replay_guard_lets_a_redelivery_through_and_forgets_only_what_the_window_refuses():
    from scf.bus.signing import SigningKey, TrustList

    key = SigningKey.generate("alice")
    trust = TrustList()
    trust.trust(key.public_b64, "alice", ["operator"])
    guard = control.ReplayGuard(window_s=300, skew_s=30)
    t0 = ev.utcnow()
    subject, body, headers = control.encode(control.Stop(reason="x"), key)
    received = control.decode(subject, body, headers, trust)
    assert received.kid == key.kid and received.command.nonce and received.command.issued_at
    guard.check(received, 7, t0)
    guard.record(received, 7, t0)
    guard.check(received, 7, t0)  # the same message redelivered: not a replay
    with pytest.raises(control.ReplayError, match="replayed control.stop"):
        guard.check(received, 8, t0 + dt.timedelta(seconds=1))
    # entries are forgotten only once a replay would fail the window check anyway
    later = control.decode(*control.encode(control.Stop(), key), trust)
    guard.record(later, 9, t0 + guard.horizon - dt.timedelta(seconds=1))
    assert len(guard) == 2
    guard.record(control.decode(*control.encode(control.Stop(), key), trust), 10, t0 + guard.horizon + dt.timedelta(seconds=1))
    assert len(guard) == 2  # the first one is gone ...
    with pytest.raises(control.ReplayError, match="older than the 300 s window"):
        guard.check(received, 11, t0 + guard.horizon + dt.timedelta(seconds=1))  # ... and its replay is refused by time


def test_the_control_file_signs_with_a_fresh_nonce_each_time():
    from scf.bus.signing import SigningKey, TrustList
    from scf.producers.control_file import parse

    key = SigningKey.generate("alice")
    trust = TrustList()
    trust.trust(key.public_b64, "alice", ["operator"])
    [m] = parse(b'{"command": "RELEASE_EMERGENCY", "payload": {"reason": "clear"}}')
    bodies = [control.sign_json(m.subject, m.payload, key) for _ in range(2)]
    got = [control.decode(m.subject, body, headers, trust, require_signature=True).command for body, headers in bodies]
    assert got[0].nonce != got[1].nonce and all(c.issued_at is not None and c.reason == "clear" for c in got)


def test_the_id_key_is_private_and_keys_the_ids(tmp_path: Path):
    from scf.bus.ids import IdKeyError, ensure_id_key

    path, created = ensure_id_key(tmp_path)
    assert created and (path.stat().st_mode & 0o777) == 0o600
    assert ensure_id_key(tmp_path) == (path, False)
    key = load_id_key(tmp_path)
    assert keyed_id(key, "CONTROL:5", "emergency.engaged", "") == keyed_id(key, "CONTROL:5", "emergency.engaged", "")
    assert keyed_id(key, "CONTROL:5", "emergency.engaged", "") != keyed_id(b"k" * 32, "CONTROL:5", "emergency.engaged", "")
    os.chmod(path, 0o644)
    with pytest.raises(IdKeyError, match="chmod 600"):
        load_id_key(tmp_path)
