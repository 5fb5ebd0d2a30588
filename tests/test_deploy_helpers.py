"""Helpers shared by the deploy / edge / ledger tests (no tests here): keys and the trust
list, small safetensors models built with numpy, signed promotions, orders, processes."""

from __future__ import annotations

import datetime as dt
import hashlib
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from scf.bus import codec
from scf.bus import events as ev
from scf.bus.client import Bus
from scf.bus.reader import read
from scf.bus.runner import CLOSE_S, DRAIN_S
from scf.bus.settings import Settings
from scf.bus.signing import SigningKey, TrustList
from scf.cli.common import LEFTOVER_S
from scf.consumers.deploy import deploy_intent, plan_orders
from scf.consumers.nodes import get_node
from tests.conftest import spawn


@dataclass
class Keys:
    """A release key, an operator key, node keys; all trusted in $SCF_HOME/keys/trusted.json."""

    settings: Settings
    release: SigningKey = field(default_factory=lambda: SigningKey.generate("release"))
    operator: SigningKey = field(default_factory=lambda: SigningKey.generate("alice"))
    nodes: dict[str, SigningKey] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.trust = TrustList.load(self.settings.keys_dir / "trusted.json")
        self.trust.trust(self.release.public_b64, "release", ["release"])
        self.trust.trust(self.operator.public_b64, "alice", ["operator"])
        self.trust.save()

    def node(self, name: str) -> SigningKey:
        """The node's key, saved as $SCF_HOME/keys/<name>.key and trusted (role node)."""
        if name not in self.nodes:
            key = SigningKey.generate(name)
            key.save(self.settings.keys_dir)
            self.trust.trust(key.public_b64, name, ["node"])
            self.trust.save()
            self.nodes[name] = key
        return self.nodes[name]


def make_model(path: Path, seed: int = 0, *, nan: bool = False, hidden: int = 8) -> tuple[str, int]:
    """A small safetensors 'model' (an MLP's tensors); `nan` poisons one weight. Returns (sha256, size)."""
    rng = np.random.default_rng(seed)
    tensors = {
        "net.0.weight": rng.standard_normal((hidden, 4)).astype(np.float32),
        "net.0.bias": rng.standard_normal(hidden).astype(np.float32),
        "net.2.weight": rng.standard_normal((1, hidden)).astype(np.float32),
        "net.2.bias": np.zeros(1, dtype=np.float32),
    }
    if nan:
        tensors["net.2.weight"][0, 0] = np.nan
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"seed": str(seed)})
    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest(), len(data)


def promotion(
    checkpoint_id: str, version: int, path: Path, *, domain: str = "grid:test", alias: str = "production", sha256: str | None = None
) -> ev.CheckpointPromoted:
    data = path.read_bytes()
    return ev.CheckpointPromoted.new(
        ev.Promotion(
            checkpoint_id=checkpoint_id,
            domain=domain,
            alias=alias,
            version=version,
            uri=path.resolve().as_uri(),
            sha256=sha256 or hashlib.sha256(data).hexdigest(),
            size=len(data),
        ),
        source="test-daemon",
    )


async def publish_raw(bus: Bus, event: ev.Event, key: SigningKey | None) -> tuple[int, bytes]:
    """Publish `event` signed with `key` (None: unsigned); returns (seq, raw bytes)."""
    raw = codec.sign(event, key) if key else codec.encode(event)
    ack = await bus.js.publish(event.subject(), raw, headers=Bus.headers(event))
    return ack.seq, raw


def orders_for(
    promo: ev.CheckpointPromoted, raw: bytes, nodes: list[str], *, seq: int = 1, strategy: str = "all", wave: int = 0,
    plan: str | None = None,
):
    """Orders built with the planner's own functions, bypassing intent + approval. `plan`
    overrides the plan id (= intent id), so that the same artifact can be ordered anew."""
    import msgspec

    intent = deploy_intent(promo, seq, target=",".join(nodes), strategy=strategy, source="test").data  # type: ignore[arg-type]
    if plan is not None:
        intent = msgspec.structs.replace(intent, intent_id=plan)
    return plan_orders(intent, nodes, wave=wave, release=raw, source="test")


def approve(intent_id: str) -> ev.VerdictIssued:
    return ev.VerdictIssued.new(
        ev.Verdict(
            verdict_id=f"v-{intent_id}",
            subject_id=intent_id,
            subject_type="intent",
            decision="APPROVE",
            gate="human",
            final=True,
            by="test",
            kind="deploy",
        ),
        source="test-safety",
    )


async def events_on(bus: Bus, stream: str, subject: str, types) -> list[tuple[int, ev.Event]]:
    c = codec.Codec(types)
    return [(m.seq, c.decode(m.data)) for m in await read(bus, stream, subject)]


async def node_runs(bus: Bus, node: str, checkpoint_id: str | None) -> bool:
    info = await get_node(bus, node)
    return info is not None and info.checkpoint_id == checkpoint_id


def current_model(directory: Path) -> str | None:
    """The installed.json checkpoint id that `current` points to (what runs on disk)."""
    import msgspec

    link = directory / "current"
    if not link.exists():
        return None
    return msgspec.json.decode((link / "installed.json").read_bytes())["checkpoint_id"]


def start_edge(env: dict, node: str, directory: Path, log_dir: Path, labels: dict[str, str] | None = None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "scf.cli.main", "run", "edge", "--node", node, "--dir", str(directory)]
    for k, v in (labels or {}).items():
        argv += ["--label", f"{k}={v}"]
    return spawn(argv, env, log_dir / f"edge-{node}.log")


def start_process(env: dict, name: str, log_dir: Path) -> subprocess.Popen:
    return spawn([sys.executable, "-m", "scf.cli.main", "run", name], env, log_dir / f"{name}.log")


# How long a `scf run` process may take from SIGTERM to its exit, by its contract: its loops,
# then its connection, then the tasks left (docs/architecture.md "Stopping a process").
STOP_BOUND_S = DRAIN_S + CLOSE_S + LEFTOVER_S


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 35) -> int:
    """SIGTERM, then its exit code; SIGKILL past `timeout` — beyond the 27 s a `scf run` process
    may take to stop by its contract (STOP_BOUND_S: 20 s for its loops, 5 to drain, 2 for
    leftovers)."""
    return timed_stop(proc, sig, timeout)[0]


def timed_stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 35) -> tuple[int, float]:
    """`stop`, and the seconds from the signal to the exit (0 when it had exited already)."""
    if proc.poll() is not None:
        return proc.returncode, 0.0
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait(5)
    return code, time.monotonic() - t0


def utc(*args) -> dt.datetime:
    return dt.datetime(*args, tzinfo=dt.timezone.utc)


def logs(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(log_dir.glob("*.log")))

