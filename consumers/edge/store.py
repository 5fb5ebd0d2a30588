"""The version store: the artifacts on disk, the `current` link, and the agent's state.

Layout of the agent's directory (`--dir`):

    current -> versions/000003-1a2b…      the active artifact (symlink, switched atomically)
    versions/<version>-<hash>/model.safetensors, release.json (the signed promotion), installed.json
    incoming/                              downloads in progress (never activated from)
    state.json                             activation history (MRU), outcomes of recent orders
    meter/*.json                           meter readings to report (meter.py)

State survives restarts: `state.json` is written atomically after every change and, when
it is missing or unreadable, rebuilt from `versions/*/installed.json` and the `current`
link (the link always wins: it is what runs). An activation under way is saved as
`pending` before `current` is switched (reconcile.py finishes it after a crash).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import shutil
from pathlib import Path

import msgspec

from scf.bus import events as ev
from scf.bus.events import DeployRequested, DeployRollbackRequested

log = logging.getLogger("scf.edge")

MODEL_FILE = "model.safetensors"


class Installed(msgspec.Struct, frozen=True, kw_only=True):
    """An artifact on disk that passed verification."""

    checkpoint_id: str
    domain: str
    version: int
    uri: str
    sha256: str
    size: int
    dirname: str
    deployment_id: str
    plan_id: str
    promotion_id: str = ""
    activated_at: dt.datetime | None = None


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """The recorded result of one deployment order."""

    deployment_id: str
    plan_id: str
    status: str  # activated | failed
    checkpoint_id: str
    version: int
    reason: str = ""
    running_checkpoint_id: str | None = None
    rolled_back_to: str | None = None


class PendingActivation(msgspec.Struct, frozen=True, kw_only=True):
    """An activation under way (a deployment or a rollback): saved before `current` is
    switched, cleared once its outcome is recorded. Found at start, it tells the agent what
    a crash interrupted."""

    order: DeployRequested | DeployRollbackRequested
    previous: str | None = None  # checkpoint id that ran before
    target: str = ""  # checkpoint id being activated

    @property
    def key(self) -> str:
        return order_key(self.order)


def order_key(order: ev.Event) -> str:
    """What an order's outcome is recorded under: a deployment id, or a rollback's request id."""
    data = order.data
    return getattr(data, "deployment_id", None) or getattr(data, "request_id", "")


class EdgeState(msgspec.Struct, kw_only=True):
    node: str
    current: str | None = None  # checkpoint id that `current` points to
    history: list[Installed] = []  # most recently activated last; unique by checkpoint id
    outcomes: list[Outcome] = []  # what became of recent orders (bounded)
    pending: PendingActivation | None = None


def dirname_for(checkpoint_id: str, version: int) -> str:
    return f"{version:06d}-{hashlib.sha256(checkpoint_id.encode()).hexdigest()[:16]}"


class VersionStore:
    """One node's directory: verified artifacts, the atomic `current` link, and the state
    (history, outcomes, the activation under way), saved after every change."""

    def __init__(self, node: str, directory: Path, keep: int = 5) -> None:
        self.node, self.dir, self.keep = node, Path(directory), keep
        self.state = EdgeState(node=node)
        for sub in ("versions", "incoming", "meter"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    @property
    def current_link(self) -> Path:
        return self.dir / "current"

    def version_dir(self, dirname: str) -> Path:
        return self.dir / "versions" / dirname

    def current(self) -> Installed | None:
        return self.find(self.state.current) if self.state.current else None

    def find(self, checkpoint_id: str | None) -> Installed | None:
        for item in self.state.history:
            if item.checkpoint_id == checkpoint_id:
                return item
        return None

    def previous(self, cur: Installed | None) -> Installed | None:
        others = [i for i in self.state.history if cur is None or i.checkpoint_id != cur.checkpoint_id]
        return others[-1] if others else None

    def load(self) -> EdgeState:
        """Read state.json, or rebuild it from the directory; the `current` link wins."""
        state: EdgeState | None = None
        if self.state_path.exists():
            try:
                state = msgspec.json.decode(self.state_path.read_bytes(), type=EdgeState)
            except msgspec.DecodeError as exc:
                log.warning("%s: %s unreadable (%s): rebuilding from %s", self.node, self.state_path, exc, self.dir / "versions")
        if state is None or state.node != self.node:
            state = EdgeState(node=self.node, history=self._scan_versions())
        on_disk = {i.dirname for i in self._scan_versions()}
        state.history = [i for i in state.history if i.dirname in on_disk]
        linked = self._linked_dirname()
        state.current = None
        if linked is not None:
            match = next((i for i in state.history if i.dirname == linked), None)
            if match is None:
                match = self._read_installed(self.version_dir(linked))
                if match is not None:
                    state.history.append(match)
            state.current = match.checkpoint_id if match else None
        self.state = state
        self.save()
        return state

    def _scan_versions(self) -> list[Installed]:
        found = [i for d in sorted((self.dir / "versions").iterdir()) if (i := self._read_installed(d)) is not None]
        far_past = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
        return sorted(found, key=lambda i: i.activated_at or far_past)

    @staticmethod
    def _read_installed(d: Path) -> Installed | None:
        try:
            return msgspec.json.decode((d / "installed.json").read_bytes(), type=Installed)
        except (OSError, msgspec.DecodeError):
            return None

    def _linked_dirname(self) -> str | None:
        try:
            target = os.readlink(self.current_link)
        except OSError:
            return None
        name = Path(target).name
        return name if (self.version_dir(name) / MODEL_FILE).exists() else None

    def save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(msgspec.json.encode(self.state))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_path)

    def switch(self, dirname: str | None) -> None:
        """Point `current` at versions/<dirname> with one atomic rename (None: deactivate)."""
        if dirname is None:
            try:
                self.current_link.unlink()
            except FileNotFoundError:
                pass
            return
        tmp = self.dir / f".current.{os.getpid()}.tmp"
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        os.symlink(os.path.join("versions", dirname), tmp)
        os.replace(tmp, self.current_link)
        try:
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    def activated(self, item: Installed) -> None:
        """Record `item` as the running artifact (most recent in the history); its
        installed.json keeps the activation time, so a rebuilt history keeps the order."""
        (self.version_dir(item.dirname) / "installed.json").write_bytes(msgspec.json.encode(item))
        hist = [i for i in self.state.history if i.checkpoint_id != item.checkpoint_id]
        hist.append(item)
        self.state.history = hist
        self.state.current = item.checkpoint_id
        self.save()
        self._prune()

    def forget(self, bad: Installed, running: Installed | None) -> None:
        """A failed activation: `running` is current again; `bad` leaves the history."""
        self.state.current = running.checkpoint_id if running else None
        self.state.history = [i for i in self.state.history if i.checkpoint_id != bad.checkpoint_id]

    def outcome(self, deployment_id: str) -> Outcome | None:
        return next((o for o in self.state.outcomes if o.deployment_id == deployment_id), None)

    def record(self, outcome: Outcome) -> None:
        rest = [o for o in self.state.outcomes if o.deployment_id != outcome.deployment_id]
        self.state.outcomes = (rest + [outcome])[-256:]
        p = self.state.pending
        if p is not None and p.key == outcome.deployment_id:
            self.state.pending = None
        self.save()

    def begin(self, pending: PendingActivation) -> None:
        """Save the activation under way, before `current` is switched."""
        self.state.pending = pending
        self.save()

    def _prune(self) -> None:
        keep = max(2, self.keep)
        if len(self.state.history) <= keep:
            return
        drop, self.state.history = self.state.history[:-keep], self.state.history[-keep:]
        self.save()
        for item in drop:
            shutil.rmtree(self.version_dir(item.dirname), ignore_errors=True)
