"""The code student on the edge, numpy only: a reader and a runtime for `scf-ternary-lm/1`
files (written by `scf.ml.code_student.save_student`; docs/distill.md "The code student").

The network is a Llama decoder: token embedding (tied with the LM head), per block an
RMSNorm, grouped-query attention with rotary positions (Llama's "rotate half" form), a
residual, an RMSNorm, a SwiGLU MLP, a residual; a final RMSNorm. Every linear layer of a
block is a BitNet b1.58 layer as `ml.ternary.RMSBitLinear` computes it: the input row
scaled to RMS 1 (no weight, eps 1e-5), quantised per row (token) to int8 codes
q = Clip(round(x · 127/max|x|), -128, 127), an exact integer product with the ternary codes
T (float32 BLAS: exact, `consumers.edge.ternary`), then the scales: y = (q @ Tᵀ) / s · γ.
Decoding (greedy, or sampled with a temperature and top-p from a seeded numpy generator)
keeps a key/value cache, so each new token costs one row through the blocks; it ends at a
stop id (`stop_ids`: the end of the turn `<|im_end|>`, the start of a next turn and the
tokenizer's end of sequence, which a tokenizer converted from a GGUF may name otherwise).

The outputs agree with the torch model to float rounding (a quantiser's rounding can flip on
a tie, so not bit for bit; tests/test_code_student.py bounds the difference). Nothing here
imports torch or `scf.ml` (.importlinter).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from scf.consumers.edge.ternary import EXACT_F32_FAN_IN, TernaryError, activation_codes, packed_header, unpack

FORMAT = "scf-ternary-lm/1"
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _rms(x: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(eps))


class TernaryLM:
    """A code student read with numpy: `forward(ids)` and `generate(ids, n, stop)` (greedy or sampled, batch 1)."""

    def __init__(self, path: str | Path) -> None:
        from scf.consumers.edge.tensors import load_tensors

        path = Path(path)
        meta, packing, table, cfg = packed_header(path, FORMAT, "a code student (save_student)")
        if "hidden_size" not in cfg:
            raise TernaryError(f"{path}: its config metadata names no network (hidden_size missing): the file is damaged")
        self.config = cfg
        self.metadata = meta
        self.hidden = int(cfg["hidden_size"])
        self.n_layers = int(cfg["num_hidden_layers"])
        self.heads = int(cfg["num_attention_heads"])
        self.kv_heads = int(cfg.get("num_key_value_heads") or self.heads)
        self.head_dim = int(cfg.get("head_dim") or self.hidden // self.heads)
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        rope = cfg.get("rope_parameters") or {}
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        self.inv_freq = (1.0 / theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)).astype(np.float32)
        raw = load_tensors(path)
        self.w: dict[str, tuple[np.ndarray, np.float32]] = {}  # layer -> (Tᵀ (in, out) float32, γ)
        for name, info in table.items():
            shape = [int(v) for v in info["shape"]]
            if shape[1] > EXACT_F32_FAN_IN:
                raise TernaryError(f"{path}: layer {name} has {shape[1]} inputs, beyond the exact float32 product ({EXACT_F32_FAN_IN})")
            key = f"{name}.weight.packed"
            if key not in raw:
                raise TernaryError(f"{path} states layer {name} but holds no {key}: the file is damaged")
            t = unpack(raw.pop(key), shape[0] * shape[1], packing).reshape(shape)
            self.w[name] = (np.ascontiguousarray(t.T, dtype=np.float32), np.float32(info["scale"]))
        need = {f"model.layers.{i}.{p}" for i in range(self.n_layers) for p in PROJECTIONS}
        if need - set(self.w):
            raise TernaryError(f"{path}: layers {sorted(need - set(self.w))[:3]} missing: the file is damaged")
        self.t = {k: np.asarray(v, dtype=np.float32) for k, v in raw.items()}
        self.embed = self.t["model.embed_tokens.weight"]  # (vocab, hidden), also the LM head
        self.max_positions = int(cfg.get("max_position_embeddings") or 2048)
        self.reset()

    def reset(self) -> None:
        """Forget the key/value cache (a new sequence)."""
        self.cache: list[tuple[np.ndarray, np.ndarray]] = [
            (np.zeros((self.kv_heads, 0, self.head_dim), np.float32), np.zeros((self.kv_heads, 0, self.head_dim), np.float32))
            for _ in range(self.n_layers)]
        self.pos = 0

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        """A ternary layer on rows x (n, in): RMS-normalised, int8 codes, exact integer product, scales."""
        t, gamma = self.w[name]
        q, s = activation_codes(_rms(x, 1e-5))
        return (q.astype(np.float32) @ t) / s * gamma

    def _norm(self, name: str, x: np.ndarray) -> np.ndarray:
        return _rms(x, self.eps) * self.t[name]

    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        ang = pos[:, None].astype(np.float32) * self.inv_freq[None, :]  # (n, hd/2)
        cos, sin = np.cos(ang), np.sin(ang)
        half = self.head_dim // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def forward(self, ids: list[int] | np.ndarray, *, last_only: bool = False) -> np.ndarray:
        """Logits (n, vocab) of the next token after each of `ids`, continuing the cached sequence
        (`last_only`: only after the last, (1, vocab): a prompt's prefill skips the head's other rows)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = len(ids)
        pos = np.arange(self.pos, self.pos + n)
        h = self.embed[ids]
        rep = self.heads // self.kv_heads
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            x = self._norm(p + "input_layernorm.weight", h)
            q = self._rope(self.linear(p + "self_attn.q_proj", x).reshape(n, self.heads, self.head_dim).transpose(1, 0, 2), pos)
            k = self._rope(self.linear(p + "self_attn.k_proj", x).reshape(n, self.kv_heads, self.head_dim).transpose(1, 0, 2), pos)
            v = self.linear(p + "self_attn.v_proj", x).reshape(n, self.kv_heads, self.head_dim).transpose(1, 0, 2)
            ck, cv = self.cache[i]
            ck, cv = np.concatenate([ck, k], axis=1), np.concatenate([cv, v], axis=1)
            self.cache[i] = (ck, cv)
            total = ck.shape[1]
            qg = q.reshape(self.kv_heads, rep, n, self.head_dim)  # head h reads key/value head h // rep
            scores = np.einsum("grnd,gmd->grnm", qg, ck) / np.float32(math.sqrt(self.head_dim))
            future = np.arange(total)[None, :] > (pos[:, None])  # causal: token at pos sees keys ≤ pos
            scores = np.where(future[None, None], np.float32(-np.inf), scores)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            att = np.einsum("grnm,gmd->grnd", scores / scores.sum(-1, keepdims=True), cv)
            h = h + self.linear(p + "self_attn.o_proj", att.reshape(self.heads, n, self.head_dim).transpose(1, 0, 2).reshape(n, -1))
            x = self._norm(p + "post_attention_layernorm.weight", h)
            g = self.linear(p + "mlp.gate_proj", x)
            h = h + self.linear(p + "mlp.down_proj", g / (1.0 + np.exp(-g)) * self.linear(p + "mlp.up_proj", x))
        self.pos += n
        if last_only:
            h = h[-1:]
        return self._norm("model.norm.weight", h) @ self.embed.T

    def generate(self, ids: list[int], new_tokens: int, stop: tuple[int, ...] | list[int] = (), *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None) -> list[int]:
        """The continuation of `ids` (a fresh sequence): up to `new_tokens` ids, the last a stop id
        when one came. Greedy at temperature 0; else each token drawn by `sample` from a numpy
        generator seeded with `seed` (same ids, seed and settings: the same continuation)."""
        self.reset()
        rng = np.random.default_rng(None if seed is None else seed % (1 << 64)) if temperature > 0 else None  # any int seeds
        stops = set(int(s) for s in stop)
        logits = self.forward(ids, last_only=True)[-1]
        out: list[int] = []
        for _ in range(new_tokens):
            nxt = int(np.argmax(logits)) if rng is None else sample(logits, temperature, top_p, rng)
            out.append(nxt)
            if nxt in stops:
                break
            logits = self.forward([nxt])[-1]
        return out


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """One token id from `logits` (vocab,): softmax at `temperature`, then nucleus (top-p)
    sampling — the smallest set of the likeliest tokens whose probability reaches `top_p`
    (the most likely token always), renormalised (Holtzman et al. 2019, as transformers'
    `TopPLogitsWarper` keeps it)."""
    z = logits.astype(np.float64) / max(float(temperature), 1e-5)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        for k in (64, 2048, len(p)):  # the nucleus is usually a few tokens: sort the k likeliest, more only when they hold too little
            k = min(k, len(p))
            order = np.argpartition(-p, k - 1)[:k] if k < len(p) else np.arange(len(p))
            order = order[np.argsort(-p[order])]
            ranked = p[order]
            if k == len(p) or ranked.sum() >= top_p:
                break
        before = np.cumsum(ranked) - ranked  # the mass of the likelier tokens
        keep = order[before < top_p]  # never empty: the first has nothing before it
        q = p[keep] / p[keep].sum()
        return int(keep[rng.choice(len(keep), p=q)])
    return int(rng.choice(len(p), p=p))


def stop_ids(vocab: dict[str, int], eos: str | int | None = None) -> list[int]:
    """Token ids that end an answer (as `ml.genn.LocalGenerator.stop_ids`): the tokenizer's end of
    sequence (`eos`, a token or its id) and, for ChatML vocabularies, the end of the turn
    `<|im_end|>` (a tokenizer converted from SmolLM2's GGUF names `<|endoftext|>` its end of
    sequence; a model trained on turns that end with `<|im_end|>` never writes what would
    follow it) and the start of a next turn `<|im_start|>`."""
    ids: list[int] = []
    first = vocab.get(eos) if isinstance(eos, str) else eos
    if isinstance(first, int):
        ids.append(first)
    for name in ("<|im_end|>", "<|im_start|>"):
        turn = vocab.get(name)
        if isinstance(turn, int) and turn not in ids:
            ids.append(turn)
    return ids


__all__ = ["FORMAT", "TernaryLM", "sample", "stop_ids"]
