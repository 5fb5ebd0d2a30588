"""`scf nats users`: nats/users.conf with a login per edge box (ops/natsconf.py, docs/security.md "Edge logins")."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from scf.cli.common import fail

nats_app = typer.Typer(rich_markup_mode="markdown", help="NATS server configuration: users.conf with a login per edge box.", no_args_is_help=True)


def register(app: typer.Typer, run_app: typer.Typer) -> None:
    app.add_typer(nats_app, name="nats")


@nats_app.command("users")
def nats_users(
    edge_node: list[str] = typer.Option([], "--edge-node", help="an edge box's node id, repeatable: it gets the login edge-<node>"),
    out: Optional[Path] = typer.Option(None, "--out", help="write here (default: print); include it as users.conf"),
    keep_shared: bool = typer.Option(False, "--keep-shared", help="keep the shared `edge` login beside them (while boxes move over; "
                                     "it keeps the hole a login per box closes)"),
    source: Optional[Path] = typer.Option(None, "--from", help="the users.conf to start from (default: the repository's nats/users.conf)"),
) -> None:
    """Print (or write) users.conf with one user `edge-<node>` per box instead of the shared `edge` login:
    each may pull and ack only its own deploy consumer, read only its own inbox, write only its own registry entry."""
    from scf.bus.errors import ConfigError
    from scf.ops import natsconf

    try:
        text = natsconf.users_conf(edge_node, keep_shared=keep_shared, **({"source": source} if source else {}))
    except (ConfigError, OSError) as exc:
        raise fail(str(exc)) from None
    if out is None:
        typer.echo(text, nl=False)
        return
    out.write_text(text)
    typer.echo(f"wrote {out}: {len(edge_node)} edge logins; set " + ", ".join(natsconf.password_var(n) for n in dict.fromkeys(edge_node))
               + " for the server, and NATS_URL=nats://edge-<node>:<password>@host:4222 on each box")
