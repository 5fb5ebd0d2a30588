"""A login per edge box (ops/natsconf.py, `scf nats users`): with the shared `edge` login,
box B could pull and ack box A's deploy orders, read A's replies and overwrite A's
registry entry. With the generated users.conf, B (logged in as `edge-box-b`) is refused
A's consumer, A's inbox, A's acks, A's subjects and A's registry key, while A (as
`edge-box-a`, through bus/client.py and its `_INBOX.edge-box-a` prefix) takes its own
order. A real nats-server with the generated config."""

from __future__ import annotations

import secrets

import nats
import pytest

from scf.bus.client import Bus
from scf.bus.errors import ConfigError
from scf.bus.settings import Settings
from scf.bus.streams import ensure, ensure_consumer
from scf.cli.main import app  # noqa: F401 - the CLI module registers `scf nats`
from scf.consumers.nodes import edge_consumer
from scf.ops import natsconf
from tests.conftest import cli, wait_for
from tests.test_nats_configs import WORKER_PASSWORD, base_env, free_port, start_server, users_env, violation

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]
NODES = ("box-a", "box-b")


def test_generated_users_conf(tmp_path):
    text = natsconf.users_conf(list(NODES))
    assert "user: edge\n" not in text and "$SCF_EDGE_PASSWORD" not in text.split("accounts {", 1)[1]
    for n in NODES:
        assert f"user: edge-{n}\n" in text and f"password: ${natsconf.password_var(n)}\n" in text
        assert f'"$JS.API.CONSUMER.MSG.NEXT.DEPLOY.edge-{n}"' in text and f'"_INBOX.edge-{n}.>"' in text
    assert '"$JS.ACK.DEPLOY.>"' not in text.split("user: edge-box-a", 1)[1] and '"$KV.scf_nodes.>"' not in text.split("user: edge-box-a", 1)[1]
    assert "user: edge\n" in natsconf.users_conf(["box-a"], keep_shared=True)
    with pytest.raises(ConfigError, match=r"edge node 'a\.b': a node id for a login of its own must be"):
        natsconf.users_conf(["a.b"])
    with pytest.raises(ConfigError, match="would share the password variable SCF_EDGE_BOX_A_PASSWORD"):
        natsconf.users_conf(["box-a", "box_a"])
    out = tmp_path / "users.conf"
    r = cli("nats", "users", "--edge-node", "box-a", "--out", str(out), env=base_env())
    assert r.returncode == 0 and out.read_text() == natsconf.users_conf(["box-a"]), r.stdout + r.stderr
    r = cli("nats", "users", "--edge-node", "box-b", "--from", str(out), env=base_env())
    assert (r.returncode, r.stderr) == (1, f"Error: {out} was generated already: generate from the original nats/users.conf\n")


@pytest.fixture
def server(tmp_path):
    workdir = tmp_path / "nats"
    workdir.mkdir()
    (workdir / "users.conf").write_text(natsconf.users_conf(list(NODES)))
    port = free_port()
    (workdir / "server.conf").write_text(f'listen: 127.0.0.1:{port}\njetstream {{ store_dir: "{workdir / "store"}" }}\ninclude users.conf\n')
    passwords = {u: "p" + secrets.token_hex(12) for u in ("service", "operator", "analyst")}
    passwords["worker"] = WORKER_PASSWORD
    edge = {n: "p" + secrets.token_hex(12) for n in NODES}
    env = {**base_env(), **users_env(passwords), **{natsconf.password_var(n): pw for n, pw in edge.items()}}
    srv = start_server("edge-logins", ["-c", str(workdir / "server.conf")], env, workdir, port)
    urls = {u: srv.url(u, pw) for u, pw in passwords.items()} | {n: srv.url(natsconf.user_of(n), pw) for n, pw in edge.items()}
    try:
        yield urls
    finally:
        srv.stop()


async def test_box_b_cannot_take_box_as_orders_or_read_its_inbox(server, tmp_path):
    home = tmp_path / "home"
    service = await Bus.connect(Settings(home=str(home), nats_url=server["service"], source="test"), "service")
    errors: list[str] = []
    received: list[str] = []

    async def on_error(err: Exception) -> None:
        errors.append(str(err).lower())

    async def on_msg(msg) -> None:
        received.append(msg.subject)

    b = await nats.connect(server["box-b"], inbox_prefix="_INBOX.edge-box-b", error_cb=on_error, allow_reconnect=False)
    a_bus = None
    try:
        await ensure(service.js)
        for n in NODES:
            await ensure_consumer(service.js, edge_consumer(n))  # the planner creates each box's consumer
            await service.js.publish(f"deploy.requested.{n}", f"order for {n}".encode())

        # B: A's inbox, A's consumer (info, next message), an ack of A's, A's subjects, A's registry key
        await b.subscribe("_INBOX.edge-box-a.>", cb=on_msg)
        await b.subscribe("_INBOX.>", cb=on_msg)
        attempts = [
            "$JS.API.CONSUMER.INFO.DEPLOY.edge-box-a",
            "$JS.API.CONSUMER.MSG.NEXT.DEPLOY.edge-box-a",
            "$JS.ACK.DEPLOY.edge-box-a.1.1.1.1712345678000000000.0",
            "deploy.activated.box-a",
            "energy.measured.box-a",
            "$KV.scf_nodes.box-a",
            "$JS.API.CONSUMER.CREATE.DEPLOY.edge-box-a",
        ]
        for subject in attempts:
            await b.publish(subject, b'{"batch": 1}', reply="_INBOX.edge-box-b.x")
        await b.flush()
        for subject in ("_INBOX.edge-box-a.>", "_INBOX.>"):
            await wait_for(lambda s=subject: any(violation("Subscription", s.lower()) in e for e in errors), 30,
                           f"the server to refuse box B a subscription to {subject}")
        for subject in attempts:
            await wait_for(lambda s=subject: any(violation("Publish", s.lower()) in e for e in errors), 30,
                           f"the server to refuse box B a publish to {subject}")
        info = await service.js.consumer_info("DEPLOY", "edge-box-a")
        assert (info.num_pending, info.num_ack_pending, info.delivered.stream_seq) == (1, 0, 0), "box B touched box A's order"

        # A, through SCF's own client (its inbox prefix _INBOX.edge-box-a), takes its order and acks it
        a_bus = await Bus.connect(Settings(home=str(home), nats_url=server["box-a"], source="box-a"), "scf-edge-box-a")
        sub = await a_bus.js.pull_subscribe_bind(durable="edge-box-a", stream="DEPLOY")
        [msg] = await sub.fetch(1, timeout=10)
        assert msg.data == b"order for box-a"
        await msg.ack_sync()
        info = await service.js.consumer_info("DEPLOY", "edge-box-a")
        assert (info.num_pending, info.num_ack_pending) == (0, 0)
        # B takes its own order the same way
        sub_b = await b.jetstream().pull_subscribe_bind(durable="edge-box-b", stream="DEPLOY")
        [mb] = await sub_b.fetch(1, timeout=10)
        assert mb.data == b"order for box-b"
        await mb.ack_sync()
        # nothing of A's reached B (a sentinel through the server first: a delivery let through would be in)
        await service.nc.publish("_INBOX.sentinel", b"")
        await b.flush()
        assert received == []
    finally:
        await b.close()
        if a_bus is not None:
            await a_bus.close()
        await service.close()
