"""The learned optimiser (issue 12) against the exact optimum and the best-in-data baseline,
and its speed against re-solving every instance with HiGHS.

    python benchmarks/bench_learned_opt.py                                 # case14, case30, case118, hvac
    python benchmarks/bench_learned_opt.py --domains grid:case118 --fossils 20000 --steps 4000

For each domain, in one run:
  1. `scf fossils synth`'s generator writes `--fossils` fossils (the project's synthesiser:
     states from a random feasible point towards the optimum, with their true energy);
  2. `ml.optimize.train_optimiser` trains on the loader's "train" split only (fossil ids not
     ending in 0) — cost model and proposal network, no access to the cost function or solver;
  3. on the "heldout" split's contexts (never seen): the learned, repaired decisions and the
     best-in-data baseline (lowest-energy observed state of the 16 nearest observed contexts,
     repaired) are measured against the exact optimum (HiGHS): feasibility by the domain's own
     check, gap median / p95, savings captured from the observed state (status quo) to the optimum;
  4. speed: `--batch` contexts decided in one call (network, repair, polish), per instance,
     against `Domain.reference_solution` on each (HiGHS, the model built once, warm re-solves);
     the learned path is timed twice: with the torch repair and polish on the model's device
     (`ml/repair_torch.py`, `repair_backend = "torch"`, the default) and with the numpy repair
     of `domains/repair.py` and the numpy polish (`"numpy"`, the path before); the timed
     batch's decisions are checked by the domain's own `violations`; with `--device cuda`
     the model runs on the GPU for steps 3 and 4 (training stays on the CPU), and the same
     batch is also timed with the model on the CPU (both backends), in the same process;
  5. `--congested case30:0.7`: the same on a case whose line ratings are scaled so that lines
     bind at the optimum in part of the contexts (fossils synthesised in memory).
Prints tables and one JSON line per domain (`--json PATH`: all rows in one file). Goals: feasible 100 %; gap median <= 0.5 %,
p95 <= 2 %; savings captured >= 95 %; better than the baseline; speed >= 10x HiGHS (CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # as HiGHS runs: one thread
    os.environ.setdefault(_var, "1")  # (a threaded BLAS on a loaded 2-core VM spins: 10-50x slower small products)


def run(domain_name: str, fossils: int, steps: int, batch: int, heldout: int, seed: int, work: Path, device: str = "cpu") -> dict:
    """A registered domain: fossil shards on disk, `train_optimiser` on the train split."""
    import numpy as np

    from scf import domains
    from scf.domains.fossils import synth_shards
    from scf.ml.loader import load_arrays
    from scf.ml.optimize import OptimiserConfig, load_optimiser, train_optimiser

    d = domains.get(domain_name)
    shards = work / domain_name.replace(":", "_")
    t0 = time.perf_counter()
    synth_shards(domain_name, fossils, shards, shard_size=2000, seed=seed, processes=2)
    synth_s = time.perf_counter() - t0
    cfg = OptimiserConfig(steps=steps, seed=seed, eval_contexts=heldout)
    result = train_optimiser(domain_name, shards, work / "zoo", cfg)
    model, _ = load_optimiser(result.checkpoint)
    test = tuple(np.asarray(a, dtype=float) for a in load_arrays(shards, domain=domain_name, split="heldout", limit=heldout))
    train = tuple(np.asarray(a, dtype=float) for a in load_arrays(shards, domain=domain_name, split="train"))
    row = measure(d, model, train, test, batch, seed, device)
    return {"domain": domain_name, "fossils": fossils, "steps": steps, "synth_s": round(synth_s, 1),
            "train_s": round(result.metrics.get("train_seconds", float("nan")), 1), **row}


def run_congested(case: str, derate: float, fossils: int, steps: int, batch: int, heldout: int, seed: int, device: str = "cpu") -> dict:
    """A MATPOWER case with every rateA times `derate`, so that lines bind at the optimum in
    part of the contexts (the shipped cases never congest under the synthesiser's loads);
    fossils synthesised in memory, 1 in 16 held out."""
    import dataclasses

    import numpy as np

    from scf.domains import matpower as mp
    from scf.domains.grid import GridDomain
    from scf.domains.quality import optimum_costs
    from scf.ml.optimize import OptimiserConfig, fit_optimiser

    c = mp.load_case(case)
    branch = c.branch.copy()
    branch[:, mp.RATE_A] *= derate
    d = GridDomain(dataclasses.replace(c, branch=branch), name=f"grid:{case}x{derate:g}")
    t0 = time.perf_counter()
    samples = d.synthesize(np.random.default_rng(seed), fossils)
    synth_s = time.perf_counter() - t0
    x, ctx, e = (np.array([getattr(s, k) for s in samples], dtype=float) for k in ("state", "context", "energy"))
    held = np.arange(len(x)) % 16 == 0
    cfg = OptimiserConfig(domain=d.name, steps=steps, seed=seed, state_lo=list(map(float, d.state_bounds[0])),
                          state_hi=list(map(float, d.state_bounds[1])), context_lo=list(map(float, d.context_bounds[0])),
                          context_hi=list(map(float, d.context_bounds[1])))
    model, metrics = fit_optimiser(d, x[~held], ctx[~held], e[~held], cfg)
    test = (x[held][:heldout], ctx[held][:heldout], e[held][:heldout])
    opt_states, _ = optimum_costs(d, test[1])
    ok = np.all(np.isfinite(opt_states), axis=1)
    congested = float(np.mean((np.abs(d.flows(test[1][ok], opt_states[ok])) - d.rate > -1e-3).any(1)))
    row = measure(d, model, (x[~held], ctx[~held], e[~held]), test, batch, seed, device)
    return {"domain": d.name, "fossils": fossils, "steps": steps, "synth_s": round(synth_s, 1),
            "train_s": round(metrics["train_seconds"], 1), "congested_share": congested, **row}


def measure(d, model, train, test, batch: int, seed: int, device: str = "cpu") -> dict:
    """Decision quality on the held-out contexts (learned vs best in data, against the exact
    optimum) and speed on `batch` fresh contexts (learned path vs HiGHS per instance); the
    model on `device` (on another device than the CPU, the CPU path is timed too)."""
    import numpy as np
    import torch

    model = model.to(device)

    from scf.domains.base import Infeasible
    from scf.domains.quality import best_in_data, decision_quality, optimum_costs

    x, c, _ = test
    tx, tc, te = train
    _, opt = optimum_costs(d, c)
    model.repair_backend = "numpy"  # the path before, judged the same way
    _, fixed_np = model.decide(d, c)
    torch_error = ""
    try:
        model.repair_backend = "torch"
        raw, fixed = model.decide(d, c)
    except Exception as e:  # noqa: BLE001 — a failure of the new path on this device is reported, the rest still measured
        torch_error = f"{type(e).__name__}: {e}"
        print(f"torch repair failed on {device}: {torch_error}", file=sys.stderr, flush=True)
        model.repair_backend = "numpy"
        raw, fixed = model.decide(d, c)
    model.repair_backend = "auto"
    learned = decision_quality(d, c, fixed.states, status_quo=x, optimum=opt)
    learned_np = decision_quality(d, c, fixed_np.states, status_quo=x, optimum=opt).metrics()
    raw_feasible = float(np.mean([not d.violations(ci, xi) for ci, xi in zip(c, raw)]))
    baseline = decision_quality(d, c, best_in_data(d, tc, tx, te, c), status_quo=x, optimum=opt)

    rng = np.random.default_rng(seed + 1)
    ctx = []
    while len(ctx) < batch:
        ci = d.sample_context(rng)
        try:
            d.reference_solution(ci)  # also builds and warms the solver
        except Infeasible:
            continue
        ctx.append(ci)
    ctx = np.array(ctx)
    t0 = time.perf_counter()
    for ci in ctx:
        d.reference_solution(ci)
    highs_s = (time.perf_counter() - t0) / batch

    def timed(m, backend):
        m.repair_backend = backend
        try:
            m.decide(d, ctx[:8])  # warm-up
            m.decide(d, ctx)  # … at the batch's shapes too (CUDA kernels, allocator)
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                _, out = m.decide(d, ctx)  # numpy out: the device work is finished
                best = min(best, (time.perf_counter() - t0) / batch)
        finally:
            m.repair_backend = "auto"
        return best, out

    # the torch repair and polish on the model's device (ml/repair_torch.py), then the numpy
    # repair of domains/repair.py with the same model ("before"); the timed batch's decisions
    # checked by the domain's own `violations` (outside the timing)
    best_learned, out = timed(model, "numpy" if torch_error else "torch")
    best_numpy, out_numpy = timed(model, "numpy")
    extra = {"device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu", "torch_error": torch_error,
             "numpy_feasible": learned_np["feasible"], "numpy_gap_median": learned_np["gap_median"], "numpy_gap_p95": learned_np["gap_p95"],
             "numpy_repair_fallback": fixed_np.fallback_rate,
             "numpy_repair_ms_per_instance": 1e3 * best_numpy, "numpy_repair_speedup": highs_s / best_numpy,
             "batch_fallback": int(out.fallback.sum()), "numpy_batch_fallback": int(out_numpy.fallback.sum()),
             "batch_checked_feasible": float(np.mean([not d.violations(ci, xi) for ci, xi in zip(ctx, out.states)]))}
    if device != "cpu":
        extra["graph_error"] = model.graph_error  # '' when the polish was recorded as a CUDA graph
        model.device_graphs = False
        eager_s, _ = timed(model, "numpy" if torch_error else "torch")
        model.device_graphs = True
        extra.update(eager_ms_per_instance=1e3 * eager_s, eager_speedup=highs_s / eager_s)
        model.to("cpu")
        cpu_s, _ = timed(model, "numpy" if torch_error else "torch")
        cpu_np, _ = timed(model, "numpy")
        model.to(device)
        extra.update(cpu_learned_ms_per_instance=1e3 * cpu_s, cpu_speedup=highs_s / cpu_s,
                     cpu_numpy_repair_ms_per_instance=1e3 * cpu_np, cpu_numpy_repair_speedup=highs_s / cpu_np)
    lm, bm = learned.metrics(), baseline.metrics()
    return {
        "train_fossils": len(tx), "heldout_contexts": len(c),
        "raw_feasible": raw_feasible, "feasible": lm["feasible"], "gap_median": lm["gap_median"], "gap_p95": lm["gap_p95"],
        "savings_captured": lm["savings_captured"], "repair_fallback": fixed.fallback_rate,
        "baseline_feasible": bm["feasible"], "baseline_gap_median": bm["gap_median"], "baseline_gap_p95": bm["gap_p95"],
        "baseline_savings_captured": bm["savings_captured"],
        "batch": batch, "learned_ms_per_instance": 1e3 * best_learned, "highs_ms_per_instance": 1e3 * highs_s,
        "speedup": highs_s / best_learned, "batch_feasible": float(out.feasible.mean()), **extra,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--domains", default="grid:case14,grid:case30,grid:case118,hvac:office3")
    p.add_argument("--fossils", type=int, default=12000)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--heldout", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--congested", default="case30:0.7", help="CASE:DERATE, a case with rateA scaled so lines bind ('' to skip)")
    p.add_argument("--device", default="cpu", help="where the trained model decides (cpu, cuda); training stays on the CPU")
    p.add_argument("--json", default="", help="also write every row to this file (a JSON list)")
    args = p.parse_args()
    rows = []

    def emit(row):  # each row printed and written as soon as it is measured (a cut run keeps what it has)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(rows, indent=1))

    with tempfile.TemporaryDirectory(prefix="bench-learned-") as tmp:
        for name in filter(None, args.domains.split(",")):
            emit(run(name, args.fossils, args.steps, args.batch, args.heldout, args.seed, Path(tmp), args.device))
        if args.congested:
            case, derate = args.congested.split(":")
            emit(run_congested(case, float(derate), args.fossils, args.steps, args.batch, args.heldout, args.seed, args.device))
    pct = lambda v: f"{100 * v:.3f} %"  # noqa: E731
    print("\n| domain | feasible (raw → repaired) | gap median | gap p95 | savings captured | baseline: gap median / p95 / savings | ms per instance (batch) | HiGHS ms | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['domain']} | {pct(r['raw_feasible'])} → {pct(r['feasible'])} | {pct(r['gap_median'])} | {pct(r['gap_p95'])} | "
              f"{pct(r['savings_captured'])} | {pct(r['baseline_gap_median'])} / {pct(r['baseline_gap_p95'])} / {pct(r['baseline_savings_captured'])} | "
              f"{r['learned_ms_per_instance']:.4f} ({r['batch']}) | {r['highs_ms_per_instance']:.3f} | **{r['speedup']:.1f}×** |")
    print("\n| domain | device | torch repair ms / instance (fallback in batch) | numpy repair ms (fallback) | HiGHS ms | torch vs HiGHS | numpy vs HiGHS | model on CPU: torch / numpy vs HiGHS | batch feasible (domain check) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cpu = f"{r['cpu_speedup']:.1f}× / {r['cpu_numpy_repair_speedup']:.1f}×" if "cpu_speedup" in r else "-"
        if "eager_speedup" in r:
            cpu += f"; torch without the CUDA graph {r['eager_ms_per_instance']:.4f} ms, {r['eager_speedup']:.1f}×{' (graph failed: ' + r['graph_error'] + ')' if r['graph_error'] else ''}"
        print(f"| {r['domain']} | {r['device']} | {r['learned_ms_per_instance']:.4f} ({r['batch_fallback']}) | {r['numpy_repair_ms_per_instance']:.4f} ({r['numpy_batch_fallback']}) | "
              f"{r['highs_ms_per_instance']:.3f} | **{r['speedup']:.1f}×** | {r['numpy_repair_speedup']:.1f}× | {cpu} | {pct(r['batch_checked_feasible'])} |")


if __name__ == "__main__":
    main()
