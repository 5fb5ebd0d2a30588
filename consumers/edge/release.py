"""Release checks: what the agent verifies before anything it is sent can run.

* `verify_release` — the order carries the signed `checkpoint.promoted` event (`release`,
  raw bytes); its Ed25519 signature must come from a trusted key with role `release`, and
  the artifact the order names must be the one that was signed (checkpoint id, domain,
  version, uri, sha256, size): nothing unsigned is ever fetched;
* `fetch_artifact` — the artifact through the artifact store: its stored size compared
  with the signed size before a byte is read (no more than that is ever written), its
  sha256 checked against the signed digest before the file appears.

A failed check raises `Refused` (reported as deploy.failed, then acked); `EdgeError` is
the root of the agent's errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Awaitable, Protocol

from scf.bus import events as ev
from scf.bus.artifacts import DigestMismatch, SizeMismatch, open_store
from scf.bus.client import Bus
from scf.bus.codec import Codec
from scf.bus.errors import DecodeError, SCFError, SignatureError
from scf.bus.events import DeployRequest


class EdgeError(SCFError):
    pass


class Refused(EdgeError):
    """An order the agent will not carry out (reported as deploy.failed, then acked)."""


def normalise_digest(d: str) -> str:
    return d.lower().removeprefix("sha256:")


def verify_release(order: DeployRequest, codec: Codec) -> ev.CheckpointPromoted:
    """The signed promotion the order deploys, or Refused with the reason."""
    if not order.release:
        raise Refused("unsigned release: the order carries no signed checkpoint.promoted (release is empty)")
    try:
        promotion = codec.decode(order.release)
    except SignatureError as exc:
        raise Refused(f"release signature refused: {exc}") from None
    except DecodeError as exc:
        raise Refused(f"release is not a checkpoint.promoted event: {exc}") from None
    assert isinstance(promotion, ev.CheckpointPromoted)
    p, a = promotion.data, order.artifact
    mismatched = [
        name
        for name, signed, asked in (
            ("checkpoint_id", p.checkpoint_id, a.checkpoint_id),
            ("domain", p.domain, a.domain),
            ("version", p.version, a.version),
            ("uri", p.uri, a.uri),
            ("sha256", normalise_digest(p.sha256), normalise_digest(a.sha256)),
            ("size", p.size, a.size),
        )
        if signed != asked
    ]
    if mismatched:
        raise Refused(f"the order does not match its signed release ({', '.join(mismatched)} differ): refusing")
    return promotion


class Fetcher(Protocol):
    """Contract for any replacement of `fetch_artifact`: `dest` exists on return only with
    content of digest `sha256` (and `size` bytes, when > 0), and no more than `size` bytes
    (`max_bytes` when the size is unknown) were ever written; otherwise raise `Refused`
    (mismatch) or any other error (retry)."""

    def __call__(self, bus: Bus, uri: str, dest: Path, sha256: str, *, size: int, max_bytes: int) -> Awaitable[None]: ...


async def fetch_artifact(bus: Bus, uri: str, dest: Path, sha256: str, *, size: int, max_bytes: int) -> None:
    """Copy the artifact at `uri` to `dest` through the artifact store (`bus.artifacts`:
    `obj://BUCKET/NAME` or `file:///PATH`), which compares the stored size with `size` (the
    signed release's; 0 in releases signed before sizes: then at most `max_bytes`) before
    reading anything, stops a read that runs past it, and checks `sha256` before the file
    appears. A size or digest mismatch is a refusal (tampered or replaced), anything else
    may be transient."""
    try:
        await open_store(bus, bus.settings).get(uri, dest, sha256=sha256, size=size or None,
                                                max_bytes=None if size else max_bytes)
    except SizeMismatch as exc:
        raise Refused(f"size mismatch (a replaced or oversized artifact; not fetched, not activated): {exc}") from None
    except DigestMismatch as exc:
        raise Refused(f"digest mismatch (a tampered or corrupt artifact; not activated): {exc}") from None
