"""A `worker` login may write the `scf_artifacts` object store: it must not be able to fill
an edge's disk by replacing a deployed artifact with a huge object. The edge's fetch
(`fetch_artifact`, what the agent calls) compares the store's recorded size with the signed
release's size before reading a chunk, and stops a read whose chunks run past it (a meta
record that lies about its size); an unsized (older) release is bounded by
`[edge] max_artifact_bytes`. Real nats-server under nats/prod.conf + users.conf, real
worker and edge logins."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
from nats.js import api
from nats.nuid import NUID

from scf.bus.artifacts import ObjectStoreBackend
from scf.bus.artifacts import object_backend as ob
from scf.consumers.edge import Refused
from scf.consumers.edge.release import fetch_artifact
from tests.test_nats_configs import Hub, hub, passwords, tls_files  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(90)

NAME = "grid_case9/deployed.safetensors"
CHUNK = 64 * 1024


@dataclass
class _Bus:
    """What fetch_artifact needs of a Bus: the connection, JetStream, settings (None: defaults)."""

    nc: object
    js: object
    settings: object = None


def _spy_sink(monkeypatch) -> list[int]:
    """Bytes handed to the fetch's writer (the real one still writes them)."""
    written: list[int] = []
    real = ob._Sink.put

    def put(self, data: bytes) -> None:
        written.append(len(data))
        real(self, data)

    monkeypatch.setattr(ob._Sink, "put", put)
    return written


async def _lying_object(js, good: bytes, big: bytes) -> None:
    """Replace NAME with chunks of `big` under a meta record that states `good`'s size and
    digest (what a worker login can write by hand)."""
    nuid = NUID().next().decode()
    chunks = [big[i : i + CHUNK] for i in range(0, len(big), CHUNK)]
    for c in chunks:
        await js.publish(f"$O.scf_artifacts.C.{nuid}", c)
    info = ob._ObjectInfo(name=NAME, bucket="scf_artifacts", nuid=nuid, size=len(good), chunks=len(chunks),
                          digest="SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(good).digest()).decode(),
                          mtime=dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z"))
    meta = f"$O.scf_artifacts.M.{base64.urlsafe_b64encode(NAME.encode()).decode()}"
    await js.publish(meta, msgspec.json.encode(info), headers={api.Header.ROLLUP.value: "sub"})


def test_worker_cannot_fill_an_edge_disk(hub: Hub, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    written = _spy_sink(monkeypatch)

    async def run() -> None:
        worker = await hub.connect("worker", inbox_prefix="_INBOX.worker")
        w = _Bus(worker.nc, worker.nc.jetstream())
        edge = await hub.connect("edge", inbox_prefix="_INBOX.edge")
        e = _Bus(edge.nc, edge.nc.jetstream())
        wstore = ObjectStoreBackend(w, chunk_size=CHUNK)

        good = secrets.token_bytes(200_000)
        (tmp_path / "good").write_bytes(good)
        ref = await wstore.put(tmp_path / "good", NAME)
        signed = dict(sha256=ref.sha256, size=len(good))  # what the signed release says
        incoming = tmp_path / "incoming"
        incoming.mkdir()

        # 1. The matching artifact deploys.
        await fetch_artifact(e, ref.uri, incoming / "a.safetensors", signed["sha256"], size=signed["size"], max_bytes=1 << 30)
        assert (incoming / "a.safetensors").read_bytes() == good
        assert sum(written) == len(good)

        # 2. The worker replaces the object with a bigger one: refused before a byte is read.
        big = secrets.token_bytes(3_000_000)
        (tmp_path / "big").write_bytes(big)
        await wstore.put(tmp_path / "big", NAME)
        written.clear()
        with pytest.raises(Refused, match=r"size mismatch .* holds 3000000 bytes, expected 200000"):
            await fetch_artifact(e, ref.uri, incoming / "b.safetensors", signed["sha256"], size=signed["size"], max_bytes=1 << 30)
        assert written == [] and sorted(p.name for p in incoming.iterdir()) == ["a.safetensors"]

        # 3. A meta record that lies (the good size and digest, big chunks): the read stops
        #    at the stated size; nothing past it is written, no file is left.
        await _lying_object(w.js, good, big)
        with pytest.raises(Refused, match=r"size mismatch .* chunks exceed the 200000 bytes"):
            await fetch_artifact(e, ref.uri, incoming / "c.safetensors", signed["sha256"], size=signed["size"], max_bytes=1 << 30)
        assert 0 < sum(written) <= len(good)
        assert sorted(p.name for p in incoming.iterdir()) == ["a.safetensors"]

        # 4. An unsized (older) release: bounded by max_artifact_bytes, still before reading.
        await wstore.put(tmp_path / "big", NAME)
        written.clear()
        with pytest.raises(Refused, match=r"size mismatch .* above the 1000000-byte limit"):
            await fetch_artifact(e, ref.uri, incoming / "d.safetensors", hashlib.sha256(big).hexdigest(), size=0, max_bytes=1_000_000)
        assert written == []

        # 5. The genuine artifact put back deploys again.
        await wstore.put(tmp_path / "good", NAME)
        await fetch_artifact(e, ref.uri, incoming / "e.safetensors", signed["sha256"], size=signed["size"], max_bytes=1 << 30)
        assert (incoming / "e.safetensors").read_bytes() == good
        assert edge.errors == [], edge.errors  # (the worker's best-effort purge of replaced chunks is denied it)
        for c in (edge, worker):
            await c.nc.close()

    asyncio.run(run())
