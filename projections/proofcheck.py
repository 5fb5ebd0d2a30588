"""Check SCF's proofs offline: RFC 9162 Merkle proofs, C2SP signed checkpoints, proof bundles.

This module is meant to be copied. It needs the Python standard library and `cryptography`
(for Ed25519) and nothing of SCF: an auditor or a client verifies an event's inclusion, or
a log's consistency between two checkpoints, with the log's public key, the proof and the
event's bytes only.

* Hashing (RFC 9162 §2.1, as RFC 6962): leaf = SHA-256(0x00 || entry bytes), node =
  SHA-256(0x01 || left || right); the empty tree's root is SHA-256("").
* Inclusion (§2.1.3.2) and consistency (§2.1.4.2) verification, as the RFC gives them.
* Checkpoints are C2SP tlog-checkpoint bodies (https://c2sp.org/tlog-checkpoint): origin
  line, decimal tree size, base64 root hash, optional extension lines; wrapped in a C2SP
  signed note (https://c2sp.org/signed-note): the body, a blank line, and lines
  `— <key name> <base64(key hash || Ed25519 signature)>`, the key hash being the first four
  bytes of SHA-256(key name || 0x0A || 0x01 || public key).
* A verifier key is the note spec's text form `<name>+<hex key hash>+<base64(0x01 || key)>`.
* A proof bundle (`scf proof inclusion`) is JSON: {"kind": "scf.proof.inclusion/v1",
  "checkpoint": note text, "leaf_index", "tree_size", "entry": base64 entry bytes,
  "proof": [base64 hashes]}; a consistency bundle has "old" and "new" notes and "proof";
  an events bundle ("scf.proof.events/v1", what a strike's JSON proof embeds) has one
  "checkpoint", "tree_size" and "events": [{"leaf_index", "entry", "proof"}, …].

Every failure raises `ProofError` with one line saying what does not hold.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
ED25519_TYPE = b"\x01"
EM_DASH = "\u2014"
EMPTY_ROOT = hashlib.sha256(b"").digest()


class ProofError(Exception):
    """A proof, checkpoint or signature does not hold (the message says which)."""


# --------------------------------------------------------------------------- hashing


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def root_of(leaf_hashes: list[bytes]) -> bytes:
    """MTH over a list of leaf hashes (RFC 9162 §2.1.1), iteratively."""
    if not leaf_hashes:
        return EMPTY_ROOT
    stack: list[tuple[int, bytes]] = []  # (size, hash) of complete subtrees, left to right
    for h in leaf_hashes:
        size, cur = 1, h
        while stack and stack[-1][0] == size:
            _, left = stack.pop()
            cur, size = node_hash(left, cur), size * 2
        stack.append((size, cur))
    cur = stack.pop()[1]
    while stack:
        cur = node_hash(stack.pop()[1], cur)
    return cur


# --------------------------------------------------------------------------- proofs (RFC 9162)


def _check_hashes(*hashes: bytes) -> None:
    for h in hashes:
        if not isinstance(h, (bytes, bytearray)) or len(h) != 32:
            raise ProofError("a hash in the proof is not 32 bytes")


def root_from_inclusion(index: int, size: int, leaf: bytes, proof: list[bytes]) -> bytes:
    """The root an inclusion proof leads to (RFC 9162 §2.1.3.2)."""
    if index < 0 or size < 0 or index >= size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}")
    _check_hashes(leaf, *proof)
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("the inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("the inclusion proof is shorter than the tree is deep")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, proof: list[bytes], root: bytes) -> None:
    got = root_from_inclusion(index, size, leaf, proof)
    if got != root:
        raise ProofError(f"leaf {index} is not in the tree of size {size} with that root (the proof leads elsewhere)")


def verify_consistency(size1: int, size2: int, root1: bytes, root2: bytes, proof: list[bytes]) -> None:
    """RFC 9162 §2.1.4.2: the tree of `size2` extends the tree of `size1`."""
    if size1 < 0 or size2 < size1:
        raise ProofError(f"tree size {size2} cannot extend tree size {size1}")
    _check_hashes(*proof)
    if size1 == 0:
        raise ProofError("a consistency proof from the empty tree proves nothing: pick an older checkpoint of size 1 or more")
    if size1 == size2:
        if proof:
            raise ProofError("a consistency proof between equal sizes must be empty")
        if root1 != root2:
            raise ProofError("two checkpoints of the same size have different roots: the log forked")
        return
    if not proof:
        raise ProofError("the consistency proof is empty")
    path = list(proof)
    if size1 & (size1 - 1) == 0:  # a power of two: the old root is the first node
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("the consistency proof is longer than the trees are deep")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("the consistency proof is shorter than the trees are deep")
    if fr != root1:
        raise ProofError(f"the consistency proof does not lead to the old root (size {size1}): the log was rewritten")
    if sr != root2:
        raise ProofError(f"the consistency proof does not lead to the new root (size {size2})")


# --------------------------------------------------------------------------- signed notes


def key_hash(name: str, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + ED25519_TYPE + public).digest()[:4]


def verifier_key(name: str, public: bytes) -> str:
    """The note spec's verifier key text: `name+hexhash+base64(0x01||key)`."""
    return f"{name}+{key_hash(name, public).hex()}+{base64.b64encode(ED25519_TYPE + public).decode()}"


@dataclass(frozen=True)
class Verifier:
    name: str
    public: bytes

    @property
    def hash(self) -> bytes:
        return key_hash(self.name, self.public)


def parse_verifier_key(text: str) -> Verifier:
    parts = text.strip().split("+", 2)  # the base64 key may itself contain '+'
    if len(parts) != 3 or not parts[0]:
        raise ProofError("not a verifier key: expected NAME+HEXHASH+BASE64KEY (from `scf proof key`)")
    name, hexhash, b64 = parts
    try:
        raw = base64.b64decode(b64, validate=True)
        want = bytes.fromhex(hexhash)
    except ValueError:
        raise ProofError("not a verifier key: its hash or key part is not hex / base64") from None
    if len(raw) != 33 or raw[:1] != ED25519_TYPE:
        raise ProofError("the verifier key is not an Ed25519 key (type 0x01, 32 bytes)")
    v = Verifier(name, raw[1:])
    if v.hash != want:
        raise ProofError("the verifier key's hash does not match its name and key")
    return v


def raise_if_bad_name(name: str) -> None:
    if not name or any(c.isspace() or c == "+" for c in name):
        raise ProofError(f"key name {name!r} must be non-empty, without spaces or '+'")


def signature_line(name: str, public: bytes, signature: bytes) -> str:
    """A signed note's signature line for an Ed25519 key."""
    raise_if_bad_name(name)
    return f"{EM_DASH} {name} {base64.b64encode(key_hash(name, public) + signature).decode()}\n"


def open_note(note: str, verifier: Verifier) -> str:
    """The text of `note` if `verifier` signed it; ProofError otherwise."""
    i = note.rfind("\n\n")
    if i < 0:
        raise ProofError("not a signed note: no blank line before the signatures")
    text, sigs = note[: i + 1], note[i + 2 :]
    if not sigs.endswith("\n"):
        raise ProofError("not a signed note: the signature lines do not end with a newline")
    for line in sigs[:-1].split("\n"):
        prefix = f"{EM_DASH} "
        if not line.startswith(prefix):
            raise ProofError(f"not a signed note: malformed signature line {line[:40]!r}")
        try:
            name, b64 = line[len(prefix) :].split(" ")
            blob = base64.b64decode(b64, validate=True)
        except ValueError:
            raise ProofError(f"not a signed note: malformed signature line {line[:40]!r}") from None
        if name != verifier.name or blob[:4] != verifier.hash:
            continue  # another signer's line: ignored, as the spec says
        try:
            Ed25519PublicKey.from_public_bytes(verifier.public).verify(blob[4:], text.encode())
        except (InvalidSignature, ValueError):
            raise ProofError(f"bad signature by {verifier.name}: the checkpoint was altered or signed with another key") from None
        return text
    raise ProofError(f"the note is not signed by {verifier.name} (key hash {verifier.hash.hex()})")


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def body(self) -> str:
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode(), *self.extensions]
        return "\n".join(lines) + "\n"


def parse_checkpoint(text: str) -> Checkpoint:
    lines = text.split("\n")
    if len(lines) < 4 or lines[-1] != "":
        raise ProofError("not a checkpoint: expected origin, tree size and root hash lines")
    origin, size_s, root_s, *ext = lines[:-1]
    if not size_s.isdigit() or (size_s != "0" and size_s.startswith("0")):
        raise ProofError(f"not a checkpoint: tree size {size_s!r} is not a decimal number")
    try:
        root = base64.b64decode(root_s, validate=True)
    except ValueError:  # binascii.Error, or a non-ASCII character
        raise ProofError("not a checkpoint: the root hash is not base64") from None
    if len(root) != 32:
        raise ProofError("not a checkpoint: the root hash is not 32 bytes")
    return Checkpoint(origin, int(size_s), root, tuple(ext))


def open_checkpoint(note: str, verifier: Verifier, origin: str | None = None) -> Checkpoint:
    cp = parse_checkpoint(open_note(note, verifier))
    if origin is not None and cp.origin != origin:
        raise ProofError(f"the checkpoint is for log {cp.origin!r}, not {origin!r}")
    return cp


# --------------------------------------------------------------------------- bundles


def _b64list(values) -> list[bytes]:
    if not isinstance(values, list):
        raise ProofError("the proof is not a list of base64 hashes")
    try:
        return [base64.b64decode(v, validate=True) for v in values]
    except (ValueError, TypeError):  # binascii.Error is a ValueError; so is a non-ASCII string
        raise ProofError("the proof is not a list of base64 hashes") from None


def verify_bundle(bundle: bytes | str | dict, verifier_key_text: str, entry: bytes | None = None) -> dict:
    """Verify a proof bundle (inclusion or consistency) against a verifier key. For an
    inclusion bundle, `entry` (the event's bytes, if the caller has them separately) must be
    the bundle's entry. Returns a summary (kind, origin, sizes, the entry decoded)."""
    if isinstance(bundle, (bytes, str)):
        try:
            bundle = json.loads(bundle)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than any proof
            raise ProofError("the proof is not JSON: pass the file `scf proof inclusion` or `consistency` wrote") from None
    if not isinstance(bundle, dict):
        raise ProofError("the proof is not a JSON object")
    v = parse_verifier_key(verifier_key_text)
    kind = bundle.get("kind")
    if kind == "scf.proof.inclusion/v1":
        cp = open_checkpoint(_str(bundle, "checkpoint"), v)
        index, size = _int(bundle, "leaf_index"), _int(bundle, "tree_size")
        if size != cp.size:
            raise ProofError(f"the proof is for tree size {size} but the checkpoint has size {cp.size}")
        try:
            data = base64.b64decode(_str(bundle, "entry"), validate=True)
        except ValueError:
            raise ProofError("the entry is not base64") from None
        if entry is not None and entry != data:
            raise ProofError("the event bytes given differ from the bundle's entry")
        verify_inclusion(index, size, leaf_hash(data), _b64list(bundle.get("proof")), cp.root)
        try:
            decoded = json.loads(data)
        except ValueError:
            decoded = None
        return {"kind": "inclusion", "origin": cp.origin, "tree_size": size, "leaf_index": index, "entry": decoded}
    if kind == "scf.proof.consistency/v1":
        old = open_checkpoint(_str(bundle, "old"), v)
        new = open_checkpoint(_str(bundle, "new"), v, origin=old.origin)
        verify_consistency(old.size, new.size, old.root, new.root, _b64list(bundle.get("proof")))
        return {"kind": "consistency", "origin": old.origin, "old_size": old.size, "new_size": new.size}
    if kind == "scf.proof.events/v1":
        cp = open_checkpoint(_str(bundle, "checkpoint"), v)
        size = _int(bundle, "tree_size")
        if size != cp.size:
            raise ProofError(f"the proof is for tree size {size} but the checkpoint has size {cp.size}")
        events = bundle.get("events")
        if not isinstance(events, list) or not events:
            raise ProofError("the proof lists no events")
        out = []
        for n, e in enumerate(events):
            if not isinstance(e, dict):
                raise ProofError(f"event {n} of the proof is not an object")
            try:
                data = base64.b64decode(_str(e, "entry"), validate=True)
            except ValueError:
                raise ProofError(f"event {n}: the entry is not base64") from None
            try:
                verify_inclusion(_int(e, "leaf_index"), size, leaf_hash(data), _b64list(e.get("proof")), cp.root)
            except ProofError as exc:
                raise ProofError(f"event {n}: {exc}") from None
            try:
                out.append(json.loads(data))
            except ValueError:
                out.append(None)
        return {"kind": "events", "origin": cp.origin, "tree_size": size, "entries": out}
    raise ProofError(
        f"unknown proof kind {kind!r}: expected scf.proof.inclusion/v1, scf.proof.consistency/v1 or scf.proof.events/v1"
    )


def _str(d: dict, key: str) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise ProofError(f"the proof lacks {key!r} (a string)")
    return v


def _int(d: dict, key: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ProofError(f"the proof lacks {key!r} (a non-negative integer)")
    return v
