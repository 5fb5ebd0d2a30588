"""The edge node registry, deployment targets, and reading a slice of a stream.

* Nodes register themselves in the `scf_nodes` KV bucket (key: the node id as a subject
  token; value: `SignedEntry`, the `NodeInfo` JSON signed with the node's own key): their
  labels (`domain`, `site`, `account` …) and what they run. Every edge box logs in as the
  same `edge` user, which may write any key of the bucket, so NATS cannot keep one node
  from writing another's entry: readers that act on an entry (the deploy planner, the
  ledger's account lookup) pass the trust list and believe an entry only when it is
  signed by a trusted `node` key named after the entry's node, under that node's key.
  The registry is a cache for planning and display; the log stays the truth
  (`deploy.activated` / `deploy.rolled_back`).
* Replays: the bucket keeps one version per key, so an edge login could put back an entry
  the node itself signed earlier. Each entry carries the node's own signed `updated_at`;
  readers that pass the trust list refuse an entry older than the newest they know, which
  services record per node in `scf_state/node.<node>` (only services write scf_state), so
  the newest survives every restart. Deletion is a denial an edge login can still cause:
  the node leaves the selectors until its agent re-registers, every `[edge]
  register_every_s` (30 s).
* A deployment *target* is either a node list (`node-a,node-b`, or `nodes:node-a,node-b`)
  or a label selector (`domain=grid:case14,site!=lab`: every term must hold). `*` selects
  every registered node.
* Each edge node reads its orders through the durable consumer `edge-<node>` on DEPLOY
  (`edge_consumer(node)`); the planner creates it before the first order, so an edge
  user that may not create consumers (nats/users.conf) only binds to it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from dataclasses import dataclass

import msgspec
from nats.js.errors import KeyDeletedError, KeyNotFoundError, NoKeysError

from scf.bus.client import SERVICE_LOGINS, Bus
from scf.bus.errors import ConfigError, SCFError, SignatureError
from scf.bus.ids import subject_token
from scf.bus.signing import SigningKey
from scf.bus.streams import ConsumerSpec

log = logging.getLogger("scf.nodes")

NODES_BUCKET = "scf_nodes"
STATE_BUCKET = "scf_state"  # where services record the newest entry believed per node


class NodeInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One node's entry in the registry (scf_nodes KV)."""

    node: str
    labels: dict[str, str] = {}
    checkpoint_id: str | None = None  # what it runs now
    version: int = 0
    domain: str = ""
    deployment_id: str | None = None
    status: str = "idle"  # idle | active | failed | rolled_back | stopped
    agent: str = ""  # the agent's source identity
    runs: list[str] = []  # the model kinds it deploys ([edge] runs; empty: every kind, or an older agent)
    updated_at: dt.datetime | None = None


def node_key(node: str) -> str:
    return subject_token(node)


class SignedEntry(msgspec.Struct, frozen=True):
    """What `scf_nodes/<node>` holds: the NodeInfo JSON exactly as signed, and the node
    key's signature over `entry_message(kv key, info)`."""

    info: msgspec.Raw
    kid: str = ""
    sig: str = ""


def entry_message(key: str, info_json: bytes) -> bytes:
    """What a registry entry's signature covers: the bucket, the KV key and the info bytes
    (so an entry signed for one node cannot be copied under another node's key)."""
    return NODES_BUCKET.encode() + b"\n" + key.encode() + b"\n" + bytes(info_json)


def encode_entry(info: NodeInfo, key: SigningKey | None) -> bytes:
    raw = msgspec.json.encode(info)
    if key is None:
        return msgspec.json.encode(SignedEntry(info=msgspec.Raw(raw)))
    return msgspec.json.encode(SignedEntry(info=msgspec.Raw(raw), kid=key.kid, sig=key.sign(entry_message(node_key(info.node), raw))))


def decode_entry(key: str, value: bytes, trust) -> tuple[NodeInfo | None, str | None]:
    """(info, None) for an entry that may be believed; (info or None, why not) otherwise.

    With `trust` (TrustList's verify interface), an entry is believed only when signed by a
    trusted key with the `node` role whose trust-list name is the entry's node id, and the
    entry sits under that node's own KV key. Without `trust` (display only) any readable
    entry is returned, its problem still named."""
    try:
        entry = msgspec.json.decode(value, type=SignedEntry)
        info = msgspec.json.decode(entry.info, type=NodeInfo)
    except msgspec.DecodeError:
        try:  # an entry written before entries were signed: plain NodeInfo
            return _unsigned(msgspec.json.decode(value, type=NodeInfo), trust, "unsigned entry (written before registry signing)")
        except msgspec.DecodeError as exc:
            return None, f"unreadable entry ({exc})"
    if node_key(info.node) != key:
        return None if trust is not None else info, f"entry for node {info.node!r} stored under key {key!r}"
    if not entry.sig:
        return _unsigned(info, trust, "unsigned entry")
    if trust is None:
        return info, None
    try:
        signer = trust.verify(entry_message(key, bytes(entry.info)), entry.sig, entry.kid, "node")
    except SignatureError as exc:
        return None, f"entry for {info.node} not believed: {exc}"
    if signer != info.node:
        return None, f"entry for {info.node} signed by {signer!r}: a node may only write its own entry"
    return info, None


def _unsigned(info: NodeInfo, trust, why: str) -> tuple[NodeInfo | None, str | None]:
    if trust is None:
        return info, why
    return None, f"{why} for {info.node}: restart its agent with its node key (scf keys new {info.node})"


# --------------------------------------------------------------------------- the newest entry believed


class Newest(msgspec.Struct, frozen=True):
    """`scf_state/node.<node>`: the signed `updated_at` of the newest entry of that node a
    service believed (and the revision of the scf_nodes entry it came from)."""

    updated_at: dt.datetime
    revision: int = 0


def newest_key(node: str) -> str:
    return f"node.{node_key(node)}"


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def _stamp(info: NodeInfo) -> dt.datetime:
    at = info.updated_at or _EPOCH
    return at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc)


async def check_newest(bus: Bus, info: NodeInfo, revision: int = 0) -> str | None:
    """None when `info` (a believed, signed entry) is at least as new as the newest entry of
    its node that a service believed before (then, from a service login, recorded as the
    newest); else why it is refused: a replay of an older entry the node signed."""
    key = newest_key(info.node)
    try:
        state = await bus.kv(STATE_BUCKET)
        try:
            entry = await state.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            entry = None
    except SCFError as exc:  # no scf_state: nothing known, and nothing to record into
        log.warning("cannot read %s/%s (%s): the entry of %s is not checked for replay", STATE_BUCKET, key, exc, info.node)
        return None
    known = None
    if entry is not None and entry.value:
        try:
            known = msgspec.json.decode(entry.value, type=Newest)
        except msgspec.DecodeError:
            known = None
    at = _stamp(info)
    if known is not None and at < known.updated_at:
        return (
            f"entry for {info.node} was signed at {at.isoformat()}, older than the newest one believed "
            f"({known.updated_at.isoformat()}): a replayed entry; the node's next registration replaces it"
        )
    if (known is None or at > known.updated_at) and bus.login in SERVICE_LOGINS:
        value = msgspec.json.encode(Newest(updated_at=at, revision=revision))
        try:
            if entry is None:
                await state.create(key, value)
            else:
                await state.update(key, value, last=entry.revision)
        except Exception as exc:  # noqa: BLE001 - another reader recorded first: the next read decides against it
            log.debug("%s/%s not recorded (%s)", STATE_BUCKET, key, exc)
    return None


async def register(bus: Bus, info: NodeInfo, key: SigningKey | None = None) -> None:
    """Write this node's entry, signed with `key` (default: the bus's key, the node's own
    in an edge agent). Readers that pass a trust list ignore entries not signed by the
    node's own trusted key."""
    kv = await bus.kv(NODES_BUCKET)
    await kv.put(node_key(info.node), encode_entry(info, key or bus.key))


async def get_node(bus: Bus, node: str, trust=None) -> NodeInfo | None:
    """The node's entry; with `trust`, only when it is signed by the node's own key (else
    None, and a warning naming why)."""
    kv = await bus.kv(NODES_BUCKET)
    try:
        entry = await kv.get(node_key(node))
    except (KeyNotFoundError, KeyDeletedError):  # anything else (a server away) raises: no guess
        return None
    if not entry or not entry.value:
        return None
    info, problem = decode_entry(node_key(node), entry.value, trust)
    if trust is not None and not problem and info is not None:
        problem = await check_newest(bus, info, entry.revision or 0)
    if problem and trust is not None:
        log.warning("scf_nodes/%s ignored: %s", node_key(node), problem)
        return None
    return info


async def read_nodes(bus: Bus, trust=None) -> list[tuple[NodeInfo | None, str, str | None]]:
    """Every entry as (info, kv key, problem); `problem` None when it may be believed
    (with `trust`: signed by the node's own trusted key, and not older than the newest
    believed before, `check_newest`) or is at least signed (without)."""
    kv = await bus.kv(NODES_BUCKET)
    try:
        keys = await kv.keys()
    except NoKeysError:  # an empty bucket
        return []
    sem = asyncio.Semaphore(32)

    async def one(key: str) -> tuple[NodeInfo | None, str, str | None] | None:
        async with sem:
            try:
                entry = await kv.get(key)
            except (KeyNotFoundError, KeyDeletedError):  # deleted meanwhile
                return None
            if not entry or not entry.value:
                return None
            info, problem = decode_entry(key, entry.value, trust)
            if trust is not None and not problem and info is not None:
                problem = await check_newest(bus, info, entry.revision or 0)
        return info, key, problem

    found = await asyncio.gather(*(one(k) for k in sorted(keys)))
    return [f for f in found if f is not None]


async def list_nodes(bus: Bus, trust=None) -> list[NodeInfo]:
    """Registered nodes; with `trust`, only entries signed by their own node's key (the
    deploy planner and the ledger always pass it)."""
    out = []
    for info, key, problem in await read_nodes(bus, trust):
        if trust is not None and problem:
            log.warning("scf_nodes/%s ignored: %s", key, problem)
            continue
        if info is not None:
            out.append(info)
    return out


# --------------------------------------------------------------------------- targets


class TargetError(SCFError):
    pass


@dataclass(frozen=True)
class Target:
    """A node list or a label selector (a conjunction of `key=value` / `key!=value`)."""

    nodes: tuple[str, ...] = ()
    equal: tuple[tuple[str, str], ...] = ()
    not_equal: tuple[tuple[str, str], ...] = ()
    everything: bool = False

    @property
    def is_selector(self) -> bool:
        return not self.nodes

    def matches(self, info: NodeInfo) -> bool:
        if self.nodes:
            return info.node in self.nodes
        if self.everything:
            return True
        return all(info.labels.get(k) == v for k, v in self.equal) and all(
            info.labels.get(k) != v for k, v in self.not_equal
        )

    def text(self) -> str:
        if self.nodes:
            return "nodes:" + ",".join(self.nodes)
        if self.everything:
            return "*"
        return ",".join([f"{k}={v}" for k, v in self.equal] + [f"{k}!={v}" for k, v in self.not_equal])


_TERM = re.compile(r"^\s*([A-Za-z0-9_.\-/]+)\s*(!=|=)\s*(.*?)\s*$")


def parse_target(text: str) -> Target:
    """`node-a,node-b` | `nodes:node-a` | `domain=grid:case14,site!=lab` | `*`."""
    text = text.strip()
    if not text:
        raise TargetError("empty deployment target: give node ids (a,b) or a label selector (domain=grid:case14)")
    if text == "*":
        return Target(everything=True)
    if text.startswith("nodes:"):
        nodes = tuple(n.strip() for n in text.removeprefix("nodes:").split(",") if n.strip())
        if not nodes:
            raise TargetError(f"target {text!r} names no node: write nodes:node-a,node-b")
        return Target(nodes=nodes)
    # A selector has `=` in its first term; labels values may contain ':' and '/'.
    if "=" not in text:
        return Target(nodes=tuple(n.strip() for n in text.split(",") if n.strip()))
    equal, not_equal = [], []
    for term in text.split(","):
        if not term.strip():
            continue
        m = _TERM.match(term)
        if not m:
            raise TargetError(f"bad selector term {term!r} in {text!r}: write key=value or key!=value, comma-separated")
        (not_equal if m.group(2) == "!=" else equal).append((m.group(1), m.group(3)))
    return Target(equal=tuple(equal), not_equal=tuple(not_equal))


def select(nodes: list[NodeInfo], target: Target) -> list[str]:
    """The node ids a target names, sorted. A node list is returned as given (sorted),
    registered or not: its orders wait in the node's consumer until it comes online."""
    if target.nodes:
        return sorted(set(target.nodes))
    return sorted({n.node for n in nodes if target.matches(n)})


def parse_labels(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"label {item!r} is not KEY=VALUE: write e.g. --label domain=grid:case14")
        out[key.strip()] = value.strip()
    return out


# --------------------------------------------------------------------------- edge consumers


def edge_consumer(node: str) -> ConsumerSpec:
    """The durable consumer through which node `node` receives its orders, in order:
    deployments and rollbacks share one consumer, so they apply in the order sent."""
    tok = subject_token(node)
    return ConsumerSpec(
        "DEPLOY",
        f"edge-{tok}",
        (f"deploy.requested.{tok}", f"deploy.rollback_requested.{tok}"),
        ack_wait=60.0,
        max_deliver=5,
        max_ack_pending=16,
        description=f"orders for edge node {node}",
    )

