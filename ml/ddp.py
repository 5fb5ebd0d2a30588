"""Data-parallel training over the GPUs of one host: torchrun's entry point and its launcher.

    python -m torch.distributed.run --standalone --nproc-per-node 4 -m scf.ml.ddp \\
        --config '{"domain": "grid:case118", "steps": 2000}' --data shards/ --out-dir out/ \\
        --device cuda --progress out/progress.ndjson --result out/result.json

One process per GPU (NCCL; gloo on CPU, as the tests run it). Each rank reads its share of
the fossils (`FossilLoader(rank=, world_size=)`: slots never overlap, every record once per
epoch over all ranks), starts from the same weights (the config's seed) and averages its
gradients with the others after every backward (one flat all-reduce), so every rank holds
the same weights after every step. Only rank 0 reports progress (NDJSON lines in
`--progress`), evaluates, writes the checkpoint and then `--result` (JSON: checkpoint,
sha256, metrics, steps, samples). A rank that fails makes torchrun stop the others and exit
non-zero: the worker then fails the attempt and publishes nothing of it.

NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and its kin, in `NVLS_OFF`): on shared hosts
it can put the GPUs out of service.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from scf.bus.files import atomic_write

NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def gpu_count() -> int:
    """CUDA devices this process can see (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def all_reduce_mean(params: list[torch.Tensor]) -> None:
    """Average the parameters' gradients over the ranks: one all-reduce of one flat buffer."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)


def torchrun_argv(nproc: int, *, config: dict, data: Path, out_dir: Path, device: str, progress: Path, result: Path) -> list[str]:
    """The command that trains `config` on `nproc` processes of this host."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0",
        "-m", "scf.ml.ddp", "--config", json.dumps(config), "--data", str(data), "--out-dir", str(out_dir),
        "--device", device, "--progress", str(progress), "--result", str(result),
    ]  # fmt: skip


def launch_env(threads: int = 1) -> dict[str, str]:
    """The environment of the ranks: NVLink multicast off, one CPU thread per rank unless set."""
    env = {**os.environ, **NVLS_OFF}
    env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def _progress_writer(path: Path):
    f = open(path, "a", buffering=1)  # line-buffered: the worker tails it

    def report(step: int, total: int, loss: float, samples_per_s: float) -> None:
        f.write(json.dumps({"step": step, "total": total, "loss": loss, "samples_per_s": samples_per_s, "at": time.time()}) + "\n")

    report.close = f.close  # type: ignore[attr-defined]
    return report


def main(argv: list[str] | None = None) -> int:
    """One rank (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous)."""
    from scf.ml.ebdm import EBDMConfig
    from scf.ml.train import train

    p = argparse.ArgumentParser(prog="python -m scf.ml.ddp", description="one rank of data-parallel EBDM training")
    p.add_argument("--config", required=True, help="EBDMConfig fields as JSON")
    p.add_argument("--data", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--progress", required=True)
    p.add_argument("--result", required=True)
    args = p.parse_args(argv)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = args.device.startswith("cuda")
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        config = EBDMConfig.from_params(json.loads(args.config))
        progress = _progress_writer(Path(args.progress)) if rank == 0 else None
        result = train(
            config, args.data, out_dir=args.out_dir, device=device, progress_cb=progress,
            rank=rank, world_size=world, grad_reduce=all_reduce_mean, lineage={"world_size": world, "backend": dist.get_backend()},
        )
        if result is not None:
            out = {"checkpoint": str(result.checkpoint), "sha256": result.sha256, "metrics": result.metrics,
                   "steps": result.steps, "samples": result.samples * world, "world_size": world, "duration_s": result.duration_s}
            atomic_write(Path(args.result), json.dumps(out).encode())
        if progress is not None:
            progress.close()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
