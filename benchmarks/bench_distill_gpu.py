"""A ternary student's training run on a GPU: throughput and time to target, in one run.

    source benchmarks/device_setup.sh && python3 benchmarks/bench_distill_gpu.py --device cuda   # the GPU run
    python benchmarks/bench_distill_gpu.py --device cpu --tiny                                     # the same path, tiny, on a CPU

Three parts, each on the same machine in the same run, with a wall-clock budget (`--budget-s`:
a part that would start after its share of the budget is skipped and says so):

A. grid:case14: synthetic fossils; the EBDM teacher trained on the device first (hidden 256,
   depth 4); then the ternary student distilled (`ml.distill.distill_ebdm`) on the device
   with a monitor every `--every` steps: the student's held-out DSM over the teacher's (the
   same fixed noise, `ml.ebdm.heldout_dsm`) and its energy rank correlation. Reported:
   teacher and student samples/s, and the student's training time (monitor excluded) to
   reach held-out DSM <= 1.02x the teacher's, and to reach that with rank correlation >= 0.98.
B. Decisions on case14, PAIRED (`ml.distill.paired_decisions`): teacher and student sample
   with the same noise on `--decisions` contexts (the held-out split, then fresh draws of
   the synthesiser, seed 12345) on the device, repaired and measured against the exact
   optimum on the CPU; the differences of gap and savings captured with their 95 %
   intervals; and, time allowing, the teacher against itself with another seed (unpaired:
   the sampler's own spread).
C. grid:case118 at hidden `--wide` (default 512, depth 4): the ternary share there (the
   goal >= 90 %; 89.5 % at hidden 256), what stays in full precision, and whether the
   student still meets DSM <= 1.02x and rank correlation >= 0.98.
R. grid:case118 (`--recipes-domain`) at hidden `--wide`, recipes compared (`--variants`): one teacher trained on
   the device, then each variant distilled from it in its own process (`--parallel` at
   once on the one device; the same fossils, held-out states and monitor), its curve of
   DSM ratio and rank correlation over training, then judged (`ml.distill.compare_ebdm`:
   also the rank correlation at noisy points of every level), its ternary share and its
   2-bit file over the teacher's fp32 file. The rank correlation is the one parts A and C
   report: Spearman of the student's energies against the teacher's at σ_min over the
   first 512 held-out clean states (each with its own context: pooled, not per context).
   A variant is `name` or `name:key=value,key=value` (DistillConfig fields; `batch_size`).

    python3 benchmarks/bench_distill_gpu.py --parts R --variants "old;rank:rank_weight=1" --device cuda

D. grid:case118's students' decisions, PAIRED with their teacher's: the teacher and the
   students of `--d-variants` (part R's syntax; default: the default recipe alone; several are
   distilled at once in parallel processes), each as in part R (judged, written as its 2-bit
   file and read back: that file decides), then `--decisions` contexts (the held-out split,
   then fresh draws of the synthesiser) sampled on the device by the teacher and every
   student with the same noise, `--decision-batch` at once, while a pool of `--processes` - 2
   CPU processes makes the contexts and their exact optimum (HiGHS; started while the device
   trains) and repairs and measures each chunk's decisions (`ml.distill.decision_outcome`).
   Reported as part B, per student: the paired differences of gap and savings captured with
   95 % intervals (`ml.distill.paired_summary`), the one-sided no-worse-by-0.1 pp verdicts,
   feasibility and repair fallbacks; and on the first `--noise-decisions` contexts the teacher
   against itself (unpaired). Budget-aware: no chunk starts that cannot be measured before
   93 % of `--budget-s` (where a whole chunk would not fit, a half, down to 1024 contexts;
   the estimate: 1.5× the slowest chunk's seconds per context and model run, 1.2 ms before
   the first); distillation stops at `--distill-share` of it. A student's figures
   are keyed `d118_<name>_paired_*` and `d118_student_<name>`; the variant named `default`
   also as `d118_paired_*` and `d118_student` (the keys before variants).

    python3 benchmarks/bench_distill_gpu.py --parts D --device cuda --fossils-118 5000 --teacher-steps 1200 --steps-118 2500 --decisions 65536 --budget-s 450   # .gpu/case118d.cmd
    python3 benchmarks/bench_distill_gpu.py --parts D --d-variants "default;chain:chain=0.25" ...   # on-policy matching: .gpu/case118e.cmd

Prints each number as it comes and one JSON line at the end; writes the JSON to
$OUT/ternary.json (or `--json`) after every part.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class OutOfTime(Exception):
    pass


DEFAULT_VARIANTS = "old;rank:rank_weight=1;rank_ema:rank_weight=1,ema=0.998;rank_ema_b1024:rank_weight=1,ema=0.998,batch_size=1024;old_b1024:batch_size=1024"


def parse_variants(text: str) -> list[tuple[str, dict]]:
    """`name` or `name:key=value,key=value` separated by `;` -> [(name, DistillConfig overrides)]."""
    from scf.ml.distill import DistillConfig

    fields = {f for f in DistillConfig.__dataclass_fields__}
    out = []
    extra = {"more": int}  # more=1: also the `--more-118` fresh fossils of another seed (unlabelled contexts: the teacher never saw them)
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, kv = part.partition(":")
        over = {}
        for item in filter(None, kv.split(",")):
            k, _, v = item.partition("=")
            if k not in fields and k not in extra:
                raise SystemExit(f"variant {name}: {k!r} is not a DistillConfig field (one of {sorted(fields)}) nor one of {sorted(extra)}")
            kind = extra.get(k) or type(getattr(DistillConfig, k))
            if kind is bool:  # bool("false") is True
                if v.lower() not in ("true", "false", "1", "0"):
                    raise SystemExit(f"variant {name}: {k}={v!r} is not true or false")
                over[k] = v.lower() in ("true", "1")
            else:
                over[k] = kind(v)
        out.append((name, over))
    if len({n for n, _ in out}) != len(out):
        raise SystemExit(f"variant names must differ: {text}")
    return out


def run_variant(job: dict) -> dict:
    """One recipe of part R, in its own process: distil the teacher at job["teacher"] on the
    fossils at job["data"] with a monitor every job["every"] steps until job["deadline"]
    (wall clock), then judge it. Returns its row."""
    import copy
    import dataclasses

    import numpy as np
    import torch

    torch.set_num_threads(job["threads"])
    from scf.ml.checkpoint import load_checkpoint, save_checkpoint
    from scf.ml.distill import DistillConfig, _spearman, compare_ebdm, distill_ebdm, export_student
    from scf.ml.ebdm import heldout_dsm
    from scf.ml.loader import load_arrays
    from scf.ml.ternary import bit_layers, freeze, precision_counts

    dev = torch.device(job["device"])
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    teacher, _ = load_checkpoint(job["teacher"])
    x, c, _ = load_arrays(job["data"], domain=job["domain"], split="train", seed=0)
    overrides = dict(job["overrides"])
    if overrides.pop("more", 0):
        mx, mc, _ = load_arrays(job["more"], domain=job["domain"], seed=0)  # every fresh fossil: none is in the judged held-out set
        x, c = np.concatenate([x, mx]), np.concatenate([c, mc])
    hx, hc, he = load_arrays(job["data"], domain=job["domain"], split="heldout", seed=0)
    hxt, hct = torch.as_tensor(hx[:512], dtype=torch.float32, device=dev), torch.as_tensor(hc[:512], dtype=torch.float32, device=dev)
    xs = torch.as_tensor(x[:512], dtype=torch.float32, device=dev)  # training states: is a rank gap a generalisation gap?
    cs = torch.as_tensor(c[:512], dtype=torch.float32, device=dev)
    teacher.to(dev)
    t_dsm = heldout_dsm(teacher, hxt, hct, seed=0)
    z, cz = teacher.normalise(hxt), teacher.normalise_context(hct)
    _, e_t = teacher.score(z, cz, teacher.config.sigma_min)
    zs, czs = teacher.normalise(xs), teacher.normalise_context(cs)
    _, e_t_train = teacher.score(zs, czs, teacher.config.sigma_min)
    teacher.cpu()
    cfg = dataclasses.replace(DistillConfig(steps=job["steps"], batch_size=job["batch"], device=job["device"], log_every=job["every"],
                                            seed=job.get("seed", 0)), **overrides)  # fmt: skip
    row = {"variant": job["name"], "config": dataclasses.asdict(cfg), "fossils": len(x), "curve": []}
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # the optimiser's first use imports torch._dynamo: not in the clock
    clock = {"t": 0.0, "last": time.perf_counter(), "student": None}

    def monitor(step, student):
        sync()
        clock["t"] += time.perf_counter() - clock["last"]
        clock["student"] = student
        was = student.training
        student.eval()
        ratio = heldout_dsm(student, hxt, hct, seed=0) / t_dsm
        _, e_s = student.score(z, cz, teacher.config.sigma_min)
        rho = _spearman(e_s.detach().cpu(), e_t.detach().cpu())
        _, e_s_train = student.score(zs, czs, teacher.config.sigma_min)
        rho_train = _spearman(e_s_train.detach().cpu(), e_t_train.detach().cpu())
        student.train(was)
        row["curve"].append({"step": step, "dsm_ratio": ratio, "rank_corr": rho, "rank_corr_train": rho_train, "train_s": clock["t"]})
        print(f"  [{job['name']}] step {step:5d}: DSM ratio {ratio:.4f}, rank corr {rho:.4f} (training states {rho_train:.4f}), "
              f"{clock['t']:.1f}s", flush=True)  # fmt: skip
        if time.time() > job["deadline"] and step < cfg.steps:
            raise OutOfTime(f"{job['name']}: stopped at step {step} by the run's deadline")
        sync()
        clock["last"] = time.perf_counter()

    try:
        student, stats = distill_ebdm(teacher, x, c, cfg, monitor=monitor)
        row.update(train_s=stats["train_seconds"], samples_per_s=stats["samples_per_s"], steps_done=cfg.steps, chain_s=stats["chain_seconds"])
    except OutOfTime as exc:  # judged as it stands (unfrozen weights frozen in a copy)
        row["stopped"] = str(exc)
        student = copy.deepcopy(clock["student"]).eval()
        freeze(student)
        done = row["curve"][-1]["step"]
        row.update(train_s=clock["t"], samples_per_s=done * cfg.batch_size / max(clock["t"], 1e-9), steps_done=done)
    m = compare_ebdm(teacher.to(dev), student.to(dev), hx[:512], hc[:512], he[:512])
    teacher.cpu(), student.cpu()
    row["final"] = {k: v for k, v in m.items() if not k.startswith("teacher_")}
    row["teacher_heldout_dsm"] = m["teacher_heldout_dsm"]
    row["precision_counts"] = precision_counts(student)
    path = Path(job["work"]) / f"student-{job['name']}.safetensors"
    if bit_layers(student):
        export_student(path, student, kind="ebdm", config=dataclasses.asdict(teacher.config), packing="2bit", lineage={}, metrics={})
    else:  # a full-precision diagnostic (ternary=false) is no student file: written as an EBDM checkpoint
        save_checkpoint(path, student, lineage={}, metrics={})
        row["full_precision"] = True
    row["file_bytes"], row["teacher_file_bytes"] = os.path.getsize(path), os.path.getsize(job["teacher"])
    row["file_ratio"] = row["file_bytes"] / row["teacher_file_bytes"]
    hit = next((p for p in row["curve"] if p["dsm_ratio"] <= 1.02), None)
    both = next((p for p in row["curve"] if p["dsm_ratio"] <= 1.02 and p["rank_corr"] >= 0.98), None)
    row["to_dsm_target_step"], row["to_both_targets_step"] = (hit or {}).get("step", math.nan), (both or {}).get("step", math.nan)
    row["to_both_targets_s"] = (both or {}).get("train_s", math.nan)
    return row


def compare_recipes(args, row: dict, work: Path, save, elapsed, started_wall: float) -> None:
    """Part R: one case118 teacher, every variant distilled from it (see the module's docstring)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from scf.domains.fossils import synth_shards
    from scf.ml.loader import load_arrays
    from scf.ml.train import train_local

    variants = parse_variants(args.variants)
    domain, hidden, depth = args.recipes_domain, 16 if args.tiny else args.wide, 2 if args.tiny else 4
    prefix = "recipes"
    t0 = time.perf_counter()
    data = work / prefix / "fossils"
    n = args.fossils_118
    synth_shards(domain, n, data, seed=args.seed, shard_size=max(1, -(-n // args.processes)), processes=args.processes)
    x, _, _ = load_arrays(data, domain=domain, split="train", seed=0)
    hx, _, _ = load_arrays(data, domain=domain, split="heldout", seed=0)
    more = work / prefix / "more"
    if any(over.get("more") for _, over in variants):
        synth_shards(domain, args.more_118, more, seed=1, shard_size=max(1, -(-args.more_118 // args.processes)), processes=args.processes)
    row[f"{prefix}_train"], row[f"{prefix}_heldout"], row[f"{prefix}_synth_s"] = len(x), len(hx), time.perf_counter() - t0
    save(f"{prefix}: {n} fossils of {domain} ({len(x)} train, {len(hx)} held-out, {min(512, len(hx))} judged) in {row[f'{prefix}_synth_s']:.1f}s")
    t0 = time.perf_counter()
    res = train_local(domain, data, work / prefix, steps=args.teacher_steps, batch_size=256, device=args.device, hidden=hidden, depth=depth,
                      eval_records=32, seed=args.seed)  # fmt: skip
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    row[f"{prefix}_teacher_train_s"] = time.perf_counter() - t0
    save(f"{prefix}: teacher hidden {hidden} depth {depth}, {args.teacher_steps} steps in {row[f'{prefix}_teacher_train_s']:.1f}s")
    steps = args.steps_118 or args.steps
    deadline = started_wall + 0.93 * args.budget_s - (5 if args.tiny else 25)  # room to judge and write after the last monitor
    jobs = [{"name": name, "overrides": over, "teacher": str(res.checkpoint), "data": str(data), "more": str(more), "domain": domain, "device": args.device,
             "steps": steps, "batch": args.batch, "every": 10 if args.tiny else args.every_118, "deadline": deadline, "work": str(work / prefix),
             "threads": 1 if args.device == "cpu" else 2, "seed": args.seed} for name, over in variants]  # fmt: skip
    row[f"{prefix}_variants"] = {name: over for name, over in variants}
    results: dict[str, dict] = {}
    workers = min(len(jobs), args.parallel or len(jobs))
    save(f"{prefix}: {len(jobs)} variants, {workers} at once, {steps} steps each, deadline in {deadline - time.time():.0f}s")
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_variant, job): job["name"] for job in jobs}
        for fut, name in futures.items():
            try:
                results[name] = fut.result()
            except Exception as exc:  # noqa: BLE001 - one broken variant does not lose the others
                results[name] = {"variant": name, "error": f"{type(exc).__name__}: {exc}", "traceback": str(exc.__cause__ or "")[-3000:]}
            r = results[name]
            row[f"{prefix}_{name}"] = r
            if "error" in r:
                save(f"{prefix} [{name}]: failed: {r['error']}")
                continue
            f = r["final"]
            save(f"{prefix} [{name}]: {r['steps_done']} steps, {r['samples_per_s']:.0f} samples/s; final DSM {f['dsm_ratio']:.4f}x, rank corr "
                 f"{f['energy_rank_corr']:.4f} (noisy levels {f['energy_rank_corr_noisy']:.4f}), ternary {100 * f['ternary_share']:.2f} %, "
                 f"file {r['file_ratio']:.4f}x fp32; both targets at step {r['to_both_targets_step']}" + (f"; {r['stopped']}" if "stopped" in r else ""))  # fmt: skip
    print(f"{'variant':>18} {'steps':>6} {'DSM ratio':>9} {'rank':>7} {'rank noisy':>10} {'ternary':>8} {'file':>7}")
    for name, r in results.items():
        if "error" not in r:
            f = r["final"]
            print(f"{name:>18} {r['steps_done']:>6} {f['dsm_ratio']:>9.4f} {f['energy_rank_corr']:>7.4f} {f['energy_rank_corr_noisy']:>10.4f} "
                  f"{100 * f['ternary_share']:>7.2f}% {r['file_ratio']:>7.4f}")  # fmt: skip


_DOMAINS: dict = {}


def _domain(name: str):
    if name not in _DOMAINS:
        from scf import domains

        _DOMAINS[name] = domains.get(name)
    return _DOMAINS[name]


def _held_out_job(domain_name: str, x, c) -> tuple:
    """Part D, in a worker: the exact optimum's costs of held-out contexts c (HiGHS)."""
    from scf.domains.quality import optimum_costs

    return x, c, optimum_costs(_domain(domain_name), c)[1]


def _fresh_job(domain_name: str, seed: int, first: int, n: int) -> tuple:
    """Part D, in a worker: n fresh synthesiser draws (generator (seed, first), indices from
    `first`) as (status quo states, contexts, the exact optimum's costs)."""
    import numpy as np

    from scf.domains.quality import optimum_costs

    d = _domain(domain_name)
    fresh = d.synthesize(np.random.default_rng([seed, first]), n, first_index=first)
    c = np.stack([f.context for f in fresh])
    return np.stack([f.state for f in fresh]), c, optimum_costs(d, c)[1]


def _outcome_job(domain_name: str, c, x, samples, optimum) -> tuple:
    """Part D, in a worker: sampled decisions repaired and measured (`ml.distill.decision_outcome`)."""
    from scf.ml.distill import decision_outcome

    t0 = time.perf_counter()
    q, fallback = decision_outcome(_domain(domain_name), c, x, samples, optimum)
    return q, fallback, time.perf_counter() - t0


def paired_decisions_118(args, row: dict, work: Path, save, started_wall: float) -> None:
    """Part D: a case118 teacher, the default-recipe student distilled from it (`run_variant`,
    judged and written as the 2-bit file, which is what decides here), then PAIRED decisions on
    up to `--decisions` contexts: the held-out split, then fresh synthesiser draws (generator
    (12345, first index), made in worker processes while the GPU trains). Teacher and student
    sample chunk by chunk (`--decision-batch` contexts, generator seed = chunk index, the same
    noise for both) on the device; repair and measure run in the same process pool, so chunk
    k+1 samples while chunk k is measured. Within the first `--noise-decisions` contexts the
    teacher also samples with another seed (unpaired: the sampler's own spread). The loop
    starts no chunk it cannot finish before 93 % of the budget; what is done is summarised
    (`ml.distill.paired_summary`) and saved after every chunk."""
    import multiprocessing as mp
    import threading
    from concurrent.futures import ProcessPoolExecutor, wait

    import numpy as np
    import torch

    from scf.domains.fossils import synth_shards
    from scf.ml.checkpoint import load_checkpoint
    from scf.ml.distill import _sample_decisions, join_outcomes, load_student, paired_summary
    from scf.ml.loader import load_arrays
    from scf.ml.train import train_local

    domain_name, hidden, depth, prefix = args.recipes_domain, 16 if args.tiny else args.wide, 2 if args.tiny else 4, "d118"
    variants = parse_variants(args.d_variants)
    if {"teacher", "noise"} & {name for name, _ in variants}:
        raise SystemExit(f"--d-variants {args.d_variants!r}: 'teacher' and 'noise' name the teacher's runs; call the students otherwise")
    row[f"{prefix}_variants"] = {name: over for name, over in variants}
    deadline = started_wall + 0.93 * args.budget_s - (3 if args.tiny else 10)  # room to summarise and write
    t0 = time.perf_counter()
    data, n = work / prefix / "fossils", args.fossils_118
    synth_shards(domain_name, n, data, seed=args.seed, shard_size=max(1, -(-n // args.processes)), processes=args.processes)
    hx, hc, _ = load_arrays(data, domain=domain_name, split="heldout", seed=0)
    row[f"{prefix}_heldout"], row[f"{prefix}_synth_s"] = len(hx), time.perf_counter() - t0
    save(f"{prefix}: {n} fossils of {domain_name} ({len(hx)} held-out) in {row[f'{prefix}_synth_s']:.1f}s")

    # contexts and their optimum, in workers, while the device trains: held-out first, then fresh draws
    workers = max(1, args.processes - 2)  # the main process drives the device
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
    job = 8 if args.tiny else 64  # contexts per job
    hx, hc = hx[: args.decisions].astype(float), hc[: args.decisions].astype(float)
    ctx_futures = [pool.submit(_held_out_job, domain_name, hx[i : i + job], hc[i : i + job]) for i in range(0, len(hx), job)]
    fresh = [(first, min(job, args.decisions - len(hx) - first)) for first in range(0, max(0, args.decisions - len(hx)), job)]
    lock, stop = threading.Lock(), threading.Event()

    def feed():  # at most 2 jobs a worker waiting: a chunk's repair jobs never queue behind every context job
        for first, k in fresh:
            while not stop.is_set() and time.time() < deadline - (5 if args.tiny else 40):  # none made that no chunk could use
                with lock:
                    waiting = sum(not f.done() for f in ctx_futures)
                if waiting < 2 * workers:
                    break
                time.sleep(0.05)
            if stop.is_set() or time.time() >= deadline - (5 if args.tiny else 40):
                return
            with lock:
                ctx_futures.append(pool.submit(_fresh_job, domain_name, 12345, first, k))

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        t0 = time.perf_counter()
        res = train_local(domain_name, data, work / prefix, steps=args.teacher_steps, batch_size=256, device=args.device, hidden=hidden, depth=depth,
                          eval_records=32, seed=args.seed)  # fmt: skip
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        row[f"{prefix}_teacher_train_s"] = time.perf_counter() - t0
        save(f"{prefix}: teacher hidden {hidden} depth {depth}, {args.teacher_steps} steps in {row[f'{prefix}_teacher_train_s']:.1f}s")
        steps = args.steps_118 or args.steps
        distill_deadline = started_wall + args.distill_share * args.budget_s
        base = {"teacher": str(res.checkpoint), "data": str(data), "more": "", "domain": domain_name, "device": args.device, "steps": steps,
                "batch": args.batch, "every": 10 if args.tiny else args.every_118, "deadline": distill_deadline, "work": str(work / prefix),
                "threads": 1 if args.device == "cpu" else 2, "seed": args.seed}  # fmt: skip
        jobs = [{**base, "name": name, "overrides": over} for name, over in variants]
        results: dict[str, dict] = {}
        if len(jobs) == 1:
            results[jobs[0]["name"]] = run_variant(jobs[0])
        else:  # at once, each in its own process on the one device (as part R)
            with ProcessPoolExecutor(max_workers=len(jobs), mp_context=mp.get_context("spawn")) as vpool:
                futures = {j["name"]: vpool.submit(run_variant, j) for j in jobs}
                for name, fu in futures.items():
                    try:
                        results[name] = fu.result()
                    except Exception as exc:  # noqa: BLE001 - one broken variant does not lose the others
                        results[name] = {"variant": name, "error": f"{type(exc).__name__}: {exc}"}
        students = {}
        for name, r in results.items():
            row[f"{prefix}_student_{name}"] = r
            if name == "default":
                row[f"{prefix}_student"] = r
            if "error" in r:
                save(f"{prefix} [{name}]: failed: {r['error']}")
                continue
            f = r["final"]
            save(f"{prefix} [{name}]: student {r['steps_done']} steps, {r['samples_per_s']:.0f} samples/s (sampler pool {r.get('chain_s', 0):.1f}s of it); "
                 f"DSM {f['dsm_ratio']:.4f}x, rank corr {f['energy_rank_corr']:.4f} (noisy {f['energy_rank_corr_noisy']:.4f}), ternary "
                 f"{100 * f['ternary_share']:.2f} %, file {r['file_ratio']:.4f}x fp32" + (f"; {r['stopped']}" if "stopped" in r else ""))  # fmt: skip
            spath = Path(work / prefix) / f"student-{name}.safetensors"  # the 2-bit file: what would be deployed
            students[name] = (load_checkpoint(spath) if r.get("full_precision") else load_student(spath))[0]
        with lock:
            row[f"{prefix}_context_jobs_done_at_decisions"] = f"{sum(f.done() for f in ctx_futures)} of {len(ctx_futures)} submitted ({job} contexts a job)"
        teacher, _ = load_checkpoint(res.checkpoint)
        row[f"{prefix}_student_from"] = "its 2-bit file (ml.distill.load_student)"
        dom = _domain(domain_name)

        # the chunk loop: sample on the device, measure in the pool
        chunk = 48 if args.tiny else args.decision_batch
        got: dict[str, list] = {"teacher": [], **{name: [] for name in students}, "noise": []}  # futures of pieces, in context order
        noise_pieces = 0  # the teacher's first pieces that the noise run pairs with
        left: list[tuple] = []  # contexts made but not sampled yet
        nxt, taken, sample_s = 0, 0, []
        t_dec = time.perf_counter()

        def ok(fu) -> bool:
            if not fu.done() or fu.cancelled():
                return False
            if fu.exception() is not None:
                errors, msg = row.setdefault(f"{prefix}_job_errors", []), f"{type(fu.exception()).__name__}: {fu.exception()}"
                if msg not in errors:
                    errors.append(msg)
                return False
            return True

        def in_order(a: list, b: list) -> tuple[list, list]:
            pa, pb = [], []
            for fa, fb in zip(a, b):
                if not (ok(fa) and ok(fb)):
                    break  # in order: the contexts that both have done
                pa.append(fa.result()[:2]), pb.append(fb.result()[:2])
            return pa, pb

        def summarise(final: bool) -> None:
            busy, n_teacher, n_models = [], 0, 1
            for name in students:
                pt, ps = in_order(got["teacher"], got[name])
                if not pt:
                    continue
                p = paired_summary(join_outcomes(pt), join_outcomes(ps))
                row.update({f"{prefix}_{name}_paired_{k}": v for k, v in p.items()})
                if name == "default":
                    row.update({f"{prefix}_paired_{k}": v for k, v in p.items()})
                busy += [fu.result()[2] for fu in got[name][: len(ps)]]
                n_teacher, n_models = max(n_teacher, len(pt)), n_models + 1
                row[f"{prefix}_decisions_s"] = time.perf_counter() - t_dec
                save(f"{prefix} [{name}]: paired decisions on {p['contexts']:.0f} contexts ({p['paired_contexts']:.0f} paired): gap {p['gap_diff_pp']:+.3f} pp "
                     f"[{p['gap_diff_low_pp']:+.3f}, {p['gap_diff_high_pp']:+.3f}] ({p['gap_verdict']}); savings {p['savings_diff_pp']:+.3f} pp "
                     f"[{p['savings_diff_low_pp']:+.3f}, {p['savings_diff_high_pp']:+.3f}] ({p['savings_verdict']}); no worse by 0.1 pp: gap "
                     f"{p['gap_no_worse']}, savings {p['savings_no_worse']}; gap {100 * p['decision_gap_mean']:.3f} % vs teacher "
                     f"{100 * p['teacher_decision_gap_mean']:.3f} %; savings captured {100 * p['decision_savings_captured']:.2f} % vs "
                     f"{100 * p['teacher_decision_savings_captured']:.2f} %; feasible {100 * p['decision_feasible']:.2f} % / "
                     f"{100 * p['teacher_decision_feasible']:.2f} %; fallbacks {100 * p['decision_repair_fallback']:.2f} % / "
                     f"{100 * p['teacher_decision_repair_fallback']:.2f} %; identical {100 * p['identical_decisions']:.1f} %; "
                     f"per-context sd {p['gap_diff_sd_pp']:.3f} pp")  # fmt: skip
            if busy:  # each model's pieces measured: the repair and measure time per context and model
                busy += [fu.result()[2] for fu in got["teacher"][:n_teacher]]
                row[f"{prefix}_repair_measure_s_per_context"] = sum(busy) / max(1, n_models * p["contexts"])
            pa, pb = in_order(got["teacher"][:noise_pieces], got["noise"])
            if final and pa:
                q = paired_summary(join_outcomes(pa), join_outcomes(pb))
                row.update({f"{prefix}_noise_{k}": v for k, v in q.items()})
                save(f"{prefix}: the teacher against itself, seed +{NOISE_SEED} (unpaired) on {q['contexts']:.0f} contexts: gap {q['gap_diff_pp']:+.3f} pp "
                     f"[{q['gap_diff_low_pp']:+.3f}, {q['gap_diff_high_pp']:+.3f}], per-context sd {q['gap_diff_sd_pp']:.3f} pp; savings "
                     f"{q['savings_diff_pp']:+.3f} pp [{q['savings_diff_low_pp']:+.3f}, {q['savings_diff_high_pp']:+.3f}]")  # fmt: skip

        rate: list[float] = []  # sampling seconds per context and model run, chunk by chunk
        min_chunk, n_chunk = (8 if args.tiny else 1024), 0
        while taken < args.decisions:
            runs_n = 1 + len(students) + (taken < args.noise_decisions)
            per = max(rate) if rate else 0.0 if args.tiny else 1.2e-3  # before any chunk: 1.2 ms a context and model run (H200, hidden 512: 0.4-0.6)
            need = min(chunk, args.decisions - taken)
            while need > min_chunk and time.time() + 1.5 * per * need * runs_n + (2 if args.tiny else 12) > deadline:
                need = max(min_chunk, need // 2)  # a smaller chunk where a whole one would not fit (the first one with several students)
            est = 1.5 * per * need * runs_n + (2 if args.tiny else 12)  # sampling and the last pieces' measuring
            have = sum(len(c_) for _, c_, _ in left)
            while have < need and time.time() + est < deadline:
                with lock:
                    fut = ctx_futures[nxt] if nxt < len(ctx_futures) else None
                if fut is None:
                    time.sleep(0.05)
                    continue
                try:
                    left.append(fut.result(timeout=max(0.0, deadline - est - time.time())))
                except TimeoutError:
                    break
                nxt += 1
                have += len(left[-1][1])
            no_time = time.time() + est > deadline
            if have < need or no_time:
                row[f"{prefix}_stopped"] = (f"decisions stopped after {taken} contexts ({'no time for another chunk' if no_time else 'contexts not ready'}): "
                                            f"{time.time() - started_wall:.0f}s of the {args.budget_s:.0f}s budget gone; the next chunk {need} contexts "
                                            f"x {runs_n} models, estimated {est:.0f}s")  # fmt: skip
                save(f"{prefix}: {row[f'{prefix}_stopped']}")
                break
            bx, bc, bo = (np.concatenate([part[i] for part in left]) for i in range(3))
            cx, cc, co = bx[:need], bc[:need], bo[:need]
            left = [(bx[need:], bc[need:], bo[need:])]
            t1 = time.perf_counter()
            seed, n_chunk = n_chunk, n_chunk + 1  # the chunk's index: teacher and students draw the same noise
            runs = [("teacher", teacher, seed)] + [(name, m_, seed) for name, m_ in students.items()]
            runs += [("noise", teacher, NOISE_SEED + seed)] if taken < args.noise_decisions else []
            piece = max(1, -(-len(cc) // workers))
            for name, model, s_ in runs:
                samples = _sample_decisions(model, dom, cc, seed=s_, batch=len(cc), device=args.device)
                got[name].extend(pool.submit(_outcome_job, domain_name, cc[i : i + piece], cx[i : i + piece], samples[i : i + piece], co[i : i + piece])
                                 for i in range(0, len(cc), piece))  # fmt: skip
            if runs[-1][0] == "noise":
                noise_pieces = len(got["noise"])
            sample_s.append(time.perf_counter() - t1)
            rate.append(sample_s[-1] / (len(cc) * len(runs)))
            taken += len(cc)
            row[f"{prefix}_sample_s"] = sample_s
            summarise(final=False)
        else:
            row[f"{prefix}_stopped"] = f"all {taken} contexts sampled"
        stop.set()
        pending = [fu for fus in got.values() for fu in fus if not fu.done()]
        wait(pending, timeout=max(0.0, deadline - time.time()))
        row[f"{prefix}_unfinished_pieces"] = sum(not fu.done() for fus in got.values() for fu in fus)
        summarise(final=True)
    finally:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)


NOISE_SEED = 100_000  # the teacher's other seed (unpaired), added to the chunk index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a few steps at tiny sizes: test the path on a CPU")
    ap.add_argument("--fossils", type=int, default=20000)
    ap.add_argument("--teacher-steps", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=1500, help="distillation steps")
    ap.add_argument("--every", type=int, default=100, help="monitor every N distillation steps")
    ap.add_argument("--wide", type=int, default=512, help="case118 hidden width (part B; 0: skip)")
    ap.add_argument("--fossils-118", type=int, default=8000)
    ap.add_argument("--decisions", type=int, default=2048, help="contexts for the paired decisions (parts B and D; 0: skip)")
    ap.add_argument("--budget-s", type=float, default=145.0, help="wall-clock budget of the whole run")
    ap.add_argument("--processes", type=int, default=min(16, os.cpu_count() or 1), help="processes for synthesising fossils")
    ap.add_argument("--parts", default="ABC", help="which parts to run (B needs A)")
    ap.add_argument("--every-118", type=int, default=500, help="monitor case118's student every N steps")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--anchor-weight", type=float, default=None, help="DistillConfig.anchor_weight (default: the config's)")
    ap.add_argument("--batch", type=int, default=256, help="distillation batch size")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="part R: recipes compared, `;`-separated")
    ap.add_argument("--recipes-domain", default="grid:case118", help="part R: the domain (hidden --wide, depth 4)")
    ap.add_argument("--parallel", type=int, default=0, help="part R: variants distilled at once (0: all)")
    ap.add_argument("--more-118", type=int, default=15000, help="part R: fresh fossils (seed 1) for variants with more=1")
    ap.add_argument("--steps-118", type=int, default=0, help="parts R and D: distillation steps per variant (0: --steps)")
    ap.add_argument("--distill-share", type=float, default=0.6, help="part D: the student's distillation stops at this share of the budget")
    ap.add_argument("--decision-batch", type=int, default=4096, help="part D: contexts sampled at once (one generator seed each chunk)")
    ap.add_argument("--d-variants", default="default", help="part D: the students judged (part R's variant syntax; distilled at once)")
    ap.add_argument("--noise-decisions", type=int, default=8192, help="part D: contexts on which the teacher also samples with another seed")
    ap.add_argument("--seed", type=int, default=0, help="parts R and D: the fossils', the teacher's and the students' seed (a variant may set its own)")
    args = ap.parse_args()
    if args.tiny:
        args.fossils, args.teacher_steps, args.steps, args.every = 1600, 30, 20, 10
        args.fossils_118, args.decisions, args.more_118, args.steps_118 = 600, 120, 300, 0
        args.noise_decisions = min(args.noise_decisions, 48)
    out_json = args.json or Path(os.environ.get("OUT", tempfile.gettempdir())) / "ternary.json"
    started = time.perf_counter()

    import numpy as np
    import torch

    if args.device == "cpu":
        torch.set_num_threads(1)  # a shared CPU: one thread each, no spinning OpenMP workers

    from scf import domains
    from scf.domains.fossils import synth_shards
    from scf.domains.quality import optimum_costs
    from scf.ml.checkpoint import load_checkpoint
    from scf.ml.distill import DistillConfig, _spearman, compare_ebdm, distill_ebdm, paired_decisions
    from scf.ml.ebdm import heldout_dsm
    from scf.ml.loader import load_arrays
    from scf.ml.ternary import precision_counts
    from scf.ml.train import train_local

    row: dict = {"device": args.device, "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
                 "torch": torch.__version__, "tiny": args.tiny}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="scf-distill-gpu-"))

    def elapsed() -> float:
        return time.perf_counter() - started

    def save(note: str) -> None:
        row["elapsed_s"] = elapsed()
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(row, indent=1, default=float))
        print(f"[{elapsed():6.1f}s] {note}", flush=True)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def teacher_and_student(domain_name: str, n: int, hidden: int, depth: int, prefix: str, monitor_every: int):
        t0 = time.perf_counter()
        data = work / prefix / "fossils"
        synth_shards(domain_name, n, data, seed=0, shard_size=max(1, -(-n // args.processes)), processes=args.processes)
        x, c, _ = load_arrays(data, domain=domain_name, split="train", seed=0)
        hx, hc, he = load_arrays(data, domain=domain_name, split="heldout", seed=0)
        row[f"{prefix}_synth_s"] = time.perf_counter() - t0
        row[f"{prefix}_train"], row[f"{prefix}_heldout"] = len(x), len(hx)
        save(f"{prefix}: {n} fossils of {domain_name} ({len(x)} train, {len(hx)} held-out) in {row[f'{prefix}_synth_s']:.1f}s")
        sync()
        t0 = time.perf_counter()
        res = train_local(domain_name, data, work / prefix, steps=args.teacher_steps, batch_size=256, device=args.device,
                          hidden=hidden, depth=depth, eval_records=32)  # fmt: skip
        sync()
        row[f"{prefix}_teacher_train_s"] = time.perf_counter() - t0
        row[f"{prefix}_teacher_samples_per_s"] = args.teacher_steps * 256 / row[f"{prefix}_teacher_train_s"]
        save(f"{prefix}: teacher hidden {hidden} depth {depth}, {args.teacher_steps} steps in {row[f'{prefix}_teacher_train_s']:.1f}s "
             f"({row[f'{prefix}_teacher_samples_per_s']:.0f} samples/s, with its own evaluation)")  # fmt: skip
        teacher, _ = load_checkpoint(res.checkpoint)
        dev = torch.device(args.device)
        hxt, hct = torch.as_tensor(hx[:512], dtype=torch.float32, device=dev), torch.as_tensor(hc[:512], dtype=torch.float32, device=dev)
        teacher.to(dev)
        t_dsm = heldout_dsm(teacher, hxt, hct, seed=0)
        z, cz = teacher.normalise(hxt), teacher.normalise_context(hct)
        _, e_t = teacher.score(z, cz, teacher.config.sigma_min)
        teacher.cpu()
        curve = []
        train_clock = {"t": 0.0, "last": time.perf_counter()}

        def monitor(step, student):
            was = student.training
            student.eval()
            ratio = heldout_dsm(student, hxt, hct, seed=0) / t_dsm
            _, e_s = student.score(z, cz, teacher.config.sigma_min)
            rho = _spearman(e_s.detach().cpu(), e_t.detach().cpu())
            student.train(was)
            curve.append({"step": step, "dsm_ratio": ratio, "rank_corr": rho})

        def timed_monitor(step, student):  # the training time (monitor excluded) at each point of the curve
            sync()
            if elapsed() > 0.92 * args.budget_s and step < args.steps:  # the last step is evaluated whatever the time
                raise OutOfTime(f"{prefix}: distillation stopped at step {step}: {elapsed():.0f}s of the {args.budget_s:.0f}s budget gone")
            train_clock["t"] += time.perf_counter() - train_clock["last"]
            monitor(step, student)
            curve[-1]["train_s"] = train_clock["t"]
            sync()
            train_clock["last"] = time.perf_counter()

        cfg = DistillConfig(steps=args.steps, batch_size=args.batch, device=args.device, log_every=monitor_every)
        if args.anchor_weight is not None:
            cfg.anchor_weight = args.anchor_weight
        row[f"{prefix}_distill_config"] = {"anchor_weight": cfg.anchor_weight, "batch_size": cfg.batch_size, "steps": cfg.steps, "lr": cfg.lr}
        train_clock["last"] = time.perf_counter()
        try:
            student, stats = distill_ebdm(teacher, x, c, cfg, monitor=timed_monitor)
        except OutOfTime as exc:
            row[f"{prefix}_curve"], row[f"{prefix}_stopped"] = curve, str(exc)
            save(str(exc))
            return None
        row[f"{prefix}_distill_s"], row[f"{prefix}_distill_samples_per_s"] = stats["train_seconds"], stats["samples_per_s"]
        row[f"{prefix}_curve"] = curve
        hit = next((p for p in curve if p["dsm_ratio"] <= 1.02), None)
        both = next((p for p in curve if p["dsm_ratio"] <= 1.02 and p["rank_corr"] >= 0.98), None)
        row[f"{prefix}_to_dsm_target_s"] = hit["train_s"] if hit else math.nan
        row[f"{prefix}_to_dsm_target_step"] = hit["step"] if hit else math.nan
        row[f"{prefix}_to_both_targets_s"] = both["train_s"] if both else math.nan
        row[f"{prefix}_to_both_targets_step"] = both["step"] if both else math.nan
        for p in curve:
            print(f"  step {p['step']:5d}: DSM ratio {p['dsm_ratio']:.4f}, rank corr {p['rank_corr']:.4f}, {p.get('train_s', 0):.1f}s")
        m = compare_ebdm(teacher.to(dev), student.to(dev), hx[:512], hc[:512], he[:512])  # judged on the device
        teacher.cpu(), student.cpu()
        row.update({f"{prefix}_{k}": v for k, v in m.items()})
        row[f"{prefix}_precision_counts"] = precision_counts(student)
        save(f"{prefix}: student {args.steps} steps, {stats['samples_per_s']:.0f} samples/s; DSM <= 1.02x after {row[f'{prefix}_to_dsm_target_s']:.1f}s "
             f"(step {row[f'{prefix}_to_dsm_target_step']}); with rank corr >= 0.98 after {row[f'{prefix}_to_both_targets_s']:.1f}s; final DSM "
             f"{m['dsm_ratio']:.4f}x, rank corr {m['energy_rank_corr']:.4f}, ternary {100 * m['ternary_share']:.1f} %")  # fmt: skip
        return teacher, student, hx, hc

    if "D" in args.parts and args.decisions:
        paired_decisions_118(args, row, work, save, started_wall=time.time() - elapsed())

    if "R" in args.parts:
        compare_recipes(args, row, work, save, elapsed, started_wall=time.time() - elapsed())

    # A: case14, time to target
    got = None
    if "A" in args.parts:
        got = teacher_and_student("grid:case14", args.fossils, 16 if args.tiny else 256, 2 if args.tiny else 4, "case14", args.every)
        if got is None:
            print(json.dumps(row, default=float))
            return
        teacher, student, hx, hc = got

    # B: paired decisions on case14 (the first open question: before the wide case118)
    if "B" in args.parts and got is not None and args.decisions and elapsed() < 0.6 * args.budget_s:
        domain = domains.get("grid:case14")
        dx, dc = hx[: args.decisions].astype(float), hc[: args.decisions].astype(float)
        if len(dx) < args.decisions:  # more held-out contexts: fresh draws of the synthesiser (no training fossil)
            fresh = domain.synthesize(np.random.default_rng(12345), args.decisions - len(dx))
            dx = np.concatenate([dx, np.stack([f.state for f in fresh])])
            dc = np.concatenate([dc, np.stack([f.context for f in fresh])])
        n = len(dx)
        t0 = time.perf_counter()
        optimum = optimum_costs(domain, dc)[1]
        row["optimum_s"] = time.perf_counter() - t0
        p = paired_decisions(teacher, student, domain, dx, dc, seed=0, batch=n, device=args.device, optimum=optimum)
        row.update({f"paired_{k}": v for k, v in p.items()})
        row["paired_s"] = time.perf_counter() - t0
        save(f"paired decisions on {n} contexts: gap {p['gap_diff_pp']:+.3f} pp [{p['gap_diff_low_pp']:+.3f}, {p['gap_diff_high_pp']:+.3f}] "
             f"({p['gap_verdict']}); savings {p['savings_diff_pp']:+.3f} pp [{p['savings_diff_low_pp']:+.3f}, {p['savings_diff_high_pp']:+.3f}] "
             f"({p['savings_verdict']}); no worse by 0.1 pp: gap {p['gap_no_worse']}, savings {p['savings_no_worse']}; "
             f"teacher gap {100 * p['teacher_decision_gap_mean']:.3f} %, in {row['paired_s']:.0f}s")  # fmt: skip
        if elapsed() < 0.5 * args.budget_s:
            q = paired_decisions(teacher, teacher, domain, dx, dc, seed=0, student_seed=1, batch=n, device=args.device, optimum=optimum)
            row.update({f"noise_{k}": v for k, v in q.items()})
            save(f"the teacher against itself, seed 1 vs 0 (unpaired): gap {q['gap_diff_pp']:+.3f} pp [{q['gap_diff_low_pp']:+.3f}, "
                 f"{q['gap_diff_high_pp']:+.3f}], per-context sd {q['gap_diff_sd_pp']:.3f} pp vs paired student sd {p['gap_diff_sd_pp']:.3f} pp")  # fmt: skip
    elif "B" in args.parts and args.decisions:
        row["paired_skipped"] = f"not started: {elapsed():.0f}s of the {args.budget_s:.0f}s budget gone"
        save(row["paired_skipped"])

    # C: case118 wide
    if "C" in args.parts and args.wide and elapsed() < 0.6 * args.budget_s:
        teacher_and_student("grid:case118", args.fossils_118, 16 if args.tiny else args.wide, 2 if args.tiny else 4, f"case118_h{args.wide}",
                            10 if args.tiny else args.every_118)  # fmt: skip
    elif "C" in args.parts and args.wide:
        row["case118_skipped"] = f"not started: {elapsed():.0f}s of the {args.budget_s:.0f}s budget gone"
        save(row["case118_skipped"])

    print(json.dumps(row, default=float))


if __name__ == "__main__":
    main()
