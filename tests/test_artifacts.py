"""The artifact store against a real nats-server and a real directory: one contract suite
run against both backends (Object Store and files), then what only one of them promises —
the Object Store layout shared with nats-py (either client reads what the other wrote) and
its purge of replaced chunks, routing by URI scheme, the `[artifacts]` settings, the CLI."""

from __future__ import annotations

import asyncio
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import pytest

from scf.bus.artifacts import (
    ArtifactError,
    ArtifactNotFound,
    Backend,
    DigestMismatch,
    FileStoreBackend,
    ObjectStoreBackend,
    open_store,
)
from tests.conftest import cli

pytestmark = pytest.mark.anyio
CHUNK = 256 * 1024


def blob(path, size: int, seed: int = 0) -> str:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- the contract


@dataclass
class Subject:
    """A backend under test, with what the contract needs to know of it."""

    store: Backend
    missing: Callable[[str], str]  # the start of the not-found message for a name
    tamper: Callable[[str, bytes], Awaitable[None]]  # replace a stored artifact's bytes behind its back


def _object_subject(request) -> Subject:
    bus = request.getfixturevalue("bus")
    store = ObjectStoreBackend(bus, chunk_size=CHUNK)

    async def tamper(name: str, data: bytes) -> None:
        obs = await bus.js.object_store(store.bucket)
        info = await obs.get_info(name)
        chunks = f"$O.{store.bucket}.C.{info.nuid}"
        await bus.js.purge_stream(store.stream, subject=chunks)
        for i in range(0, len(data), info.options.max_chunk_size):
            await bus.js.publish(chunks, data[i : i + info.options.max_chunk_size])

    return Subject(store, lambda name: f"no artifact obj://{store.bucket}/{name}", tamper)


def _file_subject(root: Path) -> Subject:
    store = FileStoreBackend(root)

    async def tamper(name: str, data: bytes) -> None:
        (root / name).write_bytes(data)

    return Subject(store, lambda name: f"no artifact at {root / name}", tamper)


@pytest.fixture(params=["object", "file"])
def backend(request, tmp_path) -> Subject:
    if request.param == "object":
        return _object_subject(request)  # a nats-server only for this backend
    return _file_subject(tmp_path / "shared")


async def test_round_trip(backend: Subject, tmp_path):
    store = backend.store
    src = tmp_path / "model.safetensors"
    digest = blob(src, 3 * CHUNK + 12345)  # several Object Store chunks and a partial one
    ref = await store.put(src, "grid_case14/job-1.safetensors", meta={"job_id": "job-1"})
    assert ref.uri == store.uri("grid_case14/job-1.safetensors")
    assert ref.uri.startswith(f"{store.scheme}://")
    assert (ref.sha256, ref.size, ref.meta) == (digest, src.stat().st_size, {"job_id": "job-1"})

    (tmp_path / "out").mkdir()
    out = await store.get(ref.uri, tmp_path / "out", sha256=digest)  # a directory: the name's basename in it
    assert out == tmp_path / "out" / "job-1.safetensors"
    assert out.read_bytes() == src.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["job-1.safetensors"]  # no partial file left

    assert await store.stat("grid_case14/job-1.safetensors") == ref
    assert await store.stat(ref.uri) == ref
    again = await store.get(ref.uri, tmp_path / "again.bin", sha256="sha256:" + digest.upper())  # prefix and case accepted
    assert again.read_bytes() == src.read_bytes()


async def test_wrong_digest_and_missing_artifacts_are_refused(backend: Subject, tmp_path):
    store = backend.store
    src = tmp_path / "a.bin"
    blob(src, 50_000)
    ref = await store.put(src, "a.bin")
    with pytest.raises(DigestMismatch, match="00" * 32):
        await store.get(ref.uri, tmp_path / "dest.bin", sha256="00" * 32)
    assert not (tmp_path / "dest.bin").exists()
    with pytest.raises(ArtifactNotFound) as err:
        await store.get(store.uri("nope.bin"), tmp_path / "n.bin")
    assert str(err.value).startswith(backend.missing("nope.bin"))
    assert not (tmp_path / "n.bin").exists()
    assert await store.stat("nope.bin") is None


async def test_tampered_content_is_refused(backend: Subject, tmp_path):
    store = backend.store
    src = tmp_path / "m.bin"
    blob(src, 10_000, seed=1)
    ref = await store.put(src, "d/m.bin")
    await backend.tamper("d/m.bin", random.Random(2).randbytes(10_000))  # same size, other bytes
    with pytest.raises(DigestMismatch, match=f"does not match {ref.sha256}: the artifact is corrupt or was replaced"):
        await store.get(ref.uri, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


async def test_replacing_then_deleting(backend: Subject, tmp_path):
    store = backend.store
    a, b = tmp_path / "a", tmp_path / "b"
    blob(a, 300_000, 1)
    digest_b = blob(b, 100_000, 2)
    await store.put(a, "same/name")
    ref = await store.put(b, "same/name")
    assert (ref.sha256, ref.size) == (digest_b, 100_000)
    assert await store.stat("same/name") == ref
    assert (await store.get(ref.uri, tmp_path / "o")).read_bytes() == b.read_bytes()
    assert await store.delete("same/name") is True
    assert await store.stat("same/name") is None
    with pytest.raises(ArtifactNotFound):
        await store.get(ref.uri, tmp_path / "gone")
    assert await store.delete("same/name") is False


async def test_empty_artifact(backend: Subject, tmp_path):
    store = backend.store
    (tmp_path / "e").write_bytes(b"")
    ref = await store.put(tmp_path / "e", "empty")
    assert ref.size == 0 and ref.sha256 == hashlib.sha256(b"").hexdigest()
    assert (await store.get(ref.uri, tmp_path / "e2")).read_bytes() == b""


@pytest.mark.parametrize("name", ["../escape", "/abs", "", "sp ace"])
async def test_invalid_names_are_refused(backend: Subject, tmp_path, name):
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="is not valid: use letters, digits"):
        await backend.store.put(tmp_path / "f", name)


# --------------------------------------------------------------------------- one backend, or the store


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


async def test_replacing_an_object_purges_its_old_chunks(bus, tmp_path):
    store = ObjectStoreBackend(bus, chunk_size=64 * 1024)
    a, b = tmp_path / "a", tmp_path / "b"
    blob(a, 300_000, 1)
    blob(b, 100_000, 2)
    await store.put(a, "same/name")
    await store.put(b, "same/name")
    info = await bus.js.stream_info("OBJ_scf_artifacts")
    assert info.state.messages == 2 + 1  # b's two chunks and one meta record: a's chunks are gone


async def test_the_store_routes_gets_by_scheme(bus, settings, tmp_path):
    root = tmp_path / "shared"
    src = tmp_path / "m.safetensors"
    digest = blob(src, 10_000)
    ref = await FileStoreBackend(root).put(src, "grid_case14/m.safetensors", meta={"k": "v"})
    assert ref.uri == f"file://{root}/grid_case14/m.safetensors"

    store = open_store(bus, settings)  # the object store by default; gets route by scheme
    assert store.scheme == "obj"
    out = await store.get(ref.uri, tmp_path / "copy.safetensors", sha256=digest)
    assert out.read_bytes() == src.read_bytes()
    assert await store.stat(ref.uri) == ref
    obj = await store.put(src, "m.safetensors")
    assert obj.uri.startswith("obj://")
    assert (await store.get(obj.uri, tmp_path / "copy2")).read_bytes() == src.read_bytes()
    with pytest.raises(ArtifactError, match="unsupported artifact URI 'http://x/y'"):
        await store.get("http://x/y", tmp_path / "copy3")


async def test_file_backend_from_settings(bus, settings, tmp_path):
    (settings.home_path / "scf.toml").write_text(f'[artifacts]\nbackend = "file"\nroot = "{tmp_path / "zoo"}"\n')
    from scf.bus.settings import load

    s = load({"SCF_HOME": settings.home, "NATS_URL": settings.nats_url or ""})
    store = open_store(bus, s)
    (tmp_path / "f").write_bytes(b"abc")
    ref = await store.put(tmp_path / "f", "d/f")
    assert ref.uri == f"file://{tmp_path / 'zoo'}/d/f"
    s = load({"SCF_HOME": settings.home, "NATS_URL": settings.nats_url or "", "SCF_ARTIFACTS": "object"})
    assert open_store(bus, s).scheme == "obj"  # SCF_ARTIFACTS overrides [artifacts] backend


async def test_cli_put_stat_get(scf_env, bus, tmp_path):
    src = tmp_path / "c.bin"
    digest = blob(src, 4096)
    r = await asyncio.to_thread(cli, "artifacts", "put", str(src), "cli/c.bin", env=scf_env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"obj://scf_artifacts/cli/c.bin  sha256 {digest}  4096 bytes"
    r = await asyncio.to_thread(cli, "artifacts", "get", "obj://scf_artifacts/cli/c.bin", str(tmp_path / "o.bin"), "--sha256", digest, env=scf_env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o.bin").read_bytes() == src.read_bytes()
    r = await asyncio.to_thread(cli, "artifacts", "get", "obj://scf_artifacts/cli/none", str(tmp_path / "x"), env=scf_env)
    assert r.returncode == 1
    assert r.stderr.strip() == "Error: no artifact obj://scf_artifacts/cli/none: check the URI (list with `nats object ls scf_artifacts`)"
