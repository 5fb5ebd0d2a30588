"""Data-parallel EBDM training over the GPUs of one host (issue 17): samples/s on 1, 2, 4, 8 GPUs.

    python benchmarks/bench_train_ddp.py                       # every GPU count up to this host's
    python benchmarks/bench_train_ddp.py --gpus 1,2 --steps 300 --hidden 1024 --depth 6 --batch 8192

Each run is the worker's own launch (`consumers.worker.train_distributed`: torchrun, one
process per GPU, NCCL, NVLink multicast off) on the same case118 shards, `--batch` per GPU.
Global samples/s is rank 0's rate (from its progress lines, median after the first window)
times the GPU count; scaling efficiency = rate(n) / (n × rate(1)) (goal ≥ 0.9 at the
production config). Needs CUDA (and nats-py importable: the worker module imports it).
The step under data parallel runs eagerly (no CUDA graph: the all-reduce sits inside it);
compare with `bench_train_gpu.py`'s eager column.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from scf.bus import events as ev  # noqa: E402
from scf.consumers.worker import TrainRequest, train_distributed  # noqa: E402


class Progress(list):
    """Rank 0's progress reports (step, total, loss, samples/s)."""

    def append_progress(self, *report) -> None:
        self.append(report)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", default=None, help="GPU counts, comma-separated; default 1,2,4,8 up to this host's")
    p.add_argument("--domain", default="grid:case118")
    p.add_argument("--fossils", type=int, default=200_000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--batch", type=int, default=8192, help="per GPU")
    args = p.parse_args()
    have = torch.cuda.device_count()
    counts = [int(g) for g in args.gpus.split(",")] if args.gpus else [n for n in (1, 2, 4, 8) if n <= have]
    from bench_loader import write_shards

    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        shards = Path(tmp) / "shards"
        write_shards(shards, args.domain, args.fossils, shard_size=max(1000, args.fossils // 16))
        for n in counts:
            seen = Progress()
            window = max(1, args.steps // 6)
            config = {"steps": args.steps, "hidden": args.hidden, "depth": args.depth, "batch_size": args.batch,
                      "log_every": window, "eval_records": 256, "gpus": n}
            spec = ev.JobSpec(job_id=f"bench-{n}", intent_id="bench", domain=args.domain, pool="gpu", config=config, config_hash="bench")
            req = TrainRequest(spec=spec, data_dir=shards, out_path=Path(tmp) / f"m{n}.safetensors", device="cuda",
                               progress=seen.append_progress, threads=1, gpus=have)
            t0 = time.perf_counter()
            train_distributed(req, n)
            rates = [s[3] for s in seen][1:] or [s[3] for s in seen]
            rate = statistics.median(rates) * n
            row = {"bench": "train_ddp", "device": torch.cuda.get_device_name(0), "gpus": n, "hidden": args.hidden, "depth": args.depth,
                   "batch_per_gpu": args.batch, "steps": args.steps, "samples_per_s": round(rate), "wall_s": round(time.perf_counter() - t0, 1)}
            if 1 in rows:
                row["scaling_efficiency"] = round(rate / (n * rows[1]["samples_per_s"]), 3)
            rows[n] = row
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
