"""M&V figures for tests whose measurements must mint but are about something else (causes,
overlaps, trust, the DLQ, restarts, benchmarks): the ledger mints only a measurement whose
baseline meets ASHRAE Guideline 14 and whose uncertainty is stated (`[ledger]
require_calibration`, on by default; docs/mv.md). One place, so no test turns the rule off
to get a mint. Tests of the rule itself build their own figures (tests/test_mv.py)."""

from __future__ import annotations

import math

from scf.bus import events as ev

# A calibration that passes Guideline 14's hourly criteria (CV(RMSE) <= 30 %, |NMBE| <= 10 %).
CALIBRATION = ev.Calibration(interval="hourly", points=48, cv_rmse=0.05, nmbe=0.01, model="test: passes ASHRAE Guideline 14")
CONFIDENCE = 0.9
FSU = 0.1  # the stated uncertainty as a fraction of the saving: well inside [ledger] max_fsu (0.5)


def uncertainty(baseline: float, actual: float) -> float:
    saved = baseline - actual
    return abs(saved) * FSU if math.isfinite(saved) else 0.0


def passing_mv(baseline: float, actual: float) -> dict:
    """`measurement_event(...)` keywords: a passing calibration and the saving's uncertainty."""
    return {"calibration": CALIBRATION, "uncertainty_kwh": uncertainty(baseline, actual), "confidence": CONFIDENCE}


def mv_fields(baseline: float, actual: float) -> dict:
    """The same figures as a meter file's fields (`<dir>/meter/*.json`)."""
    cal = CALIBRATION
    return {"calibration": {"interval": cal.interval, "points": cal.points, "cv_rmse": cal.cv_rmse, "nmbe": cal.nmbe},
            "uncertainty_kwh": uncertainty(baseline, actual), "confidence": CONFIDENCE}


def mv_options(baseline: float, actual: float) -> list[str]:
    """The same figures as `scf energy report` options."""
    cal = CALIBRATION
    return ["--cv-rmse", str(cal.cv_rmse), "--nmbe", str(cal.nmbe), "--points", str(cal.points),
            "--uncertainty", repr(uncertainty(baseline, actual)), "--confidence", str(CONFIDENCE)]
