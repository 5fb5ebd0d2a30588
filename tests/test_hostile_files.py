"""Huge and booby-trapped input files: each refused in one line, before it costs memory or time.

* a YAML alias bomb ("billion laughs": nine levels of nine aliases, a 1 kB file that expands to
  387 million strings once converted) as a contract document and as a capsule manifest;
* a contract document, capsule manifest or MATPOWER case larger than any real one (a sparse
  file: no disk is spent), and a FIFO where a case file is expected.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scf.bus.files import InputTooLarge, load_yaml, read_bounded
from scf.domains import matpower
from scf.producers import capsule, contracts

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))


def test_yaml_aliases_are_refused_naming_the_line():
    import yaml

    assert load_yaml("a: 1\nb: [x, y]\n") == {"a": 1, "b": ["x", "y"]}
    with pytest.raises(yaml.YAMLError, match=r"an alias \(\*a\) refers to another node: write the value out in full"):
        load_yaml(BOMB)


def test_a_contract_alias_bomb_is_refused_in_one_line(tmp_path: Path):
    f = tmp_path / "bomb.yaml"
    f.write_text(BOMB)
    with pytest.raises(contracts.ContractError, match=r"bomb.yaml: not valid YAML \(an alias \(\*a\) refers to another node"):
        contracts.read_doc(f)
    # the CLI: the same one line, quickly (the bomb is never expanded), before any server is asked
    r = subprocess.run([sys.executable, "-m", "scf.cli.main", "contract", "add", str(f)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "NATS_URL": "nats://127.0.0.1:9"})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"Error: {f}: not valid YAML (an alias (*a)"), r.stderr


def test_oversized_inputs_are_refused_unread(tmp_path: Path):
    big = tmp_path / "big.json"
    with open(big, "wb") as fh:
        fh.truncate(contracts.MAX_DOC + 1)  # sparse: no disk spent
    with pytest.raises(contracts.ContractError, match=r"big.json: 1,048,577 bytes is more than a contract file may be"):
        contracts.read_doc(big)
    with pytest.raises(InputTooLarge):
        read_bounded(big, 1024, "test file")
    assert read_bounded(big, contracts.MAX_DOC + 1, "test file")[:4] == b"\0\0\0\0"

    case = tmp_path / "huge.m"
    with open(case, "wb") as fh:
        fh.truncate(matpower.MAX_CASE_BYTES + 1)
    with pytest.raises(matpower.CaseFormatError, match=r"huge.m: 67,108,865 bytes is more than a MATPOWER case may be"):
        matpower.load_case(case)


def test_a_capsule_manifest_bomb_or_giant_is_a_finding(tmp_path: Path):
    from scf.bus.signing import SigningKey, TrustList

    key = SigningKey.generate("release")
    trust = TrustList.load(tmp_path / "trusted.json")
    trust.trust(key.public_b64, "release", ["release"])
    d = tmp_path / "cap"
    d.mkdir()
    (d / capsule.MANIFEST).write_text(BOMB)  # signed by a trusted key: the parse itself must hold
    data = (d / capsule.MANIFEST).read_bytes()
    (d / capsule.SIGNATURE).write_text(json.dumps({"kid": key.kid, "sig": key.sign(data)}))
    checked = capsule.verify(d, trust)
    assert checked.findings and "an alias (*a) refers to another node" in checked.findings[0], checked.findings

    with open(d / capsule.MANIFEST, "wb") as fh:
        fh.truncate(capsule.MAX_MANIFEST + 1)
    checked = capsule.verify(d, trust)
    assert checked.findings and "bytes is more than a capsule manifest may be" in checked.findings[0], checked.findings
