"""The one-shot commands must verify with the regiment's trust list, not the host's file.

The tester's attack: on a production host (one that pins a root key) every running process
ignores `keys/trusted.json` and trusts only the root-signed TRUST list; but `scf contract
ls/show`, `scf capsule verify|build|deploy`, `scf report value` and `scf proof verify` still
read the file. A key planted there (operator or release role) made `scf contract show` print
terms the regiment will not strike, and `scf capsule verify` say OK to a capsule no trusted
release key signed. Now they read the same view (cli/strike.py `checked_trust`): the TRUST
list on a rooted host (from the bus; one clear line when it cannot be read), the file alone
where no root is pinned (development, the demo, an auditor's machine: no bus needed).
Real `scf` processes against a real nats-server.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest

from scf.bus.signing import SigningKey, TrustList
from scf.producers import capsule as cap
from tests.conftest import scf
from tests.test_capsule import SPEC, manifest
from tests.test_trust_live import cli

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]

ACME = {"contract_id": "acme", "client": "ACME", "domain": "hvac:office3", "nodes": ["edge-a"],
        "constraints": {"T_out": 9.0, "preheat_hours": 3}}


async def run_scf(*args: str, env: dict[str, str]):
    return await asyncio.to_thread(scf, *args, env=env, timeout=120)


def plant(keys_dir: Path, name: str, role: str) -> SigningKey:
    """The attack: a key of one's own in this host's keys/trusted.json, never granted by a root."""
    key = SigningKey.generate(name)
    local = TrustList.load(keys_dir / "trusted.json")
    local.trust(key.public_b64, name, [role])
    local.save()
    return key


async def grant(env: dict[str, str], key: SigningKey, role: str) -> None:
    await cli("keys", "trust", base64.b64encode(key.public_raw).decode(), "--name", key.name, "--role", role, env=env)


@pytest.mark.slow  # seven `scf` processes: 6.4 s of CPU
async def test_contract_show_and_ls_ignore_a_key_planted_in_the_file_of_a_rooted_host(bus, settings, scf_env, tmp_path: Path):
    await cli("keys", "root", "new", "root", env=scf_env)  # a production host
    alice = SigningKey.generate("alice")
    alice.save(settings.keys_dir)
    await grant(scf_env, alice, "operator")
    doc = tmp_path / "acme.json"
    doc.write_text(json.dumps(ACME))
    await cli("contract", "add", str(doc), env={**scf_env, "SCF_KEY": "alice"})
    # the attack: an operator key of one's own in this host's file, signing new terms
    mallory = plant(settings.keys_dir, "mallory", "operator")
    mallory.save(settings.keys_dir)
    doc.write_text(json.dumps(dict(ACME, nodes=["edge-mallory"])))
    r = await cli("contract", "add", str(doc), env={**scf_env, "SCF_KEY": "mallory"})
    assert "updated" in r.stdout, r.stdout

    r = await cli("contract", "show", "acme", env=scf_env)
    assert json.loads(r.stdout)["nodes"] == ["edge-a"], r.stdout  # the terms the regiment strikes
    r = await cli("contract", "ls", env=scf_env)
    assert "nodes=edge-a " in r.stdout and "edge-mallory" not in r.stdout, r.stdout
    # the host's own file still decides where it is asked to ([trust] local_file = true)
    (settings.home_path / "scf.toml").write_text("[trust]\nlocal_file = true\n")
    r = await cli("contract", "show", "acme", env=scf_env)
    assert json.loads(r.stdout)["nodes"] == ["edge-mallory"], r.stdout


def signed_proof(tmp_path: Path, key: SigningKey) -> Path:
    """A strike proof (the shape `scf strike` writes, cut to what `scf proof verify` checks offline)."""
    from scf.producers import strike as st

    inputs = {"domain": SPEC.domain}
    inputs["inputs_sha256"] = st.sha256_json(inputs)
    body = {"kind": st.PROOF_KIND, "contract_id": "acme", "inputs": inputs, "status": "completed", "events": [],
            "activity_id": st.activity_id_for("acme", inputs["inputs_sha256"])}
    path = tmp_path / f"proof-{key.name}.json"
    path.write_text(json.dumps(dict(body, signature={"kid": key.kid, "sig": key.sign(st.canonical_json(body))})))
    return path


def signed_capsule(tmp_path: Path, name: str, key: SigningKey) -> Path:
    from scf.producers import strike as st

    solved = st.solve(SPEC, st.StrikeOptions())
    return cap.build(tmp_path / name, manifest(solved), solved.states, key)


@pytest.mark.slow  # ten `scf` processes one after another: 9 s of CPU
async def test_capsule_verify_trusts_the_shared_list_on_a_rooted_host_and_the_file_elsewhere(bus, settings, scf_env, tmp_path: Path):
    planted = plant(settings.keys_dir, "evil-release", "release")
    forged, forged_proof = signed_capsule(tmp_path, "forged", planted), signed_proof(tmp_path, planted)
    dead_bus = {**scf_env, "NATS_URL": "nats://127.0.0.1:9"}

    # development (no root pinned): the file is the list, and no bus is needed to read it
    r = await run_scf("capsule", "verify", str(forged), env=dead_bus)
    assert r.returncode == 0 and "signed by evil-release" in r.stdout, (r.stdout, r.stderr)
    r = await run_scf("proof", "verify", str(forged_proof), env=dead_bus)
    assert r.returncode == 0 and r.stdout.startswith("OK: strike"), (r.stdout, r.stderr)

    await cli("keys", "root", "new", "root", env=scf_env)  # now a production host
    r = await run_scf("capsule", "verify", str(forged), env=scf_env)
    assert r.returncode == 1 and "does not hold" in r.stderr, (r.stdout, r.stderr)
    assert planted.kid in r.stdout and "unknown" in r.stdout, r.stdout
    r = await run_scf("verify", str(forged), env=scf_env)  # `scf verify DIR`: the same list
    assert r.returncode == 1, (r.stdout, r.stderr)
    r = await run_scf("proof", "verify", str(forged_proof), env=scf_env)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "proof does not hold: signature:" in r.stderr and planted.kid in r.stderr, r.stderr
    release = SigningKey.generate("release")
    await grant(scf_env, release, "release")
    genuine = signed_capsule(tmp_path, "genuine", release)
    r = await run_scf("capsule", "verify", str(genuine), env=scf_env)
    assert r.returncode == 0 and "signed by release" in r.stdout, (r.stdout, r.stderr)
    r = await run_scf("proof", "verify", str(signed_proof(tmp_path, release)), env=scf_env)
    assert r.returncode == 0 and r.stdout.startswith("OK: strike"), (r.stdout, r.stderr)
    # a rooted host that cannot read TRUST says so in one line (never falls back to the file)
    r = await run_scf("capsule", "verify", str(forged), env=dead_bus)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "pins a root key" in r.stderr and "cannot be read" in r.stderr, r.stderr
