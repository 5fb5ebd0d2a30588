"""Ternary students' PAIRED decisions on grid:case118, seed by seed, on a CPU (issue 14).

    OMP_NUM_THREADS=1 python benchmarks/distill_seeds_cpu.py --seeds 0,1,2 --variants "default;chain:chain=0.25;fp:ternary=False"

Per seed s (everything cached under `--work`, so variants can be added run after run):
`--fossils` synthetic fossils (seed s), a teacher EBDM (hidden `--hidden`, depth 4,
`--teacher-steps`, seed s), 512 fresh synthesiser draws (generator (12345, s): no training
fossil) whose exact optimum is solved once; the teacher's physics-guided samples on the
first `--decisions` of them (generator seed s). Per variant (`name` or `name:key=value,...`,
DistillConfig fields): a student distilled from that teacher (`--steps`, seed s), judged
on the 512 draws (held-out DSM ratio, energy rank correlation: `ml.distill.compare_ebdm`)
and its decisions sampled with the SAME noise on the same contexts, repaired and compared
with the teacher's (`ml.distill.paired_summary`). One JSON line per (seed, variant) in
`--work`/rows.jsonl; `--summary` prints the table: per variant the mean gap difference over
seeds, its paired t against `0`, and against the variant `--base` (seed by seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DOMAIN = "grid:case118"


def seed_setup(args, s: int):
    """(teacher, train x, c, judged x, c, cost, decision contexts (x, c), optimum, the teacher's outcome) of seed s, cached."""
    import numpy as np

    from scf import domains
    from scf.domains.fossils import synth_shards
    from scf.domains.quality import DecisionQuality, optimum_costs
    from scf.ml.checkpoint import load_checkpoint
    from scf.ml.distill import _sample_decisions, decision_outcome
    from scf.ml.loader import load_arrays
    from scf.ml.train import train_local

    d = domains.get(DOMAIN)
    base = Path(args.work) / f"seed{s}"
    data = base / "fossils"
    if not (base / "fossils.done").exists():
        synth_shards(DOMAIN, args.fossils, data, seed=s, shard_size=args.fossils)
        (base / "fossils.done").write_text("ok")
    x, c, _ = load_arrays(data, domain=DOMAIN, split="train", seed=0)
    ckpt = base / "teacher.txt"
    if not ckpt.exists():
        t0 = time.perf_counter()
        res = train_local(DOMAIN, data, base / "teacher", steps=args.teacher_steps, batch_size=256, device="cpu", hidden=args.hidden,
                          depth=4, eval_records=32, seed=s)  # fmt: skip
        ckpt.write_text(str(res.checkpoint))
        print(f"seed {s}: teacher {args.teacher_steps} steps in {time.perf_counter() - t0:.0f}s", flush=True)
    teacher, _ = load_checkpoint(ckpt.read_text())
    judged = base / "judged.npz"  # arrays only (np.load without pickle)
    if not judged.exists():
        t0 = time.perf_counter()
        fresh = d.synthesize(np.random.default_rng([12345, s]), 512)
        jx, jc, je = (np.stack([getattr(f, k) for f in fresh]).astype(float) for k in ("state", "context", "energy"))
        n = args.decisions
        optimum = optimum_costs(d, jc[:n])[1]
        samples = _sample_decisions(teacher, d, jc[:n], seed=s, batch=n, device="cpu")
        outcome = decision_outcome(d, jc[:n], jx[:n], samples, optimum)
        q, fallback = outcome
        np.savez(judged, jx=jx, jc=jc, je=je, optimum=optimum, n=n, feasible=q.feasible, cost=q.cost, q_optimum=q.optimum, gap=q.gap,
                 status_quo=q.status_quo, fallback=np.asarray(fallback))  # fmt: skip
        print(f"seed {s}: {n} contexts' optimum and the teacher's decisions in {time.perf_counter() - t0:.0f}s", flush=True)
    with np.load(judged, allow_pickle=False) as z:
        jx, jc, je, optimum, n = z["jx"], z["jc"], z["je"], z["optimum"], int(z["n"])
        outcome = (DecisionQuality(feasible=z["feasible"], cost=z["cost"], optimum=z["q_optimum"], gap=z["gap"], status_quo=z["status_quo"]),
                   z["fallback"])  # fmt: skip
    if n != args.decisions:
        raise SystemExit(f"{judged} holds {n} decision contexts, not --decisions {args.decisions}: use another --work")
    return teacher, x, c, jx, jc, je, optimum, outcome


def run(args) -> None:
    import torch
    from bench_distill_gpu import parse_variants

    from scf import domains
    from scf.ml.distill import DistillConfig, _sample_decisions, compare_ebdm, decision_outcome, distill_ebdm, paired_summary

    torch.set_num_threads(1)
    d = domains.get(DOMAIN)
    rows_path = Path(args.work) / "rows.jsonl"
    done = set()
    if rows_path.exists():
        done = {(r["seed"], r["variant"]) for r in map(json.loads, rows_path.read_text().splitlines())}
    variants = parse_variants(args.variants)
    for s in (int(v) for v in args.seeds.split(",")):
        todo = [(name, over) for name, over in variants if (s, name) not in done]
        if not todo:
            continue
        teacher, x, c, jx, jc, je, optimum, t_outcome = seed_setup(args, s)
        n = args.decisions
        for name, over in todo:
            cfg = dataclasses.replace(DistillConfig(steps=args.steps, batch_size=256, seed=s, log_every=10**9), **over)
            t0 = time.perf_counter()
            student, stats = distill_ebdm(teacher, x, c, cfg)
            train_s = time.perf_counter() - t0
            m = compare_ebdm(teacher, student, jx, jc, je, seed=0)
            t1 = time.perf_counter()
            samples = _sample_decisions(student, d, jc[:n], seed=s, batch=n, device="cpu")
            p = paired_summary(t_outcome, decision_outcome(d, jc[:n], jx[:n], samples, optimum))
            row = {"seed": s, "variant": name, "overrides": over, "steps": cfg.steps, "train_s": train_s, "decide_s": time.perf_counter() - t1,
                   "dsm_ratio": m["dsm_ratio"], "rank": m["energy_rank_corr"], "rank_noisy": m["energy_rank_corr_noisy"],
                   "ternary_share": m["ternary_share"], **{k: v for k, v in p.items()}}  # fmt: skip
            with rows_path.open("a") as f:
                f.write(json.dumps(row, default=float) + "\n")
            print(f"seed {s} {name:>14}: gap {p['gap_diff_pp']:+.3f} pp [{p['gap_diff_low_pp']:+.3f}, {p['gap_diff_high_pp']:+.3f}], savings "
                  f"{p['savings_diff_pp']:+.3f} pp; DSM {m['dsm_ratio']:.4f}x, rank {m['energy_rank_corr']:.4f}; identical "
                  f"{100 * p['identical_decisions']:.1f} %; teacher gap {100 * p['teacher_decision_gap_mean']:.3f} %; "
                  f"{train_s:.0f}s + {row['decide_s']:.0f}s", flush=True)  # fmt: skip


def summary(args) -> None:
    import numpy as np
    from scipy import stats

    rows = [json.loads(line) for line in (Path(args.work) / "rows.jsonl").read_text().splitlines()]
    by = {}
    for r in rows:
        by.setdefault(r["variant"], {})[r["seed"]] = r
    seeds = sorted({r["seed"] for r in rows})
    print("gap diff pp (student - teacher), per seed; DSM ratio and rank corr: means")
    print(f"{'variant':>16} " + " ".join(f"{'s' + str(s):>7}" for s in seeds) + f" {'mean':>7} {'t(0.1)p':>8} {'vs base':>8} {'p':>6} "
          f"{'sav mean':>8} {'DSM':>7} {'rank':>7} {'train_s':>7}")  # fmt: skip
    base = by.get(args.base, {})
    for name, per in by.items():
        g = np.array([per[s]["gap_diff_pp"] for s in seeds if s in per])
        line = f"{name:>16} " + " ".join(f"{per[s]['gap_diff_pp']:>+7.3f}" if s in per else f"{'':>7}" for s in seeds)
        # one-sided: is the mean gap difference below +0.1 pp?
        p_tol = stats.ttest_1samp(g, 0.1, alternative="less").pvalue if len(g) > 1 else math.nan
        common = [s for s in seeds if s in per and s in base]
        if name != args.base and len(common) > 1:
            diff = np.array([per[s]["gap_diff_pp"] - base[s]["gap_diff_pp"] for s in common])
            vs, pv = diff.mean(), stats.ttest_1samp(diff, 0.0).pvalue
        else:
            vs, pv = math.nan, math.nan
        sav = np.mean([per[s]["savings_diff_pp"] for s in per])
        line += (f" {g.mean():>+7.3f} {p_tol:>8.3f} {vs:>+8.3f} {pv:>6.3f} {sav:>+8.3f} {np.mean([r['dsm_ratio'] for r in per.values()]):>7.4f} "
                 f"{np.mean([r['rank'] for r in per.values()]):>7.4f} {np.mean([r['train_s'] for r in per.values()]):>7.0f}")  # fmt: skip
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default="default")
    ap.add_argument("--fossils", type=int, default=2000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=600, help="distillation steps (a variant may set its own: steps=N)")
    ap.add_argument("--decisions", type=int, default=256)
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "scf-distill-seeds"))
    ap.add_argument("--summary", action="store_true", help="print the table of what --work holds and stop")
    ap.add_argument("--base", default="default", help="the variant others are compared with, seed by seed")
    args = ap.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if not args.summary:
        run(args)
    summary(args)


if __name__ == "__main__":
    main()
