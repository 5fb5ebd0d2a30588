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

from scf.bus import codec
from scf.bus import events as ev
from scf.bus.artifacts import ObjectStoreBackend
from scf.bus.artifacts import object_backend as ob
from scf.bus.codec import Codec
from scf.consumers.edge import Refused, verify_release
from scf.consumers.edge.release import fetch_artifact
from tests import test_deploy_helpers as h
from tests.conftest import wait_for
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


async def _lying_object(js, good: bytes, big: bytes, name: str = NAME) -> None:
    """Replace `name` with chunks of `big` under a meta record that states `good`'s size and
    digest (what a worker login can write by hand)."""
    nuid = NUID().next().decode()
    chunks = [big[i : i + CHUNK] for i in range(0, len(big), CHUNK)]
    for c in chunks:
        await js.publish(f"$O.scf_artifacts.C.{nuid}", c)
    info = ob._ObjectInfo(name=name, bucket="scf_artifacts", nuid=nuid, size=len(good), chunks=len(chunks),
                          digest="SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(good).digest()).decode(),
                          mtime=dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z"))
    meta = f"$O.scf_artifacts.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
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


def test_order_size_must_match_the_signed_release(tmp_path, settings) -> None:
    keys = h.Keys(settings)
    codec_r = Codec([ev.CheckpointPromoted], trust=keys.trust, require_signature=True, role="release")
    h.make_model(tmp_path / "m.safetensors")
    promo = h.promotion("ck-1", 1, tmp_path / "m.safetensors")
    good = h.orders_for(promo, codec.sign(promo, keys.release), ["n"])[0].data
    assert good.artifact.size == (tmp_path / "m.safetensors").stat().st_size
    assert verify_release(good, codec_r).data.size == good.artifact.size
    for size in (0, good.artifact.size * 1000):  # an order that drops or inflates the signed size
        with pytest.raises(Refused, match=r"\(size differ"):
            verify_release(msgspec.structs.replace(good, artifact=msgspec.structs.replace(good.artifact, size=size)), codec_r)


# --------------------------------------------------------------------------- one real agent

NODE = "edge-1"


async def _failed(bus, text: str) -> ev.DeployFailure | None:
    found = [e.data for _, e in await h.events_on(bus, "DEPLOY", f"deploy.failed.{NODE}", [ev.DeployFailed]) if text in e.data.reason]
    return found[-1] if found else None


@pytest.mark.anyio
async def test_edge_agent_refuses_a_replaced_object(bus, settings, scf_env, tmp_path) -> None:
    """The real agent, artifacts in the object store: v1 runs; v2's object is replaced by one
    that lies about its size; the order is refused (deploy.failed, size mismatch, nothing
    left in incoming/), v1 keeps running; v2's genuine object put back deploys."""
    keys = h.Keys(settings)
    keys.node(NODE)
    art, edir, logd = tmp_path / "artifacts", tmp_path / "edge", tmp_path / "logs"
    logd.mkdir()
    store = ObjectStoreBackend(bus, chunk_size=CHUNK)
    promos = []
    for v in (1, 2):
        h.make_model(art / f"v{v}.safetensors", v)
        ref = await store.put(art / f"v{v}.safetensors", f"edge/v{v}.safetensors")
        p = h.promotion(f"ck-{v}", v, art / f"v{v}.safetensors")
        p = msgspec.structs.replace(p, data=msgspec.structs.replace(p.data, uri=ref.uri))
        promos.append((p, *await h.publish_raw(bus, p, keys.release)))
    agent = h.start_edge(dict(scf_env, SCF_LOG="INFO"), NODE, edir, logd, {"domain": "grid:test", "site": "lab"})
    try:
        await wait_for(lambda: h.node_runs(bus, NODE, None), 30, "the agent to register")
        p1, s1, raw1 = promos[0]
        await bus.publish(h.orders_for(p1, raw1, [NODE], seq=s1, plan="plan-1")[0])
        await wait_for(lambda: h.node_runs(bus, NODE, "ck-1"), 30, "v1 active")

        p2, s2, raw2 = promos[1]
        good = (art / "v2.safetensors").read_bytes()
        await _lying_object(bus.js, good, secrets.token_bytes(len(good) * 20), "edge/v2.safetensors")
        await bus.publish(h.orders_for(p2, raw2, [NODE], seq=s2, plan="plan-2")[0])
        await wait_for(lambda: _failed(bus, "size mismatch"), 30, "the replaced object refused")
        f = await _failed(bus, "size mismatch")
        assert f is not None and f.checkpoint_id == "ck-2" and f.running_checkpoint_id == "ck-1"
        assert h.current_model(edir) == "ck-1" and await h.node_runs(bus, NODE, "ck-1")
        assert list((edir / "incoming").iterdir()) == []

        await store.put(art / "v2.safetensors", "edge/v2.safetensors")
        await bus.publish(h.orders_for(p2, raw2, [NODE], seq=s2, plan="plan-3")[0])
        await wait_for(lambda: h.node_runs(bus, NODE, "ck-2"), 30, "v2 active")
        assert h.current_model(edir) == "ck-2"
    finally:
        code = h.stop(agent)
    assert code == 0, h.logs(logd)
