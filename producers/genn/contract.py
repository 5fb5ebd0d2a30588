"""The code contract GenN writes against, as the generator sees it: the task text of the prompt
and the `spec` a controller is built with.

The contract (docs/codegen.md, checked by `scf.domains.ethics.gate`): a module defining

    class Controller:
        def __init__(self, spec): ...          # spec: the dict of `spec(domain)` below
        def step(self, observation): ...       # observation: {"step", "context", "state"}
                                               # -> a list of setpoints, one per state variable

The task names the domain's variables, units and bounds, and any constraints of a contract
(a client's limits, as a JSON object). Only math/numpy-style imports; no I/O.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from scf.bus.errors import SCFError


class ContractError(SCFError):
    pass


def spec(domain: str) -> dict[str, Any]:
    """What `Controller(spec)` gets for `domain`: names, bounds and units (plain JSON values)."""
    from scf import domains

    d = domains.get(domain)
    lo, hi = d.state_bounds
    return {
        "domain": d.name,
        "kind": d.kind,
        "state_names": list(d.state_names),
        "context_names": list(d.context_names),
        "state_lo": [float(x) for x in lo],
        "state_hi": [float(x) for x in hi],
        "state_unit": d.state_unit,
        "energy_unit": d.energy_unit,
        "dt_h": d.sample_interval.total_seconds() / 3600.0,
    }


def task(domain: str, constraints: Mapping[str, Any] | None = None) -> str:
    """The prompt's task: the contract for `domain`, with a contract's constraints where given."""
    try:
        s = spec(domain)
    except SCFError as exc:
        raise ContractError(f"{exc}") from None
    bounds = ", ".join(f"{n} in [{lo:g}, {hi:g}]" for n, lo, hi in zip(s["state_names"], s["state_lo"], s["state_hi"]))
    lines = [
        f"Write a Python module with a class `Controller` that controls {s['domain']}.",
        "`Controller(spec)` is built once; `spec` is a dict with keys domain, kind, state_names, context_names,"
        " state_lo, state_hi, state_unit, energy_unit, dt_h.",
        "`step(self, observation)` is called every control step; `observation` is a dict: `step` (int),"
        " `context` (list of floats, in context_names order), `state` (the previous setpoints, list of floats).",
        f"It returns a list of {len(s['state_names'])} floats, the setpoints in state_names order ({s['state_unit']}): {bounds}.",
        f"Context variables: {', '.join(s['context_names'])}.",
        f"Goal: keep every constraint of the domain and make the energy ({s['energy_unit']}) low.",
    ]
    if constraints:
        lines.append("Contract constraints: " + json.dumps(dict(constraints), sort_keys=True, separators=(", ", ": ")))
    lines.append("Use only math and numpy; no imports beyond them, no files, no network, no eval.")
    return "\n".join(lines)


def load_constraints(path: str) -> dict[str, Any]:
    """A constraints JSON file: one object of scalars (or lists of numbers)."""
    from pathlib import Path

    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ContractError(f"constraints file {path} does not exist: give a JSON object file") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ContractError(f"constraints file {path} is not JSON ({exc}): give a JSON object such as {{\"max_cost\": 5000}}") from None
    if not isinstance(data, dict):
        raise ContractError(f"constraints file {path} holds a {type(data).__name__}: give a JSON object such as {{\"max_cost\": 5000}}")
    return data


__all__ = ["ContractError", "spec", "task", "load_constraints"]
