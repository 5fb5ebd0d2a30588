"""Ternary students on the edge, numpy only: the packed weight codec and the runtime.

A student file (format `scf-ternary/1`, written by `scf.ml.distill.export_student`) is a
safetensors file whose ternary layers are stored packed, `<layer>.weight.packed` (uint8,
1-D), everything else (input/output projections, norms, biases, buffers) as float32. Its
metadata states the format and, per packed layer, its shape and scale:

    format           "scf-ternary/1"
    packing          "2bit" (4 weights a byte) | "base3" (5 weights a byte, 1.6 bits/weight)
    model            "ebdm" | "optimiser": which network the file holds
    layers           JSON {name: {"shape": [out, in], "scale": s}}: W = s · T, T ∈ {-1, 0, 1}
    activation_bits  "8": inputs of packed layers are quantised per row (token) to 8 bits
    config, lineage, metrics   JSON, as in every SCF model file (lineage names the teacher)

Codes: 2-bit packs t + 1 ∈ {0, 1, 2} little-end first (byte = c0 | c1<<2 | c2<<4 | c3<<6;
code 3 is invalid); base-3 packs Σ cᵢ·3ⁱ over five codes (values above 242 are invalid).
Padding is code 1 (a zero weight). Unpacking refuses invalid codes and wrong lengths.

The runtime computes every packed layer as BitNet b1.58 does, in integers: the input
rows are quantised per row (token) to int8 codes q = Clip(round(x · 127/max|x|), -128, 127),
the product with the ternary codes T is an exact integer sum, and the scales come after,
y = (q @ Tᵀ) · (max|x|/127) · s + b. Two kernels hold T differently (`TernaryNet(kernel=)`):

* `f32` (default): T as float32 for BLAS. Every partial sum of int8 × ternary products is an
  integer of magnitude ≤ 128 · in_features < 2²⁴ (in_features ≤ 131072, checked), which
  float32 holds exactly, so BLAS's float32 product IS the integer product, bit for bit, in
  any summation order — with BLAS's speed. 4 bytes a weight in memory.
* `int8`: T as int8 (1 byte a weight in memory, 4x less), the product by numpy's integer
  matmul with int32 accumulation; the same integers, so the same outputs bit for bit as
  `f32`, but numpy has no integer BLAS: slower (benchmarks/bench_distill.py measures both).

Nothing here imports torch or `scf.ml` (.importlinter).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "scf-ternary/1"
PACKINGS = {"2bit": 2.0, "base3": 1.6}  # bits per weight
ACT_LEVELS = 127  # 8-bit activations: x ↦ round(x · 127 / max|x|) ∈ [-127, 127]
KERNELS = ("f32", "int8")  # how a packed layer's ternary codes are held and multiplied (module docstring)
EXACT_F32_FAN_IN = 2**24 // 128  # the f32 kernel's products are exact integers up to this many inputs
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)
_BASE3_TABLE = np.array([[(v // 3**i) % 3 for i in range(5)] for v in range(243)], dtype=np.int8)  # (243, 5) codes


class TernaryError(ValueError):
    """A packed file or array that does not decode; the message names the fix."""


# --------------------------------------------------------------------------- the codec


def pack(ternary: np.ndarray, packing: str) -> np.ndarray:
    """Pack values in {-1, 0, 1} (any shape, read flat in C order) into uint8 (1-D)."""
    t = np.asarray(ternary).reshape(-1)
    if t.size and (t.min() < -1 or t.max() > 1 or not np.array_equal(t, np.round(t))):
        raise TernaryError("pack takes values in {-1, 0, 1} only: quantise the weights first (ml.ternary.weight_quant)")
    codes = (t.astype(np.int8) + 1).astype(np.uint8)
    if packing == "2bit":
        codes = np.concatenate([codes, np.ones((-len(codes)) % 4, np.uint8)]).reshape(-1, 4)
        return (codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)).astype(np.uint8)
    if packing == "base3":
        codes = np.concatenate([codes, np.ones((-len(codes)) % 5, np.uint8)]).reshape(-1, 5)
        return (codes * _POW3).sum(axis=1, dtype=np.uint16).astype(np.uint8)
    raise TernaryError(f"unknown packing {packing!r}: use one of {sorted(PACKINGS)}")


def packed_size(n: int, packing: str) -> int:
    """Bytes that `n` packed weights take."""
    per = {"2bit": 4, "base3": 5}.get(packing)
    if per is None:
        raise TernaryError(f"unknown packing {packing!r}: use one of {sorted(PACKINGS)}")
    return -(-n // per)


def unpack(packed: np.ndarray, n: int, packing: str) -> np.ndarray:
    """The first `n` ternary values (int8, 1-D) of `packed`; refuses bad lengths and codes."""
    b = np.asarray(packed)
    if b.dtype != np.uint8 or b.ndim != 1:
        raise TernaryError(f"packed weights must be a 1-D uint8 array (got {b.dtype} with shape {list(b.shape)}): the file is damaged")
    if len(b) != packed_size(n, packing):
        raise TernaryError(f"{len(b)} packed bytes do not hold {n} weights as {packing} (needs {packed_size(n, packing)}): the file is damaged")
    if packing == "2bit":
        codes = (b[:, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3
        if (codes == 3).any():
            raise TernaryError("a 2-bit code 3 is not a ternary weight: the file is damaged")
    else:
        if (b > 242).any():
            raise TernaryError("a base-3 byte above 242 holds no five ternary weights: the file is damaged")
        codes = _BASE3_TABLE[b]
    return (codes.reshape(-1)[:n].astype(np.int8) - 1).astype(np.int8)


# --------------------------------------------------------------------------- reading a file


@dataclass
class PackedModel:
    """A student file, read: float tensors, unpacked ternary layers, the metadata."""

    path: Path
    packing: str
    kind: str  # "ebdm" | "optimiser"
    config: dict
    metadata: dict[str, str]
    tensors: dict[str, np.ndarray]  # the float32 tensors, by name
    ternary: dict[str, tuple[np.ndarray, float]]  # layer name -> (T (out, in) int8 in {-1,0,1}, scale)

    def weight_count(self) -> tuple[int, int]:
        """(ternary weights, all parameters and buffers stored as floats)."""
        t = sum(m.size for m, _ in self.ternary.values())
        return t, sum(v.size for v in self.tensors.values())


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header's metadata (strings); reads no tensor."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {})


def is_packed(path: str | Path) -> bool:
    """Whether `path` is a ternary student file (by its stated format)."""
    try:
        return read_metadata(path).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - unreadable is "not a student"; the probe reports why
        return False


def packed_header(path: Path, fmt: str, give: str) -> tuple[dict, str, dict, dict]:
    """(metadata, packing, layer table, config) of a packed ternary file of format `fmt`; one
    clear error (naming `give`, what to give instead) when the header is not one."""
    meta = read_metadata(path)
    if meta.get("format") != fmt:
        raise TernaryError(f"{path} has format {meta.get('format')!r}, not {fmt!r}: give {give}")
    packing = meta.get("packing", "")
    if packing not in PACKINGS:
        raise TernaryError(f"{path} states packing {packing!r}: only {sorted(PACKINGS)} are known")
    try:
        return meta, packing, json.loads(meta["layers"]), json.loads(meta.get("config", "{}"))
    except (KeyError, ValueError) as exc:
        raise TernaryError(f"{path}: its layers/config metadata do not decode ({exc}): the file is damaged") from None


def load_packed(path: str | Path) -> PackedModel:
    """Read and unpack a student file with numpy; one clear error when it does not decode."""
    from scf.consumers.edge.tensors import load_tensors

    path = Path(path)
    meta, packing, layers, config = packed_header(path, FORMAT, "a student written by `scf distill`")
    raw = load_tensors(path)
    ternary = {}
    for name, info in layers.items():
        shape = [int(v) for v in info["shape"]]
        scale = float(info["scale"])
        key = f"{name}.weight.packed"
        if key not in raw:
            raise TernaryError(f"{path} states layer {name} but holds no {key}: the file is damaged")
        if not (math.isfinite(scale) and scale > 0):
            raise TernaryError(f"{path}: layer {name} has scale {scale}: the file is damaged")
        t = unpack(raw.pop(key), int(np.prod(shape)), packing)
        ternary[name] = (t.reshape(shape), scale)
    leftover = [k for k in raw if k.endswith(".packed")]
    if leftover:
        raise TernaryError(f"{path} holds packed tensors its metadata does not state ({leftover[:3]}): the file is damaged")
    tensors = {k: np.asarray(v, dtype=np.float32) for k, v in raw.items()}
    return PackedModel(path, packing, meta.get("model", ""), config, meta, tensors, ternary)


# --------------------------------------------------------------------------- the layers


def activation_codes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row absmax 8-bit quantisation of float32 rows: (codes int8, s (rows, 1) float32),
    x ≈ codes / s. The same float32 operations as `ml.ternary.activation_codes`, so the
    same codes."""
    x = np.asarray(x, dtype=np.float32)
    s = np.float32(ACT_LEVELS) / np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(1e-5))
    return np.clip(np.round(x * s), -ACT_LEVELS - 1, ACT_LEVELS).astype(np.int8), s


def quantise_activations(x: np.ndarray) -> np.ndarray:
    """Per-row absmax 8-bit quantisation, dequantised (the student's activation quantiser)."""
    q, s = activation_codes(x)
    return q.astype(np.float32) / s


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    inv = 1.0 / np.sqrt((xc * xc).mean(-1, keepdims=True) + eps)
    return xc * inv * w + b, (xc * inv, inv)


def _layer_norm_back(dy, w, cache):
    xhat, inv = cache
    g = dy * w
    return inv * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))


class TernaryNet:
    """The numpy runtime of a student file: `energy`/`score` (EBDM), `propose` (optimiser).
    `kernel`: `f32` (ternary codes as float32, BLAS) or `int8` (as int8, int32
    accumulation); both compute the same integers (module docstring)."""

    def __init__(self, model: PackedModel, kernel: str = "f32") -> None:
        if kernel not in KERNELS:
            raise TernaryError(f"unknown kernel {kernel!r}: use one of {list(KERNELS)}")
        self.m = model
        self.t = model.tensors
        self.config = model.config
        self.kernel = kernel
        self._codes: dict[str, np.ndarray] = {}  # name -> Tᵀ (in, out), float32 (f32) or int8 (int8)
        for name, (t, _) in model.ternary.items():
            if kernel == "f32" and t.shape[1] > EXACT_F32_FAN_IN:
                raise TernaryError(f"layer {name} has {t.shape[1]} inputs: the f32 kernel is exact up to {EXACT_F32_FAN_IN}; use kernel='int8'")
            self._codes[name] = np.ascontiguousarray(t.T, dtype=np.float32 if kernel == "f32" else np.int8)

    @classmethod
    def load(cls, path: str | Path, kernel: str = "f32") -> TernaryNet:
        return cls(load_packed(path), kernel)

    def weight_bytes(self) -> int:
        """Bytes of the weights this runtime holds (ternary codes as its kernel keeps them,
        float tensors); what a node's memory pays for the model, arrays only."""
        return sum(w.nbytes for w in self._codes.values()) + sum(v.nbytes for v in self.t.values())

    def accumulate(self, name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(q @ Tᵀ as exact integers (int32), s): a packed layer's integer product with the
        int8 codes q of x (per row) and the rows' activation scales s (x ≈ q / s)."""
        q, s = activation_codes(x)
        w = self._codes[name]
        if self.kernel == "f32":
            return (q.astype(np.float32) @ w).astype(np.int32), s
        return np.matmul(q, w, dtype=np.int32), s

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        """A layer by name: ternary where packed (int8 activations, integer product, then the
        scales: y = (q @ Tᵀ) / s · γ + b), else float."""
        bias = self.t.get(f"{name}.bias")
        if name in self._codes:
            acc, s = self.accumulate(name, x)
            y = acc.astype(np.float32) / s * np.float32(self.m.ternary[name][1])
        else:
            y = x @ self.t[f"{name}.weight"].T
        return y + bias if bias is not None else y

    def _linear_back(self, name: str, dy: np.ndarray) -> np.ndarray:
        """dL/dx of `linear` (the quantisers pass gradients straight through, as in training;
        the gradient dy is a float, so this is a float product with T)."""
        if name in self._codes:
            w = self._codes[name]
            if self.kernel == "int8":
                w = w.astype(np.float32)  # transient: the int8 kernel trades the score's speed for memory
            return (dy @ w.T) * np.float32(self.m.ternary[name][1])
        return dy @ self.t[f"{name}.weight"]

    # ---------------------------------------------------------------- EBDM

    def _need(self, kind: str) -> None:
        if self.m.kind != kind:
            raise TernaryError(f"{self.m.path} holds a {self.m.kind or 'unknown'} student, not an {kind}")

    def normalise(self, x, c):
        t = self.t
        z = (np.asarray(x, np.float32) - t["state_mid"]) / t["state_half"]
        cz = (np.asarray(c, np.float32).reshape(len(z), -1) - t["context_mid"]) / t["context_half"]
        return z, cz

    def _condition(self, cz, sigma):
        cfg = self.config
        proj = 2 * np.pi * cz @ self.t["fourier"]
        u = (np.log(sigma) - math.log(cfg["sigma_min"])) / (math.log(cfg["sigma_max"]) - math.log(cfg["sigma_min"]))
        k = np.arange(1, cfg["sigma_features"] + 1, dtype=np.float32)
        return np.concatenate([cz, np.sin(proj), np.cos(proj), np.sin(np.pi * k * u), np.cos(np.pi * k * u), u], axis=-1).astype(np.float32)

    def energy_z(self, z: np.ndarray, cz: np.ndarray, sigma: float, grad: bool = False):
        """E(z, c, σ) (B,) in normalised space; with `grad`, (E, ∂E/∂z (B, d))."""
        self._need("ebdm")
        z = np.asarray(z, np.float32)
        sig = np.full((len(z), 1), sigma, np.float32)
        cond = self._condition(np.asarray(cz, np.float32), sig)
        h = self.linear("inp", np.concatenate([z, cond], axis=-1))
        caches = []
        for i in range(int(self.config["depth"])):
            p = f"blocks.{i}"
            n, ln = _layer_norm(h, self.t[f"{p}.norm.weight"], self.t[f"{p}.norm.bias"])
            a = self.linear(f"{p}.fc1", n) + self.linear(f"{p}.cond", cond)
            h = h + self.linear(f"{p}.fc2", _silu(a))
            caches.append((ln, a))
        n, ln = _layer_norm(h, self.t["head.0.weight"], self.t["head.0.bias"])
        g = self.linear("head.1", n)[:, 0]
        e = (z * z).sum(-1) / (2 * (1 + sigma**2)) + g / sigma
        if not grad:
            return e
        dh = _layer_norm_back(np.broadcast_to(self.t["head.1.weight"], (len(z), h.shape[1])) / sigma, self.t["head.0.weight"], ln)
        for i in reversed(range(int(self.config["depth"]))):
            p = f"blocks.{i}"
            ln_i, a = caches[i]
            sg = 1.0 / (1.0 + np.exp(-a))
            da = self._linear_back(f"{p}.fc2", dh) * (sg * (1 + a * (1 - sg)))
            dh = dh + _layer_norm_back(self._linear_back(f"{p}.fc1", da), self.t[f"{p}.norm.weight"], ln_i)
        dz = self._linear_back("inp", dh)[:, : z.shape[1]] + z / (1 + sigma**2)
        return e, dz

    def energy(self, x: np.ndarray, c: np.ndarray, sigma: float | None = None) -> np.ndarray:
        """E(x, c, σ) (B,) of physical states x (B, d) in contexts c (B, m); σ defaults to σ_min."""
        z, cz = self.normalise(x, c)
        return self.energy_z(z, cz, self.config["sigma_min"] if sigma is None else sigma)

    def score_z(self, z, cz, sigma: float) -> np.ndarray:
        """-∂E/∂z (B, d): the student's score, gradients through the quantisers straight."""
        return -self.energy_z(z, cz, sigma, grad=True)[1]

    def rank(self, candidates: np.ndarray, c: np.ndarray) -> np.ndarray:
        """Candidate states (K, d) of one context c (m,), cheapest energy first (indices)."""
        cand = np.atleast_2d(np.asarray(candidates, np.float32))
        return np.argsort(self.energy(cand, np.broadcast_to(np.asarray(c, np.float32), (len(cand), len(np.atleast_1d(c))))), kind="stable")

    # ---------------------------------------------------------------- optimiser

    def propose(self, c: np.ndarray) -> np.ndarray:
        """The policy's states (B, d) for contexts c (B, m), clipped to the state bounds: the
        raw proposal, before the balance layer and the domain's repair (`scf.domains.repair`)."""
        self._need("optimiser")
        t = self.t
        cz = (np.atleast_2d(np.asarray(c, np.float32)) - t["context_mid"]) / t["context_half"]
        found = {k.removesuffix(".weight") for k in t if k.startswith("policy.net.") and k.endswith(".weight")}
        names = sorted(found | {n for n in self.m.ternary if n.startswith("policy.net.")}, key=lambda s: int(s.split(".")[2]))
        h = cz
        for i, name in enumerate(names):
            h = self.linear(name, h)
            if i < len(names) - 1:
                h = _silu(h)
        return np.minimum(np.maximum(t["state_mid"] + t["state_half"] * h, t["state_lo"]), t["state_hi"])


def probe(path: str | Path) -> str | None:
    """The health probe of a student file: None when it unpacks and answers a fixed input
    with finite values; otherwise why not (one line)."""
    try:
        net = TernaryNet.load(path)
        for name, v in net.t.items():
            if not np.isfinite(v).all():
                return f"tensor {name} {list(v.shape)} holds non-finite values (NaN or inf)"
        if net.m.kind == "ebdm":
            d, m = len(net.t["state_mid"]), len(net.t["context_mid"])
            z = np.linspace(-1, 1, 2 * d, dtype=np.float32).reshape(2, d)
            cz = np.linspace(-0.5, 0.5, 2 * m, dtype=np.float32).reshape(2, m)
            e, dz = net.energy_z(z, cz, float(net.config["sigma_min"]) * 10, grad=True)
            out = np.concatenate([e, dz.reshape(-1)])
        elif net.m.kind == "optimiser":
            out = net.propose(net.t["context_mid"][None] + 0.5 * net.t["context_half"][None]).reshape(-1)
        else:
            return f"the student states model {net.m.kind!r}: this agent runs 'ebdm' and 'optimiser' students"
    except Exception as exc:  # noqa: BLE001 - any failure to decode or run is the answer
        return f"the ternary student does not load or run: {type(exc).__name__}: {exc}"
    if not np.isfinite(out).all():
        return "the ternary student answers the probe with non-finite values"
    return None


__all__ = [
    "FORMAT", "KERNELS", "PACKINGS", "PackedModel", "TernaryError", "TernaryNet", "activation_codes", "is_packed", "load_packed",
    "pack", "packed_size", "probe", "quantise_activations", "read_metadata", "unpack",
]
