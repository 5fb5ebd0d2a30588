"""The code student: a BitNet b1.58 causal LM distilled from the fine-tuned code model.

A Llama-shaped decoder (RMSNorm, rotary positions, SwiGLU MLP; transformers'
`LlamaForCausalLM`, so the teacher's sampling, stop tokens and judges run it unchanged)
whose every linear layer inside the blocks is an `RMSBitLinear` (`ml.ternary`: absmean
per-tensor scale, RoundClip to {-1, 0, 1}, per-token absmax 8-bit activations after a
parameter-free RMSNorm, straight-through estimator over full-precision latent weights).
The embeddings (tied with the LM head), the block norms and the final norm stay in full
precision. The tokenizer is SmolLM2's (vocabulary 49,152), so the student reads the
teacher's prompts. Hidden and MLP widths are multiples of 256 (`StudentConfig.check`).

Trained from scratch (the embeddings may start from the teacher's, projected to the
student's width by PCA) by distillation (`distill`): token-level KL to the teacher's
logits at a temperature, plus cross-entropy on judged-approved completions of the CFR
dataset and on the teacher's own samples for the training prompts that passed the gate
and the sandbox (sequence-level KD); the teacher's failed samples get the KL term only.

The file (`save_student`, format `scf-ternary-lm/1`) is one safetensors file, no pickle:

    format            "scf-ternary-lm/1"
    packing           "2bit" | "base3" (`consumers.edge.ternary.pack`)
    layers            JSON {name: {"shape": [out, in], "scale": γ}}: W = γ · T, T ∈ {-1, 0, 1},
                      stored as `<name>.weight.packed` (uint8, 1-D)
    activation_bits   "8"; input_norm "rms" (eps 1e-5, no weight) before each quantiser
    config            JSON: the LlamaConfig (tie_word_embeddings: the LM head is the embedding)
    student           JSON: the StudentConfig
    tokenizer         JSON {file name: text}: tokenizer.json, tokenizer_config.json, chat template
    lineage, metrics  JSON: the teacher's name and weights' sha256; what was measured

Full-precision tensors (the embedding as float16 or float32, the norms as float32) are
stored under their own names. `load_student` rebuilds the model with `safe_open` and the
packed codec: the frozen model computes exactly what it saved.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn import functional as F

from scf.bus.errors import SCFError
from scf.consumers.edge.ternary import PACKINGS, TernaryError, pack, unpack
from scf.ml.ternary import RMSBitLinear, bit_layers, freeze, ternarise

FORMAT = "scf-ternary-lm/1"
KEEP = ("lm_head",)  # full precision besides the embeddings and norms (nn.Embedding/RMSNorm are no nn.Linear)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class StudentError(SCFError):
    pass


@dataclass(frozen=True)
class StudentConfig:
    hidden: int = 512
    layers: int = 8
    heads: int = 8  # head width hidden / heads (64 at the default)
    kv_heads: int = 4
    mlp: int = 1536  # SwiGLU's inner width
    max_positions: int = 2048
    width_multiple: int = 256  # BitNet's widths; tests use tiny widths with a smaller multiple

    def check(self) -> None:
        for name in ("hidden", "mlp"):
            v = getattr(self, name)
            if v <= 0 or v % self.width_multiple:
                raise StudentError(f"student {name} {v} is not a positive multiple of {self.width_multiple}: use e.g. 256, 512, 768")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise StudentError(f"hidden {self.hidden}, heads {self.heads}, kv_heads {self.kv_heads}: heads must divide hidden and kv_heads heads")


# --------------------------------------------------------------------------- the model


def build_student(cfg: StudentConfig, tok, *, seed: int = 0):
    """A randomly initialised student for tokenizer `tok` (its inner linear layers RMSBitLinear)."""
    from transformers import LlamaConfig

    cfg.check()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    lcfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden, intermediate_size=cfg.mlp, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_positions,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=pad, tie_word_embeddings=True,
        rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False,
    )
    return _ternary_llama(lcfg, seed)


def _ternary_llama(lcfg, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(lcfg)
    ternarise(model, KEEP, layer=RMSBitLinear)
    return model


def init_embeddings_from(student, teacher, *, fresh: list[int] | None = None, seed: int = 0) -> float:
    """The student's (tied) embedding from the teacher's: its top principal directions
    (the teacher's width → the student's), scaled to the teacher's RMS. The rows of `fresh`
    (token ids) start instead as independent random vectors of the same RMS: SmolLM2's
    `<|im_end|>` lies at cosine 0.99 of 35 never-trained tokens (`<file_sep>`, `<jupyter_code>`,
    ...; most decode to nothing), so a student whose tied head starts from those rows cannot
    tell stopping from them (run 3: no answer ended). Returns the share of the teacher
    embedding's variance kept."""
    src = teacher.get_input_embeddings().weight.detach().float()
    dst = student.get_input_embeddings().weight
    if src.shape[0] != dst.shape[0]:
        raise StudentError(f"teacher vocabulary {src.shape[0]} != student's {dst.shape[0]}: build the student with the teacher's tokenizer")
    centred = (src - src.mean(0, keepdim=True)).double().cpu()
    k = min(dst.shape[1], src.shape[1])
    evals, evecs = torch.linalg.eigh(centred.T @ centred)  # ascending; (width, width): cheap
    top = evecs[:, -k:].flip(1)
    proj = centred @ top  # (vocab, k)
    proj = proj * (src.double().cpu().pow(2).mean().sqrt() / proj.pow(2).mean().sqrt().clamp(min=1e-12))
    with torch.no_grad():
        dst.zero_()
        dst[:, :k] = proj.to(dst.device, dst.dtype)
        if fresh:
            rows = torch.tensor(sorted(set(fresh)), dtype=torch.long)
            g = torch.Generator().manual_seed(seed)
            rms = float(proj.pow(2).mean().sqrt())
            dst[rows.to(dst.device)] = (torch.randn(len(rows), dst.shape[1], generator=g) * rms).to(dst.device, dst.dtype)
    return float(evals[-k:].sum() / evals.sum().clamp(min=1e-12))


def fresh_rows(tok, examples: list[Example]) -> list[int]:
    """Token ids whose embedding rows should not come from the teacher's (`init_embeddings_from`):
    the special tokens (their pretrained rows are near-copies of never-trained ones) and every
    token no training example holds (nothing will pull those rows apart)."""
    used = {i for e in examples for i in e.ids}
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if getattr(t, "special", False)}
    return sorted(special | (set(range(len(tok))) - used))


def end_of_turn(tok) -> int:
    """The token that ends an answer: ChatML's `<|im_end|>` where the vocabulary has it (a
    tokenizer converted from SmolLM2's GGUF may name `<|endoftext|>` its end of sequence),
    else the end of sequence."""
    turn = tok.get_vocab().get("<|im_end|>")
    return turn if isinstance(turn, int) else tok.eos_token_id


@torch.no_grad()
def stop_probability(model, tok, rows: list[dict[str, Any]], *, device: str, max_length: int = 1536, batch_size: int = 16) -> dict[str, float]:
    """Teacher-forced at the end of each completion: the mean probability of the end-of-turn token
    (`end_of_turn`) where the completion ends, and the share of rows where it is
    the most probable token — a model that cannot stop writes on past its program."""
    ex = encode_rows(tok, rows, ce=True, source="stop", max_length=max_length)
    eos = end_of_turn(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    was = model.training
    model.eval()
    probs, top = [], 0
    for i in range(0, len(ex), batch_size):
        chunk = ex[i: i + batch_size]
        ids, mask, labels, _ = _batch(chunk, pad, device)
        h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        for j, e in enumerate(chunk):
            where = [t for t in range(1, len(e.ids)) if e.labels[t] == eos]
            if not where:
                continue
            logits = model.lm_head(h[j, where[-1] - 1]).float()
            probs.append(float(logits.softmax(-1)[eos]))
            top += int(logits.argmax()) == eos
    model.train(was)
    return {"rows": len(probs), "mean_p_eos": sum(probs) / max(len(probs), 1), "eos_is_top": top / max(len(probs), 1)}


@torch.no_grad()
def line_agreement(model, tok, rows: list[dict[str, Any]], *, device: str, max_length: int = 1536,
                   batch_size: int = 16) -> list[list[dict[str, float]]]:
    """Teacher-forced, line by line of each completion: per row, one entry per line of its
    code (1-based `line`, its `tokens`, mean `nll`, and `misses`: tokens where the model's most
    probable next token is not the one written). Sampling at a low temperature follows the most
    probable token, so a row's first line with a miss is where such an answer would leave the
    program — where the average NLL cannot say. A written token that holds a digit is never a
    miss (a contract's constants, drawn at random, are no model's to know); the end-of-turn
    token is left out."""
    ex = encode_rows(tok, rows, ce=True, source="lines", max_length=max_length)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stop = end_of_turn(tok)
    was = model.training
    model.eval()
    out: list[list[dict[str, float]]] = []
    for i in range(0, len(ex), batch_size):
        chunk = ex[i: i + batch_size]
        ids, mask, labels, _ = _batch(chunk, pad, device)
        h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # float32, as `stop_probability`
        for j, e in enumerate(chunk):
            where = [t for t in range(1, len(e.ids)) if e.labels[t] != -100 and e.labels[t] != stop]
            if not where:
                out.append([])
                continue
            logp = model.lm_head(h[j, [t - 1 for t in where]]).float().log_softmax(-1)
            target = torch.tensor([e.ids[t] for t in where], device=logp.device)
            nll = (-logp.gather(1, target[:, None])[:, 0]).tolist()
            miss = (logp.argmax(-1) != target).tolist()
            lines: list[dict[str, float]] = []
            line = 1
            for k, t in enumerate(where):
                text = tok.decode([e.ids[t]])
                miss[k] = miss[k] and not any(ch.isdigit() for ch in text)
                while len(lines) < line:
                    lines.append({"line": len(lines) + 1, "tokens": 0, "nll": 0.0, "misses": 0})
                cur = lines[line - 1]
                cur["tokens"] += 1
                cur["nll"] += nll[k]
                cur["misses"] += int(miss[k])
                line += text.count("\n")  # a token that ends a line counts on it; the next starts the next
            for cur in lines:
                cur["nll"] = cur["nll"] / cur["tokens"] if cur["tokens"] else 0.0
            out.append(lines)
    model.train(was)
    return out


def first_misses(per_row: list[list[dict[str, float]]]) -> dict[str, Any]:
    """Summary of `line_agreement`: how many rows have no miss at all, and for the others the
    line of their first miss (a histogram, the median)."""
    firsts = [next((x["line"] for x in lines if x["misses"]), None) for lines in per_row if lines]
    hit = sorted(f for f in firsts if f is not None)
    hist: dict[int, int] = {}
    for f in hit:
        hist[f] = hist.get(f, 0) + 1
    return {"rows": len(firsts), "no_miss": sum(f is None for f in firsts), "first_miss_line": dict(sorted(hist.items())),
            "median_first_miss_line": hit[len(hit) // 2] if hit else None}


def linear_counts(model) -> dict[str, int]:
    """Numbers of the model by kind: ternary (BitLinear weights), embedding, other full precision."""
    ternary = sum(m.weight.numel() for m in bit_layers(model).values())
    embed = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    return {"ternary": ternary, "embedding": embed, "other": total - ternary - embed, "total": total}


# --------------------------------------------------------------------------- data


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # -100 on the prompt
    ce: bool  # cross-entropy on its completion (approved code, or a teacher sample that passed)
    source: str


def encode_rows(tok, rows: list[dict[str, Any]], *, ce: bool, source: str, max_length: int) -> list[Example]:
    """CFR rows ({prompt, completion}) as examples, the prompt masked, cut at max_length."""
    from scf.ml.genn import _encode

    out = []
    for r in rows:
        ids, labels = _encode(tok, r["prompt"], r["completion"], max_length)
        if any(x != -100 for x in labels):
            out.append(Example(ids, labels, ce, source))
    return out


def contract_of(messages: list[dict[str, str]]) -> tuple[str, dict[str, Any] | None]:
    """The domain and the contract's params of a served prompt (`ml.genn._contract_of` where the
    code model has contracts; else the domain alone)."""
    from scf.ml import genn

    if hasattr(genn, "_contract_of"):
        return genn._contract_of(messages)
    return genn._domain_of(messages), None


def _items(texts: list[str], messages: list[dict[str, str]]) -> list[tuple]:
    """`ml.genn.judge_many`'s items for answers to one prompt: (text, domain[, params])."""
    domain, params = contract_of(messages)
    return [(x, domain) if params is None else (x, domain, params) for x in texts]


def teacher_samples(gen, prompts: list[tuple[list[dict[str, str]], str]], n: int, *, seed: int, workers: int,
                    hours: float = 2.0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`n` teacher answers to each training prompt (one batched call), each judged by the gate
    and the sandbox (`judge_samples`): rows {prompt, completion, passed}."""
    if not prompts or n <= 0:
        return [], {"prompts": len(prompts), "samples": 0, "passed": 0}
    t = time.perf_counter()
    many = gen.answers_many([m for m, _ in prompts], n, seed)
    gen_s = time.perf_counter() - t
    rows, stats = judge_samples([m for m, _ in prompts], many, workers=workers, hours=hours)
    return rows, {**stats, "generate_s": gen_s}


def judge_samples(prompts: list[list[dict[str, str]]], many: list[list[str]], *, workers: int,
                  hours: float = 2.0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Answers (`many[i]` to `prompts[i]`) judged by the gate and a sandbox run under each prompt's
    contract (`ml.genn.judge_many`): rows {prompt, completion, passed} (empty answers dropped)."""
    from scf.ml.genn import judge_many

    t = time.perf_counter()
    rows, passed = [], 0
    for messages, texts in zip(prompts, many):
        for text, j in zip(texts, judge_many(_items(texts, messages), workers=workers, hours=hours)):
            ok = j is not None and j.sandbox_ok
            passed += ok
            if text.strip():
                rows.append({"prompt": messages, "completion": [{"role": "assistant", "content": text.strip()}], "passed": ok})
    return rows, {"prompts": len(prompts), "samples": sum(map(len, many)), "passed": passed, "judge_s": time.perf_counter() - t}


def _batch(examples: list[Example], pad: int, device: str):
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    ce = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
        ce[i, :n] = e.ce
    return ids.to(device), mask.to(device), labels.to(device), ce.to(device)


def _labelled_logits(model, ids, mask, sel):
    """Logits (n, vocab) at the positions `sel` (b, t-1) whose next token is labelled: the
    LM head over those rows only (the full (b, t, 49152) tensor is not made)."""
    h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    return model.lm_head(h[sel])


def _autocast(device: str):
    import contextlib

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()


# --------------------------------------------------------------------------- distillation


@dataclass(frozen=True)
class DistillSettings:
    budget_s: float = 120.0  # training wall time (evaluations excluded)
    max_steps: int = 0  # 0: until the budget
    batch_size: int = 16
    lr: float = 2e-3  # BitNet trains small models at high rates (the b1.58 training tips)
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1  # on the ternary latent weights, off for the second half (the tips' two stages)
    temperature: float = 1.0
    # 0.1 since 2026-12-03 (session 10, H200, one teacher, cfr3, 21 held-out contracts x 8 answers): at weight 1 the student
    # takes on its weak teacher's slips (teacher-forced, both first leave the held-out grid programs at line 24) and its gate
    # pass is 0.43x the teacher's; at 0.1 its most probable token follows them past line 24 and it passes 1.82x (sandbox 5.6x);
    # a second teacher and seed 1.97x (6.2x) (benchmarks/RESULTS.md, "GPU runs 10-12")
    kl_weight: float = 0.1
    ce_weight: float = 1.0
    eval_every_s: float = 15.0
    seed: int = 0
    length_buckets: int = 0  # > 1: batches drawn from runs of batch_size x this many shuffled examples sorted by length (less padding)
    # On-policy distillation (GKD, Agarwal et al. 2024, arXiv:2306.13649): this share of every batch is the student's OWN
    # answers to training prompts (`rollouts`, refreshed every `on_policy_every` steps), matched to the teacher token by
    # token (KL only: nothing says they are right). A student trained only on fixed text drifts off it when it writes,
    # and never learned the way back; here it is taught where its own sampling goes. 0: off.
    on_policy: float = 0.0
    on_policy_every: int = 100

    def check(self) -> None:
        if not 0.0 <= self.on_policy < 1.0:
            raise StudentError(f"on_policy {self.on_policy}: give the share of a batch taken from the student's own answers, in [0, 1)")
        if self.on_policy_every < 1:
            raise StudentError(f"on_policy_every {self.on_policy_every}: refresh the student's answers every 1 or more steps")


def _epoch(examples: list[Example], rng: random.Random, batch_size: int, buckets: int) -> list[int]:
    """One epoch's order of example indices: a shuffle; with `buckets` > 1, each run of
    batch_size x buckets of it sorted by length and cut into batches, the batches shuffled (a
    few very long prompts then pad a few batches, not nearly all)."""
    perm = rng.sample(range(len(examples)), len(examples))
    if buckets <= 1:
        return perm
    run = batch_size * buckets
    batches = []
    for i in range(0, len(perm), run):
        chunk = sorted(perm[i:i + run], key=lambda j: len(examples[j].ids))
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return [j for b in batches if len(b) == batch_size for j in b] + [j for b in batches if len(b) < batch_size for j in b]


def distill(student, teacher, tok, examples: list[Example], settings: DistillSettings, *, device: str,
            evaluate: Callable[[], dict[str, float]] | None = None, log: Callable[[str], None] = print,
            more: Callable[[], list[Example] | None] | None = None,
            rollouts: Callable[[Any, int], list[Example]] | None = None) -> dict[str, Any]:
    """Train `student` on `examples`: τ²·KL(teacher_τ ‖ student_τ) on every labelled token plus
    the cross-entropy on the tokens of `ce` examples. AdamW; linear warm-up, then a cosine
    over the wall-clock budget down to `min_lr_ratio`; weight decay on the ternary latent
    weights for the first half only. `evaluate()` runs every `eval_every_s` seconds of
    training (its time not counted). `more()`, asked before every step until it answers a list,
    adds examples that became ready while training ran (the teacher's samples, judged meanwhile).
    `rollouts(student, step)`, with `settings.on_policy` > 0, answers training prompts with the
    student as it is now (in eval mode, no gradients, under the training's autocast): its time
    counts as training time. Returns the curve, throughput and losses."""
    if not examples:
        raise StudentError("no training examples: the CFR dataset has no approved rows and the teacher passed no sample")
    settings.check()
    examples = list(examples)
    added: dict[str, Any] = {}
    s = settings
    n_own = min(s.batch_size - 1, round(s.on_policy * s.batch_size)) if rollouts is not None else 0
    own: list[Example] = []
    own_stats = {"refreshes": 0, "seconds": 0.0, "answers": 0}
    rng = random.Random(s.seed)
    torch.manual_seed(s.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ternary = [m.weight for m in bit_layers(student).values()]
    ids_t = {id(p) for p in ternary}
    rest = [p for p in student.parameters() if id(p) not in ids_t]
    opt = torch.optim.AdamW([{"params": ternary, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=s.lr, betas=(0.9, 0.95), fused=device.startswith("cuda"))
    teacher.eval()
    student.train()
    curve: list[dict[str, float]] = []
    train_s = 0.0
    last_eval = -math.inf
    step = tokens = labelled = 0
    losses: list[tuple[float, float, float]] = []
    order: list[int] = []
    while True:
        frac = min(1.0, train_s / s.budget_s) if s.budget_s > 0 else 0.0
        if evaluate is not None and (train_s - last_eval >= s.eval_every_s or step == 0):
            last_eval = train_s
            student.eval()
            point = {"step": step, "train_s": train_s, **evaluate()}
            student.train()
            curve.append(point)
            log(f"  step {step}, {train_s:.1f} s: " + ", ".join(f"{k} {v:.4f}" for k, v in point.items() if k not in ("step", "train_s")))
        if frac >= 1.0 or (s.max_steps and step >= s.max_steps):
            break
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if more is not None:
            extra = more()
            if extra is not None:
                more = None
                examples += extra
                order = []  # the next epoch draws over all of them
                added = {"examples": len(extra), "step": step, "train_s": train_s}
                log(f"  step {step}, {train_s:.1f} s: {len(extra)} examples added ({len(examples)} in all)")
        if n_own and step % s.on_policy_every == 0:
            t1 = time.perf_counter()
            student.eval()
            with torch.no_grad(), _autocast(device):
                own = rollouts(student, step) or own
            student.train()
            own_stats["refreshes"] += 1
            own_stats["seconds"] += time.perf_counter() - t1
            own_stats["answers"] = len(own)
        take = n_own if own else 0
        if len(order) < s.batch_size - take:
            order = (order if s.length_buckets <= 1 else []) + _epoch(examples, rng, s.batch_size, s.length_buckets)
        batch, order = [examples[i] for i in order[: s.batch_size - take]], order[s.batch_size - take:]
        batch += [own[rng.randrange(len(own))] for _ in range(take)]
        ids, mask, labels, ce = _batch(batch, pad, device)
        sel = labels[:, 1:] != -100
        tgt = labels[:, 1:][sel]
        ce_sel = ce[:, 1:][sel]
        with torch.no_grad(), _autocast(device):
            t_logits = _labelled_logits(teacher, ids, mask, sel).float()
        with _autocast(device):
            s_logits = _labelled_logits(student, ids, mask, sel).float()
        tau = s.temperature
        t_logp = F.log_softmax(t_logits / tau, -1)
        kl = (t_logp.exp() * (t_logp - F.log_softmax(s_logits / tau, -1))).sum(-1).mean() * tau * tau
        if ce_sel.any():
            ce_loss = F.cross_entropy(s_logits[ce_sel], tgt[ce_sel])
        else:
            ce_loss = s_logits.sum() * 0.0
        loss = s.kl_weight * kl + s.ce_weight * ce_loss
        warm = min(1.0, (step + 1) / max(1, s.warmup_steps))
        lr = s.lr * warm * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.param_groups[0]["weight_decay"] = s.weight_decay if frac < 0.5 else 0.0
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append((loss.item(), kl.item(), ce_loss.item()))  # syncs: the step's time is its real time
        train_s += time.perf_counter() - t0
        step += 1
        tokens += int(mask.sum())
        labelled += int(sel.sum())
    tail = losses[-max(1, len(losses) // 10):] if losses else [(math.nan,) * 3]
    student.eval()
    return {"steps": step, "train_s": train_s, "tokens": tokens, "labelled_tokens": labelled,
            "tokens_per_s": tokens / train_s if train_s else 0.0, "steps_per_s": step / train_s if train_s else 0.0,
            "first_loss": losses[0][0] if losses else math.nan, "last_loss": sum(x[0] for x in tail) / len(tail),
            "last_kl": sum(x[1] for x in tail) / len(tail), "last_ce": sum(x[2] for x in tail) / len(tail),
            "curve": curve, "settings": dataclasses.asdict(s), "examples": len(examples), "added": added,
            "on_policy": own_stats if n_own else None}


# --------------------------------------------------------------------------- measures


@torch.no_grad()
def completion_nll(model, tok, rows: list[dict[str, Any]], *, device: str, max_length: int = 1024, batch_size: int = 16) -> float:
    """Mean NLL per token of the completions of `rows` (prompt masked), float32; the same
    computation for teacher and student."""
    ex = encode_rows(tok, rows, ce=True, source="nll", max_length=max_length)
    if not ex:
        raise StudentError("no held-out completions to score (the dataset's sft/validation.jsonl is empty)")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(ex), batch_size):
        ids, mask, labels, _ = _batch(ex[i: i + batch_size], pad, device)
        sel = labels[:, 1:] != -100
        logits = _labelled_logits(model, ids, mask, sel).float()
        total += float(F.cross_entropy(logits, labels[:, 1:][sel], reduction="sum"))
        count += int(sel.sum())
    model.train(was)
    return total / count


def judge_answers(gen, prompts: list[list[dict[str, str]]], samples: int, *, seed: int, workers: int, hours: float = 6.0) -> dict[str, Any]:
    """`samples` answers (one batched seeded call) to each prompt through the gate and the
    sandbox: `judge_texts` of `gen.answers_many`, with the generation time."""
    t = time.perf_counter()
    many = gen.answers_many(prompts, samples, seed)
    gen_s = time.perf_counter() - t
    return {**judge_texts(prompts, many, workers=workers, hours=hours), "generate_s": gen_s}


def judge_texts(prompts: list[list[dict[str, str]]], many: list[list[str]], *, workers: int, hours: float = 6.0) -> dict[str, Any]:
    """Answers (`many[i]` to `prompts[i]`) through the gate and the sandbox (`ml.genn.judge_many`,
    `workers` at once); rates over all answers (a malformed one fails both), per domain and overall."""
    from collections import Counter

    from scf.ml.genn import judge_many
    from scf.producers.genn import extract_code

    t = time.perf_counter()
    by: dict[str, dict[str, float]] = {}
    reasons: dict[str, Counter] = {}
    for messages, texts in zip(prompts, many):
        domain = contract_of(messages)[0]
        tally = by.setdefault(domain, dict.fromkeys(("samples", "code", "gate", "sandbox", "beats", "reward"), 0))
        verdicts = judge_many(_items(texts, messages), workers=workers, hours=hours)
        tally["samples"] += len(texts)
        tally["code"] += sum(not extract_code(x).error for x in texts)
        why = reasons.setdefault(domain, Counter())
        for x, j in zip(texts, verdicts):
            why[((extract_code(x).error or "no domain") if j is None else (j.reason or "passed"))[:100]] += 1
        for j in (v for v in verdicts if v is not None):
            tally["gate"] += j.gate_ok
            tally["sandbox"] += j.sandbox_ok
            tally["beats"] += bool(getattr(j, "beats_status_quo", False))
            tally["reward"] += j.reward

    def rates(d: dict[str, float]) -> dict[str, float]:
        k = max(d["samples"], 1)
        return {"samples": d["samples"], "code_rate": d["code"] / k, "gate_pass_rate": d["gate"] / k,
                "sandbox_pass_rate": d["sandbox"] / k, "beats_status_quo_rate": d["beats"] / k, "mean_reward": d["reward"] / k,
                "counts": {x: int(d[x]) for x in ("code", "gate", "sandbox", "beats")},
                "gate_95": wilson(int(d["gate"]), int(d["samples"])), "sandbox_95": wilson(int(d["sandbox"]), int(d["samples"]))}

    tot = {k: sum(d[k] for d in by.values()) for k in ("samples", "code", "gate", "sandbox", "beats", "reward")}
    return {**rates(tot), "domains": {k: {**rates(v), "reasons": reasons[k].most_common(5)} for k, v in by.items()},
            "judge_s": time.perf_counter() - t, "example": many[0][0][:800] if many and many[0] else "", "answers": many}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95 % at z 1.96) of a rate of k successes in n trials."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@torch.no_grad()
def decode_speed(model, tok, messages: list[dict[str, str]], *, new_tokens: int = 64, threads: int = 0) -> dict[str, float]:
    """Batch-1 greedy decoding on the CPU: the prompt's prefill time and tokens/s of the
    decode (`new_tokens` forced: end of sequence suppressed), with the KV cache."""
    if threads > 0:
        torch.set_num_threads(threads)
    model = model.to("cpu").eval()
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def run(n: int) -> float:
        t = time.perf_counter()
        model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad)
        return time.perf_counter() - t

    run(2)  # warm-up
    one = min(run(1) for _ in range(2))
    full = run(new_tokens)
    return {"prompt_tokens": int(enc["input_ids"].shape[1]), "prefill_s": one, "new_tokens": new_tokens,
            "decode_tokens_per_s": (new_tokens - 1) / max(full - one, 1e-9), "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- the file


def _config_of(model) -> dict[str, Any]:
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "rms_norm_eps",
            "attention_bias", "mlp_bias", "hidden_act", "head_dim", "rope_theta", "rope_parameters", "rope_scaling")
    d = model.config.to_dict()
    return {k: d[k] for k in keep if k in d}


def save_student(model, tok, path: Path, *, packing: str = "2bit", student: StudentConfig | None = None,
                 lineage: list[dict[str, str]] | None = None, metrics: dict[str, Any] | None = None,
                 embed_dtype: str = "float16") -> dict[str, Any]:
    """Freeze `model` and write it packed (format `scf-ternary-lm/1`, module docstring).
    Returns {path, bytes, bits_per_linear_weight, ...}."""
    from safetensors.numpy import save_file

    if packing not in PACKINGS:
        raise StudentError(f"packing {packing!r}: use one of {sorted(PACKINGS)}")
    if embed_dtype not in ("float16", "float32"):
        raise StudentError(f"embedding dtype {embed_dtype!r}: use float16 or float32")
    if not model.config.tie_word_embeddings:
        raise StudentError("the student's LM head must be tied to its embedding (build_student does so)")
    freeze(model)
    emb = model.get_input_embeddings().weight
    if embed_dtype == "float16":  # the model in memory computes what the file holds
        with torch.no_grad():
            emb.copy_(emb.half().to(emb.dtype))
    layers = bit_layers(model)
    tensors: dict[str, np.ndarray] = {}
    table = {}
    for name, m in layers.items():
        t, gamma = m.quantised_weight()
        tensors[f"{name}.weight.packed"] = pack(t.cpu().numpy().astype(np.int8), packing)
        table[name] = {"shape": list(m.weight.shape), "scale": float(gamma)}
    skip = {f"{n}.weight" for n in layers} | {f"{n}.wscale" for n in layers} | {"lm_head.weight"}
    embed_name = next(n for n, p in model.named_parameters() if p is emb)
    for name, p in model.state_dict().items():
        if name in skip:
            continue
        dt = np.float16 if name == embed_name and embed_dtype == "float16" else np.float32
        tensors[name] = p.detach().cpu().float().numpy().astype(dt)
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        for f in TOKENIZER_FILES:
            if (Path(tmp) / f).is_file():
                files[f] = (Path(tmp) / f).read_text()
    meta = {"format": FORMAT, "packing": packing, "layers": json.dumps(table, sort_keys=True), "activation_bits": "8",
            "input_norm": "rms", "config": json.dumps(_config_of(model), sort_keys=True),
            "student": json.dumps(dataclasses.asdict(student) if student else {}, sort_keys=True),
            "tokenizer": json.dumps(files, sort_keys=True), "lineage": json.dumps(lineage or [], sort_keys=True),
            "metrics": json.dumps(metrics or {}, sort_keys=True, default=str)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return {"path": str(path), "bytes": path.stat().st_size, **linear_bits(path)}


def _read_meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - an untrusted file: anything unreadable is named
        raise StudentError(f"{path} is not a safetensors file ({type(exc).__name__}: {exc}): give a student written by save_student") from None
    if meta.get("format") != FORMAT:
        raise StudentError(f"{path} has format {meta.get('format')!r}, not {FORMAT!r}: give a code student written by save_student")
    if meta.get("packing") not in PACKINGS:
        raise StudentError(f"{path} states packing {meta.get('packing')!r}: only {sorted(PACKINGS)} are known")
    return meta


def linear_bits(path: Path) -> dict[str, Any]:
    """Bits per weight of the linear layers as the file stores them: packed bytes plus one
    float32 scale per layer, over the number of weights."""
    from safetensors import safe_open

    meta = _read_meta(Path(path))
    table = json.loads(meta["layers"])
    n = sum(int(np.prod(v["shape"])) for v in table.values())
    with safe_open(str(path), framework="numpy") as f:
        packed = sum(f.get_slice(f"{k}.weight.packed").get_shape()[0] for k in table)
    bits = packed * 8 + 32 * len(table)
    return {"packing": meta["packing"], "linear_weights": n, "packed_bytes": packed, "scales": len(table),
            "bits_per_linear_weight": bits / max(n, 1)}


def read_header(path: Path) -> dict[str, Any]:
    """format, packing, config, student, lineage, metrics of a student file (no tensor read)."""
    meta = _read_meta(Path(path))
    return {"format": meta["format"], "packing": meta["packing"], **{k: json.loads(meta.get(k, "{}") or "{}")
                                                                     for k in ("config", "student", "lineage", "metrics")}}


def load_student(path: Path, *, device: str = "cpu"):
    """(model, tokenizer) from a student file: safetensors and the packed codec, no pickle.
    The model is frozen (`BitLinear.wscale` set): it computes exactly what was saved."""
    from safetensors import safe_open
    from transformers import AutoTokenizer, LlamaConfig

    path = Path(path)
    meta = _read_meta(path)
    try:
        table = json.loads(meta["layers"])
        lcfg = LlamaConfig(**json.loads(meta["config"]))
        files = json.loads(meta["tokenizer"])
    except (KeyError, ValueError, TypeError) as exc:
        raise StudentError(f"{path}: its layers/config/tokenizer metadata do not decode ({exc}): the file is damaged") from None
    model = _ternary_llama(lcfg)
    layers = bit_layers(model)
    if set(table) != set(layers):
        raise StudentError(f"{path}: its layers ({len(table)}) do not match the model its config builds ({len(layers)}): the file is damaged")
    state = {}
    with safe_open(str(path), framework="numpy") as f:
        keys = set(f.keys())
        try:
            for name, info in table.items():
                shape = [int(v) for v in info["shape"]]
                scale = float(info["scale"])
                if not (math.isfinite(scale) and scale > 0):
                    raise StudentError(f"{path}: layer {name} has scale {scale}: the file is damaged")
                t = unpack(f.get_tensor(f"{name}.weight.packed"), int(np.prod(shape)), meta["packing"]).reshape(shape)
                g = torch.tensor(scale, dtype=torch.float32)
                state[f"{name}.weight"] = torch.from_numpy(t.astype(np.float32)) * g
                state[f"{name}.wscale"] = g
                keys.discard(f"{name}.weight.packed")
        except TernaryError as exc:
            raise StudentError(f"{path}: {exc}") from None
        for k in keys:
            state[k] = torch.from_numpy(f.get_tensor(k).astype(np.float32))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise StudentError(f"{path}: tensors missing {missing[:3]} or unexpected {unexpected[:3]}: the file is damaged")
    model.tie_weights()
    for m in layers.values():
        m.frozen = True  # wscale and the weights γ·T are set: RMSBitLinear's inference path
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            if name not in TOKENIZER_FILES:
                raise StudentError(f"{path}: refused tokenizer file name {name!r}")
            (Path(tmp) / name).write_text(text)
        tok = AutoTokenizer.from_pretrained(tmp)
    return model.to(device).eval(), tok


__all__ = ["FORMAT", "DistillSettings", "Example", "StudentConfig", "StudentError", "build_student", "completion_nll", "decode_speed",
           "distill", "encode_rows", "end_of_turn", "fresh_rows", "init_embeddings_from", "judge_answers", "linear_bits", "linear_counts", "load_student",
           "contract_of", "judge_samples", "judge_texts", "read_header", "save_student", "stop_probability", "teacher_samples", "wilson"]
