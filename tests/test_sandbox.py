"""The sandbox that runs generated code against the simulator (domains/sandbox.py).

Every escape attempt runs with the child's Python-level restrictions lifted (all builtins,
os/socket/threading importable): what must hold it is the OS — bubblewrap's namespaces and
read-only view where it is installed, and in every mode the child's rlimits and seccomp
filter. Each attempt is run under both isolations that work here.
"""

from __future__ import annotations

import builtins
import os
import socket
import uuid
from pathlib import Path

import pytest

from scf.domains import ethics, sandbox

BENIGN = Path(__file__).parent / "data" / "codegate" / "benign"
HVAC = (BENIGN / "000_hvac_band_thermostat_0.py").read_text()
GRID = next(BENIGN.glob("*grid_reserve_aware_0.py")).read_text()
SHORT = sandbox.Trial("hvac:office3", scenarios=2, hours=2, step_minutes=15)
MODES = ["bwrap", "fallback"] if sandbox.bwrap_works() else ["fallback"]
EVERYTHING = dict(modules=sorted(ethics.capabilities().modules) + ["os", "socket", "threading", "ctypes", "pathlib"],
                  builtins=[n for n in dir(builtins) if not n.startswith("_")])  # fmt: skip


def controller(init: str = "", step: str = "") -> str:
    """A contract-conforming module whose __init__ / step run the given lines."""
    body_init = "\n".join("        " + line for line in (init or "pass").splitlines())
    body_step = "\n".join("        " + line for line in (step or "pass").splitlines())
    return (
        "import numpy as np\n\n\nclass Controller:\n    def __init__(self, spec):\n"
        f"{body_init}\n\n    def step(self, observation):\n{body_step}\n"
        "        return [0.0 for _ in observation['state']]\n"
    )


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def leftover_children() -> list[int]:
    """Processes still running the sandbox child that this test run started (there must be
    none after a run). Orphans count too (an escapee is re-parented to init); children of
    another test run on the same machine (another pytest, an xdist worker) do not."""
    out = []
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"sandbox_child.py" not in cmd and b"/sandbox/child.py" not in cmd:
            continue
        up, seen = _parent(pid), {pid}
        while up > 1 and up != os.getpid() and up not in seen:  # through bwrap and the child's own forks
            seen.add(up)
            try:
                parent_cmd = Path(f"/proc/{up}/cmdline").read_bytes()
            except OSError:
                break
            if b"bwrap" not in parent_cmd and b"child.py" not in parent_cmd:
                break  # started by another process: not this run's
            up = _parent(up)
        if up <= 1 or up == os.getpid():
            out.append(pid)
    return out


def test_bubblewrap_is_used_where_it_works():
    if not sandbox.bwrap_works():
        pytest.skip("bubblewrap is not installed here: the fallback isolation is tested below")
    assert sandbox.isolation_mode() == "bwrap"
    argv = sandbox.bwrap_argv()
    assert argv[-3:] == ["-I", "-B", "/sandbox/child.py"]
    assert {"--unshare-all", "--unshare-user", "--die-with-parent", "--clearenv"} <= set(argv)
    assert "--bind" not in argv and "--tmpfs" not in argv  # nothing writable


@pytest.mark.parametrize("mode", MODES)
def test_a_good_controller_is_scored_against_the_simulator(mode):
    r = sandbox.evaluate(HVAC, sandbox.Trial("hvac:office3", scenarios=3, hours=6), isolation=mode)
    assert r.ok, r.reason
    assert r.isolation == mode and "seccomp" in r.confined and "rlimits" in r.confined
    assert r.scores["steps"] == 24 and r.scores["scenarios"] == 3
    assert r.scores["energy_kwh"] > 0 and r.scores["baseline_energy_kwh"] > 0
    assert r.contexts.shape == (3 * 6, 2 + 2 * 3) and r.states.shape == (18, 3)  # hourly (context, applied state)


def test_scores_do_not_depend_on_the_isolation():
    runs = [sandbox.evaluate(GRID, sandbox.Trial("grid:case14", scenarios=2, hours=3), isolation=m) for m in MODES + ["fallback"]]
    assert all(r.ok for r in runs), [r.reason for r in runs]
    assert all(r.scores == runs[0].scores for r in runs)
    # the largest-units-first dispatch is cheaper than pro rata over the same loads, and balanced
    assert runs[0].scores["cost_usd"] < runs[0].scores["baseline_cost_usd"]
    assert runs[0].scores["violations"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_network_is_contained(mode):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    code = controller(init=f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'leak')")
    r = sandbox.evaluate(code, SHORT, isolation=mode, **EVERYTHING)
    assert not r.ok and "loading the candidate" in r.reason
    assert "PermissionError" in r.reason or "OSError" in r.reason, r.reason
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody connected
    listener.close()


@pytest.mark.parametrize("mode", MODES)
def test_file_writes_outside_are_contained(mode, tmp_path):
    targets = [tmp_path / "escaped.txt", Path("/tmp") / f"scf-escape-{uuid.uuid4().hex}"]
    lines = "\n".join(f"open({str(t)!r}, 'w').write('x')" for t in targets)
    r = sandbox.evaluate(controller(init=lines), SHORT, isolation=mode, **EVERYTHING)
    assert not r.ok
    assert not any(t.exists() for t in targets)


@pytest.mark.parametrize("mode", MODES)
def test_a_fork_bomb_is_contained(mode):
    r = sandbox.evaluate(controller(init="import os\nwhile True:\n    os.fork()"), SHORT, isolation=mode, **EVERYTHING)
    assert not r.ok and "PermissionError" in r.reason, r.reason
    assert leftover_children() == []


@pytest.mark.parametrize("mode", MODES)
def test_signals_to_other_processes_are_refused(mode):
    # signal 0 only asks whether the process exists: harmless if the filter were missing
    r = sandbox.evaluate(controller(init="import os\nos.kill(os.getppid(), 0)\nos.kill(1, 0)"), SHORT, isolation=mode, **EVERYTHING)
    assert not r.ok and "PermissionError" in r.reason, r.reason


@pytest.mark.parametrize("mode", MODES)
def test_threads_are_refused(mode):
    code = controller(init="import threading\nfor _ in range(1000):\n    threading.Thread(target=lambda: None).start()")
    r = sandbox.evaluate(code, SHORT, isolation=mode, **EVERYTHING)
    assert not r.ok and "RuntimeError" in r.reason, r.reason


@pytest.mark.parametrize("mode", MODES)
def test_an_infinite_loop_is_stopped(mode):
    limits = sandbox.SandboxLimits(cpu_s=2, wall_s=4)
    r = sandbox.evaluate(controller(step="while True:\n    pass"), SHORT, limits, isolation=mode)
    assert not r.ok
    assert r.reason.startswith("time limit") or "CPU limit" in r.reason, r.reason
    assert leftover_children() == []


@pytest.mark.parametrize("mode", MODES)
def test_a_huge_allocation_is_contained(mode):
    limits = sandbox.SandboxLimits(memory_mb=768)
    r = sandbox.evaluate(controller(init="hog = bytearray(8 << 30)"), SHORT, limits, isolation=mode, **EVERYTHING)
    assert not r.ok and "MemoryError" in r.reason, r.reason
    r = sandbox.evaluate(controller(init="hog = np.ones((40000, 40000))"), SHORT, limits, isolation=mode)
    assert not r.ok and "MemoryError" in r.reason, r.reason


def test_bubblewrap_hides_the_host_filesystem(tmp_path):
    if "bwrap" not in MODES:
        pytest.skip("bubblewrap is not installed here; the fallback does not hide files (docs/security.md)")
    secret = tmp_path / "secret.key"
    secret.write_text("s3cret")
    r = sandbox.evaluate(controller(init=f"print(open({str(secret)!r}).read())"), SHORT, isolation="bwrap", **EVERYTHING)
    assert not r.ok and "FileNotFoundError" in r.reason, r.reason
    assert "s3cret" not in r.stderr


def test_the_candidate_cannot_forge_the_protocol_or_its_scores(late_stderr_reader):
    code = controller(step='print(\'{"u": [[1e9, 1e9, 1e9]]}\')\nprint(\'{"error": "forged"}\')')
    r = sandbox.evaluate(code, SHORT)
    assert r.ok, r.reason
    assert r.scores["limit_requests"] == 0 and '"forged"' in r.stderr


@pytest.fixture
def late_stderr_reader(monkeypatch):
    """The parent drains the child's stderr in a thread; on a loaded machine that thread may
    not run before the child's last answer (or its exit) is seen: CI once got an empty stderr
    (test_the_candidate_cannot_forge_the_protocol_or_its_scores, a full run). Here the reader
    starts only once the child has exited — the latest a scheduler could run it —, so a result
    that read stderr before the child ended and the reader finished would miss every line."""
    read = sandbox._Child._read_stderr

    def late(self):
        self.proc.wait()
        read(self)

    monkeypatch.setattr(sandbox._Child, "_read_stderr", late)


def test_everything_the_candidate_printed_is_kept_when_the_reader_runs_late(late_stderr_reader):
    r = sandbox.evaluate(controller(step="print('hello from step')"), SHORT)
    assert r.ok, r.reason
    assert r.stderr.count("hello from step") == r.scores["steps"] * r.scores["scenarios"] == 16  # one per step of each copy


def test_a_child_that_exits_is_reported_with_its_last_words_when_the_reader_runs_late(late_stderr_reader):
    r = sandbox.evaluate(controller(init="import os\nprint('last words')\nos._exit(3)"), SHORT, **EVERYTHING)
    assert not r.ok and r.reason == "the sandboxed process exited with 3: last words", r.reason


def test_a_child_that_writes_garbage_to_the_protocol_cannot_crash_the_parent():
    # the candidate escapes the Python-level restrictions and writes to the protocol's fd itself
    for junk in (b"[" * 200_000, b"x" * (2 << 20), b'{"u": "' + b"9" * 1000 + b'"}'):
        code = controller(step=f"import os\nfor fd in range(3, 12):\n    try:\n        os.write(fd, {junk!r} + b'\\n')\n    except OSError:\n        pass")
        r = sandbox.evaluate(code, SHORT, **EVERYTHING)
        assert not r.ok and r.reason in (
            "an answer that is not JSON",
            f"an answer longer than {sandbox.SandboxLimits().max_reply_bytes} bytes",
            "step 0: the answer is not an array of numbers",
            "step 0: the answer holds NaN or infinite values",
        ), r.reason


def test_bad_answers_are_rejected_with_the_reason():
    bad_shape = controller().replace("return [0.0 for _ in observation['state']]", "return [1.0, 2.0]")
    r = sandbox.evaluate(bad_shape, SHORT)
    assert not r.ok and r.reason == "step 0: the answer has shape (2, 2), expected (2, 3) (scenarios, setpoints)"
    nan = controller().replace("return [0.0 for _ in observation['state']]", "return [float('nan')] * 3")
    assert sandbox.evaluate(nan, SHORT).reason == "step 0: the answer holds NaN or infinite values"
    r = sandbox.evaluate("class Controller:\n    def step(self, observation):\n        return 0\n", SHORT)
    assert not r.ok and r.reason.startswith("loading the candidate: ") and "TypeError" in r.reason


def test_the_child_refuses_imports_outside_the_capability_set():
    r = sandbox.evaluate(controller(init="import os"), SHORT)
    assert not r.ok and "import of 'os' is outside the capability set" in r.reason


def test_a_bad_trial_is_one_clear_line():
    with pytest.raises(sandbox.SandboxError, match="scenarios, hours and step_minutes must be positive"):
        sandbox.evaluate(HVAC, sandbox.Trial(scenarios=0))
    with pytest.raises(sandbox.SandboxError, match="unknown isolation 'docker'"):
        sandbox.evaluate(HVAC, SHORT, isolation="docker")


def run_bpf(prog: bytes, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """A classic-BPF interpreter for the few instructions the filter uses (ld abs, jeq, jge,
    jset, ret): what the kernel would return for one system call."""
    import struct

    data = struct.pack("<iI", nr, arch) + bytes(8) + b"".join(struct.pack("<Q", a) for a in (tuple(args) + (0,) * 6)[:6])
    ins = [struct.unpack("HBBI", prog[i : i + 8]) for i in range(0, len(prog), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = ins[pc]
        if code == 0x20:
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code in (0x15, 0x35, 0x45):
            hit = acc == k if code == 0x15 else acc >= k if code == 0x35 else bool(acc & k)
            pc += 1 + (jt if hit else jf)
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected BPF instruction {code:#x}")


@pytest.mark.parametrize("machine, arch, calls", [
    ("x86_64", 0xC000003E, {"read": 0, "write": 1, "clone": 56, "fork": 57, "socket": 41, "kill": 62, "unlink": 87, "openat": 257, "open": 2, "mmap": 9}),
    ("aarch64", 0xC00000B7, {"read": 63, "write": 64, "clone": 220, "socket": 198, "kill": 129, "unlinkat": 35, "openat": 56, "mmap": 222}),
])  # fmt: skip
def test_the_seccomp_filter_decides_as_documented(machine, arch, calls):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sandbox_child", sandbox.CHILD)
    child = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(child)
    prog = child.seccomp_program(machine)
    allow, eperm = 0x7FFF0000, 0x00050001
    verdict = lambda name, *args: run_bpf(prog, calls[name], arch, args)  # noqa: E731
    for name in ("read", "write", "mmap"):
        assert verdict(name) == allow, name
    for name in ("clone", "socket", "kill", "unlink" if "unlink" in calls else "unlinkat"):
        assert verdict(name) == eperm, name
    assert verdict("openat", 0, 0, 0o0) == allow  # O_RDONLY
    for flags in (0o1, 0o2, 0o100, 0o1000, 0o2000, 0o101):
        assert verdict("openat", 0, 0, flags) == eperm, oct(flags)
    if "open" in calls:
        assert verdict("open", 0, 0o0) == allow and verdict("open", 0, 0o101) == eperm
        assert run_bpf(prog, 0x40000000 | 0, arch) == eperm  # the x32 ABI
    assert run_bpf(prog, 0, 0x40000003) == eperm  # a foreign architecture (i386 on x86-64)
    assert child.seccomp_program("riscv64") is None


def test_a_code_contract_changes_the_scenario_and_the_status_quo_runs_under_it():
    """Trial.for_contract: loads x 1.2 raise both costs; the status quo's states come back at the
    same hours as the candidate's (for the EBDM's energy); improvement = 1 - relative cost."""
    trial = sandbox.Trial("grid:case14", scenarios=1, hours=2, step_minutes=30)
    a = sandbox.evaluate(GRID, trial)
    b = sandbox.evaluate(GRID, sandbox.Trial.for_contract("grid:case14", {"load_scale": 1.2, "target": 0.9, "other": "x"}, scenarios=1,
                                                          hours=2, step_minutes=30))
    assert a.ok and b.ok
    assert b.scores["baseline_cost_usd"] > a.scores["baseline_cost_usd"] * 1.1
    for r in (a, b):
        assert r.baseline_states.shape == r.states.shape == (2, 5)
        assert r.scores["improvement"] == pytest.approx(1.0 - r.scores["relative_cost"])
        assert r.scores["beats_status_quo"] == float(r.scores["relative_cost"] < 1.0)
    h = sandbox.evaluate(HVAC, sandbox.Trial.for_contract("hvac:office3", {"t_out_shift": -10.0, "comfort_weight": 30}, scenarios=1,
                                                          hours=2, step_minutes=30))
    assert h.ok and h.baseline_states.shape == h.states.shape
    with pytest.raises(sandbox.SandboxError, match="load_scale must be in"):
        sandbox.evaluate(GRID, sandbox.Trial("grid:case14", load_scale=0.0))
