"""`scf proof …` and `scf run tlog`: the transparency log over the archived events
(docs/proofs.md). `scf proof verify` needs nothing but the proof file and the log's key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from scf.cli.common import errors_to_exit, fail, load_settings, open_bus, run

proof_app = typer.Typer(rich_markup_mode="markdown", help="The transparency log: signed checkpoints, inclusion and consistency proofs (docs/proofs.md).", no_args_is_help=True)

ARCHIVE_OPT = typer.Option(None, "--archive", help="archive directory (default: $SCF_HOME/archive or [archive] dir)")
KEY_OPT = typer.Option("tlog", "--key", help="the log's signing key in $SCF_HOME/keys (created on first use)")
OUT_OPT = typer.Option(None, "--out", help="write the proof to this file (default: stdout)")


def register(app: typer.Typer, run_app: typer.Typer) -> None:
    app.add_typer(proof_app, name="proof")
    run_app.command("tlog")(run_tlog)


MAX_PROOF_BYTES = 64 << 20  # a proof or an event's bytes (`--entry`): the largest events bundle is far smaller
MAX_KEY_BYTES = 64 << 10  # the log's verifier key: one line


def read_input(path: Path, limit: int, what: str) -> bytes:
    """A file `scf proof verify` is handed, bounded: a FIFO, a socket or a directory is refused
    unread (reading a FIFO waited for a writer, forever), a larger file by its size before it
    is read (/dev/zero ate the memory); each one `Error:` line naming the file."""
    from scf.bus.files import InputTooLarge, read_bounded

    try:
        return read_bounded(path, limit, what)
    except FileNotFoundError:
        raise fail(f"{path}: no such file") from None
    except OSError as exc:
        raise fail(f"{path}: cannot read it ({exc.strerror})") from None
    except InputTooLarge as exc:
        raise fail(str(exc)) from None


def key_text(key: str) -> str:
    """`--key`: the log's verifier key itself, or a file holding it."""
    path = Path(key)
    if not path.exists():
        return key
    raw = read_input(path, MAX_KEY_BYTES, "verifier key file")
    try:
        return raw.decode().strip()
    except UnicodeDecodeError:
        raise fail(f"{path}: not a verifier key (not UTF-8 text): give the key `scf proof key` prints, or a file holding it") from None


def _emit(obj: dict, out: Optional[Path]) -> None:
    text = json.dumps(obj, indent=2) + "\n"
    if out:
        out.write_text(text)
        typer.echo(f"wrote {out}", err=True)
    else:
        typer.echo(text, nl=False)


def run_tlog(
    interval: float = typer.Option(60.0, help="seconds between checkpoints (one is signed only when the log grew)"),
    archive: Optional[Path] = ARCHIVE_OPT,
    key: str = KEY_OPT,
) -> None:
    """Keep the log in step with the archive: sync, sign and publish a checkpoint every interval."""
    from scf.projections import tlog

    settings = load_settings("tlog")
    run(tlog.run_tlog(settings, interval=interval, archive_dir=archive, key_name=key))


@proof_app.command("checkpoint")
def proof_checkpoint(
    archive: Optional[Path] = ARCHIVE_OPT,
    key: str = KEY_OPT,
    publish: bool = typer.Option(True, help="publish it as a proof.checkpoint event"),
) -> None:
    """Append what the archive holds, sign a checkpoint (C2SP signed note) and publish it."""
    from scf.projections import tlog

    settings = load_settings()

    async def main() -> tlog.CheckpointResult:
        bus = await open_bus(settings, "scf-proof")
        try:
            return await tlog.checkpoint(settings, bus, archive_dir=archive, key_name=key, publish=publish)
        finally:
            await bus.close()

    result = run(main())
    typer.echo(result.line(), err=True)
    typer.echo(result.note, nl=False)


@proof_app.command("key")
@errors_to_exit
def proof_key(key: str = KEY_OPT) -> None:
    """Print the log's verifier key (NAME+HASH+KEY): what a client pins to verify offline."""
    from scf.projections import tlog

    settings = load_settings()
    k = tlog.log_key(settings, key)
    typer.echo(tlog.verifier_key_of(tlog.open_log(settings, key=k), k))


@proof_app.command("inclusion")
@errors_to_exit
def proof_inclusion(
    event: str = typer.Argument(..., help="an event id, or STREAM:SEQ for any archived message"),
    size: Optional[int] = typer.Option(None, help="prove against the signed checkpoint of this size (default: the latest)"),
    archive: Optional[Path] = ARCHIVE_OPT,
    out: Optional[Path] = OUT_OPT,
) -> None:
    """Prove that an archived event is in the log: a JSON bundle `scf proof verify` checks offline."""
    from scf.projections import tlog

    log = tlog.open_log(load_settings(), archive)
    _emit(log.inclusion_bundle(tlog.find_event(log, event), size), out)


@proof_app.command("events")
@errors_to_exit
def proof_events(
    events: list[str] = typer.Argument(..., help="event ids (or STREAM:SEQ), e.g. the events of one strike"),
    size: Optional[int] = typer.Option(None, help="prove against the signed checkpoint of this size (default: the latest)"),
    archive: Optional[Path] = ARCHIVE_OPT,
    out: Optional[Path] = OUT_OPT,
) -> None:
    """Prove several events against one signed checkpoint (what a strike's JSON proof embeds)."""
    from scf.projections import tlog

    log = tlog.open_log(load_settings(), archive)
    _emit(log.events_bundle([tlog.find_event(log, e) for e in events], size), out)


@proof_app.command("consistency")
@errors_to_exit
def proof_consistency(
    old: int = typer.Argument(..., help="the older checkpoint's tree size"),
    new: int = typer.Argument(..., help="the newer checkpoint's tree size"),
    archive: Optional[Path] = ARCHIVE_OPT,
    out: Optional[Path] = OUT_OPT,
) -> None:
    """Prove that the log of size NEW extends the log of size OLD (nothing was rewritten)."""
    from scf.projections import tlog

    log = tlog.open_log(load_settings(), archive)
    _emit(log.consistency_bundle(old, new), out)


@proof_app.command("verify")
def proof_verify(
    proof: Path = typer.Argument(..., help="the proof file (from `scf proof inclusion` or `consistency`, or a strike's proof.json)"),
    key: Optional[str] = typer.Option(None, "--key", help="the log's verifier key (NAME+HASH+KEY), or a file holding it"),
    entry: Optional[Path] = typer.Option(None, "--entry", help="the event's bytes, if you hold them apart from the proof"),
    online: bool = typer.Option(False, "--online", help="a strike's proof: check its events against the log too"),
) -> None:
    """Verify a proof offline: only the proof, the log's key and (optionally) the event bytes; a strike's proof against the release keys."""
    from scf.cli.strike import strike_proof_verify
    from scf.projections import proofcheck

    if strike_proof_verify(proof, online, key):  # a strike's proof (docs/value-loop.md): checked there
        return
    if key is None:
        raise fail("--key is needed: the log's verifier key (`scf proof key`)")
    data = read_input(proof, MAX_PROOF_BYTES, "proof")
    key_line = key_text(key)
    entry_bytes = read_input(entry, MAX_PROOF_BYTES, "event") if entry else None
    try:
        summary = proofcheck.verify_bundle(data, key_line, entry_bytes)
    except proofcheck.ProofError as exc:
        raise fail(f"proof does not hold: {exc}") from None
    if summary["kind"] == "inclusion":
        e = summary["entry"] or {}
        typer.echo(
            f"OK: leaf {summary['leaf_index']} ({e.get('type')} {e.get('id')}, {e.get('stream')} seq {e.get('seq')}) "
            f"is in {summary['origin']} at tree size {summary['tree_size']}"
        )
    elif summary["kind"] == "events":
        typer.echo(f"OK: {len(summary['entries'])} events are in {summary['origin']} at tree size {summary['tree_size']}")
    else:
        typer.echo(f"OK: {summary['origin']} at size {summary['new_size']} extends size {summary['old_size']}")


@proof_app.command("audit")
@errors_to_exit
def proof_audit(archive: Optional[Path] = ARCHIVE_OPT) -> None:
    """Recompute every leaf from the archive and check it, and every signed checkpoint, against the log."""
    from scf.projections import tlog

    report = tlog.open_log(load_settings(), archive).audit()
    for line in report.lines():
        typer.echo(line)
    if not report.ok:
        raise typer.Exit(1)


@proof_app.command("rebuild")
@errors_to_exit
def proof_rebuild(
    archive: Optional[Path] = ARCHIVE_OPT,
    from_bus: bool = typer.Option(False, "--from-bus", help="the log directory is lost: restore from the archive and the newest proof.checkpoint event"),
    key: str = KEY_OPT,
) -> None:
    """Rebuild the stored tree from the archive (same order, same watermark), then audit it."""
    from scf.projections import tlog

    settings = load_settings()
    if from_bus:

        async def main() -> tlog.SyncReport:
            bus = await open_bus(settings, "scf-proof")
            try:
                return await tlog.restore_from_bus(settings, bus, archive_dir=archive, key_name=key)
            finally:
                await bus.close()

        typer.echo(run(main()).line())
        log = tlog.open_log(settings, archive)
        audit = log.audit()
    else:
        with tlog.open_log(settings, archive) as log:
            report = log.rebuild()
            typer.echo(report.line())
            audit = log.audit()
    for line in audit.lines():
        typer.echo(line)
    if not audit.ok:
        raise typer.Exit(1)
