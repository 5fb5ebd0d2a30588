"""The archive against a real nats-server, real Parquet and real DuckDB: it equals the
streams, survives SIGKILL without duplicates or gaps, rebuilds to identical rows, compacts
without changing a row, and its DuckDB file opens without any project code."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import random
import shutil
import signal
import subprocess
import sys

import msgspec
import pytest

from scf.bus import codec
from scf.bus import events as ev
from scf.bus.client import MSG_ID, SCF_TYPE
from scf.projections import archive, sample, views
from scf.projections.store import ARCHIVED_STREAMS, ArchiveStore, file_name
from tests.conftest import cli, spawn, wait_for
from tests.test_archive_helpers import archived_all, read_stream, with_archive, write_toml

pytestmark = pytest.mark.anyio
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


async def _archive_once(settings, stop_when) -> list[archive.StreamStats]:
    """Run the archive process in-process until `stop_when()` holds."""
    stop = asyncio.Event()
    task = asyncio.create_task(archive.run_archive(settings, stop=stop))
    try:
        await wait_for(stop_when, 30, "the archive to catch up")
    finally:
        stop.set()
    return await task


async def test_archive_equals_stream(bus, settings):
    """A few thousand mixed events (and plain control commands): every message is in `events`
    exactly once, with the right columns."""
    settings = with_archive(settings, flush_rows=100, flush_seconds=0.3)
    items = list(sample.history(cycles=260, seed=3))
    await sample.publish(bus, items)
    # Plain messages the catalog does not know: an unknown verb, malformed JSON, binary.
    await bus.js.publish("control.warp", b'{"factor": 9}')
    await bus.js.publish("control.stop", b"{not json")
    await bus.js.publish("control.resume", b"\xff\xfe")
    store = ArchiveStore(settings.archive_dir)
    stats = await _archive_once(settings, lambda: archived_all(bus, store))
    assert sum(s.files for s in stats) > len(ARCHIVED_STREAMS)  # several files per big stream

    con = views.connect(store.root)
    total = 0
    for stream in ARCHIVED_STREAMS:
        stored = await read_stream(bus, stream)
        total += len(stored)
        rows = views.rows(con.sql(f"SELECT * FROM events WHERE stream = '{stream}' ORDER BY seq"))
        assert [r["seq"] for r in rows] == [m.seq for m in stored], stream
        for m, r in zip(stored, rows):
            assert r["subject"] == m.subject
            assert r["published_at"] == EPOCH + dt.timedelta(microseconds=m.ts_ns // 1000)
            assert (json.loads(r["headers"]) if r["headers"] else None) == (m.headers or None)
            try:
                w = msgspec.json.decode(m.data, type=codec.Wire)  # the bus's envelope
            except (msgspec.DecodeError, msgspec.ValidationError):
                w = None
            if w is None:  # a plain message: kept whole, typed envelope columns null
                assert r["type"] == m.subject
                assert r["event_id"] is None and r["event_at"] is None and r["v"] is None and r["source"] is None
                body = m.data.strip()
                if not body:
                    assert r["payload"] == "null"
                else:
                    try:
                        assert json.loads(r["payload"]) == json.loads(m.data)
                    except ValueError:
                        assert json.loads(r["payload"]) == m.data.decode("utf-8", errors="replace")
                continue
            assert r["type"] == w.type
            assert r["event_id"] == w.id
            assert r["v"] == w.v
            assert r["event_at"] == dt.datetime.fromisoformat(w.at.replace("Z", "+00:00"))
            assert r["source"] == w.source
            assert r["correlation_id"] == w.correlation_id
            assert r["causation_id"] == w.causation_id
            assert r["kid"] == w.kid
            assert r["signed"] == (w.sig is not None)
            assert r["payload"].encode() == bytes(w.data)  # the payload, byte for byte
    assert total > 3000
    n = con.sql("SELECT count(*) FROM events").fetchall()[0][0]
    assert n == total
    # The archive never dead-letters: the plain messages are rows, the DLQ holds only the sample's.
    dlq = con.sql("SELECT count(*) FROM events WHERE stream = 'DLQ'").fetchall()[0][0]
    assert dlq == len([i for i in items if not isinstance(i, sample.Plain) and i.type_name() == "dlq.message"])
    warp = views.rows(con.sql("SELECT type, payload, event_id FROM events WHERE subject = 'control.warp'"))
    assert warp == [{"type": "control.warp", "payload": '{"factor": 9}', "event_id": None}]


# seven `scf run archive` processes, six of them SIGKILLed: 11-16 s of CPU each (issue 16's profile)
@pytest.mark.slow
@pytest.mark.parametrize("writer", ["process", "thread"])
async def test_archive_process_survives_sigkill_without_duplicates_or_gaps(writer, bus, settings, scf_env, tmp_path):
    """`scf run archive` (a real process) killed with SIGKILL at random points while events
    flow, restarted each time: the archive holds every message of every stream once. With
    the forked writer (every batch), a kill can fall while a child writes: the child dies
    with the process and the restart is not refused the stream's lock."""
    rng = random.Random(20261122)
    # (forked: a child per batch of 150, at most five a second: the kills fall among them)
    write_toml(settings, flush_rows=150, flush_seconds=0.05 if writer == "thread" else 0.2, auto_compact_files=8,
               compact_rows=2000, writer=writer, fork_min_rows=1)
    items = list(sample.history(cycles=320, seed=9))
    chunks = [items[i : i + 60] for i in range(0, len(items), 60)]
    log = tmp_path / "archive.log"
    argv = [sys.executable, "-m", "scf.cli.main", "run", "archive"]

    def starts() -> int:
        return log.read_text().count("archiving from") if log.exists() else 0

    store = ArchiveStore(settings.archive_dir)

    def position() -> int:
        return sum(store.position(s) for s in store.streams())

    progress: list[int] = []
    kills = 0
    proc = spawn(argv, scf_env, log)
    try:
        while kills < 6:
            # Events flow (two chunks a round, the rest afterwards); the process is killed
            # while it archives them: once it started and wrote something new, at a random
            # point after that (a load-independent schedule: it does not depend on how fast
            # the publishing or the start-up is).
            for chunk in chunks[2 * kills : 2 * kills + 2]:
                await sample.publish(bus, chunk)
            await wait_for(lambda: starts() > kills, 30, "the archive process to start")
            last = progress[-1] if progress else 0
            await wait_for(lambda: position() > last, 30, "the archive to write something new")
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            progress.append(position())
            proc = spawn(argv, scf_env, log)
        for chunk in chunks[12:]:
            await sample.publish(bus, chunk)
        await wait_for(lambda: archived_all(bus, store), 60, "the restarted archive to catch up")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert kills >= 6
    # The kills fell while messages were being archived, not only at start-up.
    assert len(set(progress)) >= 4, progress

    con = views.connect(store.root)
    for stream in ARCHIVED_STREAMS:
        stored = [m.seq for m in await read_stream(bus, stream)]
        rows = [r[0] for r in con.sql(f"SELECT seq FROM events WHERE stream = '{stream}' ORDER BY seq").fetchall()]
        assert rows == stored, f"{stream}: archive differs from the stream"
        # No leftovers of the kills: no temporary files, no half-written swap.
        for part in store.stream_dir(stream).glob("date=*") if store.stream_dir(stream).exists() else []:
            assert not list(part.glob(".*.tmp"))
    assert not list((store.root / ".journal").glob("*.json"))
    assert "Traceback" not in log.read_text()


async def test_replay_rebuild_reproduces_the_same_rows(bus, settings, scf_env, tmp_path):
    """Rebuild from sequence 1 (in place, and into a fresh directory), and from a sequence
    in the middle: the content hash of the rows does not change; file boundaries may."""
    write_toml(settings, flush_rows=97, flush_seconds=0.05)
    await sample.publish(bus, sample.history(cycles=150, seed=5))
    store = ArchiveStore(settings.archive_dir)
    live = with_archive(settings, flush_rows=97, flush_seconds=0.05)
    await _archive_once(live, lambda: archived_all(bus, store))
    before = store.content_hash()
    files_before = len(store.all_files())

    r = await asyncio.to_thread(cli, "replay", "--rebuild", env=scf_env)
    assert r.returncode == 0, r.stderr
    assert "FOSSILS: rebuilt from seq 1" in r.stdout
    assert store.content_hash() == before
    assert len(store.all_files()) < files_before  # larger files, same rows

    other = tmp_path / "copy"
    r = await asyncio.to_thread(cli, "replay", "--archive", str(other), env=scf_env)
    assert r.returncode == 0, r.stderr
    assert ArchiveStore(other).content_hash() == before

    mid = store.position("INTENTS") // 2
    r = await asyncio.to_thread(cli, "replay", "--stream", "INTENTS", "--from-seq", str(mid), env=scf_env)
    assert r.returncode == 0, r.stderr
    assert f"INTENTS: rebuilt from seq {mid}" in r.stdout
    assert store.content_hash() == before
    assert ArchiveStore(other).content_hash(["INTENTS"]) == store.content_hash(["INTENTS"])

    r = await asyncio.to_thread(cli, "replay", "--from-seq", "3", env=scf_env)
    assert r.returncode == 1
    assert r.stderr.strip() == "Error: --from-seq needs --stream: sequences are per stream"


async def test_rebuild_refuses_to_drop_rows_the_stream_lost(bus, settings, scf_env):
    store = ArchiveStore(settings.archive_dir)
    await sample.publish(bus, sample.history(cycles=30, seed=2))
    await archive.replay(settings)
    before = store.content_hash(["FOSSILS"])
    await bus.js.delete_msg("FOSSILS", 3)
    r = await asyncio.to_thread(cli, "replay", "--stream", "FOSSILS", "--rebuild", env=scf_env)
    assert r.returncode == 1
    n = store.position("FOSSILS")
    assert r.stderr.strip() == (
        f"Error: stream FOSSILS now holds {n - 1} messages from seq 1 but the archive has {n}: the stream lost "
        "messages (max_age, deletes) that only the archive keeps; the archive is unchanged "
        "(pass --force to rebuild anyway and drop them)"
    )
    assert store.content_hash(["FOSSILS"]) == before
    r = await asyncio.to_thread(cli, "replay", "--stream", "FOSSILS", "--rebuild", "--force", env=scf_env)
    assert r.returncode == 0, r.stderr
    assert "dropped 1 rows the stream no longer holds" in r.stdout


async def test_compaction_merges_files_without_changing_a_row(tmp_path, scf_env):
    store = ArchiveStore(tmp_path / "archive")
    items = list(sample.history(cycles=80, seed=4))
    sample.write_archive(store, items, batch=25)
    before = store.content_hash()
    n_before = len(store.files("FOSSILS"))
    r = await asyncio.to_thread(cli, "archive", "compact", "--archive", str(store.root), "--target-rows", "200", env=scf_env)
    assert r.returncode == 0, r.stderr
    assert "FOSSILS: merged" in r.stdout
    assert store.content_hash() == before
    files = store.files("FOSSILS")
    assert len(files) < n_before
    # Files still tile the sequence space: contiguous, no overlap.
    for a, b in zip(files, files[1:]):
        assert b.first == a.last + 1
    # A second run has nothing left to merge.
    r = await asyncio.to_thread(cli, "archive", "compact", "--archive", str(store.root), "--target-rows", "200", env=scf_env)
    assert "merged" not in r.stdout


async def test_an_interrupted_swap_is_rolled_forward(tmp_path):
    """A crash between the journal and the end of a swap (compaction, rebuild): the next
    recovery finishes it, and no row is lost or doubled."""
    store = ArchiveStore(tmp_path / "archive")
    sample.write_archive(store, sample.history(cycles=40, seed=8), batch=20)
    before = store.content_hash()
    files = store.files("INTENTS")[:3]
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(f.path) for f in files])
    stage = store.staging("INTENTS")
    staged = stage / file_name("INTENTS", files[0].first, files[-1].last)
    pq.write_table(table, staged)
    # The journal is written, the new file moved in, then the process dies before deleting
    # the old ones: both generations are on disk.
    journal = {"adds": [[str(staged), str(files[0].path.parent / staged.name)]], "removes": [str(f.path) for f in files]}
    (store.root / ".journal" / "INTENTS.json").write_text(json.dumps(journal))
    os.replace(staged, files[0].path.parent / staged.name)
    assert store.recover("INTENTS")
    assert store.content_hash() == before
    assert not (store.root / ".journal" / "INTENTS.json").exists()
    assert not stage.exists()


async def test_duckdb_file_opens_with_plain_duckdb_after_a_move(tmp_path):
    """An analyst copies the archive anywhere and opens scf.duckdb with their own DuckDB:
    the views work (paths are relative to the archive directory)."""
    store = ArchiveStore(tmp_path / "archive")
    sample.write_archive(store, sample.history(cycles=40, seed=1))
    views.write_database(store.root)
    moved = tmp_path / "elsewhere" / "my-copy"
    shutil.copytree(store.root, moved)
    shutil.rmtree(store.root)
    script = (
        "import duckdb\n"
        "con = duckdb.connect('scf.duckdb', read_only=True)\n"
        "print(con.sql(\"SELECT count(*) FROM intents\").fetchall()[0][0])\n"
        "print(con.sql(\"SELECT account FROM balances ORDER BY balance_micro LIMIT 1\").fetchall()[0][0])\n"
    )
    out = subprocess.run([sys.executable, "-I", "-c", script], cwd=moved, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["40", "issuance:negentropy"]
    # From another directory, with file_search_path pointing at the archive.
    script2 = (
        "import duckdb, sys\n"
        "con = duckdb.connect(sys.argv[1] + '/scf.duckdb', read_only=True, config={'file_search_path': sys.argv[1]})\n"
        "print(con.sql('SELECT count(*) FROM code').fetchall()[0][0])\n"
    )
    out = subprocess.run([sys.executable, "-I", "-c", script2, str(moved)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 0


async def test_status_lines_show_the_lag(bus, settings):
    assert (await archive.lag_lines(bus, settings))[0].startswith("archive      none at ")
    await sample.publish(bus, sample.history(cycles=10, seed=6))
    await archive.replay(settings, streams=["INTENTS"])
    lines = await archive.lag_lines(bus, settings)
    fossils = (await bus.js.stream_info("FOSSILS")).state.last_seq
    intents = (await bus.js.stream_info("INTENTS")).state.last_seq
    by_stream = {l.split()[0]: l for l in lines[1:]}
    assert f"0 / {fossils:<10} lag {fossils}" in by_stream["FOSSILS"]
    assert f"{intents:>10} / {intents:<10} up to date  (1 files" in by_stream["INTENTS"]
    assert "JOBS" not in by_stream


async def test_a_second_archive_process_is_refused(bus, settings):
    store = ArchiveStore(settings.archive_dir)
    store.ensure()
    with store.lock("FOSSILS", "write"):
        with pytest.raises(archive.ArchiveError) as err:
            await archive.replay(settings, streams=["FOSSILS"])
    assert str(err.value) == (
        f"archive stream FOSSILS is locked for write by pid {os.getpid()}: stop that process "
        "(`scf run archive` or a running compact / replay) and try again"
    )


async def test_jobs_and_buckets_are_not_archived(settings):
    with pytest.raises(archive.ArchiveError, match="stream JOBS is not archived"):
        archive.archived_streams(archive.archive_settings(settings), ["JOBS"])
    with pytest.raises(archive.ArchiveError, match="KV bucket or object store"):
        archive.archived_streams(archive.archive_settings(settings), ["KV_scf_state"])
    assert "JOBS" not in ARCHIVED_STREAMS


async def test_signed_and_headers_columns(bus, settings):
    """A signed event (the signature in the envelope) and a signed plain command (in headers)."""
    from scf.bus.signing import SigningKey

    key = SigningKey.generate("alice")
    intent = ev.IntentCreated.new(ev.Intent(intent_id="i-1", kind="train", domain="grid:case14"), source="t")
    await bus.js.publish(intent.subject(), codec.sign(intent, key), headers={MSG_ID: intent.id, SCF_TYPE: "intent.created"})
    from scf.bus import control

    subject, body, headers = control.encode(control.Stop(by="alice"), key)
    await bus.js.publish(subject, body, headers=headers)
    await archive.replay(settings, streams=["INTENTS", "CONTROL"])
    con = views.connect(settings.archive_dir)
    rows = views.rows(con.sql("SELECT stream, type, signed, kid, headers FROM events ORDER BY stream"))
    assert [(r["stream"], r["type"], r["signed"], r["kid"]) for r in rows] == [
        ("CONTROL", "control.stop", True, key.kid),
        ("INTENTS", "intent.created", True, key.kid),
    ]
    assert json.loads(rows[1]["headers"]) == {MSG_ID: intent.id, SCF_TYPE: "intent.created"}


def test_scf_query_errors_are_one_line(tmp_path):
    env = dict(os.environ, SCF_HOME=str(tmp_path / "home"))
    env.pop("NATS_URL", None)
    r = cli("query", "SELECT 1", env=env)
    assert r.returncode == 1
    assert r.stderr.strip() == f"Error: no archive at {tmp_path / 'home' / 'archive'}: start `scf run archive` or build one with `scf replay`"
    store = ArchiveStore(tmp_path / "home" / "archive")
    store.ensure()
    r = cli("query", "SELECT * FROM nope", env=env)
    assert r.returncode == 1
    assert r.stderr.startswith("Error: Catalog Error: Table with name nope does not exist!")
    assert len(r.stderr.strip().splitlines()) == 1
