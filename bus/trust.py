"""The shared trust list: signed grants and revocations on the TRUST stream, applied live.

Which keys may sign what (roles operator / release / node) is a fact of the deployment,
not of one host. It lives on the `TRUST` stream (bus/streams.py), one subject per key,
`trust.key.<kid>`, as a history of entries:

    {"action": "trust",  "kid": …, "public": …, "name": …, "roles": […], "by": …, "at": …, "prev": N}
    {"action": "revoke", "kid": …, "name": …, "by": …, "at": …, "reason": …, "prev": N}

Each entry is signed (Ed25519 over `subject + "\\n" + body`, headers `Scf-Sig` / `Scf-Kid`,
as a control command) by a *root* key: an operator key whose public half every host pins
in `$SCF_HOME/keys/roots.json` (`scf keys root new` / `scf keys root pin`). An entry is
applied only when

* its signer is a pinned root and the signature holds,
* its body names the key of its subject (and, for a grant, a public key with that id and
  known roles), and
* its `prev` is the stream sequence of the last entry *applied* for that key (0 for the
  first): a captured entry replayed later, or two writers racing, is stale and ignored.

Anything else is ignored and logged, never applied. `TrustState` is the pure core (entries
in stream order → keys and revocations); `SharedTrust` is the live view every verifier
holds: a drop-in `TrustList` (same `verify` and `keys`) kept current by an ordered
consumer on `trust.>`, so a grant or a revocation takes effect in every running process
as soon as it is delivered (milliseconds; within seconds across a server restart).

The host-local file `keys/trusted.json` is honoured (and re-read when it changes) only on a
host that pins no root key (`[trust] local_file = "auto"`, the default): there no shared
entry can apply, so the file is the whole list (development, the demo, hosts without a
bus). A host that pins a root relies on the signed TRUST entries alone and ignores the file
(logged once at start, with the fix: `scf keys trust --import`): whoever can write one
host's file must not decide what it trusts. `local_file = true` honours the file as a
supplement anyway (a revocation in the shared list still overrides it); `false` never reads it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from nats.js.errors import APIError, NotFoundError

from scf.bus.errors import ConfigError, SCFError, SignatureError, StreamNotFound
from scf.bus.headers import EXPECTED_LAST_SUBJECT_SEQ, MSG_ID, SCF_KID, SCF_SIG
from scf.bus.reader import StreamMsg, StreamReader, last_seq
from scf.bus.signing import ROLES, SigningKey, TrustedKey, TrustList, command_message, key_id

log = logging.getLogger("scf.trust")

STREAM = "TRUST"
SUBJECT_PREFIX = "trust.key."
MAX_ENTRY_BYTES = 16 * 1024


class TrustWriteError(SCFError):
    """A trust entry could not be written (refused, raced, or ignored on read-back)."""


class TrustSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`[trust]` in scf.toml."""

    # $SCF_HOME/keys/trusted.json: "auto" honours it only where no root key is pinned (so the
    # signed TRUST list is the authority wherever it can apply); true: as a supplement anyway
    local_file: bool | Literal["auto"] = "auto"
    start_timeout: float = 10.0  # how long a process waits to read the shared list at start


class TrustEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    action: Literal["trust", "revoke"]
    kid: str
    by: str
    at: dt.datetime
    prev: int  # TRUST stream seq of the last applied entry for this kid; 0 for the first
    public: str = ""
    name: str = ""
    roles: list[str] = []
    reason: str = ""


def subject_for(kid: str) -> str:
    return SUBJECT_PREFIX + kid


# --------------------------------------------------------------------------- roots


def roots_path(keys_dir: Path) -> Path:
    return Path(keys_dir) / "roots.json"


def load_roots(keys_dir: Path) -> TrustList:
    """The root keys this host pins (key id → public key, name); roles are ["root"]."""
    return TrustList.load(roots_path(keys_dir))


def local_trust_file(keys_dir: Path, cfg: TrustSettings, roots: TrustList) -> Path | None:
    """This host's trusted.json when `[trust] local_file` says to honour it, else None (and,
    when "auto" ignores an existing file because roots are pinned, one warning saying so)."""
    path = Path(keys_dir) / "trusted.json"
    if cfg.local_file == "auto":
        if not roots.keys:
            return path
        if path.exists():
            log.warning("%s is ignored: this host pins root keys, so the signed trust list (TRUST) is the authority; "
                        "move its keys there with `scf keys trust --import`, or set [trust] local_file = true "
                        "to honour it as well", path)
        return None
    return path if cfg.local_file else None


def pin_root(keys_dir: Path, public_b64: str, name: str = "") -> str:
    """Pin a root key on this host (keys/roots.json). Returns its key id."""
    roots = load_roots(keys_dir)
    try:
        raw = base64.b64decode(public_b64.strip(), validate=True)
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:  # binascii.Error is a ValueError
        raise ConfigError("not an Ed25519 public key: pass the base64 text of a NAME.pub file") from None
    kid = key_id(raw)
    roots.keys[kid] = TrustedKey(public=base64.b64encode(raw).decode(), name=name, roles=["root"])
    roots.save()
    return kid


def find_root_key(keys_dir: Path, by: str | None = None) -> SigningKey | None:
    """The private key of a pinned root held on this host: `by` (a name in keys/ or a path),
    else the first keys/*.key whose key id is pinned. None when this host holds none."""
    roots = load_roots(keys_dir)
    if by:
        path = Path(by)
        if not path.suffix:
            path = Path(keys_dir) / f"{by}.key"
        key = SigningKey.load(path)
        if key.kid not in roots.keys:
            raise ConfigError(
                f"key {path} (key id {key.kid}) is not a pinned root on this host: pin it with `scf keys root pin {path.with_suffix('.pub')}`"
            )
        return key
    for path in sorted(Path(keys_dir).glob("*.key")):
        with contextlib.suppress(ConfigError):
            key = SigningKey.load(path)
            if key.kid in roots.keys:
                return key
    return None


# --------------------------------------------------------------------------- the pure core


@dataclass
class Outcome:
    seq: int
    subject: str
    applied: bool
    reason: str = ""  # why it was ignored
    entry: TrustEntry | None = None
    signer: str = ""  # the root's name (or key id)
    time: dt.datetime | None = None  # when the server stored it


_entry_decoder = msgspec.json.Decoder(TrustEntry)


@dataclass
class TrustState:
    """Entries in stream order → the shared list. Pure: no I/O."""

    roots: TrustList
    keys: dict[str, TrustedKey] = field(default_factory=dict)
    revoked: dict[str, TrustEntry] = field(default_factory=dict)
    applied_seq: dict[str, int] = field(default_factory=dict)  # kid → seq of its last applied entry
    history: list[Outcome] | None = None  # kept when auditing (`scf keys log`)

    def apply(self, seq: int, subject: str, headers: dict[str, str] | None, body: bytes, stored: dt.datetime | None = None) -> Outcome:
        out = self._decide(seq, subject, headers or {}, body)
        out.time = stored
        if out.applied and out.entry is not None:
            e = out.entry
            self.applied_seq[e.kid] = seq
            if e.action == "trust":
                self.keys[e.kid] = TrustedKey(public=e.public, name=e.name, roles=list(e.roles))
                self.revoked.pop(e.kid, None)
            else:
                self.keys.pop(e.kid, None)
                self.revoked[e.kid] = e
        if self.history is not None:
            self.history.append(out)
        return out

    def _decide(self, seq: int, subject: str, headers: dict[str, str], body: bytes) -> Outcome:
        def ignored(reason: str, entry: TrustEntry | None = None, signer: str = "") -> Outcome:
            return Outcome(seq, subject, False, reason, entry, signer)

        if len(body) > MAX_ENTRY_BYTES:
            return ignored(f"{len(body)} bytes, more than a trust entry may hold ({MAX_ENTRY_BYTES})")
        sig, kid = headers.get(SCF_SIG), headers.get(SCF_KID)
        if not sig or not kid:
            return ignored("unsigned: trust entries must be signed by a pinned root key (scf keys trust)")
        if kid not in self.roots.keys:
            return ignored(f"signed by key {kid}, which is not a pinned root on this host (keys/roots.json)")
        try:
            signer = self.roots.verify(command_message(subject, body), sig, kid)
        except SignatureError as exc:
            return ignored(str(exc))
        try:
            entry = _entry_decoder.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return ignored(f"malformed trust entry: {exc}", signer=signer)
        if subject != subject_for(entry.kid):
            return ignored(f"entry for key {entry.kid} published on {subject}", entry, signer)
        if entry.action == "trust":
            try:
                raw = base64.b64decode(entry.public, validate=True)
                Ed25519PublicKey.from_public_bytes(raw)
            except ValueError:  # binascii.Error is a ValueError
                return ignored("grant without a valid Ed25519 public key", entry, signer)
            if key_id(raw) != entry.kid:
                return ignored(f"grant's public key has id {key_id(raw)}, not {entry.kid}", entry, signer)
            bad = [r for r in entry.roles if r not in ROLES]
            if bad or not entry.roles:
                return ignored(f"grant with unknown or no roles {bad or entry.roles}: use {', '.join(ROLES)}", entry, signer)
        want = self.applied_seq.get(entry.kid, 0)
        if entry.prev != want:
            return ignored(
                f"stale: it follows TRUST seq {entry.prev}, but the last applied entry for {entry.kid} is seq {want} "
                "(a replayed or concurrent entry)", entry, signer,
            )
        return Outcome(seq, subject, True, "", entry, signer)


# --------------------------------------------------------------------------- writing


def signed_entry(entry: TrustEntry, root: SigningKey) -> tuple[str, bytes, dict[str, str]]:
    subject = subject_for(entry.kid)
    body = msgspec.json.encode(entry)
    headers = {
        SCF_SIG: root.sign(command_message(subject, body)),
        SCF_KID: root.kid,
        MSG_ID: "trust-" + hashlib.sha256(subject.encode() + b"\n" + body).hexdigest()[:32],
    }
    return subject, body, headers


async def publish_entry(js, view: "SharedTrust", root: SigningKey, kid: str, make) -> tuple[int, TrustEntry]:
    """Publish the entry `make(prev)` builds for `kid`, chained to the last entry applied for
    it (`prev`), and wait until `view` applied it. Returns (TRUST seq, entry)."""
    entry: TrustEntry = make(view.state.applied_seq.get(kid, 0))
    subject, body, headers = signed_entry(entry, root)
    headers[EXPECTED_LAST_SUBJECT_SEQ] = str(await last_seq(js, STREAM, subject))
    try:
        ack = await js.publish(subject, body, headers=headers, stream=STREAM)
    except APIError as exc:
        if exc.err_code == 10071:
            raise TrustWriteError(f"the trust entry of {entry.kid} changed while writing: run the command again") from None
        raise TrustWriteError(f"the server refused the trust entry: {exc.description or exc}") from None
    if not await view.sync(min_seq=ack.seq):
        raise TrustWriteError(f"TRUST seq {ack.seq} was written but not read back: check `scf keys log`")
    out = view.outcomes.get(ack.seq)
    if out is not None and not out.applied:
        raise TrustWriteError(f"TRUST seq {ack.seq} was ignored: {out.reason}")
    return ack.seq, entry


# --------------------------------------------------------------------------- the live view


class SharedTrust(TrustList):
    """A `TrustList` that follows the TRUST stream (and this host's trusted.json)."""

    def __init__(self, js, roots: TrustList, local: Path | None = None, *, history: bool = False) -> None:
        super().__init__({}, None)
        self.js = js
        self.roots = roots
        self.local_path = local
        self.state = TrustState(roots, history=[] if history else None)
        self.seq = 0  # last TRUST seq seen
        self.outcomes: dict[int, Outcome] = {}  # recent, for writers reading their own entry back
        self._local: dict[str, TrustedKey] = {}
        self._local_stamp: tuple[int, int] | None = None
        # the TRUST stream, followed (bus/reader.py: resumes after a server restart, waits
        # for a stream that is missing or unreadable)
        self._reader = StreamReader(js._nc, js, STREAM, "trust.>")
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._last_warn = 0.0
        self._quiet = 0

    @property
    def following(self) -> bool:
        """Whether the view reads the TRUST stream (False while it is missing or unreadable)."""
        return self._reader.live

    # ------------------------------------------------------------------ opening
    @classmethod
    async def open(cls, bus, settings=None, *, history: bool = False, timeout: float | None = None) -> "SharedTrust":
        """The live trust view of a process on `bus` (a Bus; its settings name the keys dir)."""
        s = settings or bus.settings
        cfg = s.section("trust", TrustSettings)
        roots = load_roots(s.keys_dir)
        local = local_trust_file(s.keys_dir, cfg, roots)
        view = cls(bus.js, roots, local, history=history)
        await view.start(cfg.start_timeout if timeout is None else timeout)
        return view

    async def start(self, timeout: float = 10.0) -> "SharedTrust":
        """Start following TRUST and wait (up to `timeout`) until what it holds is applied;
        a stream that is missing or unreadable is waited for in the background."""
        self._refresh_local(force=True)
        if not self.roots.keys:  # a development host (its trusted.json is the list): said, not warned, when the file is read
            log.log(logging.INFO if self.local_path is not None else logging.WARNING,
                    "no root keys pinned in keys/roots.json: the shared trust list is ignored on this host (scf keys root pin)")
        self._task = asyncio.create_task(self._follow())
        if not await self._settled(timeout):
            log.warning("the shared trust list was not read to its end within %.0f s: it applies as it arrives", timeout)
        elif self._reader.failed.is_set():
            log.warning("cannot read the shared trust list (%s): verifying with the local trust file until it can", self._reader.problem)
        return self

    async def _settled(self, timeout: float) -> bool:
        """Wait until TRUST is read to its end, or the first try to read it failed."""
        waiters = [asyncio.ensure_future(self._reader.caught_up.wait()), asyncio.ensure_future(self._reader.failed.wait())]
        try:
            done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        return bool(done)

    async def _follow(self) -> None:
        def caught_up() -> None:
            if self._reader.stats.passes > 1:
                log.info("stream %s readable: following the shared trust list", STREAM)

        await self._reader.follow(self._on_msg, self._stop, on_caught_up=caught_up)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def sync(self, min_seq: int | None = None, timeout: float = 5.0) -> bool:
        """Wait until the view has applied TRUST up to `min_seq` (default: what it holds now)."""
        if min_seq is None:
            try:
                min_seq = (await self.js.stream_info(STREAM)).state.last_seq or 0
            except NotFoundError:
                return True
        return await self._reader.reached(min_seq, timeout)

    # ------------------------------------------------------------------ following
    def _on_msg(self, msg: StreamMsg) -> None:
        seq = msg.seq
        try:
            out = self.state.apply(seq, msg.subject, msg.headers, msg.data, msg.time)
        except Exception as exc:  # noqa: BLE001 - nothing on the stream may stop the view
            out = Outcome(seq, msg.subject, False, f"could not be read ({type(exc).__name__}: {exc})")
        self.outcomes[seq] = out
        if len(self.outcomes) > 1024:
            self.outcomes.pop(next(iter(self.outcomes)))
        if out.applied and out.entry is not None:
            e = out.entry
            (log.info if e.action == "trust" else log.warning)("trust: %s %s (%s) roles=%s by %s, signed by root %s (TRUST seq %d)",
                     "granted" if e.action == "trust" else "REVOKED", e.kid, e.name or "unnamed", ",".join(e.roles), e.by, out.signer, seq)
            self._rebuild()
        else:
            self._warn(f"trust entry TRUST seq {seq} ({msg.subject}) ignored, not applied: {out.reason}")
        self.seq = max(self.seq, seq)

    def _warn(self, line: str) -> None:
        now = time.monotonic()
        if now - self._last_warn >= 1.0:  # at most one line a second; a flood is counted
            extra = f" ({self._quiet} more ignored entries not logged)" if self._quiet else ""
            log.warning("%s%s", line, extra)
            self._last_warn, self._quiet = now, 0
        else:
            self._quiet += 1

    def _rebuild(self) -> None:
        merged = dict(self._local)
        merged.update(self.state.keys)
        for kid in self.state.revoked:
            merged.pop(kid, None)
        self.keys = merged
        self._public = {}

    def _refresh_local(self, force: bool = False) -> None:
        if self.local_path is None:
            return
        try:
            st = os.stat(self.local_path)
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = (0, 0)
        if not force and stamp == self._local_stamp:
            return
        self._local_stamp = stamp
        try:
            self._local = TrustList.load(self.local_path).keys if stamp != (0, 0) else {}
        except ConfigError as exc:
            log.error("%s: keeping the previous local trust list", exc)
        self._rebuild()

    # ------------------------------------------------------------------ TrustList's interface
    def trust(self, public_b64: str, name: str = "", roles: list[str] | None = None) -> str:
        raise ConfigError("the shared trust list is written with `scf keys trust` (signed by a root key), not in place")

    def save(self) -> None:
        raise ConfigError("the shared trust list is written with `scf keys trust` (signed by a root key), not saved to a file")

    def verify(self, message: bytes, sig: str | None, kid: str | None, role: str | None = None) -> str:
        self._refresh_local()
        if sig and kid and kid in self.state.revoked and kid not in self.keys:
            r = self.state.revoked[kid]
            raise SignatureError(
                f"signing key {kid} ({r.name or 'unnamed'}) was revoked by {r.by} at {r.at:%Y-%m-%dT%H:%M:%SZ}"
                f"{': ' + r.reason if r.reason else ''}: sign with a trusted key"
            )
        return super().verify(message, sig, kid, role)

    def source_of(self, kid: str) -> str:
        """'shared', 'local' or 'revoked' (for `scf keys ls`)."""
        if kid in self.state.keys:
            return "shared"
        if kid in self.state.revoked:
            return "revoked"
        return "local" if kid in self._local else ""


async def read_log(js, roots: TrustList, timeout: float = 10.0) -> list[Outcome]:
    """Every entry of the TRUST stream with what this host's roots make of it (the audit trail)."""
    view = SharedTrust(js, roots, None, history=True)
    try:
        await StreamReader(js._nc, js, STREAM, "trust.>", stall=timeout).scan(view._on_msg)
    except StreamNotFound:
        return []
    return list(view.state.history or [])


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
