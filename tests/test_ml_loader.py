"""The fossil loader: every record once per epoch across ranks and workers, exact resume."""

from __future__ import annotations

from collections import Counter

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scf.bus.events import Fossil
from scf.domains.fossils import synth_shards
from scf.ml.loader import FossilLoader, LoaderError, ShardSource, _Plan, iterate_fossils, load_arrays

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("case9")
    synth_shards("grid:case9", 500, out, shard_size=130, seed=2)  # 4 shards: 130, 130, 130, 110
    return out


@pytest.fixture(scope="module")
def records(shards):
    return [msgspec.json.decode(line, type=Fossil) for p in sorted(shards.glob("*.ndjson")) for line in p.read_bytes().splitlines()]


def _energies(batches) -> Counter:
    return Counter(float(e) for b in batches for e in b.energy)


def test_two_ranks_two_workers_see_every_record_once_per_epoch(shards, records):
    every = Counter(float(np.float32(r.energy)) for r in records)
    assert len(every) == 500  # energies identify records here
    per_epoch = [Counter(), Counter()]
    orders = []
    for rank in range(2):
        loader = FossilLoader(shards, batch_size=16, seed=4, rank=rank, world_size=2, num_workers=2, epochs=2, shuffle_buffer=8192)
        seen_by_rank = [Counter(), Counter()]
        for batch in loader:
            epoch = loader.epoch
            assert batch.state.shape[1:] == (3,) and batch.context.shape[1:] == (3,) and batch.state.dtype.is_floating_point
            for e in batch.energy:
                seen_by_rank[epoch][float(e)] += 1
            orders.append((rank, epoch, float(batch.energy[0])))
        assert seen_by_rank[0] and seen_by_rank[1]
        assert not set(seen_by_rank[0]) & set(per_epoch[0])  # ranks do not overlap
        for epoch in range(2):
            per_epoch[epoch] += seen_by_rank[epoch]
    assert per_epoch[0] == every and per_epoch[1] == every
    first = [o[2] for o in orders if o[:2] == (0, 0)]
    second = [o[2] for o in orders if o[:2] == (0, 1)]
    assert first != second  # each epoch is shuffled anew


@settings(max_examples=40, deadline=None)
@given(world=st.integers(1, 3), workers=st.integers(1, 3), window=st.integers(200, 100_000), epoch=st.integers(0, 5), seed=st.integers(0, 2**31))
def test_slots_partition_the_records_for_any_layout(shards, records, world, workers, window, epoch, seed):
    plan = _Plan(ShardSource(shards), None, seed, window, None)
    slots = world * workers
    ids = Counter(row.fossil_id for s in range(slots) for row, _ in plan.rows(epoch, s, slots))
    assert ids == Counter(r.fossil_id for r in records)


@settings(max_examples=40, deadline=None)
@given(cut=st.integers(0, 200), slots=st.integers(1, 4), window=st.integers(300, 50_000), split=st.sampled_from([None, "train", "heldout"]))
def test_a_slot_resumes_exactly_where_it_stopped(shards, cut, slots, window, split):
    plan = _Plan(ShardSource(shards), "grid:case9", 1, window, split)
    rows = list(plan.rows(3, slots - 1, slots))
    cut = min(cut, len(rows))
    start = rows[cut - 1][1] if cut else (0, 0, 0)
    rest = [r.fossil_id for r, _ in plan.rows(3, slots - 1, slots, start)]
    assert rest == [r.fossil_id for r, _ in rows[cut:]]


@settings(max_examples=30, deadline=None)
@given(window=st.integers(1, 40_000), data=st.data())
def test_a_window_read_is_whole_lines_and_bounded(shards, window, data):
    source = ShardSource(shards)
    units = source.units(data.draw(st.integers(1, 8)))
    unit = data.draw(st.sampled_from(units))
    index = data.draw(st.integers(0, source.windows(unit, window) - 1))
    chunk = source.read(unit, index, window)
    longest = max(len(line) + 1 for line in (shards / unit.key).read_bytes().splitlines())
    assert len(chunk) <= window + longest  # memory per worker is one window (plus one line)
    assert chunk == b"" or chunk.endswith(b"\n")
    for line in chunk.splitlines():
        msgspec.json.decode(line, type=Fossil)


@pytest.mark.parametrize("workers, world, rank", [(0, 1, 0), (2, 1, 0), (2, 2, 1)])
def test_resume_from_state_dict_continues_without_repeat_or_skip(shards, workers, world, rank):
    def make(state=None):
        return FossilLoader(shards, batch_size=20, seed=9, rank=rank, world_size=world, num_workers=workers, epochs=2, shuffle_buffer=8192, state=state)

    full = [b.energy.tolist() for b in make()]
    for cut in (1, len(full) // 3, len(full) // 2 + 1, len(full) - 1):
        loader = make()
        it = iter(loader)
        head = [next(it).energy.tolist() for _ in range(cut)]
        state = msgspec.json.decode(msgspec.json.encode(loader.state_dict()))  # the state survives JSON
        del it
        tail = [b.energy.tolist() for b in make(state)]
        assert head + tail == full, f"cut at batch {cut} of {len(full)}"


def test_state_from_another_layout_is_refused(shards):
    loader = FossilLoader(shards, num_workers=0, seed=1)
    state = loader.state_dict()
    with pytest.raises(LoaderError, match="saved for another layout \\(seed saved 1 now 2\\): resume with the same settings"):
        FossilLoader(shards, num_workers=0, seed=2, state=state)


def test_iterate_fossils_streams_one_epoch_of_rows(shards, records):
    rows = list(iterate_fossils(shards, domain="grid:case9", seed=3, shuffle_buffer=4096))
    assert sorted(r.fossil_id for r in rows) == sorted(r.fossil_id for r in records)
    assert [r.fossil_id for r in rows] != [r.fossil_id for r in records]  # shuffled
    assert list(iterate_fossils(shards, domain="grid:case14")) == []


def test_splits_are_disjoint_and_cover_everything(shards, records):
    train = list(iterate_fossils(shards, split="train"))
    held = list(iterate_fossils(shards, split="heldout"))
    assert {r.fossil_id for r in train}.isdisjoint(r.fossil_id for r in held)
    assert len(train) + len(held) == len(records)
    assert all(r.fossil_id.endswith("0") for r in held) and 10 < len(held) < 60  # about 1 in 16
    x, c, e = load_arrays(shards, domain="grid:case9", split="heldout")
    assert x.shape == (len(held), 3) and c.shape == (len(held), 3) and e.shape == (len(held),)


def test_a_bad_line_is_passed_over_and_mixed_dimensions_named(tmp_path, shards):
    lines = (shards / "fossils-00000.ndjson").read_bytes().splitlines()
    (tmp_path / "fossils-00000.ndjson").write_bytes(b"\n".join([lines[0], b'{"not": "a fossil"', lines[1]]) + b"\n")
    assert len(list(iterate_fossils(tmp_path))) == 2
    synth_shards("grid:case14", 3, tmp_path / "mixed", seed=0)
    (tmp_path / "mixed" / "fossils-00001.ndjson").write_bytes(b"\n".join(lines[:3]) + b"\n")
    with pytest.raises(LoaderError, match="pass domain= to read one domain"):
        list(FossilLoader(tmp_path / "mixed", batch_size=8))
    assert sum(len(b.energy) for b in FossilLoader(tmp_path / "mixed", batch_size=8, domain="grid:case14")) == 3


def test_missing_or_empty_shard_directory_is_named(tmp_path):
    with pytest.raises(LoaderError, match="no shard directory at .*nowhere"):
        ShardSource(tmp_path / "nowhere")
    with pytest.raises(LoaderError, match="holds no \\*.ndjson shard"):
        ShardSource(tmp_path)


@pytest.mark.parametrize("workers, world, rank, split, domain", [(0, 1, 0, None, None), (2, 1, 0, "train", "grid:case9"), (2, 2, 1, "heldout", "grid:case9")])
def test_columnar_batches_are_the_ndjson_batches(shards, workers, world, rank, split, domain):
    def batches(columnar, state=None):
        loader = FossilLoader(shards, batch_size=24, seed=5, rank=rank, world_size=world, num_workers=workers, epochs=2,
                              shuffle_buffer=4096, split=split, domain=domain, columnar=columnar, state=state)
        return loader, [(b.state.tolist(), b.context.tolist(), b.energy.tolist()) for b in loader]

    loader, columnar = batches(True)
    assert loader.columnar and (shards / ".columnar" / "index.json").exists()
    _, ndjson = batches(False)
    assert columnar == ndjson and len(columnar) > 2  # the same records, in the same order
    # a state saved by one path resumes in the other
    first = FossilLoader(shards, batch_size=24, seed=5, rank=rank, world_size=world, num_workers=workers, epochs=2,
                         shuffle_buffer=4096, split=split, domain=domain, columnar=False)
    it = iter(first)
    head = [next(it).energy.tolist() for _ in range(2)]
    del it
    _, tail = batches(True, state=first.state_dict())
    assert head + [t[2] for t in tail] == [b[2] for b in ndjson]


def test_columns_follow_the_shard_when_it_changes(tmp_path):
    synth_shards("grid:case9", 60, tmp_path, shard_size=30, seed=1)
    before = sorted(float(e) for b in FossilLoader(tmp_path, batch_size=16) for e in b.energy)
    source = ShardSource(tmp_path)
    old = {source.sha256(name) for name in source.files}
    assert {d.name for d in (tmp_path / ".columnar").iterdir() if d.is_dir()} == old
    shard = tmp_path / source.files[0]
    lines = shard.read_bytes().splitlines(keepends=True)
    shard.write_bytes(b"".join(lines[:10]))  # the shard changes: 20 fossils fewer
    after = sorted(float(e) for b in FossilLoader(tmp_path, batch_size=16) for e in b.energy)
    assert len(after) == len(before) - 20
    assert after == sorted(float(e) for b in FossilLoader(tmp_path, batch_size=16, columnar=False) for e in b.energy)
    now = {d.name for d in (tmp_path / ".columnar").iterdir() if d.is_dir()}
    assert len(now) == 2 and now != old  # the changed shard's stale columns are gone


def test_columns_skip_blank_and_bad_lines_like_the_ndjson_path(tmp_path, shards):
    lines = (shards / "fossils-00000.ndjson").read_bytes().splitlines()
    (tmp_path / "a.ndjson").write_bytes(b"\n".join([lines[0], b"", b'{"not": "a fossil"', b"   ", lines[1], lines[2]]))  # no final newline
    ndjson = [b.energy.tolist() for b in FossilLoader(tmp_path, batch_size=2, columnar=False, shuffle_buffer=64)]
    columnar = [b.energy.tolist() for b in FossilLoader(tmp_path, batch_size=2, shuffle_buffer=64)]
    assert columnar == ndjson and sum(map(len, columnar)) == 3


LAYOUTS = [(0, 1, 0, None, None), (2, 1, 0, "train", "grid:case9"), (3, 2, 1, "heldout", "grid:case9")]


@pytest.mark.parametrize("workers, world, rank, split, domain", LAYOUTS)
def test_batches_on_the_device_and_by_threads_are_the_ndjson_batches(shards, workers, world, rank, split, domain):
    """Data kept on the device (here the CPU stands in for it) and gather threads cut the
    very batches DataLoader workers decoding the NDJSON give, and a state saved by any of
    them resumes in any other."""
    def make(state=None, **kw):
        return FossilLoader(shards, batch_size=24, seed=5, rank=rank, world_size=world, num_workers=workers, epochs=2,
                            shuffle_buffer=4096, split=split, domain=domain, state=state, **kw)

    ways = {"ndjson": {"columnar": False}, "device": {"device": "cpu"}, "threads": {"gather_threads": 2, "prefetch_factor": 1},
            "inline": {"gather_threads": 0}}
    got = {}
    for name, kw in ways.items():
        loader = make(**kw)
        got[name] = [(b.state.tolist(), b.context.tolist(), b.energy.tolist()) for b in loader]
        assert loader.resident is (name == "device")
    assert got["device"] == got["ndjson"] == got["threads"] == got["inline"] and len(got["ndjson"]) > 2
    energies = [b[2] for b in got["ndjson"]]
    for saver, resumer in (("ndjson", "device"), ("device", "threads"), ("threads", "ndjson")):
        first = make(**ways[saver])
        it = iter(first)
        head = [next(it).energy.tolist() for _ in range(len(energies) // 2 + 1)]
        it.close()  # (threads: the pool stops with the generator)
        state = msgspec.json.decode(msgspec.json.encode(first.state_dict()))
        tail = [b.energy.tolist() for b in make(state, **ways[resumer])]
        assert head + tail == energies, f"saved by {saver}, resumed by {resumer}"


def test_data_over_the_device_budget_stays_on_the_host(shards):
    loader = FossilLoader(shards, batch_size=64, device="cpu", device_budget=1000)
    batches = [b.energy.tolist() for b in loader]
    assert loader.resident is False and sum(map(len, batches)) == 500
    for budget, resident in ((500 * 7 * 4, True), (500 * 7 * 4 - 1, False), (0, False)):  # 3 + 3 + 1 float32 a record
        again = FossilLoader(shards, batch_size=64, device="cpu", device_budget=budget)
        assert [b.energy.tolist() for b in again] == batches and again.resident is resident, budget


def test_mixed_sizes_on_the_device_are_named(tmp_path, shards):
    synth_shards("grid:case14", 3, tmp_path, seed=0)
    lines = (shards / "fossils-00000.ndjson").read_bytes().splitlines()
    (tmp_path / "fossils-00001.ndjson").write_bytes(b"\n".join(lines[:3]) + b"\n")
    with pytest.raises(LoaderError, match="several sizes .*pass domain= to read one domain"):
        list(FossilLoader(tmp_path, batch_size=8, device="cpu"))
    assert sum(len(b.energy) for b in FossilLoader(tmp_path, batch_size=8, domain="grid:case14", device="cpu")) == 3


@pytest.mark.parametrize("workers, world, rank", [(0, 1, 0), (3, 2, 1)])
def test_drop_last_gives_full_batches_and_resumes_exactly(shards, workers, world, rank):
    def make(state=None):
        return FossilLoader(shards, batch_size=32, seed=3, rank=rank, world_size=world, num_workers=workers, epochs=2,
                            shuffle_buffer=4096, drop_last=True, state=state, device="cpu")

    full = [b.energy.tolist() for b in make()]
    every = [b.energy.tolist() for b in FossilLoader(shards, batch_size=32, seed=3, rank=rank, world_size=world,
                                                      num_workers=workers, epochs=2, shuffle_buffer=4096)]
    assert full == [b for b in every if len(b) == 32]  # the short batches passed over, nothing else changed
    assert len(full) < len(every) and all(len(b) == 32 for b in full)
    for cut in (1, len(full) // 2, len(full) - 1):
        loader = make()
        it = iter(loader)
        head = [next(it).energy.tolist() for _ in range(cut)]
        it.close()
        assert head + [b.energy.tolist() for b in make(loader.state_dict())] == full, f"cut at {cut}"


def test_drop_last_keeps_a_slot_whose_only_batch_is_short(shards):
    batches = [b.energy.tolist() for b in FossilLoader(shards, batch_size=1000, drop_last=True)]
    assert [len(b) for b in batches] == [500]
