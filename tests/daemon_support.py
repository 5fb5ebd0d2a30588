"""Helpers for the control-plane tests: plain nats-py control commands, reading events back,
running the daemon and the safety gate in-process, making fossils."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json

import nats

from scf.bus import codec
from scf.bus import events as ev
from scf.bus.client import Bus
from scf.bus.headers import SCF_KID, SCF_SIG
from scf.bus.reader import read
from scf.bus.settings import Settings
from scf.bus.signing import SigningKey, TrustList, command_message
from scf.consumers.safety import SafetyGate, SafetySettings
from scf.producers.daemon import Daemon, DaemonSettings
from tests.conftest import wait_for


async def send(settings: Settings, verb: str, body: dict | bytes | None = None, key: SigningKey | None = None) -> int:
    """Publish a control command the way any NATS client would: plain JSON (nats-py)."""
    data = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
    subject = f"control.{verb}"
    headers = None
    if key is not None and not isinstance(body, bytes):  # signed: with nonce and issued_at, as `scf control` sends it
        from scf.bus.control import sign_json

        data, headers = sign_json(subject, body or {}, key)
    elif key is not None:
        headers = {SCF_SIG: key.sign(command_message(subject, data)), SCF_KID: key.kid}
    nc = await nats.connect(settings.nats_url)
    try:
        ack = await nc.jetstream().publish(subject, data, headers=headers)
    finally:
        await nc.close()
    return ack.seq


def operator_key(settings: Settings, name: str = "alice") -> SigningKey:
    """A key trusted as an operator on this test's host."""
    key = SigningKey.generate(name)
    trust = TrustList.load(settings.keys_dir / "trusted.json")
    trust.trust(key.public_b64, name, ["operator"])
    trust.save()
    return key


async def events(bus: Bus, stream: str, subject: str) -> list[ev.Event]:
    """Every event on `subject` (wildcards allowed), oldest first."""
    return [codec.decode(m.data) for m in await read(bus, stream, subject)]


async def wait_events(bus: Bus, stream: str, subject: str, n: int, timeout: float = 20.0) -> list[ev.Event]:
    found: list[ev.Event] = []

    async def enough() -> bool:
        nonlocal found
        found = await events(bus, stream, subject)
        return len(found) >= n

    await wait_for(enough, timeout, f"{n} event(s) on {subject}")
    return found


@contextlib.asynccontextmanager
async def running_daemon(settings: Settings, config: DaemonSettings | None = None, **kw):
    bus = await Bus.connect(settings, "daemon")
    daemon = Daemon(bus, settings, config or DaemonSettings(), **kw)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await wait_for(lambda: daemon.started.is_set() or task.done(), 20, "the daemon to start")
        if task.done():
            task.result()
        yield daemon
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 20)
        await bus.close()


@contextlib.asynccontextmanager
async def running_safety(settings: Settings, config: SafetySettings | None = None):
    bus = await Bus.connect(settings, "safety")
    gate = SafetyGate(bus, config or SafetySettings(concurrency=4))
    stop = asyncio.Event()
    task = asyncio.create_task(gate.run(stop))
    try:
        await wait_for(lambda: bool(gate._tasks) or task.done(), 20, "the safety gate to start")
        if task.done():
            task.result()
        yield gate
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 20)
        await bus.close()


# a fixed observation time: fossils observed at it have the same content ids, and so the same
# held-out split (`ml.loader.in_split`), in every run
FIXED_TIME = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def recorded_fossils(d, x, c, cost, observed_at: dt.datetime | None = None) -> list[ev.FossilRecorded]:
    """`fossil.recorded` events of the (state, context, energy) rows of domain `d`, as ingest
    writes them; observed now, or at `observed_at` (`FIXED_TIME`: the same held-out split in
    every run)."""
    out = []
    for s_x, s_c, e in zip(x, c, cost):
        content = ev.FossilContent(domain=d.name, context=list(map(float, s_c)), state=list(map(float, s_x)), energy=float(e),
                                   observed_at=observed_at or ev.utcnow(), provenance=ev.Provenance(source="t", verifier=d.verifier, verified=True))  # fmt: skip
        f = ev.Fossil(fossil_id=ev.fossil_content_id(content), **{k: getattr(content, k) for k in content.__struct_fields__})
        out.append(ev.FossilRecorded.new(f, source="ingest"))
    return out


def fossil(domain: str, i: int) -> ev.FossilRecorded:
    content = ev.FossilContent(
        domain=domain,
        context=[float(i), 1.0],
        state=[float(i) * 0.5, 2.0],
        energy=float(i),
        observed_at=FIXED_TIME + dt.timedelta(minutes=i),
        provenance=ev.Provenance(source="test", verifier="none", verified=True),
    )
    f = ev.Fossil(fossil_id=ev.fossil_content_id(content), **{k: getattr(content, k) for k in content.__struct_fields__})
    return ev.FossilRecorded.new(f, source="ingest")


async def add_fossils(bus: Bus, domain: str, start: int, n: int) -> None:
    await bus.publish_many([fossil(domain, i) for i in range(start, start + n)])
