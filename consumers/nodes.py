"""The edge node registry, deployment targets, and reading a slice of a stream.

* Nodes register themselves in the `scf_nodes` KV bucket (key: the node id as a subject
  token; value: `NodeInfo` as JSON): their labels (`domain`, `site`, `account` …) and what
  they run. The registry is a cache for planning and display; the log stays the truth
  (`deploy.activated` / `deploy.rolled_back`).
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
import re
from dataclasses import dataclass
from typing import AsyncIterator

import msgspec
from nats.js import api

from scf.bus.client import Bus
from scf.bus.errors import ConfigError, SCFError
from scf.bus.ids import subject_token
from scf.bus.streams import ConsumerSpec

NODES_BUCKET = "scf_nodes"


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
    updated_at: dt.datetime | None = None


def node_key(node: str) -> str:
    return subject_token(node)


async def register(bus: Bus, info: NodeInfo) -> None:
    kv = await bus.kv(NODES_BUCKET)
    await kv.put(node_key(info.node), msgspec.json.encode(info))


async def get_node(bus: Bus, node: str) -> NodeInfo | None:
    kv = await bus.kv(NODES_BUCKET)
    try:
        entry = await kv.get(node_key(node))
    except Exception:  # KeyNotFoundError / KeyDeletedError
        return None
    if not entry or not entry.value:
        return None
    try:
        return msgspec.json.decode(entry.value, type=NodeInfo)
    except msgspec.DecodeError:
        return None


async def list_nodes(bus: Bus) -> list[NodeInfo]:
    kv = await bus.kv(NODES_BUCKET)
    try:
        keys = await kv.keys()
    except Exception:  # NoKeysError: an empty bucket
        return []
    sem = asyncio.Semaphore(32)

    async def one(key: str) -> NodeInfo | None:
        async with sem:
            try:
                entry = await kv.get(key)
            except Exception:  # deleted meanwhile
                return None
        if not entry or not entry.value:
            return None
        try:
            return msgspec.json.decode(entry.value, type=NodeInfo)
        except msgspec.DecodeError:
            return None

    found = await asyncio.gather(*(one(k) for k in sorted(keys)))
    return [n for n in found if n is not None]


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


# --------------------------------------------------------------------------- reading a stream


async def scan(bus: Bus, stream: str, subject: str, batch: int = 2000) -> AsyncIterator:
    """Every message of `stream` on `subject` (wildcards allowed) present when called, in
    sequence order, through an ephemeral unacknowledged pull consumer."""
    psub = await bus.js.pull_subscribe(
        subject,
        stream=stream,
        config=api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE,
            deliver_policy=api.DeliverPolicy.ALL,
            inactive_threshold=30.0,
            mem_storage=True,
        ),
    )
    try:
        remaining = (await psub.consumer_info()).num_pending
        while remaining > 0:
            msgs = await psub.fetch(min(batch, remaining), timeout=10.0)
            for msg in msgs:
                yield msg
            remaining -= len(msgs)
    finally:
        try:
            await psub.unsubscribe()
        except Exception:
            pass
