"""The time-domain simulator: OU noise, the HVAC plant against analytic references and an
independent integrator, energy balance, reproducibility, and `scf simulate` as a user meets it."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.integrate import solve_ivp
from scipy.linalg import solve_continuous_lyapunov

from scf import domains
from scf.domains import dynamics
from scf.domains.dynamics import OrnsteinUhlenbeck, scenario_normals
from scf.domains.hvac import Building, HvacDomain
from scf.domains.hvac_dynamics import HvacDisturbances, HvacPlant, run_plant, weather
from tests.conftest import cli

EPS = np.finfo(float).eps


# --------------------------------------------------------------------------- OU noise


def test_ou_stationary_variance_matches_the_analytic_value():
    """Started at 0, after 10 correlation times the exact OU sampler's variance over 100,000
    paths is sigma^2 / (2 theta) (1 - e^(-2 theta T)) within 2 % (its standard error: 0.45 %)."""
    ou = OrnsteinUhlenbeck.from_std(2.0, 12.0)  # 2 K, 12 h: the outdoor temperature's process
    dt, steps = 0.5, 240  # 120 h
    x = ou.paths(np.random.default_rng(7).standard_normal((100_000, steps + 1)), dt, x0=np.zeros(100_000))
    analytic = ou.stationary_variance * (1 - np.exp(-2 * ou.theta * dt * steps))
    assert ou.stationary_variance == pytest.approx(4.0)
    assert np.var(x[:, -1]) == pytest.approx(analytic, rel=0.02)
    lag1 = np.corrcoef(x[:, -2], x[:, -1])[0, 1]  # the exact one-step autocorrelation e^(-theta dt)
    assert lag1 == pytest.approx(np.exp(-ou.theta * dt), abs=0.01)


@pytest.mark.slow
def test_thermal_network_driven_by_ou_weather_has_the_lyapunov_variance():
    """The linear SDE [T; X]: dT = (M T + e X) dt, dX = -theta X dt + sigma dW (HVAC off, no
    gains, outdoor temperature X an OU process). The plant's zone temperatures at the end of
    days 2-5 of 20,000 scenarios (80,000 samples, correlated 0.3 day to day: standard error
    about 0.6 %) have the stationary variances of the continuous Lyapunov equation
    A P + P A' + G G' = 0 within 2 % (the first-order hold of X between half-hour samples is
    the only approximation; measured: -0.75 %)."""
    dom = domains.get("hvac:office3")
    z, n, dt, steps = dom.n_zones, 20_000, 0.5, 240
    ou = OrnsteinUhlenbeck.from_std(2.0, 12.0)
    t_out = ou.paths(scenario_normals(3, n, (steps + 1,)), dt)
    dist = HvacDisturbances(dt, 0.0, t_out, np.zeros((n, steps + 1, z)), np.zeros((n, steps + 1)))
    r = run_plant(HvacPlant(dom, dt), dist, lambda k, s, now: np.zeros_like(s.t_zone), np.zeros(z))
    a = np.zeros((z + 1, z + 1))
    a[:z, :z], a[:z, z] = dom.m_cont, dom.inputs_cont[:, z]
    a[z, z] = -ou.theta
    g = np.zeros((z + 1, 1))
    g[z, 0] = ou.sigma
    p = solve_continuous_lyapunov(a, -g @ g.T)
    samples = r.t_zone[:, [95, 143, 191, 239]].reshape(-1, z)  # ends of days 2, 3, 4, 5
    np.testing.assert_allclose(samples.var(0), np.diag(p)[:z], rtol=0.02)


# --------------------------------------------------------------------------- HVAC physics


def one_zone(c=2.0, r=3.0) -> HvacDomain:
    b = Building(zones=("room",), capacitance_kwh_per_k=(c,), r_out_k_per_kw=(r,), adjacency=(), occupancy_gain_kw=(0.0,),
                 solar_gain_kw=(0.0,), heat_max_kw=(10.0,), cool_max_kw=(10.0,), ramp_kw=(100.0,))  # fmt: skip
    return HvacDomain(b, "hvac:one_zone")


def test_rc_step_response_matches_the_analytic_solution():
    """A single RC zone under a heating step u from T0 with T_out fixed: the first-order
    lumped-capacitance solution T(t) = T_out + R u + (T0 - T_out - R u) e^(-t / RC)."""
    dom = one_zone(c=2.0, r=3.0)
    dt, steps, u, t_out, t0 = 0.1, 60, 4.0, 5.0, 18.0
    dist = HvacDisturbances(dt, 0.0, np.full((1, steps + 1), t_out), np.zeros((1, steps + 1, 1)), np.zeros((1, steps + 1)))
    r = run_plant(HvacPlant(dom, dt), dist, lambda k, s, now: np.full_like(s.t_zone, u), np.array([t0]))
    t = dt * np.arange(1, steps + 1)
    analytic = t_out + 3.0 * u + (t0 - t_out - 3.0 * u) * np.exp(-t / 6.0)
    np.testing.assert_allclose(r.t_zone[0, :, 0], analytic, rtol=0, atol=1e-10)


def test_exact_discretisation_agrees_with_solve_ivp():
    """The plant's matrix-exponential step against scipy's DOP853 on the same ODE with the
    same inputs (setpoints held, disturbances linear between samples): temperatures and the
    heat lost to outdoors agree to 1e-7."""
    dom = domains.get("hvac:office3")
    dt, steps = 0.25, 16
    dist = weather(dom, scenarios=1, steps=steps, dt_h=dt, seed=5, start_hour=7.0)
    plant = HvacPlant(dom, dt)
    u_of = lambda k: np.array([[3.0, -2.0, 1.5]]) * np.sin(k / 3.0)
    r = run_plant(plant, dist, lambda k, s, now: u_of(k), np.array([19.0, 21.0, 22.5]))
    t_zone, lost = np.array([19.0, 21.0, 22.5]), 0.0
    for k in range(steps):
        a, b = dist.at(k), dist.at(k + 1)
        g0, g1 = plant.gains(a)[0], plant.gains(b)[0]
        u = r.u[0, k]

        def rhs(t, y, a=a, b=b, g0=g0, g1=g1, u=u):
            s = t / dt
            gain, tout = g0 + s * (g1 - g0), a.t_out[0] + s * (b.t_out[0] - a.t_out[0])
            temp = y[:-1]
            return np.concatenate([dom.m_cont @ temp + dom.inputs_cont @ np.concatenate([u + gain, [tout]]), [dom.g_out @ (temp - tout)]])

        sol = solve_ivp(rhs, (0, dt), np.concatenate([t_zone, [0.0]]), method="DOP853", rtol=1e-12, atol=1e-12)
        t_zone, lost = sol.y[:-1, -1], sol.y[-1, -1]
        np.testing.assert_allclose(r.t_zone[0, k], t_zone, atol=1e-7)
        assert r.lost_kwh[0, k] == pytest.approx(lost, abs=1e-7)


def test_energy_balance_closes_to_round_off():
    """heat in (HVAC + gains) = heat stored + heat lost, per scenario over 24 h of the
    thermostat under stochastic weather. The discretisation is exact, so what is left is
    float64 round-off: per step, each term carries a relative error of a few ulps times the
    size of the matrix products (at most 3 zones x 5 inputs), and `stored` = C (T1 - T0)
    loses the digits of C |T| to cancellation; summed over K steps the bound is
    K * 64 eps * (|in| + |stored| + |lost| + sum C |T|) per step, taken at its maximum."""
    res = dynamics.simulate("hvac:office3", scenarios=20, hours=24, seed=1)
    m = {k: np.asarray(v) for k, v in res.metrics.to_pydict().items()}
    steps = res.trajectories.num_rows // 20
    dom = domains.get("hvac:office3")
    traj = res.trajectories.to_pydict()
    t_max = max(np.abs(traj[f"T[{z}]"]).max() for z in dom.building.zones)
    per_step = (np.abs(m["heat_in_kwh"]) + np.abs(m["heat_stored_kwh"]) + np.abs(m["heat_lost_kwh"])) + dom.capacitance.sum() * t_max
    bound = steps * 64 * EPS * per_step
    assert np.all(np.abs(m["balance_residual_kwh"]) <= bound)
    assert np.all(np.abs(m["heat_in_kwh"]) > 1.0)  # the balance is not trivially 0 = 0


def test_equipment_limits_and_ramp_rates_hold():
    dom = domains.get("hvac:office3")
    dt = 5 / 60
    plant = HvacPlant(dom, dt)
    dist = weather(dom, scenarios=4, steps=24, dt_h=dt, seed=2)
    r = run_plant(plant, dist, lambda k, s, now: np.full_like(s.t_zone, 1e3 * (-1) ** (k // 6)), np.full(3, 20.0))
    assert np.all(r.u <= dom.heat_max + 1e-12) and np.all(r.u >= -dom.cool_max - 1e-12)
    steps = np.abs(np.diff(np.concatenate([np.zeros((4, 1, 3)), r.u], axis=1), axis=1))
    assert np.all(steps <= dom.ramp * dt + 1e-12)
    assert np.any(np.isclose(steps, dom.ramp * dt))  # the ramp is what binds


def test_comfort_violation_is_zero_inside_the_band_and_counts_degree_hours():
    dom = domains.get("hvac:office3")
    plant = HvacPlant(dom)
    occupied = np.ones((1, 3))
    dev = plant.comfort_deviation(np.array([[22.0, 20.0, 25.5]]), occupied)  # band 21-24
    np.testing.assert_allclose(dev, [[0.0, 1.0, 1.5]])
    assert plant.comfort_deviation(np.array([[17.0, 20.0, 27.0]]), np.zeros((1, 3))).sum() == 0.0  # 16-28 unoccupied


def test_free_floating_building_violates_comfort_and_the_thermostat_mostly_holds_it():
    off = dynamics.simulate("hvac", scenarios=30, hours=24, seed=4, controller="off")
    thermo = dynamics.simulate("hvac", scenarios=30, hours=24, seed=4, controller="thermostat")
    col = lambda r, c: np.asarray(r.metrics.column(c))
    assert np.all(col(off, "energy_kwh") == 0)
    assert col(thermo, "comfort_violation_kh").mean() < 0.1 * col(off, "comfort_violation_kh").mean()
    assert np.all(col(thermo, "energy_kwh") > 0)


def test_reference_controller_is_the_domains_lp_from_the_measured_state():
    """Each hour the `reference` controller decides what domains/hvac.py's LP decides for
    the measured context [T_out, hour, occupancy, T0], and holds it for the hour."""
    from scf.domains.hvac_dynamics import HvacState, reference

    dom = domains.get("hvac:office3")
    plant = HvacPlant(dom)
    dist = weather(dom, scenarios=2, steps=13, dt_h=5 / 60, seed=9, start_hour=8.0)
    state = HvacState(np.array([[20.0, 21.5, 23.0], [24.5, 22.0, 19.0]]), np.zeros((2, 3)))
    decide = reference(plant)
    now = dist.at(0)
    u0 = decide(0, state, now)
    for i in range(2):
        context = np.concatenate([[now.t_out[i], now.hour[i]], now.occupancy[i], state.t_zone[i]])
        np.testing.assert_allclose(u0[i], dom.reference_solution(context), atol=1e-9)
    np.testing.assert_array_equal(decide(5, state, dist.at(5)), u0)  # held within the hour


# --------------------------------------------------------------------------- reproducibility


def test_seeded_scenarios_do_not_depend_on_the_batch():
    """Scenario i is the same trajectory alone or in a batch; another seed differs."""
    big = dynamics.simulate("hvac", scenarios=6, hours=6, seed=11)
    again = dynamics.simulate("hvac", scenarios=6, hours=6, seed=11)
    small = dynamics.simulate("hvac", scenarios=1, hours=6, seed=11)
    other = dynamics.simulate("hvac", scenarios=1, hours=6, seed=12)
    assert big.trajectories.equals(again.trajectories)
    first = big.trajectories.filter(np.asarray(big.trajectories.column("scenario")) == 0)
    np.testing.assert_allclose(np.asarray(first.column("T[meeting]")), np.asarray(small.trajectories.column("T[meeting]")), rtol=1e-12)
    assert not np.allclose(np.asarray(other.trajectories.column("T[meeting]")), np.asarray(small.trajectories.column("T[meeting]")))


def test_a_decision_is_held_within_limits(tmp_path):
    path = tmp_path / "decision.json"
    path.write_text(json.dumps({"state": [2.0, -1.0, 0.5]}))
    res = dynamics.simulate("hvac", scenarios=2, hours=2, decision=path)
    u = np.asarray(res.trajectories.column("u[open_plan]")).reshape(2, 24)
    assert res.controller == "decision:decision.json"
    ramp = domains.get("hvac:office3").ramp[0] * 5 / 60  # 8 kW per hour, over 5 minutes
    np.testing.assert_allclose(u[:, :3], [[ramp, 2 * ramp, 2.0]] * 2)  # reached within the ramp, then held
    assert np.all(u[:, 3:] == 2.0)


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e["SCF_HOME"] = str(tmp_path / "home")
    return e


def test_cli_writes_parquet_and_prints_the_metrics(tmp_path, env):
    out = tmp_path / "sim"
    r = cli("simulate", "--domain", "hvac", "--scenarios", "3", "--hours", "2", "--seed", "3", "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr
    assert "comfort_violation_kh" in r.stdout and "energy_kwh" in r.stdout
    traj, metrics = pq.read_table(out / "trajectories.parquet"), pq.read_table(out / "metrics.parquet")
    assert traj.num_rows == 3 * 24 and metrics.num_rows == 3
    meta = json.loads(metrics.schema.metadata[b"scf.simulate"])
    assert meta == {"domain": "hvac:office3", "controller": "thermostat", "scenarios": 3, "hours": 2.0, "seed": 3}
    j = cli("simulate", "--domain", "hvac:office3", "--scenarios", "3", "--hours", "2", "--seed", "3", "--out", str(out), "--json", env=env)
    doc = json.loads(j.stdout)
    assert doc["metrics"]["energy_kwh"]["mean"] == pytest.approx(float(np.mean(metrics.column("energy_kwh"))))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--domain", "grid:case300"], "unknown domain 'grid:case300': use one of grid:case9, grid:case14, grid:case30, grid:case118, grid:case5, grid:case6ww, "
         "grid:case24_ieee_rts, grid:case39, grid:case57, hvac:office3"),
        (["--domain", "hvac", "--scenarios", "0"], "--scenarios 0: simulate at least one scenario"),
        (["--domain", "hvac", "--hours", "-2"], "--hours -2.0: give a positive number of hours, at most a year (8784)"),
        (["--domain", "hvac", "--controller", "pid"], "unknown controller 'pid' for hvac:office3: use one of thermostat, off, reference"),
        (["--domain", "hvac", "--step-minutes", "0"], "--step-minutes 0: use a step between 1 second (0.0167) and 60 minutes"),
        (["--domain", "hvac", "--controller", "off", "--decision", "d.json"], "give either --controller or --decision, not both"),
        (["--domain", "hvac", "--seed", "-1"], "--seed -1: give a seed of 0 or more"),
        (["--domain", "grid:case118", "--scenarios", "100000"], "100000 scenarios x 288 steps of grid:case118 would hold about 111 GB; "
         "simulate fewer scenarios or hours (or a longer --step-minutes), in several runs with different seeds"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, env, args, message):
    r = cli("simulate", *args, "--out", str(tmp_path / "o"), env=env)
    assert r.returncode == 1
    assert r.stderr.strip() == f"Error: {message}"


def test_cli_bad_decision_files_and_out_are_one_line(tmp_path, env):
    bad = tmp_path / "bad.json"
    for body, message in [
        ("[1, 2]", f"decision file {bad} has shape [1, 2]; this domain expects 3 numbers per hour (u[open_plan], u[meeting], u[south_office]…)"),
        ('{"state": [1, "x", 2]}', f"decision file {bad} holds non-numeric values; write a list of 3 numbers"),
        ("[1, NaN, 2]", f"decision file {bad} holds NaN or infinite values; every setpoint must be a finite number"),
    ]:
        bad.write_text(body)
        r = cli("simulate", "--domain", "hvac", "--decision", str(bad), "--out", str(tmp_path / "o"), env=env)
        assert (r.returncode, r.stderr.strip()) == (1, f"Error: {message}")
    bad.write_text("{not json")
    r = cli("simulate", "--domain", "hvac", "--decision", str(bad), "--out", str(tmp_path / "o"), env=env)
    assert r.returncode == 1 and r.stderr.startswith(f"Error: decision file {bad} is not readable JSON (") and r.stderr.count("\n") == 1
    r = cli("simulate", "--domain", "hvac", "--decision", str(tmp_path / "none.json"), "--out", str(tmp_path / "o"), env=env)
    assert r.stderr.strip() == f"Error: decision file {tmp_path / 'none.json'} does not exist: give a JSON file with 3 numbers (u[open_plan], u[meeting], u[south_office]…)"
    r = cli("simulate", "--domain", "hvac", "--out", str(bad), env=env)
    assert r.stderr.strip() == f"Error: --out {bad} is a file: give a directory (it is created if missing)"
