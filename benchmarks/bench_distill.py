"""Ternary students against their teachers, on the same held-out fossils.

    python benchmarks/bench_distill.py                                   # CPU, small (minutes)
    python benchmarks/bench_distill.py --device cuda --hidden 256 --depth 4 \\
        --teacher-steps 4000 --steps 4000 --fossils 50000 --decisions 128 --opt-steps 3000   # a GPU run
    python benchmarks/bench_distill.py --teacher CKPT --optimiser OPT_CKPT --data SHARDS   # given teachers

1. Fossils: `--fossils` synthetic fossils of `--domain` (or `--data` shards); the loader's
   split: train for the teacher and the student, held-out for both measurements.
2. EBDM teacher (trained here with `ml.train`, or `--teacher`), distilled into a ternary
   student (`ml.distill.distill_ebdm`, BitNet b1.58) for `--steps`; both judged on the same
   held-out fossils (`compare_ebdm`): held-out DSM ratio, Spearman of the student's
   energies against the teacher's, ternary share; with `--decisions N`, decision quality
   PAIRED (`ml.distill.paired_decisions`): teacher and student sample with the same noise on
   the same N held-out contexts (beyond the held-out split: fresh draws of the domain's
   synthesiser, seed 12345, no fossil of training), repaired, against the exact optimum;
   the paired differences of gap and savings captured with 95 % intervals and a verdict
   (met: the interval within ±0.1 pp); and the teacher against itself with another seed
   (unpaired: the sampler's own spread, which the pairing removes). `--student FILE` takes
   a packed student instead of distilling one.
3. Files: the student packed at 2 bits and in base 3, each against the teacher's fp32
   safetensors file.
4. Latency, batch 1 on this machine, and memory: the student in numpy (`consumers.edge.ternary`)
   with each kernel (`f32`: int8 codes through float32 BLAS, exact; `int8`: int8 weights,
   int32 accumulation), the previous runtime (dequantised activations times the float32
   unpack) and the torch fp32 teacher, measured in the same run: energy alone, energy +
   score, and a decision (rank 64 candidate states of one context); the weights' bytes in
   memory and the peak of a call's transient arrays (tracemalloc).
5. Learned optimiser (trained here with `--opt-steps`, or `--optimiser`): its proposal
   network distilled (`distill_optimiser`); decision quality of both on the same held-out
   contexts; numpy batch-1 proposal latency against the torch teacher.

Prints a table of the issue's measures, each with the target and met / MISSED, and one
JSON line with every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # batch-1 latency: one BLAS thread, as an edge box would run it

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def median_time(fn, repeat: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain", default="grid:case14")
    ap.add_argument("--data", type=Path, help="fossil shards (default: --fossils synthetic ones)")
    ap.add_argument("--fossils", type=int, default=8000)
    ap.add_argument("--teacher", type=Path, help="an EBDM checkpoint (default: train one here)")
    ap.add_argument("--student", type=Path, help="a packed student of --teacher (default: distil one here)")
    ap.add_argument("--teacher-steps", type=int, default=1500)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1500, help="distillation steps")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--anchor-weight", type=float, default=1.0, help="clean-state energy matching at σ_min (0: off)")
    ap.add_argument("--rank-weight", type=float, default=0.0, help="pairwise ranking loss at σ_min (ml.distill.rank_loss; 0: off)")
    ap.add_argument("--mix", type=float, default=0.0, help="share of each batch mixed from two fossils (0: off)")
    ap.add_argument("--ema", type=float, default=0.0, help="moving average of the latent weights (0: off)")
    ap.add_argument("--heldout", type=int, default=512)
    ap.add_argument("--decisions", type=int, default=0, help="held-out contexts for decision quality (EBDM sampling: slow on a CPU)")
    ap.add_argument("--optimiser", type=Path, help="a learned-optimiser checkpoint (default: train one with --opt-steps)")
    ap.add_argument("--opt-steps", type=int, default=0, help="train a learned optimiser for this many steps and distil it (0: skip)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=200, help="latency repetitions")
    ap.add_argument("--out", type=Path, help="keep the files here (default: a temporary directory)")
    ap.add_argument("--skip-noise", action="store_true", help="with --decisions: skip the teacher-against-itself run (half the time)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default; 1 on a shared machine)")
    args = ap.parse_args()

    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from scf import domains
    from scf.consumers.edge.ternary import TernaryNet, quantise_activations
    from scf.domains.fossils import synth_shards
    from scf.ml.checkpoint import load_checkpoint
    from scf.ml.distill import DistillConfig, compare_ebdm, distill_ebdm, export_student
    from scf.ml.loader import load_arrays
    from scf.ml.train import train_local

    out = args.out or Path(tempfile.mkdtemp(prefix="scf-bench-distill-"))
    out.mkdir(parents=True, exist_ok=True)
    domain = domains.get(args.domain)
    data = args.data
    if data is None:
        data = out / "fossils"
        if not data.exists():
            t0 = time.perf_counter()
            synth_shards(args.domain, args.fossils, data, seed=0)
            print(f"synthesised {args.fossils} fossils of {args.domain} in {time.perf_counter() - t0:.1f}s", flush=True)
    x, c, _ = load_arrays(data, domain=args.domain, split="train", seed=0)
    hx, hc, he = load_arrays(data, domain=args.domain, split="heldout", limit=args.heldout, seed=0)
    print(f"{len(x)} train and {len(hx)} held-out fossils", flush=True)
    row: dict[str, float | str] = {"domain": args.domain, "device": args.device, "train": len(x), "heldout": len(hx)}

    # ------------------------------------------------------------- EBDM teacher and student
    if args.teacher is None:
        t0 = time.perf_counter()
        res = train_local(args.domain, data, out, steps=args.teacher_steps, batch_size=args.batch_size, device=args.device,
                          hidden=args.hidden, depth=args.depth, eval_records=256)  # fmt: skip
        teacher_path = res.checkpoint
        row["teacher_train_s"] = time.perf_counter() - t0
        print(f"teacher: {args.teacher_steps} steps in {row['teacher_train_s']:.0f}s", flush=True)
    else:
        teacher_path = args.teacher
    teacher, _ = load_checkpoint(teacher_path)
    cfg = DistillConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, device=args.device, log_every=max(1, args.steps // 5),
                        anchor_weight=args.anchor_weight, rank_weight=args.rank_weight, mix=args.mix, ema=args.ema)  # fmt: skip
    if args.student is None:
        student, stats = distill_ebdm(teacher, x, c, cfg, log=lambda line: print("  distill " + line, flush=True))
    else:
        from scf.ml.distill import load_student

        student, _ = load_student(args.student)
        stats = {"train_seconds": float("nan"), "samples_per_s": float("nan")}
    row["distill_s"], row["distill_samples_per_s"] = stats["train_seconds"], stats["samples_per_s"]
    m = compare_ebdm(teacher, student, hx, hc, he)
    row.update({k: v for k, v in m.items()})
    paired = noise = None
    if args.decisions:
        from scf.ml.distill import paired_decisions

        dx, dc = hx[: args.decisions].astype(float), hc[: args.decisions].astype(float)
        if len(dx) < args.decisions:  # more held-out contexts: fresh draws of the synthesiser (no training fossil)
            fresh = domain.synthesize(np.random.default_rng(12345), args.decisions - len(dx))
            dx = np.concatenate([dx, np.stack([f.state for f in fresh])])
            dc = np.concatenate([dc, np.stack([f.context for f in fresh])])
        t0 = time.perf_counter()
        paired = paired_decisions(teacher, student, domain, dx, dc, seed=0, batch=512)
        row.update({f"paired_{k}": v for k, v in paired.items()})
        row["paired_s"] = time.perf_counter() - t0
        print(f"paired decisions on {len(dx)} contexts in {row['paired_s']:.0f}s", flush=True)
        if not args.skip_noise:
            noise = paired_decisions(teacher, teacher, domain, dx, dc, seed=0, student_seed=1, batch=512)
            row.update({f"noise_{k}": v for k, v in noise.items()})
    config = dataclasses.asdict(teacher.config)
    sizes = {}
    for packing in ("2bit", "base3"):
        p = export_student(out / f"student-{packing}.safetensors", student, kind="ebdm", config=config, packing=packing,
                           lineage={"teacher": {"file": str(teacher_path)}}, metrics={k: v for k, v in m.items() if np.isfinite(v)})  # fmt: skip
        sizes[packing] = p.stat().st_size
    teacher_bytes = teacher_path.stat().st_size
    row["teacher_bytes"] = teacher_bytes
    for packing, n in sizes.items():
        row[f"student_bytes_{packing}"] = n
        row[f"file_ratio_{packing}"] = n / teacher_bytes

    # ------------------------------------------------------------- latency and memory, batch 1
    import tracemalloc

    class Dequantised(TernaryNet):  # the previous runtime: dequantised activations times the float32 unpack
        def linear(self, name, x):
            if name not in self.m.ternary:
                return super().linear(name, x)
            w, scale = self._codes[name], self.m.ternary[name][1]
            y = (quantise_activations(x) @ w) * np.float32(scale)
            bias = self.t.get(f"{name}.bias")
            return y + bias if bias is not None else y

    nets = {"f32": TernaryNet.load(out / "student-2bit.safetensors", kernel="f32"),
            "int8": TernaryNet.load(out / "student-2bit.safetensors", kernel="int8"),
            "unpack": Dequantised.load(out / "student-2bit.safetensors", kernel="f32")}  # fmt: skip
    net = nets["f32"]
    x1, c1 = hx[:1].astype(np.float32), hc[:1].astype(np.float32)
    z1, cz1 = net.normalise(x1, c1)
    sigma = float(teacher.config.sigma_min)
    torch.set_num_threads(1)
    zt, czt = torch.as_tensor(z1), torch.as_tensor(cz1)
    cand = hx[:64].astype(np.float32)  # a decision on the edge: rank 64 candidate states of one context
    cand_c = np.broadcast_to(c1, (len(cand), c1.shape[1])).copy()
    zc, czc = teacher.normalise(torch.as_tensor(cand)), teacher.normalise_context(torch.as_tensor(cand_c))

    def torch_energy():
        with torch.no_grad():
            teacher.energy(zt, czt, sigma)

    def torch_rank():
        with torch.no_grad():
            torch.argsort(teacher.energy(zc, czc, sigma))

    def peak_kib(fn) -> float:
        tracemalloc.start()
        fn()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak / 1024

    for k, n in nets.items():
        row[f"numpy_{k}_energy_ms"] = 1000 * median_time(lambda n=n: n.energy_z(z1, cz1, sigma), args.repeat)
        row[f"numpy_{k}_score_ms"] = 1000 * median_time(lambda n=n: n.energy_z(z1, cz1, sigma, grad=True), args.repeat)
        row[f"numpy_{k}_rank64_ms"] = 1000 * median_time(lambda n=n: n.rank(cand, c1[0]), args.repeat)
        row[f"numpy_{k}_weights_kib"] = n.weight_bytes() / 1024
        row[f"numpy_{k}_score_peak_kib"] = peak_kib(lambda n=n: n.energy_z(z1, cz1, sigma, grad=True))
        row[f"numpy_{k}_rank64_peak_kib"] = peak_kib(lambda n=n: n.rank(cand, c1[0]))
    assert np.array_equal(nets["f32"].energy(cand, cand_c), nets["int8"].energy(cand, cand_c))  # the kernels: the same integers
    row["torch_teacher_energy_ms"] = 1000 * median_time(torch_energy, args.repeat)
    row["torch_teacher_score_ms"] = 1000 * median_time(lambda: teacher.score(zt, czt, sigma), args.repeat)
    row["torch_teacher_rank64_ms"] = 1000 * median_time(torch_rank, args.repeat)
    row["torch_teacher_weights_kib"] = sum(t.numel() * t.element_size() for t in teacher.state_dict().values()) / 1024
    row["numpy_student_energy_ms"], row["numpy_student_score_ms"] = row["numpy_f32_energy_ms"], row["numpy_f32_score_ms"]

    # ------------------------------------------------------------- learned optimiser
    if args.optimiser is not None or args.opt_steps:
        from scf.ml.distill import compare_optimiser, distill_optimiser
        from scf.ml.optimize import OptimiserConfig, load_optimiser, train_optimiser

        if args.optimiser is None:
            r = train_optimiser(args.domain, data, out, OptimiserConfig(steps=args.opt_steps, eval_contexts=args.heldout))
            opt_path = r.checkpoint
        else:
            opt_path = args.optimiser
        opt_teacher, _ = load_optimiser(opt_path)
        opt_student, ostats = distill_optimiser(opt_teacher, domain, c, DistillConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr))
        om = compare_optimiser(opt_teacher, opt_student, domain, (hx, hc, he), limit=args.heldout)
        row.update({f"opt_{k}": v for k, v in om.items()})
        op = export_student(out / "opt-student-2bit.safetensors", opt_student, kind="optimiser", config=opt_teacher.config.to_dict(),
                            packing="2bit", lineage={"teacher": {"file": str(opt_path)}}, metrics={})  # fmt: skip
        row["opt_file_ratio_2bit"] = op.stat().st_size / opt_path.stat().st_size
        onet = TernaryNet.load(op)
        ct1 = torch.as_tensor(c1)

        def torch_propose():
            with torch.no_grad():
                opt_teacher._raw(ct1)

        row["opt_numpy_student_propose_ms"] = 1000 * median_time(lambda: onet.propose(c1), args.repeat)
        row["opt_torch_teacher_propose_ms"] = 1000 * median_time(torch_propose, args.repeat)

    # ------------------------------------------------------------- the measures
    def line(name, value, target, ok):
        status = "n/a" if ok is None else ("met" if ok else "MISSED")
        print(f"| {name} | {value} | {target} | {status} |")

    print("\n| measure | value | target | |\n|---|---|---|---|")
    line("held-out DSM, student / teacher", f"{m['dsm_ratio']:.4f} ({m['heldout_dsm']:.4f} / {m['teacher_heldout_dsm']:.4f})", "<= 1.02", m["dsm_ratio"] <= 1.02)
    line("energy rank correlation (Spearman, σ_min)", f"{m['energy_rank_corr']:.4f}", ">= 0.98", m["energy_rank_corr"] >= 0.98)
    line("energy rank correlation (noisy, mean over the ladder)", f"{m['energy_rank_corr_noisy']:.4f}", "(reported)", None)
    if paired is not None:
        n = int(paired["contexts"])
        for k, name, mean in (("gap", "gap to optimum", "decision_gap_mean"), ("savings", "savings captured", "decision_savings_captured")):
            p = paired
            line(f"EBDM decisions, paired on {n} contexts: {name}, student - teacher [95 % CI]",
                 f"{p[k + '_diff_pp']:+.3f} pp [{p[k + '_diff_low_pp']:+.3f}, {p[k + '_diff_high_pp']:+.3f}] ({100 * p[mean]:.3f} % vs {100 * p['teacher_' + mean]:.3f} %)",
                 "within 0.1 pp", {"met": True, "missed": False}.get(p[k + "_verdict"]))  # fmt: skip
            line(f"  one-sided: the student no worse than the teacher by more than 0.1 pp ({name})", p[k + "_no_worse"], "", {"met": True, "missed": False}.get(p[k + "_no_worse"]))  # fmt: skip
            if noise is not None:
                line(f"  the teacher against itself, seed 1 vs 0 (unpaired): {name}",
                     f"{noise[k + '_diff_pp']:+.3f} pp [{noise[k + '_diff_low_pp']:+.3f}, {noise[k + '_diff_high_pp']:+.3f}]", "(the sampler's noise)", None)  # fmt: skip
        if noise is not None:
            line("  per-context sd of the gap difference: paired student / unpaired teacher", f"{paired['gap_diff_sd_pp']:.3f} / {noise['gap_diff_sd_pp']:.3f} pp", "(reported)", None)
    line("parameters ternary", f"{100 * m['ternary_share']:.1f} %", ">= 90 %", m["ternary_share"] >= 0.9)
    for packing in ("2bit", "base3"):
        line(f"file, {packing} / fp32 teacher", f"{row[f'file_ratio_{packing}']:.3f} ({sizes[packing]:,} / {teacher_bytes:,} bytes)", "<= 0.15", row[f"file_ratio_{packing}"] <= 0.15)
    for what, key in (("energy", "energy"), ("energy + score", "score"), ("decision: rank 64 candidates", "rank64")):
        t = row[f"torch_teacher_{key}_ms"]
        got = ", ".join(f"{k} {row[f'numpy_{k}_{key}_ms']:.3f} ms ({row[f'numpy_{k}_{key}_ms'] / t:.2f}x)" for k in nets)
        line(f"batch-1 {what}: numpy student by kernel / torch fp32 teacher {t:.3f} ms", got, "(reported)", None)
    got = ", ".join(f"{k} {row[f'numpy_{k}_weights_kib']:.0f} KiB (score peak {row[f'numpy_{k}_score_peak_kib']:.0f} KiB)" for k in nets)
    line(f"weights in memory: numpy student by kernel / torch teacher {row['torch_teacher_weights_kib']:.0f} KiB", got, "(reported)", None)
    if "opt_decision_gap_mean_diff_pp" in row:
        for k in ("decision_gap_mean", "decision_savings_captured"):
            d = row.get(f"opt_{k}_diff_pp")
            if d is not None:
                line(f"optimiser decisions: {k.removeprefix('decision_')}, student - teacher", f"{d:+.3f} pp ({100 * row[f'opt_{k}']:.3f} % vs {100 * row[f'opt_teacher_{k}']:.3f} %)", "within 0.1 pp", abs(d) <= 0.1)
        line("optimiser: parameters of the policy ternary", f"{100 * row['opt_ternary_share']:.1f} %", "(reported)", None)
        line("optimiser file, 2bit / fp32 teacher", f"{row['opt_file_ratio_2bit']:.3f}", "(reported)", None)
        line("batch-1 proposal: numpy student / torch teacher", f"{row['opt_numpy_student_propose_ms']:.3f} / {row['opt_torch_teacher_propose_ms']:.3f} ms", "(reported)", None)
    print(f"distillation: {args.steps} steps in {row['distill_s']:.0f}s ({row['distill_samples_per_s']:.0f} samples/s on {args.device})")
    print(json.dumps({k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in row.items()}))


if __name__ == "__main__":
    main()
