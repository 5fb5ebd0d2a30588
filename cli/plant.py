"""A simulated plant served over MQTT, for edge agents, tests and the demo (docs/plants.md).

    scf run plant --domain hvac --mqtt HOST:PORT [--site S] [--hours H] [--seed N]
                  [--step-minutes M] [--factors envelope_ua=1.2,...] [--start ISO]
"""

from __future__ import annotations

import datetime as dt
from typing import Optional

import typer

from scf.cli.common import fail


def run_plant(
    mqtt: str = typer.Option(..., help="the MQTT broker, HOST:PORT"),
    domain: str = typer.Option("hvac:office3", help="hvac (= hvac:office3) or hvac:BUILDING"),
    site: str = typer.Option("site-1", help="the site's name: topics scf/plant/<site>/telemetry|setpoint|status"),
    hours: float = typer.Option(96.0, help="simulated hours before the plant ends"),
    seed: int = typer.Option(10, help="weather and occupancy seed (10: a mild heating season)"),
    step_minutes: float = typer.Option(15.0, help="the control period: one step per setpoint"),
    factors: str = typer.Option("envelope_ua=1.2,internal_gains=0.85,efficiency=0.9",
                                help="the site's true factors on the domain's nominal model (what M&V calibration must find)"),
    start: Optional[str] = typer.Option(None, help="plant clock at seq 0, ISO 8601 UTC (default 2026-01-05T00:00Z)"),
    username: Optional[str] = typer.Option(None, help="broker login (the password from $SCF_MQTT_PASSWORD)"),
    tls: bool = typer.Option(False, "--tls", help="TLS to the broker, verified against the system's CAs"),
    period_s: float = typer.Option(0.0, help="free-running: a step every this many wall seconds, holding the latest setpoint (0: lock-step)"),
) -> None:
    """A simulated HVAC site as an MQTT plant: telemetry out, setpoints in, one step per setpoint."""
    import asyncio
    import os
    import signal

    from scf.bus.errors import SCFError
    from scf.consumers.edge.plant import SiteOptions, parse_factors, parse_hostport, serve_mqtt

    if domain == "hvac":
        domain = "hvac:office3"
    try:
        host, port = parse_hostport(mqtt)
        t0 = SiteOptions.start
        if start is not None:
            try:
                t0 = dt.datetime.fromisoformat(start.replace("Z", "+00:00"))
            except ValueError:
                raise fail(f"--start {start!r} is not an ISO 8601 time (e.g. 2026-01-05T00:00Z)") from None
            t0 = t0 if t0.tzinfo else t0.replace(tzinfo=dt.timezone.utc)
        if hours <= 0 or not (1 / 60 <= step_minutes <= 60) or period_s < 0:
            raise fail(f"--hours {hours:g} must be positive, --step-minutes {step_minutes:g} between 1/60 and 60, --period-s {period_s:g} not negative")
        options = SiteOptions(domain=domain, seed=seed, hours=hours, step_minutes=step_minutes, start=t0, factors=parse_factors(factors))

        async def main() -> int:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            return await serve_mqtt(options, host, port, site, stop, username=username, password=os.environ.get("SCF_MQTT_PASSWORD"), tls=tls,
                                    period_s=period_s)

        steps = asyncio.run(main())
    except SCFError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"plant {site}: {steps} steps served")


def register(app: typer.Typer, run_app: typer.Typer) -> None:
    run_app.command("plant")(run_plant)
