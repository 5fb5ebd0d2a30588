"""One rank of tests/test_ddp.py's data-parallel check, run under torchrun with gloo:

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/ddp_support.py SHARDS OUT

Writes OUT/rank-<r>.json: the energies of this rank's share of one epoch (FossilLoader with
rank/world_size), a digest of the initial weights and of the weights after two steps of
`ml.train.fit` with `ml.ddp.all_reduce_mean`, and a digest of the batches it trained on."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from scf.ml.ddp import all_reduce_mean
from scf.ml.ebdm import EBDM, EBDMConfig
from scf.ml.loader import FossilLoader
from scf.ml.train import fit


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    shards, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    epoch = FossilLoader(shards, domain="grid:case9", batch_size=16, rank=rank, world_size=world, epochs=1, shuffle_buffer=4096)
    energies = [float(e) for b in epoch for e in b.energy]
    config = EBDMConfig(domain="grid:case9", hidden=32, depth=1, steps=2, batch_size=16, ema=0.0, seed=3, warmup=1)
    torch.manual_seed(config.seed)
    model = EBDM(config)
    init = digest(model)
    loader = FossilLoader(shards, domain="grid:case9", batch_size=16, rank=rank, world_size=world, epochs=None, shuffle_buffer=4096)
    seen = hashlib.sha256()

    def batches():
        for b in loader:
            seen.update(b.state.numpy().tobytes())
            yield b.state, b.context

    trained, stats = fit(model, batches(), grad_reduce=all_reduce_mean)
    result = {"rank": rank, "world": world, "energies": energies, "init": init, "after": digest(trained), "steps": stats.steps, "batches": seen.hexdigest()}
    (out / f"rank-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
