"""The control plane and the safety gate on the command line.

    scf run daemon                      the pulse / orient / act loop; applies control.*
    scf run safety                      the safety gate: verdicts on intents, code, states
    scf control watch-file PATH         the seed's control.json interface → control.*
    scf safety check-code FILE.py       the capability gate on a file (deny-list as explanations; exit 1 when rejected)
    scf safety check-rules [FILE]       validate a rules file and print its rules
    scf safety context [KEY [VALUE]]    list, read or set context facts (scf_context)
    scf safety held                     subjects waiting for a human (approve / reject)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from scf.cli.common import fail, load_settings, open_bus, run

safety_app = typer.Typer(rich_markup_mode="markdown", help="The safety gate: ethics limiter, contextual rules, context facts, held subjects.", no_args_is_help=True)


# --------------------------------------------------------------------------- processes
def run_daemon() -> None:
    """The daemon: applies control commands, pulses at the gear's heartbeat, emits training
    intents, verifies and promotes checkpoints."""
    from scf.producers.daemon import DaemonSettings, serve

    async def main() -> None:
        s = load_settings("daemon")
        bus = await open_bus(s, "scf-daemon", sign=True)  # promotions signed: the release signature
        await serve(bus, s, s.section("daemon", DaemonSettings))

    run(main())


def run_safety(rules: Optional[Path] = typer.Option(None, help="rules file (default: [safety] rules, or the built-in default.toml)")) -> None:
    """The safety gate: rules on every intent, code proposal and proposed state."""
    import msgspec

    from scf.consumers.safety import SafetySettings, serve

    async def main() -> None:
        s = load_settings("safety")
        cfg = s.section("safety", SafetySettings)
        if rules is not None:
            cfg = msgspec.structs.replace(cfg, rules=str(rules))
        bus = await open_bus(s, "scf-safety")
        await serve(bus, cfg)

    run(main())


# --------------------------------------------------------------------------- control file
def control_watch_file(
    path: Path = typer.Argument(..., help="the control file, e.g. data/scf/control.json"),
    poll: float = typer.Option(0.2, help="seconds between checks of the file"),
    once: bool = typer.Option(False, "--once", help="send the file's commands if new, then exit"),
) -> None:
    """Turn commands written to a JSON file ({"command": "SHIFT_GEAR", "payload": {...}}) into
    control.* messages (signed when SCF_KEY is set)."""

    from scf.bus.runner import run_all
    from scf.cli.common import echo_err, signing_key
    from scf.producers.control_file import ControlFileWatcher

    async def main() -> None:
        s = load_settings("control-file")
        bus = await open_bus(s, "scf-control-file", sign=True)
        watcher = ControlFileWatcher(bus, path, s.path("system_cache"), key=signing_key(s), poll=poll, on_error=lambda m: echo_err(f"Error: {m}"))
        if not once:
            typer.echo(f"watching {path} (Ctrl-C stops)")
            # the shutdown contract of `scf run X` (docs/architecture.md "Stopping a process"):
            # the loop ends at the stop, the connection is closed within CLOSE_S
            await run_all(bus, [watcher.run])
            return
        try:
            n = await watcher.check()
            typer.echo(f"sent {n} command(s) from {path}")
        finally:
            await bus.close()

    run(main())


# --------------------------------------------------------------------------- safety tools
@safety_app.command("check-code")
def safety_check_code(
    file: Path = typer.Argument(..., help="a Python file to analyse (never run)"),
    contract: bool = typer.Option(True, "--contract/--no-contract", help="also check the Controller contract (docs/codegen.md); --no-contract for a helper module"),
    sandbox: list[str] = typer.Option([], help="sandbox root directories for the explanations (default: [safety] sandbox_roots)"),
) -> None:
    """The safety gate's static ruling on a file: the capability gate (default deny: every construct outside the allow-list, and what the Controller contract misses), each finding with its line, then the deny-list's explanations ("why it matters"); exit 1 when it would be rejected."""
    from scf.consumers.safety import SafetySettings
    from scf.domains import ethics

    s = load_settings()
    cfg = s.section("safety", SafetySettings)
    try:
        code = file.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise fail(f"cannot read {file}: {exc.strerror}") from None
    findings = ethics.gate(code, ethics.CONTROLLER if contract else None, max_bytes=cfg.max_code_bytes)
    for f in findings:
        typer.echo(f"{file}:{f.line}: {f.category}: {f.detail}")
    if findings:
        why = ethics.explain(code, ethics.EthicsConfig(sandbox_roots=tuple(sandbox or cfg.sandbox_roots), max_bytes=cfg.max_code_bytes))
        for f in why:
            typer.echo(f"why it matters: {file}:{f.line}: {f.category}: {f.detail}")
        typer.echo(f"REJECT: {len(findings)} finding(s) of the capability gate")
        raise typer.Exit(1)
    typer.echo("APPROVE: every construct is within the capability set" + (" and the Controller contract holds" if contract else ""))


@safety_app.command("check-rules")
def safety_check_rules(file: Optional[Path] = typer.Argument(None, help="rules file (default: [safety] rules or the built-in one)")) -> None:
    """Validate a rules file and list its rules (deny overrides hold overrides allow; default deny)."""
    from scf.bus.errors import SCFError
    from scf.consumers.regulator import RuleSet
    from scf.consumers.safety import SafetySettings

    s = load_settings()
    try:
        rules = RuleSet.load(file or s.section("safety", SafetySettings).rules or None)
    except SCFError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"{rules.source}: {len(rules.rules)} rules")
    for r in rules.rules:
        cond = ", ".join(f"{k}={v}" for k, v in {**r.when, **{f'params.{k}': v for k, v in r.params.items()}}.items())
        typer.echo(f"  {r.decision:<5} {r.name:<36} kinds={','.join(r.kinds)} domains={','.join(r.domains)}{' when ' + cond if cond else ''}")


@safety_app.command("context")
def safety_context(
    key: Optional[str] = typer.Argument(None, help="a fact name, e.g. grid.state"),
    value: Optional[str] = typer.Argument(None, help="set the fact to this value (text or JSON scalar)"),
    delete: bool = typer.Option(False, "--delete", help="remove the fact"),
) -> None:
    """List the context facts, read one, set one (KEY VALUE) or remove one (--delete)."""
    from nats.js.errors import KeyNotFoundError, NoKeysError

    from scf.consumers.safety import SafetySettings

    async def main() -> None:
        s = load_settings()
        bucket = s.section("safety", SafetySettings).context_bucket
        bus = await open_bus(s)
        try:
            kv = await bus.kv(bucket)
            if key and delete:
                await kv.delete(key)
                typer.echo(f"removed {key}")
            elif key and value is not None:
                await kv.put(key, value.encode())
                typer.echo(f"{key} = {value}")
            elif key:
                try:
                    entry = await kv.get(key)
                except KeyNotFoundError:
                    raise fail(f"no fact {key!r} in {bucket}: set it with `scf safety context {key} VALUE`") from None
                typer.echo((entry.value or b"").decode(errors="replace"))
            else:
                try:
                    keys = await kv.keys()
                except NoKeysError:  # nats-py raises when the bucket is empty
                    keys = []
                for k in sorted(keys):
                    e = await kv.get(k)
                    typer.echo(f"{k} = {(e.value or b'').decode(errors='replace')}")
        finally:
            await bus.close()

    run(main())


@safety_app.command("held")
def safety_held() -> None:
    """Subjects the safety gate held for a human, with the command to decide each."""
    from scf.producers.daemon import HoldsView

    async def main() -> None:
        bus = await open_bus(load_settings())
        view = HoldsView(bus)
        try:
            await view.start()
            await view.caught_up.wait()
            held = view.held
        finally:
            await view.stop()
            await bus.close()
        if not held:
            typer.echo("nothing is waiting for a human")
        for r in held:
            typer.echo(f"{r.subject_type:<7} {r.subject_id:<40} {r.kind or '-':<9} {r.domain or '-':<16} gate {r.gate}"
                       f"   scf control approve {r.subject_id}")

    run(main())


def register(app: typer.Typer, run_app: typer.Typer) -> None:
    from scf.cli.core import control_app

    run_app.command("daemon")(run_daemon)
    run_app.command("safety")(run_safety)
    control_app.command("watch-file")(control_watch_file)
    app.add_typer(safety_app, name="safety")
