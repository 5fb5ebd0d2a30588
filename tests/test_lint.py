"""`make lint`'s guard rails fail on a planted violation of each contract.

Each test plants one small module in the real tree (a unique name, removed afterwards) and
runs the real tools with the project's own configuration."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@contextlib.contextmanager
def planted(folder: str, source: str) -> Iterator[Path]:
    path = ROOT / folder / f"_planted_{uuid.uuid4().hex[:8]}.py"
    path.write_text(source)
    try:
        yield path
    finally:
        path.unlink()


def ruff(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "ruff", "check", "--no-cache", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120)


def lint_imports() -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "lint-imports", "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "folder, source, rule",
    [
        ("ops", "from bus.events import Event\n\nprint(Event)\n", "TID251"),  # an old import name
        ("consumers", "import torch\n\nprint(torch)\n", "TID253"),  # torch at module level outside ml/
        ("cli", "def f():\n    try:\n        return 1\n    except Exception:\n        return 0\n", "BLE001"),  # a broad except with no reason
    ],
)
def test_ruff_refuses_each_planted_violation(folder, source, rule):
    with planted(folder, source) as path:
        result = ruff(path)
    assert result.returncode == 1 and rule in result.stdout, result.stdout


def test_the_tree_passes_ruff():
    result = subprocess.run([BIN / "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.parametrize(
    "folder, source, contract",
    [
        ("bus", "from scf.consumers import ledger\n", "bus imports no other SCF package BROKEN"),
        ("projections", "def f():\n    from scf.ml import ebdm\n    return ebdm\n", "never import ml or torch BROKEN"),
        ("consumers", "def f():\n    import torch\n    return torch\n", "torch only in ml/"),
    ],
)
def test_the_layer_contract_breaks_on_each_planted_import(folder, source, contract):
    assert lint_imports().returncode == 0  # the tree as it is keeps every contract
    with planted(folder, source):
        result = lint_imports()
    assert result.returncode == 1 and contract in result.stdout, result.stdout[-2000:]
