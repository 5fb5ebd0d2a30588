"""Shared fixtures: a real nats-server per test (free port, temp store), settings pointing
at it, a connected `Bus` with the streams ensured, and helpers to run `scf` processes as
real OS processes.

Async tests use anyio's pytest plugin (`pytestmark = pytest.mark.anyio`); every test has a
timeout (pytest-timeout, set in pyproject). `make test` runs the files on two workers
(pytest-xdist, `--dist loadfile`): every test keeps its own server, port and temporary home,
so nothing may assume it is the only test running on the machine. Expensive read-only
artefacts (a tiny model, learned optimisers: `tiny_llama`, `shared_optimiser`) are built once
per run for every file and worker (`shared_artefact`).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Awaitable, Callable

import pytest

from scf.bus.client import Bus
from scf.bus.server import ServerProcess, free_port
from scf.bus.settings import Settings, init_home
from scf.bus.streams import ensure

ROOT = Path(__file__).resolve().parent.parent

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers (pytest-xdist) on a 2-core machine: one thread each for
    # torch/BLAS here and in the processes the tests start (they inherit the environment),
    # instead of two workers each splitting work over every core
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")


# The backstop behind pytest-timeout: its timeout (pyproject, 300 s) raises in the main thread
# from SIGALRM, which cannot help if that thread never returns to Python (a hang seen once in
# a worker's epoll_wait under heavy load, 17 min with no timeout). faulthandler's watchdog is
# a C thread: past HARD_TIMEOUT_S it prints every thread's stack and ends the process (under
# xdist the controller reports the worker's crash and goes on), so a hang fails one test
# instead of the whole run's time limit. A test with a longer `timeout` mark gets that plus
# the margin.
HARD_TIMEOUT_S = 900
HARD_MARGIN_S = 300


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import faulthandler

    mark = item.get_closest_marker("timeout")
    own = float(mark.args[0]) if mark and mark.args else 0.0
    faulthandler.dump_traceback_later(max(HARD_TIMEOUT_S, own + HARD_MARGIN_S), exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def anyio_backend():
    return "asyncio"


def shared_artefact(tmp_path_factory: pytest.TempPathFactory, name: str, key: str, build: Callable[[Path], object]) -> Path:
    """A read-only artefact built once per test run and shared by every test file and xdist
    worker: `build(directory)` runs in the first worker to ask (under a file lock), the others
    wait for it and reuse `directory`. `key` names what the artefact depends on (parameters,
    the source of the code that builds it): a change builds a new one. Its files are made
    read-only, so a test that would write into it fails instead of changing it for the next."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's directory, shared by the workers
    directory = root / "shared" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f"{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / ".built").exists():
            if directory.exists():  # a build that died half-way
                import shutil

                shutil.rmtree(directory)
            build(directory)
            for f in directory.rglob("*"):
                if f.is_file():
                    f.chmod(0o444)
            (directory / ".built").touch()
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """`scf.ml.genn.tiny_model` (a random tiny Llama with SmolLM2's tokenizer read from the
    98 MB GGUF: ~7 s of CPU to build), built once for the run and shared read-only."""
    from importlib.metadata import version

    from scf.ml import genn as mg

    code = hashlib.sha256(Path(mg.__file__).read_bytes()).hexdigest()
    key = f"tiny_model(seed=0) genn.py {code} transformers {version('transformers')} gguf {mg.gguf_path().stat().st_size}"
    return shared_artefact(tmp_path_factory, "tiny-llama", key, lambda d: mg.tiny_model(d / "tiny-llama")) / "tiny-llama"


def shared_optimiser(tmp_path_factory: pytest.TempPathFactory, domain: str, fossils: int, shard_size: int, seed: int, **config) -> Path:
    """A learned optimiser trained once for the run (`shared_artefact`) by `train_optimiser`
    on `fossils` synthesised with `seed`: the directory holding its `shards/` and its
    checkpoint in `zoo/`, shared read-only by every file that asks for the same one."""

    def build(directory: Path) -> None:
        from scf.domains.fossils import synth_shards
        from scf.ml.optimize import OptimiserConfig, train_optimiser

        synth_shards(domain, fossils, directory / "shards", shard_size=shard_size, seed=seed)
        train_optimiser(domain, directory / "shards", directory / "zoo", OptimiserConfig(**config))

    key = f"{domain} synth_shards({fossils}, shard_size={shard_size}, seed={seed}) OptimiserConfig({sorted(config.items())})"
    return shared_artefact(tmp_path_factory, f"optimiser-{domain.replace(':', '-')}", key, build)


@pytest.fixture(scope="session")
def case14_optimiser(tmp_path_factory) -> Path:
    """A small learned optimiser of grid:case14 (1000 fossils, 60 steps, 32 wide; ~4 s of
    CPU): the checkpoint test_strike_learned and test_deploy_kinds deploy."""
    root = shared_optimiser(tmp_path_factory, "grid:case14", 1000, 500, 5, steps=60, hidden=32, batch_size=128)
    [checkpoint] = (root / "zoo").glob("*.safetensors")
    return checkpoint


@pytest.fixture(scope="session")
def case14_optimiser_2000(tmp_path_factory) -> Path:
    """grid:case14's learned optimiser trained briefly on 2000 fossils (400 steps, 128 wide;
    ~13 s of CPU): the directory with its shards/ and zoo/, for test_learned_opt and
    test_optimize_learned."""
    return shared_optimiser(tmp_path_factory, "grid:case14", 2000, 1000, 5, steps=400, hidden=128, batch_size=128)


@pytest.fixture
def nats_server(tmp_path):
    server = ServerProcess(tmp_path / "nats", free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def settings(tmp_path, nats_server) -> Settings:
    s = Settings(home=str(tmp_path / "home"), nats_url=nats_server.url, source="test")
    init_home(s)
    return s


@pytest.fixture
def scf_env(settings) -> dict[str, str]:
    """Environment for `scf` subprocesses pointing at this test's server and home."""
    env = dict(os.environ)
    env.update({"NATS_URL": settings.nats_url or "", "SCF_HOME": settings.home, "PYTHONUNBUFFERED": "1"})
    env.pop("SCF_KEY", None)
    return env


@pytest.fixture
async def bus(settings):
    b = await Bus.connect(settings, "test")
    await ensure(b.js)
    yield b
    await b.close()


async def wait_for(predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Await a condition (polling with backoff) instead of sleeping a fixed time."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


def scf(*args: str, env: dict[str, str], check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the `scf` CLI as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "scf.cli.main", *args], env=env, capture_output=True, text=True, timeout=timeout, check=check, cwd=ROOT
    )


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run an `scf` command in this process (typer's CliRunner) with exactly `env` as its
    environment: for CLI behaviour that needs no real process. Same result shape as `scf`.
    Not from inside a running event loop (commands call asyncio.run): use a thread there."""
    from typer.testing import CliRunner

    from scf.cli.main import app

    overlay: dict[str, str | None] = {k: None for k in os.environ if k not in env}
    overlay.update(env)
    r = CliRunner().invoke(app, list(args), env=overlay, catch_exceptions=False)
    return subprocess.CompletedProcess(["scf", *args], r.exit_code, r.stdout, r.stderr)


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start a long-running process (e.g. `scf run NAME`) with its output in `log`."""
    fh = open(log, "ab")
    return subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)


def freeze(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGSTOP `proc` and return once every thread of it is stopped: kill() returns before a
    thread running on another CPU has stopped, and such a thread can still answer a request
    sent right after (a frozen server that answered once: the flake of test_bus_kv_says_...)."""
    import signal

    proc.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for task in Path(f"/proc/{proc.pid}/task").iterdir():
            try:
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except (OSError, IndexError):  # a thread that ended meanwhile
                continue
        if states and all(s in "Tt" for s in states):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"pid {proc.pid} not stopped {timeout} s after SIGSTOP: thread states {states}")
        time.sleep(0.002)


async def stream_count(bus: Bus, stream: str, subject: str | None = None) -> int:
    info = await bus.js.stream_info(stream, subjects_filter=subject) if subject else await bus.js.stream_info(stream)
    if subject:
        return sum((info.state.subjects or {}).values())
    return info.state.messages
