"""Measurement and verification (M&V): IPMVP Option D, calibrated simulation.

A saving is the energy measured over a reporting period under the deployed decision,
against the energy the *baseline* (the status-quo controller) would have used over the same
period, with the same measured disturbances, as simulated by a model of the site that was
first calibrated to the site's measured history (IPMVP Core Concepts 2016, Option D;
EVO 10000-1:2016). Before a saving is reported the calibrated model must meet ASHRAE
Guideline 14-2014's calibration criteria for whole-building calibrated simulation:

    hourly data:   CV(RMSE) <= 30 %, NMBE within +-10 %
    monthly data:  CV(RMSE) <= 15 %, NMBE within +-5 %

with (Guideline 14-2014, the statistical indices of its Annex B; p = 1 for a calibrated
simulation, whose parameters are not regression coefficients of the data compared):

    CV(RMSE) = sqrt( sum (y_i - yhat_i)^2 / (n - p) ) / ybar
    NMBE     = sum (y_i - yhat_i) / ((n - p) ybar)

and the uncertainty of the saving is stated with Guideline 14's fractional savings
uncertainty (Guideline 14-2014 Annex B; T. A. Reddy and D. E. Claridge, "Uncertainty of
'measured' energy savings from statistical baseline models", HVAC&R Research 6(1), 3–20,
2000):

    dE_save / E_save = 1.26 t CV sqrt( (n / n') (1 + 2 / n') (1 / m) ) / F

n baseline (calibration) points, n' = n (1 - rho) / (1 + rho) their effective number
(rho: the lag-1 autocorrelation of the calibration residuals), m points in the reporting
period, F = E_save / E_baseline over the reporting period, t Student's t at the confidence
level with n - p degrees of freedom. The 1.26 is the Guideline's empirical correction,
derived for monthly data; at hourly resolution the formula is known to misstate the
uncertainty (the residuals are far from the iid the derivation assumes, which n' corrects
only in part) — docs/mv.md says so. Pure functions: numpy and scipy (scipy for t and the
least-squares calibration), no process code.

The HVAC baseline model (`calibrate_hvac`, `counterfactual_hvac`): the RC network of the
domain (domains/hvac_dynamics.py) with three calibration parameters — the envelope
conductance, the internal gains and the equipment efficiency, each a factor on the
domain's nominal value — fitted by bounded least squares (scipy.optimize.least_squares)
to the measured energy of the history, simulated under the controller that ran then, over
the disturbances measured then, from the zone temperatures measured at its start.

The grid baseline model (`calibrate_grid`, `counterfactual_grid`): a dispatch plant's
measured quantity is the fuel its units burn (kWh of fuel); the model is the status-quo
dispatch over the measured loads and outages with the case's cost curves read as fuel
curves, two factors (`heat_rate`, `no_load`) fitted by bounded linear least squares to
the measured hourly fuel (docs/mv.md, "Grid sites").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from scf.domains.base import DomainError

# Guideline 14-2014, calibrated simulation: (max CV(RMSE), max |NMBE|) by data interval
G14_LIMITS: dict[str, tuple[float, float]] = {"hourly": (0.30, 0.10), "monthly": (0.15, 0.05)}
FSU_CORRECTION = 1.26  # Guideline 14 / Reddy & Claridge 2000: empirical factor (monthly models)
METHOD = "ipmvp-option-d calibrated-simulation (ashrae-g14)"
PARAMETERS = ("envelope_ua", "internal_gains", "efficiency")
BOUNDS = (0.4, 2.5)  # each calibration factor stays within this range of nominal


class MVError(DomainError):
    """M&V input that cannot be used: the message names the problem and the fix."""


# --------------------------------------------------------------------------- statistics


def _pair(measured, modelled) -> tuple[np.ndarray, np.ndarray]:
    y, yhat = np.asarray(measured, dtype=float).ravel(), np.asarray(modelled, dtype=float).ravel()
    if y.shape != yhat.shape:
        raise MVError(f"measured ({y.size}) and modelled ({yhat.size}) series differ in length: compare the same intervals")
    if y.size < 2:
        raise MVError(f"{y.size} interval(s) of data: calibration needs at least 2")
    if not (np.isfinite(y).all() and np.isfinite(yhat).all()):
        raise MVError("a measured or modelled value is NaN or infinite: drop or repair those intervals first")
    if y.mean() <= 0:
        raise MVError(f"the measured mean is {y.mean():g}: CV(RMSE) and NMBE need a positive mean consumption")
    return y, yhat


def cv_rmse(measured, modelled, p: int = 1) -> float:
    """Coefficient of variation of the RMSE, a fraction (Guideline 14; p = 1 for calibrated simulation)."""
    y, yhat = _pair(measured, modelled)
    return float(math.sqrt(((y - yhat) ** 2).sum() / (y.size - p)) / y.mean())


def nmbe(measured, modelled, p: int = 1) -> float:
    """Normalised mean bias error, a signed fraction: positive when the model under-predicts."""
    y, yhat = _pair(measured, modelled)
    return float((y - yhat).sum() / ((y.size - p) * y.mean()))


def lag1_autocorrelation(residuals) -> float:
    r = np.asarray(residuals, dtype=float).ravel()
    r = r - r.mean()
    den = float((r * r).sum())
    return 0.0 if den == 0.0 or r.size < 3 else float((r[1:] * r[:-1]).sum() / den)


def effective_points(n: int, rho: float) -> float:
    """n' = n (1 - rho) / (1 + rho), within [1, n] (no credit for negative autocorrelation)."""
    rho = min(max(rho, 0.0), 0.999)
    return max(1.0, n * (1.0 - rho) / (1.0 + rho))


def student_t(confidence: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2.0, max(1, dof)))


def fractional_savings_uncertainty(cv: float, n: int, n_eff: float, m: int, fraction: float, *, confidence: float = 0.9, p: int = 1) -> float:
    """Guideline 14's dE_save / E_save (module doc); inf when nothing was saved."""
    if fraction <= 0:
        return math.inf
    return FSU_CORRECTION * student_t(confidence, n - p) * cv * math.sqrt((n / n_eff) * (1.0 + 2.0 / n_eff) / m) / fraction


@dataclass(frozen=True)
class Calibration:
    """How well the baseline model reproduces the site's measured history."""

    interval: str  # "hourly" | "monthly"
    points: int
    cv_rmse: float
    nmbe: float
    rho: float  # lag-1 autocorrelation of the residuals
    parameters: dict[str, float]
    model: str

    def problem(self) -> str | None:
        """Why this calibration fails Guideline 14, or None."""
        return g14_problem(self.interval, self.cv_rmse, self.nmbe, self.points)


def g14_problem(interval: str, cv: float, bias: float, points: int = 0) -> str | None:
    """Why (interval, CV(RMSE), NMBE) fails ASHRAE Guideline 14's calibrated-simulation
    criteria, or None. One line naming the figure and the limit."""
    if interval not in G14_LIMITS:
        return f"calibration interval {interval!r} has no Guideline 14 criterion: use one of {', '.join(G14_LIMITS)}"
    if not (math.isfinite(cv) and math.isfinite(bias)):
        return f"calibration figures are not finite (CV(RMSE) {cv}, NMBE {bias})"
    max_cv, max_bias = G14_LIMITS[interval]
    if cv > max_cv:
        return f"baseline model not calibrated: {interval} CV(RMSE) {cv:.1%} above ASHRAE Guideline 14's {max_cv:.0%} ({points} points)"
    if abs(bias) > max_bias:
        return f"baseline model not calibrated: {interval} NMBE {bias:+.1%} outside ASHRAE Guideline 14's ±{max_bias:.0%} ({points} points)"
    return None


def hourly(values: np.ndarray, per_hour: int) -> np.ndarray:
    """Sums of `per_hour` consecutive step values (a trailing partial hour is dropped)."""
    v = np.asarray(values, dtype=float)
    h = v.size // per_hour
    return v[: h * per_hour].reshape(h, per_hour).sum(1)


# --------------------------------------------------------------------------- the HVAC baseline model


@dataclass(frozen=True)
class HvacHistory:
    """A measured stretch of an HVAC site: the disturbances at the K + 1 step boundaries,
    the zone temperatures at the start, and the electric energy of each of the K steps."""

    dt_h: float
    start_hour: float
    t_out: np.ndarray  # (K + 1,) °C
    occupancy: np.ndarray  # (K + 1, z)
    clearness: np.ndarray  # (K + 1,)
    t_zone0: np.ndarray  # (z,) °C
    energy_kwh: np.ndarray  # (K,) measured, electric

    @property
    def steps(self) -> int:
        return int(self.energy_kwh.size)

    def disturbances(self):
        from scf.domains.hvac_dynamics import HvacDisturbances

        return HvacDisturbances(self.dt_h, self.start_hour, self.t_out[None, :], self.occupancy[None, :, :], self.clearness[None, :])


def calibrated_domain(domain, factors: dict[str, float]):
    """The domain with the calibration factors applied (a new HvacDomain)."""
    from scf.domains.hvac import HvacDomain

    b = domain.building
    ua, gains, eff = (float(factors.get(k, 1.0)) for k in PARAMETERS)
    nb = dataclasses.replace(
        b,
        r_out_k_per_kw=tuple(r / ua for r in b.r_out_k_per_kw),
        occupancy_gain_kw=tuple(g * gains for g in b.occupancy_gain_kw),
        solar_gain_kw=tuple(g * gains for g in b.solar_gain_kw),
        cop_heat=b.cop_heat * eff,
        cop_cool=b.cop_cool * eff,
    )
    return HvacDomain(nb, domain.name)


def simulate_hvac(domain, history: HvacHistory, controller: str = "thermostat", factors: dict[str, float] | None = None) -> np.ndarray:
    """Electric energy per step (K,) of the (calibrated) model under `controller` over the
    history's measured disturbances, from its measured start temperatures."""
    from scf.domains.hvac_dynamics import CONTROLLERS, HvacPlant, run_plant

    if controller not in CONTROLLERS:
        raise MVError(f"unknown baseline controller {controller!r}: use one of {', '.join(CONTROLLERS)}")
    d = calibrated_domain(domain, factors or {})
    plant = HvacPlant(d, history.dt_h)
    run = run_plant(plant, history.disturbances(), CONTROLLERS[controller](plant), history.t_zone0[None, :])
    return run.power_kw[0] * history.dt_h


def calibrate_hvac(domain, history: HvacHistory, controller: str = "thermostat", *, fit: bool = True,
                   factors: dict[str, float] | None = None) -> Calibration:
    """Fit the three factors (bounded least squares on hourly energy) and report Guideline
    14's figures for the fitted model; `fit=False` scores `factors` (default nominal) as given."""
    per_hour = max(1, round(1.0 / history.dt_h))
    y = hourly(history.energy_kwh, per_hour)
    if y.size < 24:
        raise MVError(f"{y.size} hours of measured history: calibration needs at least 24 (run the status-quo controller longer)")
    if y.mean() <= 0:
        raise MVError("the measured history used no energy: nothing to calibrate a baseline against")
    x0 = np.array([float((factors or {}).get(k, 1.0)) for k in PARAMETERS])

    def model(x: np.ndarray) -> np.ndarray:
        return hourly(simulate_hvac(domain, history, controller, dict(zip(PARAMETERS, x))), per_hour)

    if fit:
        from scipy.optimize import least_squares

        sol = least_squares(lambda x: model(x) - y, x0, bounds=([BOUNDS[0]] * 3, [BOUNDS[1]] * 3), diff_step=1e-3,
                            x_scale=1.0, max_nfev=60)
        x = sol.x
    else:
        x = x0
    yhat = model(x)
    return Calibration(
        interval="hourly",
        points=int(y.size),
        cv_rmse=cv_rmse(y, yhat),
        nmbe=nmbe(y, yhat),
        rho=lag1_autocorrelation(y - yhat),
        parameters={k: float(v) for k, v in zip(PARAMETERS, x)},
        model=f"{domain.name} RC network under {controller}, factors fitted to {y.size} measured hours" if fit
        else f"{domain.name} RC network under {controller}, factors as given (not fitted)",
    )


@dataclass(frozen=True)
class Saving:
    """An Option D saving over a reporting period, with its Guideline 14 uncertainty."""

    baseline_kwh: float  # the calibrated model under the status-quo controller, same disturbances
    actual_kwh: float  # measured
    saved_kwh: float
    fraction: float  # saved / baseline
    fsu: float  # fractional savings uncertainty at `confidence`
    uncertainty_kwh: float  # fsu * saved: the half-width of the interval at `confidence`
    confidence: float
    reporting_points: int  # m (hours)
    calibration: Calibration

    def problem(self) -> str | None:
        return self.calibration.problem()


def counterfactual_hvac(domain, calibration: Calibration, period: HvacHistory, controller: str = "thermostat",
                        *, confidence: float = 0.9) -> Saving:
    """The saving of `period` (measured under the deployed decision) against the calibrated
    baseline under `controller`, simulated over the period's measured disturbances."""
    base = simulate_hvac(domain, period, controller, calibration.parameters)
    baseline, actual = float(base.sum()), float(np.asarray(period.energy_kwh, float).sum())
    saved = baseline - actual
    m = max(1, round(period.steps * period.dt_h))
    fraction = saved / baseline if baseline > 0 else 0.0
    n = calibration.points
    fsu = fractional_savings_uncertainty(calibration.cv_rmse, n, effective_points(n, calibration.rho), m, fraction,
                                         confidence=confidence)
    unc = fsu * saved if math.isfinite(fsu) else math.inf
    return Saving(baseline, actual, saved, fraction, fsu, unc, confidence, m, calibration)


# --------------------------------------------------------------------------- the grid (dispatch) baseline model
#
# A dispatch plant's measured quantity is the fuel its units burn (kWh of fuel, thermal:
# the fuel meters' increments), not electricity: the electricity is the demand, the same
# under any dispatch. The baseline model is the site's units under the status-quo dispatch
# (`prorata`, domains/grid_dynamics.py) over the measured loads and outages, with the
# site's fuel curves: the case's cost curves read as heat-rate curves at the site's fuel
# price, times two calibrated factors (`heat_rate` on the variable fuel, `no_load` on the
# running units' no-load fuel), fitted to the measured hourly fuel. Guideline 14's hourly
# criteria are applied to that fuel energy as to any energy model (docs/mv.md).

GRID_METHOD = "ipmvp-option-d calibrated-simulation (ashrae-g14): fuel energy of the dispatch"
GRID_PARAMETERS = ("heat_rate", "no_load")


@dataclass(frozen=True)
class GridHistory:
    """A measured stretch of a grid site: the telemetry at K + 1 step boundaries (loads and
    availability at each, the dispatch at the first) and the fuel metered over each step."""

    dt_h: float
    loads: np.ndarray  # (K + 1, L) MW, measured
    available: np.ndarray  # (K + 1, G) bool: in service for the step that starts there
    pg0: np.ndarray  # (G,) MW applied at the start
    fuel_kwh: np.ndarray  # (K,) measured, kWh of fuel
    fuel_price: float  # USD per MWh of fuel, as the site reports it

    @property
    def steps(self) -> int:
        return int(self.fuel_kwh.size)


def simulate_grid_parts(domain, history: GridHistory) -> tuple[np.ndarray, np.ndarray]:
    """(variable, no-load) fuel per step (K,), kWh, of the nominal fuel curves under the
    status-quo dispatch over the history's measured loads and outages, from its measured
    start: the model is linear in the two factors."""
    from scf.domains.grid_dynamics import GridPlant, agc_step, fuel_rates, status_quo_setpoint

    plant = GridPlant(domain, history.dt_h)
    pg = np.asarray(history.pg0, dtype=float)
    var, nl = np.zeros(history.steps), np.zeros(history.steps)
    for k in range(history.steps):
        avail = history.available[k]
        sp = status_quo_setpoint(plant, pg, avail, history.loads[k])
        pg = agc_step(plant, pg, avail, sp, history.loads[k + 1])
        v, n = fuel_rates(domain, pg, None, history.fuel_price)
        var[k], nl[k] = 1000.0 * history.dt_h * v, 1000.0 * history.dt_h * n
    return var, nl


def calibrate_grid(domain, history: GridHistory, *, fit: bool = True, factors: dict[str, float] | None = None) -> Calibration:
    """Fit `heat_rate` and `no_load` (bounded linear least squares on hourly fuel) and report
    Guideline 14's figures; `fit=False` scores `factors` (default nominal) as given."""
    per_hour = max(1, round(1.0 / history.dt_h))
    y = hourly(history.fuel_kwh, per_hour)
    if y.size < 24:
        raise MVError(f"{y.size} hours of measured history: calibration needs at least 24 (run the status-quo dispatch longer)")
    if y.mean() <= 0:
        raise MVError("the measured history burned no fuel: nothing to calibrate a baseline against")
    var, nl = (hourly(x, per_hour) for x in simulate_grid_parts(domain, history))
    if fit:
        from scipy.optimize import lsq_linear

        x = lsq_linear(np.stack([var, nl], 1), y, bounds=([BOUNDS[0]] * 2, [BOUNDS[1]] * 2)).x
    else:
        x = np.array([float((factors or {}).get(k, 1.0)) for k in GRID_PARAMETERS])
    yhat = x[0] * var + x[1] * nl
    return Calibration(
        interval="hourly",
        points=int(y.size),
        cv_rmse=cv_rmse(y, yhat),
        nmbe=nmbe(y, yhat),
        rho=lag1_autocorrelation(y - yhat),
        parameters={k: float(v) for k, v in zip(GRID_PARAMETERS, x)},
        model=f"{domain.name} units under prorata dispatch, fuel curves' factors fitted to {y.size} measured hours of fuel" if fit
        else f"{domain.name} units under prorata dispatch, fuel curves' factors as given (not fitted)",
    )


def counterfactual_grid(domain, calibration: Calibration, period: GridHistory, *, confidence: float = 0.9) -> Saving:
    """The fuel saved over `period` (measured under the deployed dispatch) against the
    calibrated status-quo dispatch over the period's measured loads and outages (kWh of fuel)."""
    var, nl = simulate_grid_parts(domain, period)
    p = calibration.parameters
    baseline = float((p.get("heat_rate", 1.0) * var + p.get("no_load", 1.0) * nl).sum())
    actual = float(np.asarray(period.fuel_kwh, float).sum())
    saved = baseline - actual
    m = max(1, round(period.steps * period.dt_h))
    fraction = saved / baseline if baseline > 0 else 0.0
    n = calibration.points
    fsu = fractional_savings_uncertainty(calibration.cv_rmse, n, effective_points(n, calibration.rho), m, fraction, confidence=confidence)
    unc = fsu * saved if math.isfinite(fsu) else math.inf
    return Saving(baseline, actual, saved, fraction, fsu, unc, confidence, m, calibration)
