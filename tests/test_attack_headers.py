"""A message whose NATS header block is malformed must not silence the consumer that fetches it.

The tester's attack: any login that may publish into a stream (an `edge` box:
`energy.measured.<node>`) sends, over a raw socket, `HPUB energy.measured.n1 8 9` with the
header block `XXXX\\r\\n\\r\\n`. The server stores and delivers it as is; nats-py's header parser
raised IndexError inside the connection's read loop, which ended: the ledger stayed
"connected" and never received another message (no fetch, no ack reply), and after a restart
it fetched the same message and went deaf again — no credit minted for anyone, for ever. Now
(bus/natsfix.py, installed by bus/client.py) the message is delivered with one header naming
the problem, judged like any other (unsigned: refused), and the connection reads on.
A real nats-server, a real `scf run ledger`, the poison sent on a raw TCP connection.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from urllib.parse import urlparse

import pytest

from scf.bus.natsfix import MALFORMED
from scf.bus.signing import SigningKey, TrustList
from tests.conftest import spawn, wait_for
from tests.test_ledger import measurement, publish_signed
from tests.test_trust_live import ledger_consumer_exists, minted_for, stop

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

POISON_HEADERS = b"XXXX\r\n\r\n"  # 8 bytes, no NATS/1.0 line: nats-py 2.16 read past its end


def raw_publish(url: str, subject: str, headers: bytes, body: bytes) -> None:
    """What an attacker's own client sends: the protocol, no library checks."""
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port or 4222), timeout=10) as s:
        s.recv(4096)  # INFO
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n')
        s.sendall(b"HPUB %s %d %d\r\n%s%s\r\nPING\r\n" % (subject.encode(), len(headers), len(headers) + len(body), headers, body))
        got = b""
        while b"PONG" not in got:  # the server has processed the HPUB
            chunk = s.recv(4096)
            assert chunk, got
            got += chunk
        assert b"-ERR" not in got, got


async def test_a_malformed_header_block_does_not_silence_the_ledger(bus, settings, scf_env, tmp_path):
    key = SigningKey.generate("n1")
    trust = TrustList.load(settings.keys_dir / "trusted.json")  # a development host: the file is the list
    trust.trust(key.public_b64, "n1", ["node"])
    trust.save()
    log = tmp_path / "ledger.log"
    ledger = spawn([sys.executable, "-m", "scf.cli.main", "run", "ledger"], {**scf_env, "SCF_LOG": "INFO"}, log)
    try:
        await wait_for(lambda: ledger_consumer_exists(bus), 60, "the ledger's consumer")
        await asyncio.to_thread(raw_publish, settings.nats_url, "energy.measured.n1", POISON_HEADERS, b'{"junk": true}')
        await publish_signed(bus, measurement("n1", 10.0, 7.5, hour=0), key)
        await wait_for(lambda: minted_for(bus, "node:n1"), 60, "the genuine measurement minted after the poison")
        assert ledger.poll() is None, log.read_text()[-2000:]
        assert "malformed NATS header block" in log.read_text(errors="replace")
    finally:
        stop(ledger)


async def test_the_message_arrives_marked_and_the_connection_reads_on(bus, settings):
    got: list = []
    done = asyncio.Event()

    async def cb(msg):
        got.append((msg.subject, msg.headers, msg.data))
        if len(got) == 3:
            done.set()

    sub = await bus.nc.subscribe("scf.test.>", cb=cb)
    await bus.nc.flush()
    try:
        await asyncio.to_thread(raw_publish, settings.nats_url, "scf.test.bad", POISON_HEADERS, b"x")
        # an inline status line that is not UTF-8: UnicodeDecodeError, the same ended read loop
        await asyncio.to_thread(raw_publish, settings.nats_url, "scf.test.status", b"NATS/1.0 \xff\xfe\xfd\xfc\xfb\r\n\r\n", b"y")
        await bus.nc.publish("scf.test.ok", b"ok")
        await asyncio.wait_for(done.wait(), 30)
    finally:
        await sub.unsubscribe()
    assert got[0][0] == "scf.test.bad" and set(got[0][1]) == {MALFORMED} and got[0][2] == b"x", got
    assert got[1][0] == "scf.test.status" and set(got[1][1]) == {MALFORMED} and "UnicodeDecodeError" in got[1][1][MALFORMED], got
    assert got[2] == ("scf.test.ok", None, b"ok"), got
