"""Reading a safetensors file with numpy only (no torch on an edge box): what the health
probe loads a model with, and what a numpy runtime for deployed models builds on."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (BF16 widened to float32)."""
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (TypeError, ValueError) as exc:
        # numpy has no bfloat16: read the header ourselves and widen.
        if "BF16" not in str(exc) and "bf16" not in str(exc).lower():
            raise
    return _load_with_bf16(path)


def _load_with_bf16(path: Path) -> dict[str, np.ndarray]:
    dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_, "BF16": np.uint16}
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        arr = np.frombuffer(data[base + start : base + end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
        out[name] = _bf16_to_f32(arr) if info["dtype"] == "BF16" else arr
    return out
