"""The node's signing key: it signs the node's energy.measured reports, its deploy reports
and its entry in the node registry, and keys the ids of everything the node publishes."""

from __future__ import annotations

from pathlib import Path

import msgspec

from scf.bus import events as ev
from scf.bus.ids import Ids, subject_token
from scf.bus.signing import SigningKey


def node_key_path(keys_dir: Path, node: str) -> Path:
    return keys_dir / f"{subject_token(node)}.key"


def load_node_key(keys_dir: Path, node: str, explicit: str | None = None) -> SigningKey | None:
    """The node's signing key: `explicit` (a path or a key name), else keys/<node>.key."""
    if explicit:
        p = Path(explicit)
        return SigningKey.load(p if p.suffix else keys_dir / f"{explicit}.key")
    path = node_key_path(keys_dir, node)
    return SigningKey.load(path) if path.exists() else None


def node_ids(key: SigningKey | None) -> Ids | None:
    """The id deriver of a node that holds its key: keyed with a secret only the key's
    holder can compute (`SigningKey.id_key`). None without a key."""
    return Ids(key.id_key()) if key is not None else None


def seal(ids: Ids | None, event: ev.Event) -> ev.Event:
    """`event` under an id derived from its own with the node's secret: another `edge` login
    that reads the cause (or computes a measurement's public id) cannot publish first under
    the id of this node's report and have JetStream drop the real one as a duplicate. Same
    event id in, same id out: a redelivered order's report keeps its id (JetStream keeps
    one). Without a key the id stays public (docs/security.md says what that leaves)."""
    if ids is None:
        return event
    return msgspec.structs.replace(event, id=ids.derive("edge effect", event.type_name(), event.id))
