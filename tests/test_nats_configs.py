"""The nats-server configs in nats/: each one loads in a real nats-server and serves, and
every user of users.conf gets exactly the permissions docs/nats.md promises.

Every server here is the venv's nats-server on free ports with its own temp store; none
touches the system server on 4222. prod.conf runs as written except its leafnodes port,
which has no command-line flag and is replaced in a temp copy (see `hub`).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import nats.errors
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, StreamConfig

from scf.bus import streams

REPO = Path(__file__).resolve().parents[1]
NATS_DIR = REPO / "nats"
NATS_SERVER = Path(sys.executable).parent / "nats-server"

# Every config file in nats/ and the test that starts it; a new file must be added here.
CONFIG_TESTS = {
    "dev.conf": "test_dev_conf_serves_jetstream",
    "prod.conf": "test_prod_conf_serves_tls_and_logins_only",
    "users.conf": "test_prod_conf_serves_tls_and_logins_only (included)",
    "leaf.conf": "test_leaf_node_joins_the_hub_over_tls",
    "cluster/node-1.conf": "test_cluster_runs_r3_streams",
    "cluster/node-2.conf": "test_cluster_runs_r3_streams",
    "cluster/node-3.conf": "test_cluster_runs_r3_streams",
}

USERS = ("service", "operator", "worker", "edge", "analyst")
# The worker's password is given to the server as a bcrypt hash (cost 6 to keep the test
# fast; use 11 or more in production), in double quotes as users.conf says.
WORKER_PASSWORD = "wGpuTestPassw0rd"
WORKER_PASSWORD_BCRYPT = "$2b$06$mq/whDm98a83lRF8wT.MD.DpwPjzVeSca5MtBr1hEZl.7EG17E3mq"

START_DEADLINE_S = 10.0


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    monitor_port: int | None = None
    leaf_port: int | None = None

    def tail(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "(no output)"

    def url(self, user: str | None = None, password: str | None = None) -> str:
        auth = f"{user}:{password}@" if user else ""
        return f"nats://{auth}127.0.0.1:{self.port}"

    def monitor(self, path: str) -> dict:
        assert self.monitor_port is not None, f"{self.name} has no monitoring port"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}{path}", timeout=2) as r:
            return json.load(r)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def start_server(name: str, args: list[str], env: dict[str, str], workdir: Path, port: int, **ports: int) -> Server:
    """Start nats-server and return once its client port accepts connections."""
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(NATS_SERVER), *args], env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT
        )
    server = Server(name, proc, port, log, **ports)
    deadline = time.monotonic() + START_DEADLINE_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server {name} exited with {proc.returncode}: {server.tail()}")
        with suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return server
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"nats-server {name} did not accept connections on {port}: {server.tail()}")
        time.sleep(0.02)  # polling interval, not a wait for an outcome


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Servers a test starts; all stopped when the test ends."""
    started: list[Server] = []
    yield started
    for server in reversed(started):
        server.stop()


# --------------------------------------------------------------------------- TLS, env


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


def make_tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1."""
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5), not_valid_after=now + datetime.timedelta(hours=2))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SCF throwaway test CA")])
    ca = (
        x509.CertificateBuilder(subject_name=ca_name, issuer_name=ca_name, public_key=ca_key.public_key(),
                                serial_number=x509.random_serial_number(), **valid)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder(subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
                                issuer_name=ca_name, public_key=key.public_key(),
                                serial_number=x509.random_serial_number(), **valid)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return files


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def passwords() -> dict[str, str]:
    # letters and digits, starting with a letter: a bare config token (see users.conf)
    generated = {user: "p" + secrets.token_hex(12) for user in USERS}
    generated["worker"] = WORKER_PASSWORD
    return generated


def base_env() -> dict[str, str]:
    """This process's environment without any SCF_ variable a developer may have set."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SCF_")}


def users_env(passwords: dict[str, str]) -> dict[str, str]:
    env = {f"SCF_{user.upper()}_PASSWORD": pw for user, pw in passwords.items()}
    env["SCF_WORKER_PASSWORD"] = f'"{WORKER_PASSWORD_BCRYPT}"'
    return env


def hub_env(passwords: dict[str, str], tls: TlsFiles, store: Path) -> dict[str, str]:
    return {
        **base_env(),
        **users_env(passwords),
        "SCF_NATS_STORE_DIR": str(store),
        "SCF_TLS_CERT": str(tls.cert),
        "SCF_TLS_KEY": str(tls.key),
        "SCF_TLS_CA": str(tls.ca),
    }


# --------------------------------------------------------------------------- clients


@dataclass
class Conn:
    """A nats-py connection that records what the server reported through the error callback."""

    nc: NATS
    errors: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for_error(self, text: str, timeout: float = 5.0) -> None:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if any(text in e for e in self.errors):
                        return
                    self.changed.clear()
                    if any(text in e for e in self.errors):
                        return
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"no error {text!r} within {timeout} s; errors: {self.errors}") from None

    async def refused(self, text: str, attempt: Awaitable[object]) -> None:
        """Run a request that the server must refuse; await the violation, then drop the request."""
        task = asyncio.ensure_future(attempt)
        try:
            await self.wait_for_error(text)
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await task


async def connect(url: str, *, tls: TlsFiles | None = None, inbox_prefix: str = "_INBOX", name: str = "test") -> Conn:
    conn = Conn(nc=NATS())

    async def on_error(err: Exception) -> None:
        conn.errors.append(str(err))
        conn.changed.set()

    await conn.nc.connect(
        servers=[url],
        name=name,
        tls=tls.client_context() if tls else None,
        inbox_prefix=inbox_prefix,
        error_cb=on_error,
        allow_reconnect=False,
        connect_timeout=3,
    )
    return conn


async def read_until(sub, subject: str, timeout: float = 5.0) -> list[str]:
    """Subjects a subscription delivers, in order, up to and including `subject`."""
    seen: list[str] = []
    async with asyncio.timeout(timeout):
        while True:
            msg = await sub.next_msg(timeout=timeout)
            seen.append(msg.subject)
            if msg.subject == subject:
                return seen


async def eventually(attempt: Callable[[], Awaitable[object]], what: str, timeout: float = 20.0) -> object:
    """Retry `attempt` until it returns without raising (cluster elections, leaf interest)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await attempt()
        except Exception as err:  # noqa: BLE001 - reported once the deadline passes
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: still failing after {timeout:.0f} s: {err!r}") from err
        await asyncio.sleep(0.1)  # polling interval


def violation(kind: str, subject: str, *, prefix: bool = False) -> str:
    """The error callback's text for a refusal (or its start, for a subject prefix). The server
    sends -ERR 'Permissions Violation for Publish to "control.stop"'; nats-py lowercases it."""
    text = f'Permissions Violation for {kind} to "{subject}' + ("" if prefix else '"')
    return text.lower()


# --------------------------------------------------------------------------- the hub


@dataclass
class Hub:
    server: Server
    tls: TlsFiles
    passwords: dict[str, str]

    async def connect(self, user: str, **kwargs) -> Conn:
        """A plain client of `user`, with its own inbox prefix `_INBOX.<user>` (users.conf) unless
        `inbox_prefix` says otherwise (`service` keeps nats-py's default)."""
        if user != "service":
            kwargs.setdefault("inbox_prefix", f"_INBOX.{user}")
        return await connect(self.server.url(user, self.passwords[user]), tls=self.tls, name=user, **kwargs)


async def declare_streams(service: Conn) -> None:
    """The project's streams, buckets and object store (bus/streams.py), as `scf streams
    ensure` makes them, plus the durables the edge test binds to."""
    js = service.nc.jetstream()
    await streams.ensure(js)
    await streams.ensure_consumer(js, streams.CONSUMERS["ledger"])
    # edge durables are created on the service side (users.conf: edge may not create on DEPLOY)
    await js.add_consumer("DEPLOY", ConsumerConfig(durable_name="edge-node-a", filter_subject="deploy.requested.node-a"))
    kv = await js.key_value("scf_state")
    await kv.put("gear", b"STANDARD")
    await js.publish("fossil.recorded.grid.f1", b'{"fossil": 1}')


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles, passwords: dict[str, str]) -> Iterator[Hub]:
    """prod.conf + users.conf as written, but for the leafnodes port (no flag exists for it)."""
    workdir = tmp_path_factory.mktemp("hub")
    leaf_port, port, monitor_port = free_port(), free_port(), free_port()
    text = (NATS_DIR / "prod.conf").read_text()
    assert text.count("listen: 0.0.0.0:7422") == 1, "prod.conf: leafnodes listen line changed; update this fixture"
    (workdir / "prod.conf").write_text(text.replace("listen: 0.0.0.0:7422", f"listen: 127.0.0.1:{leaf_port}"))
    shutil.copy(NATS_DIR / "users.conf", workdir / "users.conf")
    server = start_server(
        "hub",
        ["-c", str(workdir / "prod.conf"), "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor_port)],
        hub_env(passwords, tls_files, workdir / "store"),
        workdir,
        port,
        monitor_port=monitor_port,
        leaf_port=leaf_port,
    )
    try:
        the_hub = Hub(server, tls_files, passwords)

        async def setup() -> None:
            service = await the_hub.connect("service")
            await declare_streams(service)
            await service.nc.close()

        asyncio.run(setup())
        yield the_hub
    finally:
        server.stop()


# --------------------------------------------------------------------------- configs load


def test_every_config_file_is_started_by_a_test() -> None:
    found = {p.relative_to(NATS_DIR).as_posix() for p in NATS_DIR.rglob("*.conf")}
    assert found == set(CONFIG_TESTS), f"config files without a test: {sorted(found - set(CONFIG_TESTS))}"


@pytest.mark.timeout(30)
def test_missing_password_variable_stops_the_server_with_its_name(tmp_path: Path, tls_files: TlsFiles,
                                                                   passwords: dict[str, str]) -> None:
    env = hub_env(passwords, tls_files, tmp_path / "store")
    del env["SCF_EDGE_PASSWORD"]
    result = subprocess.run([str(NATS_SERVER), "-c", str(NATS_DIR / "prod.conf"), "-t"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=20)
    assert result.returncode != 0
    assert "variable reference for 'SCF_EDGE_PASSWORD'" in result.stdout + result.stderr


@pytest.mark.timeout(60)
def test_dev_conf_serves_jetstream(servers: list[Server], tmp_path: Path) -> None:
    port, store = free_port(), tmp_path / "store"
    # exactly the argv `scf server start` uses
    servers.append(start_server("dev", ["-c", str(NATS_DIR / "dev.conf"), "-sd", str(store), "-p", str(port)],
                                base_env(), tmp_path, port))

    async def run() -> None:
        conn = await connect(servers[0].url())
        js = conn.nc.jetstream()
        await js.add_stream(StreamConfig(name="FOSSILS", subjects=["fossil.>"]))
        ack = await js.publish("fossil.recorded.grid.f1", b"{}")
        assert (ack.stream, ack.seq) == ("FOSSILS", 1)
        await conn.nc.close()

    asyncio.run(run())
    assert (store / "jetstream").is_dir(), "-sd did not set the store directory"


@pytest.mark.timeout(60)
def test_prod_conf_serves_tls_and_logins_only(hub: Hub, tmp_path: Path) -> None:
    # what a client sees before TLS: the server demands TLS and a login
    with socket.create_connection(("127.0.0.1", hub.server.port), timeout=5) as raw:
        info = json.loads(raw.makefile("rb").readline().removeprefix(b"INFO "))
    assert info["tls_required"] is True and info["auth_required"] is True

    varz = hub.server.monitor("/varz")
    assert varz["jetstream"]["config"]["sync_always"] is True, "prod.conf must fsync every write"
    assert varz["leaf"]["tls_required"] is True

    other_ca_dir = tmp_path / "other-ca"
    other_ca_dir.mkdir()
    other_ca = make_tls_files(other_ca_dir)

    async def run() -> None:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await connect(hub.server.url("service", "wrong-password"), tls=hub.tls)
        with pytest.raises(ssl.SSLCertVerificationError):  # a CA that did not sign the server
            await connect(hub.server.url("service", hub.passwords["service"]), tls=other_ca)
        service = await hub.connect("service")
        ack = await service.nc.jetstream().publish("fossil.recorded.grid.f2", b"{}")
        assert ack.stream == "FOSSILS"
        # the worker's password is configured as a bcrypt hash: the client sends the plain one
        worker = await hub.connect("worker", inbox_prefix="_INBOX.worker")
        assert worker.nc.is_connected
        await worker.nc.close()
        await service.nc.close()

    asyncio.run(run())


# --------------------------------------------------------------------------- permissions


@pytest.mark.timeout(60)
def test_worker_is_refused_control_commands_and_may_report_progress(hub: Hub) -> None:
    async def run() -> None:
        watcher = await hub.connect("service")  # operator and analyst subscribe to inboxes only
        watch = await watcher.nc.subscribe(">")
        await watcher.nc.flush()  # the subscription is in place before anyone publishes

        worker = await hub.connect("worker", inbox_prefix="_INBOX.worker")
        await worker.nc.publish("control.stop", b"{}")
        await worker.nc.publish("job.progress.x", b'{"step": 1}')
        await worker.wait_for_error(violation("Publish", "control.stop"))
        # the same connection's later message arrives, so the refused one would have come first
        seen = await read_until(watch, "job.progress.x")
        assert "control.stop" not in seen
        assert worker.errors == [f"nats: {violation('Publish', 'control.stop')}"]
        await worker.nc.close()
        await watcher.nc.close()

    asyncio.run(run())


@pytest.mark.timeout(60)
def test_operator_may_publish_control_commands_but_not_control_events(hub: Hub) -> None:
    async def run() -> None:
        service = await hub.connect("service")
        watch = await service.nc.subscribe("control.>")
        await service.nc.flush()
        operator = await hub.connect("operator")
        await operator.nc.publish("control.rejected", b"{}")
        await operator.nc.publish("control.stop", b"{}")
        ack = await operator.nc.jetstream().publish("control.shift_gear", b'{"level": "ACCELERATED"}')
        assert ack.stream == "CONTROL"
        await operator.wait_for_error(violation("Publish", "control.rejected"))
        seen = await read_until(watch, "control.shift_gear")
        assert seen == ["control.stop", "control.shift_gear"]
        # the operator reads everything but the work queue (reading it would take jobs)
        js = operator.nc.jetstream()
        assert (await js.stream_info("JOBS")).config.name == "JOBS"
        await operator.refused(violation("Publish", "$JS.API.CONSUMER.CREATE.JOBS"),
                               js.subscribe("work.>", stream="JOBS", ordered_consumer=True))
        await operator.nc.close()
        await service.nc.close()

    asyncio.run(run())


ANALYST_REFUSED = [
    "control.stop",
    "fossil.recorded.grid.x",
    "job.progress.x",
    "verdict.intent.approve",
    "$KV.scf_state.gear",
    "$O.scf_artifacts.M.x",
    "$JS.API.STREAM.CREATE.X",
    "$JS.API.STREAM.DELETE.FOSSILS",
    "$JS.API.STREAM.PURGE.FOSSILS",
    "$JS.API.CONSUMER.DELETE.DEPLOY.ledger",
    "$JS.API.CONSUMER.CREATE.JOBS",
    "$JS.API.CONSUMER.MSG.NEXT.JOBS.worker-cloud",
    "$JS.ACK.DEPLOY.ledger.1.1.1.0.0",
    "_INBOX.somebody.reply",
]


@pytest.mark.timeout(60)
def test_analyst_publishes_nothing_but_reads_everything(hub: Hub) -> None:
    async def run() -> None:
        service = await hub.connect("service")
        watch = await service.nc.subscribe(">")
        await service.nc.flush()
        analyst = await hub.connect("analyst")
        for subject in ANALYST_REFUSED:
            await analyst.nc.publish(subject, b"{}")
        js = analyst.nc.jetstream()
        info = await js.stream_info("CONTROL")  # allowed; its reply comes after every refusal
        assert info.config.name == "CONTROL"
        for subject in ANALYST_REFUSED:
            await analyst.wait_for_error(violation("Publish", subject))
        assert len(analyst.errors) == len(ANALYST_REFUSED)
        await service.nc.publish("scf.test.sentinel", b"")
        seen = await read_until(watch, "scf.test.sentinel")
        assert not set(seen) & set(ANALYST_REFUSED), f"refused messages were delivered: {set(seen) & set(ANALYST_REFUSED)}"

        # reading: a stream through an ordered consumer, a KV entry, stream lookup
        await service.nc.jetstream().publish("gear.changed", b'{"level": "ACCELERATED"}')
        ordered = await js.subscribe("gear.changed", stream="CONTROL", ordered_consumer=True)
        msg = await ordered.next_msg(timeout=5)
        assert msg.data == b'{"level": "ACCELERATED"}'
        await ordered.unsubscribe()
        state = await js.key_value("scf_state")
        assert (await state.get("gear")).value == b"STANDARD"
        assert await js.find_stream_name_by_subject("fossil.recorded.grid.f1") == "FOSSILS"
        assert len(analyst.errors) == len(ANALYST_REFUSED), f"reading was refused: {analyst.errors[len(ANALYST_REFUSED):]}"
        await analyst.nc.close()
        await service.nc.close()

    asyncio.run(run())


@pytest.mark.timeout(60)
def test_worker_pulls_jobs_uploads_checkpoints_and_keeps_to_its_subjects(hub: Hub) -> None:
    async def run() -> None:
        service = await hub.connect("service")
        sjs = service.nc.jetstream()
        await sjs.publish("work.cloud", b'{"job_id": "j1"}')

        worker = await hub.connect("worker", inbox_prefix="_INBOX.worker")
        js = worker.nc.jetstream()
        # the pool's durable: created by the worker on first use, then pulled and acked
        jobs = await js.pull_subscribe("work.cloud", durable="worker-cloud", stream="JOBS")
        [job] = await jobs.fetch(1, timeout=5)
        assert job.data == b'{"job_id": "j1"}'
        await job.in_progress()
        await job.ack_sync()
        assert (await sjs.stream_info("JOBS")).state.messages == 0, "the acked job is still queued"

        assert (await js.publish("job.started.j1", b"{}")).stream == "TRAINING"
        assert (await js.publish("job.progress.j1", b'{"step": 1}')).stream == "TRAINING"
        artifacts = await js.object_store("scf_artifacts")
        blob = secrets.token_bytes(300_000)  # three chunks
        info = await artifacts.put("ckpt-j1.safetensors", blob)
        assert info.chunks == 3
        assert (await js.publish("checkpoint.produced.grid", b"{}")).stream == "CHECKPOINTS"
        assert (await js.publish("job.completed.j1", b"{}")).stream == "TRAINING"
        workers = await js.key_value("scf_workers")
        await workers.put("cloud-1", b"alive")

        # training data: an ordered consumer over FOSSILS
        fossils = await js.subscribe("fossil.>", stream="FOSSILS", ordered_consumer=True)
        assert (await fossils.next_msg(timeout=5)).subject == "fossil.recorded.grid.f1"
        await fossils.unsubscribe()
        # the emergency stop and the gear: get and watch scf_state
        state = await js.key_value("scf_state")
        assert (await state.get("gear")).value == b"STANDARD"
        watcher = await state.watch("gear")
        assert (await watcher.updates(timeout=5)).value == b"STANDARD"
        await watcher.stop()
        assert worker.errors == [], worker.errors

        # what a compromised GPU box must not do
        await worker.nc.publish("checkpoint.promoted.grid", b"{}")
        await worker.wait_for_error(violation("Publish", "checkpoint.promoted.grid"))
        await worker.nc.publish("checkpoint.verified.grid", b"{}")
        await worker.wait_for_error(violation("Publish", "checkpoint.verified.grid"))
        await worker.nc.publish("job.dispatched.j2", b"{}")
        await worker.wait_for_error(violation("Publish", "job.dispatched.j2"))
        await worker.refused(violation("Publish", "$KV.scf_state.gear"), state.put("gear", b"SINGULARITY"))
        await worker.refused(violation("Publish", "$JS.API.STREAM.INFO.DEPLOY"), js.stream_info("DEPLOY"))
        await worker.refused(violation("Publish", "$JS.API.STREAM.PURGE.OBJ_scf_artifacts"),
                             js.purge_stream("OBJ_scf_artifacts"))
        await worker.refused(violation("Publish", "$JS.API.CONSUMER.DELETE.FOSSILS.x"),
                             js.delete_consumer("FOSSILS", "x"))
        blob_back = await (await service.nc.jetstream().object_store("scf_artifacts")).get("ckpt-j1.safetensors")
        assert blob_back.data == blob
        await worker.nc.close()
        await service.nc.close()

    asyncio.run(run())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("user", ["worker", "edge", "operator", "analyst"])
def test_every_user_but_service_must_use_its_own_inbox_prefix(hub: Hub, user: str) -> None:
    """nats-py's default inbox _INBOX.<random>, and another user's prefix, are refused: no
    login reads replies meant for another (tests/test_attack_inboxes.py attacks it)."""
    stream = "DEPLOY" if user == "edge" else "JOBS"

    async def run() -> None:
        for prefix in ("_INBOX", "_INBOX.service" if user != "worker" else "_INBOX.edge"):
            conn = await hub.connect(user, inbox_prefix=prefix)
            await conn.refused(violation("Subscription", f"{prefix}.", prefix=True), conn.nc.jetstream().stream_info(stream))
            await conn.nc.close()
        own = await hub.connect(user)  # _INBOX.<user>
        assert (await own.nc.jetstream().stream_info(stream)).config.name == stream
        await own.nc.close()

    asyncio.run(run())


@pytest.mark.timeout(60)
def test_edge_reads_its_deployments_reports_and_registers(hub: Hub) -> None:
    async def run() -> None:
        service = await hub.connect("service")
        sjs = service.nc.jetstream()
        artifacts = await sjs.object_store("scf_artifacts")
        await artifacts.put("release-7.bin", b"artifact bytes")
        await sjs.publish("deploy.requested.node-a", b'{"artifact": "release-7.bin"}')

        edge = await hub.connect("edge", inbox_prefix="_INBOX.edge")
        js = edge.nc.jetstream()
        requests = await js.pull_subscribe("deploy.requested.node-a", durable="edge-node-a", stream="DEPLOY")
        [request] = await requests.fetch(1, timeout=5)
        assert json.loads(request.data) == {"artifact": "release-7.bin"}
        store = await js.object_store("scf_artifacts")
        assert (await store.get("release-7.bin")).data == b"artifact bytes"
        await request.ack_sync()
        assert (await js.publish("deploy.activated.node-a", b"{}")).stream == "DEPLOY"
        assert (await js.publish("energy.measured.node-a", b'{"kwh": 1.5}')).stream == "DEPLOY"
        nodes = await js.key_value("scf_nodes")
        await nodes.put("node-a", b'{"url": "edge://node-a"}')
        gear = await (await js.key_value("scf_state")).get("gear")
        assert gear.value == b"STANDARD"
        assert edge.errors == [], edge.errors

        await edge.nc.publish("deploy.requested.node-b", b"{}")
        await edge.wait_for_error(violation("Publish", "deploy.requested.node-b"))
        await edge.nc.publish("control.rollback", b"{}")
        await edge.wait_for_error(violation("Publish", "control.rollback"))
        # no consumer create on DEPLOY: it would let an edge box rewrite the ledger's durable
        await edge.refused(violation("Publish", "$JS.API.CONSUMER.CREATE.DEPLOY"),
                           js.subscribe("energy.measured.>", stream="DEPLOY", ordered_consumer=True))
        await edge.refused(violation("Publish", "$O.scf_artifacts.C.", prefix=True), store.put("evil.bin", b"x"))
        await edge.nc.close()
        await service.nc.close()

    asyncio.run(run())


# --------------------------------------------------------------------------- cluster, leaf


@pytest.mark.timeout(60)
def test_cluster_runs_r3_streams(servers: list[Server], tmp_path: Path, passwords: dict[str, str]) -> None:
    clients = [free_port() for _ in range(3)]
    routes = [free_port() for _ in range(3)]
    route_urls = ",".join(f"nats-route://127.0.0.1:{p}" for p in routes)
    env = {**base_env(), **users_env(passwords)}
    # the files' relative store dirs (./.scf/cluster/nN) land in tmp_path, the servers' cwd
    for n in (1, 2, 3):
        args = [
            "-c", str(NATS_DIR / "cluster" / f"node-{n}.conf"),
            "-p", str(clients[n - 1]), "-m", str(free_port()),
            "--cluster", f"nats://127.0.0.1:{routes[n - 1]}", "--routes", route_urls,
        ]
        servers.append(start_server(f"node-{n}", args, env, tmp_path, clients[n - 1]))

    async def run() -> None:
        service = await connect(servers[0].url("service", passwords["service"]))
        js = service.nc.jetstream()
        config = StreamConfig(name="FOSSILS", subjects=["fossil.>"], num_replicas=3)
        # until the routes are up and JetStream has elected its meta leader
        await eventually(lambda: js.add_stream(config), "creating an R3 stream")

        async def all_replicas_current() -> object:
            info = await js.stream_info("FOSSILS")
            assert info.config.num_replicas == 3
            assert info.cluster is not None and info.cluster.name == "scf"
            peers = [info.cluster.leader] + [r.name for r in info.cluster.replicas or [] if r.current]
            assert sorted(peers) == ["scf-n1", "scf-n2", "scf-n3"], peers
            return info

        await eventually(all_replicas_current, "three current replicas")
        ack = await js.publish("fossil.recorded.grid.f1", b"{}")
        assert (ack.stream, ack.seq) == ("FOSSILS", 1)
        await service.nc.close()

    asyncio.run(run())


@pytest.mark.timeout(60)
def test_leaf_node_joins_the_hub_over_tls(hub: Hub, servers: list[Server], tmp_path: Path) -> None:
    port = free_port()
    env = {
        **base_env(),
        "SCF_HUB_LEAF_URL": f"tls://worker:{hub.passwords['worker']}@127.0.0.1:{hub.server.leaf_port}",
        "SCF_TLS_CA": str(hub.tls.ca),
    }
    servers.append(start_server("leaf", ["-c", str(NATS_DIR / "leaf.conf"), "-p", str(port)], env, tmp_path, port))

    async def leaf_is_connected() -> object:
        leafz = await asyncio.to_thread(hub.server.monitor, "/leafz")
        assert [leaf["account"] for leaf in leafz.get("leafs") or []] == ["SCF"], leafz
        return leafz

    async def run() -> None:
        await eventually(leaf_is_connected, "the leaf connecting to the hub", timeout=10)
        watcher = await hub.connect("service")  # operator and analyst subscribe to inboxes only
        watch = await watcher.nc.subscribe(">")
        await watcher.nc.flush()
        # the GPU process talks to its local leaf without credentials
        local = await connect(servers[0].url(), inbox_prefix="_INBOX.worker", name="gpu-worker")

        async def probe_arrives() -> object:  # until the hub's interest has reached the leaf
            await local.nc.publish("job.progress.probe", b"")
            msg = await watch.next_msg(timeout=0.5)
            assert msg.subject == "job.progress.probe", msg.subject
            return msg

        await eventually(probe_arrives, "a message from the leaf reaching the hub", timeout=10)
        await local.nc.publish("control.stop", b"{}")
        await local.nc.publish("job.progress.leaf", b'{"step": 1}')
        seen = await read_until(watch, "job.progress.leaf")
        assert "control.stop" not in seen, "the hub took control.stop from the worker's leaf"

        # JetStream on the hub, through the leaf: the worker's pull consumer
        service = await hub.connect("service")
        await service.nc.jetstream().publish("work.leaf", b'{"job_id": "leaf-1"}')
        js = local.nc.jetstream()
        await eventually(lambda: js.stream_info("JOBS"), "the hub's JetStream API reachable from the leaf")
        jobs = await js.pull_subscribe("work.leaf", durable="worker-leaf", stream="JOBS")
        [job] = await jobs.fetch(1, timeout=5)
        assert job.data == b'{"job_id": "leaf-1"}'
        await job.ack_sync()
        assert (await js.publish("job.completed.leaf-1", b"{}")).stream == "TRAINING"
        await (await js.key_value("scf_workers")).put("leaf-1", b"alive")
        info = await (await js.object_store("scf_artifacts")).put("ckpt-leaf-1.safetensors", b"w" * 200_000)
        assert info.chunks == 2
        assert local.errors == [], local.errors
        for conn in (local, watcher, service):
            await conn.nc.close()

    asyncio.run(run())
