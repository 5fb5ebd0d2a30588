"""`scf demo`: the whole loop once, on this machine, explained as it happens.

In a fresh SCF_HOME it starts nats-server and every process (as `scf up` does), creates
the keys a deployment needs (a release key for the daemon, one key per edge node), shifts
to the HYPER gear (no human approvals: the safety gate still rules on everything),
synthesises and ingests fossils for the IEEE 14-bus grid, and follows one pass: a training
intent, its verdict, the job on the local worker with its progress, the checkpoint
verified and promoted, a canary deployment to two edge agents; then two HVAC sites, each an
edge agent controlling a simulated building (docs/plants.md), get a learned optimiser each,
trained meanwhile on HVAC fossils (ops/demo_hvac.py) — a better one and a deliberately
worse one (a third of the data) — which decides every hour on the site; the savings of
those decisions are measured by IPMVP Option D against each site's calibrated baseline
(docs/mv.md) and minted, and the two models are put side by side; the archive updated, a CFR dataset and a value report written. Each step waits on the events that prove it; a step
that does not complete in time stops the demo with what to look at.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from scf.bus import codec, control
from scf.bus import events as ev
from scf.bus.client import Bus
from scf.bus.errors import SCFError
from scf.bus.server import free_port, port_open
from scf.bus.settings import Settings, init_home, load
from scf.bus.signing import SigningKey, TrustList
from scf.ops import demo_hvac
from scf.ops.supervisor import ProcessSpec, Supervisor

DOMAIN = "grid:case14"
NODES = ("node-a", "node-b")
HVAC = demo_hvac.HVAC
SITES = demo_hvac.SITES  # HVAC site -> (its model: "better" | "worse", the fossils it learns from)
SITE_SEED = 10  # the simulated sites' weather: a mild heating season, daily mean 9.7 °C
FOLLOWED = ("gear.>", "intent.>", "verdict.>", "job.>", "checkpoint.>", "deploy.>", "energy.>", "ledger.>", "control.rejected", "dlq.>")


class DemoFailed(SCFError):
    pass


@dataclass
class DemoResult:
    home: Path
    checkpoint_id: str = ""
    version: int = 0
    activated: list[str] = field(default_factory=list)
    balances: dict[str, int] = field(default_factory=dict)
    savings: dict[str, tuple[float, float]] = field(default_factory=dict)  # site -> (saved kWh, ± kWh at 90 %)
    code: dict[str, int] = field(default_factory=dict)  # GenN's proposals: approved / rejected
    models: dict[str, demo_hvac.SiteModel] = field(default_factory=dict)  # HVAC site -> its learned optimiser and what it earned
    dataset: Path | None = None
    report: Path | None = None
    seconds: float = 0.0


class Follower:
    """Every event on the followed subjects, as it is published (core subscriptions)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.seen: list[ev.Event] = []
        self.changed = asyncio.Event()
        self.subs = []

    async def start(self) -> "Follower":
        for subject in FOLLOWED:
            self.subs.append(await self.bus.nc.subscribe(subject, cb=self._on))
        return self

    async def _on(self, msg) -> None:
        try:
            event = codec.decode(msg.data)
        except SCFError:
            return
        self.seen.append(event)
        self.changed.set()

    async def wait(self, step: str, match: Callable[[ev.Event], bool], timeout: float, count: int = 1, hint: str = "") -> list[ev.Event]:
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.seen if match(e)]
            if len(found) >= count:
                return found
            for e in self.seen:
                if isinstance(e, ev.DeadLettered):
                    raise DemoFailed(f"step '{step}': {e.data.consumer} dead-lettered {e.data.subject}: {e.data.error[:300]}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise DemoFailed(f"step '{step}' did not complete within {timeout:.0f}s" + (f": {hint}" if hint else ""))
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(left, 1.0))
            except asyncio.TimeoutError:
                pass


def _keys(settings: Settings) -> Path:
    """A release key for the daemon (roles release + operator) and one key per edge node."""
    trust = TrustList.load(settings.keys_dir / "trusted.json")
    release = SigningKey.generate("release")
    release_path = release.save(settings.keys_dir)
    trust.trust(release.public_b64, "release", ["release", "operator"])
    for node in (*NODES, *SITES):
        key = SigningKey.generate(node)
        key.save(settings.keys_dir)
        trust.trust(key.public_b64, node, ["node"])  # the ledger requires the signer to be the node
    trust.save()
    return release_path


def _config(home: Path, port: int, steps: int, fossils: int) -> None:
    threshold = max(1, fossils * 5 // 6)
    (home / "scf.toml").write_text(
        f"""# written by `scf demo`
port = {port}

[daemon]
# a small model so that one training pass takes well under a minute on a laptop CPU
train_config = {{ steps = {steps}, hidden = 64, depth = 2, batch_size = 128 }}
# one training pass for the demo's {fossils} fossils (HYPER's own threshold is 200)
train_threshold = {{ HYPER = {threshold} }}

[worker]
progress_every = 0.5

[edge.control]
# the HVAC sites (label plant=sim): a day of the status quo (the site's measured history),
# then a day under the deployed decision, measured by IPMVP Option D
domain = "{HVAC}"
sim_seed = {SITE_SEED}
sim_hours = 48
min_history_hours = 24
report_hours = 24
hold_for_model = true

[ledger]
require_calibration = true
"""
    )


def _processes(settings: Settings) -> list[ProcessSpec]:
    procs = [ProcessSpec(n, n) for n in ("daemon", "safety", "dispatch", "deploy", "ledger", "archive")]
    procs.append(ProcessSpec("worker", "worker", ("--pool", "local", "--device", "cpu")))
    procs.append(ProcessSpec("genn", "genn", ("--backend", "search")))  # GenN, program search: offline and fast
    for node in NODES:
        procs.append(ProcessSpec(f"edge-{node}", "edge", ("--node", node, "--dir", str(settings.path("edge", node)), "--label", f"domain={DOMAIN}", "--label", "site=demo")))
    for node in SITES:
        procs.append(ProcessSpec(f"edge-{node}", "edge", ("--node", node, "--dir", str(settings.path("edge", node)), "--label", f"domain={HVAC}",
                                                          "--label", "plant=sim")))
    return procs


async def _archive_caught_up(bus: Bus, settings: Settings, streams: tuple[str, ...], timeout: float) -> None:
    from scf.projections.archive import archive_root
    from scf.projections.store import ArchiveStore

    store = ArchiveStore(archive_root(settings))
    deadline = time.monotonic() + timeout
    while True:
        behind = []
        for s in streams:
            last = (await bus.js.stream_info(s)).state.last_seq
            if store.exists() and store.position(s) < last:
                behind.append(f"{s} {store.position(s)}/{last}")
            elif not store.exists():
                behind.append("no archive yet")
        if not behind:
            return
        if time.monotonic() > deadline:
            raise DemoFailed(f"step 'archive' is behind ({', '.join(behind)}): see logs/archive.log")
        await asyncio.sleep(0.3)


CODEGEN_PROPOSALS = 8


async def _codegen_step(bus: Bus, follow: "Follower", echo: Callable[[str], None], timeout: float) -> dict[str, int]:
    """GenN (the search backend) writes controllers for the demo's grid; the safety gate judges each
    one (capability gate, then the sandbox against the simulator). Approved and rejected code both
    go into the CFR dataset."""
    echo(f"9. a codegen intent: GenN writes {CODEGEN_PROPOSALS} controllers for {DOMAIN} (program search: templates, parameters,"
         " deliberate defects); the gate judges each, then runs it in the sandbox against the simulator")
    intent = ev.IntentCreated.new(ev.Intent(
        # a fixed id and seed (the demo's home is fresh): the same eight candidates every run, some refused
        # by the gate (a misnamed class, a syntax slip), some by the sandbox (a setpoint short)
        intent_id="codegen-demo", kind="codegen", domain=DOMAIN, params={"proposals": CODEGEN_PROPOSALS, "seed": 2},
        reason="demo: dispatch controllers for the grid the demo trained on",
    ), source=bus.source)
    await bus.publish_once(intent)
    verdicts = await follow.wait(
        "codegen", lambda e: isinstance(e, ev.VerdictIssued) and e.data.subject_type == "code" and e.data.final and e.correlation_id == intent.id,
        timeout, count=CODEGEN_PROPOSALS, hint="see logs/genn.log and logs/safety.log",
    )
    counts = {"approved": 0, "rejected": 0}
    for e in verdicts:
        v = e.data
        counts["approved" if v.decision == "APPROVE" else "rejected"] += 1
        echo(f"   code {v.subject_id[:8]} {v.decision} ({v.gate}): {(v.reasons or [''])[0][:110]}")
    echo(f"   {counts['approved']} approved, {counts['rejected']} rejected")
    return counts


async def run_demo(
    home: Path,
    echo: Callable[[str], None] = print,
    *,
    fossils: int = 600,
    steps: int = 300,
    step_timeout: float = 300.0,
    kill: str | None = None,
) -> DemoResult:
    t0 = time.monotonic()
    if home.exists() and any(home.iterdir()):
        raise DemoFailed(f"{home} is not empty: the demo needs a fresh SCF_HOME (choose another --home)")
    home.mkdir(parents=True, exist_ok=True)
    env_url = os.environ.get("NATS_URL")
    port = 4333
    if not env_url and port_open("127.0.0.1", port):
        port = free_port()
        echo(f"port 4333 is in use: the demo's nats-server takes port {port}")
    _config(home, port, steps, fossils)
    settings = load(home=home).with_source("demo")
    init_home(settings)
    result = DemoResult(home=home)

    echo(f"== SCF demo in {home}")
    release = _keys(settings)
    echo(f"keys: release key {release.name} (signs promotions), node keys for {', '.join((*NODES, *SITES))}; trust list {settings.keys_dir / 'trusted.json'}")

    # one torch thread per process: the demo's model is small and ten processes share the
    # cores; OpenMP threads spinning against each other made training and the checkpoint's
    # evaluation 10-30x slower (benchmarks/RESULTS.md, bench_train_cpu)
    env = {"SCF_KEY": str(release), "OMP_NUM_THREADS": "1"}
    sup = Supervisor(settings, _processes(settings), echo=lambda line: echo(f"   [up] {line}"), extra_env=env)
    sup_task = asyncio.create_task(sup.run())
    bus: Bus | None = None
    hvac_training: asyncio.Task | None = None
    try:
        deadline = time.monotonic() + 60
        while sup.bus is None or any(c.proc is None for c in sup.children):
            if sup_task.done():
                sup_task.result()
            if time.monotonic() > deadline:
                raise DemoFailed("step 'start' did not complete: see logs/ and nats/nats-server.log")
            await asyncio.sleep(0.05)
        bus = await Bus.connect(settings, "scf-demo", key=SigningKey.load(release))
        follow = await Follower(bus).start()
        # the HVAC sites' two learned optimisers train meanwhile (two processes; step 7 deploys them)
        hvac_training = asyncio.create_task(demo_hvac.train_models(settings, step_timeout))

        echo("1. shifting to HYPER: from here the loop runs without a human (the safety gate still rules)")
        subject, body, headers = control.encode(control.ShiftGear(level="HYPER", by="scf demo", reason="demo: one unattended pass"), bus.key)
        await bus.js.publish(subject, body, headers=headers)
        await follow.wait("gear", lambda e: isinstance(e, ev.GearChanged) and e.data.to_gear == "HYPER", 60, hint="see logs/daemon.log")
        echo("   gear.changed → HYPER")

        if kill:
            victim = next((c for c in sup.children if c.spec.name == kill), None)
            if victim is None or victim.proc is None:
                raise DemoFailed(f"--kill {kill}: no such process (use one of {', '.join(c.spec.name for c in sup.children)})")
            os.kill(victim.proc.pid, signal.SIGKILL)
            echo(f"   fault drill: sent SIGKILL to {kill} (pid {victim.proc.pid}); the supervisor restarts it")

        from scf.domains.fossils import synth_shards
        from scf.producers.ingest import ingest

        echo(f"2. synthesising {fossils} fossils of {DOMAIN} (IEEE 14-bus DC network; costs from the domain's own model)")
        shards = synth_shards(DOMAIN, fossils, settings.path("fossil_vault", "demo"), shard_size=max(100, fossils // 3), seed=7)
        report = await ingest(bus, shards, settings=settings)
        echo(f"   ingested {len(shards)} shards: {report.recorded} recorded, {report.duplicate} duplicate, {report.rejected} rejected")

        echo("3. the daemon orients: enough new fossils → a training intent")
        [intent] = await follow.wait("intent", lambda e: isinstance(e, ev.IntentCreated) and e.data.kind == "train", step_timeout, hint="see logs/daemon.log")
        echo(f"   intent.created {intent.data.intent_id}: {intent.data.reason}")
        iid = intent.data.intent_id
        [verdict] = await follow.wait("verdict", lambda e: isinstance(e, ev.VerdictIssued) and e.data.subject_id == iid and e.data.final, 60, hint="see logs/safety.log")
        echo(f"   verdict {verdict.data.decision} by {verdict.data.gate}: {'; '.join(verdict.data.reasons) or 'no objection'}")
        if verdict.data.decision != "APPROVE":
            raise DemoFailed(f"step 'verdict': the safety gate ruled {verdict.data.decision}: {verdict.data.reasons}")

        echo("4. dispatch → the local worker trains the EBDM")
        [job] = await follow.wait("dispatch", lambda e: isinstance(e, ev.JobDispatched) and e.data.intent_id == iid, 60, hint="see logs/dispatch.log")
        jid = job.data.job_id
        echo(f"   job.dispatched {jid} to pool {job.data.pool}")
        shown = 0

        def progress(e: ev.Event) -> bool:
            return isinstance(e, (ev.JobCompleted, ev.JobFailed)) and e.data.job_id == jid

        deadline = time.monotonic() + step_timeout
        while not any(progress(e) for e in follow.seen):
            for e in follow.seen[shown:]:
                if isinstance(e, ev.JobProgress) and e.data.job_id == jid:
                    d = e.data
                    echo(f"   job.progress step {d.step}/{d.total_steps}  loss {d.loss:.4f}  {d.samples_per_s:,.0f} samples/s")
            shown = len(follow.seen)
            if time.monotonic() > deadline:
                raise DemoFailed("step 'training' did not complete: see logs/worker.log")
            await asyncio.sleep(0.2)
        done = next(e for e in follow.seen if progress(e))
        if isinstance(done, ev.JobFailed):
            raise DemoFailed(f"step 'training': job failed: {done.data.error} (see logs/worker.log)")
        echo(f"   job.completed in {done.data.duration_s:.1f}s")

        echo("5. the daemon verifies the checkpoint (digest, no-pickle load, held-out evaluation) and promotes it")
        [produced] = await follow.wait("checkpoint", lambda e: isinstance(e, ev.CheckpointProduced) and e.data.job_id == jid, 60)
        ck = produced.data.checkpoint_id
        await follow.wait(
            "verify", lambda e: isinstance(e, (ev.CheckpointPromoted, ev.CheckpointRejected)) and e.data.checkpoint_id == ck, step_timeout, hint="see logs/daemon.log"
        )
        rejected = [e for e in follow.seen if isinstance(e, ev.CheckpointRejected) and e.data.checkpoint_id == ck]
        if rejected:
            raise DemoFailed(f"step 'verify': checkpoint rejected: {'; '.join(rejected[0].data.reasons)}")
        [promoted] = [e for e in follow.seen if isinstance(e, ev.CheckpointPromoted) and e.data.checkpoint_id == ck]
        result.checkpoint_id, result.version = ck, promoted.data.version
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(produced.data.metrics.items())[:4])
        echo(f"   checkpoint.promoted {ck[:12]} as {promoted.data.alias} v{promoted.data.version} (signed release); {metrics}")

        echo("6. deployment: a deploy intent, its verdict, then a canary (one node, then the rest)")
        activated = await follow.wait(
            "deploy", lambda e: isinstance(e, ev.DeployActivated) and e.data.checkpoint_id == ck, step_timeout, count=len(NODES), hint="see logs/deploy.log and logs/edge-*.log"
        )
        for e in activated:
            echo(f"   deploy.activated on {e.data.node} (v{e.data.version})")
            result.activated.append(e.data.node)

        echo("7. two HVAC sites (edge agents controlling simulated buildings, docs/plants.md) get a learned optimiser each,")
        echo(f"   trained meanwhile by `scf train-optimiser` on {demo_hvac.FOSSILS} HVAC fossils (the better) and on the first "
             f"{demo_hvac.FEW} of them (the worse: its learned cost is underdetermined);")
        echo("   the grid checkpoint above has no plant to act on here, so it earns nothing (no invented meter readings)")
        echo("   each site ran its status-quo thermostat for a day: the measured history its baseline is calibrated to")
        waited = time.monotonic()
        try:
            result.models = await asyncio.wait_for(asyncio.shield(hvac_training), step_timeout)
            waited = time.monotonic() - waited
            echo(f"   the models trained alongside steps 2-6 (synthesis, training and held-out judging in two processes); "
                 f"the demo waited {waited:.1f}s for them here")
        except asyncio.TimeoutError:
            raise DemoFailed(f"step 'hvac training' did not complete within {step_timeout:.0f}s") from None
        except demo_hvac.TrainingFailed as exc:
            raise DemoFailed(f"step 'hvac training': {exc}") from None
        await demo_hvac.deploy_models(bus, result.models, follow, echo, step_timeout)
        echo("8. a day under each model's decisions, measured by IPMVP Option D (calibrated simulation, ASHRAE Guideline 14), minted")
        measured = await follow.wait("measure", lambda e: isinstance(e, ev.EnergyMeasured) and e.data.node in SITES, step_timeout,
                                     count=len(SITES), hint="see logs/edge-site-*.log")
        for e in sorted(measured, key=lambda e: e.data.node):
            m, cal = e.data, e.data.calibration
            saved = m.baseline_kwh - m.actual_kwh
            result.savings[m.node] = (saved, m.uncertainty_kwh or 0.0)
            site = result.models[m.node]
            site.saved_kwh, site.uncertainty_kwh = saved, m.uncertainty_kwh
            echo(f"   energy.measured {m.node}: baseline {m.baseline_kwh:.1f} kWh (calibrated thermostat, same weather), actual "
                 f"{m.actual_kwh:.1f} kWh → saved {saved:.2f} ± {m.uncertainty_kwh or 0:.2f} kWh (90 %); calibration CV(RMSE) "
                 f"{100 * cal.cv_rmse:.1f} %, NMBE {100 * cal.nmbe:+.1f} % over {cal.points} h")
        minted = await follow.wait("ledger", lambda e: isinstance(e, (ev.LedgerTransfer, ev.LedgerRejected)), 120, count=len(SITES), hint="see logs/ledger.log")
        for e in minted:
            d = e.data
            if isinstance(e, ev.LedgerRejected):
                echo(f"   ledger.rejected: {d.reason}")
                node = next((m.data.node for m in measured if m.id == d.cause_id), "")
                if node in result.models:
                    result.models[node].ledger = d.reason
            else:
                echo(f"   ledger.transfer {d.kwh:.2f} kWh × {d.rate} → {d.micro_credits / 1e6:.2f} credits to {d.credit_account}")
                if d.node in result.models:
                    result.models[d.node].minted_kwh += d.kwh
                    result.models[d.node].ledger = "minted"
        echo("   the two models side by side (held-out decision quality as `scf train-optimiser` judged it; what each earned on its site):")
        for line in demo_hvac.table(result.models):
            echo(f"   {line}")
        from scf.consumers.ledger import balances, read_transfers

        result.balances = balances(await read_transfers(bus))

        result.code = await _codegen_step(bus, follow, echo, step_timeout)
        echo("10. the archive catches up; the CFR dataset and the value report are built from it")
        await _archive_caught_up(bus, settings, ("CONTROL", "INTENTS", "VERDICTS", "TRAINING", "CHECKPOINTS", "DEPLOY", "LEDGER"), 120)
        from scf.projections import cfr, report
        from scf.projections.archive import archive_root

        out = settings.path("out")
        root = archive_root(settings)
        result.dataset = out / "cfr"
        dataset = cfr.build(root, result.dataset)
        for line in dataset.lines():
            echo(f"   {line}")
        if dataset.counts["approved"] == 0 or dataset.counts["rejected"] == 0:
            raise DemoFailed(f"step 'dataset': the CFR dataset needs approved and rejected code, it has {dataset.counts['approved']} "
                             f"approved and {dataset.counts['rejected']} rejected (see logs/genn.log and logs/safety.log)")
        result.report = out / "report"
        for line in report.build(root, result.report).lines():
            echo(f"   {line}")
        models_md = result.report / "hvac-models.md"
        models_md.write_text("# The HVAC sites' learned optimisers, side by side\n\n" + "\n".join(demo_hvac.table(result.models)) + "\n")
        echo(f"   the two HVAC models side by side: {models_md}")

        echo("11. a client contract, the strike loop (map → optimise → verify → deploy a capsule → measure) and its signed proof")
        from scf.ops.demo_strike import strike_step

        await strike_step(bus, settings, echo, next(iter(SITES)), step_timeout)
    finally:
        if hvac_training is not None and not hvac_training.done():
            hvac_training.cancel()
        if bus is not None:
            await bus.close()
        sup.stop_event.set()
        await asyncio.wait_for(sup_task, 60)
    result.seconds = time.monotonic() - t0
    return result


def summary(r: DemoResult) -> list[str]:
    credited = {k: v for k, v in r.balances.items() if v > 0}
    lines = [
        "",
        f"== done in {r.seconds:.0f}s. Where things are:",
        f"   SCF_HOME          {r.home}",
        f"   checkpoint        {r.checkpoint_id} (v{r.version}) in the object store scf_artifacts; edge copies in {r.home / 'edge'}",
        f"   deployed to       {', '.join(r.activated)}",
        "   credits           " + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in sorted(credited.items())),
        "   savings           " + ", ".join(f"{k} {s:.2f} ± {u:.2f} kWh" for k, (s, u) in sorted(r.savings.items())),
        "   hvac models       " + ", ".join(f"{m.site} {m.checkpoint_id} ({m.label}) minted {m.minted_kwh:.2f} kWh" for m in r.models.values()),
        f"   archive           {r.home / 'archive'} (Parquet + scf.duckdb)",
        f"   CFR dataset       {r.dataset} (GenN's code: {r.code.get('approved', 0)} approved, {r.code.get('rejected', 0)} rejected)",
        f"   value report      {r.report / 'report.html' if r.report else '-'}",
        f"   process logs      {r.home / 'logs'}",
        "",
        "Next, with this SCF_HOME:",
        f"   export SCF_HOME={r.home}",
        "   scf up                                  # bring everything back up (then, in another terminal:)",
        "   scf status --watch                      # the live view",
        "   scf control shift-gear STANDARD         # humans approve training and deploys again",
        "   scf control emergency-stop --reason x   # nothing is dispatched, deployed or minted",
        "   scf ledger balance",
        f"   cd {r.home / 'archive'} && duckdb scf.duckdb -c 'SELECT node, sum(saved_kwh) FROM energy GROUP BY node'",
    ]
    return lines


__all__ = ["run_demo", "summary", "DemoFailed", "DemoResult"]
