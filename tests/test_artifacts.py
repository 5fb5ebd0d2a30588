"""The artifact store against a real nats-server: both backends, digests, the Object
Store layout shared with nats-py (either client reads what the other wrote), and the
StreamReader fast path."""

from __future__ import annotations

import asyncio
import hashlib
import random

import pytest

from scf.bus.artifacts import (
    ArtifactNotFound,
    DigestMismatch,
    FileStoreBackend,
    ObjectStoreBackend,
    StreamReader,
    open_store,
)
from tests.conftest import scf

pytestmark = pytest.mark.anyio


def blob(path, size: int, seed: int = 0) -> str:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


async def test_object_store_round_trip_many_chunks(bus, tmp_path):
    src = tmp_path / "model.safetensors"
    digest = blob(src, 3 * 256 * 1024 + 12345)
    store = ObjectStoreBackend(bus, chunk_size=256 * 1024)
    ref = await store.put(src, "grid_case14/job-1.safetensors", meta={"job_id": "job-1"})
    assert ref.uri == "obj://scf_artifacts/grid_case14/job-1.safetensors"
    assert (ref.sha256, ref.size, ref.meta) == (digest, src.stat().st_size, {"job_id": "job-1"})

    (tmp_path / "out").mkdir()
    out = await store.get(ref.uri, tmp_path / "out", sha256=digest)  # a directory: the name's basename in it
    assert out == tmp_path / "out" / "job-1.safetensors"
    assert out.read_bytes() == src.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["job-1.safetensors"]  # no partial file left

    stat = await store.stat("grid_case14/job-1.safetensors")
    assert stat == ref
    again = await store.get(ref.uri, tmp_path / "again.bin", sha256="sha256:" + digest.upper())  # prefix and case accepted
    assert again.read_bytes() == src.read_bytes()


async def test_nats_py_reads_ours_and_we_read_nats_pys(bus, tmp_path):
    src = tmp_path / "a.bin"
    digest = blob(src, 700_000)
    store = ObjectStoreBackend(bus)
    await store.put(src, "x/a.bin")
    obs = await bus.js.object_store("scf_artifacts")
    got = await obs.get("x/a.bin")  # nats-py's own reader checks the digest too
    assert hashlib.sha256(got.data).hexdigest() == digest

    await obs.put("x/b.bin", src.read_bytes())  # nats-py's writer (128 KiB chunks)
    out = await store.get("obj://scf_artifacts/x/b.bin", tmp_path / "b.bin", sha256=digest)
    assert out.read_bytes() == src.read_bytes()


async def test_wrong_digest_and_missing_artifacts_are_refused(bus, tmp_path):
    src = tmp_path / "a.bin"
    blob(src, 50_000)
    store = ObjectStoreBackend(bus)
    ref = await store.put(src, "a.bin")
    with pytest.raises(DigestMismatch, match="expected 00"):
        await store.get(ref.uri, tmp_path / "dest.bin", sha256="00" * 32)
    assert not (tmp_path / "dest.bin").exists()
    with pytest.raises(ArtifactNotFound, match="no artifact obj://scf_artifacts/nope.bin"):
        await store.get("obj://scf_artifacts/nope.bin", tmp_path / "n.bin")
    assert await store.stat("nope.bin") is None


async def test_replacing_an_object_purges_its_old_chunks(bus, tmp_path):
    store = ObjectStoreBackend(bus, chunk_size=64 * 1024)
    a, b = tmp_path / "a", tmp_path / "b"
    blob(a, 300_000, 1)
    digest_b = blob(b, 100_000, 2)
    await store.put(a, "same/name")
    ref = await store.put(b, "same/name")
    assert ref.sha256 == digest_b
    info = await bus.js.stream_info("OBJ_scf_artifacts")
    assert info.state.messages == 2 + 1  # b's two chunks and one meta record: a's chunks are gone
    assert (await store.get(ref.uri, tmp_path / "o")).read_bytes() == b.read_bytes()
    assert await store.delete("same/name") is True
    assert await store.stat("same/name") is None


async def test_empty_artifact(bus, tmp_path):
    (tmp_path / "e").write_bytes(b"")
    store = ObjectStoreBackend(bus)
    ref = await store.put(tmp_path / "e", "empty")
    assert ref.size == 0 and ref.sha256 == hashlib.sha256(b"").hexdigest()
    assert (await store.get(ref.uri, tmp_path / "e2")).read_bytes() == b""


async def test_file_backend_and_routing_by_scheme(bus, settings, tmp_path):
    root = tmp_path / "shared"
    files = FileStoreBackend(root)
    src = tmp_path / "m.safetensors"
    digest = blob(src, 10_000)
    ref = await files.put(src, "grid_case14/m.safetensors", meta={"k": "v"})
    assert ref.uri == f"file://{root}/grid_case14/m.safetensors" and ref.sha256 == digest
    assert await files.stat(ref.uri) == ref

    store = open_store(bus, settings)  # the object store by default; gets route by scheme
    out = await store.get(ref.uri, tmp_path / "copy.safetensors", sha256=digest)
    assert out.read_bytes() == src.read_bytes()
    obj = await store.put(src, "m.safetensors")
    assert obj.uri.startswith("obj://")
    assert (await store.get(obj.uri, tmp_path / "copy2")).read_bytes() == src.read_bytes()

    (root / "grid_case14" / "m.safetensors").write_bytes(b"tampered")
    with pytest.raises(DigestMismatch, match="corrupt or was replaced"):
        await store.get(ref.uri, tmp_path / "copy3")
    assert not (tmp_path / "copy3").exists()


async def test_file_backend_from_settings(bus, settings, tmp_path):
    (settings.home_path / "scf.toml").write_text(f'[artifacts]\nbackend = "file"\nroot = "{tmp_path / "zoo"}"\n')
    from scf.bus.settings import load

    s = load({"SCF_HOME": settings.home, "NATS_URL": settings.nats_url or ""})
    store = open_store(bus, s)
    (tmp_path / "f").write_bytes(b"abc")
    ref = await store.put(tmp_path / "f", "d/f")
    assert ref.uri == f"file://{tmp_path / 'zoo'}/d/f"


async def test_stream_reader_reads_a_range_in_order(bus):
    for i in range(1, 301):
        await bus.js.publish(f"job.progress.r{i % 3}", str(i).encode())
    seen: list[tuple[int, int]] = []
    reader = StreamReader(bus.nc, bus.js, "TRAINING", "job.progress.r1", start_seq=10, end_seq=200, batch=16)
    stats = await reader.run(lambda data, seq: seen.append((int(data), seq)))
    want = [i for i in range(10, 201) if i % 3 == 1]
    assert [d for d, _ in seen] == want and [s for _, s in seen] == want
    assert stats.messages == len(want) and stats.passes == 1

    everything: list[int] = []
    await StreamReader(bus.nc, bus.js, "TRAINING", "job.>", batch=7).run(lambda d, s: everything.append(s))
    assert everything == list(range(1, 301))
    nothing: list[int] = []
    await StreamReader(bus.nc, bus.js, "TRAINING", "job.none").run(lambda d, s: nothing.append(s))
    assert nothing == []


async def test_cli_put_stat_get(scf_env, bus, tmp_path):
    src = tmp_path / "c.bin"
    digest = blob(src, 4096)
    r = await asyncio.to_thread(scf, "artifacts", "put", str(src), "cli/c.bin", env=scf_env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"obj://scf_artifacts/cli/c.bin  sha256 {digest}  4096 bytes"
    r = await asyncio.to_thread(scf, "artifacts", "get", "obj://scf_artifacts/cli/c.bin", str(tmp_path / "o.bin"), "--sha256", digest, env=scf_env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o.bin").read_bytes() == src.read_bytes()
    r = await asyncio.to_thread(scf, "artifacts", "get", "obj://scf_artifacts/cli/none", str(tmp_path / "x"), env=scf_env)
    assert r.returncode == 1
    assert r.stderr.strip() == "Error: no artifact obj://scf_artifacts/cli/none: check the URI (list with `nats object ls scf_artifacts`)"
