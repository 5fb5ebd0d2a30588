"""`scf proof verify` on files an attacker hands the auditor.

The tester's attack: `scf proof verify` read the proof, `--entry` and a `--key` file whole,
with `read_bytes`/`read_text`: a FIFO as any of them hung the verifier for ever (opening it
waits for a writer), a sparse 10 GB file or `/dev/zero` was read into memory. Now each is read
through `bus/files.read_bounded` (cli/proof.py `read_input`): FIFOs, sockets and directories
refused unread, a proof or event over 64 MiB and a key file over 64 KiB refused by size —
one `Error:` line naming the file, exit 1. Real `scf proof verify` processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

FIFO = "cannot read it (a FIFO or socket, not a file: give the file itself)"


def verify(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SCF_HOME": str(tmp_path / "home")}
    env.pop("NATS_URL", None)
    # a hang is the failure this test catches: the timeout turns it into an error
    return subprocess.run([sys.executable, "-m", "scf.cli.main", "proof", "verify", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_hostile_proof_entry_and_key_files_are_one_line_each(tmp_path: Path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    giant = sparse(tmp_path / "giant.json", 10 << 30)
    proof = tmp_path / "proof.json"
    proof.write_text("{}")
    cases = [
        ((str(fifo), "--key", "k"), f"Error: {fifo}: {FIFO}"),
        ((str(giant), "--key", "k"),
         f"Error: {giant}: {10 << 30:,} bytes is more than a proof may be ({64 << 20:,} bytes); check that this is the right file"),
        (("/dev/zero", "--key", "k"),
         f"Error: /dev/zero: {(64 << 20) + 1:,} bytes is more than a proof may be ({64 << 20:,} bytes); check that this is the right file"),
        ((str(proof), "--key", str(fifo)), f"Error: {fifo}: {FIFO}"),
        ((str(proof), "--key", str(sparse(tmp_path / "key", 1 << 30))),
         f"Error: {tmp_path / 'key'}: {1 << 30:,} bytes is more than a verifier key file may be ({64 << 10:,} bytes); "
         "check that this is the right file"),
        ((str(proof), "--key", "k", "--entry", str(fifo)), f"Error: {fifo}: {FIFO}"),
        ((str(proof), "--key", "k", "--entry", str(tmp_path)), f"Error: {tmp_path}: cannot read it (Is a directory)"),
    ]
    for args, line in cases:
        r = verify(tmp_path, *args)
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [line], (args, r.stdout, r.stderr[-2000:])
