"""Hostile files given to `scf proof verify` (a real process, as the outsider runs it): JSON
nested deeper than the parser's recursion limit, and a strike proof whose signature's key
id is a list. Each used to end in a traceback (RecursionError, TypeError); each is now one
line saying the proof does not hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scf.producers.strike import PROOF_KIND
from tests.conftest import ROOT
from tests.test_nats_configs import base_env

pytestmark = pytest.mark.timeout(300)
LOG_KEY = "tlog+01234567+AAAA"  # any key: these files fail before a checkpoint is opened


def verify(tmp_path: Path, text: str, *extra: str) -> subprocess.CompletedProcess:
    proof = tmp_path / "proof.json"
    proof.write_text(text)
    env = {**base_env(), "SCF_HOME": str(tmp_path / "home")}
    return subprocess.run([sys.executable, "-m", "scf.cli.main", "proof", "verify", str(proof), *extra],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize(("text", "extra", "error"), [
    ("[" * 100_000 + "]" * 100_000, ("--key", LOG_KEY),
     "Error: proof does not hold: the proof is not JSON: pass the file `scf proof inclusion` or `consistency` wrote"),
    ("[" * 100_000 + "]" * 100_000, (), "Error: --key is needed: the log's verifier key (`scf proof key`)"),
    (json.dumps({"kind": PROOF_KIND, "signature": {"sig": 5, "kid": ["a"]}}), (),
     "Error: proof does not hold: signature: malformed signature: its key id and signature must be strings; sign it again with `scf keys`"),
    (json.dumps({"kind": PROOF_KIND, "signature": {"sig": "AAAA", "kid": {"x": 1}}}), ("--key", LOG_KEY),
     "Error: proof does not hold: signature: malformed signature: its key id and signature must be strings; sign it again with `scf keys`"),
])  # fmt: skip
def test_a_hostile_proof_file_is_one_line(tmp_path: Path, text: str, extra: tuple[str, ...], error: str):
    r = verify(tmp_path, text, *extra)
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert r.stderr.strip().splitlines() == [error], r.stderr


@pytest.mark.parametrize(("what", "finding"), [
    ("list", "{d}: capsule.sig is not a JSON object; build the capsule with `scf capsule build`"),
    ("deep", "{d}: not a capsule (maximum recursion depth exceeded while decoding a JSON array from a unicode string); "
             "build one with `scf capsule build`"),
    ("fifo", "{d}: capsule.sig is not a regular file; rebuild the capsule with `scf capsule build`"),
    ("link", "{d}: manifest.yaml is not a regular file; rebuild the capsule with `scf capsule build`"),
])  # fmt: skip
def test_a_hostile_capsule_is_a_finding_not_a_crash(tmp_path: Path, what: str, finding: str):
    """`scf capsule verify DIR` (a real process) on a capsule directory an attacker wrote: its
    signature file a JSON list (AttributeError before), nested 100 000 deep (RecursionError),
    a FIFO (the read blocked), or its manifest a symlink."""
    d = tmp_path / "capsule"
    d.mkdir()
    (d / "manifest.yaml").write_text("format: scf.capsule/v1\n")
    sig = d / "capsule.sig"
    if what == "list":
        sig.write_text("[1]")
    elif what == "deep":
        sig.write_text("[" * 100_000 + "]" * 100_000)
    elif what == "fifo":
        os.mkfifo(sig)
    else:
        sig.write_text('{"sig": "AAAA", "kid": "x"}')
        (tmp_path / "elsewhere.yaml").write_bytes((d / "manifest.yaml").read_bytes())
        (d / "manifest.yaml").unlink()
        (d / "manifest.yaml").symlink_to(tmp_path / "elsewhere.yaml")
    env = {**base_env(), "SCF_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "scf.cli.main", "capsule", "verify", str(d)],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 1, r.stdout
    assert r.stdout.strip().splitlines() == ["- " + finding.format(d=d)], r.stdout
    assert r.stderr.strip().splitlines() == [f"Error: capsule {d} does not hold (1 finding(s))"], r.stderr
