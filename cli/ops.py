"""Operations: `scf up`, `scf service install`, `scf demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from scf.cli.common import fail, load_settings, run

service_app = typer.Typer(rich_markup_mode="markdown", help="Service files to run SCF processes permanently (systemd, launchd).", no_args_is_help=True)


def up(
    only: Optional[list[str]] = typer.Option(None, "--only", help="run only these processes (repeatable)"),
    except_: Optional[list[str]] = typer.Option(None, "--except", help="run all but these (repeatable)"),
    edges: int = typer.Option(2, help="edge agents to run on this machine"),
    pool: str = typer.Option("local", help="the local worker's pool"),
) -> None:
    """Start nats-server (embedded unless NATS_URL is set) and every process, supervised."""
    from scf.ops.supervisor import Supervisor, default_processes, select

    settings = load_settings("up")

    async def main() -> None:
        from scf.bus.runner import install_signal_handlers

        procs = select(default_processes(settings, edges, pool), only, except_)
        sup = Supervisor(settings, procs, echo=typer.echo)
        install_signal_handlers(sup.stop_event)
        await sup.run()

    run(main())


@service_app.command("install")
def service_install(
    process: Optional[list[str]] = typer.Option(None, "--process", help="process to install (repeatable; default: all)"),
    flavour: str = typer.Option("auto", help="systemd | launchd | auto (launchd on macOS)"),
    directory: Optional[Path] = typer.Option(None, "--dir", help="where to write the files"),
    print_only: bool = typer.Option(False, "--print", help="print the files instead of writing them"),
) -> None:
    """Write systemd units or launchd plists that run `scf run NAME` permanently."""
    import sys

    from scf.bus.errors import SCFError
    from scf.ops import services
    from scf.ops.supervisor import default_processes, select

    settings = load_settings("service")
    if flavour == "auto":
        flavour = "launchd" if sys.platform == "darwin" else "systemd"
    if flavour not in ("systemd", "launchd"):
        raise fail(f"unknown flavour {flavour!r}: use systemd or launchd")
    try:
        procs = select(default_processes(settings), process, None)
    except SCFError as exc:
        raise fail(str(exc)) from None
    files = services.render(procs, settings, flavour, directory)
    if print_only:
        for f in files:
            typer.echo(f"# {f.path}\n{f.text}")
        return
    for path in services.install(files):
        typer.echo(f"wrote {path}")
    for step in services.next_steps(flavour, files):
        typer.echo(f"then: {step}")


def demo(
    home: Optional[Path] = typer.Option(None, help="a fresh SCF_HOME for the demo (default: $SCF_HOME when set, else ./.scf/demo-<time>)"),
    fossils: int = typer.Option(600, help="fossils to synthesise and ingest (one training pass once 5/6 of them are in)"),
    steps: int = typer.Option(300, help="training steps of the demo's model"),
    kill: Optional[str] = typer.Option(None, help="fault drill: SIGKILL this process after the gear shift (e.g. dispatch)"),
) -> None:
    """The whole loop once, on this machine: fossils → training → promotion → deployment → credits → reports."""
    import asyncio
    import datetime as dt
    import os

    from scf.bus.errors import SCFError
    from scf.ops.demo import DemoFailed, run_demo, summary

    if home is None and os.environ.get("SCF_HOME"):
        home = Path(os.environ["SCF_HOME"]).expanduser()
        typer.echo(f"SCF_HOME is set: the demo runs in {home} (it must be empty or absent; --home DIR to choose another)")
    home = (home or Path(".scf") / f"demo-{dt.datetime.now():%Y%m%d-%H%M%S}").absolute()
    try:
        result = asyncio.run(run_demo(home, typer.echo, fossils=fossils, steps=steps, kill=kill))
    except DemoFailed as exc:
        typer.echo(f"Error: {exc}", err=True)
        typer.echo(f"Look into it: the process logs in {home / 'logs'}; with SCF_HOME={home}: `scf up`, then `scf status`, `scf dlq ls`, `scf events tail 'job.>'`", err=True)
        raise typer.Exit(1) from None
    except SCFError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    for line in summary(result):
        typer.echo(line)


def register(app: typer.Typer, run_app: typer.Typer) -> None:
    app.command("up")(up)
    app.command("demo")(demo)
    app.add_typer(service_app, name="service")
