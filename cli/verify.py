"""`scf verify`: the safety gate's rules and physical checks offline (library: scf.producers.compliance)."""

from __future__ import annotations

from pathlib import Path

import typer

from scf.cli.common import fail, load_settings, run


def register(app: typer.Typer, run_app: typer.Typer) -> None:
    app.command("verify")(verify_command)


def verify_command(
    path: Path = typer.Argument(..., help="a proposed state (JSON: domain, context, state, previous?) or a capsule directory"),
    gear: str = typer.Option("STANDARD", "--gear", help="the gear a capsule's deploy intent is ruled under"),
) -> None:
    """Run the safety gate's rules and physical checks on a state or capsule, offline; print every finding (exit 1 on any refusal)."""
    from scf.bus.errors import SCFError
    from scf.cli.strike import checked_trust
    from scf.producers import compliance

    settings = load_settings()
    try:
        trust = run(checked_trust(settings)) if path.is_dir() else None  # the regiment's trust list (cli/strike.py)
        rulings = compliance.verify_file(path, trust, gear=gear)
    except SCFError as exc:
        raise fail(str(exc)) from None
    bad = False
    for what, r in rulings:
        typer.echo(f"{what}: {r.decision} ({r.gate}{'' if r.final else ', not final'})")
        for reason in r.reasons:
            typer.echo(f"  - {reason}")
        bad = bad or r.decision == "REJECT"
    if bad:
        raise typer.Exit(1)
