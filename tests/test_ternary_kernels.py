"""The edge runtime computes with the ternary structure: int8 activation codes, an exact
integer product with the ternary codes, the scales after. Both kernels (`f32`: codes in
float32 BLAS; `int8`: int8 weights, int32 accumulation) give the same integers as an int64
reference and as the torch student's own quantiser (ml/ternary.py), bit for bit, and the
same outputs as each other; the outputs match the torch BitLinear within float32 rounding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from scf.consumers.edge.ternary import EXACT_F32_FAN_IN, KERNELS, PackedModel, TernaryError, TernaryNet, activation_codes
from scf.ml.distill import export_student
from scf.ml.ternary import BitLinear, precision_counts, ternary_share
from scf.ml.ternary import activation_codes as torch_codes
from tests.test_ternary import TINY, tiny_student


def rows(n: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-3, 3, size=(n, 1))  # rows of very different sizes: one scale each
    x = (rng.standard_normal((n, width)) * scale).astype(np.float32)
    x[0] = 0.0  # an all-zero row: the clamp of max|x|
    x[1, :] = np.float32(0.5) / np.float32(127) * np.arange(width, dtype=np.float32)  # ties at .5: round half to even
    return x


def one_layer(t: np.ndarray, scale: float, bias: np.ndarray | None = None) -> PackedModel:
    tensors = {} if bias is None else {"l.bias": bias}
    return PackedModel(Path("mem"), "2bit", "", {}, {}, tensors, {"l": (t.astype(np.int8), scale)})


def test_activation_codes_are_the_torch_students_codes():
    x = rows(64, 300)
    q, s = activation_codes(x)
    tq, ts = torch_codes(torch.from_numpy(x))
    assert q.dtype == np.int8 and int(np.abs(q.astype(int)).max()) <= 127
    assert np.array_equal(q.astype(np.float32), tq.numpy())  # the same codes, bit for bit
    assert np.array_equal(s, ts.numpy())
    assert (q[0] == 0).all()


@pytest.mark.parametrize("fan_in", [7, 256, 1000])
def test_integer_product_is_exact_and_the_kernels_agree(fan_in):
    rng = np.random.default_rng(fan_in)
    t = rng.integers(-1, 2, size=(33, fan_in))
    x = rows(40, fan_in, seed=fan_in)
    want = activation_codes(x)[0].astype(np.int64) @ t.T.astype(np.int64)  # the int64 reference
    bias = rng.standard_normal(33).astype(np.float32)
    nets = {k: TernaryNet(one_layer(t, 0.37, bias), kernel=k) for k in KERNELS}
    for k, net in nets.items():
        acc, _ = net.accumulate("l", x)
        assert acc.dtype == np.int32 and np.array_equal(acc, want), k
    assert np.array_equal(nets["f32"].linear("l", x), nets["int8"].linear("l", x))  # same integers, same scaling: same bits
    assert nets["int8"].weight_bytes() * 4 == nets["f32"].weight_bytes() + 3 * 33 * 4  # int8 codes: a quarter (the bias is float)


def test_largest_fan_in_the_f32_kernel_takes_stays_exact():
    rng = np.random.default_rng(1)
    t = np.ones((2, EXACT_F32_FAN_IN), dtype=np.int8)
    t[1, ::3] = -1
    x = np.full((2, EXACT_F32_FAN_IN), -3.0, dtype=np.float32)  # every code -127: |sum| = 127 · 2^17, near 2^24
    x[1] = rng.standard_normal(EXACT_F32_FAN_IN).astype(np.float32)
    want = activation_codes(x)[0].astype(np.int64) @ t.T.astype(np.int64)
    assert abs(int(want[0, 0])) == 127 * EXACT_F32_FAN_IN
    for k in KERNELS:
        assert np.array_equal(TernaryNet(one_layer(t, 1.0), kernel=k).accumulate("l", x)[0], want), k
    wide = np.zeros((1, EXACT_F32_FAN_IN + 1), dtype=np.int8)
    with pytest.raises(TernaryError, match="the f32 kernel is exact up to 131072; use kernel='int8'"):
        TernaryNet(one_layer(wide, 1.0), kernel="f32")
    assert TernaryNet(one_layer(wide, 1.0), kernel="int8").weight_bytes() == EXACT_F32_FAN_IN + 1
    with pytest.raises(TernaryError, match=r"unknown kernel 'int4': use one of \['f32', 'int8'\]"):
        TernaryNet(one_layer(wide, 1.0), kernel="int4")


def test_a_packed_layer_matches_the_torch_bitlinear():
    torch.manual_seed(0)
    layer = BitLinear(200, 48)
    layer.freeze()
    t, gamma = layer.quantised_weight()
    x = rows(32, 200, seed=3)
    want = layer(torch.from_numpy(x)).detach().numpy()
    tq, ts = torch_codes(torch.from_numpy(x))
    exact = (tq.double() @ t.double().T).numpy()  # torch's quantised forward, in integers
    for k in KERNELS:
        net = TernaryNet(one_layer(t.numpy(), float(gamma), layer.bias.detach().numpy()), kernel=k)
        assert np.array_equal(net.accumulate("l", x)[0], exact.astype(np.int32)), k
        assert np.allclose(net.linear("l", x), want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max())), k


def test_the_ebdm_student_runs_alike_in_both_kernels(tmp_path):
    teacher, student = tiny_student()
    path = export_student(tmp_path / "s.safetensors", student, kind="ebdm", config=TINY.__dict__ | {"domain": None}, packing="base3",
                          lineage={}, metrics={})  # fmt: skip
    nets = {k: TernaryNet.load(path, kernel=k) for k in KERNELS}
    rng = np.random.default_rng(0)
    z = rng.uniform(-1, 1, (16, TINY.state_dim)).astype(np.float32)
    cz = rng.uniform(-1, 1, (16, TINY.context_dim)).astype(np.float32)
    e = {k: net.energy_z(z, cz, 0.3, grad=True) for k, net in nets.items()}
    assert np.array_equal(e["f32"][0], e["int8"][0])  # the forward pass: the same integers, the same bits
    assert np.allclose(e["f32"][1], e["int8"][1], rtol=1e-5, atol=1e-6)  # the score's backward pass is a float product
    s, energy = student.score(torch.from_numpy(z), torch.from_numpy(cz), 0.3)
    assert np.allclose(e["int8"][0], energy.detach().numpy(), rtol=1e-4, atol=1e-4)
    assert np.allclose(-e["int8"][1], s.detach().numpy(), rtol=1e-3, atol=1e-3)
    assert nets["int8"].weight_bytes() < 0.5 * nets["f32"].weight_bytes()


def test_precision_counts_say_what_is_kept_in_full_precision():
    _, student = tiny_student()
    counts = precision_counts(student)
    total = sum(counts.values())
    assert counts["ternary"] / total == pytest.approx(ternary_share(student))
    assert counts["projections"] == student.inp.weight.numel() + student.head[1].weight.numel()  # input and output projections
    assert counts["norms"] == sum(m.weight.numel() for m in student.modules() if isinstance(m, torch.nn.LayerNorm))
    assert counts["biases"] == sum(p.numel() for n, p in student.named_parameters() if n.endswith("bias"))
    assert counts["features"] > 0  # Fourier frequencies, normalisation constants
