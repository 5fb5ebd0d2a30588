"""The artifact store and the stream reader under nats/prod.conf + users.conf as written:
a GPU worker (user `worker`) stores a checkpoint and reads its training fossils, an edge
node (user `edge`) fetches the checkpoint — with no permission violation, because every
read goes through the one consumer kind those users may create (unnamed ephemeral push
consumers with flow control) and nothing deletes consumers by request."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from dataclasses import dataclass

import pytest

from scf.bus.artifacts import ObjectStoreBackend
from scf.bus.reader import StreamReader
from tests.test_nats_configs import Hub, hub, passwords, tls_files  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(60)


@dataclass
class _Conn:
    """What the artifact store needs of a Bus: the connection and its JetStream context."""

    nc: object
    js: object


def test_worker_stores_and_reads_edge_fetches(hub: Hub, tmp_path) -> None:  # noqa: F811
    async def run() -> None:
        service = await hub.connect("service")
        sjs = service.nc.jetstream()
        for i in range(1, 51):
            await sjs.publish(f"fossil.recorded.grid_case9.perm{i:02d}", b'{"n": %d}' % i)

        worker = await hub.connect("worker", inbox_prefix="_INBOX.worker")
        w = _Conn(worker.nc, worker.nc.jetstream())
        seen: list[int] = []
        await StreamReader(w.nc, w.js, "FOSSILS", "fossil.recorded.grid_case9.>").scan(lambda m: seen.append(m.seq))
        assert len(seen) == 50 and seen == sorted(seen)

        src = tmp_path / "ckpt.safetensors"
        data = secrets.token_bytes(700_000)
        src.write_bytes(data)
        ref = await ObjectStoreBackend(w, chunk_size=128 * 1024).put(src, "grid_case9/perm-job.safetensors", meta={"job_id": "perm"})
        assert ref.sha256 == hashlib.sha256(data).hexdigest()
        assert worker.errors == [], worker.errors

        edge = await hub.connect("edge", inbox_prefix="_INBOX.edge")
        e = _Conn(edge.nc, edge.nc.jetstream())
        out = await ObjectStoreBackend(e).get(ref.uri, tmp_path / "fetched.safetensors", sha256=ref.sha256)
        assert out.read_bytes() == data
        assert (await ObjectStoreBackend(e).stat(ref.uri)) == ref
        assert edge.errors == [], edge.errors
        for c in (edge, worker, service):
            await c.nc.close()

    asyncio.run(run())
