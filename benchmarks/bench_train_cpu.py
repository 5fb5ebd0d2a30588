"""CPU training speed of the demo's model: the old way against the current one, in one run.

    python benchmarks/bench_train_cpu.py                 # the demo's config: case14, hidden 64, depth 2, batch 128
    python benchmarks/bench_train_cpu.py --steps 200 --hidden 256 --batch 256

Both runs train the same model (config, seed, step count) with `ml.train.fit`, batches from
`FossilLoader` over the same shards:
  before — torch's default intra-op threads (one per core), batches decoded from the NDJSON;
  after  — `ml.train.cpu_threads` (one thread for a small model), batches from the columnar cache.
Warm-up first (the optimiser's one-off imports, the cache built). Prints samples/s of both
and their ratio (issue 16, goal 5: ≥ 10×), with the machine's load average: CPU timings on a
shared machine are noisy, the ratio in one run less so.
Then the score's two ways on the "after" setup (`score_impl`): autograd's double backward
against the analytic score (the default), `--rounds` runs each, alternated, medians compared.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from scf import domains  # noqa: E402
from scf.domains.fossils import synth_shards  # noqa: E402
from scf.ml.ebdm import EBDM, EBDMConfig  # noqa: E402
from scf.ml.loader import FossilLoader  # noqa: E402
from scf.ml.physics import penalty_for  # noqa: E402
from scf.ml.train import cpu_threads, fit, torch_threads  # noqa: E402


def run(config: EBDMConfig, shards: Path, threads: int | None, columnar: bool) -> float:
    """samples/s of `config.steps` steps."""
    loader = FossilLoader(shards, domain=config.domain, batch_size=config.batch_size, epochs=None, split="train", columnar=columnar)
    batches = ((b.state, b.context) for b in loader)
    penalty = penalty_for(domains.get(config.domain))
    with torch_threads(threads):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        _, stats = fit(EBDM(config), batches, penalty=penalty)
        return stats.samples / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--domain", default="grid:case14")
    p.add_argument("--fossils", type=int, default=600)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="alternated runs of each score implementation")
    args = p.parse_args()
    config = EBDMConfig(domain=args.domain, steps=args.steps, hidden=args.hidden, depth=args.depth, batch_size=args.batch, log_every=args.steps)
    with tempfile.TemporaryDirectory(prefix="bench-train-cpu-") as tmp:
        shards = Path(tmp) / "shards"
        synth_shards(args.domain, args.fossils, shards, shard_size=max(100, args.fossils // 3), seed=7)
        warm = EBDMConfig(**{**config.__dict__, "steps": 3})
        run(warm, shards, None, False)
        run(warm, shards, cpu_threads(warm), True)
        before = run(config, shards, None, False)
        after = run(config, shards, cpu_threads(config), True)
        impls: dict[str, list[float]] = {"autograd": [], "analytic": []}
        for _ in range(args.rounds):
            for impl, rates in impls.items():
                cfg = dataclasses.replace(config, score_impl=impl)
                rates.append(run(cfg, shards, cpu_threads(cfg), True))
        autograd, analytic = (statistics.median(impls[k]) for k in ("autograd", "analytic"))
    print(json.dumps({
        "bench": "train_cpu", "domain": args.domain, "fossils": args.fossils, "steps": args.steps, "hidden": args.hidden,
        "depth": args.depth, "batch": args.batch, "cores": os.cpu_count(), "default_threads": torch.get_num_threads(),
        "threads_after": cpu_threads(config) or torch.get_num_threads(),
        "before_samples_per_s": round(before, 1), "after_samples_per_s": round(after, 1), "ratio": round(after / before, 2),
        "score_autograd_samples_per_s": round(autograd, 1), "score_analytic_samples_per_s": round(analytic, 1),
        "analytic_over_autograd": round(analytic / autograd, 2), "rounds": args.rounds,
        "load_avg_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
