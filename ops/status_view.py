"""`scf status --watch`: a live terminal view of the whole loop, refreshed from the bus.

Everything shown is read from JetStream (stream state, last message per subject, KV):
gear, emergency state, processes and their restarts, stream counts, consumer lag, jobs in
flight with progress, the latest promoted checkpoint per domain, deployments per node,
ledger totals, DLQ size and the archive's lag.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import msgspec
from nats.js.errors import NotFoundError

from scf.bus import codec
from scf.bus import events as ev
from scf.bus.client import Bus
from scf.bus.emergency import EmergencyUnknown, read_state
from scf.bus.streams import STREAMS


@dataclass
class Snapshot:
    gear: str = "?"
    emergency: str = "released"
    daemon: str = "?"
    processes: list[tuple[str, str]] = field(default_factory=list)
    streams: list[tuple[str, int, str]] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    deployments: list[str] = field(default_factory=list)
    ledger: str = "0 transfers"
    dlq: int = 0
    archive: list[str] = field(default_factory=list)
    regiment: str = "not running"


async def _kv_text(bus: Bus, key: str) -> str | None:
    try:
        kv = await bus.kv("scf_state")
        entry = await kv.get(key)
    except Exception:  # noqa: BLE001 - a status view shows what it can read and leaves the rest blank
        return None
    return entry.value.decode(errors="replace") if entry and entry.value else None


async def _last_per_subject(bus: Bus, stream: str, pattern: str, limit: int = 20) -> list[ev.Event]:
    try:
        info = await bus.js.stream_info(stream, subjects_filter=pattern)
    except NotFoundError:
        return []
    out = []
    for subject in sorted(info.state.subjects or {})[:limit]:
        try:
            msg = await bus.js.get_last_msg(stream, subject)
            out.append(codec.decode(msg.data))
        except Exception:  # noqa: BLE001 - a status view shows what it can read and leaves the rest blank
            continue
    return out


async def snapshot(bus: Bus) -> Snapshot:
    s = Snapshot()
    gear = await _kv_text(bus, "gear")
    if gear:
        try:
            s.gear = str(msgspec.json.decode(gear).get("gear", gear))  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - a status view shows what it can read and leaves the rest blank
            s.gear = gear.strip('"')
    try:
        em = await read_state(bus)
        s.emergency = f"ENGAGED ({em.reason or 'no reason'}, by {em.by or '?'})" if em.engaged else "released"
    except EmergencyUnknown as exc:  # gates treat it as engaged: say so
        s.emergency = f"UNKNOWN, gates paused ({exc})"
    s.daemon = (await _kv_text(bus, "daemon")) or "no heartbeat"
    s.regiment = regiment_line(await _kv_text(bus, "regiment"))
    try:
        kv = await bus.kv("scf_state")
        keys = [k for k in await kv.keys() if k.startswith("proc.")]
    except Exception:  # noqa: BLE001 - a status view shows what it can read and leaves the rest blank
        keys = []
    for key in sorted(keys):
        text = await _kv_text(bus, key)
        if text:
            d = msgspec.json.decode(text)
            s.processes.append((d["name"], f"pid {d['pid']}  restarts {d['restarts']}  last exit {d.get('last_exit')}"))
    for spec in STREAMS:
        try:
            info = await bus.js.stream_info(spec.name)
            lag = ", ".join(f"{c.name} {c.num_pending}/{c.num_ack_pending}" for c in await bus.js.consumers_info(spec.name))
            s.streams.append((spec.name, info.state.messages, lag or "-"))
            if spec.name == "DLQ":
                s.dlq = info.state.messages
            if spec.name == "LEDGER":
                s.ledger = f"{info.state.messages} ledger events"
        except NotFoundError:
            s.streams.append((spec.name, 0, "missing"))
    done = {e.data.job_id for e in await _last_per_subject(bus, "TRAINING", "job.completed.>", 200)}  # type: ignore[attr-defined]
    done |= {e.data.job_id for e in await _last_per_subject(bus, "TRAINING", "job.failed.>", 200)}  # type: ignore[attr-defined]
    for e in await _last_per_subject(bus, "TRAINING", "job.progress.>", 200):
        d = e.data  # type: ignore[attr-defined]
        if d.job_id not in done:
            pct = 100.0 * d.step / max(1, d.total_steps)
            s.jobs.append(f"{d.job_id[:12]}  {pct:5.1f}%  step {d.step}/{d.total_steps}  loss {d.loss:.4f}  {d.samples_per_s:,.0f} samples/s  {d.worker}")
    for e in await _last_per_subject(bus, "CHECKPOINTS", "checkpoint.promoted.>"):
        d = e.data  # type: ignore[attr-defined]
        s.checkpoints.append(f"{d.domain:<16} v{d.version}  {d.checkpoint_id[:12]}  ({d.alias})")
    for e in await _last_per_subject(bus, "DEPLOY", "deploy.activated.>"):
        d = e.data  # type: ignore[attr-defined]
        s.deployments.append(f"{d.node:<10} runs {d.checkpoint_id[:12]} v{d.version}")
    try:
        from scf.projections.archive import lag_lines  # optional: the archive may not be set up

        s.archive = await lag_lines(bus, bus.settings)
    except Exception:  # noqa: BLE001 - a status view shows what it can read and leaves the rest blank
        s.archive = []
    return s


def regiment_line(text: str | None) -> str:
    """The regiment's progress (`scf_state/regiment`, producers/regiment.py) in one line."""
    if not text:
        return "not running"
    try:
        d = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return "unreadable progress record"
    if d.get("paused"):
        return f"paused: {d['paused']}"
    statuses = ", ".join(f"{k} {v}" for k, v in sorted((d.get("statuses") or {}).items())) or "-"
    state = "done" if d.get("finished_at") else "running"
    return f"pass {d.get('pass_no', 0)} {state}: {d.get('done', 0)}/{d.get('due', 0)} due of {d.get('contracts', 0)} contracts ({statuses})"


def render(s: Snapshot):
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    head = Table.grid(padding=(0, 2))
    head.add_row("gear", f"[bold]{s.gear}[/]", "emergency", f"[bold red]{s.emergency}[/]" if s.emergency != "released" else "released")
    head.add_row("daemon", s.daemon[:80], "DLQ", f"[red]{s.dlq}[/]" if s.dlq else "0")
    head.add_row("ledger", s.ledger, "regiment", s.regiment[:80])
    procs = Table("process", "state", title="processes", expand=True)
    for name, state in s.processes:
        procs.add_row(name, state)
    streams = Table("stream", "messages", "consumers pending/ack-pending", title="streams", expand=True)
    for name, n, lag in s.streams:
        streams.add_row(name, str(n), lag)
    parts = [Panel(head, title="SCF"), procs, streams]
    for title, rows in (("jobs in flight", s.jobs), ("production checkpoints", s.checkpoints), ("deployments", s.deployments), ("archive lag", s.archive)):
        t = Table(title, title=None, expand=True)
        for r in rows or ["-"]:
            t.add_row(r)
        parts.append(t)
    return Group(*parts)


async def watch(bus: Bus, interval: float = 1.0, iterations: int | None = None) -> None:
    from rich.live import Live

    with Live(render(await snapshot(bus)), refresh_per_second=4, screen=False) as live:
        n = 0
        while iterations is None or n < iterations:
            await asyncio.sleep(interval)
            live.update(render(await snapshot(bus)))
            n += 1
