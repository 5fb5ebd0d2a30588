"""The emergency stop as seen by an effectful consumer.

Engaged when the `emergency` key of the `scf_state` KV bucket says so (the daemon mirrors
`emergency.engaged` / `emergency.released` events there) or when the lock file
`$SCF_HOME/EMERGENCY_LOCK` exists on this host (a stop that works without the bus).
`EmergencyGate` is the runner's pause gate: while engaged, nothing new is handled.

A safety gate fails closed: when the state cannot be read (the server away, the bucket
deleted, a timeout) the gate counts as engaged until a read succeeds, and says so at most
once a second. `read_state` raises `EmergencyUnknown` instead of guessing "not engaged".
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from pathlib import Path

import msgspec

from scf.bus.client import Bus, Throttle
from scf.bus.errors import SCFError
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


class EmergencyUnknown(SCFError):
    """The emergency state could not be read: treat the stop as engaged (fail closed)."""


async def read_state(bus: Bus) -> EmergencyState:
    """The stop as `scf_state/emergency` records it: not engaged when the key was never
    written (or was deleted); engaged when its value is unreadable. Raises EmergencyUnknown
    (one line) when the entry cannot be read at all: never a guess that the stop is off."""
    return (await _read_entry(bus))[0]


async def _read_entry(bus: Bus) -> tuple[EmergencyState, int]:
    """(state, revision of the entry; 0 when none)."""
    from nats.js.errors import KeyNotFoundError

    try:
        kv = await bus.kv("scf_state")
        entry = await kv.get(KEY_EMERGENCY)
    except KeyNotFoundError as exc:  # never written, or deleted (KeyDeletedError: its tombstone)
        tomb = getattr(exc, "entry", None)
        return EmergencyState(False), getattr(tomb, "revision", 0) or 0
    except Exception as exc:  # noqa: BLE001 - whatever failed, the state is unknown: the caller fails closed
        raise EmergencyUnknown(
            f"cannot read scf_state/emergency ({type(exc).__name__}: {str(exc)[:120] or 'no detail'}): "
            "treated as engaged until it can be read; check the server and run `scf streams ensure`"
        ) from None
    return _decode_state(entry.value if entry else None), (entry.revision or 0) if entry else 0


def _decode_state(value: bytes | None) -> EmergencyState:
    if not value:
        return EmergencyState(False)
    try:
        return msgspec.json.decode(value, type=EmergencyState)
    except msgspec.DecodeError:
        log.error("scf_state/emergency holds an unreadable value: treating the stop as engaged")
        return EmergencyState(True, "unreadable emergency state")


class EmergencyGate:
    """The pause gate. The KV watch is the fast path; the entry is also re-read every
    `refresh` seconds, because the watch is an ordered consumer that nats-py resets only
    after missed heartbeats: after a server restart a stop engaged meanwhile reached a
    running gate ~20 s late. An entry older (lower revision) than the one applied never
    replaces it. Fails closed: while the entry cannot be read (at start or on a re-read) the
    gate is engaged (`unknown` says why, logged at most once a second) until a read succeeds."""

    def __init__(self, bus: Bus, lock_file: Path, poll: float = 0.2, refresh: float = 1.0) -> None:
        self.bus, self.lock_file, self.poll, self.refresh = bus, Path(lock_file), poll, refresh
        self.kv_state = EmergencyState(False)
        self.revision = 0  # of the scf_state/emergency entry applied
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.unknown: str | None = None  # why the state cannot be read now (None: it was read)
        self._throttle = Throttle(1.0)

    @property
    def engaged(self) -> bool:
        return self.kv_state.engaged or self.unknown is not None or self.lock_file.exists()

    @property
    def reason(self) -> str:
        if self.lock_file.exists():
            return f"lock file {self.lock_file}"
        if self.unknown is not None and not self.kv_state.engaged:
            return self.unknown
        return self.kv_state.reason

    async def start(self) -> "EmergencyGate":
        await self._read()
        tasks = [asyncio.create_task(self._poll_file()), asyncio.create_task(self._reread())]
        try:
            kv = await self.bus.kv("scf_state")
            tasks.append(asyncio.create_task(self._watch(await kv.watch(KEY_EMERGENCY))))
        except Exception as exc:  # noqa: BLE001 - no watch (bucket gone): the re-read every second still sees changes
            log.warning("cannot watch scf_state/emergency (%s): relying on the re-read every %.0f s", exc, self.refresh)
        self._tasks = tasks
        return self

    async def _read(self) -> None:
        """One read of the entry: applied, or the gate fails closed until one succeeds."""
        try:
            state, revision = await _read_entry(self.bus)
        except EmergencyUnknown as exc:
            if self.unknown is None:
                self._changed.set()
            self.unknown = str(exc)
            self._throttle.warn(log, "unknown", "emergency gate closed: %s", exc)
            return
        if self.unknown is not None:
            log.warning("emergency gate: scf_state/emergency read again (%s)", "engaged" if state.engaged else "clear")
            self.unknown = None
            self._changed.set()
        if revision == 0 and self.revision > 0 and not state.engaged:
            return  # the entry vanished without a delete marker (the bucket recreated): keep what the gate applied
        self._apply_state(state, revision)

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
        self._apply_state(_decode_state(value), revision)

    def _apply_state(self, state: EmergencyState, revision: int) -> None:
        if revision and revision < self.revision:
            return
        self.revision = max(self.revision, revision)
        if state != self.kv_state:
            self.kv_state = state
            self._changed.set()

    async def _reread(self) -> None:
        while True:
            await asyncio.sleep(self.refresh)
            await self._read()

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
