"""The wheel installs one import name, `scf`, with the data files the code reads at run time."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_installs_only_scf_with_its_data(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
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
