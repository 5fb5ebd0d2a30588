"""The emergency stop as seen by an effectful consumer.

Engaged when the `emergency` key of the `scf_state` KV bucket says so (the daemon mirrors
`emergency.engaged` / `emergency.released` events there) or when the lock file
`$SCF_HOME/EMERGENCY_LOCK` exists on this host (a stop that works without the bus).
`EmergencyGate` is the runner's pause gate: while engaged, nothing new is handled.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from pathlib import Path

import msgspec

from scf.bus.client import Bus
from scf.bus.streams import KEY_EMERGENCY

log = logging.getLogger("scf.emergency")


class EmergencyState(msgspec.Struct, frozen=True):
    engaged: bool
    reason: str = ""
    by: str = ""
    at: dt.datetime | None = None
    event_id: str | None = None


async def write_state(bus: Bus, state: EmergencyState) -> None:
    kv = await bus.kv("scf_state")
    await kv.put(KEY_EMERGENCY, msgspec.json.encode(state))


async def read_state(bus: Bus) -> EmergencyState:
    kv = await bus.kv("scf_state")
    try:
        entry = await kv.get(KEY_EMERGENCY)
    except Exception:
        return EmergencyState(False)
    if not entry or not entry.value:
        return EmergencyState(False)
    return msgspec.json.decode(entry.value, type=EmergencyState)


class EmergencyGate:
    """The pause gate. The KV watch is the fast path; the entry is also re-read every
    `refresh` seconds, because the watch is an ordered consumer that nats-py resets only
    after missed heartbeats: after a server restart a stop engaged meanwhile reached a
    running gate ~20 s late. A failed re-read keeps the state the gate has; an entry older
    (lower revision) than the one applied never replaces it."""

    def __init__(self, bus: Bus, lock_file: Path, poll: float = 0.2, refresh: float = 1.0) -> None:
        self.bus, self.lock_file, self.poll, self.refresh = bus, Path(lock_file), poll, refresh
        self.kv_state = EmergencyState(False)
        self.revision = 0  # of the scf_state/emergency entry applied
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._warned = 0.0

    @property
    def engaged(self) -> bool:
        return self.kv_state.engaged or self.lock_file.exists()

    @property
    def reason(self) -> str:
        if self.lock_file.exists():
            return f"lock file {self.lock_file}"
        return self.kv_state.reason

    async def start(self) -> "EmergencyGate":
        self.kv_state = await read_state(self.bus)
        kv = await self.bus.kv("scf_state")
        watcher = await kv.watch(KEY_EMERGENCY)
        self._tasks = [asyncio.create_task(self._watch(watcher)), asyncio.create_task(self._poll_file()),
                       asyncio.create_task(self._reread())]
        return self

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _watch(self, watcher) -> None:
        while True:
            entry = await watcher.updates(timeout=None)
            if entry is None:
                continue
            self._apply(entry.value, entry.revision or 0)

    def _apply(self, value: bytes | None, revision: int) -> None:
        if revision and revision < self.revision:
            return  # older than what the gate already applied (a re-read racing the watch)
        if value:
            try:
                state = msgspec.json.decode(value, type=EmergencyState)
            except msgspec.DecodeError:
                log.error("scf_state/emergency holds an unreadable value: treating the stop as engaged")
                state = EmergencyState(True, "unreadable emergency state")
        else:
            state = EmergencyState(False)
        self.revision = max(self.revision, revision)
        if state != self.kv_state:
            self.kv_state = state
            self._changed.set()

    async def _reread(self) -> None:
        import time

        from nats.js.errors import KeyNotFoundError

        while True:
            await asyncio.sleep(self.refresh)
            try:
                kv = await self.bus.kv("scf_state")
                entry = await kv.get(KEY_EMERGENCY)
            except KeyNotFoundError as exc:  # never written, or deleted (KeyDeletedError: its tombstone)
                tomb = getattr(exc, "entry", None)
                if tomb is not None or self.revision == 0:
                    self._apply(b"", getattr(tomb, "revision", 0) or 0)
                continue
            except Exception as exc:  # noqa: BLE001 - server away: keep the state the gate has, try again
                if time.monotonic() - self._warned > 30:
                    self._warned = time.monotonic()
                    log.warning("re-reading scf_state/emergency failed (%s): the gate keeps its state (%s)",
                                type(exc).__name__, "engaged" if self.kv_state.engaged else "clear")
                continue
            self._apply(entry.value, entry.revision or 0)

    async def _poll_file(self) -> None:
        last = self.lock_file.exists()
        while True:
            await asyncio.sleep(self.poll)
            now = self.lock_file.exists()
            if now != last:
                last = now
                self._changed.set()

    async def wait_clear(self) -> None:
        while self.engaged:
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=self.poll * 2)
