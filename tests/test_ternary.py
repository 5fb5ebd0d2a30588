"""BitNet b1.58 layers and the packed student format: the recipe's invariants (ternary
weights times one scale, 8-bit activations, straight-through gradients), an exact
pack/unpack round trip, and the numpy runtime reproducing the torch student — without
torch in the process."""

from __future__ import annotations

import dataclasses
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from scf.consumers.edge.probe import health_check
from scf.consumers.edge.ternary import TernaryError, TernaryNet, load_packed, pack, packed_size, probe, quantise_activations, unpack
from scf.ml.distill import export_student, load_student, make_student
from scf.ml.ebdm import EBDM, EBDMConfig
from scf.ml.ternary import BitLinear, activation_quant, bit_layers, freeze, ternary_share, weight_quant

TINY = EBDMConfig(state_dim=3, context_dim=2, hidden=32, depth=2, fourier_features=8, sigma_features=4, n_levels=6)


def tiny_student(seed: int = 0):
    torch.manual_seed(seed)
    teacher = EBDM(TINY).eval()
    student = make_student(teacher, "ebdm")
    with torch.no_grad():  # move the latent weights off the teacher's so that scales differ per layer
        for layer in bit_layers(student).values():
            layer.weight.mul_(1 + 0.5 * torch.rand_like(layer.weight))
    freeze(student)
    return teacher, student.eval()


# --------------------------------------------------------------------------- the recipe


def test_weights_are_ternary_times_the_absmean_scale():
    w = torch.randn(64, 48) * 0.3
    t, gamma = weight_quant(w)
    assert set(t.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert float(gamma) == pytest.approx(float(w.abs().mean()))
    assert torch.equal(t, (w / w.abs().mean()).round().clamp(-1, 1))
    assert 0.2 < float((t == 0).float().mean()) < 0.5  # RoundClip makes zeros of the small weights


def test_activations_are_quantised_per_row_to_8_bits():
    x = torch.randn(5, 300) * torch.tensor([[0.01], [1.0], [50.0], [3.0], [0.5]])
    q = activation_quant(x)
    step = x.abs().amax(-1, keepdim=True) / 127
    levels = q / step
    assert torch.allclose(levels, levels.round(), atol=1e-3)  # on each row's own grid
    assert float(levels.abs().max()) <= 127 + 1e-3
    assert all(len(row.unique()) <= 255 for row in q)
    assert torch.allclose(q, x, atol=float(step.max()) / 2 + 1e-6)  # rows keep their own scale
    assert np.allclose(quantise_activations(x.numpy()), q.numpy(), atol=1e-6)  # the edge quantises alike


def test_bitlinear_computes_with_quantised_values_and_passes_gradients_straight_through():
    torch.manual_seed(0)
    layer = BitLinear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    y = layer(x)
    t, gamma = weight_quant(layer.weight.detach())
    assert torch.allclose(y, F.linear(activation_quant(x.detach()), t * gamma, layer.bias), atol=1e-6)
    y.square().sum().backward()
    # straight through: the latent weights get the gradient of the quantised product
    g_out = 2 * y.detach()
    assert torch.allclose(layer.weight.grad, g_out.T @ activation_quant(x.detach()), atol=1e-5)
    assert torch.allclose(x.grad, g_out @ (t * gamma), atol=1e-5)
    assert float(layer.weight.grad.abs().sum()) > 0


def test_freeze_fixes_the_scale_and_keeps_the_function():
    torch.manual_seed(1)
    layer = BitLinear(32, 16)
    x = torch.randn(6, 32)
    before = layer(x).detach()
    layer.freeze()
    assert torch.equal(layer(x).detach(), before)
    t, gamma = layer.quantised_weight()
    assert float(layer.wscale) == float(gamma) and torch.equal(layer.weight.detach(), t * gamma)
    layer.freeze()  # idempotent
    assert torch.equal(layer.quantised_weight()[0], t) and float(layer.wscale) == float(gamma)


def test_the_student_keeps_input_output_projections_features_and_norms_in_full_precision():
    teacher, student = tiny_student()
    bits = bit_layers(student)
    assert sorted(bits) == sorted(f"blocks.{i}.{n}" for i in range(2) for n in ("fc1", "cond", "fc2"))
    assert type(student.inp) is nn.Linear and type(student.head[1]) is nn.Linear
    assert isinstance(student.blocks[0].norm, nn.LayerNorm)
    assert 0.5 < ternary_share(student) < 1.0


def test_ste_gradients_reach_every_latent_weight_through_the_score():
    """Distillation backpropagates through the score (a gradient): the latent weights of
    every ternary layer still get gradients."""
    torch.manual_seed(2)
    student = make_student(EBDM(TINY), "ebdm").train()
    z, cz = torch.randn(8, 3), torch.randn(8, 2)
    score, _ = student.score(z, cz, torch.full((8, 1), 0.3), create_graph=True)
    score.square().mean().backward()
    for name, layer in bit_layers(student).items():
        assert layer.weight.grad is not None and float(layer.weight.grad.abs().sum()) > 0, name


# --------------------------------------------------------------------------- the codec


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([-1, 0, 1]), max_size=300), st.sampled_from(["2bit", "base3"]))
def test_pack_unpack_round_trip_is_exact(values, packing):
    t = np.array(values, dtype=np.int8)
    packed = pack(t, packing)
    assert packed.dtype == np.uint8 and len(packed) == packed_size(len(t), packing)
    assert np.array_equal(unpack(packed, len(t), packing), t)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=64))
def test_unpack_refuses_codes_that_are_no_ternary_weight(raw):
    b = np.frombuffer(raw, np.uint8)
    for packing, per, bad in (("2bit", 4, ((b[:, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3 == 3).any()), ("base3", 5, (b > 242).any())):
        if bad:
            with pytest.raises(TernaryError, match="damaged"):
                unpack(b, len(b) * per, packing)
        else:
            assert len(unpack(b, len(b) * per, packing)) == len(b) * per


def test_packing_density_and_wrong_lengths():
    t = np.tile(np.array([-1, 0, 1], np.int8), 1000)
    assert len(pack(t, "2bit")) == 750 and len(pack(t, "base3")) == 600  # 2 and 1.6 bits a weight
    with pytest.raises(TernaryError, match=r"^750 packed bytes do not hold 3005 weights as 2bit \(needs 752\): the file is damaged$"):
        unpack(pack(t, "2bit"), 3005, "2bit")
    assert np.array_equal(unpack(pack(t, "2bit"), 2999, "2bit"), t[:2999])  # padding is ignored, not read as weights
    with pytest.raises(TernaryError, match="values in"):
        pack(np.array([2, 0]), "2bit")
    with pytest.raises(TernaryError, match="unknown packing 'base4'"):
        pack(t, "base4")


# --------------------------------------------------------------------------- the file and the runtime


@pytest.mark.parametrize("packing", ["2bit", "base3"])
def test_numpy_runtime_reproduces_the_torch_student(tmp_path, packing):
    teacher, student = tiny_student()
    path = export_student(tmp_path / "s.safetensors", student, kind="ebdm", config=dataclasses.asdict(teacher.config),
                          packing=packing, lineage={"teacher": {"checkpoint_id": "t1"}}, metrics={})  # fmt: skip
    meta = load_packed(path).metadata
    assert meta["format"] == "scf-ternary/1" and meta["packing"] == packing and meta["model"] == "ebdm"
    layers = json.loads(meta["layers"])
    assert layers["blocks.0.fc1"]["shape"] == [32, 32] and layers["blocks.0.fc1"]["scale"] > 0

    reloaded, _ = load_student(path)  # torch, from the packed file: the same function
    gen = torch.Generator().manual_seed(3)
    z, cz = torch.randn(16, 3, generator=gen), torch.randn(16, 2, generator=gen)
    net = TernaryNet.load(path)
    for sigma in (0.01, 0.3, 3.0):
        s_t, e_t = student.score(z, cz, sigma)
        s_r, e_r = reloaded.score(z, cz, sigma)
        assert torch.equal(e_t, e_r) and torch.equal(s_t, s_r)
        e_np, grad = net.energy_z(z.numpy(), cz.numpy(), sigma, grad=True)
        scale = float(e_t.detach().abs().max())
        assert np.allclose(e_np, e_t.detach().numpy(), rtol=1e-4, atol=1e-4 * scale)
        assert np.allclose(-grad, s_t.numpy(), rtol=1e-3, atol=1e-3 * float(s_t.abs().max()))
    x = student.denormalise(z)
    c = cz * student.context_half + student.context_mid
    assert np.allclose(net.energy(x.numpy(), c.numpy()), student.score(z, cz, TINY.sigma_min)[1].detach().numpy(), rtol=1e-4, atol=1e-2)
    assert probe(path) is None and health_check(path) is None


def test_the_file_is_small_and_the_probe_refuses_a_damaged_one(tmp_path):
    teacher, student = tiny_student()
    cfg = dataclasses.asdict(teacher.config)
    path = export_student(tmp_path / "s.safetensors", student, kind="ebdm", config=cfg, packing="2bit", lineage={}, metrics={})
    model = load_packed(path)
    ternary, floats = model.weight_count()
    assert ternary == sum(m.weight.numel() for m in bit_layers(student).values())
    assert all(k.endswith(".packed") is False for k in model.tensors)
    # flip one packed byte to 0xFF: code 3 is no ternary weight
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    start = header["blocks.0.fc1.weight.packed"]["data_offsets"][0]
    data[8 + n + start] = 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    why = health_check(bad)
    assert why is not None and why.startswith("the ternary student does not load or run: TernaryError: a 2-bit code 3 is not a ternary weight")


def test_optimiser_student_runs_on_numpy(tmp_path):
    from scf.ml.optimize import LearnedOptimiser, OptimiserConfig

    torch.manual_seed(4)
    teacher = LearnedOptimiser(OptimiserConfig(domain="hvac:office3", hidden=32, depth=3)).eval()
    student = make_student(teacher, "optimiser")
    assert sorted(bit_layers(student.policy.net)) == ["2", "4"]  # the inner layers; input and output stay full precision
    freeze(student)
    path = export_student(tmp_path / "o.safetensors", student, kind="optimiser", config=teacher.config.to_dict(), packing="base3", lineage={}, metrics={})
    reloaded, meta = load_student(path)
    c = torch.as_tensor(np.random.default_rng(0).uniform(teacher.context_mid - teacher.context_half, teacher.context_mid + teacher.context_half, (8, len(teacher.context_mid))), dtype=torch.float32)
    want = student._raw(c)[0].detach()
    assert torch.equal(reloaded._raw(c)[0].detach(), want)
    got = TernaryNet.load(path).propose(c.numpy())
    assert np.allclose(got, want.numpy(), rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert probe(path) is None


EDGE_WITHOUT_TORCH = r"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed on this edge box")
sys.meta_path.insert(0, NoTorch())
import numpy as np
from scf.consumers.edge import EdgeAgent
from scf.consumers.edge.probe import health_check
from scf.consumers.edge.ternary import TernaryNet
path = sys.argv[1]
assert health_check(path) is None, health_check(path)
net = TernaryNet.load(path)
e = net.energy(np.zeros((1, 3), np.float32), np.zeros((1, 2), np.float32))
assert np.isfinite(e).all()
assert not any(m == "torch" or m.startswith("torch.") or m.startswith("scf.ml") for m in sys.modules), sorted(sys.modules)
print("energy", float(e[0]))
"""


def test_the_edge_loads_and_runs_the_packed_student_without_torch(tmp_path):
    teacher, student = tiny_student()
    path = export_student(tmp_path / "s.safetensors", student, kind="ebdm", config=dataclasses.asdict(teacher.config), packing="base3", lineage={}, metrics={})
    out = subprocess.run([sys.executable, "-c", EDGE_WITHOUT_TORCH, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    want = float(student.score(torch.zeros(1, 3) - student.state_mid / student.state_half,
                               (torch.zeros(1, 2) - student.context_mid) / student.context_half, TINY.sigma_min)[1])  # fmt: skip
    assert float(out.stdout.split()[-1]) == pytest.approx(want, rel=1e-4, abs=1e-3)


def test_a_file_that_is_not_a_student_is_named(tmp_path):
    from safetensors.numpy import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"w": np.ones((2, 2), np.float32)}, str(p), metadata={"format": "scf-ebdm/1"})
    with pytest.raises(TernaryError, match="has format 'scf-ebdm/1', not 'scf-ternary/1'"):
        load_packed(p)
    assert health_check(p) is None  # the ordinary probe still serves plain models
    assert Path(p).exists()
