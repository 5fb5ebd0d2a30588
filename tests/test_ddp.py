"""Data-parallel training (issue 17) on CPU with gloo: two real processes under torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from scf.bus import events as ev
from scf.consumers.dispatch import WorkerInfo, choose_pool
from scf.consumers.worker import TrainRequest, WorkerError, train_distributed
from scf.domains.fossils import synth_shards
from scf.ml.ddp import NVLS_OFF, launch_env

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("case9")
    synth_shards("grid:case9", 300, out, shard_size=80, seed=4)
    return out


@pytest.mark.slow
def test_two_gloo_ranks_shard_the_data_exactly_and_hold_identical_weights(shards, tmp_path):
    support = Path(__file__).with_name("ddp_support.py")
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(support), str(shards), str(tmp_path)],
        check=True, env=launch_env(), timeout=240, capture_output=True,
    )
    r0, r1 = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1))
    every = sorted(float(f.energy) for p in sorted(shards.glob("*.ndjson")) for f in (msgspec.json.decode(line, type=ev.Fossil) for line in p.read_bytes().splitlines()))
    assert len(set(every)) == 300  # energies identify the records here
    assert r0["energies"] and r1["energies"] and not set(r0["energies"]) & set(r1["energies"])  # no overlap
    assert sorted(r0["energies"] + r1["energies"]) == pytest.approx(every)  # and nothing left out
    assert r0["steps"] == r1["steps"] == 2
    assert r0["batches"] != r1["batches"]  # each rank trained on its own data …
    assert r0["init"] == r1["init"] and r0["after"] == r1["after"] != r0["init"]  # … to the same weights


def _request(shards: Path, tmp_path: Path, config: dict, seen: list) -> TrainRequest:
    spec = ev.JobSpec(job_id="job-ddp", intent_id="intent-ddp", domain="grid:case9", pool="local", config=config, config_hash="h")
    return TrainRequest(spec=spec, data_dir=shards, out_path=tmp_path / "model.safetensors", device="cpu",
                        progress=lambda *a: seen.append(a), threads=1, gpus=2)


@pytest.mark.slow
def test_the_worker_trains_a_job_on_two_ranks_and_rank_zero_alone_checkpoints(shards, tmp_path):
    from scf.ml.checkpoint import load_checkpoint

    seen: list = []
    req = _request(shards, tmp_path, {"steps": 6, "hidden": 32, "depth": 1, "batch_size": 16, "log_every": 2, "eval_records": 16, "gpus": 2}, seen)
    result = train_distributed(req, 2, device="cpu", poll=0.1)
    assert result.path == req.out_path and result.path.exists()
    assert result.metrics["world_size"] == 2 and result.metrics["steps"] == 6
    assert [s[0] for s in seen] == [2, 4, 6]  # rank 0's progress only, each step once
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # one checkpoint; the scratch is gone
    model, meta = load_checkpoint(result.path)
    assert model.config.hidden == 32 and meta["lineage"]["world_size"] == 2


@pytest.mark.slow
def test_a_failed_rank_fails_the_job_and_leaves_nothing(tmp_path):
    seen: list = []
    (tmp_path / "empty").mkdir()
    req = _request(tmp_path / "empty", tmp_path, {"steps": 4, "hidden": 16, "depth": 1, "gpus": 2}, seen)
    with pytest.raises(WorkerError, match="data-parallel training on 2 processes failed \\(torchrun exit 1\\)") as err:
        train_distributed(req, 2, device="cpu", poll=0.1)
    assert "holds no *.ndjson shard" in str(err.value)
    assert not req.out_path.exists() and [p.name for p in tmp_path.iterdir()] == ["empty"]


def test_dispatch_routes_a_multi_gpu_job_to_a_worker_that_has_the_gpus():
    workers = [WorkerInfo(worker_id="a", pool="small", gpus=1), WorkerInfo(worker_id="b", pool="big", gpus=8, busy=True)]
    assert choose_pool(None, workers, gpus=4) == "big"
    assert choose_pool(None, workers, gpus=0) == "small"  # an ordinary job: the idle pool
    assert choose_pool(None, workers, gpus=16) == "small"  # nobody has 16: routed as any job


def test_the_ranks_run_with_nvlink_multicast_off():
    env = launch_env()
    assert all(env[k] == v for k, v in NVLS_OFF.items()) and env["NCCL_NVLS_ENABLE"] == "0"
