"""Reading other users' replies: every login may subscribe to its own inboxes only.

The tester's attack: with the production `operator` (or `analyst`) password, a plain NATS
client subscribes to `_INBOX.>` and sees every reply the server sends anyone: the messages a
worker pulls from its job queue, the answers to the ledger's and the daemon's reads, every key
fetched from KV. nats/users.conf now lets each user but `service` subscribe to
`_INBOX.<user>.>` only, and every SCF process and CLI connects with that inbox prefix
(bus/client.py). A real nats-server with nats/users.conf, real `scf` CLI processes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import nats
import pytest

from scf.bus.client import Bus
from tests import test_attack_control
from tests.conftest import wait_for
from tests.test_attack_control import Deployment
from tests.test_nats_configs import violation

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

# the fixtures of the control-plane attacks: nats/users.conf on a real server, a service login
deployment = test_attack_control.deployment
service = test_attack_control.service

# what an attacker subscribes to: everyone's replies, then each other user's own prefix
WATCHED = {
    "operator": ["_INBOX.>", "_INBOX.worker.>", "_INBOX.edge.>", "_INBOX.analyst.>", ">"],
    "analyst": ["_INBOX.>", "_INBOX.worker.>", "_INBOX.operator.>", ">"],
    "worker": ["_INBOX.>", "_INBOX.edge.>", "_INBOX.operator.>"],
    "edge": ["_INBOX.>", "_INBOX.worker.>", "_INBOX.operator.>"],
}


def scf_as(d: Deployment, user: str, *args: str) -> subprocess.CompletedProcess:
    env = {**d.env(), "NATS_URL": d.url(user)}
    return subprocess.run([sys.executable, "-m", "scf.cli.main", *args], env=env, capture_output=True, text=True, timeout=60)


async def test_no_login_reads_another_users_replies(deployment: Deployment, service: Bus):
    attackers, refusals, received = [], {u: [] for u in WATCHED}, {u: [] for u in WATCHED}
    for user, subjects in WATCHED.items():

        async def on_error(err: Exception, user=user) -> None:
            refusals[user].append(str(err).lower())

        async def on_msg(msg, user=user) -> None:
            received[user].append(msg.subject)

        nc = await nats.connect(deployment.url(user), name=f"attacker-{user}", error_cb=on_error,
                                inbox_prefix=f"_INBOX.{user}", allow_reconnect=False)
        attackers.append(nc)
        for subject in subjects:
            await nc.subscribe(subject, cb=on_msg)
        await nc.flush()
    try:
        for user, subjects in WATCHED.items():
            for subject in subjects:
                await wait_for(lambda u=user, s=subject: any(violation("Subscription", s.lower()) in r for r in refusals[u]), 30,
                               f"the server to refuse {user} a subscription to {subject}")

        # replies of every kind travel meanwhile: a worker pulls a job from its queue, the
        # service reads KV and publishes with an ack, the operator's and the analyst's real
        # CLIs read the streams (on their own inboxes, which the server lets them have)
        await service.js.publish("work.local.job-1", b'{"secret": "a job"}')
        worker = await nats.connect(deployment.url("worker"), inbox_prefix="_INBOX.worker")
        try:
            sub = await worker.jetstream().pull_subscribe("work.local.>", durable="worker-local", stream="JOBS")
            [job] = await sub.fetch(1, timeout=10)
            assert job.data == b'{"secret": "a job"}'
            await job.ack()
        finally:
            await worker.close()
        state = await service.kv("scf_state")
        await state.put("probe", b"a value only services read back")
        assert (await state.get("probe")).value == b"a value only services read back"
        for user in ("operator", "analyst"):
            out = await asyncio.to_thread(scf_as, deployment, user, "status")
            assert out.returncode == 0 and "CONTROL" in out.stdout, f"scf status as {user}: {out.stderr[-2000:]}"
            assert "Permissions Violation" not in out.stderr, out.stderr[-2000:]
        # a sentinel on the service's own inbox namespace, then every attacker flushed: a
        # delivery that had been let through would have arrived before its flush returns
        await service.nc.publish("_INBOX.sentinel", b"")
        for nc in attackers:
            await nc.flush()
        assert received == {u: [] for u in WATCHED}, f"replies meant for others were delivered: {received}"
    finally:
        for nc in attackers:
            await nc.close()


async def test_a_client_on_the_default_inbox_prefix_is_refused_in_one_line(deployment: Deployment):
    """A plain client that forgets the prefix is refused its first request, with the
    subscription named: what docs/nats.md tells the tester to look for."""
    errors: list[str] = []

    async def on_error(err: Exception) -> None:
        errors.append(str(err).lower())

    nc = await nats.connect(deployment.url("operator"), error_cb=on_error, allow_reconnect=False)  # _INBOX.<random>
    try:
        request = asyncio.ensure_future(nc.jetstream().stream_info("CONTROL"))
        try:
            await wait_for(lambda: any(violation("Subscription", "_inbox.", prefix=True) in e for e in errors), 30,
                           "the refused inbox subscription")
        finally:
            request.cancel()
    finally:
        await nc.close()
