"""The deployed learned optimiser on the edge (issue 13): the numpy runtime decides as the
torch model does (float checkpoints and ternary students, HVAC and a grid with its balance
row); the control loop runs it against the simulated site; the saving minted follows the
deployed model (a better model, a larger saving, on the same weather); a model whose
decision breaks the deployment's envelope is reverted to the previous controller."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scf import domains
from scf.consumers.edge.control import ControlError, load_policy
from scf.consumers.edge.learned import LearnedRuntime


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


@pytest.mark.parametrize("domain_name", ["hvac:office3", "grid:case14"])
def test_numpy_runtime_decides_as_the_torch_model(tmp_path, domain_name):
    """Same proposals, same merit order, same repaired and polished decisions: to 1e-5 kW
    (HVAC) and float32 round-off (1e-6 relative: MW of a grid's 160 MW units)."""
    dom, model, path, c = _train(domain_name, tmp_path)
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


def test_numpy_runtime_runs_a_ternary_student_as_torch_does(tmp_path):
    from scf.ml.distill import export_student, load_student, make_student
    from scf.ml.ternary import freeze

    dom, teacher, _, _ = _train("hvac:office3", tmp_path)
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
