"""Fossils, training, artifacts; the dispatch and worker processes.

    scf fossils synth --domain grid:case14 --n 100000 --out DIR   synthetic shards (NDJSON)
    scf fossils ingest PATH...                                   validate + publish, resumable
    scf train --data DIR --domain grid:case14 --out CKPT          train here, no bus
    scf distill --checkpoint ID                                  a ternary student of a checkpoint
    scf artifacts put FILE NAME | get URI DEST | stat NAME|URI    the artifact store
    scf run dispatch                                             approved train intents → jobs
    scf run worker --pool NAME [--device cuda]                   a (GPU) training worker
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from scf.cli.common import fail, load_settings, open_bus, run

fossils_app = typer.Typer(rich_markup_mode="markdown", help="Fossils: write synthetic shards, ingest shards onto the bus.", no_args_is_help=True)
artifacts_app = typer.Typer(rich_markup_mode="markdown", help="The artifact store (JetStream Object Store or a shared directory).", no_args_is_help=True)


# --------------------------------------------------------------------------- fossils
@fossils_app.command("synth")
def fossils_synth(
    domain: str = typer.Option(..., help="domain, e.g. grid:case14, grid:case118, hvac:office3"),
    n: int = typer.Option(..., "--n", help="how many fossils"),
    out: Path = typer.Option(..., help="directory for the shards (fossils-00000.ndjson …)"),
    shard_size: int = typer.Option(10_000, help="fossils per shard"),
    seed: int = typer.Option(0, help="random seed (same seed, same bytes)"),
    infeasible_fraction: float = typer.Option(0.0, help="share of states that break a constraint (verified=false; ingest rejects them)"),
    processes: int = typer.Option(1, help="shards written in parallel"),
) -> None:
    """Write N realistic synthetic fossils of DOMAIN as sharded NDJSON under OUT."""
    from scf.bus.errors import SCFError
    from scf.domains.fossils import synth_shards

    try:
        paths = synth_shards(domain, n, out, shard_size=shard_size, seed=seed, infeasible_fraction=infeasible_fraction, processes=processes)
    except SCFError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"wrote {n} fossils of {domain} in {len(paths)} shards under {out}")


@fossils_app.command("ingest")
def fossils_ingest(
    paths: list[Path] = typer.Argument(..., help="shard files or directories of *.ndjson / *.jsonl"),
    force: bool = typer.Option(False, "--force", help="read shards again even if an earlier run finished them"),
    workers: Optional[int] = typer.Option(None, help="validation processes (default: auto; 0 validates inline)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    strict: Optional[bool] = typer.Option(None, "--strict/--no-strict", help="refuse lines with fields a fossil does not have (default: [ingest] strict, off: drop and count them)"),
) -> None:
    """Validate every line; publish fossil.recorded once per content id and fossil.rejected per bad line."""
    from scf.producers.ingest import IngestError, ingest, plan_bytes

    try:
        total = plan_bytes(paths)
    except IngestError as exc:
        raise fail(str(exc)) from None

    async def main():
        s = load_settings("ingest")
        bus = await open_bus(s, "scf-ingest")
        try:
            if quiet:
                return await ingest(bus, paths, settings=s, force=force, workers=workers, strict=strict)
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

            with Progress(
                TextColumn("[bold]ingest"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[counts]}"), console=Console(stderr=True), transient=False,
            ) as bar:
                task = bar.add_task("ingest", total=total, counts="")
                seen = {"lines": 0, "recorded": 0, "duplicate": 0, "rejected": 0}
                shard_base: dict[str, tuple[int, int, int, int]] = {}

                def on_progress(p) -> None:
                    shard_base[p.shard] = (p.lines, p.recorded, p.duplicate, p.rejected)
                    lines, rec, dup, rej = (sum(v[i] for v in shard_base.values()) for i in range(4))
                    seen.update(lines=lines, recorded=rec, duplicate=dup, rejected=rej)
                    bar.update(task, completed=p.bytes_done, counts=f"{lines:,} lines: {rec:,} new, {dup:,} dup, {rej:,} rejected")

                report = await ingest(bus, paths, settings=s, force=force, workers=workers, strict=strict, on_progress=on_progress)
                bar.update(task, completed=total)
                return report
        finally:
            await bus.close()

    report = run(main())
    if as_json:
        typer.echo(json.dumps({
            "lines": report.lines, "recorded": report.recorded, "duplicate": report.duplicate, "rejected": report.rejected,
            "reasons": dict(report.reasons), "unknown_fields": dict(report.unknown_fields),
            "skipped_shards": report.skipped, "seconds": round(report.seconds, 3),
            "shards": [{"path": r.path, "sha256": r.sha256, "lines": r.lines, "recorded": r.recorded, "duplicate": r.duplicate,
                        "rejected": r.rejected, "unknown_fields": dict(r.unknown_fields), "skipped": r.skipped,
                        "resumed_from_line": r.resumed_from_line} for r in report.shards],
        }))
        return
    typer.echo(report.summary())
    for line in report.reason_lines():
        typer.echo(line)
    for line in report.unknown_field_lines():
        typer.echo(line)
    if report.rejected:
        s = load_settings("ingest")
        typer.echo(f"rejected lines are in {s.path('fossil_vault', 'quarantine')} (with their reasons)")


# --------------------------------------------------------------------------- train (no bus)
def train(
    data: Path = typer.Option(..., help="directory of fossil shards (*.ndjson)"),
    domain: str = typer.Option(..., help="domain of the fossils, e.g. grid:case14"),
    out: Optional[Path] = typer.Option(None, help="directory for the checkpoint (default $SCF_HOME/model_zoo/<domain>)"),
    steps: int = typer.Option(2000, help="optimiser steps"),
    batch_size: int = typer.Option(256, help="fossils per step"),
    device: str = typer.Option("auto", help="cpu | cuda | cuda:N | mps | auto"),
    seed: int = typer.Option(0, help="random seed"),
    set_: list[str] = typer.Option([], "--set", help="more EBDM config, KEY=VALUE, repeatable (hidden=256, lr=1e-3 …)"),
) -> None:
    """Train an EBDM on local shards and write a checkpoint (no bus, no job)."""
    import time

    from scf.bus.errors import SCFError
    from scf.bus.events import domain_token

    config = {}
    for item in set_:
        if "=" not in item:
            raise fail(f"--set {item!r} is not KEY=VALUE: e.g. --set hidden=256")
        k, v = item.split("=", 1)
        config[k.strip()] = _scalar(v.strip())
    state = {"last": 0.0}

    def progress(step: int, total: int, loss: float, sps: float = 0.0) -> None:
        now = time.monotonic()
        if now - state["last"] >= 1.0 or step >= total:
            state["last"] = now
            typer.echo(f"step {step}/{total}  loss {loss:.4f}  {sps:,.0f} samples/s", err=True)

    try:
        from scf.consumers.worker import resolve_device
        from scf.ml import train as ml_train

        out_dir = out or load_settings("train").path("model_zoo", domain_token(domain))
        result = ml_train.train_local(
            domain, data, out_dir, steps=steps, batch_size=batch_size, device=resolve_device(device), seed=seed,
            progress_cb=progress, **config,
        )
    except SCFError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"wrote {result.checkpoint} (sha256 {result.sha256}, {result.steps} steps, {result.duration_s:.1f}s)")
    for k, v in sorted(result.metrics.items()):
        typer.echo(f"  {k:<24} {v:.6g}")


def _scalar(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


# --------------------------------------------------------------------------- distil (ternary students)
def distill(
    checkpoint: str = typer.Option(..., help="the teacher: a checkpoint id on the bus (its checkpoint.produced), or a local checkpoint file"),
    data: Optional[Path] = typer.Option(None, help="fossil shards to distil on (default: the domain's fossils, fetched from the bus)"),
    out: Optional[Path] = typer.Option(None, help="directory for the student of a local file (default $SCF_HOME/model_zoo/students)"),
    packing: str = typer.Option("2bit", help="2bit (4 weights a byte) or base3 (5 weights a byte: 1.6 bits/weight)"),
    steps: int = typer.Option(2000, help="distillation steps"),
    set_: list[str] = typer.Option([], "--set", help="more distil config, KEY=VALUE, repeatable (lr=5e-4, batch_size=256 …)"),
) -> None:
    """Distil an EBDM or learned-optimiser checkpoint into a ternary (BitNet b1.58) student, packed for the edge; from the bus, publish it to be verified and promoted."""
    from scf.bus.errors import SCFError

    params: dict = {"steps": steps, "packing": packing}
    for item in set_:
        if "=" not in item:
            raise fail(f"--set {item!r} is not KEY=VALUE: e.g. --set lr=5e-4")
        k, v = item.split("=", 1)
        params[k.strip()] = _scalar(v.strip())
    log = lambda line: typer.echo(line, err=True)  # noqa: E731
    try:
        from scf.ml import distill as ml_distill

        cfg = ml_distill.DistillConfig.from_params(params)
        if Path(checkpoint).is_file():
            if data is None:
                raise ml_distill.DistillError("a local checkpoint file needs --data DIR (fossil shards of its domain)")
            result = ml_distill.distill_file(checkpoint, data, out or load_settings("distill").path("model_zoo", "students"), cfg, log=log)
            event = None
        else:
            async def main():
                s = load_settings("distill")
                bus = await open_bus(s, "scf-distill")
                try:
                    return await ml_distill.distill_on_bus(bus, s, checkpoint, cfg, data=data, log=log)
                finally:
                    await bus.close()

            result, event = run(main())
    except SCFError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"wrote {result.student} ({result.kind} student, {cfg.packing}: {result.student_bytes:,} bytes, "
               f"{result.student_bytes / result.teacher_bytes:.3f}x the teacher's {result.teacher_bytes:,})")  # fmt: skip
    if event is not None:
        typer.echo(f"published checkpoint.produced {event.data.checkpoint_id} ({event.data.uri}): the daemon judges it against its teacher")
    for k, v in sorted(result.metrics.items()):
        typer.echo(f"  {k:<32} {v:.6g}")


# --------------------------------------------------------------------------- artifacts
@artifacts_app.command("put")
def artifacts_put(
    path: Path = typer.Argument(..., help="the file to store"),
    name: str = typer.Argument(..., help="its name in the store, e.g. grid_case14/manual.safetensors"),
) -> None:
    """Store a file; print its URI, sha256 and size."""
    from scf.bus.artifacts import open_store

    async def main():
        s = load_settings()
        bus = await open_bus(s)
        try:
            return await open_store(bus, s).put(path, name)
        finally:
            await bus.close()

    ref = run(main())
    typer.echo(f"{ref.uri}  sha256 {ref.sha256}  {ref.size} bytes")


@artifacts_app.command("get")
def artifacts_get(
    uri: str = typer.Argument(..., help="obj://BUCKET/NAME or file:///PATH"),
    dest: Path = typer.Argument(..., help="file to write, or a directory to put it in"),
    sha256: Optional[str] = typer.Option(None, help="refuse the artifact unless its content has this sha256"),
) -> None:
    """Fetch an artifact, verifying its size and sha256."""
    from scf.bus.artifacts import open_store

    async def main():
        s = load_settings()
        bus = await open_bus(s)
        try:
            return await open_store(bus, s).get(uri, dest, sha256=sha256)
        finally:
            await bus.close()

    typer.echo(f"wrote {run(main())}")


@artifacts_app.command("stat")
def artifacts_stat(name: str = typer.Argument(..., help="a name in the configured store, or a URI")) -> None:
    """Show an artifact's URI, sha256, size and metadata."""
    from scf.bus.artifacts import open_store

    async def main():
        s = load_settings()
        bus = await open_bus(s)
        try:
            return await open_store(bus, s).stat(name)
        finally:
            await bus.close()

    ref = run(main())
    if ref is None:
        raise fail(f"no artifact {name}: check the name (or the URI's bucket / path)")
    typer.echo(json.dumps({"uri": ref.uri, "sha256": ref.sha256, "size": ref.size, "meta": ref.meta}, indent=2))


# --------------------------------------------------------------------------- processes
def run_dispatch() -> None:
    """Dispatch: approved train intents → jobs on work.<pool> (a pool with live workers, else local)."""
    from scf.consumers.dispatch import run_dispatch as main

    run(main(load_settings("dispatch")))


def run_worker(
    pool: str = typer.Option("local", help="the pool this worker serves (work.<pool>)"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | cuda:N | mps | auto (default: auto, or `device` in the worker table of scf.toml)"),
    worker_id: Optional[str] = typer.Option(None, "--id", help="this worker's id (default HOST-PID)"),
) -> None:
    """A training worker: one job at a time from work.<pool>; progress, checkpoint, completion on the bus."""
    from scf.consumers.worker import run_worker as main

    run(main(load_settings(f"worker-{pool}"), pool=pool, device=device, worker_id=worker_id))


def register(app: typer.Typer, run_app: typer.Typer) -> None:
    app.add_typer(fossils_app, name="fossils")
    app.add_typer(artifacts_app, name="artifacts")
    app.command("train")(train)
    app.command("distill")(distill)
    run_app.command("dispatch")(run_dispatch)
    run_app.command("worker")(run_worker)
