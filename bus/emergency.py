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
    def __init__(self, bus: Bus, lock_file: Path, poll: float = 0.2) -> None:
        self.bus, self.lock_file, self.poll = bus, Path(lock_file), poll
        self.kv_state = EmergencyState(False)
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

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
        self._tasks = [asyncio.create_task(self._watch(watcher)), asyncio.create_task(self._poll_file())]
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
            if entry.value:
                try:
                    self.kv_state = msgspec.json.decode(entry.value, type=EmergencyState)
                except msgspec.DecodeError:
                    log.error("scf_state/emergency holds an unreadable value: treating the stop as engaged")
                    self.kv_state = EmergencyState(True, "unreadable emergency state")
            else:
                self.kv_state = EmergencyState(False)
            self._changed.set()

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
