"""`scf optimize --method learned` end to end: a small learned optimiser trained on
synthesised fossils (scf.ml.optimize), its proposals certified, `--max-gap` honoured on
every decision through the exact fallback."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from scf import domains
from scf.producers import optimize as opt
from tests.conftest import cli

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def checkpoint(case14_optimiser_2000):
    """case14's learned optimiser trained on 2000 fossils, once for the run (conftest;
    test_learned_opt judges its decisions)."""
    [path] = (case14_optimiser_2000 / "zoo").glob("*.safetensors")
    return path


def _specs(n: int) -> list[dict]:
    d = domains.get("grid:case14")
    rng = np.random.default_rng(21)
    return [{"context": list(d.sample_context(rng))} for _ in range(n)]


@pytest.mark.slow
def test_learned_decisions_are_certified_and_honour_max_gap(checkpoint, tmp_path):
    batch = tmp_path / "contexts.jsonl"
    batch.write_text("".join(json.dumps(s) + "\n" for s in _specs(40)))
    out = tmp_path / "decisions.parquet"
    env = {"SCF_HOME": str(tmp_path / "home"), "PATH": os.environ.get("PATH", "")}
    r = cli("optimize", "--domain", "grid:case14", "--method", "learned", "--checkpoint", str(checkpoint),
            "--batch", str(batch), "--out", str(out), "--max-gap", "0.001", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    table = pq.read_table(out).to_pylist()
    assert [row["status"] for row in table] == ["optimal"] * 40
    assert all(row["rel_gap"] <= 0.001 and row["method"] == "learned" and row["model_id"] for row in table)
    rate = sum(row["fallback"] for row in table) / 40
    assert r.stdout.strip().startswith(f"40 decisions: 40 optimal, 0 uncertified, 0 infeasible; fallback rate {rate:.1%}")


def test_learned_certificates_are_valid_bounds_on_the_true_optimum(checkpoint):
    d = domains.get("grid:case14")
    problems = [opt.problem(d, s) for s in _specs(30)]
    decisions = opt.optimize(problems, method="learned", checkpoint=checkpoint)
    for p, dec in zip(problems, decisions):
        assert dec.status == "optimal" and not dec.fallback, dec.message
        optimum = d.cost(p.context, d.reference_solution(p.context))
        assert dec.certificate.lower_bound <= optimum + 1e-7 * optimum  # weak duality, checked against HiGHS
        assert dec.cost >= optimum - 1e-7 * optimum
        assert opt.check_certificate(p, dec.state, dec.certificate) is None
