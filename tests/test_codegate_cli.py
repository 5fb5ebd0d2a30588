"""`scf safety check-code`: the capability gate (default deny) decides, as in the safety
consumer; the deny-list's findings follow as explanations. Run as a user would (typer's runner,
the test's own settings), on files from the adversarial corpus and on plain cases."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.conftest import cli

pytestmark = pytest.mark.anyio

CORPUS = Path(__file__).parent / "data" / "codegate"


async def check(path: Path, env, *extra: str):
    return await asyncio.to_thread(cli, "safety", "check-code", *extra, str(path), env=env)


async def test_a_benign_controller_is_approved(scf_env):
    path = CORPUS / "benign" / "000_hvac_band_thermostat_0.py"
    r = await check(path, scf_env)
    assert r.returncode == 0, r.stdout
    assert r.stdout.strip() == "APPROVE: every construct is within the capability set and the Controller contract holds"


async def test_the_gate_decides_and_the_deny_list_explains(scf_env, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\nclass Controller:\n    def step(self, observation):\n        os.system('id')\n        return [0.0]\n")
    r = await check(bad, scf_env)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"{bad}:1: capability: ") and "os" in lines[0]
    assert f"why it matters: {bad}:6: process execution: os.system runs a shell command" in lines
    assert lines[-1] == f"REJECT: {len(lines) - 1 - sum(x.startswith('why it matters') for x in lines)} finding(s) of the capability gate"


async def test_an_evasion_the_deny_list_misses_is_still_refused(scf_env):
    """The deny-list alone catches 65 of the corpus's 176 evasions; check-code now rules with the gate."""
    from scf.domains import ethics

    missed = next(p for p in sorted((CORPUS / "malicious").glob("*.py")) if not ethics.explain(p.read_text()))
    r = await check(missed, scf_env)
    assert r.returncode == 1 and r.stdout.splitlines()[-1].startswith("REJECT: ")
    assert not any(x.startswith("why it matters") for x in r.stdout.splitlines())  # nothing to explain: the gate alone


async def test_the_contract_is_checked_unless_told_otherwise(scf_env, tmp_path):
    helper = tmp_path / "helper.py"
    helper.write_text("import math\n\n\ndef clip(x, lo, hi):\n    return max(lo, min(hi, math.fabs(x)))\n")
    r = await check(helper, scf_env)
    assert r.returncode == 1 and "contract" in r.stdout and "Controller" in r.stdout
    r = await check(helper, scf_env, "--no-contract")
    assert r.returncode == 0 and r.stdout.strip() == "APPROVE: every construct is within the capability set"


async def test_a_missing_file_is_one_clear_line(scf_env, tmp_path):
    r = await check(tmp_path / "nope.py", scf_env)
    assert r.returncode == 1 and r.stderr.strip() == f"Error: cannot read {tmp_path / 'nope.py'}: No such file or directory"
