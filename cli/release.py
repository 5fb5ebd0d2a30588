"""`scf release weekly|verify`: the signed weekly release (docs/proofs.md)."""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path
from typing import Optional

import typer

from scf.cli.common import errors_to_exit, fail, load_settings, open_bus, run

release_app = typer.Typer(rich_markup_mode="markdown", help="Signed weekly releases: in-toto / SLSA provenance in a DSSE envelope (docs/proofs.md).", no_args_is_help=True)


def register(app: typer.Typer, run_app: typer.Typer) -> None:
    app.add_typer(release_app, name="release")


@release_app.command("weekly")
@errors_to_exit
def release_weekly(
    date: Optional[str] = typer.Option(None, help="a day of the week to release, YYYY-MM-DD (default: today, UTC)"),
    key: str = typer.Option("release", "--key", help="the release signing key in $SCF_HOME/keys (role release)"),
    archive: Optional[Path] = typer.Option(None, "--archive", help="archive directory (default: $SCF_HOME/archive)"),
    publish: bool = typer.Option(True, help="record the release as a proof.release event (needs the server)"),
) -> None:
    """Package the week's best production checkpoint per domain, signed; a second run reproduces it or refuses."""
    from scf.bus.signing import SigningKey
    from scf.projections import release
    from scf.projections.archive import archive_root
    from scf.projections.store import ArchiveStore

    settings = load_settings()
    try:
        day = dt.date.fromisoformat(date) if date else dt.datetime.now(dt.timezone.utc).date()
    except ValueError:
        raise fail(f"--date {date!r} is not a date: use YYYY-MM-DD") from None
    path = settings.keys_dir / f"{key}.key"
    if not path.exists():
        raise fail(f"no release key {path}: create it with `scf keys new {key}` and trust it with the release role")
    k = SigningKey.load(path)
    store = ArchiveStore(archive_root(settings, archive))
    store.require()
    result = release.weekly(store, settings.path("release_history"), day, k)
    typer.echo(result.line())
    if publish:

        async def main() -> tuple[str, str]:
            bus = await open_bus(settings, "scf-release")
            try:
                event = release.release_logged_event(result, k, bus.source)
                once = await bus.publish_once(event)
            finally:
                await bus.close()
            if once.status == "conflict":
                raise release.ReleaseError(f"{result.directory.name} was recorded before with another envelope: releases are immutable")
            recorded = once.existing if once.status == "duplicate" and once.existing is not None else event
            return once.status, recorded.id

        status, event_id = run(main())
        typer.echo(f"recorded as proof.release.{result.directory.name} ({status}), event {event_id}")


@release_app.command("verify")
def release_verify(
    directory: Path = typer.Argument(..., help="the release directory (release_history/week-YYYY-MM-DD)"),
    key: Path = typer.Option(..., "--key", help="the release public key: a NAME.pub file (base64 Ed25519)"),
    log_proof: Optional[Path] = typer.Option(None, "--log-proof", help="inclusion proof of its proof.release event (`scf proof inclusion ID`)"),
    log_key: Optional[str] = typer.Option(None, "--log-key", help="the transparency log's verifier key (text or file), with --log-proof"),
) -> None:
    """Check a release offline: the DSSE signature, the in-toto statement and every file's digest."""
    from scf.projections import release

    try:
        raw = base64.b64decode(key.read_text().strip(), validate=True)
        if len(raw) != 32:
            raise ValueError
    except FileNotFoundError:
        raise fail(f"{key}: no such file") from None
    except ValueError:
        raise fail(f"{key} is not an Ed25519 public key: pass the base64 NAME.pub file of the release key") from None
    proof_bytes, vkey = None, None
    if log_proof is not None:
        if not log_key:
            raise fail("--log-proof needs --log-key (the log's verifier key from `scf proof key`)")
        try:
            proof_bytes = log_proof.read_bytes()
        except FileNotFoundError:
            raise fail(f"{log_proof}: no such file") from None
        vkey = Path(log_key).read_text().strip() if Path(log_key).is_file() else log_key
    try:
        summary = release.verify_release(directory, raw, log_proof=proof_bytes, log_key=vkey)
    except release.ReleaseError as exc:
        raise fail(f"release does not verify: {exc}") from None
    typer.echo(f"OK: {summary['week']}: signature, statement and {summary['files']} files verified")
    if "log" in summary:
        lg = summary["log"]
        typer.echo(f"OK: recorded in the transparency log {lg['origin']} (leaf {lg['leaf_index']} of {lg['tree_size']})")
