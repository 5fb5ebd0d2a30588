"""Signed setpoints on MQTT (docs/plants.md, "Authenticity"): a real `scf run plant --trust
n1.pub` process behind a real Mosquitto broker applies only setpoints signed by the edge
node's key, fresh and never seen before; a forged, tampered, unsigned, stale or replayed
setpoint is refused in one log line and changes nothing on the plant. The plant may sign its
telemetry too (`--key`): an edge that lists the plant's key refuses telemetry not signed by it."""

from __future__ import annotations

import datetime as dt
import os
import sys
import threading
from pathlib import Path

import msgspec
import pytest

from scf.bus.errors import SignatureError
from scf.bus.signing import SigningKey, TrustList
from scf.consumers.edge.plant import MqttPlant, Setpoint, open_plant, topics
from scf.consumers.edge.plant_auth import SEALED, Sealed, Signer, Verifier
from tests.conftest import spawn, wait_for
from tests.plant_support import Mosquitto
from tests.test_deploy_helpers import stop

UTC = dt.timezone.utc


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, SCF_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    env.pop("NATS_URL", None)
    return env


def _keys(tmp_path: Path) -> tuple[SigningKey, SigningKey, Path]:
    node, forger = SigningKey.generate("n1"), SigningKey.generate("n1")  # the forger even uses the node's name
    node.save(tmp_path / "keys")
    return node, forger, tmp_path / "keys" / "n1.pub"


class Attacker:
    """A client with a login on the broker (a compromised bridge, a stolen broker password):
    it sees the setpoints and can publish its own."""

    def __init__(self, broker: Mosquitto, site: str) -> None:
        import paho.mqtt.client as mqtt

        self.topic = topics(site)["setpoint"]
        self.seen: list[bytes] = []
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="attacker", protocol=mqtt.MQTTv311)
        self.client.on_connect = lambda c, u, f, r, p=None: (c.subscribe(self.topic, qos=1), ready.set())
        self.client.on_message = lambda c, u, msg: self.seen.append(msg.payload)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert ready.wait(10)

    def publish(self, payload: bytes, topic: str | None = None) -> None:
        self.client.publish(topic or self.topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _refusals(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if "setpoint refused" in line]


async def _until(plant, after: int, pred, what: str, timeout: float = 60.0):
    """The first telemetry after seq `after` that satisfies `pred`."""
    import asyncio

    async def go():
        last = after
        while True:
            tel = await plant.telemetry(last)
            last = tel.seq
            if pred(tel):
                return tel

    try:
        return await asyncio.wait_for(go(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


@pytest.mark.anyio
@pytest.mark.timeout(180)
async def test_lock_step_plant_applies_only_the_nodes_signed_setpoints(tmp_path):
    broker = Mosquitto(tmp_path / "mqtt")
    node, forger, pub = _keys(tmp_path)
    log = tmp_path / "plant.log"
    proc = spawn([sys.executable, "-m", "scf.cli.main", "run", "plant", "--mqtt", broker.address, "--site", "s1", "--hours", "1",
                  "--trust", str(pub)], _env(tmp_path), log)
    attacker = Attacker(broker, "s1")
    edge = await open_plant(f"mqtt://{broker.address}/s1", key=node)
    try:
        tel = await edge.telemetry(-1)
        assert tel.seq == 0
        topic = topics("s1")["setpoint"]
        # full cooling asked for seq 0 by a forger, and the same without any signature
        attacker.publish(Signer(forger).seal(topic, Setpoint(seq=0, u_kw=[-3.0, -3.0, -3.0])))
        attacker.publish(msgspec.json.encode(Setpoint(seq=0, u_kw=[-3.0, -3.0, -3.0])))
        await wait_for(lambda: len(_refusals(log)) == 2, 30, "the plant to refuse both")
        forged, unsigned = _refusals(log)
        assert forged.endswith("setpoint refused: unknown signing key " + forger.kid + ": add it to the trust list with `scf keys trust`")
        assert "setpoint refused: unsigned setpoint: only setpoints signed by a trusted key are accepted here" in unsigned
        await edge.write(Setpoint(seq=0, u_kw=[3.0, 3.0, 3.0]))  # the node's own, signed
        nxt = await edge.telemetry(0)
        assert nxt.seq == 1 and nxt.u_kw == [2.0, 1.0, 1.5]  # heating within the ramp: the forged cooling was never applied
    finally:
        await edge.close()
        attacker.close()
        stop(proc)
        broker.stop()


@pytest.mark.anyio
@pytest.mark.timeout(240)
async def test_free_running_plant_refuses_replayed_tampered_and_stale_setpoints(tmp_path):
    """A plant on its own clock holds the latest valid setpoint (as a real BMS does), so a
    replayed old setpoint would take effect if it were accepted: it is not."""
    broker = Mosquitto(tmp_path / "mqtt")
    node, forger, pub = _keys(tmp_path)
    log = tmp_path / "plant.log"
    proc = spawn([sys.executable, "-m", "scf.cli.main", "run", "plant", "--mqtt", broker.address, "--site", "s1", "--hours", "200",
                  "--period-s", "0.2", "--trust", str(pub)], _env(tmp_path), log)
    attacker = Attacker(broker, "s1")
    edge = await open_plant(f"mqtt://{broker.address}/s1", key=node)
    topic = topics("s1")["setpoint"]
    on, off = [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]
    try:
        tel = await edge.telemetry(-1)
        await edge.write(Setpoint(seq=tel.seq, u_kw=on))
        tel = await _until(edge, tel.seq, lambda t: t.u_kw == on, "the plant to apply 'on'")
        await wait_for(lambda: len(attacker.seen) == 1, 30, "the attacker to capture the signed 'on'")
        captured = attacker.seen[0]
        await edge.write(Setpoint(seq=tel.seq, u_kw=off))
        tel = await _until(edge, tel.seq, lambda t: t.u_kw == off, "the plant to apply 'off'")

        sealed = SEALED.decode(captured)
        tampered = msgspec.json.encode(Sealed(kid=sealed.kid, sig=sealed.sig, body=sealed.body.replace("1.0", "1.5")))
        stale = Signer(node).seal(topic, Setpoint(seq=tel.seq, u_kw=on), now=dt.datetime.now(UTC) - dt.timedelta(minutes=10))
        for payload in (captured, tampered, stale, Signer(forger).seal(topic, Setpoint(seq=tel.seq, u_kw=on))):
            attacker.publish(payload)
        await wait_for(lambda: len(_refusals(log)) == 4, 30, "the plant to refuse all four")
        replayed, altered, old, forged = _refusals(log)
        assert "setpoint refused: replayed setpoint from n1: ctr " in replayed
        assert "setpoint refused: bad signature from key " + node.kid + ": the message was altered or signed with another key" in altered
        assert "setpoint refused: stale setpoint from n1: issued 60" in old and "s ago, beyond the 60 s window (replayed?)" in old
        assert "setpoint refused: unknown signing key " + forger.kid in forged
        # the plant kept holding 'off' through all of them (each would have turned it on)
        after = await edge.telemetry(tel.seq)
        later = await _until(edge, after.seq, lambda t: True, "two more steps")
        assert after.u_kw == off and later.u_kw == off
        await edge.write(Setpoint(seq=later.seq, u_kw=on))  # and still answers its node
        await _until(edge, later.seq, lambda t: t.u_kw == on, "the plant to apply the node's next setpoint")
    finally:
        await edge.close()
        attacker.close()
        stop(proc)
        broker.stop()


@pytest.mark.anyio
@pytest.mark.timeout(180)
async def test_edge_refuses_telemetry_not_signed_by_the_plant(tmp_path):
    """Telemetry is what M&V measures: with the plant's key listed, a forged or unsigned
    reading (here one claiming 999 kWh for the step) is refused, the genuine one used."""
    broker = Mosquitto(tmp_path / "mqtt")
    site_key, forger = SigningKey.generate("site-1"), SigningKey.generate("site-1")
    site_key.save(tmp_path / "keys")
    proc = spawn([sys.executable, "-m", "scf.cli.main", "run", "plant", "--mqtt", broker.address, "--site", "s1", "--hours", "1",
                  "--key", str(tmp_path / "keys" / "site-1.key")], _env(tmp_path), tmp_path / "plant.log")
    attacker = Attacker(broker, "s1")
    edge = await open_plant(f"mqtt://{broker.address}/s1", plant_keys=[str(tmp_path / "keys" / "site-1.pub")])
    # an edge that lists no plant key reads signed telemetry as before (its own client id: MQTT
    # allows one connection per id, a second takes the first one's session over)
    plain = await MqttPlant("127.0.0.1", broker.port, "s1", client_id="plain-edge").connect()
    try:
        tel = await edge.telemetry(-1)
        assert tel.seq == 0 and (await plain.telemetry(-1)).seq == 0
        fake = msgspec.structs.replace(tel, seq=1, energy_kwh=999.0)
        telemetry_topic = topics("s1")["telemetry"]
        attacker.publish(Signer(forger).seal(telemetry_topic, fake), telemetry_topic)
        attacker.publish(msgspec.json.encode(fake), telemetry_topic)
        await wait_for(lambda: len(edge.refused) >= 2, 30, "the edge to refuse both readings")
        assert len(edge.refused) == 2, edge.refused
        assert edge.refused[0].startswith("unknown signing key " + forger.kid), edge.refused
        assert edge.refused[1].startswith("unsigned telemetry: only telemetry signed by a trusted key is accepted here"), edge.refused
        await edge.write(Setpoint(seq=0, u_kw=[3.0, 3.0, 3.0]))
        nxt = await edge.telemetry(0)
        assert nxt.seq == 1 and nxt.energy_kwh != 999.0 and nxt.u_kw == [2.0, 1.0, 1.5]  # the plant's own reading
    finally:
        await edge.close()
        await plain.close()
        attacker.close()
        stop(proc)
        broker.stop()


def test_verifier_rules_without_a_broker():
    """The verifier's rules as a bridge would implement them: the signature over topic and
    body first, then the counter per key and the issue-time window."""
    node, other = SigningKey.generate("n1"), SigningKey.generate("n2")
    trust = TrustList()
    trust.trust(node.public_b64, "n1", ["node"])
    trust.trust(other.public_b64, "n2", ["operator"])
    v = Verifier(trust, window_s=60, skew_s=5)
    signer = Signer(node)
    sp = Setpoint(seq=3, u_kw=[1.0, 2.0, 3.0], controller="ck")
    older = signer.seal("scf/plant/s1/setpoint", sp)
    a = signer.seal("scf/plant/s1/setpoint", sp)
    body = v.open("scf/plant/s1/setpoint", a)
    assert msgspec.json.decode(body, type=Setpoint) == sp
    with pytest.raises(SignatureError, match="replayed setpoint from n1"):
        v.open("scf/plant/s1/setpoint", older)
    with pytest.raises(SignatureError, match="bad signature"):  # another site's topic: the signature binds it
        Verifier(trust).open("scf/plant/s2/setpoint", signer.seal("scf/plant/s1/setpoint", sp))
    with pytest.raises(SignatureError, match="lacks the 'node' role"):
        v.open("scf/plant/s1/setpoint", Signer(other).seal("scf/plant/s1/setpoint", sp))
    future = signer.seal("scf/plant/s1/setpoint", sp, now=dt.datetime.now(UTC) + dt.timedelta(minutes=2))
    with pytest.raises(SignatureError, match="in the future: check the sender's clock"):
        v.open("scf/plant/s1/setpoint", future)
    with pytest.raises(SignatureError, match="malformed signed setpoint"):
        v.open("scf/plant/s1/setpoint", b'{"kid": 1}')
    from scf.consumers.edge.plant_auth import Duplicate

    with pytest.raises(Duplicate):  # the last accepted, delivered again (QoS 1): ignored quietly, not a replay
        v.open("scf/plant/s1/setpoint", a)
    b = signer.seal("scf/plant/s1/setpoint", sp)
    assert msgspec.json.decode(v.open("scf/plant/s1/setpoint", b))["ctr"] > msgspec.json.decode(body)["ctr"]  # counters only rise
