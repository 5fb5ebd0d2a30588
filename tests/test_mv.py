"""M&V (IPMVP Option D, ASHRAE Guideline 14): the statistics against hand computation, the
calibration of the HVAC baseline model against a site whose true factors are known, the
counterfactual of an unchanged controller, and the ledger's calibration rule against a real
nats-server (a miscalibrated baseline is rejected with the reason)."""

from __future__ import annotations

import datetime as dt
import math

import msgspec
import numpy as np
import pytest

from scf import domains
from scf.bus import events as ev
from scf.consumers.energy import NO_CALIBRATION, measurement_event
from scf.consumers.ledger import LedgerSettings, check, read_transfers
from scf.domains import mv
from scf.domains.hvac_dynamics import HvacPlant, run_plant, thermostat, weather
from tests.conftest import wait_for
from tests.test_deploy_helpers import Keys, utc
from tests.test_ledger import consumer_done, publish_signed, rejections, running_ledger

DOM = domains.get("hvac:office3")
TRUE = {"envelope_ua": 1.2, "internal_gains": 0.85, "efficiency": 0.9}
DT = 0.25


def test_statistics_by_hand():
    y, yhat = np.array([10.0, 12.0, 8.0, 10.0]), np.array([9.0, 12.5, 8.5, 9.0])
    # residuals 1, -0.5, -0.5, 1; sum 1, sum of squares 2.5; n - p = 3; mean 10
    assert mv.cv_rmse(y, yhat) == pytest.approx(math.sqrt(2.5 / 3) / 10)
    assert mv.nmbe(y, yhat) == pytest.approx(1 / 30)
    assert mv.effective_points(100, 0.5) == pytest.approx(100 / 3)
    assert mv.effective_points(100, -0.3) == 100  # no credit for negative autocorrelation
    # Guideline 14's FSU, by hand: 1.26 t CV sqrt((n/n')(1 + 2/n')/m) / F
    t = mv.student_t(0.9, 99)
    assert t == pytest.approx(1.660391, rel=1e-5)  # Student's t, 90 % two-sided, 99 dof (tables)
    want = 1.26 * t * 0.1 * math.sqrt((100 / 50) * (1 + 2 / 50) / 24) / 0.2
    assert mv.fractional_savings_uncertainty(0.1, 100, 50, 24, 0.2, confidence=0.9) == pytest.approx(want)
    assert mv.fractional_savings_uncertainty(0.1, 100, 50, 24, 0.0) == math.inf


def test_g14_criteria_name_the_figure_and_the_limit():
    assert mv.g14_problem("hourly", 0.29, -0.09) is None
    assert mv.g14_problem("hourly", 0.31, 0.0, 48) == "baseline model not calibrated: hourly CV(RMSE) 31.0% above ASHRAE Guideline 14's 30% (48 points)"
    assert mv.g14_problem("hourly", 0.2, 0.11, 48) == "baseline model not calibrated: hourly NMBE +11.0% outside ASHRAE Guideline 14's ±10% (48 points)"
    assert mv.g14_problem("monthly", 0.16, 0.0) is not None and mv.g14_problem("monthly", 0.14, -0.049) is None
    assert "no Guideline 14 criterion" in mv.g14_problem("weekly", 0.1, 0.0)
    with pytest.raises(mv.MVError, match="differ in length"):
        mv.cv_rmse([1.0, 2.0], [1.0])
    with pytest.raises(mv.MVError, match="NaN or infinite"):
        mv.nmbe([1.0, float("nan")], [1.0, 1.0])


def site_history(hours: int, seed: int = 10, noise: float = 0.02) -> tuple[mv.HvacHistory, np.ndarray]:
    """The true site under the thermostat, metered with noise; returns the history and the
    true energy per step."""
    truth = mv.calibrated_domain(DOM, TRUE)
    steps = int(hours / DT)
    dist = weather(truth, scenarios=1, steps=steps, dt_h=DT, seed=seed)
    plant = HvacPlant(truth, DT)
    t0 = np.full(3, 20.0)
    run = run_plant(plant, dist, thermostat(plant), t0)
    true_e = run.power_kw[0] * DT
    metered = true_e * (1 + noise * np.random.default_rng(seed).standard_normal(steps))
    h = mv.HvacHistory(DT, 0.0, dist.t_out[0], dist.occupancy[0], dist.clearness[0], t0, metered)
    return h, true_e


def test_calibration_recovers_the_site_and_passes_g14():
    h, _ = site_history(48)
    cal = mv.calibrate_hvac(DOM, h)
    assert cal.problem() is None
    assert cal.cv_rmse < 0.05 and abs(cal.nmbe) < 0.01
    for name, value in TRUE.items():
        assert cal.parameters[name] == pytest.approx(value, rel=0.05), name
    # the nominal model (not calibrated to this site) misses both of Guideline 14's criteria
    nominal = mv.calibrate_hvac(DOM, h, fit=False)
    assert nominal.cv_rmse > 0.3 and nominal.nmbe > 0.1
    assert nominal.problem().startswith("baseline model not calibrated: hourly CV(RMSE)")
    with pytest.raises(mv.MVError, match="at least 24"):
        mv.calibrate_hvac(DOM, msgspec_free_slice(h, 40))


def msgspec_free_slice(h: mv.HvacHistory, steps: int) -> mv.HvacHistory:
    return mv.HvacHistory(h.dt_h, h.start_hour, h.t_out[: steps + 1], h.occupancy[: steps + 1], h.clearness[: steps + 1], h.t_zone0,
                          h.energy_kwh[:steps])


def test_unchanged_controller_saves_nothing_within_its_uncertainty():
    """Option D on a period where nothing changed: the counterfactual (calibrated model,
    same controller, same measured disturbances) matches the metered energy within the
    stated uncertainty — the check that the method does not invent savings."""
    h, _ = site_history(72)
    base = msgspec_free_slice(h, 192)
    cal = mv.calibrate_hvac(DOM, base)
    k = 192
    period = mv.HvacHistory(DT, (k * DT) % 24, h.t_out[k:], h.occupancy[k:], h.clearness[k:], h.t_zone0, h.energy_kwh[k:])
    # the period starts from the measured temperatures at its start: rerun the truth to get them
    truth = mv.calibrated_domain(DOM, TRUE)
    plant = HvacPlant(truth, DT)
    run = run_plant(plant, h.disturbances(), thermostat(plant), h.t_zone0[None, :])
    period = mv.HvacHistory(DT, period.start_hour, period.t_out, period.occupancy, period.clearness, run.t_zone[0, k - 1], period.energy_kwh)
    s = mv.counterfactual_hvac(DOM, cal, period)
    assert abs(s.saved_kwh) < 0.02 * s.baseline_kwh  # a few % of a day's energy at most
    # the Guideline 14 interval for an absolute saving: fsu * saved = 1.26 t CV sqrt(...) * baseline
    width = mv.FSU_CORRECTION * mv.student_t(0.9, cal.points - 1) * cal.cv_rmse * math.sqrt(
        (cal.points / mv.effective_points(cal.points, cal.rho)) * (1 + 2 / mv.effective_points(cal.points, cal.rho)) / s.reporting_points
    ) * s.baseline_kwh
    assert abs(s.saved_kwh) <= width


def calibrated_measurement(node: str, hour: int, *, cv: float = 0.05, bias: float = 0.01, uncertainty: float | None = 0.3,
                           confidence: float = 0.9, baseline: float = 10.0, actual: float = 8.0) -> ev.EnergyMeasured:
    start = utc(2026, 11, 1, 0, 0) + dt.timedelta(hours=hour)
    return measurement_event(node, period_start=start, period_end=start + dt.timedelta(hours=1), baseline_kwh=baseline,
                             actual_kwh=actual, method=mv.METHOD, source="test",
                             calibration=ev.Calibration(interval="hourly", points=48, cv_rmse=cv, nmbe=bias),
                             uncertainty_kwh=uncertainty, confidence=confidence)


def test_ledger_rule_pure():
    s = LedgerSettings()
    assert check(calibrated_measurement("n1", 0).data, s) is None
    assert "CV(RMSE) 40.0%" in check(calibrated_measurement("n1", 0, cv=0.4).data, s)
    assert "uncertainty is not stated" in check(calibrated_measurement("n1", 0, uncertainty=None).data, s)
    assert "confidence level 0.5" in check(calibrated_measurement("n1", 0, confidence=0.5).data, s)
    assert "saving too uncertain" in check(calibrated_measurement("n1", 0, uncertainty=1.5).data, s)
    # any measurement without a calibration by default; with `require_calibration = false`
    # (not Option D compliant) a plain reading mints, an Option D method still needs one
    plain = measurement_event("n1", period_start=utc(2026, 11, 1, 0, 0), period_end=utc(2026, 11, 1, 1, 0), baseline_kwh=10,
                              actual_kwh=8, method="metered-vs-baseline", source="test")
    assert s.require_calibration is True
    assert check(plain.data, s) == NO_CALIBRATION
    uncalibrated = LedgerSettings(require_calibration=False)
    assert check(plain.data, uncalibrated) is None
    option_d = msgspec.structs.replace(plain.data, method=mv.METHOD)
    assert check(option_d, uncalibrated) == NO_CALIBRATION
    assert NO_CALIBRATION.startswith("no calibration stated: ") and "\n" not in NO_CALIBRATION
    assert "scf energy report --cv-rmse --nmbe --points --uncertainty" in NO_CALIBRATION
    assert "[ledger] require_calibration = false" in NO_CALIBRATION


def test_measurement_with_calibration_round_trips():
    from scf.bus import codec

    event = calibrated_measurement("n1", 0)
    back = codec.decode(codec.encode(event))
    assert back == event and back.data.calibration.cv_rmse == 0.05 and back.data.uncertainty_kwh == 0.3


@pytest.mark.anyio
async def test_ledger_mints_calibrated_and_rejects_miscalibrated(bus, settings):
    keys = Keys(settings)
    k1 = keys.node("n1")
    async with running_ledger(bus, keys, LedgerSettings(rate=1.0)):
        await publish_signed(bus, calibrated_measurement("n1", 0), k1)
        await publish_signed(bus, calibrated_measurement("n1", 1, bias=-0.12), k1)  # miscalibrated baseline
        await publish_signed(bus, calibrated_measurement("n1", 2, uncertainty=None), k1)  # no uncertainty
        await wait_for(lambda: consumer_done(bus), 20, "the ledger to drain")
    entries = await read_transfers(bus)
    assert [e.transfer.kwh for e in entries] == [2.0]
    reasons = sorted(r.reason for r in await rejections(bus))
    assert reasons == [
        "baseline model not calibrated: hourly NMBE -12.0% outside ASHRAE Guideline 14's ±10% (48 points)",
        "the saving's uncertainty is not stated (uncertainty_kwh None): report ASHRAE Guideline 14's fractional savings uncertainty",
    ]


@pytest.mark.anyio
async def test_a_site_the_model_cannot_fit_is_not_minted(bus, settings, tmp_path):
    """End to end: a site far outside the baseline model's reach (a tight envelope, three
    times the gains: cooling-dominated) — the control loop still reports its measurement,
    with the calibration figures it got, and the ledger refuses to mint it."""
    from scf.consumers.edge.control import ControlSettings
    from tests.plant_support import control_run, installed

    s = ControlSettings(sim_hours=48, min_history_hours=24, report_hours=24, sim_factors="envelope_ua=0.3,internal_gains=3,efficiency=0.9")
    loop = await control_run(tmp_path, {96: installed(tmp_path, "ck-1", "good")}, s)
    measured = [e for e in loop.events if isinstance(e, ev.EnergyMeasured)]
    assert measured and all(mv.g14_problem("hourly", e.data.calibration.cv_rmse, e.data.calibration.nmbe) for e in measured)
    keys = Keys(settings)
    async with running_ledger(bus, keys, LedgerSettings(rate=1.0)):
        for e in measured:
            await publish_signed(bus, e, keys.node("n1"))
        await wait_for(lambda: consumer_done(bus), 20, "the ledger to drain")
    assert await read_transfers(bus) == []
    reasons = [r.reason for r in await rejections(bus)]
    assert len(reasons) == len(measured)
    assert all(r.startswith("baseline model not calibrated: hourly ") or r.startswith("negative saving") for r in reasons), reasons
    assert any(r.startswith("baseline model not calibrated: hourly CV(RMSE)") for r in reasons), reasons


# --------------------------------------------------------------------------- plain readings: refused, or an uncalibrated deployment


def report(*extra: str, hour: int = 0, env) -> object:
    from tests.conftest import cli

    start = utc(2026, 11, 1, hour, 0)
    return cli("energy", "report", "--node", "n1", "--baseline", "10", "--actual", "8", "--start", start.isoformat(),
               "--end", (start + dt.timedelta(hours=1)).isoformat(), *extra, env=env)


@pytest.mark.anyio
async def test_energy_report_carries_the_figures_or_refuses(bus, settings, scf_env):
    """`scf energy report` without M&V figures, with some of them, or with a calibration
    that fails Guideline 14 refuses with one line and publishes nothing; `--uncalibrated`
    publishes a plain reading, which the ledger rejects by default (naming the fix) and
    mints only where `[ledger] require_calibration = false`."""
    import asyncio

    from tests.conftest import stream_count
    from tests.mv_support import mv_options

    keys = Keys(settings)
    k1 = keys.node("n1")
    cases = [
        ((), "Error: no M&V figures: the ledger mints a saving only against a baseline calibrated to ASHRAE Guideline 14 "
             "with its uncertainty stated: give --cv-rmse, --nmbe, --points and --uncertainty (docs/mv.md), or "
             "--uncalibrated for a ledger that sets [ledger] require_calibration = false"),
        (("--cv-rmse", "0.05", "--nmbe", "0.01"), "Error: --cv-rmse, --nmbe without --points, --uncertainty: the M&V figures go "
                                                 "together (--cv-rmse, --nmbe, --points and --uncertainty; docs/mv.md)"),
        (("--cv-rmse", "0.05", "--nmbe", "-0.12", "--points", "48", "--uncertainty", "0.2"),
         "Error: baseline model not calibrated: hourly NMBE -12.0% outside ASHRAE Guideline 14's ±10% (48 points): not reported"),
        (("--cv-rmse", "0.05", "--nmbe", "0.01", "--points", "48", "--uncertainty", "0.2", "--confidence", "0.5"),
         "Error: the uncertainty's confidence level 0.5 is not stated or below 68 %: state it (e.g. 0.9): not reported"),
        (("--uncalibrated", *mv_options(10, 8)), "Error: --uncalibrated with --cv-rmse, --nmbe, --points, --uncertainty: give "
                                                 "the M&V figures or --uncalibrated, not both"),
    ]
    for extra, error in cases:
        out = await asyncio.to_thread(report, *extra, env=scf_env)
        assert out.returncode == 1 and out.stderr.strip() == error, out.stdout + out.stderr
    assert await stream_count(bus, "DEPLOY") == 0

    plain = await asyncio.to_thread(report, "--uncalibrated", hour=0, env=scf_env)
    assert plain.returncode == 0, plain.stderr
    assert "2 kWh saved (uncalibrated: minted only where [ledger] require_calibration = false)" in plain.stdout
    async with running_ledger(bus, keys, LedgerSettings(rate=1.0)):
        await wait_for(lambda: consumer_done(bus), 20, "the ledger to decide the plain reading")
    assert await read_transfers(bus) == []
    assert [r.reason for r in await rejections(bus)] == [NO_CALIBRATION]

    # a deployment that deliberately accepts uncalibrated readings (not IPMVP Option D)
    async with running_ledger(bus, keys, LedgerSettings(rate=1.0, require_calibration=False)):
        n = (await bus.js.stream_info("DEPLOY")).state.last_seq
        assert (await asyncio.to_thread(report, "--uncalibrated", hour=1, env=scf_env)).returncode == 0
        await publish_signed(bus, calibrated_measurement("n1", 2, bias=-0.12), k1)  # a stated calibration is still checked
        await wait_for(lambda: consumer_done(bus, n + 1), 20, "the ledger to decide")
    assert [e.transfer.kwh for e in await read_transfers(bus)] == [2.0]
    assert len(await rejections(bus)) == 2


@pytest.mark.anyio
async def test_meter_files_carry_the_figures_or_go_to_bad(bus, settings, tmp_path):
    """A meter file without M&V figures goes to meter/bad/ (the log names the fix); one with
    them is sent carrying them; `"uncalibrated": true` sends a plain reading."""
    import json

    from scf.bus.client import Bus
    from scf.consumers.edge import EdgeAgent
    from tests.mv_support import CALIBRATION, mv_fields
    from tests.test_deploy_helpers import events_on

    keys = Keys(settings)
    node_bus = await Bus.connect(settings, "edge-n1", key=keys.node("n1"))
    try:
        agent = EdgeAgent(node_bus, "n1", tmp_path / "n1", keys.trust, register=False)
        meter = tmp_path / "n1" / "meter"

        def period(hour: int) -> dict:
            return {"period_start": f"2026-11-01T{hour:02d}:00:00Z", "period_end": f"2026-11-01T{hour + 1:02d}:00:00Z",
                    "baseline_kwh": 10.0, "actual_kwh": 8.0}

        (meter / "a-plain.json").write_text(json.dumps(period(0)))
        (meter / "b-miscalibrated.json").write_text(json.dumps({**period(1), **mv_fields(10, 8), "calibration": {
            "interval": "hourly", "points": 48, "cv_rmse": 0.4, "nmbe": 0.0}}))
        (meter / "c-both.json").write_text(json.dumps({**period(2), **mv_fields(10, 8), "uncalibrated": True}))
        (meter / "d-calibrated.json").write_text(json.dumps({**period(3), **mv_fields(10, 8)}))
        (meter / "e-uncalibrated.json").write_text(json.dumps({**period(4), "uncalibrated": True}))
        assert await agent.meter.report_files() == 2
        assert sorted(p.name for p in (meter / "bad").iterdir()) == ["a-plain.json", "b-miscalibrated.json", "c-both.json"]
    finally:
        await node_bus.close()
    sent = sorted((e.data for _, e in await events_on(bus, "DEPLOY", "energy.measured.>", [ev.EnergyMeasured])),
                  key=lambda m: m.period_start)
    assert [m.period_start.hour for m in sent] == [3, 4]
    assert sent[0].calibration == msgspec.structs.replace(CALIBRATION, model="") and sent[0].uncertainty_kwh == pytest.approx(0.2)
    assert sent[0].confidence == 0.9
    assert sent[1].calibration is None and sent[1].uncertainty_kwh is None and sent[1].confidence == 0.0
