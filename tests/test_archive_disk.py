"""`scf run archive` on a full disk (issue 10, defect 9): it keeps running, says so in one
line at most every few seconds, retries, loses nothing once there is room again, and
leaves no temporary file behind (stale ones from an earlier crash are removed at start).

Two real ways to make writes fail, each a parameter:
- `tmpfs`: a 4 MiB tmpfs mounted as the archive directory and filled up (ENOSPC); needs
  root and a sandbox that allows mounts, skipped otherwise;
- `fsize`: RLIMIT_FSIZE set on the archive process (EFBIG beyond 64 KiB per file), lifted
  with prlimit(2) to free the "disk"; runs anywhere.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scf.projections.store import ArchiveStore
from tests.conftest import ROOT, wait_for

pytestmark = pytest.mark.anyio

LIMIT = 64 * 1024
MESSAGES = 300


def _mount_tmpfs(path) -> bool:
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _fill(path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 16, 1 << 12, 1):  # big writes, then the last pages
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


def _limit_file_size() -> None:  # runs in the child before exec
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.RLIM_INFINITY))


def _temporary(root) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and (p.name.endswith(".tmp") or ".tmp." in p.name)]


def _status_times(text: str) -> list[dt.datetime]:
    return [
        dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
        for m in re.finditer(r"^(\S+ \S+) WARNING scf\.archive: archive cannot write", text, re.M)
    ]


async def _wait_logged(predicate, log, what: str, proc=None) -> None:
    def done() -> bool:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the archive exited with code {proc.returncode}")
        return predicate()

    try:
        await wait_for(done, 60, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the archive's log ends with:\n{log.read_text()[-3000:]}") from None


@pytest.mark.parametrize("how, writer", [("tmpfs", "process"), ("fsize", "process"), ("fsize", "thread")])
async def test_archive_waits_on_a_full_disk_and_loses_nothing(how, writer, bus, scf_env, settings, tmp_path):
    """`writer`: every batch written by a forked child (`fork_min_rows = 1`: the limit lifted
    on the archive's pid holds for the next child), or by the writer thread."""
    root = tmp_path / "archive"
    root.mkdir()
    (Path(settings.home) / "scf.toml").write_text(f'[archive]\nwriter = "{writer}"\nfork_min_rows = 1\n')
    mounted = False
    if how == "tmpfs":
        mounted = _mount_tmpfs(root)
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (needs root and a sandbox that allows mounts); the fsize case still runs")
    proc = None
    try:
        # What a crash on a full disk left behind last time.
        stale = [
            root / ".scf.duckdb.deadbeef.tmp",
            root / ".scf.duckdb.deadbeef.tmp.wal",
            root / "stream=CONTROL" / "date=2026-01-01" / ".CONTROL-000000000001-000000000009.parquet.0badf00d.tmp",
        ]
        for p in stale:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x")
        filler = root / "filler"
        if how == "tmpfs":
            _fill(filler)

        # Incompressible bodies: any file of these rows is larger than what is left.
        for i in range(MESSAGES):
            await bus.js.publish(f"control.noise.{i}", b'{"noise": "%s"}' % os.urandom(1000).hex().encode())
        last = (await bus.js.stream_info("CONTROL")).state.last_seq

        log = tmp_path / "archive.log"
        env = dict(scf_env, SCF_LOG="warning")
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "scf.cli.main", "run", "archive", "--archive", str(root), "--stream", "CONTROL"],
                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                preexec_fn=_limit_file_size if how == "fsize" else None,
            )
        await _wait_logged(lambda: "archiving from CONTROL seq 1" in log.read_text(), log, "the archive to start", proc)
        assert not any(p.exists() for p in stale), "stale temporary files survived the start"

        # It cannot write: it says so (one line, no traceback), keeps running and retries.
        await _wait_logged(lambda: len(_status_times(log.read_text())) >= 2, log, "two status lines of the failed writes", proc)
        text = log.read_text()
        assert proc.poll() is None, text
        assert "Traceback" not in text, text
        reason = "No space left on device" if how == "tmpfs" else "File too large"
        assert reason in text
        times = _status_times(text)
        assert all((b - a).total_seconds() >= 4.9 for a, b in zip(times, times[1:])), "status logged more often than every 5 s"
        assert ArchiveStore(root).position("CONTROL") == 0

        # Room again: everything is archived, in order, once.
        if how == "tmpfs":
            filler.unlink()
        else:
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        store = ArchiveStore(root)
        await _wait_logged(lambda: store.position("CONTROL") == last, log, "the archive to catch up once there is room", proc)
        assert store.read("CONTROL").column("seq").to_pylist() == list(range(1, last + 1))
        await _wait_logged(lambda: store.database_path.exists(), log, "the views database written once there is room", proc)
        assert "archive writes CONTROL again" in log.read_text()

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
        proc = None
        text = log.read_text()
        assert "Traceback" not in text, text
        assert _temporary(root) == [], "temporary files left behind after failed writes"
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if mounted:
            subprocess.run(["umount", "-l", str(root)], capture_output=True)
