"""The Parquet archive and what is built from it: `scf run archive`, `scf archive …`,
`scf replay`, `scf query`, `scf dataset cfr`, `scf report value`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from scf.cli.common import errors_to_exit, fail, load_settings, open_bus, run

archive_app = typer.Typer(rich_markup_mode="markdown", help="The Parquet archive of the log (a projection of JetStream; see docs/archive.md).", no_args_is_help=True)
dataset_app = typer.Typer(rich_markup_mode="markdown", help="Datasets built from the archive.", no_args_is_help=True)
report_app = typer.Typer(rich_markup_mode="markdown", help="Reports built from the archive.", no_args_is_help=True)

ARCHIVE_OPT = typer.Option(None, "--archive", help="archive directory (default: dir in the archive table of scf.toml, else $SCF_HOME/archive)")


def register(app: typer.Typer, run_app: typer.Typer) -> None:
    run_app.command("archive")(run_archive)
    app.add_typer(archive_app, name="archive")
    app.command("replay")(replay)
    app.command("query")(query)
    app.add_typer(dataset_app, name="dataset")
    app.add_typer(report_app, name="report")


def _root(archive: Optional[Path]) -> Path:
    from scf.projections.archive import archive_root

    return archive_root(load_settings(), archive)


# --------------------------------------------------------------------------- the process
def run_archive(
    archive: Optional[Path] = ARCHIVE_OPT,
    stream: list[str] = typer.Option([], "--stream", help="archive only this stream (repeatable; default: all but JOBS)"),
) -> None:
    """Follow every stream into Parquet, resuming right after the last archived sequence."""
    from scf.projections.archive import run_archive as run_process

    settings = load_settings("archive")

    def ready(positions: dict[str, int]) -> None:
        typer.echo("archiving from " + ", ".join(f"{s} seq {p + 1}" for s, p in positions.items()), err=True)

    stats = run(run_process(settings, archive_dir=archive, streams=stream or None, ready=ready))
    for s in stats:
        typer.echo(f"{s.stream}: {s.messages} messages in {s.files} files, at seq {s.position}", err=True)


# --------------------------------------------------------------------------- archive maintenance
@archive_app.command("compact")
@errors_to_exit
def archive_compact(
    archive: Optional[Path] = ARCHIVE_OPT,
    stream: list[str] = typer.Option([], "--stream", help="compact only this stream (repeatable)"),
    target_rows: Optional[int] = typer.Option(None, help="rows per merged file (default: [archive] compact_rows)"),
) -> None:
    """Merge small Parquet files into larger ones without changing a row."""
    from scf.projections.archive import archive_settings
    from scf.projections.store import ArchiveStore

    settings = load_settings()
    store = ArchiveStore(_root(archive))
    store.require()
    rows = target_rows or archive_settings(settings).compact_rows
    for s in stream or store.streams():
        typer.echo(store.compact(s, target_rows=rows).line())


@archive_app.command("status")
def archive_status() -> None:
    """How far the archive trails each stream (the lines `scf status` shows)."""
    from scf.projections.archive import lag_lines

    async def main() -> None:
        settings = load_settings()
        bus = await open_bus(settings)
        try:
            for line in await lag_lines(bus, settings):
                typer.echo(line)
        finally:
            await bus.close()

    run(main())


@archive_app.command("hash")
@errors_to_exit
def archive_hash(
    archive: Optional[Path] = ARCHIVE_OPT,
    stream: list[str] = typer.Option([], "--stream", help="hash only this stream (repeatable)"),
) -> None:
    """Print the content hash of the archive's rows (equal rows, equal hash, whatever the files)."""
    from scf.projections.store import ArchiveStore

    store = ArchiveStore(_root(archive))
    store.require()
    for s in stream or store.streams():
        typer.echo(f"{s:<12} {store.position(s):>10}  {store.content_hash([s])}")
    if not stream:
        typer.echo(f"{'all':<12} {'':>10}  {store.content_hash()}")


@archive_app.command("views")
@errors_to_exit
def archive_views(archive: Optional[Path] = ARCHIVE_OPT) -> None:
    """Write (or refresh) scf.duckdb with the views, for analysts' own DuckDB."""
    from scf.projections.archive import prepare
    from scf.projections.store import ArchiveStore

    store = ArchiveStore(_root(archive))
    prepare(store)
    typer.echo(f"wrote {store.database_path}: open it with `cd {store.root} && duckdb scf.duckdb`")


# --------------------------------------------------------------------------- replay
def replay(
    stream: list[str] = typer.Option([], "--stream", help="replay only this stream (repeatable; default: all archived streams)"),
    from_seq: Optional[int] = typer.Option(None, "--from-seq", help="rebuild the archive of --stream from this sequence on"),
    rebuild: bool = typer.Option(False, "--rebuild", help="rebuild from sequence 1 (replaces the archived files)"),
    force: bool = typer.Option(False, "--force", help="rebuild even if the stream lost messages the archive still has"),
    archive: Optional[Path] = ARCHIVE_OPT,
) -> None:
    """Rebuild the archive from JetStream (without options: catch up once, then exit)."""
    from scf.projections.archive import replay as do_replay

    if from_seq is not None and not stream:
        raise fail("--from-seq needs --stream: sequences are per stream")
    settings = load_settings("replay")
    reports = run(do_replay(settings, archive_dir=archive, streams=stream or None, from_seq=from_seq, rebuild=rebuild, force=force))
    for r in reports:
        typer.echo(r.line())


# --------------------------------------------------------------------------- query
def query(
    sql: Optional[str] = typer.Argument(None, help="SQL over the views (events, fossils, intents, code, verdicts, …)"),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="read the SQL from this file"),
    format: str = typer.Option("table", "--format", help="table | csv | json (JSON Lines) | parquet"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write here instead of stdout (required for parquet)"),
    archive: Optional[Path] = ARCHIVE_OPT,
) -> None:
    """Run SQL against the archive's views (docs/views.md lists them and their columns)."""
    from scf.projections import views

    if (sql is None) == (file is None):
        raise fail("give the SQL as an argument or with --file F.sql (one of the two)")
    if file is not None:
        try:
            sql = file.read_text()
        except OSError as exc:
            raise fail(f"cannot read {file}: {exc.strerror}") from None

    @errors_to_exit
    def main() -> None:
        con = views.connect(_root(archive))
        try:
            rel = views.query(con, sql or "")
            n = views.export(rel, format, out)
        finally:
            con.close()
        if out:
            typer.echo(f"wrote {n} rows to {out}", err=True)

    main()


# --------------------------------------------------------------------------- dataset
@dataset_app.command("cfr")
@errors_to_exit
def dataset_cfr(
    out: Path = typer.Option(..., "--out", help="directory to write the dataset into"),
    as_of_seq: list[str] = typer.Option([], "--as-of-seq", help="N (every stream) or STREAM=N (repeatable): read the log up to there"),
    validation_pct: float = typer.Option(10.0, help="share of intents in the validation split, in %"),
    max_pairs_per_intent: int = typer.Option(16, help="at most this many preference pairs per intent"),
    archive: Optional[Path] = ARCHIVE_OPT,
) -> None:
    """Build the CFR dataset (Context → Intent → Code → Review) as JSONL + Parquet with a card."""
    from scf.projections import cfr

    ds = cfr.build(
        _root(archive), out, as_of=cfr.parse_as_of(as_of_seq), validation_pct=validation_pct,
        max_pairs_per_intent=max_pairs_per_intent,
    )
    for line in ds.lines():
        typer.echo(line)


# --------------------------------------------------------------------------- report
@report_app.command("value")
@errors_to_exit
def report_value(
    out: Path = typer.Option(..., "--out", help="directory for report.md and report.html"),
    since: Optional[str] = typer.Option(None, help="from this ISO date/time, or this long ago (30d, 12h)"),
    until: Optional[str] = typer.Option(None, help="up to this ISO date/time, or this long ago"),
    archive: Optional[Path] = ARCHIVE_OPT,
    contract: Optional[str] = typer.Option(None, "--contract", help="one contract's report from its strike proofs (Markdown, HTML, PDF; docs/value-loop.md)"),
) -> None:
    """Energy saved, stability, verdict and rollback rates, jobs and checkpoints: Markdown + HTML (with --contract: a contract's, + PDF)."""
    from scf.cli.core import parse_since
    from scf.projections import report

    if contract is not None:
        from scf.cli.strike import contract_report

        return contract_report(contract, out)

    start = parse_since(since) if since else None
    end = parse_since(until) if until else None
    if start and end and end <= start:
        raise fail(f"--until {until} is not after --since {since}")
    r = report.build(_root(archive), out, since=start, until=end)
    for line in r.lines():
        typer.echo(line)

