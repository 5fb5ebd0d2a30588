"""Identifiers.

* event ids are UUIDv7 (time-ordered) from `uuid_utils`;
* effects derived from an input event take ids derived deterministically from that event,
  so a redelivered input produces the same ids and JetStream's dedup drops the repeat;
* content ids (`sha256:…`) name a thing by its canonical encoding.
"""

from __future__ import annotations

import hashlib
import uuid

import uuid_utils

# A fixed namespace for SCF's derived ids (UUIDv5 over it).
SCF_NAMESPACE = uuid.UUID("6f1f2b0e-9c55-4b8a-9a0e-5c0f3d7e2a11")


def new_id() -> str:
    """A fresh time-ordered id (UUIDv7, as text)."""
    return str(uuid_utils.uuid7())


def derived_id(*parts: object) -> str:
    """A deterministic id from the given parts (UUIDv5): same parts, same id."""
    return str(uuid.uuid5(SCF_NAMESPACE, "\x1f".join(str(p) for p in parts)))


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
