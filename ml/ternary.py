"""BitNet b1.58 layers in torch: ternary weights, 8-bit activations, straight-through.

The recipe (Ma et al. 2024, arXiv 2402.17764 "The Era of 1-bit LLMs"; Wang et al. 2023,
arXiv 2310.11453 "BitNet"; docs/distill.md gives the details and what we changed):

* weights: absmean per tensor, γ = mean|W|; W̃ = RoundClip(W / γ, -1, 1) ∈ {-1, 0, 1};
  the layer computes with γ·W̃;
* activations: per token (here: per row, one example) absmax to 8 bits,
  x̃ = Clip(round(x · 127 / max|x|), -128, 127) · max|x| / 127;
* training: full-precision latent weights; the forward pass uses the quantised values, the
  backward pass treats both quantisers as the identity (straight-through estimator,
  `x + (q(x) - x).detach()`);
* the input and output projections, embeddings (here: the Fourier and σ features) and
  norms stay in full precision; `ternarise` replaces only the inner linear layers.

`BitLinear.freeze()` fixes the scale (`wscale` buffer) and snaps the latent weights to
γ·W̃, so the module computes exactly what its packed export (`consumers.edge.ternary`)
holds; the numpy runtime reproduces it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

ACT_LEVELS = 127


def weight_quant(w: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T ∈ {-1, 0, 1} as w's dtype, γ): absmean scale (or the given one) and RoundClip."""
    gamma = w.abs().mean().clamp(min=1e-5)
    if scale is not None:  # a fixed scale where it is set (> 0): no host sync, works under autograd
        gamma = torch.where(scale > 0, scale.to(gamma), gamma)
    return (w / gamma).round().clamp(-1, 1), gamma


def activation_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax 8-bit quantisation: (codes in [-128, 127] as x's dtype, s (rows, 1)),
    x ≈ codes / s. The edge runtime (`consumers.edge.ternary.activation_codes`) computes the
    same codes from the same float32 rows."""
    m = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    s = torch.full_like(m, ACT_LEVELS) / m  # a true division (`127 / m` is 127 · (1/m) in torch: another rounding)
    return (x * s).round().clamp(-ACT_LEVELS - 1, ACT_LEVELS), s


def activation_quant(x: torch.Tensor) -> torch.Tensor:
    """Per-row absmax 8-bit quantisation, returned dequantised (same dtype as x)."""
    q, s = activation_codes(x)
    return q / s


class BitLinear(nn.Linear):
    """nn.Linear with ternary weights and 8-bit activations in the forward pass and
    straight-through gradients onto the full-precision latent weights. The bias (where the
    teacher had one) stays in full precision."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("wscale", torch.zeros((), device=device, dtype=dtype or torch.float32))  # 0: absmean, live

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BitLinear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        layer.to(linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def quantised_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, γ) of the current latent weights."""
        return weight_quant(self.weight.detach(), self.wscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, gamma = weight_quant(self.weight, self.wscale)
        w = self.weight + (t * gamma - self.weight).detach()
        xq = x + (activation_quant(x) - x).detach()
        return F.linear(xq, w, self.bias)

    @torch.no_grad()
    def freeze(self) -> None:
        """Fix γ and set the latent weights to γ·T: the layer computes its export exactly."""
        t, gamma = weight_quant(self.weight, self.wscale)  # idempotent: a frozen layer keeps its γ
        self.wscale.copy_(gamma)
        self.weight.copy_(t * gamma)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", ternary weights, 8-bit activations"


class RMSBitLinear(BitLinear):
    """BitLinear with the b1.58 training tips' parameter-free RMSNorm of its input before the
    activation quantiser (SubLN): each token's row is scaled to RMS 1, so the layer's output
    does not grow with its input's size — what a model trained from scratch (the code student,
    `ml.code_student`) uses; the EBDM students, copies of a trained teacher, do not."""

    eps = 1e-5
    frozen = False  # set by `freeze` (and by a loader that sets wscale): the weights are γ·T already

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rms_normalise(x, self.eps)
        if self.frozen and not torch.is_grad_enabled():  # inference: the frozen weight IS γ·T (bit for bit), no requantising
            return F.linear(activation_quant(x), self.weight, self.bias)
        return super().forward(x)

    @torch.no_grad()
    def freeze(self) -> None:
        super().freeze()
        self.frozen = True


def rms_normalise(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x / RMS(x) per row (last dimension), computed in float32, returned in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def ternarise(module: nn.Module, keep: tuple[str, ...], layer: type[BitLinear] = BitLinear) -> list[str]:
    """Replace every nn.Linear of `module` whose name is not in `keep` by a BitLinear (or the
    subclass `layer`, e.g. `RMSBitLinear`) with the same weights (in place); the names
    replaced, in order."""
    replaced = []
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.Linear) and not isinstance(child, BitLinear) and name not in keep:
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, layer.from_linear(child))
            replaced.append(name)
    return replaced


def bit_layers(module: nn.Module) -> dict[str, BitLinear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, BitLinear)}


def freeze(module: nn.Module) -> None:
    for m in bit_layers(module).values():
        m.freeze()


def ternary_share(module: nn.Module) -> float:
    """Share of the module's parameters and buffers (fixed numbers a file must hold) that
    are ternary weights (biases, norms and full-precision layers count against it)."""
    ternary = sum(m.weight.numel() for m in bit_layers(module).values())
    total = sum(p.numel() for p in module.parameters()) + sum(
        b.numel() for n, b in module.named_buffers() if not n.endswith("wscale")
    )
    return ternary / max(total, 1)


def precision_counts(module: nn.Module) -> dict[str, int]:
    """The numbers `ternary_share` counts, by kind: `ternary` (BitLinear weights),
    `projections` (full-precision linear weights: the input/output projections), `biases`,
    `norms` (LayerNorm weights), `features` (every other parameter or buffer: Fourier
    frequencies, normalisation constants)."""
    out = dict.fromkeys(("ternary", "projections", "biases", "norms", "features"), 0)
    kinds = {}
    for name, m in module.named_modules():
        kind = "ternary" if isinstance(m, BitLinear) else "projections" if isinstance(m, nn.Linear) else "norms" if isinstance(m, nn.LayerNorm) else None
        if kind:
            kinds[f"{name}.weight" if name else "weight"] = kind
    named = list(module.named_parameters()) + [(n, b) for n, b in module.named_buffers() if not n.endswith("wscale")]
    for name, t in named:
        kind = kinds.get(name) or ("biases" if name.endswith("bias") else "features")
        out[kind] += t.numel()
    return out


__all__ = ["ACT_LEVELS", "BitLinear", "RMSBitLinear", "rms_normalise", "activation_codes", "activation_quant", "bit_layers", "freeze", "precision_counts", "ternarise", "ternary_share", "weight_quant"]
