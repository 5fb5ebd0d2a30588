"""`scf strike`, `scf run regiment` and the strike-proof check behind `scf proof verify`
(libraries: scf.producers.strike, scf.producers.regiment; docs/value-loop.md)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from scf.cli.common import fail, load_settings, open_bus, run

KEY_OPT = typer.Option("release", "--key", help="the release key in $SCF_HOME/keys: signs the capsule and the proof")


def register(app: typer.Typer, run_app: typer.Typer) -> None:
    app.command("strike")(strike_command)
    run_app.command("regiment")(run_regiment)


def release_key(settings, name: str):
    from scf.bus.signing import SigningKey

    path = Path(name) if Path(name).suffix else settings.keys_dir / f"{name}.key"
    if not path.is_file():
        raise fail(f"no release key {path}: create it with `scf keys new {name}` and trust it with the release role")
    return SigningKey.load(path)


def trust_list(settings):
    """Where this host pins no root key, its whole trust list without a bus: keys/trusted.json
    as `[trust] local_file` says (empty when `false`). None on a host that pins one: there
    only the signed TRUST list counts (`checked_trust`, `shared_trust`)."""
    from scf.bus.signing import TrustList
    from scf.bus.trust import TrustSettings, load_roots, local_trust_file

    roots = load_roots(settings.keys_dir)
    if roots.keys:
        return None
    local = local_trust_file(settings.keys_dir, settings.section("trust", TrustSettings), roots)
    return TrustList.load(local) if local is not None else TrustList({}, None)


async def checked_trust(settings, bus=None):
    """The trust list a one-shot check verifies with: the regiment's (`shared_trust`), read
    once and stopped. A host that pins no root key (development, the demo, an auditor's
    machine) needs no bus: its keys/trusted.json is the whole list, as `[trust] local_file`
    says. A host that pins one reads the root-signed TRUST list from `bus` (or a connection
    of its own) and ignores the file like every running process there, so `scf contract
    ls/show`, `scf capsule build|verify|deploy`, `scf report value` and `scf proof verify`
    print and accept exactly what the regiment would (docs/security.md, the trust list)."""
    from scf.bus.errors import SCFError

    local = trust_list(settings)
    if local is not None:
        return local
    own = bus is None
    if own:
        try:
            bus = await open_bus(settings, "scf-trust")
        except SCFError as exc:
            raise fail(f"this host pins a root key, so the signed trust list (TRUST) decides which keys count, and it cannot be "
                       f"read: {exc} — check where the bus is reachable, or on a host that pins no root") from None
    try:
        view = await shared_trust(bus, settings)
        await view.stop()  # a snapshot: what TRUST held when the check began
        return view
    finally:
        if own:
            await bus.close()


async def shared_trust(bus, settings):
    """The live trust view every process on the bus verifies with (bus/trust.py): the
    root-signed TRUST list, and this host's trusted.json only as `[trust] local_file` says
    (by default only where no root key is pinned). Stop it with `await view.stop()`."""
    from scf.bus.trust import SharedTrust

    return await SharedTrust.open(bus, settings)


def read_constraints(path: Path):
    """`--constraints FILE`: a regular file of at most 1 MiB holding JSON; anything else
    (a FIFO or a device that never ends, a directory, a huge file, bytes that are not UTF-8,
    nesting deeper than the parser goes) is one StrikeError line naming the file."""
    import stat

    from scf.bus.files import InputTooLarge, read_bounded
    from scf.producers.contracts import MAX_DOC
    from scf.producers.strike import StrikeError

    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise StrikeError(f"{path}: not a regular file: give a JSON file of the constraints")
        data = read_bounded(path, MAX_DOC, "constraints file")
    except InputTooLarge as exc:
        raise StrikeError(str(exc)) from None
    except OSError as exc:
        raise StrikeError(f"{path}: cannot read it ({exc.strerror})") from None
    def finite_only(name: str):
        raise StrikeError(f"{path}: {name} is not a finite number: write the constraint as a number")

    try:
        return json.loads(data.decode("utf-8"), parse_constant=finite_only)  # NaN, Infinity: Python's reader takes them
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0][:200]
        raise StrikeError(f"{path}: not a readable JSON file ({why})") from None


def signed_terms(settings, trust):
    """The trust list a contract's terms are read with before anything is signed under the
    release key (`scf strike --contract`, `scf capsule build`): the regiment's, so with
    `[regiment] require_signed_contracts` (default) only terms an operator key signed; an
    unsigned update anyone with the operator login wrote is not struck by hand either
    (docs/security.md, tests/test_attack_contracts.py). None: every event counts."""
    from scf.producers import regiment

    return trust if settings.section("regiment", regiment.RegimentSettings).require_signed_contracts else None


def strike_command(
    contract: Optional[str] = typer.Option(None, "--contract", help="a registered contract's id"),
    domain: Optional[str] = typer.Option(None, "--domain", help="without a contract: the domain ..."),
    constraints: Optional[Path] = typer.Option(None, "--constraints", help="... its constraints JSON file ..."),
    nodes: str = typer.Option("", "--nodes", help="... and the nodes to deploy to (a,b)"),
    method: str = typer.Option("exact", "--method", help="exact (HiGHS) | learned (the learned optimiser) | auto (learned when one is promoted or given)"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="with learned|auto: this optimiser file instead of the one promoted for the domain"),
    measure: str = typer.Option("sim", "--measure", help="sim (the capsule on the simulated site, here) | live (the nodes' energy.measured) | none"),
    wait: float = typer.Option(60.0, "--wait", help="seconds to wait for each of verdicts, activation and measurement"),
    key: str = KEY_OPT,
    as_json: bool = typer.Option(False, "--json", help="print the proof"),
    log_proof: bool = typer.Option(False, "--log-proof", help="embed inclusion proofs against a signed checkpoint of the transparency log (needs `scf run archive`)"),
) -> None:
    """Map → optimise → verify → deploy a capsule → measure → a signed JSON proof; prints the activity id (re-running resumes, never deploys twice).

    --method learned|auto decides with the learned optimiser PROMOTED for the contract's domain
    (fetched from the bus, its release signature and sha256 checked before it is read) unless
    --checkpoint FILE is given; the model that decided (id, sha256) is printed and recorded."""
    from scf.producers import contracts
    from scf.producers import strike as st

    if (contract is None) == (domain is None or constraints is None):
        raise fail("give --contract ID, or --domain D with --constraints FILE (and --nodes)")
    if not (0.0 <= wait < float("inf")):  # NaN fails this too
        raise fail(f"--wait {wait}: give the seconds to wait, a finite number ≥ 0")
    if method not in ("exact", "learned", "auto"):
        raise fail(f"--method {method!r}: use exact, learned or auto")
    if checkpoint is not None and method == "exact":
        raise fail("--checkpoint is a learned optimiser's file: give it with --method learned or auto")
    if checkpoint is not None and not checkpoint.is_file():
        raise fail(f"--checkpoint {checkpoint}: no such file: give a learned optimiser's checkpoint (scf train-optimiser writes one)")
    decided_by: list[str] = []

    async def main() -> st.StrikeResult:
        s = load_settings("strike")
        k = release_key(s, key)
        raw = read_constraints(constraints) if constraints is not None and contract is None else None  # before any server is asked
        bus = await open_bus(s, "scf-strike", sign=True)
        trust = await shared_trust(bus, s)
        try:
            seq, eid = 0, ""
            if contract is not None:
                c = await contracts.get(bus, contract, signed_terms(s, trust))
                if not c.active:
                    raise st.StrikeError(f"contract {contract} is {c.spec.status}: nothing to strike")
                spec, seq, eid = c.spec, c.seq, c.event_id
            else:
                doc = contracts.parse_doc({"contract_id": "adhoc-" + st.sha256_json([domain, raw, nodes])[:12], "client": "ad hoc",
                                           "domain": domain, "nodes": [n for n in nodes.split(",") if n], "constraints": raw,
                                           "schedule_s": 0})
                spec = contracts.spec_of(doc)
            path, model, label = await learned_model(bus, s, trust, spec.domain, method, checkpoint)
            decided_by.append(label)
            opts = st.StrikeOptions(method="exact" if path is None else "learned", checkpoint=path, measure=measure, wait_s=wait,
                                    model=model or await st.production_model(bus, spec.domain), period=st.period_of(spec, time.time()))
            r = await st.strike(bus, s, spec, key=k, trust=trust, opts=opts, contract_seq=seq, contract_event_id=eid)
            if log_proof and r.proof_path is not None:
                r.proof = await st.attach_log_proof(bus, s, r.proof_path, wait_s=max(wait, 60.0))
            return r
        finally:
            await trust.stop()
            await bus.close()

    result = run(main())
    if as_json and result.proof:
        typer.echo(json.dumps(result.proof, indent=2, sort_keys=True))
    else:
        typer.echo(st.summary(result))
        if decided_by:
            typer.echo(f"decided by: {decided_by[0]}")
        if result.proof_path:
            typer.echo(f"proof: {result.proof_path}")
    if result.status in ("rejected", "failed"):
        raise typer.Exit(1)


async def learned_model(bus, settings, trust, domain: str, method: str, checkpoint: Path | None) -> tuple[Path | None, str, str]:
    """(the optimiser file or None for exact, the model as the strike's inputs name it, a
    line saying what decides): `producers.promoted.decider`, its errors one line."""
    from scf.bus.errors import SCFError
    from scf.producers import promoted as pm

    try:
        d = await pm.decider(bus, settings, trust, domain, method, checkpoint)
    except SCFError as exc:
        raise fail(str(exc)) from None
    return d.path, d.model, d.label


def run_regiment(
    concurrency: Optional[int] = typer.Option(None, help="strikes at once (default [regiment] concurrency)"),
    once: bool = typer.Option(False, "--once", help="one pass, then exit"),
    method: Optional[str] = typer.Option(None, "--method", help="exact | learned | auto, as `scf strike --method` (default [regiment] method, exact)"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="with learned|auto: this optimiser file for every domain instead of the one promoted for each"),
) -> None:
    """The regiment: at the gear's heartbeat, strike every active contract that is due (schedule, contract change, new production model)."""
    import asyncio

    import msgspec

    from scf.bus.emergency import EmergencyGate
    from scf.bus.runner import run_all
    from scf.producers import regiment

    async def main() -> None:
        s = load_settings("regiment")
        cfg = s.section("regiment", regiment.RegimentSettings)
        if concurrency is not None:
            cfg = msgspec.structs.replace(cfg, concurrency=concurrency)
        if method is not None:
            cfg = msgspec.structs.replace(cfg, method=method)
        if checkpoint is not None:
            cfg = msgspec.structs.replace(cfg, checkpoint=str(checkpoint))
        cfg.check()  # one line before any server is asked
        key_path = s.keys_dir / f"{cfg.release_key}.key"
        if not once and not key_path.is_file():  # under `scf up`: idle until a release key exists, not a restart loop
            typer.echo(f"regiment: no release key {key_path}: idle until one exists (`scf keys new {cfg.release_key}`, trusted with the release role)", err=True)
            while not key_path.is_file():
                await asyncio.sleep(10.0)
        k = release_key(s, cfg.release_key)
        bus = await open_bus(s, "scf-regiment", sign=True)
        trust = await shared_trust(bus, s)
        gate = await EmergencyGate(bus, s.emergency_lock).start()
        try:
            if once:
                r = await regiment.one_pass(bus, s, key=k, trust=trust, opts=cfg.options(), concurrency=cfg.concurrency, gate=gate,
                                            signed=cfg.require_signed_contracts)
                typer.echo(f"{r.contracts} contracts, {r.due} due: {r.statuses() or 'nothing to do'} in {r.seconds:.1f} s")
                for domain, label in sorted(r.decided_by.items()):
                    typer.echo(f"{domain}: decided by {label}")
                return

            async def loop(stop: asyncio.Event) -> None:
                await regiment.run_regiment(s, bus, key=k, trust=trust, cfg=cfg, stop=stop, gate=gate)

            await run_all(bus, [loop])
        finally:
            await gate.stop()
            await trust.stop()
            await bus.close()

    run(main())


def strike_proof_verify(path: Path, online: bool = False, log_key: str | None = None) -> bool:
    """`scf proof verify FILE` for a strike's proof: False when FILE is not one (the log's
    own bundles are checked by cli/proof.py). The release signature is checked against
    the regiment's trust list (`checked_trust`); with `online`, every event against the log too."""
    from scf.bus.files import read_bounded
    from scf.cli.proof import MAX_PROOF_BYTES, key_text
    from scf.producers import strike as st

    try:  # bounded, no FIFO (InputTooLarge is a ValueError)
        data = json.loads(read_bounded(path, MAX_PROOF_BYTES, "proof"))
    except (OSError, ValueError, RecursionError):  # not a strike proof; cli/proof.py says what it is
        return False
    if not isinstance(data, dict) or data.get("kind") != st.PROOF_KIND:
        return False
    s = load_settings()
    try:
        body = st.verify_proof(data, run(checked_trust(s)))
    except st.ProofInvalid as exc:
        raise fail(f"proof does not hold: {exc}") from None
    log_line = ""
    if log_key is not None:
        try:
            log_line = "; in the transparency log: " + st.check_log_proof(data, key_text(log_key))
        except st.ProofInvalid as exc:
            raise fail(f"proof does not hold: {exc}") from None
    elif "log" in data:
        log_line = "; log inclusion not checked (give --key, the log's verifier key: `scf proof key`)"
    if online:

        async def main() -> list[str]:
            bus = await open_bus(s)
            try:
                return await st.check_against_log(bus, body)
            finally:
                await bus.close()

        problems = run(main())
        if problems:
            raise fail("proof does not hold: " + "; ".join(problems))
    typer.echo(f"OK: strike {body['activity_id']} of contract {body['contract_id']} ({body['status']}), signed by a release key; "
               f"{len(body['events'])} events{' match the log' if online else ' named (add --online to check them against the log)'}{log_line}")
    return True


def contract_report(contract_id: str, out: Path) -> None:
    """`scf report value --contract ID`: the contract's value report from its verified strike proofs."""
    from scf.producers import contracts
    from scf.projections import contract_report as cr

    s = load_settings()

    async def main():
        bus = await open_bus(s)
        try:
            trust = await checked_trust(s, bus)  # the regiment's: terms and proofs verified as it would
            c = await contracts.get(bus, contract_id, signed_terms(s, trust))  # the terms that were struck
            return c, await cr.deploy_history(bus, c.spec.nodes), trust
        finally:
            await bus.close()

    c, history, trust = run(main())
    proofs, invalid = cr.load_proofs(s.path("strikes"), contract_id, trust)
    for line in cr.build(c.spec, proofs, history, out, invalid).lines():
        typer.echo(line)
