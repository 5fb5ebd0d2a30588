"""The thin CLIs of the value loop, in process against a real nats-server: `scf strike`'s
one-line refusals, `scf capsule build|verify|deploy` from a registered contract, and
`scf proof verify` telling a strike's proof from the log's bundles."""

from __future__ import annotations

import asyncio
import json

import pytest

from scf.bus.client import Bus
from scf.producers import contracts
from tests.conftest import cli, stream_count
from tests.test_deploy_helpers import Keys

pytestmark = pytest.mark.anyio

DOC = {"contract_id": "acme", "client": "ACME", "domain": "hvac:office3", "nodes": ["edge-a"],
       "constraints": {"T_out": 9.0, "preheat_hours": 3}, "schedule_s": 0}


async def test_strike_refusals_are_one_line(bus, settings, scf_env, tmp_path):
    run = lambda *a: asyncio.to_thread(cli, *a, env=scf_env)  # noqa: E731
    r = await run("strike")
    assert r.returncode == 1 and r.stderr == "Error: give --contract ID, or --domain D with --constraints FILE (and --nodes)\n"
    r = await run("strike", "--contract", "acme")
    assert r.returncode == 1 and r.stderr.startswith(f"Error: no release key {settings.keys_dir / 'release.key'}: create it with `scf keys new release`")
    keys = Keys(settings)
    keys.release.save(settings.keys_dir)
    r = await run("strike", "--contract", "nobody")
    assert r.returncode == 1 and r.stderr == ("Error: no contract 'nobody' signed by an operator key (SCF_KEY): "
                                              "register it with `scf contract add FILE` (see `scf contract ls`)\n")
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"comfort": {"occupied": [21, "warm"]}}))
    r = await run("strike", "--domain", "hvac:office3", "--constraints", str(bad), "--nodes", "edge-a")
    assert r.returncode == 1 and r.stderr == "Error: Expected `float`, got `str` - at `$.constraints.comfort.occupied[1]`\n"
    op = await Bus.connect(settings, "operator", key=keys.operator)
    try:
        await contracts.add(op, contracts.parse_doc(DOC))
    finally:
        await op.close()
    r = await run("strike", "--contract", "acme", "--wait", "1", "--measure", "none")  # no gate is running
    assert r.returncode == 1 and r.stdout.startswith("activity ") and \
        ": failed (the safety gate ruled on 0 of 24 states within 1 s: is `scf run safety` running?)" in r.stdout, r.stdout + r.stderr
    other = tmp_path / "bundle.json"
    other.write_text(json.dumps({"kind": "scf.proof.inclusion/v1"}))
    r = await run("proof", "verify", str(other))
    assert r.returncode == 1 and r.stderr == "Error: --key is needed: the log's verifier key (`scf proof key`)\n"


async def test_capsule_build_verify_deploy(bus, settings, scf_env, tmp_path):
    keys = Keys(settings)
    keys.release.save(settings.keys_dir)
    op = await Bus.connect(settings, "operator", key=keys.operator)  # capsules are built from operator-signed terms
    try:
        await contracts.add(op, contracts.parse_doc(DOC))
    finally:
        await op.close()
    run = lambda *a: asyncio.to_thread(cli, *a, env=scf_env)  # noqa: E731
    out = tmp_path / "cap"
    r = await run("capsule", "build", "--contract", "acme", "--out", str(out), "--version", "3")
    assert r.returncode == 0 and f"capsule written to {out}" in r.stdout, r.stderr
    r = await run("capsule", "verify", str(out))
    assert r.stdout.startswith("OK: capsule-acme-v3 v3 for contract acme (hvac:office3), signed by release")
    r = await run("capsule", "deploy", str(out), "--nodes", "edge-a")
    assert r.returncode == 0 and "deploy intent" in r.stdout and "created" in r.stdout and "scf control approve" in r.stdout, r.stderr
    assert await stream_count(bus, "INTENTS", "intent.created.deploy.>") == 1
    assert await stream_count(bus, "CHECKPOINTS", "checkpoint.promoted.>") == 1
    r = await run("capsule", "deploy", str(out), "--nodes", "edge-a")  # the same capsule: the same promotion and intent
    assert "already exists" in r.stdout
    assert await stream_count(bus, "CHECKPOINTS", "checkpoint.promoted.>") == 1
    (out / "model.safetensors").write_bytes(b"x" + (out / "model.safetensors").read_bytes()[1:])
    r = await run("capsule", "deploy", str(out), "--nodes", "edge-a")
    assert r.returncode == 1 and "sha256 differs from the signed manifest" in r.stderr
