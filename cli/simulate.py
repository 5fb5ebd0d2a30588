"""Time-domain simulation of a domain under a controller or a decision (no bus needed).

    scf simulate --domain hvac|grid:case14 [--scenarios N] [--hours H] [--seed S]
                 [--decision FILE | --controller NAME] --out DIR [--json]
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer

from scf.cli.common import fail


def simulate(
    domain: str = typer.Option(..., help="hvac (= hvac:office3), hvac:office3, grid:case9|case14|case30|case118"),
    out: Path = typer.Option(..., help="directory for trajectories.parquet and metrics.parquet (frequency.parquet for grids)"),
    scenarios: int = typer.Option(100, help="stochastic scenarios, simulated as one batch"),
    hours: float = typer.Option(24.0, help="simulated hours"),
    seed: int = typer.Option(0, help="random seed (same seed, same trajectories; scenario i does not depend on --scenarios)"),
    controller: Optional[str] = typer.Option(None, help="hvac: thermostat (default), off, reference; grid: opf (default), prorata"),
    decision: Optional[Path] = typer.Option(None, help="JSON decision: a state vector (or one per hour) held as setpoints"),
    step_minutes: Optional[float] = typer.Option(None, help="control / dispatch step in minutes (default 5)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Simulate DOMAIN over stochastic scenarios; write trajectories and metrics as Parquet; print the metrics table."""
    from scf.bus.errors import SCFError
    from scf.domains.dynamics import simulate as run

    try:
        result = run(domain, scenarios=scenarios, hours=hours, seed=seed, controller=controller, decision=decision, step_minutes=step_minutes,
                     out=out)
        paths = result.write(out)
    except SCFError as exc:
        raise fail(str(exc)) from None
    rows = result.summary()
    if as_json:
        clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v
        typer.echo(json.dumps({
            "domain": result.domain, "controller": result.controller, "scenarios": result.scenarios, "hours": result.hours,
            "seed": result.seed, "files": [str(p) for p in paths],
            "metrics": {r["metric"]: {k: clean(v) for k, v in r.items() if k != "metric"} for r in rows},
        }))  # fmt: skip
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result.domain} under {result.controller}: {result.scenarios} scenarios × {result.hours:g} h, seed {result.seed}")
    for col in ("metric", "mean", "p5", "p95", "worst"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    fmt = lambda v: "—" if not math.isfinite(v) else f"{v:.4g}"
    for r in rows:
        note = f" ({r['missing']} n/a)" if r["missing"] else ""
        table.add_row(r["metric"] + note, fmt(r["mean"]), fmt(r["p5"]), fmt(r["p95"]), fmt(r["worst"]))
    Console(width=120).print(table)
    typer.echo(f"wrote {', '.join(p.name for p in paths)} under {out}")


def register(app: typer.Typer, run_app: typer.Typer) -> None:
    app.command("simulate")(simulate)
