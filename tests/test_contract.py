"""Contracts: constraints validated at the boundary with the exact path of a bad field;
`scf contract add|ls|show|end` against a real nats-server."""

from __future__ import annotations

import asyncio
import json

import pytest

from scf.producers import contracts
from tests.conftest import cli

HVAC = {"contract_id": "acme-hq", "client": "ACME", "domain": "hvac:office3", "nodes": ["edge-a"],
        "constraints": {"T_out": 6.0, "comfort": {"occupied": [21, 24]}}, "schedule_s": 3600}


@pytest.mark.parametrize(
    "constraints, message",
    [
        ({"comfort": {"occupied": ["x", 23]}}, "Expected `float`, got `str` - at `$.constraints.comfort.occupied[0]`"),
        ({"T_outt": 3}, "Object contains unknown field `T_outt` - at `$.constraints`"),
        ({"profile": [{"hour": 3, "T_out": "warm"}]}, "Expected `float | null`, got `str` - at `$.constraints.profile[0].T_out`"),
        ({"profile": [{"hour": 30}]}, "$.constraints.profile[0].hour = 30: an hour of the day is 0..23"),
        ({"comfort": {"occupied": [24, 21]}}, "$.constraints (hour 0): comfort.occupied = [24, 21]: the low end is above the high end"),
    ],
)
def test_bad_hvac_constraints_name_their_path(constraints, message):
    with pytest.raises(contracts.ContractError) as info:
        contracts.parse_constraints("hvac:office3", constraints)
    assert str(info.value) == message


def test_grid_constraints_are_checked_by_the_optimiser():
    with pytest.raises(contracts.ContractError, match=r"^\$\.constraints \(hour 0\): loads: bus 99 is not a bus of the case"):
        contracts.parse_constraints("grid:case14", {"loads": {"99": 3.0}})
    with pytest.raises(contracts.ContractError, match=r"unknown field `comfort` - at `\$\.constraints`"):
        contracts.parse_constraints("grid:case14", {"comfort": {}})
    c = contracts.parse_constraints("grid:case14", {"load_scale": 1.1, "profile": [{"hour": 18, "load_scale": 1.3}, {"hour": 3}]})
    assert contracts.hours(c) == [3, 18]
    assert contracts.problem_spec(None, c, 18) == {"load_scale": 1.3} and contracts.problem_spec(None, c, 3) == {"load_scale": 1.1}


def test_documents_and_hashes():
    with pytest.raises(contracts.ContractError, match=r"^\$\.domain: "):
        contracts.parse_doc(dict(HVAC, domain="hvac:nowhere"))
    with pytest.raises(contracts.ContractError, match=r"\$\.nodes\[0\] = 'a b'"):
        contracts.parse_doc(dict(HVAC, nodes=["a b"]))
    with pytest.raises(contracts.ContractError, match="Object missing required field `client`"):
        contracts.parse_doc({k: v for k, v in HVAC.items() if k != "client"})
    a = contracts.spec_of(contracts.parse_doc(HVAC))
    b = contracts.spec_of(contracts.parse_doc(dict(HVAC, constraints={"comfort": {"occupied": [21.0, 24.0]}, "T_out": 6})))
    assert a.constraints == b.constraints  # canonical: key order and int/float spelling do not matter
    assert contracts.spec_sha256(a) == contracts.spec_sha256(b)
    assert contracts.spec_sha256(a) != contracts.spec_sha256(contracts.spec_of(contracts.parse_doc(dict(HVAC, nodes=["edge-b"]))))


@pytest.mark.anyio
async def test_contract_cli_round_trip(bus, scf_env, tmp_path):
    f = tmp_path / "acme.json"
    f.write_text(json.dumps(HVAC))
    run = lambda *a: asyncio.to_thread(cli, *a, env=scf_env)  # noqa: E731
    r = await run("contract", "add", str(f))
    assert r.returncode == 0 and "contract acme-hq registered" in r.stdout, r.stdout
    assert "unchanged" in (await run("contract", "add", str(f))).stdout
    y = tmp_path / "acme.yaml"
    y.write_text("contract_id: acme-hq\nclient: ACME\ndomain: hvac:office3\nnodes: [edge-a, edge-b]\nconstraints: {T_out: 4.0}\n")
    assert "contract acme-hq updated" in (await run("contract", "add", str(y))).stdout
    # unsigned (no SCF_KEY): ls/show read the regiment's view, so they say why it is not there
    r = await run("contract", "show", "acme-hq")
    assert r.returncode == 1 and "contract 'acme-hq' has no operator-signed terms: the regiment will not strike it" in r.stderr, r.stderr
    shown = json.loads((await run("contract", "show", "acme-hq", "--unsigned")).stdout)
    assert shown["nodes"] == ["edge-a", "edge-b"] and shown["constraints"]["T_out"] == 4.0
    assert [h["type"] for h in shown["history"]] == ["contract.registered", "contract.updated"]
    r = await run("contract", "ls")
    assert "acme-hq" not in r.stdout and "note: unsigned events not counted for acme-hq" in r.stderr, (r.stdout, r.stderr)
    assert "acme-hq" in (await run("contract", "ls", "--unsigned")).stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(HVAC, constraints={"comfort": {"occupied": ["x", 23]}})))
    r = await run("contract", "add", str(bad))
    assert r.returncode == 1 and "Error: Expected `float`, got `str` - at `$.constraints.comfort.occupied[0]`" in r.stdout + r.stderr
    assert "ended" in (await run("contract", "end", "acme-hq", "--reason", "term over")).stdout
    assert "acme-hq" not in (await run("contract", "ls", "--unsigned")).stdout
    r = await run("contract", "end", "acme-hq")
    assert r.returncode == 1 and r.stderr == "Error: contract acme-hq has already ended\n"


def test_demo_honours_an_exported_scf_home(tmp_path):
    """First contact: `scf demo` with SCF_HOME exported runs there (a non-empty one is refused
    before anything starts, naming it), not under ./.scf/demo-<time>."""
    import os

    home = tmp_path / "mine"
    home.mkdir()
    (home / "keep.txt").write_text("x")
    env = dict(os.environ, SCF_HOME=str(home))
    r = cli("demo", env=env)
    assert r.returncode == 1
    assert r.stdout.startswith(f"SCF_HOME is set: the demo runs in {home} (it must be empty or absent; --home DIR to choose another)")
    assert f"Error: {home} is not empty: the demo needs a fresh SCF_HOME" in r.stderr
