"""Identifiers.

* event ids are UUIDv7 (time-ordered) from `uuid_utils`;
* effects derived from an input event take ids derived deterministically from that event,
  so a redelivered input produces the same ids and JetStream's dedup drops the repeat;
* content ids (`sha256:…`) name a thing by its canonical encoding;
* keyed ids (`keyed_id`): derived like the above, but with the deployment's secret id key, so
  an outsider cannot compute (and pre-empt) the id of an effect.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import uuid
from pathlib import Path

import uuid_utils

from scf.bus.errors import ConfigError

# A fixed namespace for SCF's derived ids (UUIDv5 over it).
SCF_NAMESPACE = uuid.UUID("6f1f2b0e-9c55-4b8a-9a0e-5c0f3d7e2a11")
# The same namespace for uuid_utils' uuid5 (Rust, ~0.5 µs an id against ~4 µs in the standard
# library): the same RFC 4122 SHA-1 construction, so the same ids, bit for bit
# (tests/test_ids_derived.py checks them against `uuid.uuid5`).
_NAMESPACE = uuid_utils.UUID(str(SCF_NAMESPACE))
_uuid5 = uuid_utils.uuid5


def new_id() -> str:
    """A fresh time-ordered id (UUIDv7, as text)."""
    return str(uuid_utils.uuid7())


def derived_id(*parts: object) -> str:
    """A deterministic id from the given parts (UUIDv5): same parts, same id. The name is
    encoded here (UTF-8, as `uuid.uuid5` does: a lone surrogate raises UnicodeEncodeError
    alike) and hashed by uuid_utils."""
    return str(_uuid5(_NAMESPACE, "\x1f".join([str(p) for p in parts]).encode()))


def uuid5(namespace: uuid.UUID, name: str) -> str:
    """`str(uuid.uuid5(namespace, name))`, computed by uuid_utils (the same id, bit for bit)."""
    ns = _namespaces.get(namespace)
    if ns is None:
        ns = _namespaces[namespace] = uuid_utils.UUID(str(namespace))
    return str(_uuid5(ns, name.encode()))


_namespaces: dict[uuid.UUID, uuid_utils.UUID] = {}


def content_id(canonical: bytes) -> str:
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def subject_token(value: str) -> str:
    """Make an arbitrary id safe as one NATS subject token."""
    out = []
    for ch in value:
        if ch.isalnum() or ch in "-_":
            out.append(ch)
        else:
            out.append("_")
    return "".join(out) or "_"


# --------------------------------------------------------------------------- keyed ids
# Ids derived with `derived_id` can be computed by anyone who knows the parts (the
# namespace is public): an outsider who may publish into a stream could take an effect's
# id first and have JetStream drop the real effect as a duplicate. Effects that matter
# take ids keyed with the deployment's secret instead (HMAC-SHA256), shared by the
# service hosts and by nobody else: `$SCF_HOME/keys/ids.key`, mode 0600.

ID_KEY_FILE = "ids.key"


class IdKeyError(ConfigError):
    """The deployment's id key is unreadable or unsafe (message names the fix)."""


def id_key_path(keys_dir: Path) -> Path:
    return Path(keys_dir) / ID_KEY_FILE


def ensure_id_key(keys_dir: Path) -> tuple[Path, bool]:
    """Create the deployment's id key if missing (32 random bytes, hex, mode 0600).
    Returns (path, created)."""
    path = id_key_path(keys_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path, False
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    return path, True


def load_id_key(keys_dir: Path) -> bytes:
    """The deployment's id key. Raises IdKeyError (missing, unsafe mode, malformed)."""
    path = id_key_path(keys_dir)
    try:
        st = path.stat()
        text = path.read_text().strip()
    except FileNotFoundError:
        raise IdKeyError(f"no id key {path}: run `scf init` (or copy ids.key from another service host, mode 0600)") from None
    except OSError as exc:
        raise IdKeyError(f"cannot read the id key {path}: {exc.strerror}") from None
    if st.st_mode & 0o077:
        raise IdKeyError(f"id key {path} is readable by others (mode {st.st_mode & 0o777:o}): run `chmod 600 {path}`")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise IdKeyError(f"id key {path} is not hex text: restore it from another service host") from None
    if len(key) < 16:
        raise IdKeyError(f"id key {path} is shorter than 16 bytes: restore it from another service host")
    return key


def keyed_id(key: bytes, *parts: object) -> str:
    """A deterministic id only holders of `key` can compute (HMAC-SHA256, UUIDv8 layout)."""
    digest = bytearray(hmac.new(key, "\x1f".join(str(p) for p in parts).encode(), hashlib.sha256).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x80  # version 8 (custom)
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()  # uuid.UUID's text form, without building a UUID
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class Ids:
    """How a process derives the ids of its effects: keyed with the deployment's id key when
    the process holds it (the services), public UUIDv5 otherwise (worker, edge: docs/security.md
    says what protects their effects). Same key, same parts: same id, so a redelivered input
    republishes the same ids and JetStream keeps one. `Bus.ids` is the process's deriver;
    `Event.new(..., ids=bus.ids)` derives through it."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or None

    @property
    def keyed(self) -> bool:
        return self._key is not None

    def derive(self, *parts: object) -> str:
        return keyed_id(self._key, *parts) if self._key is not None else derived_id(*parts)

    def __repr__(self) -> str:  # never the key
        return f"Ids(keyed={self.keyed})"


PUBLIC_IDS = Ids(None)


def service_ids(keys_dir: Path) -> Ids:
    """The deriver of a service process: keyed with `$SCF_HOME/keys/ids.key` when the file is
    there (IdKeyError when it is unsafe or malformed), public when it is not (a host that is
    not a service host: no key was copied to it)."""
    if not id_key_path(keys_dir).exists():
        return PUBLIC_IDS
    return Ids(load_id_key(keys_dir))
