"""`FileStoreBackend`: artifacts as files under a directory (local, or a shared mount),
URIs `file:///…`; a `<file>.meta.json` beside each artifact holds its digest, size and
metadata. Files are copied atomically (temp file, fsync, rename) and hashed on the way."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

import msgspec

from scf.bus.artifacts.base import (
    ArtifactError,
    ArtifactNotFound,
    ArtifactRef,
    check_digest,
    check_name,
    dest_file,
    land,
    part_file,
    read_bound,
)
from scf.bus.files import atomic_write, copy_hashing, sha256_file


class _FileMeta(msgspec.Struct, kw_only=True):
    sha256: str
    size: int
    name: str
    meta: dict[str, str] = {}
    stored_at: str = ""


class FileStoreBackend:
    """Artifacts as files under `root` (a shared directory), each with a `.meta.json`."""

    scheme = "file"

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().absolute()

    def uri(self, name: str) -> str:
        return "file://" + quote(str(self.root / name))

    def _path(self, name_or_uri: str) -> Path:
        if name_or_uri.startswith("file://"):
            return Path(unquote(urlparse(name_or_uri).path))
        return self.root / check_name(name_or_uri)

    @staticmethod
    def _meta_path(path: Path) -> Path:
        return path.with_name(path.name + ".meta.json")

    async def stat(self, name_or_uri: str) -> ArtifactRef | None:
        path = self._path(name_or_uri)
        mp = self._meta_path(path)
        if not path.is_file() or not mp.is_file():
            return None
        m = msgspec.json.decode(mp.read_bytes(), type=_FileMeta)
        return ArtifactRef("file://" + quote(str(path)), m.sha256, m.size, dict(m.meta))

    async def put(self, path: str | os.PathLike, name: str, *, meta: dict[str, str] | None = None) -> ArtifactRef:
        src = Path(path)
        if not src.is_file():
            raise ArtifactError(f"no file at {src} to store as {name}")
        target = self._path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest, size = await asyncio.to_thread(copy_hashing, src, target)
        m = _FileMeta(sha256=digest, size=size, name=name, meta=dict(meta or {}),
                      stored_at=dt.datetime.now(dt.timezone.utc).isoformat())
        atomic_write(self._meta_path(target), msgspec.json.encode(m))
        return ArtifactRef("file://" + quote(str(target)), digest, size, dict(meta or {}))

    async def get(self, uri: str, dest: str | os.PathLike, *, sha256: str | None = None, size: int | None = None,
                  max_bytes: int | None = None) -> Path:
        src = self._path(uri)
        if not src.is_file():
            raise ArtifactNotFound(f"no artifact at {src}: check the URI and that the shared directory is mounted")
        read_bound(uri, src.stat().st_size, size, max_bytes)  # before copying (the digest check follows the copy)
        ref = await self.stat(uri)
        expected = (ref.sha256 if ref else None, sha256)
        target = dest_file(dest, src.name)
        if target.resolve() == src.resolve():  # already in place: verify it, copy nothing
            digest, _ = await asyncio.to_thread(sha256_file, src)
            check_digest(uri, digest, *expected)
            return target
        part = part_file(target)
        digest, _ = await asyncio.to_thread(copy_hashing, src, part)
        return land(part, target, uri, digest, *expected)

    async def delete(self, name_or_uri: str) -> bool:
        path = self._path(name_or_uri)
        existed = path.exists()
        path.unlink(missing_ok=True)
        self._meta_path(path).unlink(missing_ok=True)
        return existed

