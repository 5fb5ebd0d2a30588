"""Hostile inputs to `scf optimize`, run as a real process the way an outsider would: a
MATPOWER case file with a NaN or Inf load, a NaN reactance, a NaN generator limit, an
Inf baseMVA. Before the fix a NaN load was read, every DC-OPF row became NaN and the
command printed "optimal: certified" for a dispatch that served none of the demand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scf.domains.matpower import DATA_DIR
from tests.conftest import ROOT
from tests.test_nats_configs import base_env

pytestmark = pytest.mark.timeout(300)

CASE9 = (DATA_DIR / "case9.m").read_text()
BUS5 = "\t5\t1\t90\t30"  # bus 5: PD 90 MW
BRANCH1 = "\t1\t4\t0\t0.0576"  # branch 1-4: x 0.0576
GEN1 = "\t1\t100\t1\t250\t10"  # generator 1: PMAX 250


def optimize(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    case = tmp_path / "hostile.m"
    case.write_text(text)
    env = {**base_env(), "SCF_HOME": str(tmp_path / "home")}
    return subprocess.run([sys.executable, "-m", "scf.cli.main", "optimize", "--case", str(case)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize(("old", "new", "where"), [
    (BUS5, "\t5\t1\tNaN\t30", "mpc.bus row 5 column 3 is nan"),
    (BUS5, "\t5\t1\tInf\t30", "mpc.bus row 5 column 3 is inf"),
    (BRANCH1, "\t1\t4\t0\tNaN", "mpc.branch row 1 column 4 is nan"),
    (GEN1, "\t1\t100\t1\tNaN\t10", "mpc.gen row 1 column 9 is nan"),
    ("mpc.baseMVA = 100;", "mpc.baseMVA = Inf;", "mpc.baseMVA is inf; it must be a finite number"),
])  # fmt: skip
def test_a_case_file_with_non_finite_data_is_refused_in_one_line(tmp_path: Path, old: str, new: str, where: str):
    assert CASE9.count(old) == 1
    r = optimize(tmp_path, CASE9.replace(old, new))
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert "certified" not in r.stdout and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"Error: {tmp_path / 'hostile.m'}: {where}"
                                             + ("; fix the case file" if "baseMVA" in where
                                                else "; only limits may be Inf and nothing NaN: fix the case file")], r.stderr


def test_inf_limits_are_still_read(tmp_path: Path):
    """MATPOWER writes Inf for "no limit" (here the generators' QMAX/QMIN and a branch rating)."""
    text = CASE9.replace("300\t-300", "Inf\t-Inf").replace("\t1\t4\t0\t0.0576\t0\t250", "\t1\t4\t0\t0.0576\t0\tInf")
    assert text != CASE9
    r = optimize(tmp_path, text)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("optimal: certified")


DEEP = "[" * 100_000 + "]" * 100_000  # past the JSON parser's recursion limit


def scf(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**base_env(), "SCF_HOME": str(tmp_path / "home")}
    return subprocess.run([sys.executable, "-m", "scf.cli.main", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize(("name", "text", "args", "error"), [
    ("ctx.json", '{"loads": ' + DEEP + "}", ("optimize", "--domain", "grid:case9", "--context", "{path}"),
     "--context is not valid JSON (nested too deeply); give a JSON object"),
    ("batch.jsonl", '{"load_scale": 1.0}\n' + DEEP, ("optimize", "--domain", "grid:case9", "--batch", "{path}"),
     "{path}:2: not JSON (nested too deeply); write one JSON object per line"),
    ("contract.json", '{"contract_id": "deep", "constraints": ' + DEEP + "}", ("contract", "add", "{path}"),
     "{path}: not valid JSON (nested too deeply)"),
    ("contract.yaml", "constraints: " + DEEP, ("contract", "add", "{path}"),
     "{path}: not valid YAML (nested too deeply)"),
    ("decision.json", DEEP, ("simulate", "--domain", "hvac:office3", "--out", "{path}.out", "--decision", "{path}"),
     "decision file {path} is not readable JSON (maximum recursion depth exceeded while decoding a JSON array from a unicode "
     "string); write a list of 3 numbers"),
])  # fmt: skip
def test_deeply_nested_inputs_are_one_line(tmp_path: Path, name: str, text: str, args: tuple[str, ...], error: str):
    """JSON or YAML nested 100 000 deep, given to `scf optimize`, `scf contract add` and `scf simulate` (real
    processes): a RecursionError traceback before, one line now; refused before anything
    connects to NATS."""
    path = tmp_path / name
    path.write_text(text)
    r = scf(tmp_path, *(a.format(path=path) for a in args))
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert r.stderr.strip().splitlines() == ["Error: " + error.format(path=path)], r.stderr


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-1"])
def test_a_contract_schedule_that_is_not_a_finite_number_is_refused(tmp_path: Path, value: str):
    """Python's JSON reader takes NaN and Infinity; such a schedule went on the log as null,
    and every reader then skipped the contract (or its update) without a word."""
    path = tmp_path / "c.json"
    path.write_text('{"contract_id": "n", "client": "X", "domain": "hvac:office3", "nodes": ["edge-a"], '
                    '"constraints": {"T_out": 9}, "schedule_s": ' + value + "}")
    r = scf(tmp_path, "contract", "add", str(path))
    shown = {"NaN": "nan", "Infinity": "inf", "-1": "-1.0"}[value]
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert r.stderr.strip().splitlines() == [
        f"Error: $.schedule_s = {shown}: seconds between strikes, a finite number, 0 or more"], r.stderr
