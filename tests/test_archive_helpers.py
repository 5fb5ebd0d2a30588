"""Helpers shared by the archive, views, CFR and report tests (no tests here)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import msgspec
from nats.js.errors import NotFoundError

from scf.bus.client import Bus
from scf.bus.settings import Settings
from scf.projections.store import ARCHIVED_STREAMS, ArchiveStore


@dataclass(frozen=True)
class Stored:
    seq: int
    subject: str
    data: bytes
    headers: dict[str, str] | None
    ts_ns: int


def with_archive(settings: Settings, **archive: object) -> Settings:
    """Settings with an `[archive]` table (as scf.toml would give)."""
    raw = dict(settings.raw)
    raw["archive"] = {**raw.get("archive", {}), **archive}
    return msgspec.structs.replace(settings, raw=raw)


def write_toml(settings: Settings, **archive: object) -> None:
    lines = ["[archive]"] + [f"{k} = {msgspec.json.encode(v).decode()}" for k, v in archive.items()]
    (settings.home_path / "scf.toml").write_text("\n".join(lines) + "\n")


async def read_stream(bus: Bus, stream: str) -> list[Stored]:
    """Every message the stream holds now, read with a plain ordered consumer."""
    try:
        info = await bus.js.stream_info(stream)
    except NotFoundError:
        return []
    if info.state.messages == 0:
        return []
    out: list[Stored] = []
    done = asyncio.Event()

    async def cb(msg) -> None:
        md = msg.metadata
        tokens = msg.reply.split(".")
        out.append(Stored(md.sequence.stream, msg.subject, msg.data, msg.headers, int(tokens[7])))
        if md.num_pending == 0:
            done.set()

    sub = await bus.js.subscribe("", stream=stream, ordered_consumer=True, cb=cb)
    try:
        await asyncio.wait_for(done.wait(), 30)
    finally:
        await sub.unsubscribe()
    return out


async def last_seqs(bus: Bus, streams=ARCHIVED_STREAMS) -> dict[str, int]:
    return {s: (await bus.js.stream_info(s)).state.last_seq for s in streams}


async def archived_all(bus: Bus, store: ArchiveStore, streams=ARCHIVED_STREAMS) -> bool:
    want = await last_seqs(bus, streams)
    return all(store.position(s) >= n for s, n in want.items())
