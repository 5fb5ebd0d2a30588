"""The edge control loop on a plant: a real edge agent controlling the simulated plant over
MQTT through a real Mosquitto broker (deployed by a signed release, measured by M&V,
minted by the ledger); a failed envelope check and a comfort breach reverting to the
previous controller with a `deploy.rolled_back`; the minted saving following the deployed
decision; bad telemetry refused in one line."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re

import msgspec
import pytest

from scf.bus import events as ev
from scf.consumers.edge.control import STATUS_QUO, ControlLoop, ControlSettings
from scf.consumers.edge.plant import PlantError, SimPlant, Telemetry, parse_factors
from scf.consumers.ledger import LedgerSettings, read_transfers
from scf.domains import mv
from tests.conftest import spawn, wait_for
from tests.plant_support import Mosquitto, control_run, installed, write_decision
from tests.test_deploy_helpers import Keys, events_on, logs, node_runs, orders_for, promotion, publish_raw, start_edge, start_process, stop
from tests.test_ledger import consumer_done, publish_signed, running_ledger

# 24 h of status-quo history, then the model: enough to calibrate and measure a day
SETTINGS = ControlSettings(sim_hours=72, min_history_hours=24, report_hours=24)


@pytest.mark.anyio
async def test_failed_envelope_check_reverts_to_the_previous_model(tmp_path):
    v1 = installed(tmp_path, "ck-1", "good", 1)
    # v2 heats 6 kW everywhere; its deployment's own envelope allows at most 5 kW a zone
    v2 = installed(tmp_path, "ck-2", "hot", 2, envelope={"u_max_kw": [5.0, 5.0, 5.0]})
    prev = {"ck-2": v1, "ck-1": None}
    loop = await control_run(tmp_path, {96: v1, 130: v2}, SETTINGS, previous=lambda item: prev[item.checkpoint_id])
    [revert] = [e for e in loop.events if isinstance(e, ev.DeployRolledBack)]
    assert revert.data.from_checkpoint_id == "ck-2" and revert.data.to_checkpoint_id == "ck-1"
    # 6 kW proposed, the repair step adds what the comfort band needs: above 5 kW either way
    assert re.fullmatch(r"envelope breach: u\[open_plan\] (\d+\.\d\d) kW above the envelope's 5\.00 kW", revert.data.reason)
    assert revert.data.deployment_id == "dep-ck-2"
    # the breach was caught before any setpoint of v2 was written: ck-1 decided every step after
    ran = [r.controller for r in loop.records]
    assert "ck-2" not in ran and ran[-1] == "ck-1"
    assert json.loads((tmp_path / "control" / "breached.json").read_text()) == {"ck-2": revert.data.reason.removeprefix("envelope breach: ")}
    # a restarted loop never runs the breached model again: it runs the one before it
    again = ControlLoop(SimPlant(SETTINGS.site()), "n1", tmp_path, SETTINGS, current=lambda: v2, previous=lambda item: prev[item.checkpoint_id])
    tel = await again.plant.telemetry(-1)
    again._setup(tel)
    assert again._controller_for(v2).name == "ck-1"


@pytest.mark.anyio
async def test_comfort_breach_reverts_to_the_status_quo(tmp_path):
    """A decision with no preheat leaves the zones cold when people arrive: the runtime
    monitor sees the comfort band broken for an hour and hands back to the status quo."""
    v1 = installed(tmp_path, "ck-cold", "no_preheat", 1)
    loop = await control_run(tmp_path, {96: v1}, SETTINGS)
    [revert] = [e for e in loop.events if isinstance(e, ev.DeployRolledBack)]
    assert revert.data.to_checkpoint_id == STATUS_QUO
    assert revert.data.reason.startswith("envelope breach: comfort: ")
    assert "outside its band 21-24 °C for 4 periods" in revert.data.reason
    assert loop.records[-1].controller == STATUS_QUO


@pytest.mark.anyio
async def test_minted_saving_follows_the_deployed_decision(bus, settings, tmp_path):
    """The same site, the same weather, two decisions: the one that wastes energy at night
    earns less. The savings come from the measured plant against the calibrated baseline."""
    keys = Keys(settings)
    runs = {}
    for node, kind in (("n-good", "good"), ("n-waste", "wasteful")):
        d = tmp_path / node
        runs[node] = await control_run(d, {96: installed(d, f"ck-{kind}", kind)}, SETTINGS, node=node)
    for node, loop in runs.items():
        measured = [e for e in loop.events if isinstance(e, ev.EnergyMeasured)]
        assert len(measured) == 2 and not any(isinstance(e, ev.DeployRolledBack) for e in loop.events), node
        for m in measured:
            assert m.data.method == mv.METHOD and m.data.calibration.cv_rmse < 0.3 and m.data.uncertainty_kwh > 0
    async with running_ledger(bus, keys, LedgerSettings(rate=1.0, require_calibration=True)):
        for node, loop in runs.items():
            for e in loop.events:
                if isinstance(e, ev.EnergyMeasured):
                    await publish_signed(bus, e, keys.node(node))
        await wait_for(lambda: consumer_done(bus), 30, "the ledger to drain")
    minted: dict[str, float] = {}
    for entry in await read_transfers(bus):
        minted[entry.transfer.node] = minted.get(entry.transfer.node, 0.0) + entry.transfer.kwh
    assert minted["n-good"] > minted["n-waste"] > 0
    # what was minted is exactly baseline - actual of the measurements
    for node, loop in runs.items():
        assert minted[node] == pytest.approx(sum(m.baseline_kwh - m.actual_kwh for m in loop.measured))


@pytest.mark.anyio
async def test_bad_telemetry_is_refused_in_one_line(tmp_path):
    loop = ControlLoop(SimPlant(SETTINGS.site()), "n1", tmp_path, SETTINGS, current=lambda: None)
    tel = await loop.plant.telemetry(-1)
    assert loop.telemetry_problem(tel) is None
    short = msgspec.structs.replace(tel, t_zone_c=[20.0])
    assert loop.telemetry_problem(short) == "t_zone_c has 1 values; hvac:office3 has 3 zones (open_plan, meeting, south_office)"
    assert loop.telemetry_problem(msgspec.structs.replace(tel, t_out_c=float("nan"))) == "a value is NaN or infinite"
    with pytest.raises(PlantError, match="unknown site factor 'ua'"):
        parse_factors("ua=1.2")
    with pytest.raises(msgspec.DecodeError):
        msgspec.json.decode(b'{"seq": 1}', type=Telemetry)


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.timeout(300)
async def test_edge_agent_controls_a_plant_over_mqtt(bus, settings, scf_env, tmp_path):
    """Real processes: Mosquitto, `scf run plant`, `scf run edge`, `scf run ledger`. Two
    decisions arrive as signed releases, v1 then v2 (which breaks its own deployment's
    envelope); the agent runs the status quo for a day (the site's history), tries v2,
    reverts at once to v1 and says why; M&V measures v1's day; the ledger mints it."""
    broker = Mosquitto(tmp_path / "mqtt")
    keys = Keys(settings)
    keys.node("n1")
    home = settings.path()
    (home / "scf.toml").write_text(
        f'[edge]\nplant = "mqtt://{broker.address}/site-1"\n\n[edge.control]\nmin_history_hours = 24\nreport_hours = 24\n'
        "\n[ledger]\nrequire_calibration = true\n"
    )
    env = dict(scf_env, SCF_LOG="INFO")
    logd, edir = tmp_path / "logs", tmp_path / "edge"
    logd.mkdir()
    art = write_decision(tmp_path / "artifacts" / "good.safetensors", "good")
    promo = promotion("ck-good", 1, art, domain="hvac:office3")
    seq, raw = await publish_raw(bus, promo, keys.release)
    art2 = write_decision(tmp_path / "artifacts" / "hot.safetensors", "hot", envelope={"u_max_kw": [5.0, 5.0, 5.0]})
    promo2 = promotion("ck-hot", 2, art2, domain="hvac:office3")
    seq2, raw2 = await publish_raw(bus, promo2, keys.release)
    edge = start_edge(env, "n1", edir, logd, {"domain": "hvac:office3"})
    ledger = start_process(env, "ledger", logd)
    plant = None
    try:
        await wait_for(lambda: node_runs(bus, "n1", None), 30, "the agent to register")
        await bus.publish(orders_for(promo, raw, ["n1"], seq=seq, plan="plan-1")[0])
        await wait_for(lambda: node_runs(bus, "n1", "ck-good"), 30, "the decision to activate")
        await bus.publish(orders_for(promo2, raw2, ["n1"], seq=seq2, plan="plan-2")[0])
        await wait_for(lambda: node_runs(bus, "n1", "ck-hot"), 30, "v2 to activate")
        import sys

        plant = spawn([sys.executable, "-m", "scf.cli.main", "run", "plant", "--mqtt", broker.address, "--site", "site-1", "--hours", "48"],
                      env, logd / "plant.log")

        async def measured() -> list[ev.EnergyMeasured]:
            return [e for _, e in await events_on(bus, "DEPLOY", "energy.measured.>", [ev.EnergyMeasured])]

        try:
            await wait_for(lambda: _nonempty(measured()), 180, "a measurement from the control loop")
            await wait_for(lambda: _nonempty(read_transfers(bus)), 30, "the ledger to mint it")
        except Exception:
            print(logs(logd))
            raise
        [revert] = [e for _, e in await events_on(bus, "DEPLOY", "deploy.rolled_back.>", [ev.DeployRolledBack])]
        assert (revert.data.from_checkpoint_id, revert.data.to_checkpoint_id) == ("ck-hot", "ck-good")
        assert re.fullmatch(r"envelope breach: u\[open_plan\] \d+\.\d\d kW above the envelope's 5\.00 kW", revert.data.reason)
        from scf.consumers.nodes import get_node

        assert (await get_node(bus, "n1")).status == "reverted"  # the registry says so too
        [m] = await measured()
        d = m.data
        assert d.node == "n1" and d.method == mv.METHOD
        assert d.deployment_id == next(e.data.deployment_id for _, e in await events_on(bus, "DEPLOY", "deploy.activated.>", [ev.DeployActivated])
                                       if e.data.checkpoint_id == "ck-good")
        assert d.period_end - d.period_start == dt.timedelta(hours=24)
        assert d.calibration.interval == "hourly" and d.calibration.points == 24 and d.calibration.cv_rmse < 0.3
        assert d.baseline_kwh > d.actual_kwh and 0 < d.uncertainty_kwh < d.baseline_kwh - d.actual_kwh
        [entry] = await read_transfers(bus)
        assert entry.transfer.kwh == pytest.approx(d.baseline_kwh - d.actual_kwh)
        assert plant.wait(30) == 0  # the plant's 48 h were all stepped by the agent's setpoints
        assert "plant site-1: 192 steps served" in (logd / "plant.log").read_text()
    finally:
        if plant is not None:
            stop(plant)
        stop(edge)
        stop(ledger)
        broker.stop()


async def _nonempty(coro) -> bool:
    return bool(await coro)


def test_deployable_models_run_with_numpy(tmp_path):
    """A numpy MLP policy maps the context into the state bounds; a file the loop cannot
    run (a grid EBDM's tensors, a wrong shape) is refused in one line."""
    import numpy as np
    from safetensors.numpy import save_file

    from scf import domains
    from scf.consumers.edge.control import ControlError, load_policy

    dom = domains.get("hvac:office3")
    rng = np.random.default_rng(0)
    path = tmp_path / "policy.safetensors"
    save_file({"policy.0.weight": rng.standard_normal((16, 8)).astype(np.float32), "policy.0.bias": np.zeros(16, np.float32),
               "policy.1.weight": rng.standard_normal((3, 16)).astype(np.float32)}, str(path),
              metadata={"scf.envelope": json.dumps({"comfort_tol_k": 0.5})})
    policy, envelope = load_policy(path, dom)
    assert envelope is not None and envelope.comfort_tol_k == 0.5
    ctx = np.array([5.0, 9.0, 0.8, 0.8, 0.8, 20.0, 20.5, 21.0])
    u = policy(ctx)
    lo, hi = dom.state_bounds
    assert u.shape == (3,) and np.all(u >= lo) and np.all(u <= hi)
    # by hand: relu(W0 x + b0), then tanh(W1 h), scaled to the bounds
    clo, chi = dom.context_bounds
    x = 2 * (ctx - clo) / (chi - clo) - 1
    h = np.maximum(rng_w(path, "policy.0.weight") @ x, 0.0)
    y = np.tanh(rng_w(path, "policy.1.weight") @ h)
    assert np.allclose(u, lo + (y + 1) / 2 * (hi - lo), atol=1e-5)

    grid = tmp_path / "ebdm.safetensors"
    save_file({"net.0.weight": np.ones((4, 4), np.float32)}, str(grid))
    with pytest.raises(ControlError, match=r"holds neither a `decision` tensor nor `policy.N.weight` layers"):
        load_policy(grid, dom)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"decision": np.ones((24, 5), np.float32)}, str(wrong))
    with pytest.raises(ControlError, match=r"`decision` has shape \[24, 5\]; hvac:office3 needs \(z,\) or \(hours, z\)"):
        load_policy(wrong, dom)


def rng_w(path, name):
    from safetensors.numpy import load_file

    return load_file(str(path))[name].astype(float)


@pytest.mark.anyio
async def test_mqtt_plant_with_broker_logins(tmp_path, monkeypatch):
    """A broker that requires logins: the plant and the edge each log in; a wrong password
    is one line naming what to fix; the protocol steps the plant once per setpoint."""
    from scf.consumers.edge.plant import Setpoint, SiteOptions, open_plant, serve_mqtt

    broker = Mosquitto(tmp_path / "mqtt", users={"edge-n1": "s3cret", "plant": "p1ant"})
    try:
        monkeypatch.setenv("SCF_MQTT_PASSWORD", "wrong")
        with pytest.raises(PlantError, match=r"refused the connection \(Not authorized\): check the user and password"):
            await open_plant(f"mqtt://edge-n1@{broker.address}/s1")
        stop = asyncio.Event()
        served = asyncio.create_task(serve_mqtt(SiteOptions(hours=1.0), "127.0.0.1", broker.port, "s1", stop,
                                                username="plant", password="p1ant"))
        plant = await open_plant(f"mqtt://edge-n1:s3cret@{broker.address}/s1")
        try:
            tel = await plant.telemetry(-1)
            assert tel.seq == 0 and tel.zones == ["open_plan", "meeting", "south_office"] and tel.energy_kwh == 0.0
            await plant.write(Setpoint(seq=0, u_kw=[3.0, 3.0, 3.0]))
            nxt = await plant.telemetry(0)
            assert nxt.seq == 1 and nxt.time - tel.time == dt.timedelta(minutes=15) and nxt.energy_kwh > 0
            assert nxt.u_kw == [2.0, 1.0, 1.5]  # the equipment's ramp per 15 min (8, 4, 6 kW an hour)
            await plant.write(Setpoint(seq=0, u_kw=[9.0, 9.0, 9.0]))  # stale: answers seq 0 again, ignored
            await plant.write(Setpoint(seq=1, u_kw=[3.0, 3.0, 3.0]))
            assert (await plant.telemetry(1)).seq == 2
        finally:
            stop.set()
            assert await asyncio.wait_for(served, 10) == 2
            await plant.close()
    finally:
        broker.stop()


@pytest.mark.anyio
async def test_loop_follows_a_free_running_plant(tmp_path):
    """A plant that steps on its own clock (as a real BMS does, `--period-s`), holding the
    latest setpoint: the loop answers what it reads and the plant applies it."""
    from scf.consumers.edge.plant import SiteOptions, open_plant, serve_mqtt

    broker = Mosquitto(tmp_path / "mqtt")
    try:
        options = SiteOptions(hours=2.0, start=dt.datetime(2026, 1, 5, 7, 0, tzinfo=dt.timezone.utc))  # the morning warm-up
        served = asyncio.create_task(serve_mqtt(options, "127.0.0.1", broker.port, "s1", period_s=0.2))
        plant = await open_plant(f"mqtt://{broker.address}/s1")
        loop = ControlLoop(plant, "n1", tmp_path, SETTINGS, current=lambda: None)
        try:
            periods = await asyncio.wait_for(loop.run(), 60)
        finally:
            await plant.close()
        assert await asyncio.wait_for(served, 10) == 8  # 2 h of 15-min steps, on the plant's clock
        assert 1 <= periods <= 9
        seen = [r.tel for r in loop.records]
        assert seen[-1].seq == 8 and [t.seq for t in seen] == sorted({t.seq for t in seen})
        # the thermostat asked for heat (occupied band from 07:00) and the plant applied it
        assert max(max(t.u_kw) for t in seen) > 0
    finally:
        broker.stop()


def test_monitor_flags_energy_beyond_what_the_applied_power_implies():
    """The expected-energy check: metered energy far above what the applied thermal power
    costs at the equipment's COP (a fault, a meter that counts something else) is a breach;
    within the margin it is not."""
    from scf import domains
    from scf.consumers.edge.control import Envelope, Monitor

    dom = domains.get("hvac:office3")
    mon = Monitor(dom, Envelope(energy_margin=0.3, energy_floor_kwh=0.5, energy_window=4), per_step_h=0.25)
    # 3.5 kW of heat at COP 3.5 is 1 kW electric: 0.25 kWh a period
    tel = Telemetry(seq=1, time=dt.datetime(2026, 1, 5, 9, tzinfo=dt.timezone.utc), period_s=900.0, zones=list(dom.building.zones),
                    t_zone_c=[22.0, 22.0, 22.0], t_out_c=5.0, occupancy=[0.8, 0.8, 0.8], u_kw=[3.5, 0.0, 0.0], energy_kwh=0.3)
    assert [mon.observe(tel) for _ in range(4)] == [None] * 4  # 1.2 kWh against 1.0: within 30 % + 0.5 kWh
    mon.reset()
    hot = msgspec.structs.replace(tel, energy_kwh=0.6)
    out = [mon.observe(hot) for _ in range(4)]
    assert out[:3] == [None] * 3
    assert out[3] == "energy: 2.40 kWh metered over 4 periods against 1.00 kWh expected from the applied power (margin 30% + 0.5 kWh)"
