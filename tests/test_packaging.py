"""The wheel installs one import name, `scf`, with the data files the code reads at run time."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("bus", "cli", "consumers", "domains", "ml", "ops", "producers", "projections")


def source_files() -> list[str]:
    """The files git would ship: tracked, and untracked but not ignored."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [f for f in out.stdout.splitlines() if (ROOT / f).is_file()]


def test_the_wheel_installs_only_scf_with_its_data(tmp_path):
    # build from a clean copy: a `build/` left in the checkout would otherwise ship stale modules
    src = tmp_path / "src"
    for f in source_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("scf-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert z.read(info).decode().split() == ["scf"]
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"scf"}
    for needed in ("scf/bus/client.py", "scf/bus/artifacts/store.py", "scf/cli/main.py", "scf/projections/views/events.sql",
                   "scf/domains/data/case14.m", "scf/consumers/rules/default.toml"):  # fmt: skip
        assert needed in names, needed
    assert not any(n.startswith("scf/tests/") or "/__pycache__/" in n for n in names)
    # every module of the source folders ships (a subpackage missing from pyproject's list
    # fails here), and nothing else does
    shipped = {n.removeprefix("scf/") for n in names if n.endswith(".py")}
    expected = {f for f in source_files() if f.endswith(".py") and f.split("/", 1)[0] in PACKAGE_DIRS}
    assert shipped == expected, (sorted(expected - shipped), sorted(shipped - expected))
