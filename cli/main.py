"""The `scf` command. Each command is a thin wrapper over a library call.

Command groups live in `cli/<area>.py`; a module that defines `register(app, run_app)`
adds its commands (and its `scf run NAME` processes) — discovered here in name order.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil

import typer

from scf import cli
from scf.bus.errors import ConfigError
from scf.bus.settings import load
from scf.cli import core

app = typer.Typer(rich_markup_mode="markdown",
    help="SCF, the Sovereign Code Foundry: an event-sourced control plane on NATS JetStream.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
run_app = typer.Typer(rich_markup_mode="markdown", help="Run one SCF process in the foreground (SIGTERM / Ctrl-C drains and stops).", no_args_is_help=True)

app.command("init")(core.init)
app.command("status")(core.status)
app.add_typer(core.server_app, name="server")
app.add_typer(core.streams_app, name="streams")
app.add_typer(core.events_app, name="events")
app.add_typer(core.control_app, name="control")
app.add_typer(core.keys_app, name="keys")
app.add_typer(core.dlq_app, name="dlq")
app.add_typer(run_app, name="run")

for info in sorted(pkgutil.iter_modules(cli.__path__), key=lambda m: m.name):
    if info.name in ("main", "core", "common"):
        continue
    module = importlib.import_module(f"scf.cli.{info.name}")
    register = getattr(module, "register", None)
    if register is not None:
        register(app, run_app)


def main() -> None:
    try:
        level = load().log
    except ConfigError:
        level = "WARNING"  # the command itself reports the bad setting, with its fix
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
