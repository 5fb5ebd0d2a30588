"""The artifact store: checkpoints and release blobs, by URI, verified by sha256.

    store = open_store(bus, settings)             # backend from [artifacts] in scf.toml
    ref = await store.put(path, "grid_case14/<job_id>.safetensors", meta={"job_id": …})
    path = await store.get(ref.uri, dest_dir, sha256=ref.sha256, size=ref.size)   # any scheme; another size: SizeMismatch, unread

Two backends behind one interface (`Backend`, in base.py):

* `ObjectStoreBackend` (object_backend.py) — the JetStream Object Store bucket
  `scf_artifacts`, URIs `obj://scf_artifacts/<name>`: what travels between the Mac and a
  cloud GPU; readable by `nats object get` and nats-py too;
* `FileStoreBackend` (file_backend.py) — a directory (local, or a shared mount), URIs
  `file:///…`, a `<file>.meta.json` beside each artifact.

`ArtifactStore` (store.py) writes to the configured backend and routes `get`/`stat`/
`delete` by the URI's scheme, so a node configured for files can still fetch an `obj://`
URI. Digests are lowercase hex SHA-256 (no prefix). Artifacts are written once per name in
practice (a job's checkpoint); writing a name again replaces it.

The stream reader the object backend reads chunks with is `scf.bus.reader.StreamReader`;
the file helpers (`sha256_file`, `atomic_write`) are in `scf.bus.files`.
"""

from scf.bus.artifacts.base import (
    ArtifactError,
    ArtifactNotFound,
    ArtifactRef,
    ArtifactSettings,
    Backend,
    DigestMismatch,
    SizeMismatch,
)
from scf.bus.artifacts.file_backend import FileStoreBackend
from scf.bus.artifacts.object_backend import ObjectStoreBackend
from scf.bus.artifacts.store import ArtifactStore, open_store

__all__ = [
    "ArtifactRef",
    "ArtifactSettings",
    "ArtifactStore",
    "ArtifactError",
    "ArtifactNotFound",
    "Backend",
    "DigestMismatch",
    "SizeMismatch",
    "ObjectStoreBackend",
    "FileStoreBackend",
    "open_store",
]
