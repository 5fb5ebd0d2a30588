"""The edge agent: `scf run edge --node ID --dir PATH` on each edge box.

It receives its orders through the durable consumer `edge-<node>` on DEPLOY
(`deploy.requested.<node>` and `deploy.rollback_requested.<node>`, in the order sent) and,
for a deployment:

1. verifies the release: the order carries the signed `checkpoint.promoted` event
   (`release`, raw bytes); its Ed25519 signature must come from a trusted key with role
   `release`, and the artifact named by the order must be the one that was signed
   (checkpoint id, domain, version, uri, sha256) — nothing unsigned is ever fetched;
2. refuses a downgrade (a lower version of the domain it runs) unless the order is an
   explicit rollback;
3. fetches the artifact into `incoming/`, checks its sha256 (and size) against the signed
   digest, and only then moves it beside the running one under `versions/`;
4. activates atomically: `current` is a symlink, replaced by one `rename(2)`;
5. runs the health check (the model loads with numpy and answers a probe); on failure
   switches `current` back to the previous artifact and reports `deploy.failed` +
   `deploy.rolled_back`; on success reports `deploy.activated`.

A rollback order re-activates the previous (most recently active before the current one)
or the named artifact (checkpoint id or version), after re-checking its digest on disk,
and reports `deploy.rolled_back`.

Layout of `--dir`:

    current -> versions/000003-1a2b…      the active artifact (symlink, switched atomically)
    versions/<version>-<hash>/model.safetensors, release.json (the signed promotion), installed.json
    incoming/                              downloads in progress (never activated from)
    state.json                             activation history (MRU), outcomes of recent orders
    meter/*.json                           meter readings to report (see `MeterReading`)

State survives restarts: `state.json` is written atomically after every change and, when
it is missing or unreadable, rebuilt from `versions/*/installed.json` and the `current`
link (the link always wins: it is what runs). Orders already acknowledged are never
redelivered (the consumer's position lives in JetStream); an order interrupted by a crash
is redelivered and re-applied idempotently; an order whose outcome is already recorded
(the crash fell between saving the state and publishing the report) re-emits the same
report, with the same derived event ids, so JetStream keeps one.

The agent imports no torch: the probe uses `safetensors.numpy`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Awaitable, Callable
from urllib.parse import unquote, urlparse

import msgspec
import numpy as np

from scf.bus import events as ev
from scf.bus.files import sha256_file
from scf.bus.client import Bus
from scf.bus.codec import Codec
from scf.bus.errors import DecodeError, SCFError, SignatureError
from scf.bus.ids import subject_token
from scf.bus.runner import Delivery, Runner
from scf.bus.signing import SigningKey, TrustList
from scf.consumers import nodes as nodes_mod
from scf.consumers.energy import finite_kwh, measurement_event, measurement_id  # noqa: F401  (re-exported)
from scf.bus.events import DeployRequest, DeployRequested, DeployRollbackRequested, RollbackRequest

log = logging.getLogger("scf.edge")

MODEL_FILE = "model.safetensors"


class EdgeSettings(msgspec.Struct, frozen=True, kw_only=True):
    """`[edge]` in scf.toml."""

    keep: int = 5  # artifacts kept on disk (the current and the previous are never pruned)
    max_artifact_bytes: int = 8 * 1024**3
    meter_poll_s: float = 2.0
    probe_max_elements: int = 50_000_000  # tensors larger than this are sampled, not scanned


class EdgeError(SCFError):
    pass


class Refused(EdgeError):
    """An order the agent will not carry out (reported as deploy.failed, then acked)."""


class Installed(msgspec.Struct, frozen=True, kw_only=True):
    """An artifact on disk that passed verification."""

    checkpoint_id: str
    domain: str
    version: int
    uri: str
    sha256: str
    size: int
    dirname: str
    deployment_id: str
    plan_id: str
    promotion_id: str = ""
    activated_at: dt.datetime | None = None


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """The recorded result of one deployment order."""

    deployment_id: str
    plan_id: str
    status: str  # activated | failed
    checkpoint_id: str
    version: int
    reason: str = ""
    running_checkpoint_id: str | None = None
    rolled_back_to: str | None = None


class PendingActivation(msgspec.Struct, frozen=True, kw_only=True):
    """An activation under way (a deployment or a rollback): saved before `current` is
    switched, cleared once its outcome is recorded. Found at start, it tells the agent what
    a crash interrupted."""

    order: DeployRequested | DeployRollbackRequested
    previous: str | None = None  # checkpoint id that ran before
    target: str = ""  # checkpoint id being activated

    @property
    def key(self) -> str:
        return _order_key(self.order)


def _order_key(order: ev.Event) -> str:
    """What an order's outcome is recorded under: a deployment id, or a rollback's request id."""
    data = order.data
    return getattr(data, "deployment_id", None) or getattr(data, "request_id", "")


class EdgeState(msgspec.Struct, kw_only=True):
    node: str
    current: str | None = None  # checkpoint id that `current` points to
    history: list[Installed] = []  # most recently activated last; unique by checkpoint id
    outcomes: list[Outcome] = []  # what became of recent orders (bounded)
    pending: PendingActivation | None = None


class MeterReading(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A file a meter bridge drops into `<dir>/meter/` for the agent to report."""

    period_start: dt.datetime
    period_end: dt.datetime
    baseline_kwh: float
    actual_kwh: float
    method: str = "metered-vs-baseline"
    deployment_id: str | None = None  # default: the deployment running now
    domain: str | None = None
    meter: str = ""  # which meter of the node ("" = its main meter)


# --------------------------------------------------------------------------- pure helpers


def dirname_for(checkpoint_id: str, version: int) -> str:
    return f"{version:06d}-{hashlib.sha256(checkpoint_id.encode()).hexdigest()[:16]}"




def normalise_digest(d: str) -> str:
    return d.lower().removeprefix("sha256:")


def verify_release(order: DeployRequest, codec: Codec) -> ev.CheckpointPromoted:
    """The signed promotion the order deploys, or Refused with the reason."""
    if not order.release:
        raise Refused("unsigned release: the order carries no signed checkpoint.promoted (release is empty)")
    try:
        promotion = codec.decode(order.release)
    except SignatureError as exc:
        raise Refused(f"release signature refused: {exc}") from None
    except DecodeError as exc:
        raise Refused(f"release is not a checkpoint.promoted event: {exc}") from None
    assert isinstance(promotion, ev.CheckpointPromoted)
    p, a = promotion.data, order.artifact
    mismatched = [
        name
        for name, signed, asked in (
            ("checkpoint_id", p.checkpoint_id, a.checkpoint_id),
            ("domain", p.domain, a.domain),
            ("version", p.version, a.version),
            ("uri", p.uri, a.uri),
            ("sha256", normalise_digest(p.sha256), normalise_digest(a.sha256)),
        )
        if signed != asked
    ]
    if mismatched:
        raise Refused(f"the order does not match its signed release ({', '.join(mismatched)} differ): refusing")
    return promotion


# --------------------------------------------------------------------------- health check


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (BF16 widened to float32)."""
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (TypeError, ValueError) as exc:
        # numpy has no bfloat16: read the header ourselves and widen.
        if "BF16" not in str(exc) and "bf16" not in str(exc).lower():
            raise
    return _load_with_bf16(path)


def _load_with_bf16(path: Path) -> dict[str, np.ndarray]:
    import json
    import struct

    dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_, "BF16": np.uint16}
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        arr = np.frombuffer(data[base + start : base + end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
        out[name] = _bf16_to_f32(arr) if info["dtype"] == "BF16" else arr
    return out


def health_check(path: Path, max_elements: int = 50_000_000) -> str | None:
    """None when the model loads and answers a probe; otherwise the reason it does not.

    Numpy only (no torch). The checks: the file parses as safetensors; it holds at least
    one floating-point tensor; every floating tensor is finite (tensors beyond
    `max_elements` are checked on a strided sample); and the probe — the first 2-D float
    tensor W (by name), taken as a linear layer, maps a fixed input x (a ramp in [-1, 1])
    to W @ x (+ a bias of matching shape when present) with a finite, non-degenerate result.
    This is SCF's own minimal probe: ml/ offers no numpy-only one (docs/deploy.md)."""
    try:
        tensors = load_tensors(path)
    except Exception as exc:  # safetensors raises its own SafetensorError
        return f"the model does not load: {type(exc).__name__}: {exc}"
    floats = {k: v for k, v in tensors.items() if np.issubdtype(v.dtype, np.floating)}
    if not floats:
        return "the model holds no floating-point tensor"
    for name in sorted(floats):
        t = floats[name]
        flat = t.reshape(-1)
        if flat.size > max_elements:
            flat = flat[:: max(1, flat.size // max_elements)]
        if not np.isfinite(flat).all():
            return f"tensor {name} {list(t.shape)} holds non-finite values (NaN or inf)"
    matrices = [k for k in sorted(floats) if floats[k].ndim == 2 and floats[k].size > 0]
    if matrices:
        name = matrices[0]
        w = floats[name].astype(np.float64)
        x = np.linspace(-1.0, 1.0, w.shape[1])
        with np.errstate(all="ignore"):
            y = w @ x
            bias_name = name.rsplit(".", 1)[0] + ".bias" if "." in name else ""
            b = floats.get(bias_name)
            if b is not None and b.shape == (w.shape[0],):
                y = y + b
        if not np.isfinite(y).all():
            return f"the probe through {name} {list(w.shape)} answers non-finite values"
    return None


# --------------------------------------------------------------------------- artifact fetching

Fetcher = Callable[[Bus, str, Path, str], Awaitable[None]]


async def fetch_artifact(bus: Bus, uri: str, dest: Path, sha256: str) -> None:
    """Copy the artifact at `uri` to `dest` through the artifact store (`bus.artifacts`:
    `obj://BUCKET/NAME` or `file:///PATH`), which checks `sha256` before the file appears.
    A digest mismatch is a refusal (tampered or replaced), anything else may be transient.
    Contract for any replacement `Fetcher`: `dest` exists on return only with content of
    digest `sha256`; otherwise raise `Refused` (mismatch) or any other error (retry)."""
    try:
        from scf.bus.artifacts import DigestMismatch, open_store
    except ImportError:  # pragma: no cover - before bus/artifacts.py landed
        await _fetch_plain(bus, uri, dest, sha256)
        return
    try:
        await open_store(bus, bus.settings).get(uri, dest, sha256=sha256)
    except DigestMismatch as exc:
        raise Refused(f"digest mismatch (a tampered or corrupt artifact; not activated): {exc}") from None


async def _fetch_plain(bus: Bus, uri: str, dest: Path, sha256: str) -> None:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        src = Path(unquote(parsed.path))
        if not src.exists():
            raise EdgeError(f"artifact {uri} does not exist on this host: is the shared directory mounted?")
        await asyncio.to_thread(shutil.copyfile, src, dest)
    elif parsed.scheme == "obj":
        bucket, name = parsed.netloc, unquote(parsed.path.lstrip("/"))
        obs = await bus.js.object_store(bucket)
        with open(dest, "wb") as fh:
            await obs.get(name, writeinto=fh)
    else:
        raise Refused(f"artifact uri {uri!r} has an unknown scheme: use obj://BUCKET/NAME or file:///PATH")
    got, _ = await asyncio.to_thread(sha256_file, dest)
    if got != sha256:
        raise Refused(f"digest mismatch (a tampered or corrupt artifact; not activated): {uri} has sha256 {got}, the signed release says {sha256}")


# --------------------------------------------------------------------------- the agent


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class EdgeAgent:
    """One edge node's agent: the handler of its order consumer, plus its directory."""

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
        self.state = EdgeState(node=node)
        for sub in ("versions", "incoming", "meter"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ state
    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    @property
    def current_link(self) -> Path:
        return self.dir / "current"

    def current(self) -> Installed | None:
        return self._find(self.state.current) if self.state.current else None

    def _find(self, checkpoint_id: str | None) -> Installed | None:
        for item in self.state.history:
            if item.checkpoint_id == checkpoint_id:
                return item
        return None

    def load_state(self) -> EdgeState:
        """Read state.json, or rebuild it from the directory; the `current` link wins."""
        state: EdgeState | None = None
        if self.state_path.exists():
            try:
                state = msgspec.json.decode(self.state_path.read_bytes(), type=EdgeState)
            except msgspec.DecodeError as exc:
                log.warning("%s: %s unreadable (%s): rebuilding from %s", self.node, self.state_path, exc, self.dir / "versions")
        if state is None or state.node != self.node:
            state = EdgeState(node=self.node, history=self._scan_versions())
        on_disk = {i.dirname for i in self._scan_versions()}
        state.history = [i for i in state.history if i.dirname in on_disk]
        linked = self._linked_dirname()
        state.current = None
        if linked is not None:
            match = next((i for i in state.history if i.dirname == linked), None)
            if match is None:
                match = self._read_installed(self.dir / "versions" / linked)
                if match is not None:
                    state.history.append(match)
            state.current = match.checkpoint_id if match else None
        self.state = state
        self._save_state()
        return state

    def _scan_versions(self) -> list[Installed]:
        found = [i for d in sorted((self.dir / "versions").iterdir()) if (i := self._read_installed(d)) is not None]
        far_past = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
        return sorted(found, key=lambda i: i.activated_at or far_past)

    @staticmethod
    def _read_installed(d: Path) -> Installed | None:
        try:
            return msgspec.json.decode((d / "installed.json").read_bytes(), type=Installed)
        except (OSError, msgspec.DecodeError):
            return None

    def _linked_dirname(self) -> str | None:
        try:
            target = os.readlink(self.current_link)
        except OSError:
            return None
        name = Path(target).name
        return name if (self.dir / "versions" / name / MODEL_FILE).exists() else None

    def _save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(msgspec.json.encode(self.state))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_path)

    def _switch(self, dirname: str | None) -> None:
        """Point `current` at versions/<dirname> with one atomic rename (None: deactivate)."""
        if dirname is None:
            try:
                self.current_link.unlink()
            except FileNotFoundError:
                pass
            return
        tmp = self.dir / f".current.{os.getpid()}.tmp"
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        os.symlink(os.path.join("versions", dirname), tmp)
        os.replace(tmp, self.current_link)
        try:
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    def _activated(self, item: Installed) -> None:
        """Record `item` as the running artifact (most recent in the history); its
        installed.json keeps the activation time, so a rebuilt history keeps the order."""
        (self.dir / "versions" / item.dirname / "installed.json").write_bytes(msgspec.json.encode(item))
        hist = [i for i in self.state.history if i.checkpoint_id != item.checkpoint_id]
        hist.append(item)
        self.state.history = hist
        self.state.current = item.checkpoint_id
        self._save_state()
        self._prune()

    def _outcome(self, deployment_id: str) -> Outcome | None:
        return next((o for o in self.state.outcomes if o.deployment_id == deployment_id), None)

    def _record(self, outcome: Outcome) -> None:
        rest = [o for o in self.state.outcomes if o.deployment_id != outcome.deployment_id]
        self.state.outcomes = (rest + [outcome])[-256:]
        p = self.state.pending
        if p is not None and p.key == outcome.deployment_id:
            self.state.pending = None
        self._save_state()

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

    def _prune(self) -> None:
        keep = max(2, self.settings.keep)
        if len(self.state.history) <= keep:
            return
        drop, self.state.history = self.state.history[:-keep], self.state.history[-keep:]
        self._save_state()
        for item in drop:
            shutil.rmtree(self.dir / "versions" / item.dirname, ignore_errors=True)

    async def publish_status(self, status: str) -> None:
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
            updated_at=_now(),
        )
        try:
            await nodes_mod.register(self.bus, info)
        except Exception as exc:  # the registry is a cache: never fail an order over it
            log.warning("%s: could not update the node registry: %s", self.node, exc)

    async def start(self) -> "EdgeAgent":
        self.load_state()
        reports = await self.reconcile()
        await self.publish_status("active" if self.state.current else "idle")
        for event in reports:
            await self.bus.publish(event)
        return self

    async def reconcile(self) -> list[ev.Event]:
        """At start: finish what a crash interrupted. An activation whose switch of `current`
        happened is health-checked and reported as `deploy.activated` for what runs (or
        rolled back and reported failed); one whose switch did not happen is left to the
        redelivered order. The reports take the ids the redelivered order's would, so
        JetStream keeps one of each. Returns the reports (the caller publishes them)."""
        p, cur = self.state.pending, self.current()
        if p is None:
            if cur is not None:
                done = self._outcome(cur.deployment_id)
                log.info("%s: runs %s v%d (%s), deployment %s%s", self.node, cur.domain, cur.version, cur.checkpoint_id,
                         cur.deployment_id, " (deploy.activated)" if done is not None and done.status == "activated" else "")
            return []
        what = "deployment" if isinstance(p.order, DeployRequested) else "rollback"
        target = p.order.data.artifact.checkpoint_id if isinstance(p.order, DeployRequested) else p.target
        if cur is not None and cur.checkpoint_id == target:
            log.warning("%s: restarted after switching current to v%d (%s) for %s %s: checking what runs",
                        self.node, cur.version, cur.checkpoint_id, what, p.key)
            if isinstance(p.order, DeployRequested):
                return await self._confirm_running(p.order, cur, level=logging.WARNING)
            return await self._finish_rollback(p.order, cur, self._find(p.previous), level=logging.WARNING)
        log.warning(
            "%s: restarted before switching to %s for %s %s: %s runs; the redelivered order carries it out",
            self.node, target, what, p.key, f"v{cur.version} ({cur.checkpoint_id})" if cur else "nothing",
        )
        self.state.pending = None
        self._save_state()
        return []

    # ------------------------------------------------------------------ orders
    def decode(self, msg) -> ev.Event:
        return self.order_codec.decode(msg.data)

    async def handle(self, event: ev.Event, delivery: Delivery | None = None) -> list[ev.Event]:
        match event:
            case DeployRequested():
                return await self.deploy(event, delivery)
            case DeployRollbackRequested():
                return await self.rollback(event)
        return []

    async def deploy(self, event: DeployRequested, delivery: Delivery | None = None) -> list[ev.Event]:
        order = event.data
        a = order.artifact
        if order.node != self.node:
            return []
        cur = self.current()
        done = self._outcome(order.deployment_id)
        if done is not None and not (cur is not None and cur.checkpoint_id == a.checkpoint_id):
            # Carried out before (and superseded, or failed): report it again, same ids.
            log.info("%s: deployment %s already %s: re-reporting", self.node, order.deployment_id, done.status)
            return self._report(event, done)
        try:
            promotion = verify_release(order, self.release_codec)
            if cur is not None and cur.checkpoint_id == a.checkpoint_id:
                return await self._confirm_running(event, cur)
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

    async def _install(self, order: DeployRequest, promotion: ev.CheckpointPromoted, delivery: Delivery | None) -> Installed:
        """Fetch and verify the artifact beside the running one (never activated from here)."""
        a = order.artifact
        dirname = dirname_for(a.checkpoint_id, a.version)
        final = self.dir / "versions" / dirname
        want = normalise_digest(a.sha256)
        if (final / MODEL_FILE).exists():
            got, _ = await asyncio.to_thread(sha256_file, final / MODEL_FILE)
            if got != want:
                shutil.rmtree(final, ignore_errors=True)
        if not (final / MODEL_FILE).exists():
            staging = self.dir / "incoming" / f"{dirname}.{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            try:
                try:
                    await self.fetch(self.bus, a.uri, staging / MODEL_FILE, want)
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
        self.state.pending = PendingActivation(order=event, previous=previous.checkpoint_id if previous else None,
                                               target=item.checkpoint_id)
        self._save_state()
        self._switch(item.dirname)
        problem = await asyncio.to_thread(health_check, self.current_link / MODEL_FILE, self.settings.probe_max_elements)
        if problem is None:
            self._activated(msgspec.structs.replace(item, activated_at=_now()))
            outcome = Outcome(deployment_id=order.deployment_id, plan_id=order.plan_id, status="activated",
                              checkpoint_id=item.checkpoint_id, version=item.version)
            self._record(outcome)
            await self.publish_status("active")
            log.info("%s: deploy.activated for deployment %s: runs %s v%d (%s)", self.node, order.deployment_id,
                     item.domain, item.version, item.checkpoint_id)
            return self._report(event, outcome)
        return await self._revert(event, item, previous, problem)

    async def _revert(self, event: DeployRequested, bad: Installed, previous: Installed | None, problem: str) -> list[ev.Event]:
        """A failed health check: switch back to what ran before (or to nothing), forget and
        delete the bad artifact, report deploy.failed (+ deploy.rolled_back)."""
        order = event.data
        self._switch(previous.dirname if previous else None)
        self.state.current = previous.checkpoint_id if previous else None
        self.state.history = [i for i in self.state.history if i.checkpoint_id != bad.checkpoint_id]
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
        self._record(outcome)
        shutil.rmtree(self.dir / "versions" / bad.dirname, ignore_errors=True)
        await self.publish_status("failed")
        log.warning("%s: deployment %s: %s; rolled back to %s", self.node, order.deployment_id, reason,
                    previous.checkpoint_id if previous else "nothing")
        return self._report(event, outcome)

    async def _confirm_running(self, event: DeployRequested, cur: Installed, level: int = logging.INFO) -> list[ev.Event]:
        """The order names what already runs (a redelivery or a repeat): re-check and
        confirm; a failing check here rolls back like a fresh activation would."""
        problem = await asyncio.to_thread(health_check, self.current_link / MODEL_FILE, self.settings.probe_max_elements)
        if problem is not None:
            return await self._revert(event, cur, self._previous(cur), problem)
        order = event.data
        if cur.activated_at is None:  # a crash fell between the switch and its record
            self._activated(msgspec.structs.replace(cur, activated_at=_now()))
        outcome = Outcome(deployment_id=order.deployment_id, plan_id=order.plan_id, status="activated",
                          checkpoint_id=cur.checkpoint_id, version=cur.version)
        if self._outcome(order.deployment_id) != outcome or self.state.pending is not None:
            self._record(outcome)
        await self.publish_status("active")
        log.log(level, "%s: deploy.activated for deployment %s: runs %s v%d (%s)", self.node, order.deployment_id,
                cur.domain, cur.version, cur.checkpoint_id)
        return self._report(event, outcome)

    def _previous(self, cur: Installed | None) -> Installed | None:
        others = [i for i in self.state.history if cur is None or i.checkpoint_id != cur.checkpoint_id]
        return others[-1] if others else None

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
            prev = self._previous(cur)
            if prev is None:
                raise Refused(f"{self.node} has no previous artifact to roll back to")
            return prev
        text = to.strip()
        version = text.lower().removeprefix("v")
        for item in reversed(self.state.history):
            if item.checkpoint_id == text or (version.isdigit() and item.version == int(version)):
                return item
        known = ", ".join(f"v{i.version} {i.checkpoint_id}" for i in self.state.history) or "none"
        raise Refused(f"{self.node} has no artifact {to!r} on disk (it keeps: {known})")

    async def rollback(self, event: DeployRollbackRequested) -> list[ev.Event]:
        req: RollbackRequest = event.data
        if req.node != self.node:
            return []
        done = self._outcome(req.request_id)
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
            path = self.dir / "versions" / target.dirname / MODEL_FILE
            got, _ = await asyncio.to_thread(sha256_file, path)
            if got != target.sha256:
                raise Refused(f"artifact {target.checkpoint_id} on disk no longer matches its signed digest: not activated")
            # Saved before the switch: a crash from here on is finished by `reconcile` at start.
            self.state.pending = PendingActivation(order=event, previous=cur.checkpoint_id if cur else None,
                                                   target=target.checkpoint_id)
            self._save_state()
            self._switch(target.dirname)
        except Refused as exc:
            log.warning("%s: rollback refused: %s", self.node, exc)
            return [self._rollback_failed(event, str(exc), cur)]
        return await self._finish_rollback(event, target, cur)

    async def _finish_rollback(self, event: DeployRollbackRequested, target: Installed, previous: Installed | None,
                               level: int = logging.INFO) -> list[ev.Event]:
        """`current` points at `target`: health-check it; record and report the rollback, or
        switch back to `previous` and report the failure."""
        req: RollbackRequest = event.data
        problem = await asyncio.to_thread(health_check, self.current_link / MODEL_FILE, self.settings.probe_max_elements)
        if problem is not None:
            self._switch(previous.dirname if previous else None)
            self.state.current = previous.checkpoint_id if previous else None
            self.state.pending = None
            self._save_state()
            reason = f"rollback target {target.checkpoint_id} fails its health check: {problem}"
            log.warning("%s: rollback refused: %s", self.node, reason)
            return [self._rollback_failed(event, reason, previous)]
        self._activated(msgspec.structs.replace(target, activated_at=_now()))
        outcome = Outcome(
            deployment_id=req.request_id, plan_id="rollback", status="rolled_back", checkpoint_id=target.checkpoint_id,
            version=target.version, reason=req.reason or f"control.rollback by {req.signer or req.by or 'an operator'}",
            running_checkpoint_id=previous.checkpoint_id if previous else None,
        )
        self._record(outcome)
        await self.publish_status("rolled_back")
        log.log(level, "%s: deploy.rolled_back for rollback %s: runs %s v%d (%s)", self.node, req.request_id,
                target.domain, target.version, target.checkpoint_id)
        return [self._rolled_back(event, outcome)]

    def _rolled_back(self, event: DeployRollbackRequested, o: Outcome) -> ev.DeployRolledBack:
        target = self._find(o.checkpoint_id)
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

    # ------------------------------------------------------------------ energy
    async def report_meter_files(self) -> int:
        """Publish every reading in `<dir>/meter/*.json` as a signed energy.measured; the
        file moves to meter/sent/ (or meter/bad/ when unreadable). Returns how many were sent."""
        if self.bus.key is None:
            return 0
        sent = 0
        for path in sorted((self.dir / "meter").glob("*.json")):
            try:
                reading = msgspec.json.decode(path.read_bytes(), type=MeterReading)
            except (OSError, msgspec.DecodeError) as exc:
                log.error("%s: meter file %s is unreadable (%s): moved to meter/bad/", self.node, path, exc)
                _move(path, self.dir / "meter" / "bad")
                continue
            cur = self.current()
            try:
                for name, value in (("baseline_kwh", reading.baseline_kwh), ("actual_kwh", reading.actual_kwh)):
                    if (problem := finite_kwh(name, value)) is not None:
                        raise ValueError(problem)
                event = measurement_event(
                    self.node,
                    period_start=reading.period_start,
                    period_end=reading.period_end,
                    baseline_kwh=reading.baseline_kwh,
                    actual_kwh=reading.actual_kwh,
                    method=reading.method,
                    deployment_id=reading.deployment_id or (cur.deployment_id if cur else None),
                    domain=reading.domain or (cur.domain if cur else self.labels.get("domain", "")),
                    meter=reading.meter,
                    source=self.bus.source,
                )
            except ValueError as exc:  # a non-finite or absurd reading: never reported
                log.error("%s: meter file %s: %s: moved to meter/bad/", self.node, path, exc)
                _move(path, self.dir / "meter" / "bad")
                continue
            await self.bus.publish(event)
            _move(path, self.dir / "meter" / "sent")
            sent += 1
        return sent

    async def meter_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.report_meter_files()
            except Exception as exc:  # noqa: BLE001 - a reading stays in meter/ and is sent next round
                log.warning("%s: reporting meter readings failed (will retry): %s", self.node, exc)
            try:
                await asyncio.wait_for(stop.wait(), self.settings.meter_poll_s)
            except asyncio.TimeoutError:
                pass

    def runner(self, pause=None, **kw) -> Runner:
        # batch=1: an activation can take longer than ack_wait (a large download); orders
        # fetched in the same batch would wait unkept in hand and be redelivered meanwhile.
        return Runner(self.bus, self.spec, self.handle, decode=self.decode, concurrency=1, batch=1, pause=pause, **kw)


def _move(path: Path, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    os.replace(path, directory / path.name)


# --------------------------------------------------------------------------- measurements
# measurement_id / measurement_event live in consumers/energy.py (shared with the ledger,
# which derives the same cause from the normalised content); re-exported here.


def node_key_path(keys_dir: Path, node: str) -> Path:
    return keys_dir / f"{subject_token(node)}.key"


def load_node_key(keys_dir: Path, node: str, explicit: str | None = None) -> SigningKey | None:
    """The node's signing key: `explicit` (a path or a key name), else keys/<node>.key."""
    if explicit:
        p = Path(explicit)
        return SigningKey.load(p if p.suffix else keys_dir / f"{explicit}.key")
    path = node_key_path(keys_dir, node)
    return SigningKey.load(path) if path.exists() else None
