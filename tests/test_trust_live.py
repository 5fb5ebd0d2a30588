"""The shared trust list (bus/trust.py): root-signed entries on the TRUST stream, followed
live by every verifier.

Attacks and promises, each with real processes and a real nats-server:
* a node key trusted after `scf run ledger` started is honoured without a restart, and its
  revocation refuses the key's next measurement within seconds (awaited, not slept);
* a captured grant replayed after the revocation, and entries forged by a key that is not
  a pinned root (or unsigned), published with a plain nats-py client, are ignored;
* a host that pins the same root sees the same list, a host that pins another root does not;
* with the production users of nats/users.conf, only operators and services may publish
  trust entries, and an edge login can follow the list.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import nats
import pytest
from nats.js.errors import NotFoundError

from scf.bus import events as ev
from scf.bus import trust as tr
from scf.bus.client import Bus
from scf.bus.errors import SignatureError
from scf.bus.headers import SCF_KID, SCF_SIG
from scf.bus.server import free_port
from scf.bus.settings import Settings, init_home
from scf.bus.settings import load as load_settings
from scf.bus.signing import SigningKey, TrustList, command_message
from scf.bus.streams import ensure
from scf.consumers.ledger import read_transfers
from tests.conftest import cli as in_process
from tests.conftest import scf, spawn, wait_for
from tests.test_ledger import measurement, publish_signed, rejections

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the pure core


def _grant(key: SigningKey, prev: int, name: str = "n1", roles=("node",)) -> tr.TrustEntry:
    return tr.TrustEntry(action="trust", kid=key.kid, public=key.public_b64, name=name, roles=list(roles), by="t",
                         at=tr.utcnow(), prev=prev)


def _revoke(key: SigningKey, prev: int) -> tr.TrustEntry:
    return tr.TrustEntry(action="revoke", kid=key.kid, name="n1", by="t", at=tr.utcnow(), prev=prev, reason="lost")


def test_only_root_signed_chained_entries_apply():
    root, other, node = SigningKey.generate("root"), SigningKey.generate("mallory"), SigningKey.generate("n1")
    roots = TrustList()
    roots.trust(root.public_b64, "root", ["operator"])
    state = tr.TrustState(roots)

    def apply(seq, entry, signer):
        subject, body, headers = tr.signed_entry(entry, signer)
        return state.apply(seq, subject, headers, body)

    assert "not a pinned root" in apply(1, _grant(node, 0), other).reason
    subject, body, headers = tr.signed_entry(_grant(node, 0), root)
    assert "unsigned" in state.apply(2, subject, {}, body).reason
    assert "bad signature" in state.apply(3, subject, headers, body.replace(b'"node"', b'"operator"')).reason
    moved = "trust.key.0000000000000000"  # signed for another key's subject
    assert "published on" in state.apply(4, moved, {SCF_SIG: root.sign(command_message(moved, body)), SCF_KID: root.kid}, body).reason
    assert node.kid not in state.keys

    grant = apply(5, _grant(node, 0), root)
    assert grant.applied and state.keys[node.kid].roles == ["node"]
    assert apply(6, _revoke(node, 5), root).applied
    assert node.kid not in state.keys and node.kid in state.revoked
    replay = state.apply(7, subject, headers, body)  # the captured grant, sent again
    assert not replay.applied and "stale" in replay.reason
    assert node.kid not in state.keys
    assert apply(8, _grant(node, 6), root).applied  # re-trusted by the root, chained to the revocation
    assert node.kid in state.keys


# --------------------------------------------------------------------------- helpers


async def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """An operator's `scf` command, run in this process (typer's CliRunner, in a thread: the
    command runs its own event loop) with exactly `env`: the processes under test are the
    ledger and the daemon started with `spawn`; `scf keys trust --import` stays a real one."""
    r = await asyncio.to_thread(in_process, *args, env=env)
    assert r.returncode == 0, f"scf {' '.join(args)}: {r.stdout}{r.stderr}"
    return r


async def ledger_consumer_exists(bus: Bus) -> bool:
    try:
        await bus.js.consumer_info("DEPLOY", "ledger")
        return True
    except NotFoundError:
        return False


async def rejected_with(bus: Bus, text: str) -> bool:
    return any(text in r.reason for r in await rejections(bus))


async def minted_for(bus: Bus, account: str) -> int:
    return sum(1 for e in await read_transfers(bus) if e.transfer.credit_account == account)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def raw_publish(url: str, subject: str, body: bytes, headers: dict[str, str] | None) -> None:
    """What any NATS client can do: publish bytes (and headers) on a subject."""
    nc = await nats.connect(url)
    try:
        await nc.jetstream().publish(subject, body, headers=headers)
    finally:
        await nc.close()


# --------------------------------------------------------------------------- the running ledger


async def test_ledger_honours_a_key_trusted_after_start_and_refuses_it_once_revoked(bus, settings, scf_env, tmp_path):
    await cli("keys", "root", "new", "root", env=scf_env)
    node = SigningKey.generate("n1")
    log = tmp_path / "ledger.log"
    ledger = spawn([sys.executable, "-m", "scf.cli.main", "run", "ledger"], scf_env, log)
    try:
        await wait_for(lambda: ledger_consumer_exists(bus), 60, "the ledger's consumer")
        # before the grant: unknown to the running ledger
        await publish_signed(bus, measurement("n1", 10.0, 7.5, hour=0), node)
        await wait_for(lambda: rejected_with(bus, "unknown signing key"), 30, "the untrusted measurement rejected")

        # trusted while the ledger runs: the next measurement is minted, no restart
        out = await cli("keys", "trust", base64.b64encode(node.public_raw).decode(), "--name", "n1", "--role", "node", env=scf_env)
        assert "in the shared trust list" in out.stdout
        await publish_signed(bus, measurement("n1", 10.0, 7.5, hour=1), node)
        await wait_for(lambda: minted_for(bus, "node:n1"), 30, "the measurement of the newly trusted key minted")
        grant = await bus.js.get_last_msg("TRUST", tr.subject_for(node.kid))

        # revoked: the next measurement is refused, within seconds
        out = await cli("keys", "revoke", "n1", "--reason", "meter stolen", env=scf_env)
        assert f"revoked {node.kid}" in out.stdout
        await publish_signed(bus, measurement("n1", 10.0, 7.5, hour=2), node)
        await wait_for(lambda: rejected_with(bus, "was revoked"), 30, "the revoked key's measurement rejected")

        # the captured grant replayed by any client (same body and signature; the unsigned
        # headers an attacker controls dropped): stale, ignored
        signed = {k: v for k, v in (grant.headers or {}).items() if k in (SCF_SIG, SCF_KID)}
        await raw_publish(settings.nats_url, grant.subject, grant.data, signed)
        await wait_for(lambda: log_has(log, "ignored, not applied: stale"), 30, "the ledger ignoring the replayed grant")
        await publish_signed(bus, measurement("n1", 10.0, 7.5, hour=3), node)

        async def two_revoked() -> bool:
            return sum("was revoked" in r.reason for r in await rejections(bus)) == 2

        await wait_for(two_revoked, 30, "the measurement after the replay rejected too")
        assert await minted_for(bus, "node:n1") == 1
        assert ledger.poll() is None, log.read_text()
    finally:
        stop(ledger)

    # the audit trail: who trusted and revoked what, signed by which root; the replay ignored
    audit = (await cli("keys", "log", env=scf_env)).stdout.splitlines()
    assert len(audit) == 3, audit
    assert "trust " in audit[0] and node.kid in audit[0] and "roles=node" in audit[0] and "signed by root root" in audit[0]
    assert "revoke" in audit[1] and "meter stolen" in audit[1] and "signed by root root" in audit[1]
    assert "IGNORED: stale" in audit[2]


def log_has(path: Path, text: str) -> bool:
    return text in path.read_text(errors="replace")


async def test_forged_trust_entries_are_ignored_by_the_running_ledger(bus, settings, scf_env, tmp_path):
    await cli("keys", "root", "new", "root", env=scf_env)
    evil, good = SigningKey.generate("evil"), SigningKey.generate("good")
    mallory = SigningKey.generate("mallory")  # a key, but not a pinned root
    log = tmp_path / "ledger.log"
    ledger = spawn([sys.executable, "-m", "scf.cli.main", "run", "ledger"], scf_env, log)
    try:
        await wait_for(lambda: ledger_consumer_exists(bus), 60, "the ledger's consumer")
        # a grant signed by a non-root key, and an unsigned one, from a plain nats-py client
        subject, body, headers = tr.signed_entry(_grant(evil, 0, name="evil"), mallory)
        await raw_publish(settings.nats_url, subject, body, headers)
        await raw_publish(settings.nats_url, subject, body, None)
        # then a genuine grant, later on the stream: once it applies, the forgeries were read
        await cli("keys", "trust", base64.b64encode(good.public_raw).decode(), "--name", "good", "--role", "node", env=scf_env)
        await publish_signed(bus, measurement("good", 10.0, 7.5), good)
        await publish_signed(bus, measurement("evil", 10.0, 7.5), evil)
        await wait_for(lambda: minted_for(bus, "node:good"), 30, "the genuinely trusted key minted")
        await wait_for(lambda: rejected_with(bus, f"unknown signing key {evil.kid}"), 30, "the forged key refused")
        assert await minted_for(bus, "node:evil") == 0
        assert log_has(log, "is not a pinned root"), log.read_text()
        assert ledger.poll() is None
    finally:
        stop(ledger)
    audit = (await cli("keys", "log", env=scf_env)).stdout
    assert audit.count("IGNORED") == 2 and "not a pinned root" in audit and "unsigned" in audit


async def control_events(bus: Bus, subject: str) -> list[ev.Event]:
    from tests.test_deploy_helpers import events_on

    return [e for _, e in await events_on(bus, "CONTROL", subject, [ev.ControlRejected, ev.DaemonStopped, ev.DaemonResumed])]


async def test_daemon_honours_an_operator_key_trusted_after_start_and_refuses_it_once_revoked(bus, settings, scf_env, tmp_path):
    """Signed control commands (SCF_REQUIRE_SIGNED_CONTROL=1), `scf run daemon` left running."""
    (settings.home_path / "scf.toml").write_text('[daemon]\nverify_checkpoints = "off"\n')
    await cli("keys", "root", "new", "root", env=scf_env)
    await cli("keys", "new", "alice", env=scf_env)
    env = {**scf_env, "SCF_REQUIRE_SIGNED_CONTROL": "1"}
    alice = {**scf_env, "SCF_KEY": "alice"}
    log = tmp_path / "daemon.log"
    daemon = spawn([sys.executable, "-m", "scf.cli.main", "run", "daemon"], env, log)
    try:
        async def live() -> bool:
            assert daemon.poll() is None, log.read_text()[-2000:]
            try:
                entry = await (await bus.kv("scf_state")).get("daemon")
            except Exception:
                return False
            return bool(entry and entry.value)

        await wait_for(live, 60, "the daemon's liveness entry")
        await cli("control", "stop", "--reason", "before trust", env=alice)

        async def rejected(text: str, n: int = 1) -> bool:
            return sum(text in e.data.reason for e in await control_events(bus, "control.rejected")) >= n

        await wait_for(lambda: rejected("unknown signing key"), 30, "the untrusted operator's command rejected")
        await cli("keys", "trust", str(settings.keys_dir / "alice.pub"), "--role", "operator", env=scf_env)
        await cli("control", "stop", "--reason", "after trust", env=alice)
        [stopped] = await wait_for_events(bus, "gear.daemon.stopped")
        assert stopped.data.reason == "after trust"
        await cli("keys", "revoke", "alice", env=scf_env)
        await cli("control", "resume", "--reason", "after revoke", env=alice)
        await wait_for(lambda: rejected("was revoked"), 30, "the revoked operator's command rejected")
        assert await control_events(bus, "gear.daemon.resumed") == []
        assert daemon.poll() is None
    finally:
        stop(daemon)


async def wait_for_events(bus: Bus, subject: str, n: int = 1) -> list[ev.Event]:
    found: list[ev.Event] = []

    async def enough() -> bool:
        nonlocal found
        found = await control_events(bus, subject)
        return len(found) >= n

    await wait_for(enough, 30, f"{n} event(s) on {subject}")
    return found


# --------------------------------------------------------------------------- hosts


def host(tmp_path: Path, name: str, nats_url: str) -> tuple[Settings, dict[str, str]]:
    s = Settings(home=str(tmp_path / name), nats_url=nats_url, source=name)
    init_home(s)
    env = dict(os.environ)
    env.update({"NATS_URL": nats_url, "SCF_HOME": s.home, "PYTHONUNBUFFERED": "1"})
    env.pop("SCF_KEY", None)
    return s, env


async def test_hosts_pinning_the_same_root_see_the_same_list(bus, settings, scf_env, tmp_path):
    await cli("keys", "root", "new", "root", env=scf_env)
    root_pub = (settings.keys_dir / "root.pub").read_text().strip()
    b, b_env = host(tmp_path, "host-b", settings.nats_url)
    c, c_env = host(tmp_path, "host-c", settings.nats_url)
    await cli("keys", "root", "pin", root_pub, "--name", "root", env=b_env)
    await cli("keys", "root", "new", "other-root", env=c_env)  # another deployment's root

    bus_b, bus_c = await Bus.connect(b, "host-b"), await Bus.connect(c, "host-c")
    view_b, view_c = await tr.SharedTrust.open(bus_b, b), await tr.SharedTrust.open(bus_c, c)
    try:
        node = SigningKey.generate("n1")
        await cli("keys", "trust", base64.b64encode(node.public_raw).decode(), "--name", "n1", "--role", "node", env=scf_env)
        view_a = await tr.SharedTrust.open(bus, settings)
        await wait_for(lambda: node.kid in view_b.keys, 20, "host B to see the grant")
        assert view_b.state.keys == view_a.state.keys == {node.kid: tr.TrustedKey(public=node.public_b64, name="n1", roles=["node"])}
        msg = b"measurement"
        assert view_b.verify(msg, node.sign(msg), node.kid, "node") == "n1"
        await view_c.sync()
        assert view_c.keys == {} and view_c.seq == view_a.seq  # read the same entry, applied nothing
        with pytest.raises(SignatureError, match="unknown signing key"):
            view_c.verify(msg, node.sign(msg), node.kid, "node")
        ls_b = (await cli("keys", "ls", env=b_env)).stdout
        assert f"trusted  {node.kid}  n1  roles=node  [shared]" in ls_b

        # revoked on host A: host B refuses the key as soon as the entry arrives
        await cli("keys", "revoke", node.kid, env=scf_env)
        await wait_for(lambda: node.kid not in view_b.keys, 20, "host B to see the revocation")
        with pytest.raises(SignatureError, match="was revoked"):
            view_b.verify(msg, node.sign(msg), node.kid, "node")
        await view_a.stop()
    finally:
        await view_b.stop()
        await view_c.stop()
        await bus_b.close()
        await bus_c.close()


async def test_a_revocation_reaches_a_running_view_across_a_server_restart(bus, settings, scf_env, nats_server, tmp_path):
    """The view follows TRUST through a SIGKILLed and restarted nats-server (same store)."""
    await cli("keys", "root", "new", "root", env=scf_env)
    node = SigningKey.generate("n1")
    await cli("keys", "trust", node.public_b64, "--name", "n1", "--role", "node", env=scf_env)
    follower = await Bus.connect(settings, "follower")
    view = await tr.SharedTrust.open(follower, settings)
    try:
        assert node.kid in view.keys
        nats_server.kill()
        nats_server.start()
        await cli("keys", "revoke", "n1", env=scf_env)
        await wait_for(lambda: node.kid not in view.keys, 60, "the running view to apply the revocation after the restart")
        with pytest.raises(SignatureError, match="was revoked"):
            view.verify(b"m", node.sign(b"m"), node.kid, "node")
    finally:
        await view.stop()
        await follower.close()


async def test_a_shared_revocation_overrides_a_hosts_local_file(bus, settings, scf_env):
    """A host that honours its keys/trusted.json as well (`[trust] local_file = true`) refuses a
    key it lists once the root revoked it; `false` ignores the file altogether (and so does the
    default, "auto", on a host that pins a root: tests/test_attack_trust_file.py)."""
    node, other = SigningKey.generate("n1"), SigningKey.generate("n2")
    local = TrustList.load(settings.keys_dir / "trusted.json")
    local.trust(node.public_b64, "n1", ["node"])
    local.trust(other.public_b64, "n2", ["node"])
    local.save()
    await cli("keys", "root", "new", "root", env=scf_env)
    await cli("keys", "revoke", node.kid, "--reason", "lost", env=scf_env)
    assert node.kid not in TrustList.load(settings.keys_dir / "trusted.json").keys  # dropped here too
    local.save()  # a stale copy of the file, as on another host
    (settings.home_path / "scf.toml").write_text("[trust]\nlocal_file = true\n")
    view = await tr.SharedTrust.open(bus, load_settings(home=settings.home, env={"NATS_URL": settings.nats_url}))
    try:
        with pytest.raises(SignatureError, match="was revoked by .*: lost"):
            view.verify(b"m", node.sign(b"m"), node.kid, "node")
        assert view.verify(b"m", other.sign(b"m"), other.kid, "node") == "n2"
    finally:
        await view.stop()
    (settings.home_path / "scf.toml").write_text("[trust]\nlocal_file = false\n")
    strict = await tr.SharedTrust.open(bus, load_settings(home=settings.home, env={"NATS_URL": settings.nats_url}))
    try:
        with pytest.raises(SignatureError, match="unknown signing key"):
            strict.verify(b"m", other.sign(b"m"), other.kid, "node")
    finally:
        await strict.stop()


async def test_import_moves_the_local_file_into_the_shared_list(bus, settings, scf_env):
    local = TrustList.load(settings.keys_dir / "trusted.json")
    release, node = SigningKey.generate("release"), SigningKey.generate("n1")
    local.trust(release.public_b64, "release", ["release"])
    local.trust(node.public_b64, "n1", ["node"])
    local.save()
    # no root here: the import says how to get one, and the file stays
    r = await asyncio.to_thread(scf, "keys", "trust", "--import", env=scf_env)
    assert r.returncode == 1 and r.stderr.startswith("Error: no pinned root key is held here")
    assert (settings.keys_dir / "trusted.json").exists()
    await cli("keys", "root", "new", "root", env=scf_env)
    out = await cli("init", env=scf_env)  # scf init imports it once a root is held here
    assert "imported 2 key(s) into the shared trust list" in out.stdout
    assert not (settings.keys_dir / "trusted.json").exists() and (settings.keys_dir / "trusted.json.imported").exists()
    view = await tr.SharedTrust.open(bus, settings)
    try:
        assert view.state.keys[release.kid].roles == ["release"] and view.state.keys[node.kid].name == "n1"
    finally:
        await view.stop()


# --------------------------------------------------------------------------- production users


PASSWORDS = {user: f"p{user}Test1" for user in ("service", "operator", "worker", "edge", "analyst")}
NATS_SERVER = Path(sys.executable).parent / "nats-server"


@pytest.fixture
def users_server(tmp_path):
    """nats-server with nats/users.conf as written (no TLS: the permissions are the point)."""
    work = tmp_path / "prod"
    work.mkdir()
    shutil.copy(REPO / "nats" / "users.conf", work / "users.conf")
    port = free_port()
    (work / "server.conf").write_text(
        f'listen: 127.0.0.1:{port}\njetstream {{ store_dir: "{work / "store"}" }}\ninclude ./users.conf\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCF_")}
    env.update({f"SCF_{u.upper()}_PASSWORD": pw for u, pw in PASSWORDS.items()})
    proc = subprocess.Popen([str(NATS_SERVER), "-c", str(work / "server.conf")], cwd=work, env=env,
                            stdout=open(work / "server.log", "wb"), stderr=subprocess.STDOUT)
    yield port, work
    proc.terminate()
    proc.wait(10)


def url(port: int, user: str) -> str:
    return f"nats://{user}:{PASSWORDS[user]}@127.0.0.1:{port}"


async def refused_publish(port: int, user: str, subject: str) -> str:
    """Publish as `user`; return the server's permission error (empty if none came)."""
    errors: list[str] = []
    got = asyncio.Event()

    async def on_error(err: Exception) -> None:
        errors.append(str(err))
        got.set()

    nc = await nats.connect(url(port, user), error_cb=on_error, allow_reconnect=False, inbox_prefix=f"_INBOX.{user}")
    try:
        await nc.publish(subject, b"{}")
        await nc.flush()
        await asyncio.wait_for(got.wait(), 10)
    finally:
        await nc.close()
    return " ".join(errors)


async def test_production_users_only_operators_and_services_write_the_trust_list(users_server, tmp_path):
    port, _ = users_server
    svc, svc_env = host(tmp_path, "svc", url(port, "service"))
    await wait_for(lambda: port_open(port), 20, "nats-server with users.conf")
    service = await Bus.connect(svc, "service")
    await ensure(service.js)
    subject = "trust.key.0123456789abcdef"
    for user in ("edge", "worker", "analyst"):
        err = await refused_publish(port, user, subject)
        assert f'permissions violation for publish to "{subject}"' in err.lower(), (user, err)

    # the operator's login writes the list with `scf keys trust`, signed by its root
    op, op_env = host(tmp_path, "operator", url(port, "operator"))
    await cli("keys", "root", "new", "root", env=op_env)
    edge, _ = host(tmp_path, "edge-host", url(port, "edge"))
    shutil.copy(op.keys_dir / "roots.json", edge.keys_dir / "roots.json")  # the pinned root, copied
    edge_bus = await Bus.connect(edge, "edge")
    view = await tr.SharedTrust.open(edge_bus, edge)  # an edge login may follow the list
    try:
        assert view.following
        node = SigningKey.generate("node-a")
        await cli("keys", "trust", base64.b64encode(node.public_raw).decode(), "--name", "node-a", "--role", "node", env=op_env)
        await wait_for(lambda: node.kid in view.keys, 20, "the edge host to see the grant")
        # an operator login may publish, but an entry no root signed is ignored
        nc = await nats.connect(url(port, "operator"), inbox_prefix="_INBOX.operator")
        forged = _grant(SigningKey.generate("x"), 0, name="x")
        await nc.jetstream().publish(tr.subject_for(forged.kid), msgspec.json.encode(forged))
        await nc.close()
        await view.sync()
        assert forged.kid not in view.keys and len(view.keys) == 1
    finally:
        await view.stop()
        await edge_bus.close()
        await service.close()


def port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
