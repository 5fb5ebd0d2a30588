"""Attacks on client contracts (CONTRACTS stream), run as an outsider would: a real
nats-server with the production users of nats/users.conf, `scf contract add` as a real
process logged in as `operator`, plain nats-py clients for the other logins.

* who may register a contract (and a refused login's `scf contract add` says so in one line): the operator login (a field engineer) signs with an operator
  key and may publish `contract.*.*`; worker, edge and analyst may not; only services write
  `strike.>` (a strike promotes and deploys under the release key);
* a signed contract event captured from CONTRACTS and republished later (after the
  duplicate window, or under another message id) must not roll the contract back to the
  terms it replaced: the regiment's view (operator-signed events only) keeps the latest.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

import msgspec
import nats
import pytest

from scf.bus import codec
from scf.bus import events as ev
from scf.bus.client import Bus
from scf.bus.reader import read
from scf.producers import contracts
from tests import test_attack_control
from tests.test_attack_control import Deployment
from tests.test_attack_sweep import env_as
from tests.test_deploy_helpers import Keys

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]

deployment = test_attack_control.deployment
service = test_attack_control.service

ACME = {"contract_id": "acme", "client": "ACME", "domain": "hvac:office3", "nodes": ["edge-a"],
        "constraints": {"T_out": 9.0, "preheat_hours": 3}, "schedule_s": 0}


async def publish_error(deployment: Deployment, user: str, subject: str) -> str:
    """Publish `{}` on `subject` as a plain client of `user`; the server's refusal ('' if none came)."""
    errors: list[str] = []
    got = asyncio.Event()

    async def on_error(err: Exception) -> None:
        errors.append(str(err))
        got.set()

    prefix = f"_INBOX.{user}"
    nc = await nats.connect(deployment.url(user), error_cb=on_error, allow_reconnect=False, inbox_prefix=prefix)
    try:
        await nc.publish(subject, b"{}")
        await nc.flush()
        with suppress(asyncio.TimeoutError):  # every caller expects a refusal: this waits only when it fails
            await asyncio.wait_for(got.wait(), 10)
    finally:
        await nc.close()
    return " ".join(errors)


def scf(deployment: Deployment, user: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scf.cli.main", *args], env=env_as(deployment, user, **env),
                          capture_output=True, text=True, timeout=120)


async def test_an_operator_login_registers_signed_contracts_and_no_one_else_can(deployment: Deployment, service: Bus, tmp_path: Path):
    keys = Keys(deployment.settings)
    keys.operator.save(deployment.settings.keys_dir)  # $SCF_HOME/keys/alice.key
    doc = tmp_path / "acme.json"
    doc.write_text(json.dumps(ACME))

    r = scf(deployment, "operator", "contract", "add", str(doc), SCF_KEY="alice")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("contract acme registered (CONTRACTS seq 1)"), r.stdout
    signed = await contracts.load(service, trust=keys.trust)  # what the regiment strikes
    assert list(signed) == ["acme"] and signed["acme"].spec.nodes == ["edge-a"]

    r = scf(deployment, "operator", "contract", "end", "acme", "--reason", "client left", SCF_KEY="alice")
    assert r.returncode == 0, r.stderr
    assert not (await contracts.load(service, trust=keys.trust))["acme"].active

    # a login the server refuses: one line naming the login, the subject and the fix (no traceback)
    other = tmp_path / "globex.json"
    other.write_text(json.dumps(dict(ACME, contract_id="globex")))
    r = scf(deployment, "analyst", "contract", "add", str(other))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines()[-1] == ("Error: nats-server refused login 'analyst' publishing to contract.registered.globex: "
                                         "use a login nats/users.conf allows on it (docs/nats.md)"), r.stderr
    assert "Traceback" not in r.stderr

    for user in ("worker", "edge", "analyst"):
        for subject in ("contract.registered.x", "contract.updated.acme", "contract.ended.acme"):
            err = await publish_error(deployment, user, subject)
            assert f'permissions violation for publish to "{subject}"' in err.lower(), (user, subject, err)
    for user in ("operator", "worker", "edge", "analyst"):
        # strikes are the services' (release key, deploys); so are the gear and the emergency stop
        for subject in ("strike.completed.acme", "$KV.scf_state.emergency", "$KV.scf_state.regiment"):
            err = await publish_error(deployment, user, subject)
            assert f'permissions violation for publish to "{subject.lower()}"' in err.lower(), (user, subject, err)


async def test_a_replayed_signed_contract_event_does_not_roll_the_contract_back(deployment: Deployment, service: Bus):
    keys = Keys(deployment.settings)
    op = await Bus.connect(deployment.settings, "operator", key=keys.operator)
    try:
        what, _, _ = await contracts.add(op, contracts.parse_doc(ACME))
        assert what == "registered"
        warm = dict(ACME, constraints={"T_out": 19.0, "preheat_hours": 1})
        what, _, _ = await contracts.add(op, contracts.parse_doc(warm))
        assert what == "updated"
        warmer = dict(ACME, constraints={"T_out": 21.0, "preheat_hours": 1})
        what, _, _ = await contracts.add(op, contracts.parse_doc(warmer))
        assert what == "updated"
    finally:
        await op.close()
    latest = (await contracts.load(service, trust=keys.trust))["acme"]
    assert json.loads(latest.spec.constraints)["T_out"] == 21.0

    # the attacker: the production operator login, replaying the signed events it read
    captured = await read(service, "CONTRACTS", "contract.>")
    assert [m.subject for m in captured] == ["contract.registered.acme", "contract.updated.acme", "contract.updated.acme"]
    nc = await nats.connect(deployment.url("operator"), inbox_prefix="_INBOX.operator")
    try:
        js = nc.jetstream()
        for m in captured[:2]:  # the original terms, then the first update: each a valid signature
            ack = await js.publish(m.subject, m.data, headers={"Nats-Msg-Id": f"replay-{m.seq}"})
            assert ack.stream == "CONTRACTS" and not ack.duplicate
    finally:
        await nc.close()

    after = (await contracts.load(service, trust=keys.trust))["acme"]
    assert json.loads(after.spec.constraints)["T_out"] == 21.0, after.spec.constraints
    assert after.seq == latest.seq and after.event_id == latest.event_id
    assert len(after.history) == 3
    assert json.loads((await contracts.load(service))["acme"].spec.constraints)["T_out"] == 21.0  # `scf contract show` too


@pytest.mark.slow  # six `scf` processes (contract add, strike, capsule build): 7.7 s of CPU
async def test_an_unsigned_registration_published_first_does_not_keep_the_signed_contract_out(
        deployment: Deployment, service: Bus, tmp_path: Path):
    """Squatting: someone with the operator password but no operator key registers `acme`
    unsigned (other terms) before the field engineer does. The engineer's signed `scf
    contract add` used to become an update the regiment's signed view never counted (no
    signed registration): the contract was never struck. Now the signed update registers
    it in that view; and an unsigned add says, on stderr, that the regiment will ignore it."""
    keys = Keys(deployment.settings)
    keys.operator.save(deployment.settings.keys_dir)
    squat = tmp_path / "squat.json"
    squat.write_text(json.dumps(dict(ACME, nodes=["edge-z"], constraints={"T_out": 30.0, "preheat_hours": 0})))
    r = scf(deployment, "operator", "contract", "add", str(squat))  # no SCF_KEY
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("contract acme registered"), r.stdout
    assert r.stderr.strip().splitlines()[-1] == ("note: unsigned (no SCF_KEY): the regiment strikes only contracts an operator "
                                                 "key signed; register it again with SCF_KEY set to an operator key")
    assert await contracts.load(service, trust=keys.trust) == {}
    keys.release.save(deployment.settings.keys_dir)  # release.key: what `scf strike` signs with
    r = scf(deployment, "service", "strike", "--contract", "acme", "--measure", "none")
    assert r.returncode == 1 and r.stdout == "", r.stdout  # not struck by hand either
    assert r.stderr.strip().splitlines()[-1] == ("Error: no contract 'acme' signed by an operator key (SCF_KEY): "
                                                 "register it with `scf contract add FILE` (see `scf contract ls`)"), r.stderr
    r = scf(deployment, "service", "capsule", "build", "--contract", "acme", "--out", str(tmp_path / "cap"))
    assert r.returncode == 1 and not (tmp_path / "cap").exists(), r.stdout  # no capsule signed for those terms
    assert r.stderr.strip().splitlines()[-1].startswith("Error: no contract 'acme' signed by an operator key"), r.stderr

    doc = tmp_path / "acme.json"
    doc.write_text(json.dumps(ACME))
    r = scf(deployment, "operator", "contract", "add", str(doc), SCF_KEY="alice")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("contract acme registered (CONTRACTS seq 2)"), r.stdout
    assert "note: unsigned" not in r.stderr
    signed = (await contracts.load(service, trust=keys.trust))["acme"]
    assert signed.spec.nodes == ["edge-a"] and json.loads(signed.spec.constraints)["T_out"] == 9.0
    # the same file again: unchanged in the signed view, nothing published
    r = scf(deployment, "operator", "contract", "add", str(doc), SCF_KEY="alice")
    assert r.returncode == 0 and r.stdout.startswith("contract acme unchanged (CONTRACTS seq 2)"), r.stdout
    assert len(await read(service, "CONTRACTS", "contract.>")) == 2

    # an unsigned end published first: the signed view still holds the contract, and the
    # engineer's signed `scf contract end` is not refused as "already ended"
    nc = await nats.connect(deployment.url("operator"), inbox_prefix="_INBOX.operator")
    try:
        forged = ev.ContractEnded.new(msgspec.structs.replace(signed.spec, status="ended"), source="squatter")
        ack = await nc.jetstream().publish(forged.subject(), codec.encode(forged))
        assert ack.stream == "CONTRACTS"
    finally:
        await nc.close()
    assert (await contracts.load(service, trust=keys.trust))["acme"].active
    r = scf(deployment, "operator", "contract", "end", "acme", SCF_KEY="alice")
    assert r.returncode == 0 and r.stdout.startswith("contract acme ended (CONTRACTS seq 4)"), (r.stdout, r.stderr)
    assert not (await contracts.load(service, trust=keys.trust))["acme"].active


async def test_no_command_prints_the_nats_password(deployment: Deployment, service: Bus):
    """NATS_URL carries the login's password; `scf status`, `scf server status` and the
    unreachable-server error printed it whole (into terminals, CI logs, service logs)."""
    password = deployment.passwords["service"]
    r = scf(deployment, "service", "status")
    assert r.returncode == 0, r.stderr
    assert password not in r.stdout + r.stderr and r.stdout.startswith("NATS nats://127.0.0.1:"), r.stdout
    r = scf(deployment, "service", "server", "status")
    assert r.returncode == 0 and password not in r.stdout + r.stderr, r.stdout
    assert r.stdout.startswith("NATS_URL is set: using nats://127.0.0.1:"), r.stdout
    down = deployment.url("service").rsplit(":", 1)[0] + ":1"  # the same login, a port nobody serves
    r = subprocess.run([sys.executable, "-m", "scf.cli.main", "contract", "ls"], env={**env_as(deployment, "service"), "NATS_URL": down},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and password not in r.stdout + r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("Error: cannot reach NATS at nats://127.0.0.1:1 (connection refused)"), r.stderr


@pytest.mark.slow  # six `scf` processes: 6.7 s of CPU
async def test_contract_ls_and_show_print_the_terms_the_regiment_strikes(deployment: Deployment, service: Bus, tmp_path: Path):
    """An unsigned update anyone with the operator login writes over a signed contract is not what
    `scf strike --contract` or the regiment act on, so `scf contract show/ls` must not present it as
    the terms either: they read the operator-signed view, say that unsigned events exist, and print
    them only under --unsigned."""
    keys = Keys(deployment.settings)
    keys.operator.save(deployment.settings.keys_dir)
    doc = tmp_path / "acme.json"
    doc.write_text(json.dumps(ACME))
    assert scf(deployment, "operator", "contract", "add", str(doc), SCF_KEY="alice").returncode == 0
    doc.write_text(json.dumps(dict(ACME, nodes=["edge-mallory"])))
    r = scf(deployment, "operator", "contract", "add", str(doc))  # no key: an unsigned update
    assert r.returncode == 0 and "updated" in r.stdout, (r.stdout, r.stderr)

    r = scf(deployment, "operator", "contract", "show", "acme")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["nodes"] == ["edge-a"]
    assert "note: unsigned events on the log are not counted here" in r.stderr
    assert json.loads(scf(deployment, "operator", "contract", "show", "acme", "--unsigned").stdout)["nodes"] == ["edge-mallory"]
    r = scf(deployment, "operator", "contract", "ls")
    assert "nodes=edge-a " in r.stdout and "edge-mallory" not in r.stdout and "note: unsigned events not counted for acme" in r.stderr
    assert "nodes=edge-mallory " in scf(deployment, "operator", "contract", "ls", "--unsigned").stdout
