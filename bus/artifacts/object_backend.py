"""`ObjectStoreBackend`: artifacts in the JetStream Object Store bucket `scf_artifacts`
(URIs `obj://scf_artifacts/<name>`): what travels between the Mac and a cloud GPU.

Objects are written in the Object Store's own layout (chunks on `$O.<bucket>.C.<nuid>`, the
meta record on `$O.<bucket>.M.<base64url(name)>` with a rollup), so `nats object get` and
nats-py's `ObjectStore.get` read them too. Puts are pipelined (a window of chunk publishes
in flight). Gets do not use nats-py's `ObjectStore.get` (it appends each chunk to a
`bytes`, quadratic: about 2 MiB/s at 256 MiB): the `StreamReader` (bus/reader.py) reads the
chunks straight into a callback that hands each chunk to a writer thread which hashes and
writes it (hashlib and file writes release the GIL); size and SHA-256 are checked against
the meta record before the file appears under its name. Writing a name again replaces it
(the old chunks are purged after the new meta record is stored).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import os
import queue
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

import msgspec
from nats.js import api
from nats.js.errors import NotFoundError
from nats.nuid import NUID

from scf.bus.artifacts.base import (
    DEFAULT_BUCKET,
    DEFAULT_CHUNK,
    DEFAULT_WINDOW,
    ArtifactError,
    ArtifactNotFound,
    ArtifactRef,
    DigestMismatch,
    SizeMismatch,
    check_name,
    dest_file,
    land,
    norm_digest,
    part_file,
    read_bound,
)
from scf.bus.errors import StreamNotFound
from scf.bus.reader import StreamReader


class _Sink:
    """Hashes and writes chunks on a thread (hashlib and file writes release the GIL), so
    the event loop keeps reading the socket. `put` never blocks; `backlog` is the bytes
    not yet written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "wb")
        self.hash = hashlib.sha256()
        self.size = 0
        self.backlog = 0
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="artifact-sink", daemon=True)
        self._thread.start()

    def put(self, data: bytes) -> None:
        with self._lock:
            self.backlog += len(data)
        self._q.put(data)

    def _run(self) -> None:
        while True:
            data = self._q.get()
            if data is None:
                return
            try:
                if self._error is None:
                    self.hash.update(data)
                    self.file.write(data)
                    self.size += len(data)
            except BaseException as exc:  # noqa: BLE001 - disk full …: kept and raised by close() on the event loop
                self._error = exc
            with self._lock:
                self.backlog -= len(data)

    async def close(self) -> str:
        self._q.put(None)
        await asyncio.to_thread(self._thread.join)
        await asyncio.to_thread(self._finish)
        if self._error is not None:
            raise ArtifactError(f"cannot write {self.path}: {self._error}")
        return self.hash.hexdigest()

    def _finish(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def abort(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=5)
        try:
            self.file.close()
        finally:
            self.path.unlink(missing_ok=True)


class _ObjectOptions(msgspec.Struct, omit_defaults=True):
    max_chunk_size: int = 0


class _ObjectInfo(msgspec.Struct, omit_defaults=True):
    """The Object Store's meta record (the Go client's ObjectInfo as JSON)."""

    name: str
    bucket: str
    nuid: str
    size: int = 0
    chunks: int = 0
    digest: str = ""
    mtime: str = ""
    deleted: bool = False
    description: str | None = None
    headers: dict | None = None
    metadata: dict[str, str] | None = None
    options: _ObjectOptions | None = None


def _digest_to_hex(digest: str) -> str:
    value = digest.split("=", 1)[1] if "=" in digest[:9] else digest
    raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    return raw.hex()


def _hex_to_digest(hexdigest: str) -> str:
    return "SHA-256=" + base64.urlsafe_b64encode(bytes.fromhex(hexdigest)).decode()


class ObjectStoreBackend:
    scheme = "obj"

    def __init__(self, bus, bucket: str = DEFAULT_BUCKET, *, chunk_size: int = DEFAULT_CHUNK, window: int = DEFAULT_WINDOW) -> None:
        self.bus, self.bucket = bus, bucket
        self.stream = f"OBJ_{bucket}"
        max_payload = getattr(bus.nc, "max_payload", 1 << 20) or (1 << 20)
        self.chunk_size = max(1024, min(chunk_size, max_payload - 4096))
        self.window = max(window, self.chunk_size)

    # ------------------------------------------------------------- names
    def uri(self, name: str) -> str:
        return f"obj://{self.bucket}/{name}"

    def _name(self, name_or_uri: str) -> str:
        if name_or_uri.startswith("obj://"):
            u = urlparse(name_or_uri)
            if u.netloc != self.bucket:
                raise ArtifactError(f"{name_or_uri} is in bucket {u.netloc}, this store is {self.bucket}")
            return unquote(u.path.lstrip("/"))
        return name_or_uri

    def _meta_subject(self, name: str) -> str:
        return f"$O.{self.bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"

    def _chunk_subject(self, nuid: str) -> str:
        return f"$O.{self.bucket}.C.{nuid}"

    async def _info(self, name: str) -> _ObjectInfo | None:
        try:
            msg = await self.bus.js.get_last_msg(self.stream, self._meta_subject(name))
        except NotFoundError as exc:
            if "stream" in (exc.description or "").lower():
                raise StreamNotFound(f"object store {self.bucket} does not exist: run `scf streams ensure`") from None
            return None
        try:
            info = msgspec.json.decode(msg.data, type=_ObjectInfo)
        except msgspec.DecodeError as exc:
            raise ArtifactError(f"object {name} in {self.bucket} has an unreadable meta record ({exc})") from None
        return None if info.deleted else info

    def _ref(self, info: _ObjectInfo) -> ArtifactRef:
        return ArtifactRef(self.uri(info.name), _digest_to_hex(info.digest) if info.digest else "", info.size, dict(info.metadata or {}))

    # ------------------------------------------------------------- operations
    async def stat(self, name_or_uri: str) -> ArtifactRef | None:
        info = await self._info(self._name(name_or_uri))
        return self._ref(info) if info else None

    async def put(self, path: str | os.PathLike, name: str, *, meta: dict[str, str] | None = None) -> ArtifactRef:
        """Store the file at `path` as `name`: chunks pipelined, then the meta record."""
        name = check_name(name)
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"no file at {path} to store as {name}")
        js = self.bus.js
        old = await self._info(name)
        nuid = NUID().next().decode()
        chunk_subject = self._chunk_subject(nuid)
        h = hashlib.sha256()
        size = chunks = 0
        in_flight: list[asyncio.Future] = []
        max_in_flight = max(2, self.window // self.chunk_size)
        try:
            with open(path, "rb") as f:
                while True:
                    data = await asyncio.to_thread(f.read, self.chunk_size) if self.chunk_size >= (1 << 20) else f.read(self.chunk_size)
                    if not data:
                        break
                    h.update(data)
                    size += len(data)
                    chunks += 1
                    in_flight.append(await js.publish_async(chunk_subject, data))
                    if len(in_flight) >= max_in_flight:
                        await self._settle(in_flight[: max_in_flight // 2])
                        del in_flight[: max_in_flight // 2]
            await self._settle(in_flight)
            info = _ObjectInfo(
                name=name,
                bucket=self.bucket,
                nuid=nuid,
                size=size,
                chunks=chunks,
                digest=_hex_to_digest(h.hexdigest()),
                mtime=dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z"),
                metadata=dict(meta) if meta else None,
                options=_ObjectOptions(max_chunk_size=self.chunk_size),
            )
            await js.publish(
                self._meta_subject(name), msgspec.json.encode(info), headers={api.Header.ROLLUP.value: "sub"}
            )
        except BaseException:
            for fut in in_flight:
                fut.cancel()
            try:
                await js.purge_stream(self.stream, subject=chunk_subject)
            except Exception:  # noqa: BLE001 - best effort: the put's own error is the one to raise; unreferenced chunks harm no reader
                pass
            raise
        if old is not None and old.nuid != nuid:
            try:
                await js.purge_stream(self.stream, subject=self._chunk_subject(old.nuid))
            except Exception:  # noqa: BLE001 - best effort: the new object is stored; the old chunks are unreferenced
                pass
        return self._ref(info)

    @staticmethod
    async def _settle(futures: list[asyncio.Future], timeout: float = 30.0) -> None:
        if not futures:
            return
        done, pending = await asyncio.wait(futures, timeout=timeout)
        if pending:
            raise ArtifactError(f"{len(pending)} chunk publishes were not acknowledged in {timeout:.0f}s: check NATS and retry")
        for fut in done:
            exc = fut.exception()
            if exc is not None:
                raise ArtifactError(f"storing a chunk failed: {exc}")

    async def get(self, uri: str, dest: str | os.PathLike, *, sha256: str | None = None, size: int | None = None,
                  max_bytes: int | None = None) -> Path:
        """Fetch `uri` to `dest` (a file, or a directory to put it in); the file appears
        only once its size and digest (and `sha256`, when given) are verified. The meta
        record's size is checked against `size` and `max_bytes` before any chunk is read,
        and the read stops (SizeMismatch) as soon as the chunks exceed it: a replaced or
        lying object never costs more than the expected bytes of disk."""
        name = self._name(uri)
        info = await self._info(name)
        if info is None:
            raise ArtifactNotFound(f"no artifact {self.uri(name)}: check the URI (list with `nats object ls {self.bucket}`)")
        if info.options is not None and getattr(info.options, "link", None):
            raise ArtifactError(f"{self.uri(name)} is a link: links are not supported")
        target = dest_file(dest, name)
        part = part_file(target)
        want = _digest_to_hex(info.digest) if info.digest else None
        sha256 = norm_digest(sha256)
        bound = read_bound(self.uri(name), info.size, size, max_bytes)
        if sha256 and want and sha256 != want:
            raise DigestMismatch(f"{self.uri(name)} holds sha256 {want}, expected {sha256}: the artifact was replaced")
        sink = _Sink(part)
        taken = 0  # bytes handed to the sink: never more than `bound`

        def take(chunk) -> None:
            nonlocal taken
            taken += len(chunk.data)
            if taken > bound:  # more chunk bytes than the meta record says
                raise SizeMismatch(f"{self.uri(name)}: its chunks exceed the {bound} bytes its meta record says: "
                                   "the object was replaced or is corrupt; not fetched")
            sink.put(chunk.data)

        try:
            if info.chunks:
                reader = StreamReader(self.bus.nc, self.bus.js, self.stream, self._chunk_subject(info.nuid), limit=info.chunks)
                await reader.scan(take)
            digest = await sink.close()
        except BaseException:
            sink.abort()
            raise
        if sink.size != info.size:
            part.unlink(missing_ok=True)
            raise ArtifactError(f"{self.uri(name)}: read {sink.size} bytes, the meta record says {info.size}: retry the get")
        return land(part, target, self.uri(name), digest, want, sha256)

    async def delete(self, name_or_uri: str) -> bool:
        name = self._name(name_or_uri)
        info = await self._info(name)
        if info is None:
            return False
        tomb = msgspec.structs.replace(info, deleted=True, size=0, chunks=0, digest="")
        await self.bus.js.publish(self._meta_subject(name), msgspec.json.encode(tomb), headers={api.Header.ROLLUP.value: "sub"})
        await self.bus.js.purge_stream(self.stream, subject=self._chunk_subject(info.nuid))
        return True
