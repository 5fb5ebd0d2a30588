"""The node's signing key: it signs the node's energy.measured reports and its entry in
the node registry."""

from __future__ import annotations

from pathlib import Path

from scf.bus.ids import subject_token
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
