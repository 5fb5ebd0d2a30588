"""`scf up`: everything one machine needs, each process its own OS process.

The supervisor starts the embedded nats-server (unless NATS_URL points elsewhere), applies
the stream declarations, then runs each SCF process (`scf run NAME …`) as a child exactly
as it would run on a separate host. A child that exits unexpectedly is restarted with
exponential backoff (reset after it has run a while); each restart is printed and recorded
in the `scf_state` KV bucket (`proc.NAME`), where `scf status --watch` shows it. SIGINT /
SIGTERM stop the children with SIGTERM (they drain), then SIGKILL what is left.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import msgspec

from scf.bus.client import Bus
from scf.bus.errors import ConfigError
from scf.bus.server import EmbeddedServer
from scf.bus.settings import Settings, init_home
from scf.bus.streams import ensure


@dataclass(frozen=True)
class ProcessSpec:
    name: str  # unique: "edge-node-a"
    kind: str  # the `scf run` process: "edge"
    args: tuple[str, ...] = ()
    argv: tuple[str, ...] = ()  # a command other than `scf run KIND ARGS` (tests, extensions)


def default_processes(settings: Settings, edges: int = 2, pool: str = "local") -> list[ProcessSpec]:
    procs = [
        ProcessSpec("daemon", "daemon"),
        ProcessSpec("safety", "safety"),
        ProcessSpec("dispatch", "dispatch"),
        ProcessSpec("worker", "worker", ("--pool", pool)),
        ProcessSpec("deploy", "deploy"),
        ProcessSpec("ledger", "ledger"),
        ProcessSpec("archive", "archive"),
    ]
    for i in range(edges):
        node = f"node-{chr(ord('a') + i)}"
        procs.append(ProcessSpec(f"edge-{node}", "edge", ("--node", node, "--dir", str(settings.path("edge", node)))))
    return procs


def select(procs: list[ProcessSpec], only: list[str] | None, exclude: list[str] | None) -> list[ProcessSpec]:
    known = {p.kind for p in procs} | {p.name for p in procs}
    for name in (only or []) + (exclude or []):
        if name not in known:
            raise ConfigError(f"unknown process {name!r}: use one of {', '.join(sorted(known))}")
    if only:
        procs = [p for p in procs if p.kind in only or p.name in only]
    if exclude:
        procs = [p for p in procs if p.kind not in exclude and p.name not in exclude]
    return procs


class ProcState(msgspec.Struct):
    name: str
    pid: int
    restarts: int
    started_at: dt.datetime
    last_exit: int | None = None
    host: str = ""


@dataclass
class Child:
    spec: ProcessSpec
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started: float = 0.0
    next_start: float = 0.0
    last_exit: int | None = None
    history: list[int] = field(default_factory=list)


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        procs: list[ProcessSpec],
        *,
        echo: Callable[[str], None] = print,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        healthy_after: float = 60.0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.extra_env = dict(extra_env or {})
        self.settings = settings
        self.children = [Child(p) for p in procs]
        self.echo = echo
        self.backoff_base, self.backoff_max, self.healthy_after = backoff_base, backoff_max, healthy_after
        self.logs = settings.path("logs")
        self.server: EmbeddedServer | None = None
        self.bus: Bus | None = None
        self.stop_event = asyncio.Event()

    # ------------------------------------------------------------------ setup
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SCF_HOME"] = self.settings.home
        env["NATS_URL"] = self.settings.url
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(self.extra_env)
        return env

    async def prepare(self) -> None:
        init_home(self.settings)
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.settings.embedded:
            self.server = EmbeddedServer(self.settings)
            status = self.server.start()
            self.echo(status.line())
        self.bus = await Bus.connect(self.settings, "scf-up")
        report = await ensure(self.bus.js)
        created = len(report.created)
        self.echo(f"streams ensured ({created} created)" if created else "streams ensured")

    # ------------------------------------------------------------------ children
    def argv(self, spec: ProcessSpec) -> list[str]:
        if spec.argv:
            return list(spec.argv)
        return [sys.executable, "-m", "scf.cli.main", "run", spec.kind, *spec.args]

    def start(self, child: Child) -> None:
        log = open(self.logs / f"{child.spec.name}.log", "ab")
        child.proc = subprocess.Popen(
            self.argv(child.spec), env=self.env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parent.parent,
        )
        log.close()
        child.started = time.monotonic()

    async def record(self, child: Child) -> None:
        if self.bus is None or child.proc is None:
            return
        import socket

        state = ProcState(
            name=child.spec.name, pid=child.proc.pid, restarts=child.restarts,
            started_at=dt.datetime.now(dt.timezone.utc), last_exit=child.last_exit, host=socket.gethostname(),
        )
        try:
            kv = await self.bus.kv("scf_state")
            await kv.put(f"proc.{child.spec.name}", msgspec.json.encode(state))
        except Exception:  # the record is informative; never let it stop supervision
            pass

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or self.stop_event
        await self.prepare()
        for child in self.children:
            self.start(child)
            await self.record(child)
            self.echo(f"started {child.spec.name:<14} pid {child.proc.pid}  log {self.logs / (child.spec.name + '.log')}")
        try:
            while not stop.is_set():
                now = time.monotonic()
                for child in self.children:
                    proc = child.proc
                    if proc is not None and proc.poll() is not None:
                        child.last_exit = proc.returncode
                        ran = now - child.started
                        if ran > self.healthy_after:
                            child.history.clear()
                        delay = min(self.backoff_max, self.backoff_base * 2 ** len(child.history))
                        child.history.append(proc.returncode)
                        child.next_start = now + delay
                        child.proc = None
                        self.echo(f"{child.spec.name} exited with code {proc.returncode} after {ran:.1f}s: restarting in {delay:.1f}s")
                    if child.proc is None and now >= child.next_start:
                        child.restarts += 1
                        self.start(child)
                        await self.record(child)
                        self.echo(f"restarted {child.spec.name} (restart #{child.restarts}, pid {child.proc.pid})")
                try:
                    await asyncio.wait_for(stop.wait(), 0.2)
                except asyncio.TimeoutError:
                    pass
        finally:
            await self.shutdown()

    async def shutdown(self, grace: float = 20.0) -> None:
        live = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
        for c in live:
            c.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + grace
        while any(c.proc.poll() is None for c in live) and time.monotonic() < deadline:  # type: ignore[union-attr]
            await asyncio.sleep(0.05)
        for c in live:
            if c.proc.poll() is None:  # type: ignore[union-attr]
                c.proc.kill()  # type: ignore[union-attr]
                self.echo(f"{c.spec.name} did not drain within {grace:.0f}s: killed")
        self.echo(f"stopped {len(live)} processes")
        if self.bus is not None:
            await self.bus.close()
        if self.server is not None:
            self.server.stop()
            self.echo("nats-server stopped")
