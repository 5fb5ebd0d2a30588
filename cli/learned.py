"""The learned optimiser, trained here on local shards (no bus).

    scf train-optimiser --data DIR --domain grid:case118 [--out DIR] [--steps 2000]
    scf train-optimiser --bus --domain grid:case118 [--steps 2000] [--pool NAME]

Wraps `scf.ml.optimize.train_optimiser`: a cost model of the fossils' measured energy and
an amortised proposal network against it, judged on the held-out split against the exact
optimum and the best-in-data baseline; writes a `scf-opt/1` checkpoint that
`scf optimize --method learned --checkpoint FILE` uses (docs/optimise.md). With `--bus`
it asks the loop instead: a `train` intent with `model = "optimiser"` that the safety gate
rules on, dispatch routes and a worker trains on the domain's fossils (docs/worker.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from scf.cli.common import fail, load_settings

_SHOWN = ("decision_feasible", "decision_gap_median", "decision_gap_p95", "decision_savings_captured",
          "baseline_gap_median", "baseline_gap_p95", "baseline_savings_captured", "cost_heldout_mae_rel", "train_seconds")


def train_optimiser(
    data: Optional[Path] = typer.Option(None, help="directory of fossil shards (*.ndjson): train here"),
    domain: str = typer.Option(..., help="domain of the fossils, e.g. grid:case118"),
    out: Optional[Path] = typer.Option(None, help="directory for the checkpoint (default $SCF_HOME/model_zoo/<domain>)"),
    steps: int = typer.Option(2000, help="training steps of the proposal network"),
    seed: int = typer.Option(0, help="random seed"),
    eval_contexts: int = typer.Option(256, help="held-out contexts judged against the exact optimum"),
    hidden: int = typer.Option(256, help="width of the proposal network's hidden layers"),
    depth: int = typer.Option(3, help="hidden layers of the proposal network"),
    conservative: float = typer.Option(0.0, help="weight of the learned cost's penalty away from the fossils' support (ml/cost.py; 0: off)"),
    bus: bool = typer.Option(False, "--bus", help="ask the loop instead: publish a train intent (model = optimiser) for a worker to train on the bus's fossils"),
    pool: Optional[str] = typer.Option(None, help="with --bus: the worker pool to prefer"),
) -> None:
    """Train a learned optimiser on local shards (fossils only) and write its checkpoint, or with --bus ask a worker to."""
    from scf import domains
    from scf.bus.errors import SCFError
    from scf.bus.events import domain_token

    if (data is None) == (not bus):
        raise fail("give --data DIR (train here) or --bus (a worker trains it on the bus's fossils), not both")
    try:
        domains.get(domain)
    except SCFError as exc:
        raise fail(str(exc)) from None
    if bus:
        params = {"model": "optimiser", "steps": steps, "seed": seed, "eval_contexts": eval_contexts, "hidden": hidden, "depth": depth,
                  **({"cost_conservative": conservative} if conservative else {}), **({"pool": pool} if pool else {})}
        return _request(domain, params)
    try:
        from scf.ml.cost import CostConfig
        from scf.ml.optimize import OptimiserConfig
        from scf.ml.optimize import train_optimiser as train

        out_dir = out or load_settings("train").path("model_zoo", domain_token(domain))
        result = train(domain, data, out_dir, OptimiserConfig(steps=steps, seed=seed, eval_contexts=eval_contexts, hidden=hidden, depth=depth,
                                                              cost=CostConfig(conservative=conservative)))
    except SCFError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"wrote {result.checkpoint} ({result.duration_s:.1f}s)")
    for k in _SHOWN:
        if k in result.metrics:
            typer.echo(f"  {k:<28} {result.metrics[k]:.6g}")


def _request(domain: str, params: dict) -> None:
    """Publish the optimiser's train intent (once) and say what happens next."""
    from scf.bus import events as ev
    from scf.bus.ids import new_id
    from scf.cli.common import open_bus, run

    iid = f"train-{ev.domain_token(domain)}-optimiser-{new_id()}"

    async def main():
        s = load_settings("train-optimiser")
        b = await open_bus(s, "scf-train-optimiser")
        try:
            intent = ev.Intent(intent_id=iid, kind="train", domain=domain, params=params, reason="a learned optimiser, asked for by hand (scf train-optimiser --bus)")
            return await b.publish_once(ev.IntentCreated.new(intent, source=b.source))
        finally:
            await b.close()

    once = run(main())
    typer.echo(f"intent.created.train.{iid} ({once.status}): the safety gate rules on it, dispatch routes it, a worker trains it; "
               "follow it with `scf events tail job.>` and `scf events tail checkpoint.>`")


def register(app: typer.Typer, run_app: typer.Typer) -> None:
    app.command("train-optimiser")(train_optimiser)
