"""The learned cost's conservative penalty (ml/cost.py, `CostConfig.conservative`), measured.

    python benchmarks/bench_cost_conservative.py [--fossils 3000] [--steps 2000] [--seeds 0,1] [--kappa 1]

For each setting and seed, the same fossils train two learned optimisers — without the
penalty and with it (`conservative = kappa`) — and both decide the same held-out contexts,
repaired and measured against the exact optimum (HiGHS) in the same run:

* `in-distribution`: congested case30 (every rateA × 0.7), its own synthesised fossils;
  also `grid:case14` and `hvac:office3` as shipped (`--domains`);
* `extrapolation`: the same congested case30, but generator 2 was never run above 40 MW
  (its fossils above are dropped) and its true cost turns steep there (a piecewise-linear
  curve: the quadratic up to 40 MW, 8 $/MWh beyond). The learned cost can only guess a
  straight line past 40 MW; the network without the penalty exploits that guess.

Printed per row: regret (1 − savings captured), gap median / p95, feasible share, generator
2's mean output (case30 rows), training seconds; then each setting's ratio of regret with
/ without the penalty (mean over seeds). Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1].parent))

GEN, CEILING, STEEP = 1, 40.0, 8.0


def derated_case30(kink: bool):
    from scf.domains import matpower as mp
    from scf.domains.grid import GridDomain

    c = mp.load_case("case30")
    branch = c.branch.copy()
    branch[:, mp.RATE_A] *= 0.7
    gencost = c.gencost
    if kink:
        c2, c1 = gencost[GEN, mp.COST], gencost[GEN, mp.COST + 1]
        xs = [0.0, 10.0, 20.0, 30.0, CEILING, 80.0]
        ys = [c2 * p * p + c1 * p for p in xs[:-1]] + [c2 * CEILING**2 + c1 * CEILING + STEEP * (80.0 - CEILING)]
        rows = np.zeros((len(gencost), 4 + 2 * len(xs)))
        rows[:, : gencost.shape[1]] = gencost
        rows[GEN, :4] = [mp.PIECEWISE_LINEAR, 0, 0, len(xs)]
        rows[GEN, 4:] = np.ravel(list(zip(xs, ys)))
        gencost = rows
    return GridDomain(dataclasses.replace(c, branch=branch, gencost=gencost), name="grid:case30x0.7" + ("-kink" if kink else ""))


def run(d, setting: str, fossils: int, steps: int, heldout: int, seed: int, kappa: float) -> list[dict]:
    from scf.domains.quality import decision_quality, optimum_costs
    from scf.ml.cost import CostConfig
    from scf.ml.optimize import OptimiserConfig, fit_optimiser

    samples = d.synthesize(np.random.default_rng(seed), fossils)
    x, c, e = (np.array([getattr(s, k) for s in samples], dtype=float) for k in ("state", "context", "energy"))
    held = np.arange(len(x)) % 8 == 0
    keep = ~held & ((x[:, GEN] <= CEILING) if setting == "extrapolation" else True)
    test = (x[held][:heldout], c[held][:heldout])
    _, opt_cost = optimum_costs(d, test[1])
    lo, hi = d.state_bounds
    clo, chi = d.context_bounds
    rows = []
    for k in (0.0, kappa):
        cfg = OptimiserConfig(domain=d.name, steps=steps, seed=seed, cost=CostConfig(conservative=k),
                              state_lo=list(map(float, lo)), state_hi=list(map(float, hi)),
                              context_lo=list(map(float, clo)), context_hi=list(map(float, chi)))
        t0 = time.perf_counter()
        model, metrics = fit_optimiser(d, x[keep], c[keep], e[keep], cfg)
        train_s = time.perf_counter() - t0
        _, fixed = model.decide(d, test[1])
        q = decision_quality(d, test[1], fixed.states, status_quo=test[0], optimum=opt_cost).metrics("")
        row = {"domain": d.name, "setting": setting, "seed": seed, "kappa": k, "fossils": int(keep.sum()), "steps": steps,
               "regret": q["regret"], "gap_median": q["gap_median"], "gap_p95": q["gap_p95"], "feasible": q["feasible"],
               "train_s": round(train_s, 1), "empty_axes": metrics.get("cost_support_empty_axes", 0.0)}
        if d.name.startswith("grid:case30"):
            row["gen2_mean_mw"] = float(fixed.states[:, GEN].mean())
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fossils", type=int, default=3000)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--heldout", type=int, default=256)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--kappa", type=float, default=1.0)
    p.add_argument("--domains", default="grid:case14,hvac:office3", help="shipped domains judged in distribution too ('' to skip)")
    p.add_argument("--json", type=Path, default=None, help="write every row here")
    args = p.parse_args(argv)
    import torch

    from scf import domains

    torch.set_num_threads(1)
    settings = [(derated_case30(False), "in-distribution"), (derated_case30(True), "extrapolation")]
    settings += [(domains.get(n), "in-distribution") for n in args.domains.split(",") if n]
    rows = []
    for d, setting in settings:
        for seed in (int(s) for s in args.seeds.split(",")):
            rows += run(d, setting, args.fossils, args.steps, args.heldout, seed, args.kappa)
    print("\nregret with / without the penalty (mean over seeds):")
    for d, setting in settings:
        plain, careful = (float(np.mean([r["regret"] for r in rows if r["domain"] == d.name and r["setting"] == setting and r["kappa"] == k]))
                          for k in (0.0, args.kappa))
        print(f"  {d.name:<22} {setting:<16} {plain:.5f} -> {careful:.5f}  ratio {careful / plain if plain else float('nan'):.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
