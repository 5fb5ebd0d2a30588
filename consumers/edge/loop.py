"""The control cycle both plant loops run (docs/plants.md): one home for the mechanism of
consumers/edge/control.py (HVAC) and consumers/edge/grid_control.py (grid).

Every control period `step` records the telemetry, lets the monitor judge the running
model (a breach reverts at once: `deploy.rolled_back`, the checkpoint remembered in
`<dir>/control/breached.json` and never run again on this node), closes a measured period
when one is due (IPMVP Option D), follows what is installed, decides, and hands back the
setpoint message; `run` reads the plant, refuses telemetry it cannot act on (one line) and
writes the setpoints until the plant ends.

A domain's loop subclasses `ControlCycle` and supplies the domain's part: how a period
starts (`_begin`), its record type, which checkpoint runs (`running`, `active_name`), the
monitor on live telemetry (`observe`), following the installed model (`_follow`), the
status quo's and the model's decisions (`decide_status_quo`, `decide_model`), the envelope
check of a model's setpoints (`envelope_problem`; a breach, or a `decision_error`, reverts),
falling back after a breach (`_fall_back`), the setpoint message (`setpoint`), the telemetry check
(`telemetry_problem`) and the measurement (`measure`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np

from scf.bus import events as ev
from scf.bus.ids import derived_id
from scf.consumers.edge.plant import PlantEnded, PlantError
from scf.consumers.edge.store import MODEL_FILE, Installed

Publish = Callable[[ev.Event], Awaitable[object]]


class ControlCycle:
    """The shared control cycle (module doc). Subclasses set `log`, `status_quo_name`,
    `record_type`, `loop_name`, `telemetry_name` and `decision_error`, and implement the
    domain hooks."""

    log: logging.Logger
    status_quo_name: str
    record_type: type
    loop_name = "control loop"  # "…: the <loop_name> stops"
    telemetry_name = "telemetry"  # "…: <telemetry_name> seq N refused: …"
    decision_error: type[Exception] = PlantError  # a decision that cannot be made: a breach

    def _init_cycle(self, plant, node: str, directory: Path, settings, *, current: Callable[[], Installed | None],
                    previous: Callable[[Installed | None], Installed | None], publish: Publish | None, source: str,
                    model_path: Callable[[Installed], Path] | None) -> None:
        """The state every loop keeps: the plant, the node, what is installed, the records,
        the events, the measurements and the breached checkpoints."""
        self.plant, self.node, self.settings = plant, node, settings
        self.dir = Path(directory) / "control"
        self.current, self.previous, self.publish, self.source = current, previous, publish, source or f"edge:{node}"
        self.model_path = model_path or (lambda item: Path(directory) / "versions" / item.dirname / MODEL_FILE)
        self.records: list = []
        self.events: list[ev.Event] = []
        self.measured: list[ev.Measurement] = []
        self.calibration = None
        self.dt_h = 0.0
        self.last_seq = -1
        self._report_from: int | None = None  # index into records where the running model's unreported steps start

    # ------------------------------------------------------------------ the domain's part
    @property
    def running(self) -> Installed | None:  # pragma: no cover - interface
        """The deployed checkpoint that decides now (None: the status quo)."""
        raise NotImplementedError

    @property
    def active_name(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def _begin(self, tel) -> None:  # pragma: no cover - interface
        """Before the first period: the control period and the domain's controllers."""
        raise NotImplementedError

    def observe(self, tel) -> str | None:  # pragma: no cover - interface
        """Why the live telemetry breaches the running model's envelope, or None."""
        raise NotImplementedError

    def _follow(self) -> list[ev.Event]:  # pragma: no cover - interface
        """Pass control to the model installed now (or its fallback); the events that closes."""
        raise NotImplementedError

    def decide_status_quo(self, tel) -> np.ndarray:  # pragma: no cover - interface
        """The site's previous controller's setpoints."""
        raise NotImplementedError

    def decide_model(self, tel) -> np.ndarray:  # pragma: no cover - interface
        """The running model's setpoints (`decision_error` when it cannot decide)."""
        raise NotImplementedError

    def envelope_problem(self, u: np.ndarray, tel) -> str | None:  # pragma: no cover - interface
        """Why the running model's setpoints `u` break the envelope, or None."""
        raise NotImplementedError

    def _fall_back(self, bad: Installed) -> str:  # pragma: no cover - interface
        """After `bad` breached: pass control to the previous controller; its name."""
        raise NotImplementedError

    def setpoint(self, tel, u: np.ndarray) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def telemetry_problem(self, tel) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError

    def measure(self, start: int, end: int) -> ev.EnergyMeasured:  # pragma: no cover - interface
        raise NotImplementedError

    async def _may_act(self, stop: asyncio.Event) -> bool:
        """Whether to act on the telemetry in hand (False: `stop` came first)."""
        return True

    # ------------------------------------------------------------------ state on disk
    def _load_breached(self) -> dict[str, str]:
        try:
            return dict(json.loads((self.dir / "breached.json").read_text()))
        except (OSError, ValueError, TypeError):
            return {}

    def _save_breached(self) -> None:
        tmp = self.dir / "breached.json.tmp"
        tmp.write_text(json.dumps(self.breached, indent=1))
        tmp.replace(self.dir / "breached.json")

    # ------------------------------------------------------------------ revert
    async def _revert(self, reason: str, tel) -> list[ev.Event]:
        """Breach: back to the previous controller at once; report why."""
        bad = self.running
        assert bad is not None
        self.breached[bad.checkpoint_id] = reason
        self._save_breached()
        out = self._close_period(len(self.records) - 1, cut=True)
        to = self._fall_back(bad)
        self.log.warning("%s: envelope breach by %s at %s: %s; reverted to %s", self.node, bad.checkpoint_id, tel.time.isoformat(), reason, to)
        event = ev.DeployRolledBack.new(
            ev.Rollback(node=self.node, from_checkpoint_id=bad.checkpoint_id, to_checkpoint_id=to,
                        reason=f"envelope breach: {reason}", deployment_id=bad.deployment_id),
            source=self.source,
            id=derived_id("control.revert", self.node, bad.checkpoint_id),
        )
        return [event, *out]

    # ------------------------------------------------------------------ M&V
    def _history_steps(self) -> int:
        """The status-quo steps before the first model ran (the baseline history)."""
        return next((i for i, r in enumerate(self.records[1:], 1) if r.controller != self.status_quo_name), len(self.records)) - 1

    def _history_ready(self) -> bool:
        return self._history_steps() * self.dt_h >= self.settings.min_history_hours - 1e-9

    def _close_period(self, end: int, cut: bool = False) -> list[ev.Event]:
        """Measure the running model's steps records[_report_from+1 .. end] (when at least
        an hour, or a full reporting period)."""
        start = self._report_from
        if start is None or end <= start:
            return []
        hours = (end - start) * self.dt_h
        if hours < max(1.0, self.dt_h) - 1e-9 or (not cut and hours < self.settings.report_hours - 1e-9):
            return []
        self._report_from = end if not cut else None
        return [self.measure(start, end)]

    # ------------------------------------------------------------------ one period
    def _decision(self, tel) -> np.ndarray:
        return self.decide_model(tel) if self.running is not None else self.decide_status_quo(tel)

    async def _decide(self, tel, out: list[ev.Event]) -> np.ndarray:
        """The setpoints for this period: a model's within the envelope, else it is reverted
        (the events added to `out`) and the fallback decides."""
        try:
            u = self._decision(tel)
            why = self.envelope_problem(u, tel) if self.running is not None else None
        except self.decision_error as exc:
            why = str(exc)
        if why is not None:
            out += await self._revert(why, tel)
            u = self._decision(tel)
        return u

    async def _emit(self, out: list[ev.Event]) -> None:
        for event in out:
            self.events.append(event)
            if self.publish is not None:
                await self.publish(event)

    async def step(self, tel):
        """One control period: record, monitor, follow, decide, check, and the setpoint to write."""
        self._begin(tel)
        out: list[ev.Event] = []
        dep = self.running.deployment_id if self.running is not None else None
        self.records.append(self.record_type(tel, self.active_name if len(self.records) else self.status_quo_name, dep))
        if self.running is not None:
            if (why := self.observe(tel)) is not None:
                out += await self._revert(why, tel)
            else:
                out += self._close_period(len(self.records) - 1)
        out += self._follow()
        u = await self._decide(tel, out)
        await self._emit(out)
        return self.setpoint(tel, u)

    async def finish(self) -> None:
        """The plant ended: measure the running model's last period (an hour or more)."""
        if self.running is not None and self.records:
            await self._emit(self._close_period(len(self.records) - 1, cut=True))

    async def run(self, stop: asyncio.Event | None = None) -> int:
        """Until the plant ends or `stop`; returns the periods run. A plant that goes quiet
        is logged and waited for again."""
        stop = stop or asyncio.Event()
        n = 0
        while not stop.is_set():
            try:
                tel = await self.plant.telemetry(self.last_seq)
            except PlantEnded as exc:
                self.log.info("%s: %s: the %s stops", self.node, exc, self.loop_name)
                await self.finish()
                break
            except PlantError as exc:
                self.log.warning("%s: %s", self.node, exc)
                continue
            if not await self._may_act(stop):
                break
            self.last_seq = tel.seq
            if (bad := self.telemetry_problem(tel)) is not None:
                self.log.error("%s: %s seq %d refused: %s; no setpoint written", self.node, self.telemetry_name, tel.seq, bad)
                continue
            await self.plant.write(await self.step(tel))
            n += 1
        return n
