"""A simulated plant served over MQTT, for edge agents, tests and the demo (docs/plants.md).

    scf run plant --domain hvac --mqtt HOST:PORT [--site S] [--hours H] [--seed N]
                  [--step-minutes M] [--factors envelope_ua=1.2,...] [--start ISO]
    scf run plant --domain grid:case30 --mqtt HOST:PORT [--factors heat_rate=1.08,no_load=0.8]
                  [--outages Pg3@bus22=30+4] [--fuel-price 1.0] [--trust node.pub ...]
"""

from __future__ import annotations

import datetime as dt
from typing import List, Optional

import typer

from scf.cli.common import fail


def run_plant(
    mqtt: str = typer.Option(..., help="the MQTT broker, HOST:PORT"),
    domain: str = typer.Option("hvac:office3", help="hvac (= hvac:office3), hvac:BUILDING, or grid:CASE (a dispatch plant, e.g. grid:case30)"),
    site: str = typer.Option("site-1", help="the site's name: topics scf/plant/<site>/telemetry|setpoint|status"),
    hours: float = typer.Option(96.0, help="simulated hours before the plant ends"),
    seed: int = typer.Option(10, help="weather and occupancy seed (10: a mild heating season)"),
    step_minutes: float = typer.Option(15.0, help="the control period: one step per setpoint"),
    factors: Optional[str] = typer.Option(None, help="the site's true factors on the domain's nominal model (what M&V calibration must find); "
                                          "default envelope_ua=1.2,internal_gains=0.85,efficiency=0.9 (hvac), heat_rate=1.08,no_load=0.8 (grid)"),
    start: Optional[str] = typer.Option(None, help="plant clock at seq 0, ISO 8601 UTC (default 2026-01-05T00:00Z)"),
    username: Optional[str] = typer.Option(None, help="broker login (the password from $SCF_MQTT_PASSWORD)"),
    tls: bool = typer.Option(False, "--tls", help="TLS to the broker, verified against the system's CAs"),
    period_s: float = typer.Option(0.0, help="free-running: a step every this many wall seconds, holding the latest setpoint (0: lock-step)"),
    trust: List[str] = typer.Option([], help="a node's .pub file (or a trusted.json) whose signed setpoints this plant accepts; "
                                    "repeatable; given: unsigned, forged, stale or replayed setpoints are refused"),
    window_s: float = typer.Option(60.0, help="with --trust: a setpoint issued longer ago than this is refused"),
    key: Optional[str] = typer.Option(None, help="the plant's signing key (a .key file from `scf keys new`): the telemetry is signed with it; "
                                      "edges that list its .pub in [edge] plant_keys refuse telemetry not signed by it"),
    outages: str = typer.Option("", help="grid: units out of service, UNIT=FROM_HOUR+HOURS,... (e.g. Pg3@bus22=30+4)"),
    fuel_price: float = typer.Option(1.0, help="grid: the site's fuel price, USD per MWh of fuel"),
) -> None:
    """A simulated HVAC or grid site as an MQTT plant: telemetry out, setpoints in, one step per setpoint."""
    import asyncio
    import os

    from scf.bus.errors import SCFError
    from scf.consumers.edge.grid_plant import GridSiteOptions, parse_grid_factors, parse_outages
    from scf.consumers.edge.plant import SiteOptions, parse_factors, parse_hostport, serve_mqtt
    from scf.consumers.edge.plant_auth import Verifier, load_trust

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
        if domain.split(":", 1)[0] == "grid":
            options = GridSiteOptions(domain=domain, seed=seed, hours=hours, step_minutes=step_minutes, start=t0,
                                      factors=parse_grid_factors(factors if factors is not None else "heat_rate=1.08,no_load=0.8"),
                                      outages=parse_outages(outages), fuel_price=fuel_price)
        else:
            options = SiteOptions(domain=domain, seed=seed, hours=hours, step_minutes=step_minutes, start=t0,
                                  factors=parse_factors(factors if factors is not None else "envelope_ua=1.2,internal_gains=0.85,efficiency=0.9"))
        verifier = Verifier(load_trust(trust), window_s=window_s) if trust else None
        signer = None
        if key is not None:
            from pathlib import Path

            from scf.bus.signing import SigningKey
            from scf.consumers.edge.plant_auth import Signer

            signer = Signer(SigningKey.load(Path(key)))

        async def main() -> int:
            from scf.bus.runner import install_signal_handlers

            stop = asyncio.Event()
            install_signal_handlers(stop, force_on_second=True)  # a second SIGTERM/SIGINT exits at once
            return await serve_mqtt(options, host, port, site, stop, username=username, password=os.environ.get("SCF_MQTT_PASSWORD"), tls=tls,
                                    period_s=period_s, verifier=verifier, signer=signer)

        steps = asyncio.run(main())
    except SCFError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"plant {site}: {steps} steps served")


def register(app: typer.Typer, run_app: typer.Typer) -> None:
    run_app.command("plant")(run_plant)
