"""Running generated code, only in a sandbox, against the simulator.

    >>> from scf.domains import sandbox
    >>> r = sandbox.evaluate(code, sandbox.Trial("hvac:office3", scenarios=4, hours=24))
    >>> r.ok, r.reason, r.scores["relative_cost"], r.isolation

The candidate (a module defining `class Controller` with `step(observation)`, the contract
of docs/codegen.md) never runs in this process. `evaluate` starts `sandbox_child.py` in a
separate process — inside bubblewrap where it is installed (new user, PID, network, IPC and
UTS namespaces; a read-only view of the interpreter, its site-packages and the child script
only; no /tmp, no home, no repository; uid 65534; all capabilities dropped) — and that
process confines itself further before it reads the candidate (rlimits on CPU, address
space, file size 0 and open files; a seccomp filter that refuses fork, clone, clone3 and
socket). This process steps the plant (domains/hvac_dynamics.py, domains/grid_dynamics.py)
and asks the child for setpoints, one JSON line per step, with a wall-clock deadline over
the whole run; every score is computed here from the plant, so a candidate cannot report
its own. Without bubblewrap the fallback is the child's own confinement in a fresh empty
working directory (and, as root, an empty network namespace): see docs/security.md for
what it does not stop.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from scf.domains.base import DomainError

CHILD = Path(__file__).with_name("sandbox_child.py")
BWRAP = "bwrap"


class SandboxError(DomainError):
    """The sandbox cannot be used as asked: the message names the problem and the fix."""


@dataclass(frozen=True)
class SandboxLimits:
    cpu_s: int = 60  # CPU seconds of the child (RLIMIT_CPU)
    wall_s: float = 120.0  # the whole run, start to last step
    memory_mb: int = 1024  # address space of the child (RLIMIT_AS)
    max_reply_bytes: int = 1 << 20  # one answer of the candidate
    max_stderr_bytes: int = 16 << 10  # kept of what it prints


@dataclass(frozen=True)
class Trial:
    """What the candidate is run against: the domain's plant over stochastic scenarios."""

    domain: str = "hvac:office3"
    scenarios: int = 4
    hours: float = 24.0
    seed: int = 0
    step_minutes: float = 15.0
    # a code contract's scenario and objective (GenN's intent params, producers/genn/contract.py);
    # the status quo runs under the same ones
    load_scale: float = 1.0  # grid: the loads times this
    t_out_shift: float = 0.0  # hvac: the outdoor temperature plus this, °C
    voll: float = 1000.0  # grid: the cost of unserved or excess energy, $/MWh
    comfort_weight: float = 10.0  # hvac: the cost of one zone-degree-hour outside the band, kWh

    @classmethod
    def for_contract(cls, domain: str, params: dict | None = None, **kw) -> "Trial":
        """A trial under a code contract's parameters (`contract.TRIAL_PARAMS` of an intent's params;
        other keys are ignored)."""
        p = params or {}
        extra = {k: float(p[k]) for k in ("load_scale", "t_out_shift", "voll", "comfort_weight") if isinstance(p.get(k), (int, float))}
        return cls(domain=domain, **{**kw, **extra})


@dataclass(frozen=True)
class SandboxResult:
    ok: bool
    reason: str  # why it failed ("" when ok)
    scores: dict[str, float]
    isolation: str  # bwrap | fallback | sandbox-exec
    confined: tuple[str, ...] = ()  # what the child applied to itself (rlimits, netns, seccomp)
    stderr: str = ""  # the tail of what the candidate printed
    contexts: np.ndarray | None = None  # hourly (context, state) samples of the run, for the EBDM's energy
    states: np.ndarray | None = None
    baseline_states: np.ndarray | None = None  # the status quo's states at the same hours (the same contexts)


class _Failed(Exception):
    pass


# --------------------------------------------------------------------------- isolation

_PROBED: dict[str, bool] = {}


def _ro_paths() -> list[str]:
    import importlib.util

    paths = {"/usr", "/lib", "/lib64", "/lib32", "/bin", sys.base_prefix, sys.prefix, sys.exec_prefix}
    spec = importlib.util.find_spec("numpy")
    if spec and spec.origin:
        paths.add(str(Path(spec.origin).resolve().parent.parent))
    paths.add(str(Path(sys.executable).resolve().parent))
    keep = sorted(p for p in paths if p and os.path.exists(p))
    # drop paths inside another kept path (bind order would hide nothing, but keep it short)
    return [p for p in keep if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in keep)]


def bwrap_argv(python: str = sys.executable) -> list[str]:
    argv = [
        shutil.which(BWRAP) or BWRAP,
        "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534", "--hostname", "sandbox",
        "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "OPENBLAS_NUM_THREADS", "1",
        "--setenv", "OMP_NUM_THREADS", "1", "--setenv", "MKL_NUM_THREADS", "1",
        "--proc", "/proc", "--dev", "/dev",
    ]  # fmt: skip
    for p in _ro_paths():
        argv += ["--ro-bind", p, p]
    argv += ["--ro-bind", str(CHILD), "/sandbox/child.py", "--remount-ro", "/", "--chdir", "/sandbox"]
    return argv + ["--", python, "-I", "-B", "/sandbox/child.py"]


def bwrap_works() -> bool:
    """Whether bubblewrap is installed and can create its namespaces here (probed once)."""
    if "bwrap" not in _PROBED:
        ok = False
        if shutil.which(BWRAP):
            argv = bwrap_argv()
            argv[-3:] = ["-I", "-c", "import numpy"]
            try:
                ok = subprocess.run(argv, capture_output=True, timeout=60).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
        _PROBED["bwrap"] = ok
    return _PROBED["bwrap"]


SANDBOX_EXEC_PROFILE = """(version 1)
(deny default)
(allow process-exec (literal "{python}"))
(allow file-read*)
(allow sysctl-read)
(allow mach-lookup)
(deny network*)
(deny file-write*)
(deny process-fork)
"""


def isolation_mode(requested: str = "auto") -> str:
    if requested not in ("auto", "bwrap", "fallback", "sandbox-exec"):
        raise SandboxError(f"unknown isolation {requested!r}: use auto, bwrap, fallback or sandbox-exec")
    if requested != "auto":
        if requested == "bwrap" and not bwrap_works():
            raise SandboxError("bubblewrap is not usable here: install it (apt-get install bubblewrap) or use isolation 'fallback'")
        return requested
    if sys.platform.startswith("linux") and bwrap_works():
        return "bwrap"
    if sys.platform == "darwin" and shutil.which("sandbox-exec"):
        return "sandbox-exec"
    return "fallback"


# --------------------------------------------------------------------------- the child


class _Child:
    """The sandboxed process: one JSON line in, one out, under a deadline."""

    def __init__(self, mode: str, limits: SandboxLimits, deadline: float) -> None:
        self.limits, self.deadline, self.mode = limits, deadline, mode
        self.workdir = tempfile.mkdtemp(prefix="scf-sandbox-")
        env = {"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if mode == "bwrap":
            argv = bwrap_argv()
        elif mode == "sandbox-exec":
            argv = [
                "sandbox-exec",
                "-p",
                SANDBOX_EXEC_PROFILE.format(python=os.path.realpath(sys.executable)),
                sys.executable,
                "-I",
                "-B",
                str(CHILD),
            ]
        else:
            argv = [sys.executable, "-I", "-B", str(CHILD)]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.workdir, env=env,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
        self._err = bytearray()
        self._closed = False
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        self._buf = b""
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)

    def _read_stderr(self) -> None:
        cap = self.limits.max_stderr_bytes
        for chunk in iter(lambda: self.proc.stderr.read1(4096), b""):
            self._err += chunk
            if len(self._err) > 2 * cap:
                del self._err[: len(self._err) - cap]

    @property
    def stderr(self) -> str:
        return bytes(self._err[-self.limits.max_stderr_bytes :]).decode("utf-8", "replace")

    def call(self, msg: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise _Failed(self._death()) from None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise _Failed(f"time limit: the run took longer than {self.limits.wall_s:g} s (wall clock)")
            if not self._sel.select(timeout=left):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise _Failed(self._death())
            self._buf += chunk
            if len(self._buf) > self.limits.max_reply_bytes:
                raise _Failed(f"an answer longer than {self.limits.max_reply_bytes} bytes")
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            reply = json.loads(line)
        except (ValueError, RecursionError):
            raise _Failed("an answer that is not JSON") from None
        if not isinstance(reply, dict):
            raise _Failed("an answer that is not a JSON object")
        return reply

    def _death(self) -> str:
        try:
            code = self.proc.wait(timeout=max(0.1, min(5.0, self.deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            return "the sandboxed process stopped answering"
        self._drain.join(timeout=5)  # its last words: the reader thread may not have run yet
        if code > 128 and self.mode == "bwrap":  # bwrap exits 128+N when its child dies of signal N
            code = 128 - code
        if code < 0:
            sig = signal.Signals(-code).name
            why = {
                "SIGXCPU": f"CPU limit ({self.limits.cpu_s} s)",
                "SIGKILL": "killed",
                "SIGXFSZ": "file size limit (writes are refused)",
                "SIGSEGV": "crashed",
                "SIGSYS": "a refused system call",
            }.get(sig, sig)
            return f"the sandboxed process ended by {sig}: {why}"
        tail = self.stderr.strip().splitlines()[-1:] or [""]
        if "MemoryError" in self.stderr:
            return f"memory limit ({self.limits.memory_mb} MiB): {tail[0]}"
        return f"the sandboxed process exited with {code}: {tail[0]}"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self.proc.wait()
        self._drain.join(timeout=5)
        self._sel.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


# --------------------------------------------------------------------------- the run


def _answer(reply: dict, k: int, shape: tuple[int, int]) -> np.ndarray:
    if "error" in reply:
        raise _Failed(str(reply["error"])[:500])
    try:
        u = np.asarray(reply["u"], dtype=float)
    except (KeyError, TypeError, ValueError, RecursionError):
        raise _Failed(f"step {k}: the answer is not an array of numbers") from None
    if u.shape != shape:
        try:
            u = np.broadcast_to(u, shape)
        except ValueError:
            raise _Failed(f"step {k}: the answer has shape {u.shape}, expected {shape} (scenarios, setpoints)") from None
    if not np.all(np.isfinite(u)):
        raise _Failed(f"step {k}: the answer holds NaN or infinite values")
    return np.array(u)


def evaluate(
    code: str,
    trial: Trial = Trial(),
    limits: SandboxLimits = SandboxLimits(),
    *,
    isolation: str = "auto",
    modules: list[str] | None = None,
    builtins: list[str] | None = None,
) -> SandboxResult:
    """Run `code` (the Controller contract) in the sandbox against `trial`'s plant; never raises
    for anything the candidate does (its failures are `ok=False` with the reason)."""
    from scf import domains
    from scf.domains import ethics

    if trial.scenarios < 1 or trial.hours <= 0 or trial.step_minutes <= 0:
        raise SandboxError(f"trial {trial}: scenarios, hours and step_minutes must be positive")
    if not (0.0 < trial.load_scale <= 10.0 and abs(trial.t_out_shift) <= 50.0 and trial.voll >= 0 and trial.comfort_weight >= 0):
        raise SandboxError(f"trial {trial}: load_scale must be in (0, 10], |t_out_shift| <= 50 °C, voll and comfort_weight >= 0")
    domain = domains.get(trial.domain)
    caps = ethics.capabilities()
    mode = isolation_mode(isolation)
    deadline = time.monotonic() + limits.wall_s
    try:
        child = _Child(mode, limits, deadline)
    except OSError as exc:
        return SandboxResult(False, f"the sandbox could not start ({exc}): check the isolation ({mode})", {}, mode)
    confined: tuple[str, ...] = ()
    try:
        kind = "hvac" if trial.domain.startswith("hvac") else "grid"
        plan = _HvacPlan(domain, trial) if kind == "hvac" else _GridPlan(domain, trial)
        first = {
            "code": code,
            "spec": plan.spec,
            "copies": trial.scenarios,
            "modules": modules if modules is not None else sorted(caps.modules),
            "builtins": builtins if builtins is not None else sorted(caps.builtins),
            "limits": {
                "cpu_s": limits.cpu_s,
                "memory_mb": limits.memory_mb,
                "unshare_net": mode == "fallback",
                "seccomp": mode != "sandbox-exec",
            },
        }
        hello = child.call(first)
        confined = tuple(hello.get("confined", ()))
        if "error" in hello:
            raise _Failed(str(hello["error"])[:500])
        scores, contexts, states, base_states = plan.run(lambda k, obs, shape: _answer(child.call({"obs": obs}), k, shape))
        child.close()  # joins the stderr reader (which may not have run yet): then all it printed is in child.stderr
        return SandboxResult(True, "", scores, mode, confined, child.stderr, contexts, states, base_states)
    except _Failed as exc:
        child.close()
        return SandboxResult(False, str(exc), {}, mode, confined, child.stderr)
    finally:
        child.close()


def contract_spec(domain, dt_h: float | None = None) -> dict:
    """What `Controller(spec)` gets (docs/codegen.md): the domain's names, bounds and units as
    plain JSON values. The same keys as GenN's prompt (producers/genn/contract.py) names; `dt_h`
    is the control step of the run. Grid domains add `cost_c2`, `cost_c1` (unit i at p MW costs
    cost_c2[i] p^2 + cost_c1[i] p $/h plus a constant; a piecewise-linear cost as c2 = 0 and its
    mean slope) and `ramp_per_h` (each unit's ramp limit, MW per hour)."""
    lo, hi = domain.state_bounds
    spec = {
        "domain": domain.name, "kind": domain.kind, "state_names": list(domain.state_names),
        "context_names": list(domain.context_names), "state_lo": [float(x) for x in lo], "state_hi": [float(x) for x in hi],
        "state_unit": domain.state_unit, "energy_unit": domain.energy_unit,
        "dt_h": float(dt_h if dt_h is not None else domain.sample_interval.total_seconds() / 3600.0),
    }  # fmt: skip
    if domain.kind == "grid":
        sc = domain.separable_cost
        slope = (np.asarray(sc.terms(hi), float) - np.asarray(sc.terms(lo), float)) / np.maximum(hi - lo, 1e-9)
        pwl = np.asarray(sc.has_pwl, bool)
        spec["cost_c2"] = [0.0 if w else round(float(c), 6) for c, w in zip(sc.c2, pwl)]
        spec["cost_c1"] = [round(float(m if w else c), 4) for c, m, w in zip(sc.c1, slope, pwl)]
        interval_h = domain.sample_interval.total_seconds() / 3600.0
        spec["ramp_per_h"] = [round(float(x) / interval_h, 3) for x in domain.ramp]
    return spec


def _mean(x) -> float:
    return float(np.mean(x))


def _relative(cost: float, baseline: float) -> dict[str, float]:
    """How the candidate compares with the status quo: `relative_cost` (below 1 = cheaper),
    `improvement` = 1 - relative_cost (the share of the status quo's cost it saves; negative =
    worse), `beats_status_quo` (1.0 / 0.0)."""
    rel = cost / max(baseline, 1e-9)
    return {"relative_cost": rel, "improvement": 1.0 - rel, "beats_status_quo": float(rel < 1.0)}


class _HvacPlan:
    def __init__(self, domain, trial: Trial) -> None:
        from scf.domains import hvac_dynamics as hd

        self.hd, self.domain, self.trial = hd, domain, trial
        self.dt_h = trial.step_minutes / 60.0
        self.plant = hd.HvacPlant(domain, dt_h=self.dt_h)
        self.steps = max(1, round(trial.hours / self.dt_h))
        dist = hd.weather(domain, scenarios=trial.scenarios, steps=self.steps, dt_h=self.dt_h, seed=trial.seed)
        self.dist = replace(dist, t_out=dist.t_out + trial.t_out_shift) if trial.t_out_shift else dist
        self.t0 = hd.initial_temperatures(trial.seed, trial.scenarios, domain.n_zones)
        self.spec = contract_spec(domain, self.dt_h)

    def run(self, ask):
        hd, d, n, z = self.hd, self.domain, self.trial.scenarios, self.domain.n_zones
        requests = []
        per_hour = max(1, round(1.0 / self.dt_h))
        contexts, states = [], []

        def controller(k, state, now):
            context = np.concatenate([now.t_out[:, None], now.hour[:, None], now.occupancy, state.t_zone], axis=1)
            u = ask(k, [{"step": k, "context": c, "state": x} for c, x in zip(context.tolist(), state.u.tolist())], (n, z))
            requests.append(u)
            if k % per_hour == 0:
                contexts.append(context)
                states.append(self.plant.limit(state.u, u))
            return u

        run = hd.run_plant(self.plant, self.dist, controller, self.t0)
        thermostat, base_states = hd.thermostat(self.plant), []

        def status_quo(k, state, now):
            u = thermostat(k, state, now)
            if k % per_hour == 0:
                base_states.append(self.plant.limit(state.u, u))
            return u

        base = hd.run_plant(self.plant, self.dist, status_quo, self.t0)
        req = np.stack(requests, axis=1)  # (n, K, z)
        beyond = (req > d.heat_max + 1e-6) | (req < -d.cool_max - 1e-6)
        broken = (run.comfort_dev_k > 1e-3) | beyond
        energy = run.power_kw.sum(1) * self.dt_h
        comfort = run.comfort_dev_k.sum((1, 2)) * self.dt_h
        b_energy = base.power_kw.sum(1) * self.dt_h
        b_comfort = base.comfort_dev_k.sum((1, 2)) * self.dt_h
        w = self.trial.comfort_weight
        cost = energy + w * comfort
        b_cost = b_energy + w * b_comfort
        scores = {
            "scenarios": float(n), "steps": float(self.steps),
            "energy_kwh": _mean(energy), "comfort_violation_kh": _mean(comfort), "peak_power_kw": _mean(run.power_kw.max(1)),
            "violations": float(broken.any(axis=2).sum()), "violation_rate": _mean(broken.any(axis=2)),
            "limit_requests": float(beyond.any(axis=2).sum()),
            "baseline_energy_kwh": _mean(b_energy), "baseline_comfort_violation_kh": _mean(b_comfort),
            "cost": _mean(cost), "baseline_cost": _mean(b_cost), **_relative(_mean(cost), _mean(b_cost)),
        }  # fmt: skip
        return scores, np.concatenate(contexts), np.concatenate(states), np.concatenate(base_states)


class _GridPlan:
    def __init__(self, domain, trial: Trial) -> None:
        from scf.domains import grid_dynamics as gd

        self.gd, self.domain, self.trial = gd, domain, trial
        self.dt_h = trial.step_minutes / 60.0
        self.plant = gd.GridPlant(domain, dt_h=self.dt_h)
        self.steps = max(1, round(trial.hours / self.dt_h))
        loads, forecast = gd.load_trajectory(domain, scenarios=trial.scenarios, steps=self.steps, dt_h=self.dt_h, seed=trial.seed)
        self.loads, self.forecast = loads * trial.load_scale, forecast * trial.load_scale
        self.spec = contract_spec(domain, self.dt_h)

    def run(self, ask):
        gd, d, n, g = self.gd, self.domain, self.trial.scenarios, len(self.domain.pmin)
        requests = []
        per_hour = max(1, round(1.0 / self.dt_h))
        contexts, states = [], []

        def controller(k, pg_prev, loads):
            u = ask(k, [{"step": k, "context": c, "state": x} for c, x in zip(loads.tolist(), pg_prev.tolist())], (n, g))
            requests.append(u)
            if k % per_hour == 0:
                contexts.append(np.array(loads, dtype=float))
                states.append(self.plant.limit(pg_prev, u))
            return u

        run = gd.run_dispatch(self.plant, self.loads, controller)
        prorata, base_states = gd.prorata(self.plant, self.forecast), []

        def status_quo(k, pg_prev, loads):
            u = prorata(k, pg_prev, loads)
            if k % per_hour == 0:
                base_states.append(self.plant.limit(pg_prev, u))
            return u

        base = gd.run_dispatch(self.plant, self.loads, status_quo)
        req = np.stack(requests[1:] or requests, axis=1)
        beyond = ((req > d.pmax + 1e-6) | (req < d.pmin - 1e-6)).any(axis=2)
        beyond = np.pad(beyond, ((0, 0), (0, run.pg.shape[1] - beyond.shape[1])))
        broken = (np.abs(run.imbalance_mw) > 1e-2) | (run.max_loading > 1 + 1e-6) | beyond
        cost = run.cost_per_h.sum(1) * self.dt_h
        unbalanced = np.abs(run.imbalance_mw).sum(1) * self.dt_h
        b_cost = base.cost_per_h.sum(1) * self.dt_h
        b_unbalanced = np.abs(base.imbalance_mw).sum(1) * self.dt_h
        total = cost + self.trial.voll * unbalanced
        b_total = b_cost + self.trial.voll * b_unbalanced
        scores = {
            "scenarios": float(n), "steps": float(self.steps),
            "cost_usd": _mean(cost), "unbalanced_mwh": _mean(unbalanced), "max_imbalance_mw": float(np.abs(run.imbalance_mw).max()),
            "max_line_loading": float(run.max_loading.max()), "violations": float(broken.sum()), "violation_rate": _mean(broken),
            "limit_requests": float(beyond.sum()),
            "baseline_cost_usd": _mean(b_cost), "baseline_unbalanced_mwh": _mean(b_unbalanced),
            "cost": _mean(total), "baseline_cost": _mean(b_total), **_relative(_mean(total), _mean(b_total)),
        }  # fmt: skip
        return scores, np.concatenate(contexts), np.concatenate(states), np.concatenate(base_states)


__all__ = [
    "evaluate",
    "contract_spec",
    "Trial",
    "SandboxLimits",
    "SandboxResult",
    "SandboxError",
    "isolation_mode",
    "bwrap_works",
    "bwrap_argv",
]
