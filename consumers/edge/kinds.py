"""Which model kinds an edge node runs, and what kind a deployed file is (numpy only).

The `production` alias has one head per (domain, kind): `ebdm`, `optimiser`, `code`
(producers/verify.py). An edge node that controls a plant runs a *controller*: the control
loop (control.py, grid_control.py) decides setpoints or dispatch with a learned optimiser
(`scf-opt/1`) or its ternary student (`scf-ternary/1`, model `optimiser`), run by
learned.py; it also runs the two hand-made controller files (a `decision` tensor, a
`policy.N` network). An EBDM is a generative model of fossils (it scores states; the
daemon and the verifier use it, it decides nothing) and a code model writes code in the
foundry: deployed to a plant's node either would replace its controller with something the
loop cannot run (the status quo would take over). So such a node runs `optimiser` only.

`[edge] runs` (EdgeSettings) lists the kinds a node takes; empty (the default) means:
`["optimiser"]` when the node controls a plant, every kind when it has none (a deploy-only
node: what it holds runs nowhere). An order is refused with the reason when

1. its signed promotion states a kind the node does not run (checked before any fetch), or
2. the fetched file (its digest already checked) is not a model of a kind the node runs
   (a promotion written before kinds existed, or a ternary student's promotion, states
   none: the file's own header decides).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from scf.bus.errors import ConfigError

KINDS = ("ebdm", "optimiser", "code")  # as producers/verify.py (the edge does not import producers)
OPT_FORMAT, TERNARY_FORMAT = "scf-opt/1", "scf-ternary/1"
EBDM_FORMAT = "scf-ebdm/1"
CODE_FORMATS = ("scf-ternary-lm/1", "scf-code-model/1")
MAX_HEADER = 100 * 1024 * 1024


class KindError(ConfigError):
    """`[edge] runs` names something that is not a model kind."""


def accepted(runs: list[str] | tuple[str, ...], has_plant: bool) -> tuple[str, ...] | None:
    """The kinds a node takes (None: every kind). Raises KindError on an unknown name."""
    bad = [k for k in runs if k not in KINDS]
    if bad:
        raise KindError(f"[edge] runs names {', '.join(map(repr, bad))}: the model kinds are {', '.join(KINDS)}")
    if runs:
        return tuple(dict.fromkeys(runs))
    return ("optimiser",) if has_plant else None


def _header(path: Path) -> tuple[dict[str, str], set[str]]:
    """(metadata, tensor names) of a safetensors file; reads no tensor."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("shorter than a safetensors header")
        n = struct.unpack("<Q", raw)[0]
        if n > MAX_HEADER:
            raise ValueError(f"header of {n} bytes")
        head = json.loads(f.read(n))
    if not isinstance(head, dict):
        raise ValueError("header is not a JSON object")
    meta = head.pop("__metadata__", None) or {}
    return (meta if isinstance(meta, dict) else {}), set(head)


def file_kind(path: Path) -> tuple[str, str]:
    """(kind, what the file is, in words) from the file's own header: kind is one of KINDS,
    or "" when the file is no model the edge knows."""
    try:
        meta, names = _header(Path(path))
    except (OSError, ValueError, struct.error) as exc:
        return "", f"a file that is not a safetensors model ({exc})"
    fmt = str(meta.get("format") or "")
    if fmt == OPT_FORMAT:
        return "optimiser", "a learned optimiser (scf-opt/1)"
    if fmt == TERNARY_FORMAT:
        model = str(meta.get("model") or "")
        if model == "optimiser":
            return "optimiser", "a learned optimiser's ternary student (scf-ternary/1)"
        return "ebdm", f"an EBDM's ternary student (scf-ternary/1, model {model or 'ebdm'!r})"
    if fmt == EBDM_FORMAT:
        return "ebdm", "an EBDM (scf-ebdm/1, a generative model of fossils)"
    if fmt in CODE_FORMATS:
        return "code", f"a code model ({fmt})"
    if "decision" in names:
        return "optimiser", "a fixed decision (a `decision` tensor the control loop runs)"
    if "policy.0.weight" in names:
        return "optimiser", "a policy network (`policy.N` layers the control loop runs)"
    return "", f"a model of format {fmt!r}" if fmt else "a model with no stated format and no controller tensors"


def refusal(node: str, runs: tuple[str, ...], what: str, running: str | None) -> str:
    """The reason an order of another kind is refused (one line)."""
    keeps = f"it keeps running {running}" if running else "it runs nothing new"
    why = ("its control loop runs a learned optimiser (or its ternary student); an EBDM or a code model "
           "decides nothing there") if runs == ("optimiser",) else f"[edge] runs = {list(runs)}"
    return f"wrong model kind: {node} runs {' or '.join(runs)} only ({why}); the order is {what}: not deployed, {keeps}"


__all__ = ["KINDS", "KindError", "accepted", "file_kind", "refusal"]
