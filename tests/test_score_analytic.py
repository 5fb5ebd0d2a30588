"""The analytic score (`EBDM.analytic_score`, issue 16): the input gradient of the energy
written out by hand equals autograd's, to rounding, for every shape the model takes; its
parameter gradients (what training backpropagates) equal the double backward's; training
with it follows the same loss curve; the loss it gives compiles as one graph."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from scf import domains
from scf.bus.errors import ConfigError
from scf.ml.ebdm import EBDM, EBDMConfig
from scf.ml.physics import penalty_for
from scf.ml.ternary import ternarise
from scf.ml.train import compile_choice, fit, loss_given_noise

ARCHES = {  # name: config — with and without context, no blocks, one, several, a wide input
    "hvac-context-depth2": EBDMConfig(domain="hvac:office3", hidden=16, depth=2, fourier_features=4),
    "grid-context-depth1": EBDMConfig(domain="grid:case14", hidden=24, depth=1, fourier_features=8),
    "no-context-depth3": EBDMConfig(state_dim=3, context_dim=0, hidden=8, depth=3),
    "no-blocks": EBDMConfig(state_dim=2, context_dim=1, hidden=8, depth=0),
}


def perturbed(config: EBDMConfig, seed: int = 0) -> EBDM:
    """A float64 model with every parameter moved off its initial value (LayerNorm's γ off 1
    and β off 0 too, so that their terms of the gradient are exercised)."""
    torch.manual_seed(seed)
    model = EBDM(config).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def inputs(model: EBDM, n: int = 6, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    z = torch.randn(n, cfg.state_dim, generator=gen, dtype=torch.float64)
    cz = torch.rand(n, cfg.context_dim, generator=gen, dtype=torch.float64) * 2 - 1
    sigma = torch.exp(torch.empty(n, 1, dtype=torch.float64).uniform_(math.log(0.01), math.log(3.0), generator=gen))
    return z, cz, sigma


def autograd_score(model: EBDM, z, cz, sigma, create_graph: bool = False):
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        e = model.energy(z, cz, sigma)
        (grad,) = torch.autograd.grad(e.sum(), z, create_graph=create_graph)
    return -grad, e


@pytest.mark.parametrize("arch", sorted(ARCHES))
@pytest.mark.parametrize("per_row_sigma", [True, False])
def test_analytic_score_equals_autograd_in_float64(arch, per_row_sigma):
    model = perturbed(ARCHES[arch])
    z, cz, sigma = inputs(model)
    sigma = sigma if per_row_sigma else 0.37
    score, energy = model.analytic_score(z, cz, sigma)
    ref_score, ref_energy = autograd_score(model, z, cz, sigma)
    assert score.abs().max() > 0.1  # a score worth comparing
    torch.testing.assert_close(score, ref_score, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(energy, ref_energy, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_parameter_gradients_through_the_analytic_score_equal_the_double_backward(arch):
    """What training uses: ∂/∂θ of a loss of the score, first order vs create_graph."""
    model = perturbed(ARCHES[arch], seed=2)
    z, cz, sigma = inputs(model, seed=3)
    target = torch.randn_like(z)
    params = list(model.parameters())

    def grads(score, energy):
        loss = (sigma * score + target).square().mean() + 0.1 * energy.mean()
        return torch.autograd.grad(loss, params, allow_unused=True)

    mine = grads(*model.analytic_score(z, cz, sigma))
    ref = grads(*autograd_score(model, z, cz, sigma, create_graph=True))
    assert len(mine) == len(params)
    for name, a, b in zip([n for n, _ in model.named_parameters()], mine, ref):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    assert any(float(g.abs().max()) > 1e-3 for g in mine if g is not None)


def test_score_dispatches_by_config_and_falls_back_for_layers_it_does_not_know():
    cfg = ARCHES["hvac-context-depth2"]
    assert EBDM(cfg).analytic  # "auto"
    assert EBDM(dataclasses.replace(cfg, score_impl="analytic")).analytic
    assert not EBDM(dataclasses.replace(cfg, score_impl="autograd")).analytic
    student = perturbed(cfg)
    assert ternarise(student, keep=("inp", "head.1"))  # BitLinear blocks: straight-through quantisers
    assert not student.analytic
    z, cz, sigma = inputs(student)
    score, _ = student.score(z, cz, sigma)  # autograd's, through the quantisers
    torch.testing.assert_close(score, autograd_score(student, z, cz, sigma)[0])
    with pytest.raises(TypeError, match="score_impl='autograd'"):
        student.analytic_score(z, cz, sigma)


def test_the_public_score_is_the_analytic_one_detached_unless_asked():
    model = perturbed(ARCHES["grid-context-depth1"])
    z, cz, sigma = inputs(model)
    score, _ = model.score(z, cz, sigma)
    assert not score.requires_grad
    graphed, _ = model.score(z, cz, sigma, create_graph=True)
    assert graphed.requires_grad
    torch.testing.assert_close(score, autograd_score(model, z, cz, sigma)[0], rtol=1e-12, atol=1e-12)


def test_parameter_names_are_unchanged():
    """Checkpoints stay compatible: the analytic path adds no parameter or buffer."""
    cfg = ARCHES["hvac-context-depth2"]
    a, b = EBDM(cfg), EBDM(dataclasses.replace(cfg, score_impl="autograd"))
    assert list(a.state_dict()) == list(b.state_dict())
    assert "blocks.1.fc2.weight" in a.state_dict() and "head.1.bias" in a.state_dict()
    assert EBDMConfig.from_dict({k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("score_impl", "compile")}).score_impl == "auto"


def test_bad_score_impl_or_compile_mode_is_named():
    with pytest.raises(ConfigError, match=r"score_impl 'fast' is not one of \['auto', 'analytic', 'autograd'\]"):
        EBDMConfig(state_dim=2, score_impl="fast").resolved()
    with pytest.raises(ConfigError, match=r"compile 'yes' is not one of"):
        EBDMConfig(state_dim=2, compile="yes").resolved()


def case14_batches(n_batches: int, batch: int, seed: int = 0):
    grid = domains.get("grid:case14")
    samples = grid.synthesize(np.random.default_rng(seed), n_batches * batch)
    x = torch.tensor(np.stack([s.state for s in samples]), dtype=torch.float32)
    c = torch.tensor(np.stack([s.context for s in samples]), dtype=torch.float32)
    return [(x[i : i + batch], c[i : i + batch]) for i in range(0, n_batches * batch, batch)], penalty_for(grid)


def test_training_loss_curve_is_the_autograd_one():
    """Eight steps with the physics penalty, fp32 on the CPU: the same losses step by step
    and the same weights after, analytic score or double backward."""
    batches, penalty = case14_batches(8, 32)
    cfg = EBDMConfig(domain="grid:case14", hidden=32, depth=2, fourier_features=8, steps=8, batch_size=32,
                     log_every=1, warmup=2, ema=0.0, physics_weight=1.0)
    curves, models = {}, {}
    for impl in ("autograd", "analytic"):
        torch.manual_seed(0)
        losses: list[float] = []
        models[impl], stats = fit(EBDM(dataclasses.replace(cfg, score_impl=impl)), batches, penalty=penalty,
                                  progress_cb=lambda step, total, loss, sps: losses.append(loss))
        assert stats.steps == 8 and not stats.compiled
        curves[impl] = losses
    assert len(curves["analytic"]) == 8 and curves["analytic"][0] != curves["analytic"][-1]
    np.testing.assert_allclose(curves["analytic"], curves["autograd"], rtol=1e-5)
    for (name, a), b in zip(models["analytic"].named_parameters(), models["autograd"].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_autocast_scores_agree_to_bf16_precision():
    """The GPU's dtype path (bf16 matrix products, fp32 LayerNorm) on the CPU."""
    model = EBDM(ARCHES["grid-context-depth1"])
    z, cz, sigma = (t.float() for t in inputs(model, n=64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        score, energy = model.analytic_score(z, cz, sigma)
        ref, ref_energy = autograd_score(model, z, cz, sigma)
    assert score.dtype == ref.dtype == torch.float32
    exact, exact_energy = model.analytic_score(z, cz, sigma)  # fp32
    for mine, theirs, truth in ((score, ref, exact), (energy, ref_energy, exact_energy)):
        err, ref_err = (mine - truth).norm() / truth.norm(), (theirs - truth).norm() / truth.norm()
        assert 0 < err < 0.02 and ref_err < 0.02, (err, ref_err)  # both bf16-accurate (the two round differently)


def test_the_loss_given_the_noise_compiles_as_one_graph_with_the_same_gradients():
    """dynamo + aot_autograd take the analytic loss whole (fullgraph: no break; aot_eager:
    the traced graphs run by torch's own kernels, so only the tracing is under test); the
    double backward's loss does not compile this way."""
    import torch._dynamo

    batches, penalty = case14_batches(1, 16)
    x, c = batches[0]
    cfg = EBDMConfig(domain="grid:case14", hidden=16, depth=2, fourier_features=4, physics_weight=1.0)
    torch.manual_seed(0)
    model = EBDM(cfg).train()
    sigma, eps = model.draw_noise(16, x.shape[1])
    params = list(model.parameters())
    eager = loss_given_noise(model, penalty, x, c, sigma, eps, False)
    eager_grads = torch.autograd.grad(eager, params, allow_unused=True)  # the head's biases move E, not the score
    torch._dynamo.reset()
    compiled = torch.compile(loss_given_noise, backend="aot_eager", fullgraph=True, dynamic=False)
    loss = compiled(model, penalty, x, c, sigma, eps, False)
    torch.testing.assert_close(loss, eager)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    unused = {name for (name, _), g in zip(model.named_parameters(), grads) if g is None}
    assert unused <= {"head.0.bias", "head.1.bias"}, unused
    for p, a, b in zip(params, grads, eager_grads):
        zero = torch.zeros_like(p)
        torch.testing.assert_close(zero if a is None else a, zero if b is None else b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_compile_auto_means_default_mode_on_cuda_with_the_analytic_score_only():
    cfg = ARCHES["no-context-depth3"]
    analytic, autograd = EBDM(cfg), EBDM(dataclasses.replace(cfg, score_impl="autograd"))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device name: no GPU needed
    assert cfg.compile == "auto"
    assert compile_choice("auto", analytic, cuda) == "default"
    assert compile_choice("auto", analytic, cpu) == "off"  # the demo trains on the CPU: no compile
    assert compile_choice("auto", autograd, cuda) == "off"
    assert compile_choice("max-autotune-no-cudagraphs", analytic, cpu) == "max-autotune-no-cudagraphs"
    _, stats = fit(EBDM(dataclasses.replace(cfg, steps=2, batch_size=8, log_every=1)), [(torch.randn(8, 3), torch.zeros(8, 0))] * 2)
    assert stats.steps == 2 and not stats.compiled and stats.compile_error is None


def test_compile_with_the_autograd_score_says_why_and_trains_eagerly():
    batches, penalty = case14_batches(3, 16)
    cfg = EBDMConfig(domain="grid:case14", hidden=16, depth=1, fourier_features=4, steps=3, batch_size=16, log_every=1,
                     score_impl="autograd", compile="default")
    model, stats = fit(EBDM(cfg), batches, penalty=penalty)
    assert stats.steps == 3 and math.isfinite(stats.loss) and not stats.compiled
    assert "use score_impl analytic" in stats.compile_error


@pytest.mark.slow
@pytest.mark.timeout(1800)  # inductor compiles C++ on the CPU: about 4 minutes on 2 busy cores
def test_inductor_compiled_training_follows_the_eager_loss_curve():
    batches, penalty = case14_batches(4, 32)
    cfg = EBDMConfig(domain="grid:case14", hidden=32, depth=2, fourier_features=8, steps=4, batch_size=32, log_every=1,
                     warmup=2, ema=0.0)
    curves = {}
    for mode in ("off", "default"):
        torch.manual_seed(0)
        losses: list[float] = []
        _, stats = fit(EBDM(cfg), batches, penalty=penalty, compile_mode=mode,
                       progress_cb=lambda step, total, loss, sps: losses.append(loss))
        assert stats.compiled == (mode != "off"), stats.compile_error
        curves[mode] = losses
    np.testing.assert_allclose(curves["default"], curves["off"], rtol=1e-4)


def test_a_compile_that_fails_leaves_the_step_eager_and_says_why():
    """inductor pointed at a C++ compiler that does not exist (as on a machine without one)."""
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.reset()
    cfg = EBDMConfig(state_dim=3, context_dim=0, hidden=12, depth=1, steps=3, batch_size=8, log_every=1)
    batches = [(torch.randn(8, 3), torch.zeros(8, 0))] * 3
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        _, stats = fit(EBDM(cfg), batches, compile_mode="default")
    torch._dynamo.reset()
    assert stats.steps == 3 and math.isfinite(stats.loss) and not stats.compiled
    assert "C++ compiler" in stats.compile_error, stats.compile_error
