"""The CLI as a user meets it: help everywhere, exact one-line errors, the embedded server.

Commands run in-process (typer's CliRunner, `cli`) unless a real process is the point:
the embedded server started and stopped across separate `scf` invocations."""

from __future__ import annotations

import os
import socket

import pytest
import typer.main

from scf.bus.server import free_port
from scf.cli.main import app
from tests.conftest import cli, scf


def walk(cmd, path: str = "scf"):
    yield path, cmd
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from walk(sub, f"{path} {name}")


def test_every_command_has_help_text():
    missing = [path for path, cmd in walk(typer.main.get_command(app)) if not (cmd.help or "").strip()]
    assert missing == []


def test_every_command_is_documented_in_the_readme():
    readme = (os.path.dirname(__file__) + "/../README.md")
    text = open(readme).read()
    groups = [path for path, cmd in walk(typer.main.get_command(app)) if path.count(" ") == 1]
    missing = [g for g in groups if f"`{g}" not in text]
    assert missing == []


@pytest.fixture
def home_env(tmp_path):
    env = dict(os.environ)
    env.pop("NATS_URL", None)
    env["SCF_HOME"] = str(tmp_path / "home")
    env["SCF_NATS_PORT"] = str(free_port())
    return env


def test_unreachable_nats_names_the_url_and_the_fix(home_env):
    port = free_port()
    home_env["NATS_URL"] = f"nats://127.0.0.1:{port}"
    r = cli("status", env=home_env)
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"Error: cannot reach NATS at nats://127.0.0.1:{port} (connection refused): "
        "start the embedded server with `scf server start`, or set NATS_URL to a running server"
    )


def test_unknown_gear_is_refused_before_anything_is_sent(home_env):
    r = cli("control", "shift-gear", "WARP", env=home_env)
    assert r.returncode == 1
    assert r.stderr.strip() == "Error: unknown gear 'WARP': use one of STANDARD, ACCELERATED, HYPER, SINGULARITY"


def test_malformed_json_is_refused_with_its_position(home_env):
    r = cli("events", "publish", "intent.created", '{"intent_id": ', env=home_env)
    assert r.returncode == 1
    assert r.stderr.strip() == "Error: malformed JSON: Input data was truncated"


def test_payload_of_the_wrong_shape_names_the_field(home_env):
    r = cli("events", "publish", "intent.created", '{"intent_id": 1, "kind": "train", "domain": "d"}', env=home_env)
    assert r.returncode == 1
    assert r.stderr.strip() == "Error: invalid intent.created payload: Expected `str`, got `int` - at `$.intent_id`"


def test_embedded_server_start_status_stop_and_a_taken_port(home_env):
    # `scf server start/stop/status` as real processes (the server outlives the one that
    # started it); the commands that only use it in-process
    assert cli("init", env=home_env).returncode == 0
    r = scf("server", "start", env=home_env)
    assert r.returncode == 0, r.stderr
    try:
        assert "nats-server running (pid" in r.stdout
        again = scf("server", "start", env=home_env)  # idempotent
        assert again.returncode == 0 and again.stdout == r.stdout
        from scf.bus.streams import STREAMS

        assert cli("streams", "ensure", env=home_env).stdout.count("created   stream") == len(STREAMS)
        st = cli("status", env=home_env)
        assert st.returncode == 0 and "FOSSILS" in st.stdout and "DLQ size: 0" in st.stdout
        sent = cli("control", "stop", "--reason", "test", env=home_env)
        assert sent.returncode == 0 and sent.stdout.startswith("sent control.stop")
        tail = cli("events", "tail", "control.>", env=home_env)
        assert '"reason":"test"' in tail.stdout
    finally:
        assert scf("server", "stop", env=home_env).stdout.strip() == "stopped"
    assert "not running" in scf("server", "status", env=home_env).stdout


def test_a_port_taken_by_another_program_is_a_clear_error(home_env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        home_env["SCF_NATS_PORT"] = str(port)
        r = cli("server", "start", env=home_env)
    assert r.returncode == 1
    assert r.stderr.startswith(f"Error: port {port} on 127.0.0.1 is taken by another program: set SCF_NATS_PORT to a free port")


def test_nats_url_set_means_no_embedded_server(home_env):
    home_env["NATS_URL"] = "nats://127.0.0.1:4222"
    r = cli("server", "start", env=home_env)
    assert r.returncode == 1
    assert "NATS_URL is set (nats://127.0.0.1:4222): SCF uses that server and does not start its own" in r.stderr


def test_keys_new_trust_ls(home_env, tmp_path):
    r = cli("keys", "new", "alice", env=home_env)
    assert r.returncode == 0, r.stderr
    pub = (tmp_path / "home" / "keys" / "alice.pub")
    assert oct((tmp_path / "home" / "keys" / "alice.key").stat().st_mode & 0o777) == "0o600"
    t = cli("keys", "trust", str(pub), "--role", "operator", "--role", "release", env=home_env)
    assert t.returncode == 0 and "as operator,release" in t.stdout
    ls = cli("keys", "ls", env=home_env).stdout
    assert "own" in ls and "trusted" in ls and "roles=operator,release" in ls
    dup = cli("keys", "new", "alice", env=home_env)
    assert dup.returncode == 1 and "already exists" in dup.stderr
