"""Plants the edge control loop acts on, behind one small interface (docs/plants.md).

    plant = open_plant("sim", domain=..., options=...)      # the simulator, in process
    plant = open_plant("mqtt://127.0.0.1:1883/site-a", ...)  # telemetry in, setpoints out over MQTT
    tel = await plant.telemetry(after=-1)       # the first telemetry with seq > after (waits)
    await plant.write(Setpoint(seq=tel.seq, u_kw=[...], controller="..."))
    await plant.close()

`HvacSite` is the simulated site itself (the RC network of domains/hvac_dynamics.py with
the site's own, unknown to the edge, factors and stochastic weather): in process it backs
`SimPlant`; `scf run plant --mqtt HOST:PORT` serves it over MQTT (`serve_mqtt`), so that
tests and the demo exercise the same protocol a real BMS bridge would speak.

MQTT topics (`scf/plant/<site>/...`): `telemetry` (JSON `Telemetry`, QoS 1, retained),
`setpoint` (JSON `Setpoint`, QoS 1), `status` (`online` | `ended` | `offline`, retained;
`offline` is the plant's last will). The simulated plant is lock-step: it publishes
telemetry seq 0, then one step per setpoint answering the latest seq.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlparse

import msgspec
import numpy as np

from scf.bus.errors import SCFError

log = logging.getLogger("scf.plant")
UTC = dt.timezone.utc
TOPIC_ROOT = "scf/plant"


class PlantError(SCFError):
    """A plant that cannot be used: the message names the problem and the fix."""


class PlantEnded(PlantError):
    """The plant stopped producing telemetry (its simulated horizon is over)."""


class Telemetry(msgspec.Struct, frozen=True, kw_only=True):
    """What the plant measured at the end of step `seq` (seq 0: before any setpoint)."""

    seq: int
    time: dt.datetime  # plant clock, UTC, at the end of the step
    period_s: float  # the step length
    zones: list[str]
    t_zone_c: list[float]  # zone temperatures, °C
    t_out_c: float  # outdoor temperature, °C
    occupancy: list[float]  # per zone, 0-1
    clearness: float = 0.7  # sky clearness 0-1 (a pyranometer's reading over clear-sky)
    u_kw: list[float] = []  # thermal power applied over the step (heating > 0), kW
    power_kw: float = 0.0  # electric, mean over the step
    energy_kwh: float = 0.0  # electric, over the step (the meter's increment)

    def hour(self) -> float:
        t = self.time.astimezone(UTC)
        return t.hour + t.minute / 60.0 + t.second / 3600.0


class Setpoint(msgspec.Struct, frozen=True, kw_only=True):
    """The setpoints for the step after telemetry `seq`."""

    seq: int
    u_kw: list[float]  # thermal power per zone (heating > 0, cooling < 0), kW
    controller: str = ""  # who decided (a checkpoint id or the status-quo controller's name)


TELEMETRY = msgspec.json.Decoder(Telemetry)
SETPOINT = msgspec.json.Decoder(Setpoint)


class Plant(Protocol):
    zones: tuple[str, ...]

    async def telemetry(self, after: int) -> Telemetry: ...

    async def write(self, setpoint: Setpoint) -> None: ...

    async def close(self) -> None: ...


# --------------------------------------------------------------------------- the simulated site


@dataclass(frozen=True)
class SiteOptions:
    """A simulated site: its true factors (what calibration must recover), weather seed,
    horizon and step."""

    domain: str = "hvac:office3"
    seed: int = 10
    hours: float = 96.0
    step_minutes: float = 15.0
    start: dt.datetime = dt.datetime(2026, 1, 5, tzinfo=UTC)  # a Monday, midnight UTC (site time = UTC)
    factors: tuple[tuple[str, float], ...] = (("envelope_ua", 1.2), ("internal_gains", 0.85), ("efficiency", 0.9))
    meter_noise: float = 0.02  # relative std of the meter's per-step reading


def parse_factors(text: str) -> tuple[tuple[str, float], ...]:
    """`envelope_ua=1.2,efficiency=0.9` → pairs (unknown names refused in one line)."""
    from scf.domains.mv import PARAMETERS

    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in PARAMETERS:
            raise PlantError(f"unknown site factor {name!r}: use {', '.join(PARAMETERS)} (e.g. envelope_ua=1.2)")
        try:
            out.append((name, float(value)))
        except ValueError:
            raise PlantError(f"site factor {name}={value!r} is not a number") from None
    return tuple(out)


class HvacSite:
    """The simulated building: one scenario of `HvacPlant`, with the site's true factors."""

    setpoint_decoder = SETPOINT

    @staticmethod
    def values(sp: Setpoint) -> list[float]:
        return sp.u_kw

    def __init__(self, options: SiteOptions) -> None:
        from scf import domains
        from scf.domains.hvac_dynamics import HvacPlant, weather
        from scf.domains.mv import calibrated_domain

        try:
            nominal = domains.get(options.domain)
        except Exception as exc:  # noqa: BLE001 - an unknown domain name is one line
            raise PlantError(f"unknown domain {options.domain!r}: {exc}") from None
        if getattr(nominal, "kind", "") != "hvac":
            raise PlantError(f"domain {options.domain} has no plant to simulate here: the plant runs hvac domains (e.g. hvac:office3)")
        self.options = options
        self.domain = calibrated_domain(nominal, dict(options.factors))
        self.dt_h = options.step_minutes / 60.0
        self.plant = HvacPlant(self.domain, self.dt_h)
        self.steps = max(1, round(options.hours / self.dt_h))
        start_hour = options.start.hour + options.start.minute / 60.0
        self.dist = weather(self.domain, scenarios=1, steps=self.steps, dt_h=self.dt_h, seed=options.seed, start_hour=start_hour)
        self.state = self.plant.initial_state(np.full((1, self.domain.n_zones), 20.0))
        self.rng = np.random.default_rng([options.seed, 99])
        self.zones = tuple(self.domain.building.zones)
        self.seq = 0
        self.last = self._telemetry(None)

    def _telemetry(self, m) -> Telemetry:
        k = self.seq
        now = self.dist.at(k)
        energy = 0.0 if m is None else float(m.energy_kwh[0]) * max(0.0, 1.0 + self.options.meter_noise * self.rng.standard_normal())
        return Telemetry(
            seq=k,
            time=self.options.start + dt.timedelta(hours=k * self.dt_h),
            period_s=self.dt_h * 3600.0,
            zones=list(self.zones),
            t_zone_c=[float(x) for x in self.state.t_zone[0]],
            t_out_c=float(now.t_out[0]),
            occupancy=[float(x) for x in now.occupancy[0]],
            clearness=float(now.clearness[0]),
            u_kw=[float(x) for x in self.state.u[0]],
            power_kw=energy / self.dt_h,
            energy_kwh=energy,
        )

    @property
    def ended(self) -> bool:
        return self.seq >= self.steps

    def apply(self, u_kw) -> Telemetry:
        """Hold `u_kw` over the next step; the telemetry at its end."""
        if self.ended:
            raise PlantEnded(f"the simulated plant's {self.options.hours:g} h are over")
        u = np.asarray(u_kw, dtype=float).reshape(1, -1)
        if u.shape[1] != len(self.zones) or not np.isfinite(u).all():
            raise PlantError(f"setpoint needs {len(self.zones)} finite numbers (kW per zone: {', '.join(self.zones)}), got {u_kw!r}")
        k = self.seq
        self.state, m = self.plant.step(self.state, u, self.dist.at(k), self.dist.at(k + 1))
        self.seq += 1
        self.last = self._telemetry(m)
        return self.last


class SimPlant:
    """The simulated site in this process: no wall-clock waits, a step per setpoint."""

    def __init__(self, options: SiteOptions) -> None:
        self.site = HvacSite(options)
        self.zones = self.site.zones

    async def telemetry(self, after: int) -> Telemetry:
        if self.site.last.seq <= after:
            raise PlantEnded(f"the simulated plant's {self.site.options.hours:g} h are over")
        return self.site.last

    async def write(self, setpoint: Setpoint) -> None:
        if setpoint.seq == self.site.seq and not self.site.ended:
            self.site.apply(setpoint.u_kw)

    async def close(self) -> None:
        pass


# --------------------------------------------------------------------------- MQTT


def topics(site: str) -> dict[str, str]:
    base = f"{TOPIC_ROOT}/{site}"
    return {"telemetry": f"{base}/telemetry", "setpoint": f"{base}/setpoint", "status": f"{base}/status"}


def parse_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise PlantError(f"MQTT broker {text!r}: write HOST:PORT (e.g. 127.0.0.1:1883)")
    return host, int(port)


def _nodelay(client) -> None:
    """Small control messages go out at once (Nagle's algorithm with delayed ACKs costs
    ~40 ms a hop on a lock-step exchange)."""
    import socket

    sock = client.socket()
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _secure(client, username: str | None, password: str | None, tls: bool) -> None:
    """Broker login (a user per edge node and per plant: docs/plants.md) and TLS with the
    system's CAs (`mqtts://`)."""
    if username:
        client.username_pw_set(username, password)
    if tls:
        client.tls_set()


def _client(name: str):
    import paho.mqtt.client as mqtt

    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311)


class MqttPlant:
    """A plant behind an MQTT broker: telemetry in, setpoints out (docs/plants.md)."""

    def __init__(self, host: str, port: int, site: str, *, client_id: str = "", timeout_s: float = 60.0,
                 username: str | None = None, password: str | None = None, tls: bool = False,
                 decoder: msgspec.json.Decoder = TELEMETRY, signer=None, telemetry_verifier=None) -> None:
        self.host, self.port, self.site = host, port, site
        self.decoder, self.signer = decoder, signer  # signer: plant_auth.Signer (setpoints signed by the node key) or None
        self.verifier = telemetry_verifier  # plant_auth.Verifier: telemetry must be signed by the plant's key, else refused
        self.refused: list[str] = []  # why telemetry was refused, newest last
        self.topics = topics(site)
        self.timeout_s = timeout_s
        self.zones: tuple[str, ...] = ()
        self._loop = asyncio.get_running_loop()
        self._latest: Telemetry | None = None
        self._status = ""
        self._changed = asyncio.Event()
        self._connected = threading.Event()
        self._refused = ""
        self.client = _client(client_id or f"scf-edge-{site}")
        _secure(self.client, username, password, tls)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect

    def _on_connect(self, client, userdata, flags, reason, properties=None) -> None:
        if getattr(reason, "is_failure", False):
            self._refused = str(reason)
            self._connected.set()
            return
        client.subscribe([(self.topics["telemetry"], 1), (self.topics["status"], 1)])
        self._connected.set()

    def _on_message(self, client, userdata, msg) -> None:
        if msg.topic == self.topics["status"]:
            self._loop.call_soon_threadsafe(self._set_status, msg.payload.decode("utf-8", "replace"))
            return
        from scf.bus.errors import SignatureError
        from scf.consumers.edge.plant_auth import Duplicate, unsealed

        try:
            body = self.verifier.open(msg.topic, msg.payload) if self.verifier is not None else unsealed(msg.payload)
        except Duplicate:
            return
        except SignatureError as exc:
            self.refused.append(str(exc))
            log.error("plant %s: telemetry refused: %s", self.site, exc)
            return
        try:
            tel = self.decoder.decode(body)
        except msgspec.DecodeError as exc:
            log.error("plant %s: telemetry payload refused (%s): fix the bridge's JSON (docs/plants.md)", self.site, exc)
            return
        self._loop.call_soon_threadsafe(self._set, tel)

    def _set(self, tel: Telemetry) -> None:
        if self._latest is None or tel.seq > self._latest.seq or tel.seq == 0:
            self._latest = tel
            self.zones = tuple(tel.zones)
        self._changed.set()

    def _set_status(self, status: str) -> None:
        self._status = status
        self._changed.set()

    async def connect(self) -> "MqttPlant":
        try:
            self.client.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            raise PlantError(f"MQTT broker {self.host}:{self.port} is not reachable ({exc}): start it or fix [edge] plant") from None
        _nodelay(self.client)
        self.client.loop_start()
        if not await asyncio.to_thread(self._connected.wait, 10.0):
            raise PlantError(f"MQTT broker {self.host}:{self.port} did not accept the connection within 10 s")
        if self._refused:
            self.client.loop_stop()
            raise PlantError(f"MQTT broker {self.host}:{self.port} refused the connection ({self._refused}): "
                             "check the user and password in [edge] plant (or SCF_MQTT_PASSWORD)")
        return self

    async def telemetry(self, after: int) -> Telemetry:
        deadline = self._loop.time() + self.timeout_s
        while True:
            if self._latest is not None and self._latest.seq > after:
                return self._latest
            if self._status in ("ended", "offline") and self._latest is not None:
                raise PlantEnded(f"plant {self.site} is {self._status}")
            left = deadline - self._loop.time()
            if left <= 0:
                raise PlantError(f"no telemetry from plant {self.site} on {self.topics['telemetry']} for {self.timeout_s:g} s")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def write(self, setpoint: Setpoint) -> None:
        topic = self.topics["setpoint"]
        payload = self.signer.seal(topic, setpoint) if self.signer is not None else msgspec.json.encode(setpoint)
        info = self.client.publish(topic, payload, qos=1)
        await asyncio.to_thread(info.wait_for_publish, 10.0)

    async def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def open_plant(spec: str, options=None, *, key=None, decoder: msgspec.json.Decoder = TELEMETRY, plant_keys=()) -> Plant:
    """`sim` (the simulator in process, `options`: a `SiteOptions` or a grid plant's
    `GridSiteOptions`) or `mqtt[s]://[USER[:PASSWORD]@]HOST:PORT/SITE` (the password may
    come from $SCF_MQTT_PASSWORD instead of the URL; `key`, the node's signing key, signs
    the setpoints; `decoder` reads the telemetry; `plant_keys`, .pub files of the plant's
    keys: telemetry must be signed by one of them)."""
    import os

    if spec == "sim":
        if options is not None and not isinstance(options, SiteOptions):
            from scf.consumers.edge.grid_plant import GridSimPlant

            return GridSimPlant(options)
        return SimPlant(options or SiteOptions())
    u = urlparse(spec)
    if u.scheme in ("mqtt", "mqtts") and u.hostname and u.port and u.path.strip("/"):
        password = u.password if u.password is not None else os.environ.get("SCF_MQTT_PASSWORD")
        from scf.consumers.edge.plant_auth import Signer, Verifier, load_trust

        # telemetry: no age limit (a lock-step plant's retained telemetry waits for the edge), the counter only rises
        try:
            verifier = Verifier(load_trust(list(plant_keys)), window_s=float("inf"), role=None) if plant_keys else None
        except SCFError as exc:
            raise PlantError(f"[edge] plant_keys: {exc}") from None
        return await MqttPlant(u.hostname, u.port, u.path.strip("/"), username=u.username, password=password,
                               tls=u.scheme == "mqtts", decoder=decoder, signer=Signer(key) if key is not None else None,
                               telemetry_verifier=verifier).connect()
    raise PlantError(f"plant {spec!r}: use 'sim' or 'mqtt://[USER@]HOST:PORT/SITE' (mqtts:// for TLS)")


async def _free_running(sim, inbox: asyncio.Queue, stop: asyncio.Event, period_s: float, publish, site: str, read) -> None:
    """A step every `period_s` wall seconds whatever the edge does, holding the latest
    valid setpoint (of any seq): how a real BMS behaves."""
    u = [0.0] * len(sim.zones)
    loop = asyncio.get_running_loop()
    due = loop.time() + period_s
    while not sim.ended and not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, due - loop.time()))
            return
        except asyncio.TimeoutError:
            pass
        while not inbox.empty():
            try:
                sp = read(inbox.get_nowait())
                if sp is None:
                    continue
                values = sim.values(sp)
                if len(values) != len(sim.zones) or not all(np.isfinite(values)):
                    raise PlantError(f"setpoint needs {len(sim.zones)} finite numbers, got {values!r}")
                u = list(values)
            except (msgspec.DecodeError, PlantError) as exc:
                log.error("plant %s: setpoint refused: %s", site, exc)
        publish(sim.apply(u))
        due += period_s


def make_site(options):
    """The simulated site for `options`: an `HvacSite` or a grid plant's `GridSite`."""
    if isinstance(options, SiteOptions):
        return HvacSite(options)
    from scf.consumers.edge.grid_plant import GridSite

    return GridSite(options)


async def serve_mqtt(options, host: str, port: int, site: str, stop: asyncio.Event | None = None, *,
                     username: str | None = None, password: str | None = None, tls: bool = False, period_s: float = 0.0,
                     verifier=None, signer=None) -> int:
    """Run the simulated site (`SiteOptions`: HVAC; `GridSiteOptions`: a grid) as an MQTT
    plant until its horizon ends (or `stop`); returns the number of steps taken. Lock-step
    (a step per setpoint answering the latest seq; a malformed or stale setpoint is logged
    and ignored), or with `period_s` > 0 free-running (a step every `period_s` wall seconds
    holding the latest setpoint). With `verifier` (plant_auth.Verifier) only setpoints
    signed by a trusted node key, fresh and not replayed, are applied; the rest are logged
    (`setpoint refused: ...`) and ignored. With `signer` (plant_auth.Signer, the plant's
    key) the telemetry is signed."""
    from scf.bus.errors import SignatureError
    from scf.consumers.edge.plant_auth import Duplicate, unsealed

    sim = make_site(options)
    t = topics(site)
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[bytes] = asyncio.Queue()
    stop = stop or asyncio.Event()
    client = _client(f"scf-plant-{site}")
    _secure(client, username, password, tls)
    client.will_set(t["status"], b"offline", qos=1, retain=True)
    ready = threading.Event()

    refused: list[str] = []

    def on_connect(c, userdata, flags, reason, properties=None):
        if getattr(reason, "is_failure", False):
            refused.append(str(reason))
        else:
            c.subscribe(t["setpoint"], qos=1)
        ready.set()

    client.on_connect = on_connect
    client.on_message = lambda c, u, msg: loop.call_soon_threadsafe(inbox.put_nowait, msg.payload)

    def read(payload: bytes):
        """The setpoint in `payload` (None: a duplicate delivery): its signature checked first when this plant verifies."""
        if verifier is not None:
            try:
                body = verifier.open(t["setpoint"], payload)
            except Duplicate:
                return None  # the last setpoint delivered again (QoS 1): already applied
            except SignatureError as exc:
                raise PlantError(str(exc)) from None
        else:
            body = unsealed(payload)
        return sim.setpoint_decoder.decode(body)

    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise PlantError(f"MQTT broker {host}:{port} is not reachable ({exc}): start mosquitto or fix --mqtt") from None
    _nodelay(client)
    client.loop_start()
    try:
        if not await asyncio.to_thread(ready.wait, 10.0):
            raise PlantError(f"MQTT broker {host}:{port} did not accept the connection within 10 s")
        if refused:
            raise PlantError(f"MQTT broker {host}:{port} refused the plant's connection ({refused[0]}): check --username and SCF_MQTT_PASSWORD")

        def publish(tel: Telemetry) -> None:
            payload = signer.seal(t["telemetry"], tel) if signer is not None else msgspec.json.encode(tel)
            client.publish(t["telemetry"], payload, qos=1, retain=True)

        client.publish(t["status"], b"online", qos=1, retain=True)
        publish(sim.last)
        log.info("plant %s: %s, %d steps of %g min, on %s:%d", site, options.domain, sim.steps, options.step_minutes, host, port)
        if verifier is None:
            log.warning("plant %s: setpoints are not authenticated (no --trust): the broker's logins are the only boundary", site)
        if period_s > 0:
            await _free_running(sim, inbox, stop, period_s, publish, site, read)
        while not sim.ended and not stop.is_set():
            get = asyncio.ensure_future(inbox.get())
            halt = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({get, halt}, return_when=asyncio.FIRST_COMPLETED)
            halt.cancel()
            if get not in done:
                get.cancel()
                break
            try:
                sp = read(get.result())
                if sp is None:
                    continue
                if sp.seq != sim.seq:
                    log.info("plant %s: setpoint for seq %d ignored (the plant is at %d)", site, sp.seq, sim.seq)
                    continue
                publish(sim.apply(sim.values(sp)))
            except (msgspec.DecodeError, PlantError) as exc:
                log.error("plant %s: setpoint refused: %s", site, exc)
        client.publish(t["status"], b"ended" if sim.ended else b"offline", qos=1, retain=True).wait_for_publish(5.0)
        return sim.seq
    finally:
        client.loop_stop()
        client.disconnect()
