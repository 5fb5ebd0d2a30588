"""The artifact store: checkpoints and release blobs, by URI, verified by sha256.

Two backends behind one interface:

* `ObjectStoreBackend` — the JetStream Object Store bucket `scf_artifacts` (URIs
  `obj://scf_artifacts/<name>`): what travels between the Mac and a cloud GPU. Objects are
  written in the Object Store's own layout (chunks on `$O.<bucket>.C.<nuid>`, the meta
  record on `$O.<bucket>.M.<base64url(name)>` with a rollup), so `nats object get` and
  nats-py's `ObjectStore.get` read them too. Puts are pipelined (a window of chunk
  publishes in flight). Gets do not use nats-py's `ObjectStore.get` (it appends each
  chunk to a `bytes`, quadratic: about 2 MiB/s at 256 MiB): `StreamReader` reads the
  chunks through an unnamed ephemeral push consumer (no acks, flow control) straight into
  a callback that hands each chunk to a writer thread which hashes and writes it (hashlib
  and file writes release the GIL); gaps are detected by the consumer sequence and the
  read resumes from the last stream sequence on a new consumer; size and SHA-256 are
  checked against the meta record before the file appears under its name.
* `FileStoreBackend(root)` — a directory (local, or a shared mount), URIs `file:///…`;
  a `<file>.meta.json` beside each artifact holds its digest, size and metadata.

    store = open_store(bus, settings)             # backend from [artifacts] in scf.toml
    ref = await store.put(path, "grid_case14/<job_id>.safetensors", meta={"job_id": …})
    path = await store.get(ref.uri, dest_dir, sha256=ref.sha256)   # any scheme

`get` routes by the URI's scheme whatever backend `put` writes to, so a node configured
for files can still fetch an `obj://` URI. Digests are lowercase hex SHA-256 (no prefix).
Artifacts are written once per name in practice (a job's checkpoint); writing a name
again replaces it (the old chunks are purged after the new meta record is stored).

`StreamReader` is also the fast path for reading a range of any stream (the GPU worker
pulls a job's fossils with it).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol
from urllib.parse import quote, unquote, urlparse

import msgspec
from nats.js import api
from nats.js.errors import NotFoundError
from nats.nuid import NUID

from scf.bus.errors import ConfigError, SCFError, StreamNotFound

DEFAULT_BUCKET = "scf_artifacts"
DEFAULT_CHUNK = 256 * 1024  # bytes per Object Store chunk (nats-py/Go write 128 KiB)
DEFAULT_WINDOW = 16 << 20  # bytes of chunk publishes in flight during a put


class ArtifactError(SCFError):
    """Root of the artifact store's errors."""


class ArtifactNotFound(ArtifactError):
    pass


class DigestMismatch(ArtifactError):
    pass


# --------------------------------------------------------------------------- interface


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
    scheme: str

    def uri(self, name: str) -> str: ...

    async def put(self, path: str | os.PathLike, name: str, *, meta: dict[str, str] | None = None) -> ArtifactRef: ...

    async def get(self, uri: str, dest: str | os.PathLike, *, sha256: str | None = None) -> Path: ...

    async def stat(self, name_or_uri: str) -> ArtifactRef | None: ...

    async def delete(self, name_or_uri: str) -> bool: ...


def _dest_file(dest: str | os.PathLike, name: str) -> Path:
    """`dest` itself, or `dest/<basename of name>` when dest is an existing directory or
    ends with a separator."""
    d = Path(dest)
    if d.is_dir() or str(dest).endswith(os.sep):
        d.mkdir(parents=True, exist_ok=True)
        return d / Path(name).name
    d.parent.mkdir(parents=True, exist_ok=True)
    return d


def _norm_digest(digest: str | None) -> str | None:
    """Lowercase hex; a `sha256:` prefix is accepted."""
    return digest.removeprefix("sha256:").lower() if digest else None


def _check_name(name: str) -> str:
    import re

    if not name or name.startswith("/") or ".." in name.split("/") or not re.fullmatch(r"[-/_=.a-zA-Z0-9]+", name):
        raise ArtifactError(f"artifact name {name!r} is not valid: use letters, digits and - / _ = . (no leading / or ..)")
    return name


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
            except BaseException as exc:  # disk full …: reported by close()
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


# --------------------------------------------------------------------------- stream reader


@dataclass
class ReadStats:
    messages: int = 0
    bytes: int = 0
    last_seq: int = 0
    passes: int = 0  # consumers used (1 unless a gap or a stall forced a resume)
    seconds: float = 0.0


class ReadStalled(ArtifactError):
    pass


def _ack_tokens(reply: str) -> tuple[int, int, int]:
    """(stream seq, consumer seq, pending) from a JetStream ack subject (v1 or v2)."""
    t = reply.split(".")
    if len(t) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return int(t[5]), int(t[6]), int(t[8])
    # $JS.ACK.<domain>.<acc>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>[.<rand>]
    return int(t[7]), int(t[8]), int(t[10])


class StreamReader:
    """Read the messages of `stream` matching `subject` from `start_seq` (to `end_seq`,
    inclusive, when > 0) as fast as the connection allows, in stream order, each once.

    The consumer is the kind every reading role may create (nats/users.conf grants
    `$JS.API.CONSUMER.CREATE.<stream>` and `$JS.FC.<stream>.>`): an unnamed ephemeral push
    consumer onto this connection's inbox, no acks, in memory, with flow control and idle
    heartbeats. Flow-control requests are answered when every message before them has
    been handed over, so the server never runs more than its flow-control window ahead.
    `on_message(data, stream_seq)` runs on the event loop, in order. A gap in the consumer
    sequence (a slow-consumer drop) or `stall` seconds without a message or heartbeat end
    the pass; the next pass starts a new consumer after the last message handed over (at
    most `max_passes`). Consumers are never deleted by request (readers may lack that
    permission): unsubscribing ends their interest and the server removes them."""

    def __init__(
        self,
        nc,
        js,
        stream: str,
        subject: str,
        *,
        start_seq: int = 1,
        end_seq: int = 0,
        stall: float = 10.0,
        max_passes: int = 5,
        expected: int | None = None,
        heartbeat: float = 2.0,
        batch: int = 0,  # accepted for compatibility; flow control paces the push consumer
    ) -> None:
        self.nc, self.js, self.stream, self.subject = nc, js, stream, subject
        self.start_seq, self.end_seq = max(1, start_seq), end_seq
        self.stall, self.max_passes, self.heartbeat = stall, max_passes, heartbeat
        self.expected = expected  # stop after this many messages (an object's chunk count)
        self.stats = ReadStats()

    async def run(self, on_message: Callable[[bytes, int], None]) -> ReadStats:
        t0 = time.perf_counter()
        last = self.start_seq - 1
        while True:
            self.stats.passes += 1
            finished, last = await self._pass(last, on_message)
            if finished:
                break
            if self.stats.passes >= self.max_passes:
                raise ReadStalled(
                    f"reading {self.stream} {self.subject} stalled {self.stats.passes} times at seq {last}: "
                    "check the connection to NATS and retry"
                )
        self.stats.last_seq = last
        self.stats.seconds = time.perf_counter() - t0
        return self.stats

    def _done_reading(self) -> bool:
        return self.expected is not None and self.stats.messages >= self.expected

    async def _pass(self, last: int, on_message: Callable[[bytes, int], None]) -> tuple[bool, int]:
        if self._done_reading() or (self.end_seq and last >= self.end_seq):
            return True, last
        state = {"last": last, "cseq": 0, "progress": time.monotonic(), "gap": False}
        done = asyncio.Event()
        nc = self.nc

        async def on_msg(msg) -> None:
            if done.is_set():
                return
            state["progress"] = time.monotonic()
            hdr = msg.headers
            if hdr and hdr.get("Status") == "100":  # flow control request, or idle heartbeat
                if msg.reply:
                    await nc.publish(msg.reply, b"")
                stalled = hdr.get(api.Header.CONSUMER_STALLED.value)
                if stalled:
                    await nc.publish(stalled, b"")
                return
            if not msg.reply or not msg.reply.startswith("$JS.ACK."):
                return
            sseq, cseq, left = _ack_tokens(msg.reply)
            if cseq != state["cseq"] + 1:
                state["gap"] = True  # a dropped message: resume after the last good one
                done.set()
                return
            state["cseq"] = cseq
            if self.end_seq and sseq > self.end_seq:
                done.set()
                return
            on_message(msg.data, sseq)
            state["last"] = sseq
            self.stats.messages += 1
            self.stats.bytes += len(msg.data)
            if left == 0 or (self.end_seq and sseq >= self.end_seq) or self._done_reading():
                done.set()

        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
        try:
            cfg = api.ConsumerConfig(
                deliver_subject=inbox,
                ack_policy=api.AckPolicy.NONE,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=last + 1,
                filter_subject=self.subject,
                flow_control=True,
                idle_heartbeat=self.heartbeat,
                mem_storage=True,
                num_replicas=1,
                inactive_threshold=max(5.0, 2 * self.heartbeat),
            )
            try:
                info = await self.js.add_consumer(self.stream, cfg)
            except NotFoundError:
                raise StreamNotFound(f"stream {self.stream} does not exist: run `scf streams ensure`") from None
            if not info.num_pending and not info.delivered.consumer_seq:
                return True, last  # nothing (more) matches
            while not done.is_set():
                try:
                    await asyncio.wait_for(done.wait(), timeout=min(1.0, self.stall))
                except asyncio.TimeoutError:
                    if time.monotonic() - state["progress"] > self.stall:
                        break  # stalled: resume on a new consumer
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        return done.is_set() and not state["gap"], state["last"]


# --------------------------------------------------------------------------- object store


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
        name = _check_name(name)
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
            except Exception:
                pass
            raise
        if old is not None and old.nuid != nuid:
            try:
                await js.purge_stream(self.stream, subject=self._chunk_subject(old.nuid))
            except Exception:
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

    async def get(self, uri: str, dest: str | os.PathLike, *, sha256: str | None = None) -> Path:
        """Fetch `uri` to `dest` (a file, or a directory to put it in); the file appears
        only once its size and digest (and `sha256`, when given) are verified."""
        name = self._name(uri)
        info = await self._info(name)
        if info is None:
            raise ArtifactNotFound(f"no artifact {self.uri(name)}: check the URI (list with `nats object ls {self.bucket}`)")
        if info.options is not None and getattr(info.options, "link", None):
            raise ArtifactError(f"{self.uri(name)} is a link: links are not supported")
        target = _dest_file(dest, name)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        want = _digest_to_hex(info.digest) if info.digest else None
        sha256 = _norm_digest(sha256)
        if sha256 and want and sha256 != want:
            raise DigestMismatch(f"{self.uri(name)} holds sha256 {want}, expected {sha256}: the artifact was replaced")
        sink = _Sink(tmp)
        try:
            if info.chunks:
                reader = StreamReader(self.bus.nc, self.bus.js, self.stream, self._chunk_subject(info.nuid), expected=info.chunks)

                def on_chunk(data: bytes, _seq: int) -> None:
                    sink.put(data)

                await reader.run(on_chunk)
            digest = await sink.close()
        except BaseException:
            sink.abort()
            raise
        try:
            if sink.size != info.size:
                raise ArtifactError(f"{self.uri(name)}: read {sink.size} bytes, the meta record says {info.size}: retry the get")
            for expected in (want, sha256):
                if expected and digest != expected:
                    raise DigestMismatch(f"{self.uri(name)}: content sha256 {digest} does not match {expected}: the object is corrupt")
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return target

    async def delete(self, name_or_uri: str) -> bool:
        name = self._name(name_or_uri)
        info = await self._info(name)
        if info is None:
            return False
        tomb = msgspec.structs.replace(info, deleted=True, size=0, chunks=0, digest="")
        await self.bus.js.publish(self._meta_subject(name), msgspec.json.encode(tomb), headers={api.Header.ROLLUP.value: "sub"})
        await self.bus.js.purge_stream(self.stream, subject=self._chunk_subject(info.nuid))
        return True


# --------------------------------------------------------------------------- files


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
        return self.root / _check_name(name_or_uri)

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
        digest, size = await asyncio.to_thread(_copy_hashing, src, target)
        m = _FileMeta(sha256=digest, size=size, name=name, meta=dict(meta or {}),
                      stored_at=dt.datetime.now(dt.timezone.utc).isoformat())
        atomic_write(self._meta_path(target), msgspec.json.encode(m))
        return ArtifactRef("file://" + quote(str(target)), digest, size, dict(meta or {}))

    async def get(self, uri: str, dest: str | os.PathLike, *, sha256: str | None = None) -> Path:
        src = self._path(uri)
        if not src.is_file():
            raise ArtifactNotFound(f"no artifact at {src}: check the URI and that the shared directory is mounted")
        ref = await self.stat(uri)
        target = _dest_file(dest, src.name)
        if target.resolve() == src.resolve():
            digest, _ = await asyncio.to_thread(sha256_file, src)
            _verify(uri, digest, ref.sha256 if ref else None, sha256)
            return target
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        try:
            digest, size = await asyncio.to_thread(_copy_hashing, src, tmp)
            _verify(uri, digest, ref.sha256 if ref else None, sha256)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return target

    async def delete(self, name_or_uri: str) -> bool:
        path = self._path(name_or_uri)
        existed = path.exists()
        path.unlink(missing_ok=True)
        self._meta_path(path).unlink(missing_ok=True)
        return existed


def _verify(uri: str, digest: str, *expected: str | None) -> None:
    for e in map(_norm_digest, expected):
        if e and digest != e:
            raise DigestMismatch(f"{uri}: content sha256 {digest} does not match {e}: the artifact is corrupt or was replaced")


def sha256_file(path: Path) -> tuple[str, int]:
    """(hex sha256, size) of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _copy_hashing(src: Path, dst: Path) -> tuple[str, int]:
    """Copy src to dst atomically (temp file, fsync, rename), hashing on the way."""
    h = hashlib.sha256()
    size = 0
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            while chunk := fi.read(4 << 20):
                h.update(chunk)
                fo.write(chunk)
                size += len(chunk)
            fo.flush()
            os.fsync(fo.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return h.hexdigest(), size


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the store


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
        if "://" not in uri:
            return self.primary
        scheme = uri.split("://", 1)[0]
        if scheme == self.primary.scheme:
            if scheme == "obj" and urlparse(uri).netloc != getattr(self.primary, "bucket", None):
                return ObjectStoreBackend(self.bus, urlparse(uri).netloc, chunk_size=self.cfg.chunk_size, window=self.cfg.window)
            return self.primary
        if scheme == "obj":
            if self.bus is None:
                raise ArtifactError(f"{uri} needs a NATS connection: open the store with open_store(bus, settings)")
            return ObjectStoreBackend(self.bus, urlparse(uri).netloc, chunk_size=self.cfg.chunk_size, window=self.cfg.window)
        if scheme == "file":
            return FileStoreBackend(self.file_root or "/")
        raise ArtifactError(f"unsupported artifact URI {uri!r}: use obj://BUCKET/NAME or file:///PATH")

    async def put(self, path: str | os.PathLike, name: str, *, meta: dict[str, str] | None = None) -> ArtifactRef:
        return await self.primary.put(path, name, meta=meta)

    async def get(self, uri: str, dest: str | os.PathLike, *, sha256: str | None = None) -> Path:
        return await self._backend(uri).get(uri, dest, sha256=sha256)

    async def stat(self, name_or_uri: str) -> ArtifactRef | None:
        return await self._backend(name_or_uri).stat(name_or_uri)

    async def delete(self, name_or_uri: str) -> bool:
        return await self._backend(name_or_uri).delete(name_or_uri)


def open_store(bus, settings, *, backend: str | None = None) -> ArtifactStore:
    """The artifact store configured by `[artifacts]` in scf.toml (`backend = "object"`,
    the default, or `"file"` with `root = "/shared/dir"`). `bus` may be None for a
    file-only store."""
    cfg = settings.section("artifacts", ArtifactSettings) if settings is not None else ArtifactSettings()
    kind = backend or os.environ.get("SCF_ARTIFACTS") or cfg.backend
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


__all__ = [
    "ArtifactRef",
    "ArtifactSettings",
    "ArtifactStore",
    "ArtifactError",
    "ArtifactNotFound",
    "DigestMismatch",
    "ObjectStoreBackend",
    "FileStoreBackend",
    "StreamReader",
    "ReadStats",
    "open_store",
]
