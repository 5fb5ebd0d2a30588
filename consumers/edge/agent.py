"""The agent: the handler of one node's order consumer `edge-<node>` on DEPLOY
(`deploy.requested.<node>` and `deploy.rollback_requested.<node>`, in the order sent).

For a deployment:

1. verifies the release (release.py): signed by a trusted `release` key, and naming
   exactly the artifact the order names;
2. refuses a downgrade (a lower version of the domain it runs) unless the order is an
   explicit rollback;
3. fetches the artifact into `incoming/` (refused before reading when the store holds
   another size than the signed one, or, for an unsized release, more than
   `max_artifact_bytes`; never more bytes read than that), checks its sha256 against the
   signed digest, and only then moves it beside the running one under `versions/` (store.py);
4. activates atomically: `current` is a symlink, replaced by one `rename(2)`;
5. runs the health probe (probe.py); on failure switches `current` back to the previous
   artifact and reports `deploy.failed` + `deploy.rolled_back`; on success reports
   `deploy.activated`.

A rollback order re-activates the previous (most recently active before the current one)
or the named artifact (checkpoint id or version), after re-checking its digest on disk,
and reports `deploy.rolled_back`.

Orders already acknowledged are never redelivered (the consumer's position lives in
JetStream); an order interrupted by a crash is redelivered and re-applied idempotently
(reconcile.py finishes an interrupted switch at start); an order whose outcome is already
recorded (the crash fell between saving the state and publishing the report) re-emits
the same report, with the same derived event ids, so JetStream keeps one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import shutil
from pathlib import Path

import msgspec

from scf.bus import events as ev
from scf.bus.client import Bus
from scf.bus.codec import Codec
from scf.bus.events import DeployRequest, DeployRequested, DeployRollbackRequested, RollbackRequest
from scf.bus.files import sha256_file
from scf.bus.runner import Delivery, Runner, Stopping, race, until_stopped
from scf.bus.signing import TrustList
from scf.consumers import nodes as nodes_mod
from scf.consumers.edge.control import ControlLoop, ControlSettings
from scf.consumers.edge.grid_plant import GridSettings
from scf.consumers.edge.keys import node_ids, seal
from scf.consumers.edge.kinds import accepted, file_kind, refusal
from scf.consumers.edge.meter import MeterReporter
from scf.consumers.edge.probe import health_check
from scf.consumers.edge.reconcile import reconcile
from scf.consumers.edge.release import Fetcher, Refused, fetch_artifact, normalise_digest, verify_release
from scf.consumers.edge.store import MODEL_FILE, Installed, Outcome, PendingActivation, VersionStore, dirname_for

log = logging.getLogger("scf.edge")


class EdgeSettings(msgspec.Struct, frozen=True, kw_only=True):
    """`[edge]` in scf.toml."""

    keep: int = 5  # artifacts kept on disk (the current and the previous are never pruned)
    max_artifact_bytes: int = 8 * 1024**3
    meter_poll_s: float = 2.0
    probe_max_elements: int = 50_000_000  # tensors larger than this are sampled, not scanned
    # the node's registry entry is written again this often (an entry another edge login
    # deleted or replaced comes back within it; docs/security.md "The node registry")
    register_every_s: float = 30.0
    # the plant this node controls (docs/plants.md): "" (none: the agent only deploys),
    # "sim" (the simulator in process) or "mqtt://HOST:PORT/SITE" (a node's label plant=...
    # overrides it); the loop's own settings are [edge.control]
    plant: str = ""
    control: ControlSettings = ControlSettings()
    grid: GridSettings = GridSettings()  # `[edge.grid]`: a grid plant's envelope, meter and simulated site (docs/plants.md)
    # .pub files of the plant's keys: telemetry not signed by one of them is refused (docs/plants.md, Authenticity)
    plant_keys: list[str] = []
    # the model kinds this node deploys (ebdm, optimiser, code; consumers/edge/kinds.py): empty means
    # ["optimiser"] when it controls a plant (its loop runs a learned optimiser or its ternary student), every
    # kind when it has none; an order of another kind is refused (deploy.failed) and what runs keeps running
    runs: list[str] = []


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class EdgeAgent:
    """One edge node's agent: the handler of its order consumer, its version store
    (`store`) and its meter reporter (`meter`)."""

    def __init__(
        self,
        bus: Bus,
        node: str,
        directory: Path,
        trust: TrustList,
        *,
        labels: dict[str, str] | None = None,
        settings: EdgeSettings = EdgeSettings(),
        fetch: Fetcher = fetch_artifact,
        register: bool = True,
    ) -> None:
        self.bus, self.node, self.dir = bus, node, Path(directory)
        self.labels = dict(labels or {})
        self.settings = settings
        self.fetch = fetch
        self.register_in_kv = register
        self.release_codec = Codec([ev.CheckpointPromoted], trust=trust, require_signature=True, role="release")
        self.order_codec = Codec([DeployRequested, DeployRollbackRequested])
        self.spec = nodes_mod.edge_consumer(node)
        self.ids = node_ids(bus.key)  # every report's id keyed with the node's secret (keys.seal)
        self.store = VersionStore(node, self.dir, keep=settings.keep)
        # the kinds it deploys (None: every kind); a plant set by label or [edge] plant counts
        self.runs = accepted(settings.runs, bool(self.labels.get("plant") or settings.plant))
        self.meter = MeterReporter(bus, node, self.dir, self.store.current, labels=self.labels,
                                   poll_s=settings.meter_poll_s)

    def current(self) -> Installed | None:
        return self.store.current()

    def _probe(self) -> str | None:
        return health_check(self.store.current_link / MODEL_FILE, self.settings.probe_max_elements)

    def _report(self, event: DeployRequested, o: Outcome) -> list[ev.Event]:
        """The events that report outcome `o` of order `event` (ids derived from the order)."""
        if o.status == "activated":
            return [
                ev.DeployActivated.new(
                    ev.Activation(deployment_id=o.deployment_id, plan_id=o.plan_id, node=self.node,
                                  checkpoint_id=o.checkpoint_id, version=o.version),
                    source=self.bus.source,
                    cause=event,
                )
            ]
        out: list[ev.Event] = [
            ev.DeployFailed.new(
                ev.DeployFailure(deployment_id=o.deployment_id, plan_id=o.plan_id, node=self.node,
                                 checkpoint_id=o.checkpoint_id, reason=o.reason[:2000],
                                 running_checkpoint_id=o.running_checkpoint_id),
                source=self.bus.source,
                cause=event,
            )
        ]
        if o.rolled_back_to is not None:
            out.append(
                ev.DeployRolledBack.new(
                    ev.Rollback(node=self.node, from_checkpoint_id=o.checkpoint_id, to_checkpoint_id=o.rolled_back_to,
                                reason=o.reason, deployment_id=o.deployment_id),
                    source=self.bus.source,
                    cause=event,
                )
            )
        return out

    # ------------------------------------------------------------------ the node registry
    async def publish_status(self, status: str) -> None:
        """Write this node's signed entry (its own `updated_at`: readers refuse older ones)."""
        self._status = status
        if not self.register_in_kv:
            return
        cur = self.current()
        info = nodes_mod.NodeInfo(
            node=self.node,
            labels=self.labels,
            checkpoint_id=cur.checkpoint_id if cur else None,
            version=cur.version if cur else 0,
            domain=cur.domain if cur else self.labels.get("domain", ""),
            deployment_id=cur.deployment_id if cur else None,
            status=status,
            agent=self.bus.source,
            runs=list(self.runs or ()),
            updated_at=_now(),
        )
        try:
            await nodes_mod.register(self.bus, info)
        except Exception as exc:  # noqa: BLE001 - the registry is a cache: never fail an order over it
            log.warning("%s: could not update the node registry: %s", self.node, exc)

    async def registration(self, stop: asyncio.Event) -> None:
        """Re-register every `register_every_s` until `stop` (a loop for `run_all`): a
        deleted or replayed entry is replaced by a fresh one within that."""
        while not stop.is_set():
            await race(asyncio.sleep(self.settings.register_every_s), stop)
            if stop.is_set():
                break
            try:  # a KV request and a put, 5 s each with the server away: ended by the stop
                await until_stopped(self.publish_status(getattr(self, "_status", "active" if self.store.state.current else "idle")), stop)
            except Stopping:
                log.info("%s: registry entry not rewritten: cut by the stop", self.node)
                break

    async def control(self, stop: asyncio.Event) -> None:
        """The control loop on `[edge] plant` until `stop` (a loop for `run_all`; nothing
        when no plant is set). A plant that cannot be opened is retried every 5 s."""
        from scf.consumers.edge.grid_control import GridControlLoop, is_grid
        from scf.consumers.edge.grid_plant import GRID_TELEMETRY, GridSiteOptions
        from scf.consumers.edge.plant import TELEMETRY, PlantError, open_plant

        spec = self.labels.get("plant") or self.settings.plant  # a node's label `plant=` overrides [edge] plant
        if not spec:
            return
        control = self.settings.control
        grid = is_grid(control.domain)
        while not stop.is_set():
            try:
                if grid:  # setpoints signed with the node's key (docs/plants.md, Authenticity)
                    plant = await open_plant(spec, GridSiteOptions.from_settings(self.settings.grid, control.domain), key=self.bus.key,
                                             decoder=GRID_TELEMETRY, plant_keys=self.settings.plant_keys)
                else:
                    plant = await open_plant(spec, control.site(), key=self.bus.key, decoder=TELEMETRY, plant_keys=self.settings.plant_keys)
            except PlantError as exc:
                log.warning("%s: %s (retrying in 5 s)", self.node, exc)
                await race(asyncio.sleep(5.0), stop)
                continue
            try:
                if grid:
                    self.loop = GridControlLoop(plant, self.node, self.dir, control, self.settings.grid, current=self.current,
                                                previous=self.store.previous, publish=self._publish_control, source=self.bus.source)
                else:
                    self.loop = ControlLoop(plant, self.node, self.dir, control, current=self.current,
                                            previous=self.store.previous, publish=self._publish_control, source=self.bus.source)
                await self.loop.run(stop)
            except PlantError as exc:  # a misconfigured loop: the agent keeps deploying
                log.error("%s: the control loop does not run: %s", self.node, exc)
            except Exception:  # noqa: BLE001 - never let the loop take the agent (and its rollbacks) down
                log.exception("%s: the control loop failed; the agent keeps deploying", self.node)
            finally:
                await plant.close()
            return

    async def _publish_control(self, event: ev.Event) -> None:
        if isinstance(event, ev.EnergyMeasured) and self.bus.key is None:
            log.warning("%s: no node key: measurement for %s not reported", self.node, event.data.period_start)
            return
        await self.bus.publish(seal(self.ids, event))
        if isinstance(event, ev.DeployRolledBack):  # the registry says the node runs its fallback now
            await self.publish_status("reverted")

    async def start(self) -> "EdgeAgent":
        self.store.load()
        reports = await reconcile(self)
        await self.publish_status("active" if self.store.state.current else "idle")
        for event in reports:
            await self.bus.publish(seal(self.ids, event))
        return self

    # ------------------------------------------------------------------ orders
    def decode(self, msg) -> ev.Event:
        return self.order_codec.decode(msg.data)

    async def handle(self, event: ev.Event, delivery: Delivery | None = None) -> list[ev.Event]:
        match event:
            case DeployRequested():
                return [seal(self.ids, e) for e in await self.deploy(event, delivery)]
            case DeployRollbackRequested():
                return [seal(self.ids, e) for e in await self.rollback(event)]
        return []

    async def deploy(self, event: DeployRequested, delivery: Delivery | None = None) -> list[ev.Event]:
        order = event.data
        a = order.artifact
        if order.node != self.node:
            return []
        cur = self.current()
        done = self.store.outcome(order.deployment_id)
        if done is not None and not (cur is not None and cur.checkpoint_id == a.checkpoint_id):
            # Carried out before (and superseded, or failed): report it again, same ids.
            log.info("%s: deployment %s already %s: re-reporting", self.node, order.deployment_id, done.status)
            return self._report(event, done)
        try:
            promotion = verify_release(order, self.release_codec)
            if cur is not None and cur.checkpoint_id == a.checkpoint_id:
                return await self.confirm_running(event, cur)
            self._check_stated_kind(promotion, cur)
            if cur is not None and cur.domain == a.domain and a.version <= cur.version:
                raise Refused(
                    f"downgrade refused: {self.node} runs {cur.domain} v{cur.version} ({cur.checkpoint_id}), "
                    f"the order is v{a.version} ({a.checkpoint_id}); send control.rollback to go back"
                )
            item = await self._install(order, promotion, delivery)
        except Refused as exc:
            log.warning("%s: deployment %s refused: %s", self.node, order.deployment_id, exc)
            return [self._failed(event, str(exc))]
        return await self._activate(event, item, previous=cur)

    def _running(self, cur: Installed | None) -> str | None:
        return f"{cur.domain} v{cur.version} ({cur.checkpoint_id})" if cur else None

    def _check_stated_kind(self, promotion: ev.CheckpointPromoted, cur: Installed | None) -> None:
        """Refused (before any fetch) when the signed promotion states a kind this node
        does not run. A promotion that states none is judged by the file (`_check_file_kind`)."""
        kind = promotion.data.kind
        if self.runs is None or not kind or kind in self.runs:
            return
        p = promotion.data
        raise Refused(refusal(self.node, self.runs, f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} ({p.checkpoint_id}, "
                                                    f"{p.alias} v{p.version} of {p.domain})", self._running(cur)))

    def _check_file_kind(self, path: Path, promotion: ev.CheckpointPromoted) -> None:
        """Refused when the fetched file (digest checked) is no model of a kind this node
        runs, or not of the kind its promotion states."""
        if self.runs is None:
            return
        kind, what = file_kind(path)
        stated = promotion.data.kind
        if kind not in self.runs:
            raise Refused(refusal(self.node, self.runs, f"{what} ({promotion.data.checkpoint_id})", self._running(self.current())))
        if stated and stated != kind:
            raise Refused(f"{promotion.data.checkpoint_id}: its signed promotion says kind {stated!r}, the file is {what}: not deployed")

    async def _install(self, order: DeployRequest, promotion: ev.CheckpointPromoted, delivery: Delivery | None) -> Installed:
        """Fetch and verify the artifact beside the running one (never activated from here)."""
        a = order.artifact
        dirname = dirname_for(a.checkpoint_id, a.version)
        final = self.store.version_dir(dirname)
        want = normalise_digest(a.sha256)
        if (final / MODEL_FILE).exists():
            got, _ = await asyncio.to_thread(sha256_file, final / MODEL_FILE)
            if got != want:
                shutil.rmtree(final, ignore_errors=True)
            else:
                self._check_file_kind(final / MODEL_FILE, promotion)
        if not (final / MODEL_FILE).exists():
            staging = self.dir / "incoming" / f"{dirname}.{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            try:
                try:
                    # the signed size bounds the read (an unsized, older release: max_artifact_bytes)
                    await self.fetch(self.bus, a.uri, staging / MODEL_FILE, want, size=a.size,
                                     max_bytes=self.settings.max_artifact_bytes)
                except Refused:
                    raise
                except Exception as exc:
                    last = delivery is None or delivery.deliveries >= self.spec.max_deliver
                    if last:
                        raise Refused(f"artifact {a.uri} could not be fetched: {type(exc).__name__}: {exc}") from None
                    raise  # transient: the runner redelivers with backoff
                # fetch() has checked the sha256 against the signed digest (Refused if not).
                size = (staging / MODEL_FILE).stat().st_size
                if a.size and size != a.size:
                    raise Refused(f"size mismatch for {a.uri}: the signed release says {a.size} bytes, got {size}")
                if size > self.settings.max_artifact_bytes:
                    raise Refused(f"artifact {a.uri} is {size} bytes, above [edge] max_artifact_bytes")
                self._check_file_kind(staging / MODEL_FILE, promotion)  # never beside the running one
                (staging / "release.json").write_bytes(order.release)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(staging, final)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        item = Installed(
            checkpoint_id=a.checkpoint_id,
            domain=a.domain,
            version=a.version,
            uri=a.uri,
            sha256=want,
            size=(final / MODEL_FILE).stat().st_size,
            dirname=dirname,
            deployment_id=order.deployment_id,
            plan_id=order.plan_id,
            promotion_id=promotion.id,
        )
        (final / "installed.json").write_bytes(msgspec.json.encode(item))
        return item

    async def _activate(self, event: DeployRequested, item: Installed, previous: Installed | None) -> list[ev.Event]:
        order = event.data
        # Saved before the switch: a crash from here on is finished by `reconcile` at start.
        self.store.begin(PendingActivation(order=event, previous=previous.checkpoint_id if previous else None,
                                           target=item.checkpoint_id))
        self.store.switch(item.dirname)
        problem = await asyncio.to_thread(self._probe)
        if problem is None:
            self.store.activated(msgspec.structs.replace(item, activated_at=_now()))
            outcome = Outcome(deployment_id=order.deployment_id, plan_id=order.plan_id, status="activated",
                              checkpoint_id=item.checkpoint_id, version=item.version)
            self.store.record(outcome)
            await self.publish_status("active")
            log.info("%s: deploy.activated for deployment %s: runs %s v%d (%s)", self.node, order.deployment_id,
                     item.domain, item.version, item.checkpoint_id)
            return self._report(event, outcome)
        return await self._revert(event, item, previous, problem)

    async def _revert(self, event: DeployRequested, bad: Installed, previous: Installed | None, problem: str) -> list[ev.Event]:
        """A failed health check: switch back to what ran before (or to nothing), forget and
        delete the bad artifact, report deploy.failed (+ deploy.rolled_back)."""
        order = event.data
        self.store.switch(previous.dirname if previous else None)
        self.store.forget(bad, running=previous)
        reason = f"health check failed: {problem}"
        outcome = Outcome(
            deployment_id=order.deployment_id,
            plan_id=order.plan_id,
            status="failed",
            checkpoint_id=bad.checkpoint_id,
            version=bad.version,
            reason=reason,
            running_checkpoint_id=previous.checkpoint_id if previous else None,
            rolled_back_to=previous.checkpoint_id if previous else None,
        )
        self.store.record(outcome)
        shutil.rmtree(self.store.version_dir(bad.dirname), ignore_errors=True)
        await self.publish_status("failed")
        log.warning("%s: deployment %s: %s; rolled back to %s", self.node, order.deployment_id, reason,
                    previous.checkpoint_id if previous else "nothing")
        return self._report(event, outcome)

    async def confirm_running(self, event: DeployRequested, cur: Installed, level: int = logging.INFO) -> list[ev.Event]:
        """The order names what already runs (a redelivery or a repeat): re-check and
        confirm; a failing check here rolls back like a fresh activation would."""
        problem = await asyncio.to_thread(self._probe)
        if problem is not None:
            return await self._revert(event, cur, self.store.previous(cur), problem)
        order = event.data
        if cur.activated_at is None:  # a crash fell between the switch and its record
            self.store.activated(msgspec.structs.replace(cur, activated_at=_now()))
        outcome = Outcome(deployment_id=order.deployment_id, plan_id=order.plan_id, status="activated",
                          checkpoint_id=cur.checkpoint_id, version=cur.version)
        if self.store.outcome(order.deployment_id) != outcome or self.store.state.pending is not None:
            self.store.record(outcome)
        await self.publish_status("active")
        log.log(level, "%s: deploy.activated for deployment %s: runs %s v%d (%s)", self.node, order.deployment_id,
                cur.domain, cur.version, cur.checkpoint_id)
        return self._report(event, outcome)

    def _failed(self, event: DeployRequested, reason: str) -> ev.DeployFailed:
        order = event.data
        cur = self.current()
        return ev.DeployFailed.new(
            ev.DeployFailure(
                deployment_id=order.deployment_id,
                plan_id=order.plan_id,
                node=self.node,
                checkpoint_id=order.artifact.checkpoint_id,
                reason=reason[:2000],
                running_checkpoint_id=cur.checkpoint_id if cur else None,
            ),
            source=self.bus.source,
            cause=event,
        )

    # ------------------------------------------------------------------ rollback
    def rollback_target(self, to: str | None) -> Installed:
        cur = self.current()
        if to is None:
            prev = self.store.previous(cur)
            if prev is None:
                raise Refused(f"{self.node} has no previous artifact to roll back to")
            return prev
        text = to.strip()
        version = text.lower().removeprefix("v")
        history = self.store.state.history
        for item in reversed(history):
            if item.checkpoint_id == text or (version.isdigit() and item.version == int(version)):
                return item
        known = ", ".join(f"v{i.version} {i.checkpoint_id}" for i in history) or "none"
        raise Refused(f"{self.node} has no artifact {to!r} on disk (it keeps: {known})")

    async def rollback(self, event: DeployRollbackRequested) -> list[ev.Event]:
        req: RollbackRequest = event.data
        if req.node != self.node:
            return []
        done = self.store.outcome(req.request_id)
        if done is not None and done.status == "rolled_back":
            # Carried out before (a redelivery after a crash): report it again, same ids.
            log.info("%s: rollback %s already done: re-reporting", self.node, req.request_id)
            return [self._rolled_back(event, done)]
        cur = self.current()
        try:
            target = self.rollback_target(req.to)
            if cur is not None and target.checkpoint_id == cur.checkpoint_id:
                log.info("%s: rollback to %s: already running it", self.node, target.checkpoint_id)
                return []
            path = self.store.version_dir(target.dirname) / MODEL_FILE
            got, _ = await asyncio.to_thread(sha256_file, path)
            if got != target.sha256:
                raise Refused(f"artifact {target.checkpoint_id} on disk no longer matches its signed digest: not activated")
            # Saved before the switch: a crash from here on is finished by `reconcile` at start.
            self.store.begin(PendingActivation(order=event, previous=cur.checkpoint_id if cur else None,
                                               target=target.checkpoint_id))
            self.store.switch(target.dirname)
        except Refused as exc:
            log.warning("%s: rollback refused: %s", self.node, exc)
            return [self._rollback_failed(event, str(exc), cur)]
        return await self.finish_rollback(event, target, cur)

    async def finish_rollback(self, event: DeployRollbackRequested, target: Installed, previous: Installed | None,
                              level: int = logging.INFO) -> list[ev.Event]:
        """`current` points at `target`: health-check it; record and report the rollback, or
        switch back to `previous` and report the failure."""
        req: RollbackRequest = event.data
        problem = await asyncio.to_thread(self._probe)
        if problem is not None:
            self.store.switch(previous.dirname if previous else None)
            self.store.state.current = previous.checkpoint_id if previous else None
            self.store.state.pending = None
            self.store.save()
            reason = f"rollback target {target.checkpoint_id} fails its health check: {problem}"
            log.warning("%s: rollback refused: %s", self.node, reason)
            return [self._rollback_failed(event, reason, previous)]
        self.store.activated(msgspec.structs.replace(target, activated_at=_now()))
        outcome = Outcome(
            deployment_id=req.request_id, plan_id="rollback", status="rolled_back", checkpoint_id=target.checkpoint_id,
            version=target.version, reason=req.reason or f"control.rollback by {req.signer or req.by or 'an operator'}",
            running_checkpoint_id=previous.checkpoint_id if previous else None,
        )
        self.store.record(outcome)
        await self.publish_status("rolled_back")
        log.log(level, "%s: deploy.rolled_back for rollback %s: runs %s v%d (%s)", self.node, req.request_id,
                target.domain, target.version, target.checkpoint_id)
        return [self._rolled_back(event, outcome)]

    def _rolled_back(self, event: DeployRollbackRequested, o: Outcome) -> ev.DeployRolledBack:
        target = self.store.find(o.checkpoint_id)
        return ev.DeployRolledBack.new(
            ev.Rollback(
                node=self.node,
                from_checkpoint_id=o.running_checkpoint_id,
                to_checkpoint_id=o.checkpoint_id,
                reason=o.reason,
                deployment_id=target.deployment_id if target else None,
            ),
            source=self.bus.source,
            cause=event,
        )

    def _rollback_failed(self, event: DeployRollbackRequested, reason: str, running: Installed | None) -> ev.DeployFailed:
        req: RollbackRequest = event.data
        return ev.DeployFailed.new(
            ev.DeployFailure(
                deployment_id=req.request_id,
                plan_id="rollback",
                node=self.node,
                checkpoint_id=req.to or "",
                reason=reason[:2000],
                running_checkpoint_id=running.checkpoint_id if running else None,
            ),
            source=self.bus.source,
            cause=event,
        )

    def runner(self, pause=None, **kw) -> Runner:
        # batch=1: an activation can take longer than ack_wait (a large download); orders
        # fetched in the same batch would wait unkept in hand and be redelivered meanwhile.
        return Runner(self.bus, self.spec, self.handle, decode=self.decode, concurrency=1, batch=1, pause=pause, **kw)
