"""Meter reporting: readings a meter bridge drops into `<dir>/meter/*.json` become signed
`energy.measured` events (signed with the node's key; the ledger mints from them). A reading
carries its M&V figures (the baseline's Guideline 14 calibration and the saving's
uncertainty, docs/mv.md) or says `"uncalibrated": true`; any other goes to meter/bad/."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from pathlib import Path
from typing import Callable

import msgspec

from scf.bus import events as ev
from scf.bus.client import Bus
from scf.bus.runner import Stopping, race, until_stopped
from scf.consumers.edge.keys import node_ids, seal
from scf.consumers.edge.store import Installed
from scf.consumers.energy import calibration_problem, finite_kwh, measurement_event

log = logging.getLogger("scf.edge")


class MeterReading(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A file a meter bridge drops into `<dir>/meter/` for the agent to report."""

    period_start: dt.datetime
    period_end: dt.datetime
    baseline_kwh: float
    actual_kwh: float
    method: str = "metered-vs-baseline"
    deployment_id: str | None = None  # default: the deployment running now
    domain: str | None = None
    meter: str = ""  # which meter of the node ("" = its main meter)
    # M&V (docs/mv.md): the baseline's calibration and the saving's uncertainty (kWh, the
    # half-width of its interval at `confidence`); or `uncalibrated: true` for a plain
    # reading, minted only by a ledger with `[ledger] require_calibration = false`.
    calibration: ev.Calibration | None = None
    uncertainty_kwh: float | None = None
    confidence: float = 0.9
    uncalibrated: bool = False


def reading_problem(reading: MeterReading) -> str | None:
    """Why a meter file is not reported, or None."""
    for name, value in (("baseline_kwh", reading.baseline_kwh), ("actual_kwh", reading.actual_kwh)):
        if (problem := finite_kwh(name, value)) is not None:
            return problem
    if reading.uncalibrated:
        if reading.calibration is not None or reading.uncertainty_kwh is not None:
            return "uncalibrated: true with a calibration or uncertainty_kwh: give the M&V figures or uncalibrated, not both"
        return None
    if reading.calibration is None and reading.uncertainty_kwh is None:
        return ("no M&V figures: give calibration {interval, points, cv_rmse, nmbe} and uncertainty_kwh (docs/mv.md), "
                'or "uncalibrated": true for a ledger that sets [ledger] require_calibration = false')
    return calibration_problem(reading.calibration, reading.uncertainty_kwh, reading.confidence)


class MeterReporter:
    """Sends the readings in `<dir>/meter/`; `running()` says what runs now (a reading's
    default deployment and domain)."""

    def __init__(self, bus: Bus, node: str, directory: Path, running: Callable[[], Installed | None], *,
                 labels: dict[str, str] | None = None, poll_s: float = 2.0) -> None:
        self.bus, self.node, self.dir = bus, node, Path(directory) / "meter"
        self.running = running
        self.labels = dict(labels or {})
        self.poll_s = poll_s
        self.ids = node_ids(bus.key)  # measurement ids keyed with the node's secret (keys.seal)

    async def report_files(self, stop: asyncio.Event | None = None) -> int:
        """Publish every reading in `<dir>/meter/*.json` as a signed energy.measured; the
        file moves to meter/sent/ (or meter/bad/ when unreadable, out of range or without
        passing M&V figures, with the reason in the log). Returns how many were sent.
        Each publish (its acknowledgement: 5 s with the server away) ends at `stop`
        (`Stopping` raised): that reading stays in meter/ and is sent by the next run (its
        id is derived: a reading the server did store is not stored twice)."""
        if self.bus.key is None:
            return 0
        sent = 0
        for path in sorted(self.dir.glob("*.json")):
            try:
                reading = msgspec.json.decode(path.read_bytes(), type=MeterReading)
            except (OSError, msgspec.DecodeError) as exc:
                log.error("%s: meter file %s is unreadable (%s): moved to meter/bad/", self.node, path, exc)
                _move(path, self.dir / "bad")
                continue
            cur = self.running()
            try:
                if (problem := reading_problem(reading)) is not None:
                    raise ValueError(problem)
                event = measurement_event(
                    self.node,
                    period_start=reading.period_start,
                    period_end=reading.period_end,
                    baseline_kwh=reading.baseline_kwh,
                    actual_kwh=reading.actual_kwh,
                    method=reading.method,
                    deployment_id=reading.deployment_id or (cur.deployment_id if cur else None),
                    domain=reading.domain or (cur.domain if cur else self.labels.get("domain", "")),
                    meter=reading.meter,
                    source=self.bus.source,
                    calibration=reading.calibration,
                    uncertainty_kwh=reading.uncertainty_kwh,
                    confidence=reading.confidence if reading.calibration is not None else 0.0,
                )
            except ValueError as exc:  # a non-finite or absurd reading, or no M&V figures: never reported
                log.error("%s: meter file %s: %s: moved to meter/bad/", self.node, path, exc)
                _move(path, self.dir / "bad")
                continue
            await until_stopped(self.bus.publish(seal(self.ids, event)), stop)
            _move(path, self.dir / "sent")
            sent += 1
        return sent

    async def loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.report_files(stop)
            except Stopping:
                log.info("%s: stopped while reporting meter readings: the rest are sent by the next run", self.node)
                break
            except Exception as exc:  # noqa: BLE001 - a reading stays in meter/ and is sent next round
                log.warning("%s: reporting meter readings failed (will retry): %s", self.node, exc)
            await race(asyncio.sleep(self.poll_s), stop)


def _move(path: Path, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    os.replace(path, directory / path.name)
