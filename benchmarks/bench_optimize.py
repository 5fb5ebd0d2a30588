"""The exact and certified optimiser: build + solve per MATPOWER case against the old dense
path and PYPOWER, exact re-solves per instance, and the certified path's fallback rate.

    python benchmarks/bench_optimize.py                                  # shipped cases only
    python benchmarks/bench_optimize.py --data ~/matpower/data \\
        --cases case300,case1354pegase,case2383wp,case9241pegase,case13659pegase
    PYTHONPATH=/path/to/pypower python benchmarks/bench_optimize.py ...  # adds PYPOWER (pip install pypower)

1. build + solve: parse the case, build the DC model, solve the nominal DC-OPF — SCF now
   (sparse LU PTDF; B-theta LP for large linear-cost cases) against the old dense path
   measured in the same run (PTDF from a dense solve of the reduced B over every branch,
   the code before issue 12, re-created below; it refuses piecewise-linear costs) and
   PYPOWER's `rundcopf` where it imports; the three objectives are printed side by side.
2. re-solve: `--n` sampled contexts per shipped domain, exact solve and certificate each:
   time per instance.
3. certified path: candidates made from each optimum by noise of a given scale (a share of
   each generator's range) and repaired (`Domain.project`), then `producers.optimize.choose`
   (`choose_batch`: the whole batch certified at once) with `--max-gap`: the certified gap
   against the true one, the fallback rate, the certification time per instance. With
   `--checkpoint DOMAIN=PATH`, a trained learned optimiser's proposals are used too.
4. `--learned grid:case118,hvac:office3`: a learned optimiser trained here on synthesised
   fossils (`--learned-fossils`, `--learned-steps`), run through
   `optimize(method="learned")` on `--n` fresh contexts: certified vs true gap, fallback
   rate, time per instance against exact + certificate.
Prints tables and one JSON line per measure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# One BLAS thread, as HiGHS runs here (threads=1): on a shared 2-core machine a threaded
# OpenBLAS spends 50x longer on a (200 x 187) @ (187 x 54) product than one thread does.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from scf.domains.certify import GAP_FLOOR  # noqa: E402


def old_dense(case) -> tuple[float, float]:
    """The pre-issue-12 DC model and QP (dense PTDF over all branches): (seconds, cost)."""
    from scf.domains import matpower as mp
    from scf.domains.solvers import HighsProgram

    t0 = time.perf_counter()
    bus, base = case.bus, case.base_mva
    gen = case.gen[case.gen[:, mp.GEN_STATUS] > 0]
    gencost = case.gencost[: len(case.gen)][case.gen[:, mp.GEN_STATUS] > 0]
    if np.any(gencost[:, mp.MODEL] != mp.POLYNOMIAL) or gencost[:, mp.NCOST].max() > 3:
        return float("nan"), float("nan")
    branch = case.branch[case.branch[:, mp.BR_STATUS] > 0]
    n_bus, n_gen, n_br = len(bus), len(gen), len(branch)
    index = {int(b): i for i, b in enumerate(bus[:, mp.BUS_I])}
    ncost = gencost[:, mp.NCOST].astype(int)
    coef = np.zeros((n_gen, 3))
    for g in range(n_gen):
        coef[g, 3 - ncost[g] :] = gencost[g, mp.COST : mp.COST + ncost[g]]
    f = np.array([index[int(v)] for v in branch[:, mp.F_BUS]])
    t = np.array([index[int(v)] for v in branch[:, mp.T_BUS]])
    tap = np.where(branch[:, mp.TAP] == 0, 1.0, branch[:, mp.TAP])
    b = 1.0 / (branch[:, mp.BR_X] * tap)
    cft = np.zeros((n_br, n_bus))
    cft[np.arange(n_br), f], cft[np.arange(n_br), t] = 1.0, -1.0
    bf = b[:, None] * cft
    bbus = cft.T @ bf
    pf_shift = -b * np.deg2rad(branch[:, mp.SHIFT])
    ref = np.flatnonzero(bus[:, mp.BUS_TYPE] == mp.REF)
    slack = int(ref[0]) if len(ref) else 0
    keep = np.delete(np.arange(n_bus), slack)
    ptdf = np.zeros((n_br, n_bus))
    ptdf[:, keep] = np.linalg.solve(bbus[np.ix_(keep, keep)], bf[:, keep].T).T
    gen_bus = np.array([index[int(v)] for v in gen[:, mp.GEN_BUS]])
    pd = bus[:, mp.PD]
    load_buses = np.flatnonzero(pd != 0)
    fixed = bus[:, mp.GS] + base * (cft.T @ pf_shift)
    rate = np.where(branch[:, mp.RATE_A] > 0, branch[:, mp.RATE_A], np.inf)
    limited = np.flatnonzero(np.isfinite(rate))
    flow_offset = base * pf_shift - ptdf @ fixed
    rows = np.vstack([np.ones((1, n_gen)), ptdf[:, gen_bus][limited]])
    prog = HighsProgram(rows, gen[:, mp.PMIN], gen[:, mp.PMAX], cost=coef[:, 1], quad=2 * coef[:, 0], offset=coef[:, 2].sum())
    demand = pd[load_buses].sum() + bus[:, mp.GS].sum()
    base_flow = (flow_offset - ptdf[:, load_buses] @ pd[load_buses])[limited]
    x = prog.solve(np.concatenate([[demand], -rate[limited] - base_flow]), np.concatenate([[demand], rate[limited] - base_flow]))
    seconds = time.perf_counter() - t0
    return seconds, float(np.sum((coef[:, 0] * x + coef[:, 1]) * x + coef[:, 2])) if x is not None else float("nan")


def pypower_time(case) -> tuple[float, float]:
    try:
        from pypower.api import ppoption, rundcopf
    except ImportError:
        return float("nan"), float("nan")
    ppc = {"version": "2", "baseMVA": case.base_mva, "bus": case.bus.copy(), "gen": case.gen.copy(), "branch": case.branch.copy(), "gencost": case.gencost.copy()}
    t0 = time.perf_counter()
    try:
        r = rundcopf(ppc, ppoption(VERBOSE=0, OUT_ALL=0))
    except Exception as exc:  # noqa: BLE001 - report PYPOWER's failure and go on
        print(f"  PYPOWER failed on {case.name}: {type(exc).__name__}: {exc}")
        return float("nan"), float("nan")
    return time.perf_counter() - t0, float(r["f"]) if r["success"] else float("nan")


def build_and_solve(paths: list[Path], repeat: int) -> None:
    from scf.domains import matpower as mp
    from scf.domains.grid import GridDomain

    print(f"\n1. build + solve the nominal DC-OPF (best of {repeat})")
    print(f"{'case':<18}{'buses':>7}{'form':>9}{'parse s':>9}{'SCF s':>9}{'old s':>9}{'PYPOWER s':>11}{'old/SCF':>9}{'PP/SCF':>8}   objective SCF | old | PYPOWER")
    for path in paths:
        t0 = time.perf_counter()
        case = mp.load_case(path)
        parse = time.perf_counter() - t0
        ours, old, pp = [], [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            g = GridDomain(case)
            x = g.reference_solution(g.nominal_load)
            ours.append(time.perf_counter() - t0)
            cost = g.cost(g.nominal_load, x)
            old.append(old_dense(case) if len(case.bus) <= 3000 else (float("nan"), float("nan")))  # dense PTDF: n_branch x n_bus floats
            pp.append(pypower_time(case))
        s, o, p = min(ours), min(t for t, _ in old), min(t for t, _ in pp)
        print(f"{case.name:<18}{len(case.bus):>7}{g.formulation:>9}{parse:>9.3f}{s:>9.3f}{o:>9.3f}{p:>11.3f}{o / s:>9.1f}{p / s:>8.1f}   "
              f"{cost:.6f} | {old[0][1]:.6f} | {pp[0][1]:.6f}")  # fmt: skip
        print(json.dumps({"bench": "build_solve", "case": case.name, "buses": len(case.bus), "formulation": g.formulation, "parse_s": parse,
                          "scf_s": s, "old_dense_s": o, "pypower_s": p, "cost": cost, "old_cost": old[0][1], "pypower_cost": pp[0][1]}))  # fmt: skip


def contexts(domain, n: int, seed: int = 0):
    from scf.domains import Infeasible

    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        c = domain.sample_context(rng, index=len(out) + 8)
        try:
            domain.reference_solution(c)
        except Infeasible:
            continue
        out.append(c)
    return out


def resolve(names: list[str], n: int) -> None:
    from scf import domains
    from scf.producers import optimize as opt

    print(f"\n2. exact re-solve + certificate, {n} contexts each (per instance)")
    print(f"{'domain':<16}{'solve ms p50':>14}{'p95':>8}{'certify ms p50':>16}{'max rel gap':>13}")
    for name in names:
        d = domains.get(name)
        problems = [opt.problem(d, {"context": list(c)}) for c in contexts(d, n)]
        decisions = opt.optimize(problems, method="exact")
        solve = [1000 * x.timings["solve_s"] for x in decisions]
        cert = [1000 * x.timings["certify_s"] for x in decisions]
        gap = max(x.certificate.rel_gap for x in decisions)
        p95 = float(np.percentile(solve, 95))
        print(f"{name:<16}{statistics.median(solve):>14.2f}{p95:>8.2f}{statistics.median(cert):>16.2f}{gap:>13.2e}")
        print(json.dumps({"bench": "resolve", "domain": name, "n": n, "solve_ms_p50": statistics.median(solve), "solve_ms_p95": p95,
                          "certify_ms_p50": statistics.median(cert), "max_rel_gap": gap}))  # fmt: skip


def certified(names: list[str], n: int, scales: list[float], max_gaps: list[float], checkpoints: dict[str, str]) -> None:
    from scf import domains
    from scf.producers import optimize as opt

    print(f"\n3. certified path: {n} contexts each; candidates = optimum + noise (share of each range), projected; or a checkpoint's proposals")
    print(f"{'domain':<16}{'candidates':>18}{'true gap p50':>14}{'cert gap p50':>14}{'cert/true p50':>15}" + "".join(f"{'fallback @' + format(g, 'g'):>16}" for g in max_gaps) + f"{'certify ms/inst':>16}")
    for name in names:
        d = domains.get(name)
        problems = [opt.problem(d, {"context": list(c)}) for c in contexts(d, n, seed=1)]
        optimum = [d.cost(p.context, d.reference_solution(p.context)) for p in problems]
        sources = [(f"noise {s:g}", s) for s in scales]
        if name in checkpoints:
            sources.append(("learned", None))
        for label, scale in sources:
            rng = np.random.default_rng(2)
            lo, hi = d.state_bounds
            if scale is None:
                from scf.ml import optimize as learned  # the learned optimiser (train extra)

                ctx = np.stack([p.context for p in problems])
                cands = learned.repair(d, ctx, learned.propose(d, ctx, checkpoints[name]))[:, None, :]
                repaired = True
            else:
                cands = []
                for p in problems:
                    best = d.reference_solution(p.context)
                    cands.append(d.project(p.context, np.clip(best + rng.normal(scale=scale * (hi - lo)), lo, hi))[None])
                repaired = True
            cands = np.stack([np.asarray(c, float).reshape(-1, d.state_dim) for c in cands])  # (B, K, n)
            fb, ms = {}, []
            for g in max_gaps:
                t0 = time.perf_counter()
                decs = opt.choose_batch(problems, cands, max_gap=g, model_id=label, repaired=repaired)
                ms.append(1000 * (time.perf_counter() - t0) / len(problems))
                fb[g] = sum(x.fallback for x in decs) / len(decs)
                assert all(x.status == "optimal" and x.certificate.rel_gap <= g for x in decs), "a returned decision beyond max_gap"
            t0 = time.perf_counter()
            first = opt.choose_batch(problems, cands, max_gap=None, model_id=label, repaired=repaired)
            ms.insert(0, 1000 * (time.perf_counter() - t0) / len(problems))  # certification alone, no fallback
            true, cert = [], []
            for dec, opt_cost in zip(first, optimum):
                if dec.certificate is not None:
                    true.append((dec.cost - opt_cost) / max(abs(dec.cost), GAP_FLOOR))  # as certify defines it
                    cert.append(dec.certificate.rel_gap)
            ratio = [c / t for c, t in zip(cert, true) if t > 1e-9]
            print(f"{name:<16}{label:>18}{statistics.median(true):>14.2e}{statistics.median(cert):>14.2e}{(statistics.median(ratio) if ratio else float('nan')):>15.2f}"
                  + "".join(f"{100 * fb[g]:>15.1f}%" for g in max_gaps) + f"{ms[0]:>12.3f}")  # fmt: skip
            print(json.dumps({"bench": "certified", "domain": name, "candidates": label, "n": n, "true_gap_p50": statistics.median(true),
                              "cert_gap_p50": statistics.median(cert), "fallback_rate": {str(g): fb[g] for g in max_gaps}, "certify_ms_per_instance": ms[0],
                              "with_fallback_ms_per_instance": dict(zip(map(str, max_gaps), ms[1:]))}))  # fmt: skip


def learned(names: list[str], n: int, fossils: int, steps: int, max_gaps: list[float]) -> None:
    """4. Train a learned optimiser (scf.ml.optimize, the train extra) on synthesised fossils
    per domain, then run `optimize(method="learned")` on fresh contexts: certified vs true
    gap, the fallback rate and time per instance against exact + certificate."""
    import tempfile

    from scf import domains
    from scf.domains.fossils import synth_shards
    from scf.ml.optimize import OptimiserConfig, train_optimiser
    from scf.producers import optimize as opt

    print(f"\n4. learned proposals through the certified path ({fossils} fossils, {steps} steps; {n} fresh contexts)")
    for name in names:
        root = Path(tempfile.mkdtemp(prefix="bench-opt-"))
        t0 = time.perf_counter()
        synth_shards(name, fossils, root / "shards", shard_size=max(1, fossils // 2), seed=11)
        ckpt = train_optimiser(name, root / "shards", root / "zoo", OptimiserConfig(steps=steps)).checkpoint
        print(f"{name}: synthesis + training {time.perf_counter() - t0:.0f} s")
        d = domains.get(name)
        problems = [opt.problem(d, {"context": list(c)}) for c in contexts(d, n, seed=99)]
        optimum = np.array([d.cost(p.context, d.reference_solution(p.context)) for p in problems])
        opt.optimize(problems[:8], method="learned", checkpoint=ckpt)  # warm-up
        t0 = time.perf_counter()
        opt.optimize(problems)
        exact_ms = 1000 * (time.perf_counter() - t0) / n
        for g in [None, *max_gaps]:
            t0 = time.perf_counter()
            decs = opt.optimize(problems, method="learned", checkpoint=ckpt, max_gap=g)
            ms = 1000 * (time.perf_counter() - t0) / n
            true = np.array([(x.cost - o) / max(abs(x.cost), GAP_FLOOR) for x, o in zip(decs, optimum) if x.certificate])
            cert = np.array([x.certificate.rel_gap for x in decs if x.certificate])
            fb = float(np.mean([x.fallback for x in decs]))
            optimal = sum(x.status == "optimal" for x in decs)
            q = lambda a: "/".join(f"{v:.1e}" for v in np.percentile(a, [50, 95, 100]))  # noqa: E731
            print(f"  max_gap {g}: {optimal}/{n} optimal, fallback {100 * fb:.1f} %, true gap p50/p95/max {q(true)}, certified {q(cert)}, "
                  f"{ms:.2f} ms/instance vs exact + certificate {exact_ms:.2f} ms")  # fmt: skip
            print(json.dumps({"bench": "learned", "domain": name, "max_gap": g, "n": n, "optimal": optimal, "fallback_rate": fb,
                              "true_gap": list(np.percentile(true, [50, 95, 100])), "cert_gap": list(np.percentile(cert, [50, 95, 100])),
                              "ms_per_instance": ms, "exact_ms_per_instance": exact_ms}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="MATPOWER's data/ folder (large cases are read from here)")
    ap.add_argument("--cases", default="case9,case14,case30,case118", help="case names (shipped, or under --data)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--n", type=int, default=200, help="contexts per domain for re-solve and the certified path")
    ap.add_argument("--domains", default="grid:case14,grid:case30,grid:case118,hvac:office3")
    ap.add_argument("--scales", default="0.001,0.01,0.05")
    ap.add_argument("--max-gaps", default="0.001,0.01")
    ap.add_argument("--checkpoint", action="append", default=[], help="DOMAIN=PATH: certify the learned optimiser's proposals too")
    ap.add_argument("--only", choices=["build", "resolve", "certified", "learned"])
    ap.add_argument("--learned", default="", help="domains to train a learned optimiser for and run through the certified path (section 4)")
    ap.add_argument("--learned-fossils", type=int, default=4000)
    ap.add_argument("--learned-steps", type=int, default=1500)
    args = ap.parse_args()
    from scf.domains import matpower as mp

    paths = []
    for name in args.cases.split(","):
        p = (args.data / f"{name}.m") if args.data and (args.data / f"{name}.m").is_file() else mp.DATA_DIR / f"{name}.m"
        paths.append(p)
    names = args.domains.split(",")
    if args.only in (None, "build"):
        build_and_solve(paths, args.repeat)
    if args.only in (None, "resolve"):
        resolve(names, args.n)
    if args.only in (None, "certified"):
        certified(names, args.n, [float(s) for s in args.scales.split(",")], [float(g) for g in args.max_gaps.split(",")],
                  dict(c.split("=", 1) for c in args.checkpoint))  # fmt: skip
    if args.learned and args.only in (None, "learned"):
        learned(args.learned.split(","), args.n, args.learned_fossils, args.learned_steps, [float(g) for g in args.max_gaps.split(",")])


if __name__ == "__main__":
    main()
