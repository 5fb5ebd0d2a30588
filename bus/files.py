"""Files written so that a reader sees the old content or the whole new one, and their digests.

One home for what the artifact store, fossil ingest, the verifier and the edge agent all do
with files: `sha256_file` (hex digest and size, read in 4 MiB chunks), `atomic_write`
(temp file, fsync, rename) and `copy_hashing` (an atomic copy that hashes on the way).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

CHUNK = 4 << 20  # bytes read at a time


def sha256_file(path: str | os.PathLike) -> tuple[str, int]:
    """(hex sha256, size) of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def copy_hashing(src: Path, dst: Path) -> tuple[str, int]:
    """Copy src to dst atomically (temp file, fsync, rename), hashing on the way:
    (hex sha256, size) of what was copied."""
    h = hashlib.sha256()
    size = 0
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            while chunk := fi.read(CHUNK):
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


class InputTooLarge(ValueError):
    """A file given as input is larger than the reader takes."""


def read_bounded(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """The bytes of an input file no larger than `limit`; a larger one (a hostile or mistaken
    input: a log, a core dump, /dev/zero) is refused before it is read, naming both sizes."""
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode) or stat.S_ISDIR(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO or socket"
            raise OSError(errno.EINVAL, f"{kind}, not a file: give the file itself", str(path))
        size = st.st_size
        data = f.read(limit + 1)  # also bounds what is read from a device (st_size 0)
    if len(data) > limit or size > limit:
        raise InputTooLarge(f"{path}: {max(size, len(data)):,} bytes is more than a {what} may be "
                            f"({limit:,} bytes); check that this is the right file")
    return data


def load_yaml(text: str | bytes):
    """YAML's plain data (yaml.safe_load) without aliases: `*name` references make a small file
    expand into a huge structure once converted (the "billion laughs"), and no SCF document needs
    them. An alias raises yaml.YAMLError naming its line."""
    import yaml

    class _NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(
                    None, None, f"an alias (*{event.anchor}) refers to another node: write the value out in full",
                    event.start_mark)
            return super().compose_node(parent, index)

    loader = _NoAliases(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
