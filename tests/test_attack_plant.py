"""Hostile MQTT messages at a plant and at an edge node (the sweep of the newest surfaces).

The tester, with a login on the site's broker (a compromised bridge), publishes on the
setpoint topic and on the telemetry topic: 4 MiB of junk, bytes that are not UTF-8, JSON
nested 100 000 deep, numbers that overflow to infinity, the wrong number of zones, lone
surrogates, a sealed envelope whose fields have the wrong types. A real `scf run plant`
(behind a real Mosquitto) must refuse each setpoint in one log line and keep running; an
edge node's plant adapter must ignore each reading (one line each) and keep taking the
genuine ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from scf.consumers.edge.plant import Setpoint, open_plant, topics
from tests.conftest import spawn, wait_for
from tests.plant_support import Mosquitto
from tests.test_deploy_helpers import stop
from tests.test_plant_mqtt_auth import Attacker, _env, _keys, _refusals

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

HOSTILE = [
    b"\x00junk" * (4 * 1024 * 1024 // 5),  # ~4 MiB
    b'{"seq": 0, "u_kw": [\xff\xfe]}',  # not UTF-8
    b"[" * 100_000 + b"]" * 100_000,  # nested too deep
    b'{"seq": 0, "u_kw": [1e400, 1e400, 1e400]}',  # infinity
    b'{"seq": 0, "u_kw": [1.0]}',  # one zone of three
    b'{"seq": 0, "u_kw": ["\\ud800", 1, 2]}',  # a lone surrogate
    b'{"kid": ["x"], "sig": {}, "body": 7}',  # a sealed envelope with the wrong types
    b'{"kid": "k", "sig": "s", "body": "' + b"[" * 100_000 + b'"}',  # sealed, a body nested too deep
    b"",
]


@pytest.mark.parametrize("trusting", [True, False], ids=["verifying", "unauthenticated"])
async def test_a_plant_refuses_hostile_setpoints_in_one_line_and_keeps_running(tmp_path: Path, trusting: bool):
    broker = Mosquitto(tmp_path / "mqtt")
    node, _, pub = _keys(tmp_path)
    log = tmp_path / "plant.log"
    argv = [sys.executable, "-m", "scf.cli.main", "run", "plant", "--mqtt", broker.address, "--site", "s1", "--hours", "1"]
    proc = spawn(argv + (["--trust", str(pub)] if trusting else []), _env(tmp_path), log)
    attacker = Attacker(broker, "s1")
    edge = await open_plant(f"mqtt://{broker.address}/s1", key=node)
    try:
        assert (await edge.telemetry(-1)).seq == 0
        for payload in HOSTILE:
            attacker.publish(payload)
        await wait_for(lambda: len(_refusals(log)) == len(HOSTILE) or proc.poll() is not None, 60,
                       "the plant to refuse every hostile setpoint")
        assert proc.poll() is None, log.read_text()[-3000:]
        refusals = _refusals(log)
        assert len(refusals) == len(HOSTILE), refusals
        assert all(len(line) < 2000 for line in refusals), [line[:200] for line in refusals]  # one line, not the payload
        assert "Traceback" not in log.read_text()
        await edge.write(Setpoint(seq=0, u_kw=[3.0, 3.0, 3.0]))  # the node's own: applied
        nxt = await edge.telemetry(0)
        assert nxt.seq == 1 and nxt.u_kw == [2.0, 1.0, 1.5]
    finally:
        await edge.close()
        attacker.close()
        stop(proc)
        broker.stop()


async def test_an_edge_ignores_hostile_telemetry_and_keeps_reading(tmp_path: Path, caplog):
    broker = Mosquitto(tmp_path / "mqtt")
    node, _, pub = _keys(tmp_path)
    proc = spawn([sys.executable, "-m", "scf.cli.main", "run", "plant", "--mqtt", broker.address, "--site", "s1", "--hours", "1"],
                 _env(tmp_path), tmp_path / "plant.log")
    attacker = Attacker(broker, "s1")
    edge = await open_plant(f"mqtt://{broker.address}/s1", key=node)
    try:
        assert (await edge.telemetry(-1)).seq == 0
        caplog.clear()
        for payload in HOSTILE:
            attacker.publish(payload, topics("s1")["telemetry"])
        await wait_for(lambda: sum("telemetry payload refused" in r.getMessage() for r in caplog.records) == len(HOSTILE), 60,
                       "the edge to refuse every hostile reading")
        assert all(len(r.getMessage()) < 2000 for r in caplog.records)
        assert edge.client.is_connected()
        await edge.write(Setpoint(seq=0, u_kw=[3.0, 3.0, 3.0]))
        nxt = await edge.telemetry(0)
        assert nxt.seq == 1 and nxt.u_kw == [2.0, 1.0, 1.5]  # the plant's genuine reading, taken after the junk
    finally:
        await edge.close()
        attacker.close()
        stop(proc)
        broker.stop()
