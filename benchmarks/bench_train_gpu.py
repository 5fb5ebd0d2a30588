"""EBDM training throughput with the fossil loader feeding it, against in-device data.

    python benchmarks/bench_train_gpu.py                   # CUDA if present, else a small CPU run
    python benchmarks/bench_train_gpu.py --device cuda --fossils 200000 --steps 500 --workers 6

Both runs train the same model (same config, seed and step count) with `ml.train.fit`:
  loader    — batches from `FossilLoader` over case118 shards on disk (DataLoader workers,
              pinned memory, non-blocking copies);
  in_device — the same fossils preloaded as device tensors, batches drawn by random index.
Each run is warmed up first (kernels, allocator), then timed. Prints one JSON line: samples/s
of both, their ratio (goal ≥ 0.9), and peak GPU memory (or peak RSS on CPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from bench_loader import write_shards  # noqa: E402
from scf.ml.ebdm import EBDM, EBDMConfig  # noqa: E402
from scf.ml.loader import FossilLoader, load_arrays  # noqa: E402
from scf.ml.physics import penalty_for  # noqa: E402
from scf.ml.train import fit  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_fit(config: EBDMConfig, batches, device: torch.device, penalty) -> tuple[float, int]:
    """(seconds, samples) of `config.steps` steps, after a short warm-up on the same stream."""
    torch.manual_seed(config.seed)
    warm = EBDM(EBDMConfig(**{**config.__dict__, "steps": 5}))
    fit(warm, batches, penalty=penalty, device=device)
    model = EBDM(config)
    sync(device)
    t0 = time.perf_counter()
    _, stats = fit(model, batches, penalty=penalty, device=device)
    sync(device)
    return time.perf_counter() - t0, stats.samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--domain", default="grid:case118")
    p.add_argument("--fossils", type=int, default=None, help="default: 100000 on CUDA, 4000 on CPU")
    p.add_argument("--steps", type=int, default=None, help="default: 300 on CUDA, 20 on CPU")
    p.add_argument("--batch", type=int, default=None, help="default: 4096 on CUDA, 256 on CPU")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers; default: 6 on CUDA, 0 on CPU")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    fossils = args.fossils or (100_000 if cuda else 4_000)
    steps = args.steps or (300 if cuda else 20)
    batch = args.batch or (4096 if cuda else 256)
    workers = args.workers if args.workers is not None else (6 if cuda else 0)
    config = EBDMConfig(domain=args.domain, hidden=args.hidden, depth=args.depth, steps=steps, batch_size=batch,
                        log_every=max(1, steps), seed=0).resolved()
    penalty = penalty_for(__import__("domains").get(args.domain))

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        shards = Path(tmp) / "shards"
        write_shards(shards, args.domain, fossils, shard_size=max(1000, fossils // 16))

        loader = FossilLoader(shards, domain=args.domain, batch_size=batch, num_workers=workers, epochs=None, pin_memory=cuda, split="train")
        stream = iter(loader)
        loader_batches = ((b.state, b.context) for b in stream)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t_loader, n_loader = timed_fit(config, loader_batches, device, penalty)
        peak_loader = torch.cuda.max_memory_allocated(device) if cuda else None
        del stream

        x, c, _ = load_arrays(shards, domain=args.domain, split="train")
        x, c = torch.from_numpy(x).to(device), torch.from_numpy(c).to(device)
        gen = torch.Generator(device=device).manual_seed(0)

        def in_device():
            while True:
                idx = torch.randint(0, x.shape[0], (batch,), device=device, generator=gen)
                yield x[idx], c[idx]

        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t_dev, n_dev = timed_fit(config, in_device(), device, penalty)
        peak_dev = torch.cuda.max_memory_allocated(device) if cuda else None

    loader_rate, device_rate = n_loader / t_loader, n_dev / t_dev
    result = {
        "bench": "train_gpu",
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "domain": args.domain,
        "fossils": fossils,
        "steps": steps,
        "batch": batch,
        "workers": workers,
        "hidden": args.hidden,
        "depth": args.depth,
        "params": sum(p.numel() for p in EBDM(config).parameters()),
        "loader_samples_per_s": round(loader_rate, 1),
        "in_device_samples_per_s": round(device_rate, 1),
        "ratio": round(loader_rate / device_rate, 3),
        "peak_gpu_mem_mb_loader": round(peak_loader / 2**20, 1) if cuda else None,
        "peak_gpu_mem_mb_in_device": round(peak_dev / 2**20, 1) if cuda else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "bf16_autocast": cuda,
        "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
