"""The deployed learned optimiser on the edge (issue 13): the numpy runtime decides as the
torch model does (float checkpoints and ternary students, HVAC and a grid with its balance
row); the control loop runs it against the simulated site; the saving minted follows the
deployed model (a better model, a larger saving, on the same weather); a model whose
decision breaks the deployment's envelope is reverted to the previous controller."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from scf import domains
from scf.bus import events as ev
from scf.consumers.edge.control import STATUS_QUO, ControlError, ControlSettings, load_policy
from scf.consumers.edge.learned import LearnedRuntime
from scf.consumers.edge.store import Installed


def _fossils(domain_name: str, n: int, directory: Path, seed: int = 3):
    from scf.domains.fossils import synth_shards
    from scf.ml.loader import load_arrays

    synth_shards(domain_name, n, directory, shard_size=max(n, 1), seed=seed)
    return [np.asarray(a, dtype=float) for a in load_arrays(directory, domain=domain_name, split="train", seed=0)]


def _train(domain_name: str, tmp_path: Path, steps: int = 60, n: int = 400):
    from scf.ml.optimize import OptimiserConfig, fit_optimiser, save_optimiser

    dom = domains.get(domain_name)
    x, c, e = _fossils(domain_name, n, tmp_path / "fossils")
    model, metrics = fit_optimiser(dom, x, c, e, OptimiserConfig(domain=domain_name, steps=steps, hidden=32, depth=2, batch_size=64))
    path = save_optimiser(tmp_path / "opt.safetensors", model, lineage={"test": True}, metrics=metrics)
    return dom, model, path, c


@pytest.fixture(scope="module")
def hvac_trained(tmp_path_factory):
    """`_train("hvac:office3")` once for the two tests that run it (the model is not changed:
    the student is a copy)."""
    return _train("hvac:office3", tmp_path_factory.mktemp("hvac-trained"))


@pytest.mark.parametrize("domain_name", ["hvac:office3", "grid:case14"])
def test_numpy_runtime_decides_as_the_torch_model(tmp_path, domain_name, request):
    """Same proposals, same merit order, same repaired and polished decisions: to 1e-5 kW
    (HVAC) and float32 round-off (1e-6 relative: MW of a grid's 160 MW units)."""
    dom, model, path, c = request.getfixturevalue("hvac_trained") if domain_name == "hvac:office3" else _train(domain_name, tmp_path)
    rt = LearnedRuntime.load(path)
    rng = np.random.default_rng(1)
    contexts = np.stack([dom.sample_context(rng) for _ in range(48)])
    raw_t, fixed_t = model.decide(dom, contexts)
    raw_n, fixed_n = rt.decide(dom, contexts)
    assert np.allclose(raw_n, raw_t, atol=1e-5, rtol=1e-6), np.abs(raw_n - raw_t).max()
    assert np.array_equal(fixed_n.feasible, fixed_t.feasible) and fixed_n.feasible.mean() > 0.8
    # a few sampled contexts have no feasible state at all (a zone that cannot reach its band
    # in the hour): there the repair's last iterate is ill-conditioned (1e-8 in, 1e-2 out), so
    # the decisions are compared where one exists
    ok = fixed_n.feasible
    assert np.allclose(fixed_n.states[ok], fixed_t.states[ok], atol=1e-5, rtol=1e-6), np.abs(fixed_n.states - fixed_t.states)[ok].max()
    assert np.allclose(rt.merit(contexts, raw_t), model.merit(contexts, raw_t), rtol=1e-9, atol=1e-9)
    import torch

    with torch.no_grad():
        want = model.cost(torch.as_tensor(fixed_t.states), torch.as_tensor(contexts)).numpy()
    assert np.allclose(rt.energy(contexts, fixed_t.states), want, rtol=1e-9, atol=1e-9)
    # every decision the repair calls feasible passes the domain's own check
    for ci, xi in zip(contexts[fixed_n.feasible], fixed_n.states[fixed_n.feasible]):
        assert dom.violations(ci, xi) == []


def test_numpy_runtime_runs_a_ternary_student_as_torch_does(tmp_path, hvac_trained):
    from scf.ml.distill import export_student, load_student, make_student
    from scf.ml.ternary import freeze

    dom, teacher, _, _ = hvac_trained
    student = make_student(teacher, "optimiser")
    freeze(student)
    path = export_student(tmp_path / "student.safetensors", student, kind="optimiser", config=teacher.config.to_dict(),
                          packing="2bit", lineage={}, metrics={})
    reloaded, _ = load_student(path)
    rng = np.random.default_rng(2)
    contexts = np.stack([dom.sample_context(rng) for _ in range(32)])
    raw_t, fixed_t = reloaded.decide(dom, contexts)
    raw_n, fixed_n = LearnedRuntime.load(path).decide(dom, contexts)
    assert np.allclose(raw_n, raw_t, atol=1e-5, rtol=1e-6), np.abs(raw_n - raw_t).max()
    assert np.array_equal(fixed_n.feasible, fixed_t.feasible)
    # the polish's line searches (interval ends, pinv directions) can stretch the float32
    # round-off of the proposals (1e-7) to 1e-4 kW: the decisions and their learned cost agree to that
    ok = fixed_t.feasible
    assert np.allclose(fixed_n.states[ok], fixed_t.states[ok], atol=1e-3, rtol=0), np.abs(fixed_n.states - fixed_t.states)[ok].max()
    rt = LearnedRuntime.load(path)
    assert np.allclose(rt.energy(contexts, fixed_n.states)[ok], rt.energy(contexts, fixed_t.states)[ok], rtol=1e-4)


def test_the_loop_refuses_a_learned_model_of_another_domain(tmp_path):
    _, _, path, _ = _train("grid:case14", tmp_path, steps=5, n=120)
    with pytest.raises(ControlError, match=r"is a learned optimiser of grid:case14 .* this loop runs hvac:office3: deploy one of hvac:office3"):
        load_policy(path, domains.get("hvac:office3"))
    damaged = tmp_path / "damaged.safetensors"
    from safetensors.numpy import load_file, save_file

    from scf.consumers.edge.ternary import read_metadata

    tensors = load_file(str(path))
    del tensors["cost.weights"]
    save_file(tensors, str(damaged), metadata=read_metadata(path))
    with pytest.raises(ControlError, match=r"states a learned optimiser but lacks \['cost.weights'\]: the file is damaged"):
        load_policy(damaged, domains.get("grid:case14"))
    # the health probe after activation runs the same runtime: a damaged optimiser is refused there
    from scf.consumers.edge.probe import health_check

    assert health_check(path) is None
    assert health_check(damaged).endswith("lacks ['cost.weights']: the file is damaged or from another version")
    poisoned = tmp_path / "nan.safetensors"
    tensors = load_file(str(path))
    tensors["policy.net.0.weight"][0, 0] = np.nan
    save_file(tensors, str(poisoned), metadata=read_metadata(path))
    assert health_check(poisoned).endswith("tensor policy.net.0.weight holds non-finite values: the model cannot decide")


# --------------------------------------------------------------------------- on the simulated site

# 24 h of status-quo history, then the model for a day (the demo's site: seed 10, 9.7 °C mean)
SETTINGS = ControlSettings(sim_hours=48, min_history_hours=24, report_hours=24)


@pytest.fixture(scope="module")
def site_models(tmp_path_factory):
    """The demo's two learned optimisers (ops/demo_hvac.py): trained on 300 HVAC fossils and
    on the first 100 of them (fewer than the cost model's 147 features), 30 steps, 64 x 2."""
    from scf.domains.fossils import synth_shards
    from scf.ops import demo_hvac

    root = tmp_path_factory.mktemp("site-models")
    synth_shards(demo_hvac.HVAC, demo_hvac.FOSSILS, root / "all", shard_size=demo_hvac.FOSSILS, seed=demo_hvac.SEED)
    (root / "few").mkdir()
    lines = (root / "all" / "fossils-00000.ndjson").read_bytes().splitlines(keepends=True)
    (root / "few" / "fossils-00000.ndjson").write_bytes(b"".join(lines[: demo_hvac.FEW]))
    # trained in this process: the weights and metrics are bit-identical to `scf train-optimiser`'s
    # in a fresh process (training pins its own threads, seeds its own RNG; checked 2026-12-02),
    # and a process would spend its ~3 s importing torch again. The worse model (its cost fitted
    # on fewer fossils than it has features) changes with any fossil taken into or out of its
    # training split: the fossils above must be byte-identical whatever this worker solved
    # before (the domain's LPs solve cold: tests/test_solve_history.py)
    from scf.ml.optimize import OptimiserConfig, train_optimiser

    trained = {}
    for label, data in (("better", "all"), ("worse", "few")):
        r = train_optimiser(demo_hvac.HVAC, root / data, root / label, OptimiserConfig(steps=30, hidden=64, depth=2, eval_contexts=128))
        trained[label] = SimpleNamespace(metrics=r.metrics, checkpoint=r.checkpoint)
    return trained


def _installed(directory: Path, checkpoint_id: str, source: Path, version: int = 1, envelope: dict | None = None) -> Installed:
    """A model file placed as the edge store places it, with a deployment envelope when given."""
    from safetensors.numpy import load_file, save_file

    from scf.consumers.edge.ternary import read_metadata

    dirname = f"{checkpoint_id}-v{version}"
    path = directory / "versions" / dirname / "model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = read_metadata(source)
    if envelope is not None:
        meta["scf.envelope"] = json.dumps(envelope)
    save_file(load_file(str(source)), str(path), metadata=meta)
    return Installed(checkpoint_id=checkpoint_id, domain="hvac:office3", version=version, uri="", sha256="", size=0,
                     dirname=dirname, deployment_id=f"dep-{checkpoint_id}", plan_id="plan")


@pytest.mark.anyio
@pytest.mark.timeout(600)
# it flaked in CI (the worse model minted 5.89/6.32 kWh): the fixture's fossils depended on the LPs
# this xdist worker had solved before (warm-started HiGHS), so the worse model trained on another
# split; fixed in domains/base.py, guarded by tests/test_solve_history.py
async def test_minted_saving_follows_the_deployed_model(bus, settings, tmp_path, site_models):
    """The same site, the same weather, two learned optimisers: the better model's decisions
    earn the larger saving (measured by Option D against the calibrated baseline, minted by
    the ledger); its held-out decision quality was better too."""
    from scf.consumers.ledger import LedgerSettings, read_transfers
    from scf.domains import mv
    from tests.conftest import wait_for
    from tests.plant_support import control_run
    from tests.test_deploy_helpers import Keys
    from tests.test_ledger import consumer_done, publish_signed, running_ledger

    better, worse = site_models["better"], site_models["worse"]
    assert better.metrics["decision_savings_captured"] > worse.metrics["decision_savings_captured"]
    assert better.metrics["cost_heldout_mae_rel"] < worse.metrics["cost_heldout_mae_rel"]
    keys = Keys(settings)
    runs = {}
    for node, result in (("n-better", better), ("n-worse", worse)):
        d = tmp_path / node
        runs[node] = await control_run(d, {96: _installed(d, f"ck-{node}", result.checkpoint)}, SETTINGS, node=node)
    for node, loop in runs.items():
        assert not any(isinstance(e, ev.DeployRolledBack) for e in loop.events), node
        assert {r.controller for r in loop.records[97:]} == {f"ck-{node}"}  # the model decided the whole day
        [m] = [e for e in loop.events if isinstance(e, ev.EnergyMeasured)]
        assert m.data.method == mv.METHOD and m.data.calibration.cv_rmse < 0.3 and m.data.uncertainty_kwh > 0
    # the same weather: the two baselines (the calibrated thermostat over the measured disturbances) agree
    assert runs["n-better"].measured[0].baseline_kwh == pytest.approx(runs["n-worse"].measured[0].baseline_kwh, rel=1e-6)
    async with running_ledger(bus, keys, LedgerSettings(rate=1.0, require_calibration=True)):
        for node, loop in runs.items():
            for e in loop.events:
                if isinstance(e, ev.EnergyMeasured):
                    await publish_signed(bus, e, keys.node(node))
        await wait_for(lambda: consumer_done(bus), 60, "the ledger to drain")
    minted: dict[str, float] = {}
    for entry in await read_transfers(bus):
        minted[entry.transfer.node] = minted.get(entry.transfer.node, 0.0) + entry.transfer.kwh
    assert minted["n-better"] > minted["n-worse"] > 0
    # the difference is beyond the stated uncertainty of either saving
    u = max(runs[n].measured[0].uncertainty_kwh for n in runs)
    assert minted["n-better"] - minted["n-worse"] > u
    for node, loop in runs.items():
        assert minted[node] == pytest.approx(sum(m.baseline_kwh - m.actual_kwh for m in loop.measured))


@pytest.mark.anyio
@pytest.mark.timeout(600)
async def test_a_learned_model_breaking_its_envelope_reverts_to_the_previous_model(tmp_path, site_models):
    """v1 a day-ahead decision; v2 the better learned optimiser, deployed with an envelope of
    2 kW a zone: its first decision on a cold morning asks for more, so the loop reverts to
    v1 before writing it, reports why, and never runs v2 again on this node."""
    from scf.consumers.edge.control import ControlLoop
    from scf.consumers.edge.plant import SimPlant
    from tests.plant_support import control_run, installed

    v1 = installed(tmp_path, "ck-1", "good", 1)
    v2 = _installed(tmp_path, "ck-learned", site_models["better"].checkpoint, 2, envelope={"u_max_kw": [2.0, 2.0, 2.0]})
    prev = {"ck-learned": v1, "ck-1": None}
    # seq 128 is 08:00 of the second day: people arrive, the zones need heat
    loop = await control_run(tmp_path, {96: v1, 128: v2}, SETTINGS, previous=lambda item: prev[item.checkpoint_id])
    [revert] = [e for e in loop.events if isinstance(e, ev.DeployRolledBack)]
    assert revert.data.from_checkpoint_id == "ck-learned" and revert.data.to_checkpoint_id == "ck-1"
    assert re.fullmatch(r"envelope breach: u\[\w+\] (\d+\.\d\d) kW above the envelope's 2\.00 kW", revert.data.reason), revert.data.reason
    assert revert.data.deployment_id == "dep-ck-learned"
    ran = [r.controller for r in loop.records]
    assert "ck-learned" not in ran and ran[-1] == "ck-1"
    assert set(json.loads((tmp_path / "control" / "breached.json").read_text())) == {"ck-learned"}
    again = ControlLoop(SimPlant(SETTINGS.site()), "n1", tmp_path, SETTINGS, current=lambda: v2, previous=lambda item: prev[item.checkpoint_id])
    again._setup(await again.plant.telemetry(-1))
    assert again._controller_for(v2).name == "ck-1"
    assert STATUS_QUO not in ran[97:]


WITHOUT_TORCH = r"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed on this edge box")
sys.meta_path.insert(0, NoTorch())
import numpy as np
from scf import domains
from scf.consumers.edge.control import load_policy
from scf.consumers.edge.probe import health_check
path, contexts = sys.argv[1], np.load(sys.argv[2])
assert health_check(path) is None, health_check(path)
policy, _ = load_policy(__import__("pathlib").Path(path), domains.get("hvac:office3"))
out = np.stack([policy.decide(policy.domain, c)[1] for c in contexts])
assert not any(m == "torch" or m.startswith("torch.") or m.startswith("scf.ml") for m in sys.modules), sorted(sys.modules)
np.save(sys.argv[3], out)
"""


def test_the_edge_decides_with_a_learned_model_without_torch(tmp_path):
    """A process where torch cannot be imported loads, probes and runs the checkpoint through
    the control loop's policy: the torch model's decisions."""
    import subprocess
    import sys

    dom, model, path, _ = _train("hvac:office3", tmp_path, steps=10, n=150)
    rng = np.random.default_rng(3)
    contexts = np.stack([dom.sample_context(rng) for _ in range(8)])
    np.save(tmp_path / "c.npy", contexts)
    run = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(path), str(tmp_path / "c.npy"), str(tmp_path / "u.npy")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    _, fixed = model.decide(dom, contexts)
    ok = fixed.feasible
    assert ok.any()
    assert np.allclose(np.load(tmp_path / "u.npy")[ok], fixed.states[ok], atol=1e-5, rtol=1e-6)


@pytest.mark.anyio
@pytest.mark.timeout(600)
async def test_a_ternary_student_of_the_better_model_decides_on_the_site(tmp_path, site_models):
    """The better model distilled to a 2-bit student (`scf distill`'s path) is deployed like
    any artifact; the loop runs it with numpy for the whole day and it saves what its
    teacher saves on the same weather, within the stated uncertainty."""
    from scf.consumers.edge.ternary import read_metadata
    from scf.ml.distill import DistillConfig, distill_file
    from tests.plant_support import control_run

    teacher = site_models["better"].checkpoint
    data = teacher.parent.parent / "all"
    student = distill_file(teacher, data, tmp_path / "students", DistillConfig(steps=60, batch_size=64, heldout=32, packing="2bit")).student
    assert read_metadata(student)["format"] == "scf-ternary/1" and student.stat().st_size < teacher.stat().st_size
    saved = {}
    for name, path in (("teacher", teacher), ("student", student)):
        d = tmp_path / name
        loop = await control_run(d, {96: _installed(d, f"ck-{name}", path)}, SETTINGS, node=name)
        assert not any(isinstance(e, ev.DeployRolledBack) for e in loop.events), name
        assert {r.controller for r in loop.records[97:]} == {f"ck-{name}"}
        [m] = loop.measured
        saved[name] = (m.baseline_kwh - m.actual_kwh, m.uncertainty_kwh)
    assert saved["student"][0] > 0
    assert abs(saved["student"][0] - saved["teacher"][0]) <= saved["teacher"][1], saved


def test_lookahead_marks_zones_occupied_by_the_end_of_the_hour():
    """A one-hour optimiser's context: empty zones count as occupied (0.1) when the site's
    working hours begin by the end of the hour; occupied zones and other hours are as
    measured; the hours are the site's setting, refused in one line when they make no sense."""
    import msgspec

    from scf.consumers.edge.control import lookahead

    dom = domains.get("hvac:office3")
    ctx = np.array([5.0, 7.0, 0.0, 0.5, 0.0, 17.0, 17.0, 17.0])
    assert lookahead(dom, ctx).tolist() == [5.0, 7.0, 0.1, 0.5, 0.1, 17.0, 17.0, 17.0]
    assert lookahead(dom, np.array([5.0, 17.0, 0.8, 0.0, 0.0, 21, 21, 21])).tolist() == [5.0, 17.0, 0.8, 0.0, 0.0, 21, 21, 21]
    at5 = np.array([5.0, 5.0, 0.0, 0.0, 0.0, 17.0, 17.0, 17.0])
    assert lookahead(dom, at5).tolist() == at5.tolist()
    assert lookahead(dom, at5, (6.0, 16.0))[2:5].tolist() == [0.1, 0.1, 0.1]
    assert msgspec.convert({"occupied_hours": [6, 16]}, ControlSettings).occupied_hours == (6.0, 16.0)
    with pytest.raises(msgspec.ValidationError, match=r"occupied_hours = \[18.0, 8.0\]: give \[start, end\) hours of the day"):
        msgspec.convert({"occupied_hours": [18, 8]}, ControlSettings)
