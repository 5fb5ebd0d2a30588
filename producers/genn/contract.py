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
    from scf.domains.sandbox import contract_spec

    return contract_spec(domains.get(domain))


# A code contract's parameters, read from a codegen intent's params (each optional): they change
# the scenarios the sandbox runs the candidate against and the cost it is scored by
# (scf.domains.sandbox.Trial.for_contract), and the task states them, so each contract's prompt
# names what it asks.
CONTRACT_PARAMS = {
    "grid": ("load_scale", "voll", "target"),
    "hvac": ("t_out_shift", "comfort_weight", "target"),
}
DEFAULTS = {"load_scale": 1.0, "voll": 1000.0, "t_out_shift": 0.0, "comfort_weight": 10.0}
STATUS_QUO = {"grid": "pro rata on capacity, meeting the demand every step", "hvac": "a scheduled thermostat"}


def contract_params(domain: str, params: Mapping[str, Any] | None) -> dict[str, float]:
    """The code contract's parameters among an intent's params (numbers only; defaults filled in)."""
    kind = domain.split(":", 1)[0]
    p = params or {}
    out = {k: float(v) for k, v in DEFAULTS.items() if k in CONTRACT_PARAMS.get(kind, ())}
    for k in CONTRACT_PARAMS.get(kind, ()):
        v = p.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def task(domain: str, constraints: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None) -> str:
    """The prompt's task: the contract for `domain` — its names, units and bounds, the contract's
    scenario, objective and target (`params`: an intent's params, `CONTRACT_PARAMS`), and a client
    contract's constraints where given."""
    try:
        s = spec(domain)
    except SCFError as exc:
        raise ContractError(f"{exc}") from None
    c = contract_params(domain, params)
    bounds = ", ".join(f"{n} in [{lo:g}, {hi:g}]" for n, lo, hi in zip(s["state_names"], s["state_lo"], s["state_hi"]))
    grid = s["kind"] == "grid"
    lines = [
        f"Write a Python module with a class `Controller` that controls {s['domain']}.",
        "`Controller(spec)` is built once; `spec` is a dict with keys domain, kind, state_names, context_names,"
        " state_lo, state_hi, state_unit, energy_unit, dt_h" + (", cost_c2, cost_c1, ramp_per_h." if grid else "."),
        "`step(self, observation)` is called every control step; `observation` is a dict: `step` (int),"
        " `context` (list of floats, in context_names order), `state` (the previous setpoints, list of floats).",
        f"It returns a list of {len(s['state_names'])} floats, the setpoints in state_names order ({s['state_unit']}): {bounds}.",
        f"Context variables: {', '.join(s['context_names'])}.",
    ]
    if grid:
        from scf import domains

        nominal = float(domains.get(domain).nominal_load.sum())
        lines += [
            "Unit costs ($/h at p MW: cost_c2 p^2 + cost_c1 p): " + ", ".join(
                f"{n} {a:g} p^2 + {b:g} p" for n, a, b in zip(s["state_names"], s["cost_c2"], s["cost_c1"])) + ".",
            f"Scenario: the loads follow a daily profile at {c['load_scale']:g} x the case's nominal {nominal:.0f} MW"
            f" (about {nominal * c['load_scale']:.0f} MW in all), with noise.",
            f"Objective: make the generation cost ($) low; every MWh of imbalance (supply minus the sum of the loads) costs {c['voll']:g} $.",
        ]
    else:
        lines += [
            f"Scenario: a day of weather with the outdoor temperature shifted by {c['t_out_shift']:+g} °C; occupancy follows office hours.",
            f"Objective: make the energy ({s['energy_unit']}) low; every zone-degree-hour outside the comfort band (21-24 °C occupied,"
            f" 16-28 °C empty) costs {c['comfort_weight']:g} kWh.",
        ]
    if "target" in c:
        lines.append(f"Target: a total cost at most {c['target']:g} x the status quo's ({STATUS_QUO[s['kind']]}) on the same scenarios.")
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


__all__ = ["ContractError", "spec", "task", "load_constraints", "contract_params", "CONTRACT_PARAMS", "DEFAULTS"]
