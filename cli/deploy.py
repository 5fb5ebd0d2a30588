"""Deployment, edge nodes, energy and the ledger.

    scf run deploy                         the deploy planner
    scf run edge --node ID --dir PATH      an edge node's agent
    scf run ledger                         mints verified savings as credits
    scf deploy request CHECKPOINT_ID       a deploy intent for a promoted checkpoint
    scf nodes ls                           the node registry
    scf energy report --node ID …          a signed energy.measured (for a meter bridge)
    scf ledger balance [ACCOUNT] | history | verify
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Optional

import typer

from scf.cli.common import fail, load_settings, open_bus, run

deploy_app = typer.Typer(rich_markup_mode="markdown", help="Deployments of promoted checkpoints to edge nodes.", no_args_is_help=True)
nodes_app = typer.Typer(rich_markup_mode="markdown", help="The edge node registry (KV scf_nodes).", no_args_is_help=True)
energy_app = typer.Typer(rich_markup_mode="markdown", help="Energy measurements (energy.measured), signed with a node's key.", no_args_is_help=True)
ledger_app = typer.Typer(rich_markup_mode="markdown", help="The negentropy ledger: balances, history, verification.", no_args_is_help=True)


async def _trust(bus, settings):
    """The live trust view: the shared TRUST list (root-signed) + this host's trusted.json (bus/trust.py)."""
    from scf.bus.trust import SharedTrust

    return await SharedTrust.open(bus, settings)


# --------------------------------------------------------------------------- processes


def run_deploy() -> None:
    """The deploy planner: promotions → deploy intents → (approved) orders per node, canary waves, rollbacks."""
    from scf.bus.emergency import EmergencyGate
    from scf.bus.runner import run_all
    from scf.consumers.deploy import DeployPlanner, DeploySettings

    async def main() -> None:
        s = load_settings("deploy")
        bus = await open_bus(s, "scf-deploy", sign=True)
        gate = await EmergencyGate(bus, s.emergency_lock).start()
        planner = DeployPlanner(bus, await _trust(bus, s), s.section("deploy", DeploySettings))
        try:
            await run_all(bus, [r.run for r in planner.runners(pause=gate)])
        finally:
            await gate.stop()

    run(main())


def run_edge(
    node: str = typer.Option(..., "--node", help="this node's id"),
    directory: Path = typer.Option(..., "--dir", help="where artifacts, the current link and the state live"),
    label: list[str] = typer.Option([], "--label", help="KEY=VALUE, repeatable (domain=grid:case14, site=berlin, account=acme)"),
    key: Optional[str] = typer.Option(None, help="the node's signing key (name or path; default $SCF_HOME/keys/<node>.key)"),
    bind_only: bool = typer.Option(False, "--bind-only", help="do not create the consumer edge-<node> (the restricted edge user may not): wait for the deploy planner to create it"),
) -> None:
    """An edge node's agent: verify, activate, health-check, roll back; report meter readings."""
    from scf.bus.client import Bus
    from scf.bus.emergency import EmergencyGate
    from scf.bus.runner import run_all
    from scf.consumers.edge import EdgeAgent, EdgeSettings, load_node_key
    from scf.consumers.nodes import parse_labels

    async def main() -> None:
        s = load_settings(f"edge-{node}")
        labels = parse_labels(label)
        node_key = load_node_key(s.keys_dir, node, key)
        if node_key is None:
            typer.echo(f"warning: no key for node {node} (scf keys new {node}): reports go unsigned and meter readings are not sent", err=True)
        bus = await Bus.connect(s, f"scf-edge-{node}", key=node_key)
        gate = await EmergencyGate(bus, s.emergency_lock).start()
        agent = await EdgeAgent(bus, node, directory, await _trust(bus, s), labels=labels, settings=s.section("edge", EdgeSettings)).start()
        # The runner creates/updates the consumer edge-<node> (the planner creates it too);
        # the edge user of nats/users.conf may not create consumers on DEPLOY: --bind-only.
        runner = agent.runner(pause=gate, create=not bind_only)
        try:
            await run_all(bus, [runner.run, agent.meter.loop, agent.registration, agent.control])
        finally:
            await gate.stop()

    run(main())


def run_ledger() -> None:
    """The ledger: each verified energy.measured becomes one balanced transfer, once per cause, ever."""
    from scf.bus.emergency import EmergencyGate
    from scf.bus.runner import run_all
    from scf.consumers.ledger import Ledger, LedgerSettings

    async def main() -> None:
        s = load_settings("ledger")
        bus = await open_bus(s, "scf-ledger", sign=True)
        gate = await EmergencyGate(bus, s.emergency_lock).start()
        ledger = Ledger(bus, await _trust(bus, s), s.section("ledger", LedgerSettings))
        try:
            await run_all(bus, [lambda stop: ledger.run(stop, pause=gate)])
        finally:
            await gate.stop()

    run(main())


# --------------------------------------------------------------------------- deploy


@deploy_app.command("request")
def deploy_request(
    checkpoint_id: str = typer.Argument(..., help="a promoted checkpoint"),
    target: str = typer.Option("", help="node ids (a,b) or a label selector (domain=grid:case14); default domain=<its domain>"),
    strategy: str = typer.Option("canary", help="canary | all"),
    alias: Optional[str] = typer.Option(None, help="which promotion of the checkpoint (default: the latest)"),
) -> None:
    """Create the deploy intent for a promoted checkpoint (the safety gate rules on it; a human approves at low gears)."""
    from scf.consumers.deploy import DeployPlanner, deploy_intent, find_promotion
    from scf.consumers.nodes import parse_target

    if strategy not in ("canary", "all"):
        raise fail(f"unknown strategy {strategy!r}: use canary or all")
    if target:
        parse_target(target)

    async def main() -> None:
        s = load_settings()
        bus = await open_bus(s, sign=True)
        try:
            seq, promotion = await find_promotion(bus, checkpoint_id, alias)
            planner = DeployPlanner(bus, await _trust(bus, s))
            intent = deploy_intent(promotion, seq, target=target, strategy=strategy, source=bus.source,  # type: ignore[arg-type]
                                   gear=await planner.current_gear())
            once = await bus.publish_once(intent)
        finally:
            await bus.close()
        i = intent.data
        what = {"new": "created", "duplicate": "already exists", "conflict": "already exists with other params (kept)"}[once.status]
        typer.echo(f"deploy intent {i.intent_id} {what}: {i.reason} (INTENTS seq {once.seq})")
        typer.echo(f"approve it with: scf control approve {i.intent_id}")

    run(main())


# --------------------------------------------------------------------------- nodes


@nodes_app.command("ls")
def nodes_ls() -> None:
    """List registered edge nodes: what each runs, its status and labels."""
    from scf.consumers.nodes import read_nodes

    async def main() -> None:
        s = load_settings()
        bus = await open_bus(s)
        try:
            entries = await read_nodes(bus, await _trust(bus, s))
        finally:
            await bus.close()
        if not entries:
            typer.echo("no edge node has registered (start one with `scf run edge --node ID --dir PATH`)")
        for n, key, problem in entries:
            if problem:  # not signed by the node's own trusted key: planner and ledger ignore it
                typer.echo(f"{key:<20} IGNORED      {problem}")
                continue
            assert n is not None
            labels = ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())) or "-"
            running = f"{n.domain} v{n.version} {n.checkpoint_id}" if n.checkpoint_id else "-"
            when = n.updated_at.isoformat(timespec="seconds") if n.updated_at else "-"
            runs = f"  runs {' or '.join(n.runs)} only" if n.runs else ""  # [edge] runs: the model kinds it deploys
            typer.echo(f"{n.node:<20} {n.status:<12} {running:<60} {labels}  {when}{runs}")

    run(main())


# --------------------------------------------------------------------------- energy


def _time(text: str, name: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise fail(f"--{name} {text!r} is not an ISO time (e.g. 2026-11-22T10:00:00Z)") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


@energy_app.command("report")
def energy_report(
    node: str = typer.Option(..., help="the node whose savings these are"),
    baseline: float = typer.Option(..., help="baseline kWh over the period"),
    actual: float = typer.Option(..., help="measured kWh over the period"),
    start: str = typer.Option(..., help="period start (ISO time)"),
    end: str = typer.Option(..., help="period end (ISO time)"),
    method: str = typer.Option("metered-vs-baseline", help="measurement method (e.g. ipmvp-option-b)"),
    deployment: Optional[str] = typer.Option(None, help="the deployment the saving is due to"),
    domain: str = typer.Option("", help="the domain (e.g. grid:case14)"),
    meter: str = typer.Option("", help="which of the node's meters (default: its main meter)"),
    key: Optional[str] = typer.Option(None, help="signing key (name or path; default $SCF_HOME/keys/<node>.key)"),
    cv_rmse: Optional[float] = typer.Option(None, "--cv-rmse", help="the baseline model's calibration CV(RMSE), a fraction (0.12 = 12 %)"),
    nmbe: Optional[float] = typer.Option(None, help="the calibration's NMBE, a signed fraction (-0.03 = -3 %)"),
    points: Optional[int] = typer.Option(None, help="measured intervals the calibration compared"),
    interval: str = typer.Option("hourly", help="the calibration's data interval: hourly or monthly (ASHRAE Guideline 14)"),
    uncertainty: Optional[float] = typer.Option(None, help="the saving's uncertainty: half-width of its interval at --confidence, kWh"),
    confidence: float = typer.Option(0.9, help="the uncertainty's confidence level (at least 0.68)"),
    model: str = typer.Option("", help="what was calibrated, against what (recorded with the calibration)"),
    uncalibrated: bool = typer.Option(False, "--uncalibrated", help="a plain reading without M&V figures: minted only by a ledger whose require_calibration is false (not IPMVP Option D)"),
) -> None:
    """Publish a signed energy.measured for NODE (what a meter bridge calls), with its M&V figures (docs/mv.md)."""
    from scf.bus import events as ev
    from scf.bus.client import Bus
    from scf.consumers.edge import load_node_key
    from scf.consumers.energy import calibration_problem, finite_kwh, measurement_event

    for name, value in (("baseline", baseline), ("actual", actual)):
        problem = finite_kwh(f"--{name}", value)
        if problem:
            raise fail(f"{problem}: give the kWh measured over the period as a plain number (e.g. --{name} 12.5)")
    t0, t1 = _time(start, "start"), _time(end, "end")
    if t1 <= t0:
        raise fail(f"--end {end} is not after --start {start}: a measured period must have a positive length")
    figures = {"--cv-rmse": cv_rmse, "--nmbe": nmbe, "--points": points, "--uncertainty": uncertainty}
    given = [k for k, v in figures.items() if v is not None]
    calibration = None
    if uncalibrated and given:
        raise fail(f"--uncalibrated with {', '.join(given)}: give the M&V figures or --uncalibrated, not both")
    if not uncalibrated:
        if not given:
            raise fail("no M&V figures: the ledger mints a saving only against a baseline calibrated to ASHRAE Guideline 14 "
                       "with its uncertainty stated: give --cv-rmse, --nmbe, --points and --uncertainty (docs/mv.md), or "
                       "--uncalibrated for a ledger that sets [ledger] require_calibration = false")
        if missing := [k for k, v in figures.items() if v is None]:
            raise fail(f"{', '.join(given)} without {', '.join(missing)}: the M&V figures go together "
                       "(--cv-rmse, --nmbe, --points and --uncertainty; docs/mv.md)")
        if points < 2:
            raise fail(f"--points {points}: a calibration compares at least 2 measured intervals")
        calibration = ev.Calibration(interval=interval, points=points, cv_rmse=cv_rmse, nmbe=nmbe, model=model)
        if (problem := calibration_problem(calibration, uncertainty, confidence)) is not None:
            raise fail(f"{problem}: not reported")

    async def main() -> None:
        s = load_settings(f"energy-{node}")
        k = load_node_key(s.keys_dir, node, key)
        if k is None:
            raise fail(f"no signing key for node {node}: create it with `scf keys new {node}` or pass --key")
        bus = await Bus.connect(s, "scf-energy", key=k)
        try:
            event = measurement_event(node, period_start=t0, period_end=t1, baseline_kwh=baseline, actual_kwh=actual,
                                      method=method, deployment_id=deployment, domain=domain, meter=meter,
                                      source=bus.source, calibration=calibration,
                                      uncertainty_kwh=uncertainty if calibration else None,
                                      confidence=confidence if calibration else 0.0)
            ack = await bus.publish(event)
        finally:
            await bus.close()
        mv = (f" ± {uncertainty:g} kWh ({confidence:.0%}), calibration {interval} CV(RMSE) {cv_rmse:.1%} NMBE {nmbe:+.1%}"
              if calibration else " (uncalibrated: minted only where [ledger] require_calibration = false)")
        typer.echo(f"measurement {event.data.measurement_id}: {baseline - actual:g} kWh saved{mv}; DEPLOY seq {ack.seq}"
                   + (" (duplicate)" if ack.duplicate else ""))

    run(main())


# --------------------------------------------------------------------------- ledger


@ledger_app.command("balance")
def ledger_balance(
    account: Optional[str] = typer.Argument(None, help="one account (e.g. node:edge-1); default: all"),
    unit: str = typer.Option("kwh-electric", help="the instrument: kwh-electric, kwh-fuel (none: transfers minted before units)"),
) -> None:
    """Balances of one unit computed from the log (credits, 6 decimals); units are never added together."""
    from scf.consumers.ledger import UNITS, balances_by_unit, fmt_credits, norm_unit, read_transfers, unit_label

    want = "" if norm_unit(unit) == "none" else norm_unit(unit)
    if want and want not in UNITS:
        typer.echo(f"Error: --unit {unit!r} is not a unit of the ledger: use one of {', '.join(UNITS)} (or none)", err=True)
        raise typer.Exit(1)

    async def main() -> None:
        bus = await open_bus(load_settings())
        try:
            by_unit = balances_by_unit(await read_transfers(bus))
        finally:
            await bus.close()
        bal = by_unit.get(want, {})
        others = [u for u in sorted(by_unit) if u != want]
        typer.echo(f"{unit_label(want)}: credits of {UNITS.get(want, 'kWh of an unrecorded unit')} × rate"
                   + (f"; the ledger also holds {', '.join(unit_label(u) for u in others)} (--unit)" if others else ""), err=True)
        if account is not None:
            typer.echo(f"{account}  {fmt_credits(bal.get(account, 0))}")
            return
        if not bal:
            typer.echo("the ledger is empty" if not by_unit else f"no credits in {unit_label(want)}")
        for name in sorted(bal):
            typer.echo(f"{name:<40} {fmt_credits(bal[name]):>20}")

    run(main())


@ledger_app.command("history")
def ledger_history(
    account: Optional[str] = typer.Option(None, help="only transfers touching this account"),
    limit: int = typer.Option(50, help="the last N transfers (0: all)"),
) -> None:
    """Transfers in log order: seq, time, debit → credit, amount, kWh, cause."""
    from scf.consumers.ledger import fmt_credits, read_transfers

    async def main() -> None:
        bus = await open_bus(load_settings())
        try:
            entries = await read_transfers(bus)
        finally:
            await bus.close()
        if account:
            entries = [e for e in entries if account in (e.transfer.debit_account, e.transfer.credit_account)]
        if limit:
            entries = entries[-limit:]
        for e in entries:
            t = e.transfer
            typer.echo(f"{e.seq:>8} {e.at[:19]}  {t.debit_account} -> {t.credit_account}  {fmt_credits(t.micro_credits)}"
                       f"  {t.kwh:g} {t.unit or 'kWh (unit not recorded)'} @ {t.rate:g}  cause {t.cause_id}")

    run(main())


@ledger_app.command("verify")
def ledger_verify(
    causes: bool = typer.Option(True, help="also check each transfer against its measurement in the DEPLOY log"),
) -> None:
    """Recompute every balance from the log; check debits = credits, no cause minted twice, no overlapping periods."""
    from scf.consumers.ledger import LedgerSettings, verify

    async def main() -> bool:
        s = load_settings()
        bus = await open_bus(s)
        try:
            report = await verify(bus, check_causes=causes, trust=await _trust(bus, s), settings=s.section("ledger", LedgerSettings))
        finally:
            await bus.close()
        for line in report.lines():
            typer.echo(line)
        return report.ok

    if not run(main()):
        raise typer.Exit(1)


def register(app: typer.Typer, run_app: typer.Typer) -> None:
    run_app.command("deploy")(run_deploy)
    run_app.command("edge")(run_edge)
    run_app.command("ledger")(run_ledger)
    app.add_typer(deploy_app, name="deploy")
    app.add_typer(nodes_app, name="nodes")
    app.add_typer(energy_app, name="energy")
    app.add_typer(ledger_app, name="ledger")
