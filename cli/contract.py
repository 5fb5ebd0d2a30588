"""`scf contract add|ls|show|end`: client contracts on the log (library: scf.producers.contracts)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from scf.cli.common import load_settings, open_bus, run

UNSIGNED_NOTE = ("note: unsigned (no SCF_KEY): the regiment strikes only contracts an operator key signed; "
                 "register it again with SCF_KEY set to an operator key")

async def signed_view(bus, settings):
    """For a signing bus, the trust list of the regiment's view (operator-signed events; this
    key among them, in memory only): unsigned events someone else wrote neither make a write
    "unchanged" or "already ended" nor keep it from counting. None when not signing."""
    if bus.key is None:
        return None
    from scf.bus.signing import TrustList
    from scf.cli.strike import checked_trust

    trust = TrustList(dict((await checked_trust(settings, bus)).keys), None)  # a copy: this key added in memory only
    trust.trust(bus.key.public_b64, bus.key.name, ["operator"])
    return trust


async def terms_trust(bus, settings, unsigned: bool):
    """The trust list `ls`/`show` read terms with: the regiment's (cli/strike.py `signed_terms`
    over `checked_trust`: on a host that pins a root, the signed TRUST list, not keys/trusted.json),
    so what is printed is what would be struck; `--unsigned` (None) counts every event."""
    if unsigned:
        return None
    from scf.cli.strike import checked_trust, signed_terms

    return signed_terms(settings, await checked_trust(settings, bus))


contract_app = typer.Typer(rich_markup_mode="markdown", help="Client contracts: constraints, nodes and schedule, as facts on the log (docs/value-loop.md).", no_args_is_help=True)


def register(app: typer.Typer, run_app: typer.Typer) -> None:
    app.add_typer(contract_app, name="contract")


@contract_app.command("add")
def contract_add(file: Path = typer.Argument(..., help="the contract: JSON or YAML {contract_id, client, domain, nodes, constraints, schedule_s}")) -> None:
    """Register a contract (or record an update when it exists with other content); bad fields are named by their path."""
    from scf.producers import contracts

    async def main() -> None:
        doc = contracts.read_doc(file)
        s = load_settings()
        bus = await open_bus(s, sign=True)
        try:
            what, event, seq = await contracts.add(bus, doc, by=s.source, trust=await signed_view(bus, s))
        finally:
            await bus.close()
        typer.echo(f"contract {doc.contract_id} {what} (CONTRACTS seq {seq}): {doc.domain} on {', '.join(doc.nodes) or 'no nodes'}")
        if bus.key is None and what != "unchanged":
            typer.echo(UNSIGNED_NOTE, err=True)

    run(main())


@contract_app.command("ls")
def contract_ls(
    all_: bool = typer.Option(False, "--all", help="ended contracts too"),
    unsigned: bool = typer.Option(False, "--unsigned", help="every event on the log, signed or not (not what the regiment strikes)"),
) -> None:
    """List the contracts as the regiment reads them (operator-signed terms): id, status, client, domain, nodes, schedule."""
    from scf.producers import contracts

    async def main() -> None:
        s = load_settings()
        bus = await open_bus(s)
        try:
            trust = await terms_trust(bus, s, unsigned)
            found = await contracts.load(bus, trust=trust)
            every = found if trust is None else await contracts.load(bus)
        finally:
            await bus.close()
        rows = [c for c in found.values() if all_ or c.spec.status != "ended"]
        if not rows:
            typer.echo("no contracts: register one with `scf contract add FILE`")
        differ = sorted(cid for cid, c in every.items() if cid not in found or found[cid].history != c.history)
        if differ:
            typer.echo(f"note: unsigned events not counted for {', '.join(differ)} (the regiment strikes operator-signed "
                       "terms only): `scf contract ls --unsigned` lists every event's view", err=True)
        for c in sorted(rows, key=lambda c: c.spec.contract_id):
            s = c.spec
            typer.echo(f"{s.contract_id:24} {s.status:7} {s.client:16} {s.domain:14} nodes={','.join(s.nodes) or '-'} every {s.schedule_s:g} s")

    run(main())


@contract_app.command("show")
def contract_show(
    contract_id: str = typer.Argument(..., help="the contract id"),
    unsigned: bool = typer.Option(False, "--unsigned", help="every event on the log, signed or not (not what the regiment strikes)"),
) -> None:
    """Print a contract as JSON as the regiment reads it (operator-signed terms), with the log positions of its events."""
    import msgspec

    from scf.producers import contracts

    async def main() -> None:
        s = load_settings()
        bus = await open_bus(s)
        try:
            trust = await terms_trust(bus, s, unsigned)
            every = await contracts.load(bus, contract_id)
            c = (await contracts.load(bus, contract_id, trust)).get(contract_id) if trust is not None else every.get(contract_id)
        finally:
            await bus.close()
        if c is None and contract_id in every:
            raise contracts.ContractError(
                f"contract {contract_id!r} has no operator-signed terms: the regiment will not strike it; register it "
                f"with SCF_KEY set to an operator key, or `scf contract show {contract_id} --unsigned` to read what is on the log")
        if c is None:
            raise contracts.ContractError(f"no contract {contract_id!r}: register it with `scf contract add FILE` (see `scf contract ls`)")
        if contract_id in every and every[contract_id].history != c.history:
            typer.echo(f"note: unsigned events on the log are not counted here (the regiment strikes operator-signed terms "
                       f"only): `scf contract show {contract_id} --unsigned` prints every event's view", err=True)
        out = msgspec.to_builtins(c.spec)
        out["constraints"] = json.loads(c.spec.constraints)
        out["contract_sha256"] = contracts.spec_sha256(c.spec)
        out["history"] = [{"seq": s, "type": t, "id": i} for s, t, i in c.history]
        typer.echo(json.dumps(out, indent=2))

    run(main())


@contract_app.command("end")
def contract_end(
    contract_id: str = typer.Argument(..., help="the contract id"),
    reason: str = typer.Option("", "--reason", help="why it ends (recorded)"),
) -> None:
    """End a contract: the regiment strikes it no more."""
    from scf.producers import contracts

    async def main() -> None:
        s = load_settings()
        bus = await open_bus(s, sign=True)
        try:
            _, seq = await contracts.end(bus, contract_id, by=s.source, reason=reason, trust=await signed_view(bus, s))
        finally:
            await bus.close()
        typer.echo(f"contract {contract_id} ended (CONTRACTS seq {seq})")

    run(main())
