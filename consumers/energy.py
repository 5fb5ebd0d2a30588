"""Energy measurements: what a saving *is*, independent of how a node spells it.

A measurement claims that node N's meter M saved energy over the half-open period
[start, end). The same claim can be written many ways — `10:00Z` or `11:00+01:00`, method
`Metered-vs-Baseline` or `metered-vs-baseline`, any envelope or measurement id — so the
ledger never trusts an id a node supplies: it derives the *cause* from the normalised
content (`normalise`, `cause_id`), and the node's agent derives its `measurement_id`
with the same function, so an honest node's id is the cause.

* node: as given (the ledger requires it to be the signing key's trust-list name);
* meter: stripped, case-folded, `main` when empty;
* period: UTC integer microseconds since the epoch (a time without offset is UTC);
* method: whitespace collapsed, case-folded (part of the content digest, not the cause:
  two methods over one period are two claims on the same energy).

`finite_kwh` is the one check for an energy value coming from outside (CLI, meter files).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import uuid
from dataclasses import dataclass

import msgspec

from scf.bus import events as ev
from scf.bus.ids import derived_id, uuid5

UTC = dt.timezone.utc
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
DEFAULT_METER = "main"
MAX_KWH = 1e12  # anything larger in one reading is a typo or an attack, whatever the site
# Public on purpose: a cause is content identity (node and ledger must agree on it), not an
# effect id. Only services may write the ledger's subjects (nats/users.conf).
CAUSE_NAMESPACE = uuid.UUID("3c0d5c1e-7f0b-5e57-a0c8-2d1f6a0e9b42")


def utc_micros(t: dt.datetime) -> int:
    """`t` as integer microseconds since the epoch, UTC (a naive time is taken as UTC)."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return (t - EPOCH) // dt.timedelta(microseconds=1)


def from_micros(us: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=us)


def iso_micros(us: int) -> str:
    return from_micros(us).isoformat().replace("+00:00", "Z")


def norm_meter(meter: str) -> str:
    return " ".join(meter.split()).casefold() or DEFAULT_METER


def norm_method(method: str) -> str:
    return " ".join(method.split()).casefold()


@dataclass(frozen=True)
class Cause:
    """The normalised identity of a measurement."""

    node: str
    meter: str
    start_us: int
    end_us: int

    @property
    def key(self) -> tuple[str, str]:
        return (self.node, self.meter)

    @property
    def id(self) -> str:
        return cause_id(self.node, self.meter, self.start_us, self.end_us)

    def period(self) -> str:
        return f"[{iso_micros(self.start_us)}, {iso_micros(self.end_us)})"


def cause_id(node: str, meter: str, start_us: int, end_us: int) -> str:
    return uuid5(CAUSE_NAMESPACE, "\x1f".join(["energy.cause", node, meter, str(start_us), str(end_us)]))


def normalise(m: ev.Measurement) -> Cause:
    return Cause(m.node, norm_meter(m.meter), utc_micros(m.period_start), utc_micros(m.period_end))


def content_digest(m: ev.Measurement, cause: Cause | None = None) -> str:
    """sha256 over the normalised content (cause, readings, method, deployment, domain):
    tells a true repeat (however spelled) from a changed claim for the same cause.
    `cause`: `normalise(m)`, when the caller has it already."""
    c = cause or normalise(m)
    canon = msgspec.json.encode(
        [c.node, c.meter, c.start_us, c.end_us, repr(float(m.baseline_kwh)), repr(float(m.actual_kwh)),
         norm_method(m.method), m.deployment_id, m.domain]
    )
    return "sha256:" + hashlib.sha256(canon).hexdigest()


def finite_kwh(name: str, value: float) -> str | None:
    """Why `value` is not a usable energy reading in kWh, or None."""
    if not math.isfinite(value):
        return f"{name} is {value}: not a finite number of kWh"
    if value < 0:
        return f"{name} is negative ({value} kWh)"
    if value > MAX_KWH:
        return f"{name} is {value:g} kWh: absurd for one reading (above {MAX_KWH:g})"
    return None


# The fix named when a measurement states no calibration (docs/mv.md, docs/ledger.md).
NO_CALIBRATION = (
    "no calibration stated: a saving is minted only against a baseline model calibrated to the site's "
    "measured history (IPMVP Option D, ASHRAE Guideline 14 CV(RMSE) and NMBE; docs/mv.md): report the "
    "calibration and the saving's uncertainty (scf energy report --cv-rmse --nmbe --points --uncertainty; a "
    "meter file's calibration and uncertainty_kwh), or set [ledger] require_calibration = false to accept "
    "uncalibrated readings (not IPMVP Option D)"
)


def calibration_problem(cal: ev.Calibration | None, uncertainty_kwh: float | None, confidence: float) -> str | None:
    """Why a measurement's M&V figures fail (docs/mv.md), or None: a calibration must be
    stated and meet ASHRAE Guideline 14 for its interval, and the saving's uncertainty must
    be stated at a confidence of at least 68 %. (The ledger also bounds the uncertainty by
    `[ledger] max_fsu` of the saving.) One check for the ledger, `scf energy report` and
    meter files."""
    from scf.domains.mv import g14_problem

    if cal is None:
        return NO_CALIBRATION
    if (problem := g14_problem(cal.interval, cal.cv_rmse, cal.nmbe, cal.points)) is not None:
        return problem
    u = uncertainty_kwh
    if u is None or not math.isfinite(u) or u < 0:
        return f"the saving's uncertainty is not stated (uncertainty_kwh {u}): report ASHRAE Guideline 14's fractional savings uncertainty"
    if not (0.68 <= confidence < 1.0):
        return f"the uncertainty's confidence level {confidence} is not stated or below 68 %: state it (e.g. 0.9)"
    return None


# --------------------------------------------------------------------------- the node's side


def measurement_id(node: str, period_start: dt.datetime, period_end: dt.datetime, method: str = "", meter: str = "") -> str:
    """The cause of a measurement: one per (node, meter, period), however the times are
    written. (`method` is accepted for old callers; it is not part of the cause.)"""
    return cause_id(node, norm_meter(meter), utc_micros(period_start), utc_micros(period_end))


def measurement_event(
    node: str,
    *,
    period_start: dt.datetime,
    period_end: dt.datetime,
    baseline_kwh: float,
    actual_kwh: float,
    method: str,
    deployment_id: str | None = None,
    domain: str = "",
    meter: str = "",
    source: str,
    calibration: ev.Calibration | None = None,
    uncertainty_kwh: float | None = None,
    confidence: float = 0.0,
    unit: str = "",
) -> ev.EnergyMeasured:
    """An `energy.measured` for the node to sign, its times in UTC and its id the cause.
    (It builds what it is given; callers check readings from outside with `finite_kwh`.)"""
    start = period_start if period_start.tzinfo else period_start.replace(tzinfo=UTC)
    end = period_end if period_end.tzinfo else period_end.replace(tzinfo=UTC)
    mid = measurement_id(node, start, end, meter=meter)
    return ev.EnergyMeasured.new(
        ev.Measurement(
            measurement_id=mid,
            node=node,
            deployment_id=deployment_id,
            period_start=start.astimezone(UTC),
            period_end=end.astimezone(UTC),
            baseline_kwh=float(baseline_kwh),
            actual_kwh=float(actual_kwh),
            method=method,
            domain=domain,
            meter=norm_meter(meter),
            calibration=calibration,
            uncertainty_kwh=uncertainty_kwh,
            confidence=confidence,
            unit=unit,
        ),
        source=source,
        id=derived_id("energy.measured.event", mid),
    )
