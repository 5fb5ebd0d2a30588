"""EBDM checkpoints: safetensors weights with their story in the header. No pickle anywhere.

The safetensors metadata header (string → string) holds:

    format         "scf-ebdm/1"
    config         the resolved EBDMConfig, JSON (enough to rebuild the model)
    config_sha256  sha256 of that JSON (sorted keys)
    lineage        the data it was trained on, JSON (domain, shard names/sizes/sha256 or a
                   stream sequence range, the loader position at the end)
    metrics        evaluation metrics, JSON
    torch_version  torch.__version__ of the writer
    created_at     UTC, ISO 8601
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from scf.bus.errors import SCFError
from scf.ml.ebdm import EBDM, EBDMConfig

FORMAT = "scf-ebdm/1"


class CheckpointError(SCFError):
    pass


def config_sha256(config: EBDMConfig) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode()).hexdigest()


def save_checkpoint(path: str | os.PathLike, model: EBDM, *, lineage: dict, metrics: dict[str, float]) -> Path:
    """Write `model` (weights and buffers) with its config, lineage and metrics; atomic."""
    config = model.config
    return write_module(path, model, FORMAT, dataclasses.asdict(config), lineage=lineage, metrics=metrics,
                        extra={"config_sha256": config_sha256(config)})


def write_module(
    path: str | os.PathLike, module: torch.nn.Module, format: str, config: dict, *, lineage: dict,
    metrics: dict[str, float], extra: dict[str, str] | None = None,
) -> Path:
    """Write a module's weights and buffers as safetensors with the header every SCF model
    file carries (format, config, lineage, metrics as JSON; torch_version, created_at);
    atomic. The one writer of model files (EBDM checkpoints, learned optimisers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    metadata = {
        "format": format,
        "config": json.dumps(config, sort_keys=True),
        "lineage": json.dumps(lineage, sort_keys=True, default=str),
        "metrics": json.dumps(metrics, sort_keys=True),
        "torch_version": torch.__version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        **(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The header of a checkpoint, JSON fields decoded; reads no tensor."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({exc}): pass a file written by ml.checkpoint") from None
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {raw.get('format')!r}, not {FORMAT!r}: it was not written by ml.checkpoint.save_checkpoint")
    meta = dict(raw)
    for key in ("config", "lineage", "metrics"):
        meta[key] = json.loads(raw[key])
    return meta


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[EBDM, dict]:
    """(model in eval mode on `device`, metadata). Weights load through safetensors only."""
    meta = read_metadata(path)
    model = EBDM(EBDMConfig.from_dict(meta["config"]))
    state = load_file(str(path), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit its config (missing {missing}, unexpected {unexpected}): the file is damaged or from another model version")
    return model.to(device).eval(), meta


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (what CheckpointInfo.sha256 carries)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
