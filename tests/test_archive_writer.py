"""The archive's writer: a child forked per batch (`[archive] writer = "process"`; "auto",
the default, on Linux) writes the same files as the writer thread, and a child that dies is a failed write
that loses nothing and writes nothing twice."""

from __future__ import annotations

import datetime as dt
import os

import msgspec
import pytest

from scf.bus import codec
from scf.bus import events as ev
from scf.bus.client import Bus
from scf.projections.archive import ArchiveSettings, StreamFollower
from scf.projections.store import ArchiveStore, ArchiveWriteFailed


class Msg:
    """What the follower keeps of a delivered message."""

    __slots__ = ("subject", "data", "headers", "reply")

    def __init__(self, subject: str, data: bytes, headers: dict | None, reply: str) -> None:
        self.subject, self.data, self.headers, self.reply = subject, data, headers, reply


def batch(n: int, first: int = 1) -> list[Msg]:
    out = []
    for i in range(first, first + n):
        c = ev.FossilContent(domain="grid:case14", context=[float(i)], state=[1.0], energy=float(i),
                             observed_at=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(hours=i),
                             provenance=ev.Provenance(source="test", verifier="v", verified=True))
        e = ev.FossilRecorded.new(ev.Fossil(**msgspec.structs.asdict(c), fossil_id=ev.fossil_content_id(c)), source="test")
        ts = 1_764_633_600_000_000_000 + i * 3_600_000_000_000  # one a hour: a batch spans dates
        out.append(Msg(e.subject(), codec.encode(e), Bus.headers(e), f"$JS.ACK.FOSSILS.arc.1.{i}.{i}.{ts}.{first + n - 1 - i}"))
    return out


def follower(root, writer: str) -> StreamFollower:
    store = ArchiveStore(root)
    store.ensure()
    return StreamFollower(None, store, "FOSSILS", 1, ArchiveSettings(writer=writer))  # type: ignore[arg-type]


def test_the_forked_writer_writes_what_the_thread_writes(tmp_path):
    msgs = batch(60)
    forked, threaded = follower(tmp_path / "p", "process"), follower(tmp_path / "t", "thread")
    assert forked.forked and not threaded.forked
    written_p, n_p, gap_p = forked._write_forked(msgs)
    written_t, n_t, gap_t = threaded._write(msgs)
    assert (n_p, gap_p) == (n_t, gap_t) == (60, False)
    assert [(f.first, f.last, f.date, f.path.name) for f in written_p] == [(f.first, f.last, f.date, f.path.name) for f in written_t]
    assert len(written_p) == 3  # one file per date: 60 hours from 2025-12-02 01:00
    assert (forked._last_seq, forked._last_dseq) == (threaded._last_seq, threaded._last_dseq) == (60, 60)
    assert forked.store.read("FOSSILS").equals(threaded.store.read("FOSSILS"))
    # the next batch continues from the positions the child reported
    assert forked._write_forked(batch(10, first=61))[1] == 10 and forked.store.position("FOSSILS") == 70


def test_a_writer_that_dies_after_writing_is_a_failed_write_and_nothing_is_written_twice(tmp_path, monkeypatch):
    f = follower(tmp_path, "process")
    msgs = batch(30)
    real = StreamFollower._child_write

    def write_then_die(self, b):  # runs in the child: the files are durable, the report never comes
        real(self, b)
        os._exit(3)

    monkeypatch.setattr(StreamFollower, "_child_write", write_then_die)
    with pytest.raises(ArchiveWriteFailed, match="without a report") as failed:
        f._write_forked(msgs)
    assert "exit 3" in str(failed.value.cause)
    assert f.store.position("FOSSILS") == 30 and f._last_seq == 30  # the position is what is on disk
    files = f.store.files("FOSSILS")
    monkeypatch.setattr(StreamFollower, "_child_write", real)
    written, n, gap = f._write_forked(msgs)  # the retry of the same batch
    assert (written, n, gap) == ([], 0, False) and f.store.files("FOSSILS") == files
    assert f.store.read("FOSSILS").column("seq").to_pylist() == list(range(1, 31))


def test_a_failure_in_the_child_is_the_same_error_here(tmp_path, monkeypatch):
    f = follower(tmp_path, "process")

    def refuse(self, stream, table):  # runs in the child
        raise ArchiveWriteFailed(self.root / "x.parquet", OSError(27, "File too large"))

    monkeypatch.setattr(ArchiveStore, "append", refuse)
    with pytest.raises(ArchiveWriteFailed) as failed:
        f._write_forked(batch(5))
    assert failed.value.reason == "File too large" and failed.value.written == []
    assert f._last_seq == 0


def test_an_unknown_writer_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="writer = 'gpu': use one of auto, process, thread"):
        ArchiveSettings(writer="gpu")


def test_a_forked_writer_dies_with_the_archive_process(tmp_path):
    """A child forked by a process that is then SIGKILLed is killed too (an orphan writer
    would hold the stream's write lock against the restarted archive)."""
    import signal
    import subprocess
    import sys
    import time

    # the parent and its forked child only have to stay alive until the parent is SIGKILLed (the
    # 120 s sleeps are never waited out: the test kills the parent at once, the child dies with it)
    code = (
        "import os, sys, time\n"
        "from scf.projections.archive import _die_with\n"
        "parent = os.getpid()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    _die_with(parent)\n"
        "    time.sleep(120)\n"
        "    os._exit(0)\n"
        "print(pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    def alive() -> bool:
        try:
            state = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        return state not in ("Z", "X")

    deadline = time.monotonic() + 30
    while alive() and time.monotonic() < deadline:  # the kill is asynchronous: wait for it, bounded
        time.sleep(0.05)  # the polling interval of the awaited condition above
    assert not alive(), f"the forked writer {child} outlived its archive process"


def test_auto_forks_the_writer_on_linux_only(tmp_path):
    """`[archive] writer = "auto"` forks on Linux and writes in a thread
    elsewhere: on macOS a fork without exec in a process with threads (the event loop's
    executor, DuckDB's, pyarrow's) may crash or hang in the child. An explicit choice is
    honoured on every platform."""
    import sys

    from scf.projections.archive import forks_writer

    assert ArchiveSettings().writer == "thread"  # the default: the forked writer measured no faster
    assert forks_writer("auto", "linux") and not forks_writer("auto", "darwin") and not forks_writer("auto", "win32")
    assert forks_writer("process", "darwin") and not forks_writer("thread", "linux")
    assert follower(tmp_path, "auto").forked == forks_writer("auto", sys.platform)


def test_a_forked_writer_does_not_wait_for_another_streams_child(tmp_path, monkeypatch):
    """Two streams' writers fork from two threads of the archive process. A child forked
    while another writer's pipe is open in the parent would hold that pipe's write end, and
    that writer would wait for the other child to end (a hung child: 300 s) before it saw
    its own report. Here stream B forks as soon as A has forked (os.fork wrapped so that A's
    thread lets it) and B's child is held back: A still finishes."""
    import threading

    a, b = follower(tmp_path / "a", "process"), follower(tmp_path / "b", "process")
    gate_r, gate_w = os.pipe()
    write_b = b._child_write

    def held_back(batch):  # in B's child: wait for the gate, then write
        os.read(gate_r, 1)
        return write_b(batch)

    b._child_write = held_back  # type: ignore[method-assign]
    real_fork, a_forked, b_forked = os.fork, threading.Event(), threading.Event()

    def fork() -> int:
        pid = real_fork()
        if pid and threading.current_thread().name == "A":
            a_forked.set()
            b_forked.wait(2)  # B may fork now, A's pipe still open here (an absence when it cannot: bounded)
        elif pid:
            b_forked.set()
        return pid

    monkeypatch.setattr(os, "fork", fork)
    results: dict[str, tuple] = {}
    ta = threading.Thread(name="A", target=lambda: results.setdefault("a", a._write_forked(batch(10))))
    tb = threading.Thread(name="B", target=lambda: (a_forked.wait(30), results.setdefault("b", b._write_forked(batch(10)))))
    tb.start()
    ta.start()
    try:
        ta.join(60)  # a hang fails here (the bound is not a speed goal)
        assert not ta.is_alive() and tb.is_alive(), "stream A's write waited for stream B's child"
        assert results["a"][1] == 10
    finally:
        os.write(gate_w, b"x")
        ta.join(60)
        tb.join(60)
        os.close(gate_r)
        os.close(gate_w)
    assert results["b"][1] == 10 and b.store.position("FOSSILS") == 10
