"""Learned optimisers through the bus (issue 12): the daemon asks for one per training
generation (`[daemon] train_models`), the safety gate rules, dispatch routes it, the worker
trains it with `ml.optimize.train_optimiser` on the fossils it fetched, the daemon's
verifier judges its decisions and promotes it to `production` as the domain's optimiser
head (what `scf strike --method learned` fetches). Every process is real (`scf run daemon|safety|dispatch|worker`, a real
nats-server, real case9 fossils); a job spec the optimiser cannot take ends as a final
`job.failed` that names the problem, and the worker keeps serving."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import sys

import pytest

from scf.bus import events as ev
from scf.bus.artifacts import open_store
from scf.bus.errors import ConfigError
from scf.consumers.dispatch import job_id_for
from scf.consumers.worker import check_with_ml, optimiser_config
from scf.producers.daemon import DomainCount, check_models, orient
from tests.conftest import scf, spawn, stream_count, wait_for
from tests.daemon_support import FIXED_TIME, events, recorded_fossils, send

pytestmark = pytest.mark.anyio

DOMAIN = "grid:case9"


def spec(config: dict, domain: str = DOMAIN, job_id: str = "job-1") -> ev.JobSpec:
    sel = ev.DataSelection(domain=domain, stream="FOSSILS", subject=f"fossil.recorded.{ev.domain_token(domain)}.>", start_seq=1, end_seq=1, count=1)
    return ev.JobSpec(job_id=job_id, intent_id="i-1", domain=domain, pool="local", config=config, data=sel, max_attempts=3)


# --------------------------------------------------------------------------- pure parts


def test_orient_asks_for_one_intent_per_model_with_the_optimisers_own_config():
    counts = {DOMAIN: DomainCount(domain=DOMAIN, total=700, last_seq=700)}
    intents = orient(counts, {}, "HYPER", {}, source="x", train_config={"steps": 300}, models=("ebdm", "optimiser"),
                     optimiser_config={"steps": 150, "cost_knots": 5})
    ebdm, opt = (i.data for i in intents)
    assert (ebdm.intent_id, opt.intent_id) == ("train-grid_case9-000001", "train-grid_case9-000001-optimiser")
    assert ebdm.params["steps"] == 300 and "model" not in ebdm.params
    assert (opt.params["model"], opt.params["steps"], opt.params["cost_knots"]) == ("optimiser", 150, 5)
    assert opt.params["generation"] == ebdm.params["generation"] == 1 and opt.kind == "train"
    assert opt.reason.endswith(": a learned optimiser")
    [only] = orient(counts, {}, "HYPER", {}, source="x", models=("optimiser",))
    assert only.data.intent_id.endswith("-optimiser")


def test_train_models_naming_an_unknown_model_is_refused():
    check_models(("ebdm", "optimiser"))
    with pytest.raises(ConfigError) as exc:
        check_models(("ebdm", "diffusion"))
    assert str(exc.value) == "[daemon] train_models = ['ebdm', 'diffusion']: ['diffusion']: use some of ebdm, optimiser"


def test_an_optimiser_jobs_config_is_checked_before_any_data_is_fetched():
    cfg = optimiser_config(spec({"model": "optimiser", "steps": 40, "hidden": 16, "cost_knots": 5, "lr": 1, "gpus": 0}))
    assert (cfg.steps, cfg.hidden, cfg.cost.knots, cfg.lr, cfg.domain) == (40, 16, 5, 1.0, DOMAIN)
    assert isinstance(cfg.lr, float)
    cases = {
        "zero steps": ({"model": "optimiser", "steps": 0}, DOMAIN,
                       "optimiser steps, batch_size, hidden and depth must be >= 1 (got 0, 256, 256, 3)"),
        "unknown key": ({"model": "optimiser", "langevin_steps": 3}, DOMAIN, "['langevin_steps'] are not learned-optimiser settings"),
        "a fraction of a step": ({"model": "optimiser", "steps": 2.5}, DOMAIN, "job job-1: steps = 2.5 is not a whole number"),
        "text": ({"model": "optimiser", "lr": "fast"}, DOMAIN, "job job-1: lr = 'fast' is not a number"),
        "no held-out contexts": ({"model": "optimiser", "eval_contexts": 0}, DOMAIN, "job job-1: eval_contexts must be >= 1 (got 0)"),
        "unknown model": ({"model": "transformer"}, DOMAIN, "job job-1: model = 'transformer' is unknown: use one of ebdm, optimiser"),
        "unknown domain": ({"model": "optimiser"}, "grid:nowhere", "job job-1: unknown domain 'grid:nowhere': use one of"),
        "unknown domain (ebdm)": ({}, "grid:nowhere", "job job-1: unknown domain 'grid:nowhere': use one of"),
    }
    for name, (config, domain, message) in cases.items():
        with pytest.raises(ConfigError) as exc:
            check_with_ml(spec(config, domain))
        assert message in str(exc.value), name


async def test_an_operator_asks_for_an_optimiser_from_the_cli(bus, scf_env):
    from scf.consumers.dispatch import DispatchSettings, plan_job
    from tests.conftest import cli

    r = await asyncio.to_thread(cli, "train-optimiser", "--bus", "--domain", DOMAIN, "--steps", "300", "--conservative", "1",
                                "--pool", "gpu", env=scf_env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("intent.created.train.train-grid_case9-optimiser-") and "(new)" in r.stdout
    [intent] = await read_all(bus, "INTENTS", "intent.created.train.>")
    assert intent.data.kind == "train" and intent.data.domain == DOMAIN and r.stdout.split(" ")[0].endswith(intent.data.intent_id)
    assert (intent.data.params["model"], intent.data.params["steps"], intent.data.params["cost_conservative"]) == ("optimiser", 300, 1.0)
    # what dispatch makes of it once approved: a job the worker accepts (pool is dispatch's, not the model's)
    sel = ev.DataSelection(domain=DOMAIN, stream="FOSSILS", subject="fossil.recorded.grid_case9.>", start_seq=1, end_seq=0, count=0)
    job = plan_job(intent.data, "gpu", sel, DispatchSettings())
    assert "pool" not in job.config
    check_with_ml(job)
    assert optimiser_config(job).cost.conservative == 1.0

    for args, message in (
        (("--domain", DOMAIN), "Error: give --data DIR (train here) or --bus (a worker trains it on the bus's fossils), not both"),
        (("--bus", "--data", "x", "--domain", DOMAIN), "Error: give --data DIR (train here) or --bus"),
        (("--bus", "--domain", "grid:nowhere"), "Error: unknown domain 'grid:nowhere': use one of"),
    ):
        r = await asyncio.to_thread(cli, "train-optimiser", *args, env=scf_env)
        assert r.returncode == 1 and (r.stdout + r.stderr).strip().startswith(message), r.stdout + r.stderr
    assert len(await read_all(bus, "INTENTS", "intent.created.train.>")) == 1  # nothing published for a bad request


# --------------------------------------------------------------------------- real processes


async def read_all(bus, stream: str, subject: str) -> list[ev.Event]:
    return await events(bus, stream, subject)


def _tail(path, n: int = 3000) -> str:
    return "\n--- " + path.name + "\n" + (path.read_text()[-n:] if path.exists() else "(no output)")


def _stop(procs, logs) -> list[int]:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    rcs = []
    for p in procs:
        try:
            rcs.append(p.wait(60))
        except Exception:  # noqa: BLE001 - a process that does not stop is killed and reported
            p.kill()
            rcs.append(p.wait(10))
    return rcs


OPT_CONFIG = "{ steps = 150, hidden = 32, depth = 2, batch_size = 64, eval_contexts = 48 }"


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_the_daemon_requests_the_worker_trains_and_the_daemon_promotes_a_learned_optimiser(bus, settings, scf_env, tmp_path):
    n = 640
    (settings.home_path / "scf.toml").write_text(
        "[daemon]\n"
        'train_models = ["optimiser"]\n'
        f"optimiser_config = {OPT_CONFIG}\n"
        f"train_threshold = {{ HYPER = {n - 40} }}\n"
        "[daemon.checkpoint]\nmin_heldout = 16\ndecision_contexts = 32\n"
        "[worker]\nprogress_every = 0.2\nthreads = 1\n"
    )
    shards = tmp_path / "shards"
    r = await asyncio.to_thread(scf, "fossils", "synth", "--domain", DOMAIN, "--n", str(n), "--out", str(shards), "--shard-size", "200", env=scf_env)
    assert r.returncode == 0, r.stderr
    r = await asyncio.to_thread(scf, "fossils", "ingest", str(shards), "--json", env=scf_env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["recorded"] == n
    await send(settings, "shift_gear", {"level": "HYPER"})  # no human approval for training in HYPER

    run = [sys.executable, "-m", "scf.cli.main", "run"]
    names = ("daemon", "safety", "dispatch", "worker")
    logs = {name: tmp_path / f"{name}.out" for name in names}
    extra = {"worker": ["--pool", "local", "--device", "cpu", "--id", "opt"]}
    procs = [spawn(run + [name, *extra.get(name, [])], scf_env, logs[name]) for name in names]
    try:
        async def promoted() -> bool:
            return await stream_count(bus, "CHECKPOINTS", "checkpoint.promoted.>") >= 1 or (
                await stream_count(bus, "CHECKPOINTS", "checkpoint.rejected.>") >= 1)

        await wait_for(promoted, 420, "checkpoint.promoted" + "".join(_tail(p) for p in logs.values()))
    finally:
        rcs = _stop(procs, logs)
    assert rcs == [0, 0, 0, 0], "".join(_tail(p) for p in logs.values())

    intent_id = "train-grid_case9-000001-optimiser"
    [intent] = await read_all(bus, "INTENTS", "intent.created.train.>")
    assert intent.data.intent_id == intent_id and intent.data.params["model"] == "optimiser"
    job_id = job_id_for(intent_id)
    [dispatched] = await read_all(bus, "TRAINING", "job.dispatched.>")
    assert dispatched.data.job_id == job_id and dispatched.data.data.count == n
    assert (dispatched.data.config["model"], dispatched.data.config["steps"]) == ("optimiser", 150)
    assert "generation" not in dispatched.data.config  # the daemon's bookkeeping stays out of the model's config
    progress = await read_all(bus, "TRAINING", f"job.progress.{job_id}")
    assert progress and progress[-1].data.step == progress[-1].data.total_steps == 150
    assert all(math.isfinite(p.data.loss) and p.data.samples_per_s > 0 for p in progress)

    [produced] = await read_all(bus, "CHECKPOINTS", "checkpoint.produced.>")
    info = produced.data
    assert info.job_id == job_id and info.domain == DOMAIN and info.config_hash == dispatched.data.config_hash
    assert info.uri == f"obj://scf_artifacts/grid_case9/{job_id}.safetensors"
    assert info.metrics["fossils"] == n and info.metrics["decision_feasible"] == 1.0
    assert 0 <= info.metrics["decision_regret"] < 1 and "baseline_regret" in info.metrics

    path = await open_store(bus, settings).get(info.uri, tmp_path / "fetched", sha256=info.sha256)
    from scf.ml.optimize import load_optimiser

    model, meta = load_optimiser(path)  # format scf-opt/1, no pickle
    assert model.config.domain == DOMAIN and (model.config.steps, model.config.hidden) == (150, 32)
    assert (meta["lineage"]["job_id"], meta["lineage"]["intent_id"]) == (job_id, intent_id)
    assert meta["lineage"]["selection"]["end_seq"] == dispatched.data.data.end_seq

    rejected = await read_all(bus, "CHECKPOINTS", "checkpoint.rejected.>")
    assert not rejected, rejected[0].data.reasons
    [verified] = await read_all(bus, "CHECKPOINTS", "checkpoint.verified.>")
    assert verified.data.checkpoint_id == info.checkpoint_id and verified.data.metrics["decision_feasible"] == 1.0
    assert math.isfinite(verified.data.metrics["decision_regret"])
    [promotion] = await read_all(bus, "CHECKPOINTS", "checkpoint.promoted.>")
    assert (promotion.data.checkpoint_id, promotion.data.alias, promotion.data.version) == (info.checkpoint_id, "production", 1)
    assert promotion.data.sha256 == info.sha256 and promotion.data.kind == "optimiser"  # the domain's optimiser head, not its EBDM's

    from scf.producers.strike import production_model

    assert await production_model(bus, DOMAIN) == info.checkpoint_id  # the newest head: the domain's contracts are due
    from scf.producers.promoted import fetch_promoted

    fetched = await fetch_promoted(bus, settings, DOMAIN, verify_release=False)  # what `scf strike --method learned` decides with
    assert fetched.promotion.checkpoint_id == info.checkpoint_id and fetched.path.read_bytes() == path.read_bytes()

    # the archive's `checkpoints` view and the value report show the verifier's own numbers
    from scf.projections import report, views
    from scf.projections.archive import archive_root, replay

    await replay(settings, streams=["CHECKPOINTS", "TRAINING", "INTENTS"])
    con = views.connect(archive_root(settings))
    try:
        cols = [d[0] for d in con.sql("SELECT * FROM checkpoints").description]
        [row] = [dict(zip(cols, r)) for r in con.sql("SELECT * FROM checkpoints").fetchall()]
    finally:
        con.close()
    vm = verified.data.metrics
    assert (row["checkpoint_id"], row["status"], row["alias"], row["version"], row["kind"]) == (
        info.checkpoint_id, "promoted", "production", 1, "optimiser")
    assert json.loads(row["verified_metrics"]) == pytest.approx(vm)
    assert json.loads(row["metrics"]) == pytest.approx(info.metrics)  # the worker's, beside the verifier's
    assert (row["verified_feasible"], row["verified_gap_median"], row["verified_gap_p95"], row["verified_savings_captured"],
            row["verified_regret"]) == pytest.approx((vm["decision_feasible"], vm["decision_gap_median"], vm["decision_gap_p95"],
                                                      vm["decision_savings_captured"], vm["decision_regret"]))
    assert row["baseline_regret"] is None and row["verified_heldout_dsm"] is None  # no production before it; not an EBDM
    out = report.build(archive_root(settings), tmp_path / "report")
    table = out.markdown.read_text().split("## Checkpoints as verified", 1)[1]
    [line] = [ln for ln in table.splitlines() if ln.startswith(f"| {info.checkpoint_id} |")]
    assert line.split(" | ")[2:5] == ["promoted (production v1)", f"{100 * vm['decision_feasible']:.3f} %",
                                      f"{100 * vm['decision_gap_median']:.3f} %"]


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_bad_optimiser_job_fails_with_its_reason_and_the_worker_keeps_serving(bus, settings, scf_env, tmp_path):
    (settings.home_path / "scf.toml").write_text("[worker]\nthreads = 1\n")
    bad = {
        "job-nowhere": (spec({"model": "optimiser", "steps": 50}, "grid:nowhere", "job-nowhere"),
                        "ConfigError: job job-nowhere: unknown domain 'grid:nowhere': use one of "),
        "job-zero": (spec({"model": "optimiser", "steps": 0}, DOMAIN, "job-zero"),
                     "ConfigError: job job-zero: optimiser steps, batch_size, hidden and depth must be >= 1 (got 0, 256, 256, 3)"),
    }
    log = tmp_path / "worker.out"
    worker = spawn([sys.executable, "-m", "scf.cli.main", "run", "worker", "--pool", "local", "--device", "cpu", "--id", "w"], scf_env, log)
    try:
        for job_spec, _ in bad.values():
            await bus.publish(ev.WorkItem.new(job_spec, source="test"))

        async def failed() -> bool:
            return await stream_count(bus, "TRAINING", "job.failed.>") >= len(bad) and await stream_count(bus, "JOBS") == 0

        await wait_for(failed, 120, "both jobs to fail" + _tail(log))
        assert worker.poll() is None, _tail(log)  # no crash: the worker still serves its pool
    finally:
        rcs = _stop([worker], {"worker": log})
    assert rcs == [0], _tail(log)
    failures = {e.data.job_id: e.data for e in await read_all(bus, "TRAINING", "job.failed.>")}
    assert set(failures) == set(bad)
    for job_id, (_, message) in bad.items():
        f = failures[job_id]
        assert f.final and f.attempt == 1, f  # a config the model refuses is final at once: not retried
        assert f.error.startswith(message), f.error
    assert await stream_count(bus, "TRAINING", "job.started.>") == len(bad)
    assert await stream_count(bus, "CHECKPOINTS") == 0
    assert await stream_count(bus, "DLQ") == len(bad)  # each kept, with its reason, for `scf dlq`


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_an_ebdm_is_judged_on_its_decisions_against_an_optimiser_in_production(bus, settings, tmp_path):
    """The daemon reads each candidate's kind from its header and puts it against its own
    kind's head only (an EBDM and an optimiser each have a `production` head); the verifier
    still judges an EBDM against a baseline that carries decision metrics on its repaired
    decisions (on held-out DSM alone, which the optimiser does not have, it would win unjudged)."""
    import msgspec
    import numpy as np

    from scf import domains
    from scf.ml.optimize import OptimiserConfig, train_optimiser
    from scf.ml.train import train_local
    from scf.producers.verify import DECISION_METRIC, CheckpointVerifier, VerifySettings, decide_promotion

    d = domains.get(DOMAIN)
    samples = d.synthesize(np.random.default_rng(5), 800)
    rows = [np.array([getattr(s, k) for s in samples]) for k in ("state", "context", "energy")]
    recorded = recorded_fossils(d, *rows, observed_at=FIXED_TIME)
    await bus.publish_many(recorded)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "fossils-00000.ndjson").write_bytes(b"\n".join(msgspec.json.encode(r.data) for r in recorded) + b"\n")
    tiny = {"hidden": 32, "depth": 1, "fourier_features": 8, "sigma_features": 4, "eval_records": 32, "n_levels": 4,
            "langevin_steps": 2, "log_every": 10, "warmup": 5}
    ebdm = await asyncio.to_thread(train_local, DOMAIN, shards, tmp_path / "ebdm", steps=120, batch_size=32, **tiny)
    opt = await asyncio.to_thread(train_optimiser, DOMAIN, shards, tmp_path / "opt",
                                  OptimiserConfig(steps=300, hidden=32, batch_size=64, eval_contexts=32))
    store = open_store(bus, settings)

    async def produced(cid: str, path) -> ev.CheckpointProduced:
        ref = await store.put(path, f"grid_case9/{cid}.safetensors")
        return ev.CheckpointProduced.new(ev.CheckpointInfo(checkpoint_id=cid, job_id=f"job-{cid}", domain=DOMAIN, uri=ref.uri,
                                                           sha256=ref.sha256, size=ref.size), source="worker")

    config = VerifySettings(min_heldout=16, decision_contexts=32)
    verifier = CheckpointVerifier(bus, settings, config)
    first = await produced("opt-1", opt.checkpoint)
    assert await verifier.kind(first) == "optimiser"  # from the fetched header (digest checked)
    assert await verifier.kind(await produced("ebdm-0", ebdm.checkpoint)) == "ebdm"
    [_, promoted] = decide_promotion(first, None, await verifier(first, None), config, source="daemon")
    assert isinstance(promoted, ev.CheckpointPromoted) and promoted.data.alias == "production"

    candidate = await produced("ebdm-1", ebdm.checkpoint)
    v = await verifier(candidate, promoted.data)
    assert v.ok and DECISION_METRIC in v.metrics and "heldout_dsm" in v.metrics and DECISION_METRIC in v.baseline_metrics
    assert v.metrics[DECISION_METRIC] > v.baseline_metrics[DECISION_METRIC]  # a 120-step EBDM decides worse than the optimiser
    [rejected] = decide_promotion(candidate, promoted.data, v, config, source="daemon")
    assert isinstance(rejected, ev.CheckpointRejected)
    assert any(r.startswith("decision_regret ") and "does not beat production's" in r for r in rejected.data.reasons), rejected.data.reasons
    # the rejection keeps what the verifier measured, and the checkpoints view shows it
    assert rejected.data.metrics == v.metrics and rejected.data.baseline_metrics == v.baseline_metrics
    assert rejected.data.baseline_checkpoint_id == "opt-1"
    await bus.publish_many([first, promoted, candidate, rejected])
    from scf.projections import views
    from scf.projections.archive import archive_root, replay

    await replay(settings, streams=["CHECKPOINTS"])
    con = views.connect(archive_root(settings))
    try:
        got = con.sql("SELECT status, baseline_checkpoint_id, verified_regret, baseline_regret, verified_heldout_dsm "
                      "FROM checkpoints WHERE checkpoint_id = 'ebdm-1'").fetchall()
    finally:
        con.close()
    assert got == [("rejected", "opt-1", pytest.approx(v.metrics[DECISION_METRIC]), pytest.approx(v.baseline_metrics[DECISION_METRIC]),
                    pytest.approx(v.metrics["heldout_dsm"]))]
