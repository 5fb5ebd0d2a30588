"""The seed's file interface: commands written to a JSON file become `control.*` messages.

    scf control watch-file data/scf/control.json

    {"command": "SHIFT_GEAR", "payload": {"level": "ACCELERATED"}}
    {"command": "STOP"}
    [{"command": "EMERGENCY_STOP", "payload": {"reason": "storm"}}, …]   (a list works too)

`COMMAND` maps to the subject `control.<command in lower case>` (SHIFT_GEAR →
control.shift_gear, EMERGENCY_STOP → control.emergency_stop, …); the payload is sent as the
JSON body unchanged (signed with SCF_KEY when set; a signed command gets a fresh `nonce` and
`issued_at` unless the payload has them, for the daemon's replay protection), so the daemon
validates it and anything
wrong — an unknown command, a bad payload — comes back as `control.rejected` with its reason,
exactly as for any other client. Note: in the seed, `{"command": "STOP"}` was described as
the emergency stop; here STOP stops the daemon's loop (control.stop) and EMERGENCY_STOP
engages the emergency stop.

The watcher polls the file (mtime, size and content digest) and sends each new version once.
The digest of the last version sent is kept in `$SCF_HOME/system_cache/control_file.<name>.sent`
so a restarted watcher does not resend a file it already sent, but does send one written
while it was not running. A file that is not valid JSON is reported on stderr and not sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import msgspec

from scf.bus import control
from scf.bus.client import Bus, Throttle
from scf.bus.errors import SCFError
from scf.bus.reader import describe
from scf.bus.runner import Stopping, race, until_stopped
from scf.bus.signing import SigningKey

log = logging.getLogger("scf.control_file")


class ControlFileError(SCFError):
    pass


class FileCommand(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    command: str
    payload: dict = {}


@dataclass(frozen=True)
class Outgoing:
    subject: str
    body: bytes
    payload: dict = field(default_factory=dict)


def parse(text: bytes) -> list[Outgoing]:
    """The control messages a file's content stands for. Raises ControlFileError."""
    if not text.strip():
        return []
    try:
        raw = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise ControlFileError(f"not valid JSON ({exc}): write e.g. {{\"command\": \"STOP\"}}") from None
    items = raw if isinstance(raw, list) else [raw]
    out = []
    for i, item in enumerate(items):
        try:
            cmd = msgspec.convert(item, FileCommand)
        except msgspec.ValidationError as exc:
            raise ControlFileError(f"command {i + 1}: {exc}: write {{\"command\": \"VERB\", \"payload\": {{…}}}}") from None
        verb = cmd.command.strip().lower().replace("-", "_").replace(" ", "_")
        if not verb or not all(ch.isalnum() or ch == "_" for ch in verb):
            raise ControlFileError(f"command {i + 1}: {cmd.command!r} is not a command name")
        out.append(Outgoing(f"control.{verb}", msgspec.json.encode(cmd.payload), cmd.payload))
    return out


def fingerprint(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()


class ControlFileWatcher:
    def __init__(
        self,
        bus: Bus,
        path: str | Path,
        state_dir: str | Path,
        *,
        key: SigningKey | None = None,
        poll: float = 0.2,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.bus = bus
        self.path = Path(path)
        self.key = key
        self.poll = poll
        self.state_file = Path(state_dir) / f"control_file.{hashlib.sha1(str(self.path.absolute()).encode()).hexdigest()[:12]}.sent"
        self.on_error = on_error or (lambda m: log.error("%s", m))
        self.sent = 0
        self._last_stat: tuple[int, int] | None = None
        self._throttle = Throttle(5.0)

    def _sent_digest(self) -> str:
        try:
            return self.state_file.read_text().strip()
        except FileNotFoundError:
            return ""

    def _remember(self, digest: str) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(digest)
        tmp.replace(self.state_file)

    async def check(self, stop: asyncio.Event | None = None) -> int:
        """Send the file's commands if it changed since the last send; returns how many.
        Each publish (its acknowledgement: 5 s with the server away) ends at `stop`
        (`Stopping` raised): the version is then not remembered as sent, and the next run
        sends it (all of its commands, as after a crash)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._last_stat = None
            return 0
        stat = (st.st_mtime_ns, st.st_size)
        if stat == self._last_stat:
            return 0
        text = self.path.read_bytes()
        self._last_stat = stat
        digest = f"{st.st_mtime_ns}:{fingerprint(text)}"
        if digest == self._sent_digest():
            return 0
        try:
            messages = parse(text)
        except ControlFileError as exc:
            self.on_error(f"{self.path}: {exc}")
            self._remember(digest)  # reported once; a corrected file is sent
            return 0
        for m in messages:
            body, headers = m.body, None
            if self.key is not None:
                body, headers = control.sign_json(m.subject, m.payload, self.key)
            ack = await until_stopped(self.bus.js.publish(m.subject, body, headers=headers), stop)
            log.info("%s: sent %s %s (CONTROL seq %s)", self.path, m.subject, body.decode(errors="replace"), ack.seq)
        self._remember(digest)
        self.sent += len(messages)
        return len(messages)

    async def run(self, stop: asyncio.Event) -> None:
        """Check the file every `poll` s until `stop`; a check that fails (the server away:
        a publish times out) is logged and tried again at the next poll, one that the stop
        cuts ends the run (the file is sent by the next run)."""
        while not stop.is_set():
            try:
                await self.check(stop)
            except Stopping:
                log.warning("%s: stopped while sending its commands: the next run sends them", self.path)
                break
            except Exception as exc:  # noqa: BLE001 - the server away: the file is sent at a later check
                self._last_stat = None  # looked at again at the next check
                self._throttle.warn(log, "check", "%s: sending its commands failed (%s): tried again in %g s", self.path, describe(exc), self.poll)
            await race(asyncio.sleep(self.poll), stop)


__all__ = ["ControlFileWatcher", "parse", "Outgoing", "ControlFileError"]
