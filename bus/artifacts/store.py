"""`ArtifactStore`: `put` writes to the configured backend; `get`/`stat`/`delete` route by
the URI's scheme, so a node configured for files can still fetch an `obj://` URI.
`open_store(bus, settings)` builds it from `[artifacts]` in scf.toml."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from scf.bus.artifacts.base import ArtifactError, ArtifactRef, ArtifactSettings, Backend
from scf.bus.artifacts.file_backend import FileStoreBackend
from scf.bus.artifacts.object_backend import ObjectStoreBackend
from scf.bus.errors import ConfigError


class ArtifactStore:
    """`put` writes to the configured backend; `get`/`stat`/`delete` route by URI scheme."""

    def __init__(self, primary: Backend, *, bus=None, settings: ArtifactSettings | None = None, file_root: Path | None = None) -> None:
        self.primary = primary
        self.bus = bus
        self.cfg = settings or ArtifactSettings()
        self.file_root = file_root

    @property
    def scheme(self) -> str:
        return self.primary.scheme

    def uri(self, name: str) -> str:
        return self.primary.uri(name)

    def _backend(self, uri: str) -> Backend:
        """The backend that holds `uri` (a bare name: the primary one)."""
        if "://" not in uri:
            return self.primary
        scheme, bucket = uri.split("://", 1)[0], urlparse(uri).netloc
        if scheme == "obj":
            if isinstance(self.primary, ObjectStoreBackend) and self.primary.bucket == bucket:
                return self.primary
            if self.bus is None:
                raise ArtifactError(f"{uri} needs a NATS connection: open the store with open_store(bus, settings)")
            return ObjectStoreBackend(self.bus, bucket, chunk_size=self.cfg.chunk_size, window=self.cfg.window)
        if scheme == "file":
            return self.primary if self.primary.scheme == "file" else FileStoreBackend(self.file_root or "/")
        raise ArtifactError(f"unsupported artifact URI {uri!r}: use obj://BUCKET/NAME or file:///PATH")

    async def put(self, path: str | os.PathLike, name: str, *, meta: dict[str, str] | None = None) -> ArtifactRef:
        return await self.primary.put(path, name, meta=meta)

    async def get(self, uri: str, dest: str | os.PathLike, *, sha256: str | None = None, size: int | None = None,
                  max_bytes: int | None = None) -> Path:
        return await self._backend(uri).get(uri, dest, sha256=sha256, size=size, max_bytes=max_bytes)

    async def stat(self, name_or_uri: str) -> ArtifactRef | None:
        return await self._backend(name_or_uri).stat(name_or_uri)

    async def delete(self, name_or_uri: str) -> bool:
        return await self._backend(name_or_uri).delete(name_or_uri)


def open_store(bus, settings, *, backend: str | None = None) -> ArtifactStore:
    """The artifact store configured by `[artifacts]` in scf.toml (`backend = "object"`,
    the default, or `"file"` with `root = "/shared/dir"`). `bus` may be None for a
    file-only store. `backend`, else SCF_ARTIFACTS (`settings.artifacts_backend`), else
    `[artifacts] backend` picks where `put` writes."""
    cfg = settings.section("artifacts", ArtifactSettings) if settings is not None else ArtifactSettings()
    kind = backend or getattr(settings, "artifacts_backend", None) or cfg.backend
    root = Path(cfg.root).expanduser() if cfg.root else (settings.path("model_zoo", "store") if settings is not None else Path("artifacts"))
    if kind == "object":
        if bus is None:
            raise ConfigError("the object-store artifact backend needs a NATS connection: pass a Bus, or set [artifacts] backend = \"file\"")
        primary: Backend = ObjectStoreBackend(bus, cfg.bucket, chunk_size=cfg.chunk_size, window=cfg.window)
    elif kind == "file":
        primary = FileStoreBackend(root)
    else:
        raise ConfigError(f"[artifacts] backend = {kind!r} is unknown: use \"object\" or \"file\"")
    return ArtifactStore(primary, bus=bus, settings=cfg, file_root=root)
