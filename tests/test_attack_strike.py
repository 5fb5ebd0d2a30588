"""`scf strike` and `scf contract add` on hostile input (the sweep of the newest surfaces): a
constraints or contract "file" that is a FIFO (opening it waited for a writer forever), a
device, a directory, a sparse 2 GiB file, bytes that are not UTF-8, JSON nested 100 000 deep,
NaN; contract ids and node lists an attacker writes. Each real process must stop with one
`Error:` line naming the problem and exit 1, never hang, never print a traceback. A real
nats-server (the `bus` fixture)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.conftest import scf
from tests.test_deploy_helpers import Keys

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]


def hostile_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name → (the --constraints path, what its one line must say)."""
    fifo = tmp / "fifo.json"
    os.mkfifo(fifo)
    sparse = tmp / "sparse.json"
    with sparse.open("wb") as f:
        f.truncate(2 << 30)
    (tmp / "dir.json").mkdir()
    (tmp / "latin1.json").write_bytes(b'{"T_out": 9.0, "name": "caf\xe9"}')
    (tmp / "deep.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    (tmp / "nan.json").write_text('{"T_out": NaN, "preheat_hours": Infinity}')
    (tmp / "list.json").write_text("[1, 2]")
    return {
        "fifo": (fifo, "not a regular file"),
        "device": (Path("/dev/zero"), "not a regular file"),
        "directory": (tmp / "dir.json", "not a regular file"),
        "missing": (tmp / "nowhere.json", "cannot read it (No such file or directory)"),
        "2 GiB": (sparse, "is more than a constraints file may be"),
        "latin-1": (tmp / "latin1.json", "not a readable JSON file ('utf-8' codec can't decode"),
        "deep": (tmp / "deep.json", "not a readable JSON file (nested too deeply)"),
        "nan": (tmp / "nan.json", "not a finite number"),
        "list": (tmp / "list.json", "Expected `object`, got `array` - at `$.constraints`"),
    }


async def test_hostile_constraints_files_are_one_line_each(bus, settings, scf_env, tmp_path):
    Keys(settings).release.save(settings.keys_dir)
    for name, (path, expected) in hostile_files(tmp_path).items():
        r = await asyncio.to_thread(scf, "strike", "--domain", "hvac:office3", "--constraints", str(path), "--nodes", "edge-a",
                                    "--measure", "none", "--wait", "1", env=scf_env, timeout=60)
        assert r.returncode == 1, f"{name}: {r.stdout}{r.stderr}"
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], f"{name}: {r.stderr[-1500:]}"
        assert "Traceback" not in r.stderr + r.stdout


@pytest.mark.slow  # eleven `scf strike` processes one after another: 9 s of CPU
async def test_hostile_contract_ids_and_node_lists_are_one_line_each(bus, settings, scf_env, tmp_path):
    Keys(settings).release.save(settings.keys_dir)
    for contract in (">", "contract.*", "é" * 5000, "../../etc/passwd", " "):
        r = await asyncio.to_thread(scf, "strike", "--contract", contract, "--wait", "1", env=scf_env, timeout=60)
        assert r.returncode == 1 and r.stderr.startswith("Error: no contract "), f"{contract[:20]!r}: {r.stderr[-1500:]}"
        assert len(r.stderr.strip().splitlines()) == 1 and len(r.stderr) < 12_000
    good = tmp_path / "c.json"
    good.write_text('{"T_out": 9.0, "preheat_hours": 3}')
    for nodes in ("edge-a,>,*", "../x", "a" * 300):
        r = await asyncio.to_thread(scf, "strike", "--domain", "hvac:office3", "--constraints", str(good), "--nodes", nodes,
                                    "--measure", "none", "--wait", "1", env=scf_env, timeout=60)
        assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout, f"{nodes!r}: {r.stdout}{r.stderr[-1500:]}"
        assert r.stderr.startswith("Error: ") and len(r.stderr.strip().splitlines()) == 1, f"{nodes!r}: {r.stdout}{r.stderr[-1500:]}"
    for wait in ("nan", "-1", "inf"):
        r = await asyncio.to_thread(scf, "strike", "--domain", "hvac:office3", "--constraints", str(good), "--nodes", "edge-a",
                                    "--measure", "none", "--wait", wait, env=scf_env, timeout=60)
        assert r.returncode != 0 and "Traceback" not in r.stderr + r.stdout, f"--wait {wait}: {r.stdout}{r.stderr[-1500:]}"
        assert "--wait" in r.stderr, f"--wait {wait}: {r.stdout}{r.stderr[-1500:]}"


async def test_scf_contract_add_refuses_a_fifo_a_device_and_a_directory_in_one_line(bus, scf_env, tmp_path):
    fifo = tmp_path / "contract.json"
    os.mkfifo(fifo)
    (tmp_path / "dir.yaml").mkdir()
    for path, expected in ((fifo, "cannot read it (a FIFO or socket, not a file: give the file itself)"),
                           (Path("/dev/zero"), "is more than a contract file may be"),
                           (tmp_path / "dir.yaml", "cannot read it (")):
        r = await asyncio.to_thread(scf, "contract", "add", str(path), env=scf_env, timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"Error: {path}") and expected in lines[0], \
            f"{path}: {r.stdout}{r.stderr[-1500:]}"
