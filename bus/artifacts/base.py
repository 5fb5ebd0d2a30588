"""What every artifact backend shares: `ArtifactRef`, the `Backend` interface, the errors,
`[artifacts]` settings, and the rules for names, digests and destinations."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import msgspec

from scf.bus.errors import SCFError

DEFAULT_BUCKET = "scf_artifacts"
DEFAULT_CHUNK = 256 * 1024  # bytes per Object Store chunk (nats-py/Go write 128 KiB)
DEFAULT_WINDOW = 16 << 20  # bytes of chunk publishes in flight during a put
_NAME = re.compile(r"[-/_=.a-zA-Z0-9]+")


class ArtifactError(SCFError):
    """Root of the artifact store's errors."""


class ArtifactNotFound(ArtifactError):
    pass


class DigestMismatch(ArtifactError):
    pass


class SizeMismatch(DigestMismatch):
    """The stored object is not the size the caller expects (or above its bound): refused
    before its content is read (a content mismatch, so a DigestMismatch too)."""


def read_bound(uri: str, stored: int, size: int | None, max_bytes: int | None) -> int:
    """The most bytes a get of `uri` may read: the store's recorded size `stored`, once it
    equals the expected `size` (when given, > 0) and is at most `max_bytes` (when given);
    otherwise SizeMismatch, before anything is read."""
    if size and stored != size:
        raise SizeMismatch(f"{uri} holds {stored} bytes, expected {size}: the artifact was replaced; not fetched")
    if max_bytes is not None and stored > max_bytes:
        raise SizeMismatch(f"{uri} holds {stored} bytes, above the {max_bytes}-byte limit for an artifact of unknown size; "
                           "not fetched (sign releases with their size, or raise the limit)")
    return stored


@dataclass(frozen=True)
class ArtifactRef:
    """Where an artifact lives and what it is: `sha256` is lowercase hex."""

    uri: str
    sha256: str
    size: int
    meta: dict[str, str] = field(default_factory=dict)


class ArtifactSettings(msgspec.Struct, frozen=True, kw_only=True):
    """`[artifacts]` in scf.toml."""

    backend: str = "object"  # object | file
    bucket: str = DEFAULT_BUCKET
    root: str = ""  # file backend directory; default $SCF_HOME/model_zoo/store
    chunk_size: int = DEFAULT_CHUNK
    window: int = DEFAULT_WINDOW


class Backend(Protocol):
    """One place artifacts live. `get` writes the file under its name only once its size and
    digest are verified; with `size` (the expected bytes) or `max_bytes` (a ceiling) it
    refuses (SizeMismatch) an object of another size before reading it, and never reads
    more bytes than it expects; `stat` and `delete` take a name or a URI of this backend."""

    scheme: str

    def uri(self, name: str) -> str: ...

    async def put(self, path: str | os.PathLike, name: str, *, meta: dict[str, str] | None = None) -> ArtifactRef: ...

    async def get(self, uri: str, dest: str | os.PathLike, *, sha256: str | None = None, size: int | None = None,
                  max_bytes: int | None = None) -> Path: ...

    async def stat(self, name_or_uri: str) -> ArtifactRef | None: ...

    async def delete(self, name_or_uri: str) -> bool: ...


def dest_file(dest: str | os.PathLike, name: str) -> Path:
    """`dest` itself, or `dest/<basename of name>` when dest is an existing directory or
    ends with a separator."""
    d = Path(dest)
    if d.is_dir() or str(dest).endswith(os.sep):
        d.mkdir(parents=True, exist_ok=True)
        return d / Path(name).name
    d.parent.mkdir(parents=True, exist_ok=True)
    return d


def norm_digest(digest: str | None) -> str | None:
    """Lowercase hex; a `sha256:` prefix is accepted."""
    return digest.removeprefix("sha256:").lower() if digest else None


def check_name(name: str) -> str:
    """`name` if it is a valid artifact name (a relative path of safe characters)."""
    if not name or name.startswith("/") or ".." in name.split("/") or not _NAME.fullmatch(name):
        raise ArtifactError(f"artifact name {name!r} is not valid: use letters, digits and - / _ = . (no leading / or ..)")
    return name


def part_file(target: Path) -> Path:
    """Where a get writes before the content is verified: a hidden file beside `target`."""
    return target.with_name(f".{target.name}.{os.getpid()}.part")


def check_digest(uri: str, digest: str, *expected: str | None) -> None:
    """Raise DigestMismatch unless `digest` equals every expected digest given (None: no check)."""
    for e in map(norm_digest, expected):
        if e and digest != e:
            raise DigestMismatch(f"{uri}: content sha256 {digest} does not match {e}: the artifact is corrupt or was replaced")


def land(part: Path, target: Path, uri: str, digest: str, *expected: str | None) -> Path:
    """Rename `part` onto `target` if `digest` (of its content) matches every expected digest
    given; else remove it and raise DigestMismatch. A reader never sees an unverified file."""
    try:
        check_digest(uri, digest, *expected)
        os.replace(part, target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return target
