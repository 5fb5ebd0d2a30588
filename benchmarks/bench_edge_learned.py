"""The edge's numpy runtime of a learned optimiser against the torch model it mirrors, and
the control loop running it (issue 13).

    python benchmarks/bench_edge_learned.py [--fossils 300] [--steps 30] [--repeat 200] [--hours 48]

Rows (same run, same machine; the model: `scf-opt/1` for hvac:office3 trained here on
synthetic fossils, 64 x 2, as `scf demo` trains it):
* **torch decide** (baseline): `LearnedOptimiser.decide` — network, merit-ordered repair,
  polish — for one context (what the edge does each hour) and for a batch of 256;
* **numpy runtime**: `consumers.edge.learned.LearnedRuntime.decide`, the same decisions;
* **loop**: plant-hours per second through `ControlLoop` on the simulated site with the
  learned model from hour 24 (no M&V), against the loop with a day-ahead `decision`.
Prints the ratios to the baseline measured in the same run; no threshold.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402


def timed(fn, repeat: int) -> float:
    fn()  # warm
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


async def loop_rate(model: Path | None, hours: float) -> float:
    from scf.consumers.edge.control import ControlLoop, ControlSettings
    from scf.consumers.edge.plant import PlantEnded, SimPlant
    from scf.consumers.edge.store import Installed
    from tests.plant_support import installed

    d = Path(tempfile.mkdtemp(prefix="bench-edge-learned-"))
    try:
        settings = ControlSettings(sim_hours=hours, min_history_hours=24, report_hours=1e9)
        if model is None:
            item = installed(d, "ck-decision", "good")
        else:
            dest = d / "versions" / "ck-learned-v1" / "model.safetensors"
            dest.parent.mkdir(parents=True)
            shutil.copy(model, dest)
            item = Installed(checkpoint_id="ck-learned", domain="hvac:office3", version=1, uri="", sha256="", size=0,
                             dirname="ck-learned-v1", deployment_id="dep", plan_id="plan")
        plant = SimPlant(settings.site())
        state = {"cur": None}
        loop = ControlLoop(plant, "bench", d, settings, current=lambda: state["cur"])
        per_h = None
        t0 = None
        while True:
            try:
                tel = await plant.telemetry(loop.last_seq)
            except PlantEnded:
                break
            loop.last_seq = tel.seq
            if tel.seq == 96:
                state["cur"] = item
            if tel.seq == 100:  # timed from the second model hour (the first calibrates the site's model once)
                t0, first = time.perf_counter(), tel.seq
            await plant.write(await loop.step(tel))
            per_h = tel.period_s / 3600.0
        assert t0 is not None and per_h is not None
        assert loop.records[-1].controller == item.checkpoint_id, "the model did not run to the end"
        return (loop.last_seq - first) * per_h / (time.perf_counter() - t0)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fossils", type=int, default=300)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--hours", type=float, default=48.0)
    args = ap.parse_args()

    import torch

    from scf import domains
    from scf.consumers.edge.learned import LearnedRuntime
    from scf.domains.fossils import synth_shards
    from scf.ml.optimize import OptimiserConfig, train_optimiser

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-edge-learned-"))
    try:
        synth_shards("hvac:office3", args.fossils, work / "fossils", shard_size=args.fossils, seed=11)
        result = train_optimiser("hvac:office3", work / "fossils", work / "zoo",
                                 OptimiserConfig(steps=args.steps, hidden=64, depth=2, eval_contexts=64))
        from scf.ml.optimize import load_optimiser

        model, _ = load_optimiser(result.checkpoint)
        rt = LearnedRuntime.load(result.checkpoint)
        dom = domains.get("hvac:office3")
        rng = np.random.default_rng(0)
        batch = np.stack([dom.sample_context(rng) for _ in range(256)])
        one = batch[:1]
        print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
              f"numpy {np.__version__}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        print("| path | contexts | ms per call | ms per context | vs torch |")
        print("|---|---|---|---|---|")
        for label, c, rep in (("one context (the edge, hourly)", one, args.repeat), ("batch", batch, max(3, args.repeat // 20))):
            t_torch = timed(lambda c=c: model.decide(dom, c), rep)
            t_np = timed(lambda c=c: rt.decide(dom, c), rep)
            same = np.abs(model.decide(dom, c)[1].states - rt.decide(dom, c)[1].states)
            feas = rt.decide(dom, c)[1].feasible
            print(f"| torch decide, {label} | {len(c)} | {1e3 * t_torch:.2f} | {1e3 * t_torch / len(c):.3f} | 1.00× |")
            print(f"| numpy runtime, {label} | {len(c)} | {1e3 * t_np:.2f} | {1e3 * t_np / len(c):.3f} | {t_torch / t_np:.2f}× "
                  f"(max |Δu| {same[feas].max() if feas.any() else float('nan'):.1e} kW where feasible) |")
        base = asyncio.run(loop_rate(None, args.hours))
        learned = asyncio.run(loop_rate(result.checkpoint, args.hours))
        print("| loop | plant-h/s | vs loop with a decision |")
        print("|---|---|---|")
        print(f"| loop, day-ahead `decision` (baseline) | {base:.0f} | 1.00× |")
        print(f"| loop, learned optimiser (numpy runtime each hour) | {learned:.0f} | {learned / base:.2f}× |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
