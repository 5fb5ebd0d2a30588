"""The grid simulator: the SFR frequency model against Anderson & Mirheydar's closed form and
scipy.signal, governor limits, load shedding, the metrics, and dispatch with ramp limits."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import signal

from scf import domains
from scf.domains import dynamics
from scf.domains import grid_dynamics as gd
from tests.conftest import cli

# Anderson & Mirheydar (1990), the paper's typical reheat-unit parameters
AM = dict(h=4.0, r=0.05, f_h=0.3, t_r=8.0, km=0.95, d=1.0)


@pytest.mark.parametrize("p_step", [0.05, 0.2])
def test_sfr_matches_the_closed_form_of_anderson_and_mirheydar(p_step):
    """Nadir, its time and the steady state of a loss of `p_step` pu, simulated (solve_ivp)
    against the paper's closed form, and the closed form against scipy.signal's step
    response of the same transfer function (an independent computation)."""
    cf = gd.sfr_closed_form(AM["h"], AM["r"], AM["f_h"], AM["t_r"], AM["km"], AM["d"], p_step)
    t = np.arange(0.0, 60.0 + 1e-9, 0.002)
    w, lowest = gd.sfr_response(t, np.array([p_step]), rtol=1e-10, **AM)
    assert cf["steady_state"] == pytest.approx(-AM["r"] * p_step / (AM["d"] * AM["r"] + AM["km"]))  # -R P / (DR + Km)
    assert lowest[0] == pytest.approx(cf["nadir"], rel=1e-6)
    assert t[w[0].argmin()] == pytest.approx(cf["t_nadir"], abs=0.002)
    assert w[0, -1] == pytest.approx(cf["steady_state"], rel=1e-6)
    r, d, km, h, fh, tr = AM["r"], AM["d"], AM["km"], AM["h"], AM["f_h"], AM["t_r"]
    tf = signal.TransferFunction([-r * tr * p_step, -r * p_step], [2 * h * r * tr, 2 * h * r + (d * r + km * fh) * tr, d * r + km])
    _, y = signal.step(tf, T=t)
    assert y.min() == pytest.approx(cf["nadir"], rel=1e-5)
    # for the paper's parameters, in Hz at 60 Hz: a 0.2 pu loss settles 0.6 Hz low, nadir 1.30 Hz low at 2.37 s
    if p_step == 0.2:
        assert (60 * cf["steady_state"], round(60 * cf["nadir"], 2), round(cf["t_nadir"], 2)) == (pytest.approx(-0.6), -1.3, 2.37)


def test_initial_rocof_is_the_swing_equations():
    """At the instant of a loss P nothing has responded yet: dw/dt = -P / 2H."""
    t = np.linspace(0.0, 0.01, 11)
    w, _ = gd.sfr_response(t, np.array([0.1]), rtol=1e-10, **AM)
    assert (w[0, 1] - w[0, 0]) / (t[1] - t[0]) == pytest.approx(-0.1 / (2 * AM["h"]), rel=1e-3)


def test_governors_capped_at_their_reserve_leave_load_damping_to_close_the_gap():
    """With reserve 0.02 pu against a 0.05 pu loss, the settled deviation is -(P - reserve) / D."""
    t = np.arange(0.0, 300.0, 0.5)
    w, _ = gd.sfr_response(t, np.array([0.05]), reserve=0.02, rtol=1e-9, **AM)
    assert w[0, -1] == pytest.approx(-(0.05 - 0.02) / AM["d"], rel=1e-4)


def test_under_frequency_load_shedding_sheds_once_and_settles_on_the_net_loss():
    """A 0.3 pu loss falls through the first threshold (-1 %); 0.1 pu of load is shed for
    good; the frequency then settles where a 0.2 pu loss would (unsaturated governors)."""
    t = np.arange(0.0, 120.0, 0.01)
    w, lowest = gd.sfr_response(t, np.array([0.3]), shed_at=np.array([-0.01, -0.5]), shed=np.array([[0.1, 0.1]]), rtol=1e-9, **AM)
    assert -0.5 < lowest[0] < -0.01
    net = gd.sfr_closed_form(AM["h"], AM["r"], AM["f_h"], AM["t_r"], AM["km"], AM["d"], 0.2)
    assert w[0, -1] == pytest.approx(net["steady_state"], rel=1e-4)
    unshed, _ = gd.sfr_response(t, np.array([0.3]), rtol=1e-9, **AM)
    assert unshed[0].min() < lowest[0]  # shedding raised the nadir


def test_frequency_metrics_of_a_known_curve():
    """f = 60 - 0.5 (1 - e^(-t/2)): steepest 500 ms slope at the start, settled 59.5 Hz,
    inside ±20 mHz from t = 2 ln(0.5 / 0.02) = 6.44 s on."""
    t = np.arange(0.0, 60.0 + 1e-9, 0.01)
    f = 60 - 0.5 * (1 - np.exp(-t / 2))
    m = gd.frequency_metrics(t, f[None, :], gd.FrequencyParams())
    assert m["rocof_hz_s"][0] == pytest.approx(0.5 * (1 - np.exp(-0.25)) / 0.5, rel=1e-9)
    assert m["steady_state_hz"][0] == pytest.approx(59.5, abs=1e-6)
    assert m["nadir_hz"][0] == pytest.approx(f.min())
    assert m["settling_s"][0] == pytest.approx(2 * np.log(0.5 / 0.02), abs=0.011)
    never = gd.frequency_metrics(t, (60 - 0.01 * t)[None, :], gd.FrequencyParams())  # still falling at the end
    assert np.isnan(never["settling_s"][0])


# --------------------------------------------------------------------------- dispatch


def test_plant_moves_within_ramp_rates_and_limits():
    dom = domains.get("grid:case14")
    plant = gd.GridPlant(dom)
    prev = (dom.pmin + dom.pmax) / 2
    pg = plant.limit(prev[None, :], np.array([dom.pmax * 2]))
    np.testing.assert_allclose(pg[0], np.minimum(prev + plant.ramp_per_step, dom.pmax))
    pg = plant.limit(prev[None, :], np.array([dom.pmin - 100]))
    np.testing.assert_allclose(pg[0], np.maximum(prev - plant.ramp_per_step, dom.pmin))


def test_reserve_shortfall_is_the_largest_unit_beyond_the_others_reserve():
    dom = domains.get("grid:case14")
    plant = gd.GridPlant(dom)
    pg = np.array([[250.0, 9.0, 0.0, 0.0, 0.0]])
    loads = dom.nominal_load[None, :]
    m = plant.measure(pg, loads)
    headroom = np.minimum(dom.pmax - pg[0], 0.1 * dom.pmax)
    assert m.reserve_mw[0] == pytest.approx(headroom.sum())
    assert m.shortfall_mw[0] == pytest.approx(250.0 - (headroom.sum() - headroom[0]))
    assert m.imbalance_mw[0] == pytest.approx(259.0 - dom.demand(dom.nominal_load))


def test_opf_dispatch_is_the_domains_optimum_and_costs_less_than_pro_rata():
    dom = domains.get("grid:case14")
    plant = gd.GridPlant(dom)
    loads, forecast = gd.load_trajectory(dom, scenarios=8, steps=24, dt_h=5 / 60, seed=3)
    decide = gd.opf(plant, forecast)
    at_forecast = decide(0, np.tile(dom.pmin, (1, 1)), forecast[:1])[0]
    np.testing.assert_allclose(at_forecast, dom.reference_solution(forecast[0]), atol=1e-6)
    assert dom.violations(forecast[0], at_forecast) == []
    opf = gd.run_dispatch(plant, loads, decide)
    pro = gd.run_dispatch(plant, loads, gd.prorata(plant, forecast))
    for r in (opf, pro):
        assert np.abs(r.imbalance_mw).max() < 1e-6  # balanced: the ramps do not bind on this trajectory
        assert np.all(np.abs(np.diff(r.pg, axis=1)) <= plant.ramp_per_step + 1e-9)
    assert np.all(opf.cost_per_h.sum(1) < pro.cost_per_h.sum(1))


def test_grid_run_is_seeded_and_batch_independent():
    big = dynamics.simulate("grid:case9", scenarios=4, hours=1, seed=5)
    small = dynamics.simulate("grid:case9", scenarios=1, hours=1, seed=5)
    mb, ms = big.metrics.to_pydict(), small.metrics.to_pydict()
    assert mb["cost_usd"][0] == pytest.approx(ms["cost_usd"][0], rel=1e-12)
    assert mb["tripped_mw"][0] == pytest.approx(ms["tripped_mw"][0], rel=1e-12)
    # the integrator's steps are chosen for the whole batch: equal to its tolerance, not bit for bit
    assert mb["nadir_hz"][0] == pytest.approx(ms["nadir_hz"][0], abs=1e-4)
    again = dynamics.simulate("grid:case9", scenarios=4, hours=1, seed=5).metrics.to_pydict()
    for name, values in mb.items():  # NaN (never settled) equals NaN here, unlike Table.equals
        np.testing.assert_array_equal(np.asarray(again[name], dtype=float), np.asarray(values, dtype=float))


def test_cli_grid_writes_dispatch_frequency_and_metrics(tmp_path):
    env = dict(os.environ, SCF_HOME=str(tmp_path / "home"))
    dom = domains.get("grid:case9")
    decision = tmp_path / "dispatch.json"
    decision.write_text(json.dumps(dom.reference_solution(dom.nominal_load).tolist()))
    out = tmp_path / "sim"
    r = cli("simulate", "--domain", "grid:case9", "--scenarios", "3", "--hours", "1", "--decision", str(decision), "--out", str(out), "--json", env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["controller"] == "decision:dispatch.json"
    assert {"nadir_hz", "rocof_hz_s", "settling_s", "reserve_shortfall_mw", "cost_usd", "load_shed_mw"} <= set(doc["metrics"])
    assert pq.read_table(out / "trajectories.parquet").num_rows == 3 * 12
    freq = pq.read_table(out / "frequency.parquet")
    assert freq.num_rows == 3 * 601 and freq.column_names == ["scenario", "t_s", "f_hz"]
    assert np.all(np.asarray(freq.column("f_hz")) < 60.5)
    r = cli("simulate", "--domain", "grid:case9", "--controller", "thermostat", "--out", str(out), env=env)
    assert r.stderr.strip() == "Error: unknown controller 'thermostat' for grid:case9: use one of opf, prorata"
