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

    def reset(self, rows: int = 1) -> None:
        """Forget the key/value cache (a new sequence; `rows` sequences decoded side by side)."""
        empty = np.zeros((rows, self.kv_heads, 0, self.head_dim), np.float32)
        self.cache: list[tuple[np.ndarray, np.ndarray]] = [(empty, empty) for _ in range(self.n_layers)]  # (B, kv, capacity, hd) each
        self.pos = 0

    def _room(self, n: int) -> None:
        """Capacity in the cache for n more positions: buffers grown by doubling, written in place
        (a step copies no cache; appending by concatenation copied all of it every token)."""
        cap = self.cache[0][0].shape[2]
        if self.pos + n <= cap:
            return
        new = min(max(2 * cap, self.pos + n, 64), max(self.max_positions, self.pos + n))
        grown = []
        for k, v in self.cache:
            bigger = [np.zeros(k.shape[:2] + (new, self.head_dim), np.float32) for _ in range(2)]
            bigger[0][:, :, : self.pos], bigger[1][:, :, : self.pos] = k[:, :, : self.pos], v[:, :, : self.pos]
            grown.append((bigger[0], bigger[1]))
        self.cache = grown

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        """A ternary layer on rows x (..., in): RMS-normalised, int8 codes per row, exact integer product, scales."""
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
        return self.forward_rows(np.asarray(ids, dtype=np.int64).reshape(1, -1), last_only=last_only)[0]

    def forward_rows(self, ids: np.ndarray, *, last_only: bool = False) -> np.ndarray:
        """Logits (B, n, vocab) after each of ids (B, n): B cached sequences, all at the same
        position, each continued by its row (`last_only`: (B, 1, vocab)). Each row's numbers
        are its own: a ternary layer's product is exact whatever the batch, and the rest
        (attention, norms, head) is computed per row."""
        ids = np.asarray(ids, dtype=np.int64)
        b, n = ids.shape
        if self.cache[0][0].shape[0] != b:
            raise ValueError(f"{b} rows continue a cache of {self.cache[0][0].shape[0]} sequences: reset(rows) or keep_rows first")
        pos = np.arange(self.pos, self.pos + n)
        total = self.pos + n
        self._room(n)
        h = self.embed[ids]  # (B, n, hidden)
        rep = self.heads // self.kv_heads

        def heads(y: np.ndarray, count: int) -> np.ndarray:  # (B, n, count·hd) -> (B, count, n, hd)
            return y.reshape(b, n, count, self.head_dim).transpose(0, 2, 1, 3)

        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            x = self._norm(p + "input_layernorm.weight", h)
            q = self._rope(heads(self.linear(p + "self_attn.q_proj", x), self.heads), pos)
            k = self._rope(heads(self.linear(p + "self_attn.k_proj", x), self.kv_heads), pos)
            v = heads(self.linear(p + "self_attn.v_proj", x), self.kv_heads)
            kb, vb = self.cache[i]
            kb[:, :, self.pos : total], vb[:, :, self.pos : total] = k, v
            ck, cv = kb[:, :, :total], vb[:, :, :total]
            qg = q.reshape(b, self.kv_heads, rep, n, self.head_dim)  # head h reads key/value head h // rep
            scores = (qg @ ck[:, :, None].swapaxes(-1, -2)) / np.float32(math.sqrt(self.head_dim))  # (B, kv, rep, n, total)
            if n > 1:  # causal: token at pos sees keys ≤ pos (one new token sees them all)
                scores = np.where(np.arange(total)[None, :] > pos[:, None], np.float32(-np.inf), scores)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            att = (scores / scores.sum(-1, keepdims=True)) @ cv[:, :, None]  # (B, kv, rep, n, hd)
            h = h + self.linear(p + "self_attn.o_proj", att.reshape(b, self.heads, n, self.head_dim).transpose(0, 2, 1, 3).reshape(b, n, -1))
            x = self._norm(p + "post_attention_layernorm.weight", h)
            g = self.linear(p + "mlp.gate_proj", x)
            h = h + self.linear(p + "mlp.down_proj", g / (1.0 + np.exp(-g)) * self.linear(p + "mlp.up_proj", x))
        self.pos += n
        if last_only:
            h = h[:, -1:]
        h = self._norm("model.norm.weight", h)
        return (self.embed @ h.reshape(-1, self.hidden).T).T.reshape(b, -1, self.embed.shape[0])  # the tied head: its rows read once for all

    def keep_rows(self, rows: np.ndarray | list[int]) -> None:
        """Keep only these sequences of the cache (by index), in this order: a row may repeat
        (a prompt's cache copied for several continuations)."""
        rows = np.asarray(rows, dtype=np.int64)
        self.cache = [(k[rows], v[rows]) for k, v in self.cache]

    def generate(self, ids: list[int], new_tokens: int, stop: tuple[int, ...] | list[int] = (), *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None) -> list[int]:
        """The continuation of `ids` (a fresh sequence): up to `new_tokens` ids, the last a stop id
        when one came. Greedy at temperature 0; else each token drawn by `sample` from a numpy
        generator seeded with `seed` (same ids, seed and settings: the same continuation)."""
        return self.generate_many(ids, [seed], new_tokens, stop, temperature=temperature, top_p=top_p)[0]

    def generate_many(self, ids: list[int], seeds: list[int | None], new_tokens: int, stop: tuple[int, ...] | list[int] = (), *,
                      temperature: float = 0.0, top_p: float = 1.0) -> list[list[int]]:
        """One continuation of the prompt `ids` per seed, decoded side by side: the prompt read
        once, then one batched row per unfinished continuation and step (the weights read once a
        step for all, where batch 1 reads them once a token). Each is what `generate` gives
        with its seed: its own generator, and rows that do not mix (`forward_rows`); one that
        reaches a stop id leaves the batch."""
        if not seeds:
            return []
        self.reset()
        stops = set(int(s) for s in stop)
        rngs = [np.random.default_rng(None if s is None else s % (1 << 64)) if temperature > 0 else None for s in seeds]  # any int seeds
        first = self.forward_rows(np.asarray(ids, dtype=np.int64).reshape(1, -1), last_only=True)[:, -1]  # (1, vocab)
        self.keep_rows([0] * len(seeds))
        logits = np.repeat(first, len(seeds), axis=0)
        outs: list[list[int]] = [[] for _ in seeds]
        live = list(range(len(seeds)))  # the continuations still decoding, in the cache's row order
        for _ in range(new_tokens):
            nxt = [int(np.argmax(logits[r])) if rngs[j] is None else sample(logits[r], temperature, top_p, rngs[j]) for r, j in enumerate(live)]
            going = []
            for r, (j, t) in enumerate(zip(live, nxt)):
                outs[j].append(t)
                if t not in stops:
                    going.append(r)
            if len(outs[live[0]]) >= new_tokens or not going:
                break
            if len(going) < len(live):
                self.keep_rows(going)
                live, nxt = [live[r] for r in going], [nxt[r] for r in going]
            logits = self.forward_rows(np.asarray(nxt, dtype=np.int64).reshape(-1, 1))[:, -1]
        return outs


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
