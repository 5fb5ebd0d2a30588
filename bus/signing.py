"""Ed25519 keys, signatures and the trust list.

* Events are signed over `bus.codec.canonical_bytes` (envelope header + the exact payload
  bytes); the signature and key id travel in the envelope (`sig`, `kid`).
* Plain-JSON control commands are signed over `subject + "\\n" + body` and carry the
  signature in the `Scf-Sig` / `Scf-Kid` headers, so any NATS client can send them.
* Verification always happens on bytes, before the payload is parsed.

Keys live in `$SCF_HOME/keys/`: `NAME.key` (PKCS8 PEM, mode 0600) and `NAME.pub` (the raw
public key, base64). `TrustList` is a key id → public key, name and roles (operator,
release, node) map; `TrustList.load` reads a host-local file (`keys/trusted.json`, or
`keys/roots.json` for the pinned root keys). Running processes verify with
`bus.trust.SharedTrust`, a `TrustList` that follows the shared, root-signed trust list on
the TRUST stream live (and this host's trusted.json as a supplement).
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from scf.bus.errors import ConfigError, SignatureError

ROLES = ("operator", "release", "node")


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


class SigningKey:
    def __init__(self, private: Ed25519PrivateKey, name: str = "") -> None:
        self._private = private
        self.name = name
        self.public_raw = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.kid = key_id(self.public_raw)

    @classmethod
    def generate(cls, name: str = "") -> "SigningKey":
        return cls(Ed25519PrivateKey.generate(), name)

    @classmethod
    def load(cls, path: Path) -> "SigningKey":
        try:
            private = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except FileNotFoundError:
            raise ConfigError(f"signing key {path} does not exist: create one with `scf keys new NAME`") from None
        except ValueError as exc:
            raise ConfigError(f"signing key {path} is not a PEM Ed25519 private key ({exc})") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise ConfigError(f"signing key {path} is not an Ed25519 key: create one with `scf keys new NAME`")
        return cls(private, Path(path).stem)

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.name}.key"
        if path.exists():
            raise ConfigError(f"key {path} already exists: choose another name or remove it first")
        pem = self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        (directory / f"{self.name}.pub").write_text(self.public_b64 + "\n")
        return path

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.public_raw).decode()

    def sign(self, message: bytes) -> str:
        return base64.b64encode(self._private.sign(message)).decode()

    def id_key(self) -> bytes:
        """A secret only this key's holder can compute, the same every time (an Ed25519
        signature is deterministic): the key of the ids it gives its effects (`bus.ids.Ids`),
        so no other login can take an effect's id first (docs/security.md)."""
        return hashlib.sha256(b"scf effect ids\x00" + self._private.sign(b"scf effect ids v1")).digest()


class TrustedKey(msgspec.Struct, frozen=True):
    public: str  # base64 raw Ed25519 public key
    name: str = ""
    roles: list[str] = []


class TrustList:
    """Key id → trusted public key with roles."""

    def __init__(self, keys: dict[str, TrustedKey] | None = None, path: Path | None = None) -> None:
        self.keys: dict[str, TrustedKey] = dict(keys or {})
        self.path = path
        self._public: dict[str, Ed25519PublicKey] = {}

    @classmethod
    def load(cls, path: Path) -> "TrustList":
        if not path.exists():
            return cls({}, path)
        try:
            keys = msgspec.json.decode(path.read_bytes(), type=dict[str, TrustedKey])
        except msgspec.DecodeError as exc:
            raise ConfigError(f"trust list {path} is malformed ({exc}): fix or remove it") from None
        return cls(keys, path)

    def save(self) -> None:
        if self.path is None:
            raise ConfigError("this trust list has no file to save to")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.format(msgspec.json.encode(self.keys)))
        tmp.replace(self.path)

    def trust(self, public_b64: str, name: str = "", roles: list[str] | None = None) -> str:
        try:
            raw = base64.b64decode(public_b64.strip(), validate=True)
            Ed25519PublicKey.from_public_bytes(raw)
        except ValueError:  # bad base64 (binascii.Error) or not 32 bytes
            raise ConfigError("not an Ed25519 public key: pass the base64 text of a NAME.pub file") from None
        for role in roles or []:
            if role not in ROLES:
                raise ConfigError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
        kid = key_id(raw)
        self.keys[kid] = TrustedKey(public=base64.b64encode(raw).decode(), name=name, roles=list(roles or ["operator"]))
        self._public.pop(kid, None)
        return kid

    def verify(self, message: bytes, sig: str | None, kid: str | None, role: str | None = None) -> str:
        """Check `sig` over `message`; returns the signer's name (or key id). Raises SignatureError."""
        if not sig or not kid:
            raise SignatureError("missing signature: sign it with a trusted key (`scf keys new`, then `scf keys trust`)")
        if not isinstance(sig, str) or not isinstance(kid, str):  # from outside JSON: a list as a key id was a TypeError
            raise SignatureError("malformed signature: its key id and signature must be strings; sign it again with `scf keys`")
        entry = self.keys.get(kid)
        if entry is None:
            raise SignatureError(f"unknown signing key {kid}: add it to the trust list with `scf keys trust`")
        if role is not None and role not in entry.roles:
            raise SignatureError(f"key {kid} ({entry.name or 'unnamed'}) lacks the {role!r} role")
        pub = self._public.get(kid)
        if pub is None:
            pub = self._public[kid] = Ed25519PublicKey.from_public_bytes(base64.b64decode(entry.public))
        try:
            pub.verify(base64.b64decode(sig, validate=True), message)
        except (InvalidSignature, ValueError):
            raise SignatureError(f"bad signature from key {kid}: the message was altered or signed with another key") from None
        return entry.name or kid


def command_message(subject: str, body: bytes) -> bytes:
    """What a signed control command's signature covers."""
    return subject.encode() + b"\n" + body
