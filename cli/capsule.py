"""`scf capsule build|verify|deploy`: signed, versioned capsules (library: scf.producers.capsule)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from scf.cli.common import fail, load_settings, open_bus, run

capsule_app = typer.Typer(rich_markup_mode="markdown", help="Capsules: a signed manifest.yaml and its artifacts, deployed through the planner and edge agents (docs/value-loop.md).", no_args_is_help=True)


def register(app: typer.Typer, run_app: typer.Typer) -> None:
    app.add_typer(capsule_app, name="capsule")


@capsule_app.command("build")
def capsule_build(
    contract: str = typer.Option(..., "--contract", help="a registered contract: its decision goes into the capsule"),
    out: Path = typer.Option(..., "--out", help="the capsule directory to write"),
    version: int = typer.Option(1, "--version", help="the capsule's version (an edge agent refuses to go down)"),
    key: str = typer.Option("release", "--key", help="the release key in $SCF_HOME/keys"),
) -> None:
    """Optimise a contract and write its capsule (manifest.yaml, model.safetensors, capsule.sig), signed."""
    from scf.cli.strike import checked_trust, release_key, signed_terms
    from scf.producers import capsule as cap
    from scf.producers import contracts
    from scf.producers import strike as st

    async def main() -> Path:
        s = load_settings()
        k = release_key(s, key)
        bus = await open_bus(s)
        try:
            c = await contracts.get(bus, contract, signed_terms(s, await checked_trust(s, bus)))
            opts = st.StrikeOptions(model=await st.production_model(bus, c.spec.domain), period=st.period_of(c.spec, time.time()))
        finally:
            await bus.close()
        inputs_sha = st.sha256_json(st.inputs_of(c.spec, opts))
        solved = st.solve(c.spec, opts)
        m = cap.Manifest(format=cap.FORMAT, capsule_id=f"capsule-{contract}-v{version}", version=version, contract_id=contract,
                         domain=c.spec.domain, activity_id=st.activity_id_for(contract, inputs_sha), inputs_sha256=inputs_sha,
                         model=solved.model_id,
                         decision=cap.DecisionInfo(hours=solved.hours, contexts=solved.contexts.tolist(), state_names=solved.state_names,
                                                   method=solved.method, cost=solved.cost, lower_bound=solved.lower_bound, rel_gap=solved.rel_gap))
        return cap.build(out, m, solved.states, k)

    d = run(main())
    typer.echo(f"capsule written to {d} (verify it with `scf capsule verify {d}`)")


@capsule_app.command("verify")
def capsule_verify(directory: Path = typer.Argument(..., help="the capsule directory")) -> None:
    """Check a capsule offline: release signature, artifact hashes, manifest keys, each decision row's physics."""
    from scf.cli.strike import checked_trust
    from scf.producers import capsule as cap

    checked = cap.verify(directory, run(checked_trust(load_settings())))  # the regiment's trust list (no bus without a root)
    if not checked.ok:
        for f in checked.findings:
            typer.echo(f"- {f}")
        raise fail(f"capsule {directory} does not hold ({len(checked.findings)} finding(s))")
    m = checked.manifest
    assert m is not None
    typer.echo(f"OK: {m.capsule_id} v{m.version} for contract {m.contract_id} ({m.domain}), signed by {checked.signer}")


@capsule_app.command("deploy")
def capsule_deploy(
    directory: Path = typer.Argument(..., help="the capsule directory"),
    nodes: str = typer.Option(..., "--nodes", help="the edge nodes (a,b)"),
    key: str = typer.Option("release", "--key", help="the release key in $SCF_HOME/keys"),
) -> None:
    """Verify a capsule, promote it under the release key and create its deploy intent (the gate rules; a human approves at low gears)."""
    from scf.cli.strike import checked_trust, release_key
    from scf.producers import capsule as cap
    from scf.producers import strike as st

    s = load_settings()

    async def main():
        bus = await open_bus(s, sign=True)
        try:
            trust = await checked_trust(s, bus)  # the regiment's, as the deploy planner verifies it
            checked = cap.verify(directory, trust)
            if not checked.ok or checked.manifest is None:
                raise fail(f"capsule {directory} does not hold: {'; '.join(checked.findings)}")
            return await st.deploy_capsule(bus, s, directory, checked.manifest, [n for n in nodes.split(",") if n], release_key(s, key), trust)
        finally:
            await bus.close()

    _, pseq, _, intent, once = run(main())
    iid = intent.data.intent_id
    typer.echo(f"capsule promoted (CHECKPOINTS seq {pseq}); deploy intent {iid} {'created' if once.status == 'new' else 'already exists'}")
    typer.echo(f"approve it with: scf control approve {iid}")
