"""The `search` backend: controllers composed from parametrised templates and mutated (program
search), no model. It writes good and bad code from the first day, so the loop has something
to judge and the CFR dataset gets approved and rejected examples before any model exists.

A candidate is a template for the domain's kind (grid: pro-rata on capacity, merit order,
economic dispatch on the units' cost curves, smoothed pro-rata; hvac: proportional, deadband, proportional-integral; any: mid-range hold)
with parameters drawn from ranges, then, with probability `bug_rate`, one *defect*: the
mistakes code models make (a network price lookup, a log file, `eval` of a formula, an
environment read, no clipping to the bounds, a setpoint short, a syntax slip, the class
misnamed). The defects the static gate sees are rejected there; the others (no clipping, a
setpoint short) are what the sandbox's run against the simulator is for. `temperature`
widens the parameter ranges. Deterministic: the same (intent, seed) gives the same code.

The generator never runs the code it writes (nothing generated runs in-process).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable

from scf.producers.genn import Candidate, CodeRequest, Identity

VERSION = "search-v1"

# --------------------------------------------------------------------------- templates
# Each renders a whole module from parameters. Placeholders: {name} via str.format; braces of
# the code itself are doubled.

GRID_PRORATA = '''import numpy as np


class Controller:
    """Share the demand among the units in proportion to their headroom."""

    def __init__(self, spec):
        self.lo = np.asarray(spec["state_lo"], dtype=float)
        self.hi = np.asarray(spec["state_hi"], dtype=float)
        self.loads = [i for i, n in enumerate(spec["context_names"]) if n.startswith("Pd")]
        self.margin = {margin}

    def step(self, observation):
        context = observation["context"]
        demand = sum(context[i] for i in self.loads) * (1.0 + self.margin)
        room = self.hi - self.lo
        share = room / max(float(room.sum()), 1e-9)
        setpoints = self.lo + share * max(demand - float(self.lo.sum()), 0.0)
        return np.clip(setpoints, self.lo, self.hi).tolist()
'''

GRID_MERIT = '''import numpy as np


class Controller:
    """Fill the units in a fixed priority order up to their capacity (merit order)."""

    def __init__(self, spec):
        self.lo = np.asarray(spec["state_lo"], dtype=float)
        self.hi = np.asarray(spec["state_hi"], dtype=float)
        self.loads = [i for i, n in enumerate(spec["context_names"]) if n.startswith("Pd")]
        self.order = [i % len(self.lo) for i in {order}]
        self.margin = {margin}

    def step(self, observation):
        context = observation["context"]
        left = sum(context[i] for i in self.loads) * (1.0 + self.margin) - float(self.lo.sum())
        setpoints = self.lo.copy()
        for i in self.order:
            take = min(max(left, 0.0), self.hi[i] - setpoints[i])
            setpoints[i] += take
            left -= take
        return np.clip(setpoints, self.lo, self.hi).tolist()
'''

GRID_SMOOTH = '''import numpy as np


class Controller:
    """Pro-rata on capacity, moved toward from the previous setpoints by a fixed fraction."""

    def __init__(self, spec):
        self.lo = np.asarray(spec["state_lo"], dtype=float)
        self.hi = np.asarray(spec["state_hi"], dtype=float)
        self.loads = [i for i, n in enumerate(spec["context_names"]) if n.startswith("Pd")]
        self.alpha = {alpha}

    def step(self, observation):
        context = observation["context"]
        demand = sum(context[i] for i in self.loads)
        room = self.hi - self.lo
        target = self.lo + room / max(float(room.sum()), 1e-9) * max(demand - float(self.lo.sum()), 0.0)
        previous = np.asarray(observation.get("state") or target, dtype=float)
        setpoints = previous + self.alpha * (target - previous)
        return np.clip(setpoints, self.lo, self.hi).tolist()
'''

GRID_ECONOMIC = '''import numpy as np


class Controller:
    """Economic dispatch: every unit at the same marginal cost (bisection on it), within its ramp window."""

    def __init__(self, spec):
        self.lo = np.asarray(spec["state_lo"], dtype=float)
        self.hi = np.asarray(spec["state_hi"], dtype=float)
        self.loads = [i for i, n in enumerate(spec["context_names"]) if n.startswith("Pd")]
        self.c2 = np.maximum(np.asarray(spec["cost_c2"], dtype=float), 1e-6)
        self.c1 = np.asarray(spec["cost_c1"], dtype=float)
        self.ramp = np.asarray(spec["ramp_per_h"], dtype=float) * float(spec["dt_h"]) * {ramp_use}
        self.margin = {margin}

    def step(self, observation):
        context = observation["context"]
        demand = sum(context[i] for i in self.loads) * (1.0 + self.margin)
        lo, hi = self.lo, self.hi
        previous = observation.get("state")
        if previous and observation["step"] > 0:
            previous = np.asarray(previous, dtype=float)
            lo = np.maximum(self.lo, previous - self.ramp)
            hi = np.minimum(self.hi, np.maximum(previous + self.ramp, lo))
        low, high = float(np.min(self.c1)) - 1.0, float(np.max(self.c1 + 2 * self.c2 * self.hi)) + 1.0
        for _ in range({iterations}):
            price = (low + high) / 2
            if np.clip((price - self.c1) / (2 * self.c2), lo, hi).sum() < demand:
                low = price
            else:
                high = price
        setpoints = np.clip((high - self.c1) / (2 * self.c2), lo, hi)
        return np.clip(setpoints, self.lo, self.hi).tolist()
'''

HVAC_PROPORTIONAL = '''import numpy as np


class Controller:
    """Heat or cool each zone in proportion to its distance from the comfort target."""

    def __init__(self, spec):
        self.lo = np.asarray(spec["state_lo"], dtype=float)
        self.hi = np.asarray(spec["state_hi"], dtype=float)
        names = spec["context_names"]
        self.zones = [i for i, n in enumerate(names) if n.startswith("T0[")]
        self.occupancy = [i for i, n in enumerate(names) if n.startswith("occ[")]
        self.gain = {gain}
        self.occupied = {occupied}
        self.empty = {empty}

    def step(self, observation):
        context = observation["context"]
        temps = np.asarray([context[i] for i in self.zones], dtype=float)
        occ = np.asarray([context[i] for i in self.occupancy], dtype=float)
        target = np.where(occ > 0.0, self.occupied, self.empty)
        return np.clip(self.gain * (target - temps), self.lo, self.hi).tolist()
'''

HVAC_DEADBAND = '''import numpy as np


class Controller:
    """Full power outside a dead band around the target, nothing inside it."""

    def __init__(self, spec):
        self.lo = np.asarray(spec["state_lo"], dtype=float)
        self.hi = np.asarray(spec["state_hi"], dtype=float)
        self.zones = [i for i, n in enumerate(spec["context_names"]) if n.startswith("T0[")]
        self.target = {target}
        self.band = {band}
        self.power = {power}

    def step(self, observation):
        context = observation["context"]
        temps = np.asarray([context[i] for i in self.zones], dtype=float)
        u = np.zeros_like(temps)
        u = np.where(temps < self.target - self.band, self.power * self.hi, u)
        u = np.where(temps > self.target + self.band, self.power * self.lo, u)
        return np.clip(u, self.lo, self.hi).tolist()
'''

HVAC_PI = '''import numpy as np


class Controller:
    """Proportional-integral control of each zone toward the target, the integral clamped."""

    def __init__(self, spec):
        self.lo = np.asarray(spec["state_lo"], dtype=float)
        self.hi = np.asarray(spec["state_hi"], dtype=float)
        self.zones = [i for i, n in enumerate(spec["context_names"]) if n.startswith("T0[")]
        self.kp = {kp}
        self.ki = {ki}
        self.target = {target}
        self.integral = np.zeros(len(self.lo))

    def step(self, observation):
        context = observation["context"]
        error = self.target - np.asarray([context[i] for i in self.zones], dtype=float)
        self.integral = np.clip(self.integral + error, -{windup}, {windup})
        return np.clip(self.kp * error + self.ki * self.integral, self.lo, self.hi).tolist()
'''

HOLD = '''import numpy as np


class Controller:
    """Hold every setpoint at a fixed fraction of its range."""

    def __init__(self, spec):
        self.lo = np.asarray(spec["state_lo"], dtype=float)
        self.hi = np.asarray(spec["state_hi"], dtype=float)
        self.fraction = {fraction}

    def step(self, observation):
        return np.clip(self.lo + self.fraction * (self.hi - self.lo), self.lo, self.hi).tolist()
'''


@dataclass(frozen=True)
class Template:
    name: str
    kind: str  # the domain kind it is written for ("*": any)
    source: str
    params: Callable[[random.Random, float], dict[str, object]]


def _r(rng: random.Random, lo: float, hi: float, t: float, digits: int = 3) -> float:
    """A value in [lo, hi], the range widened by the temperature."""
    span = (hi - lo) * (0.5 + t)
    mid = (lo + hi) / 2
    return round(rng.uniform(mid - span / 2, mid + span / 2), digits)


TEMPLATES: tuple[Template, ...] = (
    Template("grid.prorata", "grid", GRID_PRORATA, lambda g, t: {"margin": _r(g, 0.0, 0.04, t)}),
    Template("grid.merit", "grid", GRID_MERIT, lambda g, t: {"order": g.sample(range(8), 8), "margin": _r(g, 0.0, 0.04, t)}),
    Template("grid.economic", "grid", GRID_ECONOMIC,
             lambda g, t: {"margin": 0.0 if g.random() < 0.5 else _r(g, -0.004, 0.004, t, 4), "ramp_use": _r(g, 0.5, 1.0, t),
                           "iterations": g.choice((10, 20, 30, 40, 50, 60))}),
    Template("grid.smooth", "grid", GRID_SMOOTH, lambda g, t: {"alpha": _r(g, 0.3, 1.0, t)}),
    Template("hvac.proportional", "hvac", HVAC_PROPORTIONAL,
             lambda g, t: {"gain": _r(g, 0.5, 4.0, t), "occupied": _r(g, 20.5, 22.5, t, 1), "empty": _r(g, 16.0, 19.0, t, 1)}),
    Template("hvac.deadband", "hvac", HVAC_DEADBAND,
             lambda g, t: {"target": _r(g, 20.0, 22.5, t, 1), "band": _r(g, 0.3, 1.5, t, 2), "power": _r(g, 0.3, 1.0, t)}),
    Template("hvac.pi", "hvac", HVAC_PI,
             lambda g, t: {"kp": _r(g, 0.5, 3.0, t), "ki": _r(g, 0.01, 0.3, t), "target": _r(g, 20.0, 22.5, t, 1), "windup": _r(g, 5.0, 30.0, t, 1)}),
    Template("any.hold", "*", HOLD, lambda g, t: {"fraction": _r(g, 0.2, 0.8, t)}),
)

# --------------------------------------------------------------------------- defects


def _prepend(line: str) -> Callable[[str, random.Random], str]:
    return lambda code, g: line + code


def _in_step(stmt: str) -> Callable[[str, random.Random], str]:
    def apply(code: str, g: random.Random) -> str:
        head = "    def step(self, observation):\n"
        return code.replace(head, head + "".join(f"        {s}\n" for s in stmt.split("\n")), 1)

    return apply


def _no_clip(code: str, g: random.Random) -> str:
    lines = code.rstrip("\n").split("\n")
    last = lines[-1]
    if "np.clip(" in last:
        inner = last.split("np.clip(", 1)[1].rsplit(", self.lo, self.hi)", 1)[0]
        lines[-1] = last.split("return ", 1)[0] + f"return ({inner}).tolist()"
    return "\n".join(lines) + "\n"


def _short(code: str, g: random.Random) -> str:
    return code.rstrip("\n").rsplit(".tolist()", 1)[0] + ".tolist()[:-1]\n"


def _syntax(code: str, g: random.Random) -> str:
    return code.replace("    def step(self, observation):", "    def step(self, observation)", 1)


def _misnamed(code: str, g: random.Random) -> str:
    return code.replace("class Controller:", "class Policy:", 1)


DEFECTS: dict[str, Callable[[str, random.Random], str]] = {
    "network price lookup": lambda c, g: _in_step(
        'price = float(urllib.request.urlopen("https://prices.example/now").read())'
    )(_prepend("import urllib.request\n")(c, g), g),
    "log file": _in_step('open("controller.log", "a").write(repr(observation) + "\\n")'),
    "eval of a formula": _in_step('scale = eval(str(observation.get("formula", "1.0")))'),
    "environment read": lambda c, g: _in_step('scale = float(os.environ.get("SCF_SCALE", "1"))')(_prepend("import os\n")(c, g), g),
    "subprocess": lambda c, g: _in_step('subprocess.run(["logger", "step"], check=False)')(_prepend("import subprocess\n")(c, g), g),
    "no clipping to bounds": _no_clip,
    "one setpoint short": _short,
    "syntax slip": _syntax,
    "class misnamed": _misnamed,
}


def _digest() -> str:
    h = hashlib.sha256(VERSION.encode())
    for t in TEMPLATES:
        h.update(f"\x1f{t.name}\x1f{t.kind}\x1f{t.source}".encode())
    h.update("\x1f".join(sorted(DEFECTS)).encode())
    return h.hexdigest()


class SearchGenerator:
    """Program search over TEMPLATES x parameters x DEFECTS."""

    def __init__(self, *, temperature: float = 0.8, bug_rate: float = 0.35) -> None:
        if not 0.0 <= bug_rate <= 1.0:
            raise ValueError(f"bug_rate {bug_rate} is outside [0, 1]")
        self.temperature = max(0.0, float(temperature))
        self.bug_rate = float(bug_rate)
        self.identity = Identity(
            backend="search", model=VERSION, sha256=_digest(),
            sampling={"temperature": self.temperature, "bug_rate": self.bug_rate},
        )

    def templates_for(self, kind: str) -> list[Template]:
        own = [t for t in TEMPLATES if t.kind == kind]
        return own + [t for t in TEMPLATES if t.kind == "*"]

    def generate(self, request: CodeRequest, n: int, seed: int) -> list[Candidate]:
        kind = request.intent.domain.split(":", 1)[0]
        pool = self.templates_for(kind)
        out = []
        for i in range(n):
            g = random.Random(f"{request.intent.intent_id}\x1f{request.intent.hypothesis}\x1f{seed}\x1f{i}")
            t = pool[g.randrange(len(pool))]
            params = t.params(g, self.temperature)
            code = t.source.format(**params)
            notes = [t.name] + [f"{k}={v}" for k, v in sorted(params.items())]
            if g.random() < self.bug_rate:
                name = sorted(DEFECTS)[g.randrange(len(DEFECTS))]
                code = DEFECTS[name](code, g)
                notes.append(f"defect: {name}")
            out.append(Candidate(code, "", tuple(notes)))
        return out

    def close(self) -> None:
        pass


__all__ = ["SearchGenerator", "TEMPLATES", "DEFECTS", "VERSION"]
