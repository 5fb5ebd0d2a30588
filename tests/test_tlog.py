"""The transparency log over a real archive: tiles against the in-memory tree, the order a
rebuild reproduces, late rows, tampering and reordering caught by the audit, checkpoints
published on a real server, and offline verification through the CLI."""

from __future__ import annotations

import asyncio
import base64
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scf.projections import proofcheck as pc
from scf.projections import sample, tlog
from scf.projections.store import ArchiveStore, RawMessage, messages_table
from tests.conftest import cli, wait_for

FAR = tlog.FAR_FUTURE


def _hashes(n: int, salt: int = 0) -> list[bytes]:
    return [pc.leaf_hash(f"{salt}-{i}".encode()) for i in range(n)]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 1200), cuts=st.lists(st.integers(1, 1200), max_size=4), data=st.data())
def test_tiles_agree_with_the_memory_tree(tmp_path_factory, n, cuts, data):
    d = tmp_path_factory.mktemp("tiles")
    leaves = _hashes(n)
    ref = tlog.MemoryTree(leaves)
    tree = tlog.TileTree(d)
    pos = 0
    for c in sorted({min(c, n) for c in cuts} | {n}):
        tree.append(b"".join(leaves[pos:c]))
        tree.flush()
        tree.prune_partials()
        pos = c
        tree = tlog.TileTree(d, pos)  # reopened from disk, as after a restart
    size = data.draw(st.integers(1, n))
    i = data.draw(st.integers(0, size - 1))
    old = data.draw(st.integers(1, size))
    assert tree.root(size) == ref.root(size) == pc.root_of(leaves[:size])
    assert tree.inclusion(i, size) == ref.inclusion(i, size)
    assert tree.consistency(old, size) == ref.consistency(old, size)
    assert tree.leaf_range(0, n) == b"".join(leaves)


def test_tiles_past_the_second_tile_level(tmp_path):
    n = 256 * 256 + 300  # a full level-1 tile: level-2 hashes exist
    leaves = _hashes(n, 1)
    tree = tlog.TileTree(tmp_path)
    tree.append(b"".join(leaves))
    tree.flush()
    assert (tmp_path / "tile" / "1" / "000").stat().st_size == 256 * 32
    assert (tmp_path / "tile" / "2" / "000.p" / "1").exists()
    assert tlog.tile_path(0, 1234067) == "tile/0/x001/x234/067"
    assert tlog.tile_path(1, 5, 17) == "tile/1/005.p/17"
    reopened = tlog.TileTree(tmp_path, n)
    root = pc.root_of(leaves)
    assert reopened.root() == root
    for i in (0, 255, 65535, 65536, n - 1):
        pc.verify_inclusion(i, n, leaves[i], reopened.inclusion(i, n), root)
    pc.verify_consistency(65_000, n, pc.root_of(leaves[:65_000]), root, reopened.consistency(65_000, n))


# --------------------------------------------------------------------------- over an archive


def _archive(tmp_path, cycles=12):
    store = ArchiveStore(tmp_path / "archive")
    sample.write_archive(store, sample.history(cycles, seed=3))
    return store


def _rows(store) -> int:
    return sum(pq.ParquetFile(f.path).metadata.num_rows for f in store.all_files())


def _synced(tmp_path, store, name="tlog", watermark=FAR) -> tlog.TransparencyLog:
    with tlog.TransparencyLog(tmp_path / name, store, origin="test.example/log") as log:
        log.sync(watermark=watermark)
    return log


def test_the_log_is_the_archive_in_time_order_and_a_rebuild_reproduces_it(tmp_path):
    store = _archive(tmp_path)
    log = _synced(tmp_path, store)
    n = _rows(store)
    assert log.state.size == n > 100
    # Leaf i is the i-th row of the archive sorted by (time, stream, seq).
    rows = []
    for f in store.all_files():
        t = pq.read_table(f.path, columns=["seq", "published_at"])
        rows += [(p, f.stream, s) for s, p in zip(t.column("seq").to_pylist(), t.column("published_at").cast(pa.int64()).to_pylist())]
    rows.sort()
    assert [log.locate(i) for i in range(n)] == [(s, q) for _, s, q in rows]
    # An independent rebuild (a fresh directory, small batches: other round boundaries) gives the same root.
    with tlog.TransparencyLog(tmp_path / "again", store, origin="test.example/log") as again:
        again.sync(watermark=FAR, batch_rows=7)
    assert again.tree.root() == log.tree.root()
    # Incremental rounds (a watermark that rises) end at the same tree as one round.
    times = sorted(p for p, _, _ in rows)
    with tlog.TransparencyLog(tmp_path / "steps", store, origin="test.example/log") as steps:
        sizes = [steps.sync(watermark=times[k]).size for k in (10, 50, 51, len(times) // 2)]
        steps.sync(watermark=FAR)
    assert sizes == sorted(sizes) and sizes[0] == 10
    assert steps.tree.root() == log.tree.root()


def test_audit_and_proofs_catch_a_tampered_row_and_a_reordered_stream(tmp_path):
    store = _archive(tmp_path)
    from scf.bus.signing import SigningKey

    key = SigningKey.generate("tlog")
    with tlog.TransparencyLog(tmp_path / "tlog", store, origin="test.example/log") as log:
        log.sync(watermark=FAR)
        note = log.sign_checkpoint(key)
    assert log.audit().ok
    vkey = pc.verifier_key("test.example/log", key.public_raw)
    i = log.find("LEDGER", 2)
    bundle = log.inclusion_bundle(i)
    summary = pc.verify_bundle(json.dumps(bundle), vkey)
    assert summary["entry"]["stream"] == "LEDGER" and summary["entry"]["seq"] == 2
    assert pc.open_checkpoint(note, pc.parse_verifier_key(vkey)).size == log.state.size

    # Several events against one checkpoint (a strike's proof); a swapped entry fails.
    many = log.events_bundle([log.find("LEDGER", 1), i, log.find("CHECKPOINTS", 1)])
    assert [e["seq"] for e in pc.verify_bundle(many, vkey)["entries"]] == [1, 2, 1]
    many["events"][0]["entry"], many["events"][1]["entry"] = many["events"][1]["entry"], many["events"][0]["entry"]
    with pytest.raises(pc.ProofError, match="^event 0: leaf .* is not in the tree"):
        pc.verify_bundle(many, vkey)

    # Tamper: one payload in the LEDGER file changes.
    f = store.files("LEDGER")[0]
    table = pq.read_table(f.path)
    payload = table.column("payload").to_pylist()
    payload[1] = payload[1].replace("1", "9", 1)
    pq.write_table(table.set_column(table.schema.get_field_index("payload"), "payload", pa.array(payload, pa.string())), f.path)
    report = log.audit()
    assert not report.ok and report.first_bad == i
    assert report.lines()[0].startswith(f"MISMATCH at leaf {i}: the log recorded LEDGER seq 2")
    with pytest.raises(tlog.TlogError, match="differs from the row the log recorded"):
        log.inclusion_bundle(i)
    # The old bundle still verifies (it carries the original entry); a bundle with the
    # altered entry does not.
    forged = dict(bundle, entry=base64.b64encode(tlog.entries("LEDGER", pq.read_table(f.path).slice(1, 1))[0]).decode())
    with pytest.raises(pc.ProofError, match="is not in the tree"):
        pc.verify_bundle(forged, vkey)

    # Reorder: two rows of a stream swap their sequences.
    pq.write_table(table, f.path)  # restored
    assert log.audit().ok
    seq = table.column("seq").to_pylist()
    seq[0], seq[1] = seq[1], seq[0]
    swapped = table.set_column(0, "seq", pa.array(seq, pa.int64())).take(pa.array([1, 0] + list(range(2, table.num_rows))))
    pq.write_table(swapped, f.path)
    assert not log.audit().ok


def test_rows_below_the_watermark_are_logged_late_and_rebuilt(tmp_path):
    store = ArchiveStore(tmp_path / "archive")
    store.ensure()
    t0 = 1_764_000_000_000_000_000

    def msgs(first, n, t):
        return [RawMessage(first + k, t + k * 1000, f"ledger.transfer.x{first + k}", b'{"n": 1}', None) for k in range(n)]

    store.append("LEDGER", messages_table(msgs(1, 5, t0)))
    store.append("DEPLOY", messages_table([RawMessage(k + 1, t0 + 10_000_000 + k, f"deploy.x.{k}", b"{}", None) for k in range(3)]))
    key_w = (t0 + 20_000_000) // 1000
    with tlog.TransparencyLog(tmp_path / "tlog", store, origin="o") as log:
        assert log.sync(watermark=key_w).size == 8
        # LEDGER rows 6-7 arrive with times before the watermark (a clock stepped back).
        store.append("LEDGER", messages_table(msgs(6, 2, t0 + 5_000_000)))
        store.append("DEPLOY", messages_table([RawMessage(4, t0 + 30_000_000, "deploy.x.4", b"{}", None)]))
        report = log.sync(watermark=(t0 + 40_000_000) // 1000)
    assert report.late == 2 and report.size == 11
    assert log.state.late == [tlog.LateRange("LEDGER", 5, 7, key_w)]
    assert [log.locate(i) for i in range(8, 11)] == [("LEDGER", 6), ("LEDGER", 7), ("DEPLOY", 4)]
    root = log.tree.root()
    with log:
        log.rebuild()
    assert log.tree.root() == root and log.state.size == 11
    assert log.audit().ok


def test_restart_after_a_crash_between_tiles_and_state(tmp_path):
    store = _archive(tmp_path, cycles=6)
    log = _synced(tmp_path, store, watermark=None)
    size, root = log.state.size, log.tree.root()
    # A crash after the order file grew but before the state was saved: the tail is dropped.
    with open(log.order_path, "ab") as fh:
        fh.write(b"\0" * tlog.ORDER_DTYPE.itemsize * 3)
    with tlog.TransparencyLog(tmp_path / "tlog", store) as again:
        assert again.state.size == size and again.tree.root() == root
        assert again.order_path.stat().st_size == size * tlog.ORDER_DTYPE.itemsize
        again.sync(watermark=FAR)
    assert again.state.size == _rows(store)
    assert again.audit().ok


# --------------------------------------------------------------------------- on a real server

@pytest.mark.anyio
async def test_checkpoints_on_the_bus_inclusion_and_consistency_verified_offline(bus, settings, tmp_path, scf_env):
    from scf.projections.archive import replay

    items = list(sample.history(6, seed=5))
    half = len(items) // 2
    await sample.publish(bus, items[:half])
    await replay(settings)
    store = ArchiveStore(settings.archive_dir)

    async def logged_all() -> bool:
        # Every archived row but the log's own checkpoint events (each checkpoint adds one
        # more to PROOFS, which the next checkpoint covers).
        await replay(settings)
        await tlog.checkpoint(settings, bus)
        pos = tlog.open_log(settings).state.positions
        return all(pos.get(s, tlog.StreamPos()).seq == store.position(s) for s in store.streams() if s != "PROOFS")

    await wait_for(logged_all, 30, "the log to hold every archived row")
    await tlog.checkpoint(settings, bus)
    first = tlog.open_log(settings).state.size
    await sample.publish(bus, items[half:])
    await wait_for(logged_all, 30, "the log to hold the second half")
    await tlog.checkpoint(settings, bus)
    log = tlog.open_log(settings)
    second = log.state.size
    assert second > first
    # The checkpoints are events on PROOFS, once per size.
    last = await bus.last(f"proof.checkpoint.{log.state.origin.replace('.', '_').replace('/', '_')}.{second}")
    assert last is not None and last[1].data.size == second
    assert last[1].data.note == (log.checkpoints_dir / f"{second}.note").read_text()

    key_file = tmp_path / "log.vkey"
    r = await asyncio.to_thread(cli, "proof", "key", env=scf_env)
    assert r.returncode == 0, r.stderr
    key_file.write_text(r.stdout)
    event_id = next(i.id for i in items[:half] if not isinstance(i, sample.Plain) and i.type_name() == "verdict.issued")
    proof = tmp_path / "inclusion.json"
    r = await asyncio.to_thread(cli, "proof", "inclusion", event_id, "--out", str(proof), env=scf_env)
    assert r.returncode == 0, r.stderr
    # Offline: an environment without SCF_HOME or a server.
    bare = {"PATH": scf_env["PATH"]}
    r = await asyncio.to_thread(cli, "proof", "verify", str(proof), "--key", str(key_file), env=bare)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK: leaf ") and f"verdict.issued {event_id}" in r.stdout
    cons = tmp_path / "consistency.json"
    r = await asyncio.to_thread(cli, "proof", "consistency", str(first), str(second), "--out", str(cons), env=scf_env)
    assert r.returncode == 0, r.stderr
    r = await asyncio.to_thread(cli, "proof", "verify", str(cons), "--key", str(key_file), env=bare)
    assert r.stdout.strip() == f"OK: {log.state.origin} at size {second} extends size {first}"
    # A flipped bit in the proof: one line saying what fails.
    b = json.loads(cons.read_text())
    h = bytearray(base64.b64decode(b["proof"][0]))
    h[0] ^= 1
    b["proof"][0] = base64.b64encode(bytes(h)).decode()
    cons.write_text(json.dumps(b))
    r = await asyncio.to_thread(cli, "proof", "verify", str(cons), "--key", str(key_file), env=bare)
    assert r.returncode == 1
    assert r.stderr.strip().startswith("Error: proof does not hold: the consistency proof does not lead to the")
    r = await asyncio.to_thread(cli, "proof", "audit", env=scf_env)
    assert r.returncode == 0 and r.stdout.startswith(f"the archive reproduces all {second} leaves"), r.stdout + r.stderr

    # The log directory is lost: the archive and the newest checkpoint event restore it.
    import shutil

    newest = await tlog.checkpoint(settings, bus)
    root = tlog.open_log(settings).tree.root()
    shutil.rmtree(tlog.log_dir(settings))
    r = await asyncio.to_thread(cli, "proof", "rebuild", "--from-bus", env=scf_env)
    assert r.returncode == 0, r.stderr
    restored = tlog.open_log(settings)
    assert restored.state.size == newest.sync.size and restored.tree.root() == root
    assert r.stdout.splitlines()[-1] == f"the archive reproduces all {newest.sync.size} leaves and the 1 signed checkpoints"
    # … and it goes on from there: the next checkpoint extends the restored one.
    await sample.publish(bus, list(sample.history(1, seed=99)))

    async def grown() -> bool:
        await replay(settings)
        return (await tlog.checkpoint(settings, bus)).sync.size > newest.sync.size

    await wait_for(grown, 30, "the restored log to grow")
    log = tlog.open_log(settings)
    later = log.state.size
    pc.verify_consistency(newest.sync.size, later, root, log.tree.root(), log.tree.consistency(newest.sync.size, later))
    assert log.audit().ok


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_any_altered_or_moved_row_is_named_by_the_audit(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("audit")
    store = ArchiveStore(tmp / "archive")
    store.ensure()
    t0 = 1_764_000_000_000_000_000
    n_a, n_b = data.draw(st.integers(2, 30)), data.draw(st.integers(2, 30))
    for stream, n, step in (("LEDGER", n_a, 3_000), ("DEPLOY", n_b, 5_000)):
        store.append(stream, messages_table([RawMessage(k + 1, t0 + k * step, f"{stream.lower()}.x.{k}", b'{"k": %d}' % k, None) for k in range(n)]))
    with tlog.TransparencyLog(tmp / "tlog", store, origin="o") as log:
        log.sync(watermark=FAR)
    assert log.audit().ok
    stream = data.draw(st.sampled_from(["LEDGER", "DEPLOY"]))
    f = store.files(stream)[0]
    table = pq.read_table(f.path)
    k = data.draw(st.integers(0, table.num_rows - 2))
    if data.draw(st.booleans()):  # alter one payload
        payload = table.column("payload").to_pylist()
        payload[k] = '{"k": -1}'
        table = table.set_column(table.schema.get_field_index("payload"), "payload", pa.array(payload, pa.string()))
        bad = log.find(stream, k + 1)
    else:  # move a row: rows k and k+1 swap places (and so their sequences)
        order = list(range(table.num_rows))
        order[k], order[k + 1] = order[k + 1], order[k]
        table = table.take(pa.array(order)).set_column(0, "seq", table.column("seq"))
        bad = log.find(stream, k + 1)
    pq.write_table(table, f.path)
    report = log.audit()
    assert report.first_bad == bad
    assert report.lines()[0].startswith(f"MISMATCH at leaf {bad}: the log recorded {stream} seq {k + 1}")


@pytest.mark.anyio
async def test_scf_run_tlog_publishes_checkpoints_and_stops_on_sigterm(bus, settings, scf_env, tmp_path):
    import signal
    import sys

    from scf.projections.archive import replay
    from tests.conftest import spawn

    await sample.publish(bus, list(sample.history(2, seed=9)))
    await replay(settings)
    log_file = tmp_path / "tlog.log"
    proc = spawn([sys.executable, "-m", "scf.cli.main", "run", "tlog", "--interval", "0.2"], scf_env, log_file)
    try:
        from scf.bus import codec

        async def nonempty_checkpoint():
            if (await bus.js.stream_info("PROOFS")).state.messages == 0:
                return None
            event = codec.decode((await bus.js.get_last_msg("PROOFS", "proof.checkpoint.>")).data)
            return event if event.data.size > 0 else None

        await wait_for(nonempty_checkpoint, 30, "a proof.checkpoint over the archived events from scf run tlog")
        event = await nonempty_checkpoint()
        cp = pc.open_checkpoint(event.data.note, pc.parse_verifier_key(event.data.verifier_key))
        assert cp.size == event.data.size and base64.b64encode(cp.root).decode() == event.data.root
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 20)
    assert rc == 0, log_file.read_text()


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_rounds_at_any_watermarks_give_the_tree_of_one_pass(tmp_path_factory, data):
    """The order's invariant: appending in rounds (rising watermarks, any batch size) gives
    the same leaves as sorting the whole archive at once — with clocks that jitter back."""
    tmp = tmp_path_factory.mktemp("rounds")
    store = ArchiveStore(tmp / "archive")
    store.ensure()
    t0 = 1_764_000_000_000_000_000
    for stream in data.draw(st.lists(st.sampled_from(["CONTROL", "DEPLOY", "LEDGER", "TRUST"]), min_size=1, max_size=4, unique=True)):
        steps = data.draw(st.lists(st.integers(-3, 20), min_size=1, max_size=40))  # µs; negative: a clock stepping back
        t, msgs = t0, []
        for k, d in enumerate(steps):
            t += d * 1000
            msgs.append(RawMessage(k + 1, t, f"{stream.lower()}.x", b"{}", None))
        store.append(stream, messages_table(msgs))
    with tlog.TransparencyLog(tmp / "once", store, origin="o") as once:
        once.sync(watermark=FAR)
    marks = sorted(data.draw(st.lists(st.integers(t0 // 1000 - 5, t0 // 1000 + 900), max_size=5)))
    with tlog.TransparencyLog(tmp / "rounds", store, origin="o") as rounds:
        for w in marks:
            rounds.sync(watermark=w, batch_rows=data.draw(st.integers(1, 50)))
        rounds.sync(watermark=FAR, batch_rows=data.draw(st.integers(1, 50)))
    assert rounds.state.size == once.state.size
    assert rounds.tree.root() == once.tree.root()
    assert rounds.state.late == []
