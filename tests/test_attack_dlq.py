"""Attacks on the DLQ (issue 10, defects 2 and 4), with real processes and a real nats-server.

* A message near max_payload: its dead letter used to embed the whole body and raise
  MaxPayloadError, and the consumer (the ledger, on a 1 MB `energy.measured.<node>` that
  any edge box may publish) exited 1 at every restart. Now the entry is cut to fit, keeps
  the original's digest and size, and the process lives on.
* A DLQ write that fails (the DLQ stream gone) leaves the message for redelivery; the
  process never exits.
* Forged dead letters: only services may write `dlq.>` (nats/users.conf, checked with the
  production users), and `scf dlq retry` redrives only a genuine copy of a message that was
  on its stream; anything else is refused with the reason.
* A non-SCF message on `dlq.>` is listed as undecodable instead of breaking `scf dlq ls`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import signal
import sys

import pytest

from scf.bus import codec
from scf.bus import events as ev
from scf.bus.dlq import HEADROOM, give_back, list_dead
from scf.bus.headers import EXPECTED_LAST_SUBJECT_SEQ, MSG_ID, SCF_REDRIVE_FOR
from scf.bus.ids import new_id
from scf.bus.signing import SigningKey
from scf.bus.streams import CONSUMERS, ConsumerSpec, ensure, ensure_consumer
from scf.consumers.energy import measurement_event
from tests.conftest import cli, spawn, stream_count, wait_for
from tests.mv_support import passing_mv
from tests.test_deploy_helpers import Keys, start_process, stop
from tests.test_nats_configs import Hub, hub, passwords, servers, tls_files, violation  # noqa: F401 (fixtures)

pytestmark = pytest.mark.anyio

CONSUMER = [sys.executable, "-m", "tests.procs.effect_consumer"]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def intent(i: str, **params) -> ev.IntentCreated:
    return ev.IntentCreated.new(ev.Intent(intent_id=i, kind="train", domain="grid:case9", params=params), source="test")


async def dead_letters(bus) -> list:
    return [e for e in await list_dead(bus) if e.event is not None]


async def run_cli(*args: str, env: dict[str, str]):
    return await asyncio.to_thread(cli, *args, env=env)


# --------------------------------------------------------------------------- defect 2: size


async def test_a_max_payload_poison_is_dead_lettered_cut_to_fit_and_the_consumer_lives_on(bus, scf_env, tmp_path):
    log = tmp_path / "handled.log"
    body = b"\xff" + b"x" * (bus.nc.max_payload - 1024)  # not JSON, as large as the server takes
    await bus.js.publish("intent.created.train.big", body)
    proc = spawn(CONSUMER + ["--log", str(log)], scf_env, tmp_path / "c.out")
    try:
        async def one_dead() -> bool:
            return await stream_count(bus, "DLQ") == 1
        await wait_for(one_dead, 40, "the oversized message's dead letter")
        await bus.publish(intent("after"))
        await wait_for(lambda: log.exists() and "after 1" in log.read_text(), 40, "the next intent to be handled")
        assert proc.poll() is None, (tmp_path / "c.out").read_text()[-3000:]
        [entry] = await dead_letters(bus)
        d = entry.event.data
        assert (d.stream, d.seq, d.subject) == ("INTENTS", 1, "intent.created.train.big")
        assert d.truncated and d.size == len(body) and d.digest == sha(body)
        assert 0 < len(d.payload) < len(body) and body.startswith(d.payload)
        assert entry.size <= bus.nc.max_payload - HEADROOM + 512  # the entry fits, with room for headers

        # The redrive reads the original back from INTENTS: the whole body goes back, not the cut copy.
        result = await run_cli("dlq", "retry", str(entry.seq), env=scf_env)
        assert result.returncode == 0, result.stderr
        assert "from INTENTS seq 1" in result.stdout
        again = await bus.js.get_last_msg("INTENTS", "intent.created.train.big")
        assert again.seq != 1 and again.data == body
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "c.out").read_text()[-3000:]


async def test_the_ledger_survives_a_max_payload_measurement_from_an_edge_subject(bus, settings, scf_env, tmp_path):
    keys = Keys(settings)
    k1 = keys.node("n1")
    (settings.home_path / "scf.toml").write_text("[ledger]\nack_wait = 5.0\n")
    body = b"{" + b" " * (bus.nc.max_payload - 1024)  # what any `edge` login may publish
    await bus.js.publish("energy.measured.n1", body)
    ledger = start_process(scf_env, "ledger", tmp_path)
    try:
        async def dead() -> bool:
            return await stream_count(bus, "DLQ") == 1
        await wait_for(dead, 60, "the oversized measurement's dead letter")
        start = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
        good = measurement_event("n1", period_start=start, period_end=start + dt.timedelta(hours=1),
                                 baseline_kwh=10.0, actual_kwh=8.0, method="metered-vs-baseline", source="meter",
                                 **passing_mv(10.0, 8.0))
        await bus.js.publish(good.subject(), codec.sign(good, k1))

        async def minted() -> bool:
            return await stream_count(bus, "LEDGER", "ledger.transfer.>") == 1
        await wait_for(minted, 60, "the next measurement to be minted")
        assert ledger.poll() is None, (tmp_path / "ledger.log").read_text()[-3000:]
        [entry] = await dead_letters(bus)
        assert entry.event.data.truncated and entry.event.data.digest == sha(body)
    finally:
        assert stop(ledger) == 0, (tmp_path / "ledger.log").read_text()[-3000:]


async def test_a_failed_dlq_write_leaves_the_message_for_redelivery(bus, scf_env, tmp_path):
    log = tmp_path / "handled.log"
    await bus.js.delete_stream("DLQ")  # every dead-letter write now fails (no stream stores dlq.>)
    await bus.publish(intent("p1", poison=True))
    proc = spawn(CONSUMER + ["--log", str(log), "--max-deliver", "50"], scf_env, tmp_path / "c.out")
    try:
        await wait_for(lambda: "could not be dead-lettered" in (tmp_path / "c.out").read_text(), 40,
                       "the failed DLQ write to be logged")
        assert proc.poll() is None
        await ensure(bus.js)  # the DLQ is back: the redelivered message is dead-lettered now

        async def dead() -> bool:
            return await stream_count(bus, "DLQ") == 1
        await wait_for(dead, 60, "the dead letter once the DLQ exists again")
        [entry] = await dead_letters(bus)
        assert entry.event.data.subject == "intent.created.train.p1"
        assert entry.event.data.deliveries >= 2  # it came back: nothing was lost
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "c.out").read_text()[-3000:]


# --------------------------------------------------------------------------- defect 4: forgery


@pytest.mark.timeout(60)
def test_only_services_may_write_the_dlq(hub: Hub) -> None:  # noqa: F811 (fixture)
    async def run() -> None:
        for user in ("worker", "edge", "operator", "analyst"):
            prefix = f"_INBOX.{user}"
            conn = await hub.connect(user, inbox_prefix=prefix)
            await conn.nc.publish("dlq.ledger", b'{"forged": true}')
            await conn.wait_for_error(violation("Publish", "dlq.ledger"))
            await conn.nc.close()
        service = await hub.connect("service")
        ack = await service.nc.jetstream().publish("dlq.ledger", b"{}")
        assert ack.stream == "DLQ"
        await service.nc.close()

    asyncio.run(run())


def forged(stream: str, subject: str, seq: int, payload: bytes, *, truncated: bool = False, consumer: str = "") -> ev.DeadLettered:
    consumer = consumer or {"LEDGER": "books", "DEPLOY": "ledger"}.get(stream, "ledger")
    return ev.DeadLettered.new(
        ev.DeadLetter(stream=stream, consumer=consumer, subject=subject, seq=seq, deliveries=5, error="forged",
                      headers={MSG_ID: "forged"}, payload=payload[: 10 if truncated else None],
                      digest=sha(payload), size=len(payload), truncated=truncated),
        source="worker", id=new_id(),
    )


async def test_forged_dead_letters_are_refused_by_the_redrive(bus, settings, scf_env):
    keys = Keys(settings)
    node_key = keys.node("n1")
    evil = ev.LedgerTransfer.new(
        ev.Transfer(transfer_id="t-evil", cause_id="c-evil", debit_account="issuer:negentropy", credit_account="node:evil",
                    micro_credits=1_000_000 * 1_000_000, kwh=1e6, rate=1.0),
        source="worker",
    )
    evil_body = codec.encode(evil)
    # the durables the entries name exist (the ledger's on DEPLOY, one on LEDGER)
    await ensure_consumer(bus.js, CONSUMERS["ledger"])
    await ensure_consumer(bus.js, ConsumerSpec("LEDGER", "books", ("ledger.>",)))
    real_body, evil_json = b'{"real": 1}', b'{"evil": 1}'
    real = (await bus.js.publish("energy.measured.n1", real_body)).seq  # a genuine DEPLOY message
    cases = [
        # (entry, how it is published, the refusal)
        (forged("LEDGER", evil.subject(), 999, evil_body), None,
         "LEDGER seq 999 is no longer on its stream and the entry is not signed by a trusted key"),
        (forged("LEDGER", evil.subject(), 999, evil_body), node_key,
         "LEDGER seq 999 is no longer on its stream and the entry's signer holds none of the roles release, operator"),
        (forged("LEDGER", evil.subject(), 999, evil_body, truncated=True), keys.release,
         "LEDGER seq 999 is no longer on its stream and the entry does not hold its whole body"),
        (forged("DEPLOY", "energy.measured.evil", real, real_body), None,
         f"DEPLOY seq {real} holds 'energy.measured.n1', the entry names 'energy.measured.evil'"),
        (forged("DEPLOY", "energy.measured.n1", real, evil_json), None,
         f"DEPLOY seq {real} has digest {sha(real_body)}, the entry {sha(evil_json)}"),
        (forged("DEPLOY", evil.subject(), real, evil_body), None,
         f"its subject '{evil.subject()}' is not stored by stream DEPLOY"),
        (forged("DLQ", "dlq.ledger", 1, b"{}"), None, "it names stream 'DLQ'"),
        (forged("DEPLOY", "energy.measured.n1", real, real_body, consumer="nobody"), None,
         "it names consumer 'nobody', which DEPLOY does not have"),
    ]
    dlq_seqs = []
    for entry, key, _ in cases:
        body = codec.sign(entry, key) if key else codec.encode(entry)
        dlq_seqs.append((await bus.js.publish("dlq.ledger", body)).seq)
    for n, (_, _, why) in zip(dlq_seqs, cases):
        result = await run_cli("dlq", "retry", str(n), env=scf_env)
        assert result.returncode == 1, result.stdout
        assert result.stderr.strip().startswith(f"Error: DLQ seq {n} not redriven: ")
        assert why in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert await stream_count(bus, "LEDGER") == 0  # nothing minted
    assert await stream_count(bus, "DEPLOY") == 1
    assert await stream_count(bus, "DLQ") == len(cases)  # refused entries stay for inspection

    # --all refuses each of them, names each, and exits 1
    result = await run_cli("dlq", "retry", "--all", env=scf_env)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == len(cases)


async def test_an_entry_whose_original_is_gone_is_redriven_only_whole_and_signed_by_a_control_plane_key(bus, settings, scf_env):
    keys = Keys(settings)
    await ensure_consumer(bus.js, ConsumerSpec("INTENTS", "effect", ("intent.created.>",)))
    lost = intent("lost")
    body = codec.encode(lost)
    entry = ev.DeadLettered.new(
        ev.DeadLetter(stream="INTENTS", consumer="effect", subject=lost.subject(), seq=42, deliveries=3, error="x",
                      headers={MSG_ID: lost.id, EXPECTED_LAST_SUBJECT_SEQ: "0"},
                      payload=body, digest=sha(body), size=len(body)),
        source="daemon", id=new_id(),
    )
    n = (await bus.js.publish("dlq.effect", codec.sign(entry, keys.release))).seq
    result = await run_cli("dlq", "retry", str(n), env=scf_env)
    assert result.returncode == 0, result.stderr
    assert "from the signed entry (release)" in result.stdout
    copy = await bus.js.get_last_msg("INTENTS", lost.subject())
    assert copy.data == body
    assert copy.headers[SCF_REDRIVE_FOR] == "effect"
    assert EXPECTED_LAST_SUBJECT_SEQ not in copy.headers
    assert await stream_count(bus, "DLQ") == 0


async def test_genuine_dead_letters_from_a_real_consumer_are_redriven(bus, scf_env, tmp_path):
    log = tmp_path / "handled.log"
    flag = tmp_path / "fixed"
    await bus.publish(intent("r1", fail_until=str(flag)))
    proc = spawn(CONSUMER + ["--log", str(log), "--max-deliver", "2"], scf_env, tmp_path / "c.out")
    try:
        async def dead() -> bool:
            return await stream_count(bus, "DLQ") == 1
        await wait_for(dead, 40, "the exhausted message's dead letter")
        [entry] = await dead_letters(bus)
        assert not entry.event.data.truncated and entry.event.data.digest == sha(entry.event.data.payload)
        flag.write_text("ok")
        result = await run_cli("dlq", "retry", str(entry.seq), env=scf_env)
        assert result.returncode == 0, result.stderr
        assert "from INTENTS seq 1" in result.stdout

        async def effect() -> bool:
            return await stream_count(bus, "VERDICTS") == 1
        await wait_for(effect, 40, "the redriven intent's effect")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


async def test_a_non_scf_message_on_the_dlq_is_listed_as_undecodable(bus, scf_env):
    good = forged("DEPLOY", "energy.measured.n1", 7, b"{}")
    await bus.js.publish("dlq.ledger", codec.encode(good))
    junk = (await bus.js.publish("dlq.anything", b"\x00 not an event at all")).seq
    result = await run_cli("dlq", "ls", env=scf_env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert "ledger" in lines[0] and "DEPLOY#7" in lines[0]
    assert lines[1].lstrip().startswith(f"{junk}  undecodable (21 bytes on dlq.anything): ")
    shown = await run_cli("dlq", "show", str(junk), env=scf_env)
    assert shown.returncode == 0 and '"undecodable"' in shown.stdout
    refused = await run_cli("dlq", "retry", str(junk), env=scf_env)
    assert refused.returncode == 1
    assert "not an SCF dead letter" in refused.stderr and f"`scf dlq drop {junk}`" in refused.stderr
    dropped = await run_cli("dlq", "drop", str(junk), env=scf_env)
    assert dropped.returncode == 0 and dropped.stdout.strip() == f"removed DLQ seq {junk}"
    assert await stream_count(bus, "DLQ") == 1


def test_entries_fit_whatever_the_original(tmp_path) -> None:
    """The sizing rule alone: bodies, headers and errors of any size give an entry under the limit."""
    from scf.bus.dlq import entry_for

    limit = 1024 * 1024
    for size in (0, 10, limit // 2, limit - 100, limit):
        for headers in ({}, {MSG_ID: "a"}, {f"h{i}": "v" * 5000 for i in range(200)}):
            body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
            d = entry_for(stream="DEPLOY", consumer="ledger", subject="energy.measured.n1", seq=3, deliveries=1,
                          error="e" * 100_000, headers=headers, payload=body, max_payload=limit)
            encoded = codec.sign(ev.DeadLettered.new(d, source="ledger"), SigningKey.generate("s"))
            assert len(encoded) + 200 <= limit, (size, len(headers))
            assert d.size == len(body) and d.digest == sha(body)
            assert d.truncated == (d.payload != body)
            assert body.startswith(d.payload)



async def test_a_worker_meeting_poison_terminates_it_with_the_reason_and_writes_no_dlq(tmp_path, servers):  # noqa: F811
    """Production users without TLS (users.conf included as prod.conf does): `scf run
    worker` logs in as `worker`, which may not write dlq.>; a poison job is terminated
    with its reason (the server's MSG_TERMINATED advisory carries it), the worker lives on,
    and nothing reaches the DLQ."""
    import os
    import shutil

    import nats

    from scf.bus.client import Bus
    from scf.bus.server import free_port
    from scf.bus.settings import Settings, init_home
    from tests.test_deploy_helpers import logs
    from tests.test_nats_configs import NATS_DIR, base_env, start_server, users_env

    pw = {u: "p" + new_id().replace("-", "")[:20] for u in ("service", "operator", "worker", "edge", "analyst")}
    shutil.copy(NATS_DIR / "users.conf", tmp_path / "users.conf")
    (tmp_path / "test.conf").write_text("include ./users.conf\n")
    port = free_port()
    servers.append(start_server(
        "users", ["-c", str(tmp_path / "test.conf"), "-js", "-sd", str(tmp_path / "store"), "-a", "127.0.0.1", "-p", str(port)],
        {**base_env(), **users_env(pw), "SCF_WORKER_PASSWORD": pw["worker"]}, tmp_path, port,
    ))
    service_url = f"nats://service:{pw['service']}@127.0.0.1:{port}"
    settings = Settings(home=str(tmp_path / "home"), nats_url=service_url, source="test")
    init_home(settings)
    bus = await Bus.connect(settings, "test")
    await ensure(bus.js)
    adv = await nats.connect(service_url)
    terminated = await adv.subscribe("$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.JOBS.>")
    await adv.flush()
    await bus.js.publish("work.cpu", b"\x00 not a work item")
    env = dict(os.environ, NATS_URL=f"nats://worker:{pw['worker']}@127.0.0.1:{port}", SCF_HOME=settings.home,
               PYTHONUNBUFFERED="1")
    env.pop("SCF_KEY", None)
    worker = spawn([sys.executable, "-m", "scf.cli.main", "run", "worker", "--pool", "cpu", "--device", "cpu"],
                   env, tmp_path / "worker.log")
    try:
        advisory = await terminated.next_msg(timeout=120)
        assert b"worker-cpu" in advisory.data and b"not a JSON event" in advisory.data, advisory.data
        await wait_for(lambda: "this user may not write the DLQ" in (tmp_path / "worker.log").read_text(), 30,
                       "the worker to log the poison job")

        async def gone() -> bool:
            return (await bus.js.stream_info("JOBS")).state.messages == 0
        await wait_for(gone, 30, "the terminated job to leave the work queue")
        assert await stream_count(bus, "DLQ") == 0
        assert "Permissions Violation" not in (tmp_path / "worker.log").read_text()
        assert worker.poll() is None, logs(tmp_path)
    finally:
        assert stop(worker) == 0, logs(tmp_path)
        await adv.close()
        await bus.close()


# --------------------------------------------------------------------------- given back on a stop


async def test_a_message_given_back_on_its_last_delivery_is_dead_lettered_not_lost(bus):
    """A message taken and not handled when a process stops is given back (nak'ed): it is
    redelivered at once. On the last delivery the server allows (the runner's max_deliver 1,
    the server's 2) a nak would never bring it back and it would reach no DLQ: it is
    dead-lettered instead, with the reason."""
    spec = ConsumerSpec("INTENTS", "giveback", ("intent.created.>",), ack_wait=30.0, max_deliver=1)
    await ensure_consumer(bus.js, spec)
    await bus.publish_many([intent("g0"), intent("g1")])
    sub = await bus.js.pull_subscribe("intent.created.>", durable="giveback", stream="INTENTS")
    try:
        first = await sub.fetch(2, timeout=10)
        assert [m.metadata.num_delivered for m in first] == [1, 1]
        assert [await give_back(bus, m, spec, "stopped") for m in first] == [False, False]  # not the last delivery: nak'ed
        again = await sub.fetch(2, timeout=10)
        assert [m.metadata.num_delivered for m in again] == [2, 2]  # redelivered at once, nothing lost
        assert [await give_back(bus, m, spec, "stopped") for m in again] == [True, True]  # the server's last: dead-lettered
    finally:
        await sub.unsubscribe()
    assert await stream_count(bus, "DLQ") == 2  # both dead-lettered (each stored before its term)
    entries = await dead_letters(bus)
    assert sorted(e.event.data.seq for e in entries) == [m.metadata.sequence.stream for m in again]
    assert all(e.event.data.error == "stopped on its last delivery (2 of 2): dead-lettered instead of given back"
               for e in entries)

    async def settled() -> bool:  # terminated, not left pending
        info = await bus.js.consumer_info("INTENTS", "giveback")
        return info.num_pending == 0 and info.num_ack_pending == 0
    await wait_for(settled, 20, "both terminated")
