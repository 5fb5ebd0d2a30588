"""EBDM training on a GPU: the step (autograd double backward vs the analytic score, eager,
CUDA graph, torch.compile), its FLOP utilisation, and the fossil loader feeding it (vs
in-device data). Issue 16, goals 1 and 2.

    python benchmarks/bench_train_gpu.py                    # CUDA; a tiny CPU smoke run otherwise
    python benchmarks/bench_train_gpu.py --configs production,production-4096 --variants auto --loaders device,host,host-inline --rounds 3
    python benchmarks/bench_train_gpu.py --configs production,default --variants graph,analytic,compiled --workers ""

One JSON line per measurement, then a summary line (and all of them into `--json`). Measured in one run:
  peak      — bf16 8192³ matrix products (TFLOP/s): the ceiling model FLOPs utilisation is read against;
  step      — per config, in-device data (batches drawn by random index from device tensors):
              samples/s of each step variant (`--variants`):
                eager     the score by autograd's double backward, eager (the old path);
                graph     the same captured as a CUDA graph (`ml.train.TrainStep`);
                analytic  the analytic score (`EBDM.analytic_score`, a first-order loss), CUDA graph;
                compiled  analytic + torch.compile of the loss (mode "default"), CUDA graph;
                compiled-max  the same with mode "max-autotune-no-cudagraphs" (slow to compile);
                compiled-ro   mode "reduce-overhead" (torch's own CUDA graphs, ours off);
                auto      the config's defaults (score_impl and compile "auto"), CUDA graph;
              model FLOPs per step counted with FlopCounterMode on the autograd path (forward, the
              score's double backward, the parameter backward; the analytic path's count printed
              beside it), MFU = FLOPs / step time / peak; the wall time of each run (compile included);
  loader    — batch ≥ 4096 (`--loader-batch`): `FossilLoader` over case118 shards on disk (columnar
              cache), each of `--loaders`:
                device       the records kept on the GPU (`DeviceColumns`), batches gathered there;
                host         device budget 0: batches gathered into pinned host memory by gather
                             threads ahead (`--gather-threads`; 2 by default), copied on a side
                             stream (`ml.train.device_batches`) — what a job gets when the data
                             does not fit the device budget;
                host-inline  the same gathered in the training thread as it asks (the loader of
                             the previous session);
              with `--workers` slots each, full batches only (`drop_last`, as `ml.train.train` on
              CUDA); fed to the fastest step variant of the config; ratio
              against that variant on in-device batches, measured again in each of `--rounds`
              rounds (in-device, then each loader), the median ratio reported.
Goals: loader/in-device ≥ 0.95 at batch 8192; graph/eager ≥ 5× at the default config;
MFU ≥ 25 % at the production config. Rates are the median over windows of `--window`
steps after the first window (capture, compile, warm-up). `--budget-s`: variants that would
start after this many seconds are skipped (and say so), so the run fits a device lease.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from scf import domains  # noqa: E402
from scf.ml.ebdm import EBDM, EBDMConfig  # noqa: E402
from scf.ml.loader import FossilLoader, load_arrays  # noqa: E402
from scf.ml.physics import penalty_for  # noqa: E402
from scf.ml.train import fit  # noqa: E402

CONFIGS = {  # name: (hidden, depth, batch)
    "default": (256, 4, 256),  # EBDMConfig's defaults
    "bench": (512, 4, 8192),  # the loader benchmark's model (issue 7)
    "production": (1024, 6, 8192),
    "production-4096": (1024, 6, 4096),
    "production-wide": (2048, 6, 16384),
    "wide-8192": (2048, 6, 8192),
}
VARIANTS = {  # name: (score_impl, compile mode, CUDA graph)
    "eager": ("autograd", "off", False),
    "graph": ("autograd", "off", True),
    "analytic-eager": ("analytic", "off", False),
    "analytic": ("analytic", "off", True),
    "compiled": ("analytic", "default", True),
    "compiled-max": ("analytic", "max-autotune-no-cudagraphs", True),
    "compiled-ro": ("analytic", "reduce-overhead", False),
    "auto": ("auto", "auto", True),  # what a job gets by default (EBDMConfig's score_impl and compile)
}


def bf16_peak(device: torch.device, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    return 2 * n**3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12


def step_flops(config: EBDMConfig, x, c, penalty, device, score_impl: str = "autograd") -> int:
    """FLOPs of one training step's loss and backward (the optimiser's elementwise work left out)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = EBDM(dataclasses.replace(config, score_impl=score_impl)).to(device).train()
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss, _ = model.loss(x[: config.batch_size], c[: config.batch_size], penalty)
        loss.backward()
    return counter.get_total_flops()


def rate(config: EBDMConfig, batches, device, penalty, graph: bool, window: int) -> tuple[float, dict]:
    """Median samples/s over the windows after the first, and what fit reported."""
    rates: list[float] = []
    cfg = EBDMConfig(**{**config.__dict__, "log_every": window})
    torch.manual_seed(0)
    t0 = time.perf_counter()
    _, stats = fit(EBDM(cfg), batches, penalty=penalty, device=device, graph=graph,
                   progress_cb=lambda step, total, loss, sps: rates.append(sps))
    steady = rates[1:] or rates
    return statistics.median(steady), {"graph": stats.graph, "graph_error": stats.graph_error, "loss": stats.loss,
                                       "compiled": stats.compiled, "compile_error": stats.compile_error,
                                       "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--domain", default="grid:case118")
    p.add_argument("--fossils", type=int, default=None, help="default: 200000 on CUDA, 3000 on CPU")
    p.add_argument("--steps", type=int, default=None, help="steps per measurement; default 300 on CUDA, 8 on CPU")
    p.add_argument("--window", type=int, default=None, help="steps per rate window; default steps/6")
    p.add_argument("--workers", default="0", help="loader slots (num_workers) to try for the loader runs, comma-separated ('': no loader runs)")
    p.add_argument("--loaders", default="device,host", help="loader modes, comma-separated: device, host, host-inline")
    p.add_argument("--loader-batch", type=int, default=4096, help="configs with at least this batch get loader runs")
    p.add_argument("--gather-threads", type=int, default=None, help="the host loaders' gather threads (default: the loader's)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of (in-device, each loader) per config and workers")
    p.add_argument("--configs", default="default,bench,production,production-wide")
    p.add_argument("--variants", default=None, help=f"comma-separated, of {list(VARIANTS)}; default eager,graph,analytic,compiled on CUDA, eager,analytic-eager on CPU")
    p.add_argument("--budget-s", type=float, default=None, help="skip variants that would start after this many seconds")
    p.add_argument("--json", default=None, help="also write every row to this file (default: $OUT/mfu.json when $OUT is set)")
    args = p.parse_args()
    started = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    fossils = args.fossils or (200_000 if cuda else 3_000)
    steps = args.steps or (300 if cuda else 8)
    window = args.window or max(1, steps // 6)
    variants = (args.variants or ("eager,graph,analytic,compiled" if cuda else "eager,analytic-eager")).split(",")
    unknown = [v for v in variants if v not in VARIANTS] + [n for n in args.configs.split(",") if n not in CONFIGS]
    loaders = [m for m in args.loaders.split(",") if m]
    unknown += [m for m in loaders if m not in ("device", "host", "host-inline")]
    if unknown:
        raise SystemExit(f"unknown variants/configs/loaders {unknown}: variants are {list(VARIANTS)}, configs {list(CONFIGS)}, "
                         "loaders device, host, host-inline")
    rows: list[dict] = []
    json_path = args.json or (os.path.join(os.environ["OUT"], "mfu.json") if os.environ.get("OUT") else None)

    def emit(row: dict) -> dict:
        print(json.dumps(row), flush=True)
        rows.append(row)
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(rows, indent=1))
        return row

    penalty = penalty_for(domains.get(args.domain)).to(device)
    peak = bf16_peak(device) if cuda else None
    head = {"bench": "train_gpu", "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
            "domain": args.domain, "fossils": fossils, "steps": steps, "window": window,
            "bf16_peak_tflops": round(peak, 1) if peak else None, "date": time.strftime("%Y-%m-%d")}
    emit({**head, "measure": "peak"})
    summary: dict = {}

    from bench_loader import write_shards

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        shards = Path(tmp) / "shards"
        write_shards(shards, args.domain, fossils, shard_size=max(1000, fossils // 16))
        t0 = time.perf_counter()
        x_np, c_np, _ = load_arrays(shards, domain=args.domain, split="train")  # builds the columnar cache
        build_s = time.perf_counter() - t0
        x, c = torch.from_numpy(x_np).to(device), torch.from_numpy(c_np).to(device)
        emit({**head, "measure": "columnar_cache", "records": len(x_np), "build_and_read_s": round(build_s, 2)})
        gen = torch.Generator(device=device).manual_seed(0)

        def in_device(batch: int):
            while True:
                idx = torch.randint(0, x.shape[0], (batch,), device=device, generator=gen)
                yield x[idx], c[idx]

        for name in args.configs.split(","):
            hidden, depth, batch = CONFIGS[name]
            if not cuda:
                batch = min(batch, 256)
            config = EBDMConfig(domain=args.domain, hidden=hidden, depth=depth, batch_size=batch, steps=steps, seed=0).resolved()
            flops = step_flops(config, x, c, penalty, device)
            row = {**head, "measure": "step", "config": name, "hidden": hidden, "depth": depth, "batch": batch,
                   "params": sum(q.numel() for q in EBDM(config).parameters()), "gflop_per_step": round(flops / 1e9, 2),
                   "gflop_per_step_analytic": round(step_flops(config, x, c, penalty, device, "analytic") / 1e9, 2)}
            for variant in variants:
                if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                    row[f"{variant}_skipped"] = f"time budget {args.budget_s:.0f} s spent"
                    continue
                impl, mode, graph = VARIANTS[variant]
                vconfig = dataclasses.replace(config, score_impl=impl, compile=mode)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                sps, info = rate(vconfig, in_device(batch), device, penalty, graph and cuda, window)
                step_s = batch / sps
                row[f"{variant}_samples_per_s"] = round(sps)
                row[f"{variant}_ms_per_step"] = round(step_s * 1e3, 3)
                row[f"{variant}_tflops"] = round(flops / step_s / 1e12, 1)
                row[f"{variant}_mfu"] = round(flops / step_s / 1e12 / peak, 4) if peak else None
                row[f"{variant}_wall_s"] = info["wall_s"]
                row[f"{variant}_loss"] = round(info["loss"], 4)
                if cuda:
                    row[f"{variant}_peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
                if graph and cuda:
                    row[f"{variant}_graph_captured"], row[f"{variant}_graph_error"] = info["graph"], info["graph_error"]
                if mode != "off" or variant == "auto":
                    row[f"{variant}_compiled"], row[f"{variant}_compile_error"] = info["compiled"], info["compile_error"]
                if json_path:  # the row so far, in case the run is cut
                    Path(json_path).write_text(json.dumps(rows + [row], indent=1))
                print(f"  {name} {variant}: {sps:,.0f} samples/s, {row[f'{variant}_tflops']} TFLOP/s, "
                      f"MFU {row[f'{variant}_mfu']}, run {info['wall_s']} s", file=sys.stderr, flush=True)
            for num, den in (("graph", "eager"), ("analytic", "graph"), ("compiled", "graph"), ("compiled", "analytic"),
                             ("compiled-max", "graph"), ("compiled-ro", "graph"), ("analytic-eager", "eager"),
                             ("auto", "graph"), ("compiled-max", "compiled")):
                if f"{num}_samples_per_s" in row and f"{den}_samples_per_s" in row:
                    row[f"{num}_over_{den}"] = round(row[f"{num}_samples_per_s"] / row[f"{den}_samples_per_s"], 2)
            rated = {v: row[f"{v}_samples_per_s"] for v in variants if f"{v}_samples_per_s" in row}
            if rated:
                row["best"] = max(rated, key=rated.get)
                row["best_mfu"] = row[f"{row['best']}_mfu"]
            summary[name] = emit(row)
            if (batch >= args.loader_batch or not cuda) and args.workers.strip() and row.get("best"):
                impl, mode, graph = VARIANTS[row["best"]]  # the loader feeds the fastest step
                lconfig = dataclasses.replace(config, score_impl=impl, compile=mode)
                for workers in (int(w) for w in args.workers.split(",")):
                    lrow = {**head, "measure": "loader", "config": name, "batch": batch, "workers": workers, "step": row["best"]}
                    for r in range(args.rounds):
                        if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                            lrow[f"round{r}_skipped"] = f"time budget {args.budget_s:.0f} s spent"
                            break
                        base, _ = rate(lconfig, in_device(batch), device, penalty, graph and cuda, window)
                        lrow.setdefault("in_device_samples_per_s", []).append(round(base))
                        for mode_name in loaders:
                            if cuda:
                                torch.cuda.reset_peak_memory_stats(device)
                            kw = {"device": device} if mode_name == "device" else {
                                "device": device, "device_budget": 0,
                                "gather_threads": 0 if mode_name == "host-inline" else args.gather_threads}
                            t0 = time.perf_counter()
                            loader = FossilLoader(shards, domain=args.domain, batch_size=batch, num_workers=workers, epochs=None,
                                                  split="train", drop_last=True, **kw)  # as ml.train.train on CUDA
                            batches = ((b.state, b.context) for b in loader)
                            sps, info = rate(lconfig, batches, device, penalty, graph and cuda, window)
                            batches.close()
                            lrow.setdefault(f"{mode_name}_samples_per_s", []).append(round(sps))
                            lrow.setdefault(f"{mode_name}_ratio", []).append(round(sps / base, 3))
                            lrow[f"{mode_name}_resident"] = loader.resident
                            lrow[f"{mode_name}_graph_captured"] = info["graph"]
                            lrow[f"{mode_name}_run_s"] = round(time.perf_counter() - t0, 1)
                            if cuda:
                                lrow[f"{mode_name}_peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
                            print(f"  {name} loader {mode_name} (workers {workers}, round {r}): {sps:,.0f} samples/s, "
                                  f"in-device {base:,.0f}, ratio {sps / base:.3f}", file=sys.stderr, flush=True)
                            if json_path:  # what was measured so far, in case the run is cut
                                Path(json_path).write_text(json.dumps(rows + [lrow], indent=1))
                    for mode_name in loaders:
                        if lrow.get(f"{mode_name}_ratio"):
                            lrow[f"{mode_name}_ratio_median"] = round(statistics.median(lrow[f"{mode_name}_ratio"]), 3)
                    lrow["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
                    summary[f"{name}-loader-{workers}"] = emit(lrow)
    keys = [f"{v}_mfu" for v in VARIANTS] + [k for v in summary.values() for k in v if "_over_" in k or k.endswith("_ratio_median")]
    keys += ["best", "best_mfu"]
    emit({**head, "measure": "summary", "wall_s": round(time.perf_counter() - started, 1),
          **{k: {kk: v[kk] for kk in dict.fromkeys(keys) if kk in v} for k, v in summary.items()}})


if __name__ == "__main__":
    main()
