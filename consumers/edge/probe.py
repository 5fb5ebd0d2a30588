"""The health probe run after every activation (and on a redelivered order for what runs):
does the model load with numpy and answer a probe? Numpy only (no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scf.consumers.edge.tensors import load_tensors
from scf.consumers.edge.ternary import is_packed
from scf.consumers.edge.ternary import probe as probe_packed


def health_check(path: Path, max_elements: int = 50_000_000) -> str | None:
    """None when the model loads and answers a probe; otherwise the reason it does not.

    Numpy only (no torch). The checks: the file parses as safetensors; it holds at least
    one floating-point tensor; every floating tensor is finite (tensors beyond
    `max_elements` are checked on a strided sample); and the probe — the first 2-D float
    tensor W (by name), taken as a linear layer, maps a fixed input x (a ramp in [-1, 1])
    to W @ x (+ a bias of matching shape when present) with a finite, non-degenerate result.
    This is SCF's own minimal probe: ml/ offers no numpy-only one (docs/deploy.md). A
    ternary student (its header states `scf-ternary/1`) is unpacked (every code checked)
    and run on a fixed input by the numpy runtime instead (`ternary.probe`, docs/distill.md);
    a learned optimiser (`scf-opt/1`, or its student) is loaded by its runtime, every part
    checked, and its proposal network run on the middle of its context bounds
    (`learned.probe`)."""
    from scf.consumers.edge.learned import is_learned
    from scf.consumers.edge.learned import probe as probe_learned
    from scf.consumers.edge.ternary import read_metadata

    try:
        learned = is_learned(read_metadata(path))
    except Exception:  # noqa: BLE001 - unreadable: the checks below say why
        learned = False
    if learned:  # a learned optimiser (scf-opt/1, or its ternary student): loaded and run by its runtime
        return probe_learned(path)
    if is_packed(path):  # a ternary student (format scf-ternary/1): unpacked and run by its runtime
        return probe_packed(path)
    try:
        tensors = load_tensors(path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError, and any failure to load is the answer
        return f"the model does not load: {type(exc).__name__}: {exc}"
    floats = {k: v for k, v in tensors.items() if np.issubdtype(v.dtype, np.floating)}
    if not floats:
        return "the model holds no floating-point tensor"
    for name in sorted(floats):
        t = floats[name]
        flat = t.reshape(-1)
        if flat.size > max_elements:
            flat = flat[:: max(1, flat.size // max_elements)]
        if not np.isfinite(flat).all():
            return f"tensor {name} {list(t.shape)} holds non-finite values (NaN or inf)"
    matrices = [k for k in sorted(floats) if floats[k].ndim == 2 and floats[k].size > 0]
    if matrices:
        name = matrices[0]
        w = floats[name].astype(np.float64)
        x = np.linspace(-1.0, 1.0, w.shape[1])
        with np.errstate(all="ignore"):
            y = w @ x
            bias_name = name.rsplit(".", 1)[0] + ".bias" if "." in name else ""
            b = floats.get(bias_name)
            if b is not None and b.shape == (w.shape[0],):
                y = y + b
        if not np.isfinite(y).all():
            return f"the probe through {name} {list(w.shape)} answers non-finite values"
    return None
