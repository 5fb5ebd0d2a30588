"""The learned optimiser, trained here on local shards (no bus).

    scf train-optimiser --data DIR --domain grid:case118 [--out DIR] [--steps 2000]

Wraps `scf.ml.optimize.train_optimiser`: a cost model of the fossils' measured energy and
an amortised proposal network against it, judged on the held-out split against the exact
optimum and the best-in-data baseline; writes a `scf-opt/1` checkpoint that
`scf optimize --method learned --checkpoint FILE` uses (docs/optimise.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from scf.cli.common import fail, load_settings

_SHOWN = ("decision_feasible", "decision_gap_median", "decision_gap_p95", "decision_savings_captured",
          "baseline_gap_median", "baseline_gap_p95", "baseline_savings_captured", "cost_heldout_mae_rel", "train_seconds")


def train_optimiser(
    data: Path = typer.Option(..., help="directory of fossil shards (*.ndjson)"),
    domain: str = typer.Option(..., help="domain of the fossils, e.g. grid:case118"),
    out: Optional[Path] = typer.Option(None, help="directory for the checkpoint (default $SCF_HOME/model_zoo/<domain>)"),
    steps: int = typer.Option(2000, help="training steps of the proposal network"),
    seed: int = typer.Option(0, help="random seed"),
    eval_contexts: int = typer.Option(256, help="held-out contexts judged against the exact optimum"),
    hidden: int = typer.Option(256, help="width of the proposal network's hidden layers"),
    depth: int = typer.Option(3, help="hidden layers of the proposal network"),
) -> None:
    """Train a learned optimiser on local shards (fossils only) and write its checkpoint."""
    from scf import domains
    from scf.bus.errors import SCFError
    from scf.bus.events import domain_token

    try:
        domains.get(domain)
        from scf.ml.optimize import OptimiserConfig
        from scf.ml.optimize import train_optimiser as train

        out_dir = out or load_settings("train").path("model_zoo", domain_token(domain))
        result = train(domain, data, out_dir, OptimiserConfig(steps=steps, seed=seed, eval_contexts=eval_contexts, hidden=hidden, depth=depth))
    except SCFError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"wrote {result.checkpoint} ({result.duration_s:.1f}s)")
    for k in _SHOWN:
        if k in result.metrics:
            typer.echo(f"  {k:<28} {result.metrics[k]:.6g}")


def register(app: typer.Typer, run_app: typer.Typer) -> None:
    app.command("train-optimiser")(train_optimiser)
