"""The deploy planner: `scf run deploy`.

    checkpoint.promoted (signed, role release)
        → intent.created.deploy.<intent_id>    (publish_once; id derived from the checkpoint)
    verdict.intent.approve (final, kind deploy) of that intent   ← the safety gate or a human
        → deploy.requested.<node> for wave 0   (canary: the first node; all: every node)
    deploy.activated.<canary> of that plan
        → deploy.requested.<node> for wave 1   (the rest)
    control.rollback {"node": ID, "to": VERSION?}   (verified like every control command)
        → deploy.rollback_requested.<node>

Human approval is the safety gate's business: it HOLDs deploy intents in STANDARD and
ACCELERATED until a human `control.approve`s them and approves them itself in HYPER and
SINGULARITY; the planner acts only on a *final* APPROVE. The emergency stop pauses every
runner here except the rollback translation (a rollback order still waits at the edge
agent, whose runner is paused too).

Each decision is a function of the event and what the log says (the intent, the node's
last order, the node registry); ids derive from the plan and the node, so redelivery and
restarts republish the same events and JetStream keeps one. Nothing is kept in memory.

`plan_orders` / `deploy_intent` are usable directly (tests, `scf deploy request`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Literal

import msgspec
from nats.js.errors import NotFoundError

from scf.bus import control as control_mod
from scf.bus import events as ev
from scf.bus.client import Bus
from scf.bus.codec import Codec
from scf.bus.errors import DecodeError, SCFError, SignatureError
from scf.bus.events import DeployRequest, DeployRequested, DeployRollbackRequested, RollbackRequest
from scf.bus.ids import PUBLIC_IDS, Ids, derived_id, subject_token
from scf.bus.reader import read
from scf.bus.runner import Delivery, Poison, Runner
from scf.bus.signing import TrustList
from scf.bus.streams import CONSUMERS, ConsumerSpec, ensure_consumer
from scf.consumers import nodes as nodes_mod

log = logging.getLogger("scf.deploy")

Strategy = Literal["all", "canary"]


class DeploySettings(msgspec.Struct, frozen=True, kw_only=True):
    """`[deploy]` in scf.toml."""

    aliases: list[str] = msgspec.field(default_factory=lambda: ["production"])  # promotions to these aliases become deploy intents
    target: str = ""  # default target; "" means the selector domain=<the promotion's domain>
    strategy: Strategy = "canary"
    verify_release: bool = True  # refuse (to the DLQ) promotions without a trusted release signature
    # a canary's deploy.activated advances its plan only when signed by the node's own trusted
    # `node` key (any edge login may publish deploy.activated.<node>; docs/security.md)
    verify_activations: bool = True
    # signed control.rollback: the daemon's replay window ([daemon] has the same two keys)
    command_window_s: float = 300.0
    clock_skew_s: float = 30.0


class PlanError(SCFError):
    pass


# Consumers of the planner (the lead consolidates them into bus.streams.CONSUMERS).
PROMOTIONS = CONSUMERS["deploy"]  # CHECKPOINTS checkpoint.promoted.>
VERDICTS = ConsumerSpec("VERDICTS", "deploy-verdicts", ("verdict.intent.approve",), description="approved deploy intents to orders")
PROGRESS = ConsumerSpec("DEPLOY", "deploy-progress", ("deploy.activated.>",), description="canary healthy: the next wave")
ROLLBACKS = ConsumerSpec("CONTROL", "deploy-control", ("control.rollback",), description="control.rollback to edge orders")


# --------------------------------------------------------------------------- pure planning


def intent_id_for(checkpoint_id: str, alias: str) -> str:
    return derived_id("intent.deploy", checkpoint_id, alias)


def deploy_intent(
    promotion: ev.CheckpointPromoted,
    promotion_seq: int,
    *,
    target: str,
    strategy: Strategy,
    source: str,
    gear: str = "STANDARD",
    reason: str = "",
    ids: Ids = PUBLIC_IDS,
) -> ev.IntentCreated:
    """The deploy intent for a promotion (one per checkpoint and alias, ever)."""
    p = promotion.data
    target_text = nodes_mod.parse_target(target or f"domain={p.domain}").text()
    intent = ev.Intent(
        intent_id=intent_id_for(p.checkpoint_id, p.alias),
        kind="deploy",
        domain=p.domain,
        params={
            "checkpoint_id": p.checkpoint_id,
            "alias": p.alias,
            "version": p.version,
            "uri": p.uri,
            "sha256": p.sha256,
            "size": p.size,
            "target": target_text,
            "strategy": strategy,
            "promotion_seq": promotion_seq,
            "promotion_id": promotion.id,
            "kind": p.kind,  # "" (a promotion before kinds, a student's): the edge judges the file
        },
        reason=reason or f"deploy {p.domain} {p.alias} v{p.version} ({p.checkpoint_id}) to {target_text}, {strategy}",
        gear=gear,
    )
    return ev.IntentCreated.new(intent, source=source, cause=promotion, id=ids.derive("intent.created", intent.intent_id))


def deployment_id_for(plan_id: str, node: str) -> str:
    return derived_id("deployment", plan_id, node)


def waves(nodes: list[str], strategy: str) -> tuple[list[str], list[str]]:
    """(wave 0, wave 1): canary puts the first node (sorted) alone in wave 0."""
    nodes = sorted(nodes)
    if strategy == "canary" and len(nodes) > 1:
        return nodes[:1], nodes[1:]
    return nodes, []


def artifact_of(intent: ev.Intent) -> ev.Artifact:
    p = intent.params
    try:
        return ev.Artifact(
            checkpoint_id=str(p["checkpoint_id"]),
            domain=intent.domain,
            version=int(p["version"]),  # type: ignore[arg-type]
            uri=str(p["uri"]),
            sha256=str(p["sha256"]),
            size=int(p.get("size") or 0),  # type: ignore[arg-type]
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError(f"deploy intent {intent.intent_id} lacks a usable artifact param ({exc})") from None


def plan_orders(
    intent: ev.Intent,
    nodes: list[str],
    *,
    wave: int,
    release: bytes,
    source: str,
    cause: ev.Event | None = None,
    ids: Ids = PUBLIC_IDS,
) -> list[DeployRequested]:
    """The orders for `nodes`, wave `wave` of the plan of `intent` (plan id = intent id);
    `waves()` says which nodes belong to which wave. The planner passes `ids=bus.ids`: the
    orders' ids are then keyed (an edge login, which may publish into DEPLOY, cannot take
    them first)."""
    strategy = str(intent.params.get("strategy") or "all")
    artifact = artifact_of(intent)
    out = []
    for node in sorted(nodes):
        dep = deployment_id_for(intent.intent_id, node)
        order = DeployRequest(
            deployment_id=dep,
            plan_id=intent.intent_id,
            node=node,
            artifact=artifact,
            strategy="canary" if strategy == "canary" else "all",
            wave=wave,
            release=release,
        )
        out.append(DeployRequested.new(order, source=source, cause=cause, id=ids.derive("deploy.requested", dep)))
    return out


def rollback_order(received: control_mod.Received, seq: int, source: str, ids: Ids = PUBLIC_IDS) -> DeployRollbackRequested:
    cmd = received.command
    assert isinstance(cmd, control_mod.RollbackCommand)
    rid = ids.derive("deploy.rollback_requested", seq)
    return DeployRollbackRequested.new(
        RollbackRequest(
            request_id=rid,
            node=cmd.node,
            to=None if cmd.to is None else str(cmd.to),
            reason=cmd.reason,
            by=cmd.by,
            signer=received.signer,
            command_seq=seq,
        ),
        source=source,
        id=rid,
    )


# --------------------------------------------------------------------------- the process


class DeployPlanner:
    def __init__(self, bus: Bus, trust: TrustList, settings: DeploySettings = DeploySettings()) -> None:
        self.bus, self.trust, self.settings = bus, trust, settings
        self.release_codec = Codec([ev.CheckpointPromoted], trust=trust, require_signature=True, role="release")
        self.activation_codec = Codec([ev.DeployActivated], trust=trust, require_signature=True, role="node")
        self.activation_plain = Codec([ev.DeployActivated])
        self.promotion_codec = (
            self.release_codec if settings.verify_release else Codec([ev.CheckpointPromoted])
        )
        self.order_codec = Codec([DeployRequested])
        self.intent_codec = Codec([ev.IntentCreated])
        self._ensured: set[str] = set()
        # signed control.rollback: refused when replayed (bus.control.ReplayGuard, rebuilt
        # from CONTROL before the first rollback is decided, so it holds across restarts)
        self.replay = control_mod.ReplayGuard(settings.command_window_s, settings.clock_skew_s)
        self._replay_ready = False

    # ------------------------------------------------------------------ reading the log
    async def current_gear(self) -> str:
        """The gear the intent is created under (the scf_state/gear mirror; STANDARD when
        unknown). The safety gate rules on the gear itself; this is a record."""
        try:
            from scf.bus.gears import read_gear

            return (await read_gear(self.bus)).gear
        except Exception:  # noqa: BLE001 - the gear cannot be read: STANDARD, the gear that asks a human, is the safe answer
            return "STANDARD"

    async def intent(self, intent_id: str) -> ev.IntentCreated | None:
        subject = f"intent.created.deploy.{subject_token(intent_id)}"
        try:
            msg = await self.bus.js.get_last_msg("INTENTS", subject)
        except NotFoundError:
            return None
        event = self.intent_codec.decode(msg.data)
        return event if isinstance(event, ev.IntentCreated) else None

    async def release(self, intent: ev.Intent) -> bytes:
        """The signed promotion's raw bytes, from CHECKPOINTS, checked against the intent."""
        seq = int(intent.params.get("promotion_seq") or 0)  # type: ignore[arg-type]
        if seq <= 0:
            raise Poison(f"deploy intent {intent.intent_id} has no promotion_seq: create it with `scf deploy request`")
        try:
            msg = await self.bus.js.get_msg("CHECKPOINTS", seq)
        except Exception as exc:
            raise PlanError(f"CHECKPOINTS seq {seq} (the promotion of {intent.intent_id}) cannot be read: {exc}") from exc
        promotion = Codec([ev.CheckpointPromoted]).decode(msg.data)
        assert isinstance(promotion, ev.CheckpointPromoted)
        if promotion.data.checkpoint_id != intent.params.get("checkpoint_id"):
            raise Poison(f"CHECKPOINTS seq {seq} is not the promotion of {intent.params.get('checkpoint_id')}")
        return bytes(msg.data)

    async def targets(self, intent: ev.Intent) -> list[str]:
        target = nodes_mod.parse_target(str(intent.params.get("target") or f"domain={intent.domain}"))
        # Only entries signed by their own node's key: an edge login may write any entry.
        registered = await nodes_mod.list_nodes(self.bus, trust=self.trust) if target.is_selector else []
        kind = str(intent.params.get("kind") or "")
        if kind and target.is_selector:  # a selector names only the nodes that run the kind ([edge] runs)
            other = sorted(n.node for n in registered if n.runs and kind not in n.runs and target.matches(n))
            if other:
                log.info("deploy intent %s (%s): not to %s, which run%s %s only", intent.intent_id, kind, ", ".join(other),
                         "s" if len(other) == 1 else "", " or ".join(sorted({k for n in registered if n.node in other for k in n.runs})))
            registered = [n for n in registered if not n.runs or kind in n.runs]
        return nodes_mod.select(registered, target)

    async def ensure_edge_consumers(self, nodes: list[str]) -> None:
        """Create each node's order consumer (an edge user may only bind to it): once per
        node per process, concurrently (a consumer create is a server round trip)."""
        todo = [n for n in dict.fromkeys(nodes) if n not in self._ensured]
        sem = asyncio.Semaphore(32)

        async def one(node: str) -> None:
            spec = nodes_mod.edge_consumer(node)
            async with sem:
                try:  # a read is cheaper than a create-or-update
                    await self.bus.js.consumer_info(spec.stream, spec.durable)
                except NotFoundError:
                    await ensure_consumer(self.bus.js, spec)
            self._ensured.add(node)

        await asyncio.gather(*(one(n) for n in todo))

    # ------------------------------------------------------------------ handlers
    async def on_promotion(self, raw, delivery: Delivery) -> list[ev.Event]:
        """checkpoint.promoted → intent.created (deploy), once per checkpoint and alias."""
        try:
            promotion = self.promotion_codec.decode(raw.data)
        except SignatureError as exc:
            raise Poison(f"promotion without a trusted release signature is not deployed: {exc}") from None
        assert isinstance(promotion, ev.CheckpointPromoted)
        if promotion.data.alias not in self.settings.aliases:
            return []
        intent = deploy_intent(
            promotion,
            delivery.stream_seq,
            target=self.settings.target,
            strategy=self.settings.strategy,
            source=self.bus.source,
            gear=await self.current_gear(),
            ids=self.bus.ids,
        )
        once = await self.bus.publish_once(intent)
        if once.status == "conflict":
            log.warning("deploy intent %s already exists with other params: kept the first", intent.data.intent_id)
        return []

    async def on_verdict(self, event: ev.VerdictIssued, delivery: Delivery) -> list[ev.Event]:
        """A final APPROVE of a deploy intent → wave 0 of its plan."""
        v = event.data
        if v.decision != "APPROVE" or not v.final or v.subject_type != "intent" or v.kind not in ("deploy", ""):
            return []
        created = await self.intent(v.subject_id)
        if created is None:
            return []  # not a deploy intent
        intent = created.data
        release = await self.release(intent)
        nodes = await self.targets(intent)
        if not nodes:
            log.warning("deploy intent %s approved, but its target %s names no node", intent.intent_id, intent.params.get("target"))
            return []
        first, _ = waves(nodes, str(intent.params.get("strategy") or "all"))
        orders = plan_orders(intent, first, wave=0, release=release, source=self.bus.source, cause=event, ids=self.bus.ids)
        await self.ensure_edge_consumers([o.data.node for o in orders])
        log.info("plan %s: wave 0 to %s", intent.intent_id, ", ".join(o.data.node for o in orders))
        return list(orders)

    def decode_activation(self, msg) -> ev.Event:
        """A node's `deploy.activated`, believed only when the node's own trusted key signed
        it (SignatureError otherwise: the runner dead-letters it with the reason)."""
        if not self.settings.verify_activations:
            return self.activation_plain.decode(msg.data)
        event = self.activation_codec.decode(msg.data)
        assert isinstance(event, ev.DeployActivated)
        entry = self.trust.keys.get(event.kid or "")
        if entry is None or entry.name != event.data.node:
            raise SignatureError(f"deploy.activated for node {event.data.node!r} signed by key {event.kid} named "
                                 f"{entry.name if entry else ''!r}: only the node's own key advances a plan "
                                 "(trust its key under its node id with the node role)")
        return event

    async def on_activated(self, event: ev.DeployActivated, delivery: Delivery) -> list[ev.Event]:
        """The canary of a plan reported healthy → wave 1 (the rest of the target)."""
        a = event.data
        created = await self.intent(a.plan_id)
        if created is None or created.data.params.get("strategy") != "canary":
            return []
        last = await self._last_order(a.node)
        if last is None or last.data.deployment_id != a.deployment_id or last.data.wave != 0:
            return []  # not this plan's canary, or superseded by a later order
        intent = created.data
        nodes = await self.targets(intent)
        rest = [n for n in nodes if n != a.node]
        orders = plan_orders(
            intent, rest, wave=1, release=last.data.release, source=self.bus.source, cause=event, ids=self.bus.ids
        )
        if not orders:
            return []
        await self.ensure_edge_consumers([o.data.node for o in orders])
        log.info("plan %s: canary %s healthy, wave 1 to %s", intent.intent_id, a.node, ", ".join(o.data.node for o in orders))
        return list(orders)

    async def _last_order(self, node: str) -> DeployRequested | None:
        try:
            msg = await self.bus.js.get_last_msg("DEPLOY", f"deploy.requested.{subject_token(node)}")
        except NotFoundError:
            return None
        order = self.order_codec.decode(msg.data)
        return order if isinstance(order, DeployRequested) else None

    async def on_rollback(self, msg, delivery: Delivery) -> list[ev.Event]:
        """control.rollback → deploy.rollback_requested.<node>, or control.rejected (bad
        body, bad signature, a replayed signed command)."""
        if not self._replay_ready:
            seen = await control_mod.read_recent_commands(self.bus, self.replay, self.trust, "control.rollback")
            self._replay_ready = True
            log.info("replay guard: %d signed rollback(s) in the window", seen)
        try:
            received = control_mod.decode(
                msg.subject, msg.data, dict(msg.headers or {}), self.trust,
                require_signature=self.bus.settings.require_signed_control,
            )
            stored_at = _stored_at(msg)
            self.replay.check(received, delivery.stream_seq, stored_at)
        except (DecodeError, SignatureError, control_mod.ReplayError) as exc:
            log.warning("control seq %d (%s) refused: %s", delivery.stream_seq, msg.subject, exc)
            return [
                ev.ControlRejected.new(
                    ev.ControlRejection(
                        command_subject=msg.subject,
                        body=bytes(msg.data[:65536]).decode(errors="replace"),
                        reason=str(exc),
                        command_seq=delivery.stream_seq,
                    ),
                    source=self.bus.source,
                    id=self.bus.ids.derive("control.rejected", delivery.stream_seq),
                )
            ]
        order = rollback_order(received, delivery.stream_seq, self.bus.source, ids=self.bus.ids)
        await self.ensure_edge_consumers([order.data.node])
        self.replay.record(received, delivery.stream_seq, stored_at)
        return [order]

    # ------------------------------------------------------------------ runners
    def runners(self, pause=None, **kw) -> list[Runner]:
        raw = lambda msg: msg  # noqa: E731 - the handler verifies / decodes itself
        verdicts = Codec([ev.VerdictIssued])
        # batch=1: these events are rare and a handler makes several round trips; nothing
        # fetched waits in hand behind it.
        kw = dict(batch=1, **kw)
        return [
            Runner(self.bus, PROMOTIONS, self.on_promotion, decode=raw, pause=pause, **kw),
            Runner(self.bus, VERDICTS, self.on_verdict, decode=lambda m: verdicts.decode(m.data), pause=pause, **kw),
            Runner(self.bus, PROGRESS, self.on_activated, decode=self.decode_activation, pause=pause, **kw),
            Runner(self.bus, ROLLBACKS, self.on_rollback, decode=raw, **kw),
        ]


def _stored_at(msg) -> dt.datetime:
    """When CONTROL stored the message (the server's clock: the replay window's reference)."""
    try:
        return msg.metadata.timestamp
    except Exception:  # noqa: BLE001 - not a JetStream delivery (a direct call): now is as good as it gets
        return ev.utcnow()


async def find_promotion(bus: Bus, checkpoint_id: str, alias: str | None = None) -> tuple[int, ev.CheckpointPromoted]:
    """The (seq, event) of the latest promotion of `checkpoint_id` (to `alias`, if given)."""
    codec = Codec([ev.CheckpointPromoted])
    found = None
    for msg in await read(bus, "CHECKPOINTS", "checkpoint.promoted.>"):
        try:
            p = codec.decode(msg.data)
        except DecodeError:
            continue
        if isinstance(p, ev.CheckpointPromoted) and p.data.checkpoint_id == checkpoint_id and (alias is None or p.data.alias == alias):
            found = (msg.seq, p)
    if found is None:
        raise PlanError(f"no checkpoint.promoted for {checkpoint_id}: promote it first (see `scf events tail 'checkpoint.>'`)")
    return found
