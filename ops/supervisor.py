"""`scf up`: everything one machine needs, each process its own OS process.

The supervisor starts the embedded nats-server (unless NATS_URL points elsewhere), applies
the stream declarations, then runs each SCF process (`scf run NAME …`) as a child exactly
as it would run on a separate host. A child that exits unexpectedly is restarted with
exponential backoff (reset after it has run a while); each restart is printed and recorded
in the `scf_state` KV bucket (`proc.NAME`), where `scf status --watch` shows it. The
embedded nats-server is supervised the same way: when it dies (even SIGKILL) it is reaped
and started again on the same port and store, with backoff, printed and recorded as
`proc.nats-server`; the children reconnect to it. SIGINT / SIGTERM stop the children with
SIGTERM (they drain), then SIGKILL what is left, then stop the server.

One `scf up` per SCF_HOME: it holds a lock on `$SCF_HOME/scf-up.pid`, which lists its pid
and its children's. A second one is refused; one started after a supervisor was killed
(SIGKILL leaves its children running) first stops the children it left behind (Linux:
checked by their command line and SCF_HOME in /proc, so a reused pid is never touched), so
no process runs twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import msgspec

from scf.bus.client import Bus
from scf.bus.errors import ConfigError, EmbeddedServerError
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
        ProcessSpec("tlog", "tlog"),  # the transparency log over the archive (docs/proofs.md)
        ProcessSpec("genn", "genn"),  # the code generator answering approved codegen intents (docs/codegen.md)
        ProcessSpec("regiment", "regiment"),  # strikes every due contract (docs/value-loop.md); idle without contracts
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


SERVER_RESTART_TIMEOUT = 300.0  # seconds a restarted nats-server may take to answer (store recovery)
# a child's SIGTERM-to-SIGKILL time: the 30 s of docker stop and systemd (TimeoutStopSec), which
# a `scf run X`'s own bounds fit inside (bus/runner.py DRAIN_S + CLOSE_S + cli.common LEFTOVER_S)
CHILD_GRACE_S = 30.0


@dataclass
class ServerWatch:
    """Restart bookkeeping of the embedded nats-server (like a Child's)."""

    restarts: int = 0
    started: float = 0.0
    next_start: float | None = None  # set while the server is down
    last_exit: int | None = None
    history: list[int] = field(default_factory=list)
    restarting: asyncio.Task | None = None


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
        self.server_watch = ServerWatch()
        self.bus: Bus | None = None
        self._home_fd: int | None = None
        self._records: set[asyncio.Task] = set()
        self.stop_event = asyncio.Event()

    # ------------------------------------------------------------------ setup
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SCF_HOME"] = self.settings.home
        env["NATS_URL"] = self.settings.url
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(self.extra_env)
        return env

    # ------------------------------------------------------------------ one per SCF_HOME
    @property
    def pid_file(self) -> Path:
        return self.settings.path("scf-up.pid")

    def claim_home(self) -> None:
        """Lock `$SCF_HOME/scf-up.pid` for this supervisor; stop what a killed one left."""
        fd = os.open(self.pid_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid_file(fd).get("pid", "?")
            os.close(fd)
            raise ConfigError(
                f"another `scf up` (pid {holder}) supervises SCF_HOME={self.settings.home}: stop it first, or use another SCF_HOME"
            ) from None
        previous = _read_pid_file(fd)
        self._home_fd = fd
        self.write_pid_file()
        left = [p for p in previous.get("children", []) if isinstance(p, int) and _is_our_child(p, self.settings.home)]
        if left:
            self.echo(
                f"a previous `scf up` (pid {previous.get('pid', '?')}) left {len(left)} processes running "
                f"(pids {', '.join(map(str, left))}): stopping them"
            )
            _stop_pids(left)

    def write_pid_file(self) -> None:
        """This supervisor's pid and its live children's, for the next one after a kill."""
        if self._home_fd is None:
            return
        children = [c.proc.pid for c in self.children if c.proc is not None and c.proc.poll() is None]
        data = json.dumps({"pid": os.getpid(), "children": children}).encode()
        try:
            os.ftruncate(self._home_fd, 0)
            os.pwrite(self._home_fd, data, 0)
        except OSError:  # informative: a full disk must not stop supervision
            pass

    def release_home(self) -> None:
        if self._home_fd is not None:
            try:
                os.ftruncate(self._home_fd, 0)
                os.pwrite(self._home_fd, json.dumps({"pid": os.getpid(), "children": []}).encode(), 0)
            except OSError:
                pass
            os.close(self._home_fd)  # releases the lock
            self._home_fd = None

    async def prepare(self) -> None:
        init_home(self.settings)
        self.claim_home()
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.settings.embedded:
            self.server = EmbeddedServer(self.settings)
            status = self.server.start()
            self.server_watch.started = time.monotonic()
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
        self.write_pid_file()

    def state_of(self, child: Child) -> ProcState:
        return ProcState(
            name=child.spec.name, pid=child.proc.pid if child.proc else 0, restarts=child.restarts,
            started_at=dt.datetime.now(dt.timezone.utc), last_exit=child.last_exit, host=socket.gethostname(),
        )

    async def record(self, child: Child) -> None:
        if child.proc is not None:
            await self.put_state(self.state_of(child))

    async def put_state(self, state: ProcState, patience: float = 30.0) -> bool:
        """Write `proc.NAME` in scf_state; while the server is away, retry until it is back
        (the client reconnects every 0.5 s). The record is informative: it never stops
        supervision."""
        if self.bus is None:
            return False
        deadline = time.monotonic() + patience
        while not self.stop_event.is_set():
            try:
                kv = await self.bus.kv("scf_state")
                await kv.put(f"proc.{state.name}", msgspec.json.encode(state))
                return True
            except Exception:  # noqa: BLE001 - server away or KV refusing: retried until patience runs out
                if time.monotonic() > deadline:
                    return False
                await asyncio.sleep(0.2)
        return False

    def restarted(self, child: Child) -> None:
        """Record a child's restart, then print it, without holding up supervision (the
        record waits while the server is away)."""
        state, line = self.state_of(child), f"restarted {child.spec.name} (restart #{child.restarts}, pid {child.proc.pid})"

        async def go() -> None:
            await self.put_state(state)
            self.echo(line)

        task = asyncio.create_task(go())
        self._records.add(task)
        task.add_done_callback(self._records.discard)

    # ------------------------------------------------------------------ the embedded server
    async def watch_server(self, now: float) -> None:
        """Reap a dead embedded server and start it again (same port, same store) with
        backoff; the start runs in a thread so the children stay supervised meanwhile."""
        server, w = self.server, self.server_watch
        if server is None or w.restarting is not None:
            return
        if w.next_start is None:
            gone = server.check()
            if gone is None:
                return
            w.last_exit = server.proc.returncode if server.proc is not None else None
            ran = now - w.started
            if ran > self.healthy_after:
                w.history.clear()
            delay = min(self.backoff_max, self.backoff_base * 2 ** len(w.history))
            w.history.append(w.last_exit if w.last_exit is not None else -1)
            w.next_start = now + delay
            self.echo(f"{gone} after {ran:.1f}s: restarting it in {delay:.1f}s on port {self.settings.port}, store {server.store}")
        if now >= w.next_start:
            w.restarting = asyncio.create_task(self._restart_server(server))

    async def _restart_server(self, server: EmbeddedServer) -> None:
        w = self.server_watch
        try:
            # Generous: after a kill, JetStream recovers its store before the server answers.
            status = await asyncio.to_thread(server.start, SERVER_RESTART_TIMEOUT)
        except (EmbeddedServerError, OSError) as exc:  # port taken, store unreadable, binary gone: say so and retry
            delay = min(self.backoff_max, self.backoff_base * 2 ** len(w.history))
            w.history.append(-1)
            w.next_start = time.monotonic() + delay
            self.echo(f"nats-server restart failed: {exc}; retrying in {delay:.1f}s")
        else:
            w.restarts += 1
            w.started, w.next_start = time.monotonic(), None
            self.echo(f"restarted nats-server (restart #{w.restarts}, pid {status.pid}) at {status.url}")
            # Children that gave up while the server was away start again now, not after
            # their grown backoff.
            for child in self.children:
                if child.proc is None:
                    child.next_start = w.started
            state = ProcState(
                name="nats-server", pid=status.pid or 0, restarts=w.restarts,
                started_at=dt.datetime.now(dt.timezone.utc), last_exit=w.last_exit, host=socket.gethostname(),
            )
            if not await self.put_state(state):
                self.echo("could not record the nats-server restart in scf_state: the server does not answer")
        finally:
            w.restarting = None

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = self.stop_event = stop or self.stop_event
        try:
            await self.prepare()
        except BaseException:
            self.release_home()
            raise
        for child in self.children:
            self.start(child)
            await self.record(child)
            self.echo(f"started {child.spec.name:<14} pid {child.proc.pid}  log {self.logs / (child.spec.name + '.log')}")
        try:
            while not stop.is_set():
                now = time.monotonic()
                await self.watch_server(now)
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
                        self.restarted(child)
                try:
                    await asyncio.wait_for(stop.wait(), 0.2)
                except asyncio.TimeoutError:
                    pass
        finally:
            await self.shutdown()

    async def shutdown(self, grace: float = CHILD_GRACE_S) -> None:
        if self.server_watch.restarting is not None:  # a server coming back: let it, for a while
            try:
                await asyncio.wait_for(asyncio.shield(self.server_watch.restarting), 30)
            except asyncio.TimeoutError:  # still recovering its store: stopped below all the same
                pass
        for task in list(self._records):
            task.cancel()
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
            from scf.bus.runner import CLOSE_S, close_bus

            for problem in await close_bus(self.bus, CLOSE_S):  # bounded: the server may be gone
                self.echo(problem)
        if self.server is not None:
            self.server.stop()
            self.echo("nats-server stopped")
        self.release_home()


def _read_pid_file(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_our_child(pid: int, home: str) -> bool:
    """Whether `pid` is still an SCF process of this SCF_HOME (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, not ours to read, or no /proc (macOS: leftovers are not found)
        return False
    return b"scf.cli.main" in cmdline and f"SCF_HOME={home}".encode() in environ.split(b"\0")


def _stop_pids(pids: list[int], grace: float = CHILD_GRACE_S) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True
