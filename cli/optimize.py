"""`scf optimize`: decisions with certificates (library: scf.producers.optimize).

    scf optimize --domain grid:case14 --context '{"loads": {"5": 9.0}}' --json
    scf optimize --case path/to/case2383wp.m --batch contexts.jsonl --out decisions.parquet
    scf optimize --domain grid:case118 --method learned --checkpoint CKPT --max-gap 0.001
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer

from scf.cli.common import fail


def optimize_command(
    domain: Optional[str] = typer.Option(None, "--domain", help="a registered domain: grid:case9|14|30|118, hvac:office3"),
    case: Optional[Path] = typer.Option(None, "--case", help="any MATPOWER case file (.m), instead of --domain"),
    context: Optional[str] = typer.Option(None, "--context", help="the constraints as JSON, or a path to a JSON file (loads, outages, derates, previous, budget; hvac: T_out, hour, occupancy, T0, comfort); default: nominal"),
    batch: Optional[Path] = typer.Option(None, "--batch", help="many contexts: a .jsonl file (one constraints object a line) or a .parquet file"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the decisions as Parquet (one row each)"),
    method: str = typer.Option("exact", "--method", help="exact (HiGHS), learned (a trained model, repaired and certified), or auto"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="the model for --method learned|auto"),
    max_gap: Optional[float] = typer.Option(None, "--max-gap", help="certify every decision within this relative gap (0.001 = 0.1 %); learned decisions that cannot be certified fall back to an exact solve"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object per decision"),
) -> None:
    """Optimise a domain for a context (or a batch): the decision, every constraint's slack, its cost and a duality certificate."""
    from scf.bus.errors import SCFError
    from scf.producers import optimize as opt

    try:
        target = opt.target(domain, case)
        if batch is not None and context is not None:
            raise opt.OptimizeError("give --context or --batch, not both")
        specs = opt.read_batch(target, batch) if batch is not None else [_read_context(context)]
        problems = []
        for n, spec in enumerate(specs, 1):
            try:
                problems.append(opt.problem(target, spec))
            except opt.OptimizeError as exc:
                raise opt.OptimizeError(f"context {n}: {exc}" if batch is not None else str(exc)) from None
        decisions = opt.optimize(problems, method=method, checkpoint=checkpoint, max_gap=max_gap)
        if out is not None:
            opt.write_parquet(decisions, out)
    except SCFError as exc:
        raise fail(str(exc)) from None
    if batch is None and decisions[0].status == "infeasible" and not as_json:
        raise fail(decisions[0].message)
    for d in decisions:
        if as_json:
            typer.echo(json.dumps(d.to_dict(), default=_jsonable))
        elif batch is None:
            _print(d, target.energy_unit)
    if batch is not None:
        s = opt.summary(decisions)
        where = f" → {out}" if out is not None else ""
        line = (f"{s['n']} decisions: {s['optimal']} optimal, {s['uncertified']} uncertified, {s['infeasible']} infeasible; "
                f"fallback rate {s['fallback_rate']:.1%}; max gap {_pct(s['max_rel_gap'])}{where}")  # fmt: skip
        typer.echo(line, err=as_json)
    if any(d.status != "optimal" for d in decisions) and max_gap is not None:
        raise typer.Exit(2)


def _read_context(text: str | None) -> dict:
    from scf.producers.optimize import OptimizeError

    if text is None:
        return {}
    source = text
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise OptimizeError(f"--context {text!r} is neither a JSON object nor a file; give e.g. '{{\"load_scale\": 1.1}}'")
        source = path.read_text(errors="replace")
    try:
        spec = json.loads(source)
    except json.JSONDecodeError as exc:
        raise OptimizeError(f"--context is not valid JSON ({exc.msg} at position {exc.pos}); give a JSON object") from None
    except RecursionError:
        raise OptimizeError("--context is not valid JSON (nested too deeply); give a JSON object") from None
    if not isinstance(spec, dict):
        raise OptimizeError(f"--context must be a JSON object of constraints, got {type(spec).__name__}")
    return spec


def _jsonable(v):
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def _pct(v) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.3g} %"


def _print(d, unit: str) -> None:
    cert = d.certificate
    typer.echo(f"{d.status}: {d.message}")
    typer.echo(f"method {d.method}" + (f" (model {d.model_id})" if d.model_id else "") + (" — fell back to an exact solve" if d.fallback else ""))
    typer.echo(f"cost {d.cost:.6f} {unit}; lower bound {cert.lower_bound:.6f} {unit}; gap {cert.gap:.3g} {unit} ({_pct(cert.rel_gap)})")
    typer.echo("decision:")
    for name, v in zip(d.state_names, d.state):
        typer.echo(f"  {name:<24} {v:12.4f}")
    tight = sorted(d.slacks.items(), key=lambda kv: kv[1])[:10]
    typer.echo(f"tightest of {len(d.slacks)} constraints (slack):")
    for name, v in tight:
        typer.echo(f"  {name:<32} {v:12.4f}")
    typer.echo("timings: " + ", ".join(f"{k} {1000 * v:.2f} ms" for k, v in d.timings.items()))


def register(app: typer.Typer, run_app: typer.Typer) -> None:
    app.command("optimize")(optimize_command)
