"""The process generated code runs in: started by domains/sandbox.py as
`python -I -B sandbox_child.py`, inside bubblewrap where available. Never imported by SCF.

Standalone on purpose (standard library and numpy only, no `scf` import): the sandbox's
filesystem view holds the interpreter, its site-packages and this one file.

1. It confines itself before it reads the candidate: resource limits (CPU seconds, address
   space, file size 0, open files, no core dumps), `no_new_privs`, and a seccomp filter that
   refuses with EPERM: fork, vfork, clone, clone3 (no processes, no threads), socket (no
   network), kill, tkill, tgkill, ptrace and process_vm_readv/writev, opening a file for writing and every call that creates, removes, renames,
   links or changes a file. Where it runs as root outside bubblewrap, it also moves into a new network
   namespace with nothing in it.
2. It reads one JSON line from stdin: {"code", "spec", "copies", "modules", "builtins",
   "limits"}, runs the code as a module whose builtins are only the allowed ones (an import
   hook admits only the allowed modules' packages), and builds `Controller(spec)` once per
   scenario (`copies`).
3. Then, per step, it reads {"obs": [one observation per scenario]} and answers
   {"u": [[setpoints of scenario 0], ...]} (or {"error": "..."}).

Its answers go to a private copy of stdout; the candidate's own stdout is sent to stderr.
The parent computes every score from the plant it steps itself: a candidate can only
choose its setpoints, never report its own score.
"""

import builtins
import json
import os
import platform
import struct
import sys
import traceback

# --------------------------------------------------------------------------- confinement

# Refused with EPERM, per architecture (AUDIT_ARCH_*): processes, threads and sockets; signals
# to any process and tracing or reading another's memory; every
# call that creates, removes, renames, links or changes a file; and opening a file for
# writing (the open flags are inspected: O_WRONLY, O_RDWR, O_CREAT, O_TRUNC, O_APPEND).
_ARCH = {
    "x86_64": dict(
        arch=0xC000003E,
        deny=(
            56,
            57,
            58,
            435,
            41,
            62,
            200,
            234,
            101,
            310,
            311,  # clone fork vfork clone3 socket kill tkill tgkill ptrace process_vm_*
            85,
            87,
            263,
            82,
            264,
            316,
            83,
            258,
            84,
            88,
            266,
            86,
            265,
            90,
            91,
            268,
            92,
            93,
            94,
            260,
            76,
            77,
            133,
            259,
            132,
            235,
            280,
            261,
            437,
        ),  # creat unlink* rename* mkdir* rmdir symlink* link* chmod* chown* truncate mknod* utime* openat2
        flags={2: 1, 257: 2},  # open(path, flags), openat(dirfd, path, flags)
    ),
    "aarch64": dict(
        arch=0xC00000B7,
        deny=(220, 435, 198, 129, 130, 131, 117, 270, 271, 35, 38, 276, 34, 36, 37, 53, 52, 54, 55, 45, 46, 33, 88, 437),
        flags={56: 2},
    ),
}
_WRITE_FLAGS = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000  # O_WRONLY O_RDWR O_CREAT O_TRUNC O_APPEND
_EPERM = 1


def seccomp_program(machine=None):
    """A classic BPF program for SECCOMP_MODE_FILTER, or None on an unknown architecture."""
    spec = _ARCH.get(machine or platform.machine())
    if spec is None:
        return None
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    prog = [(ld, 0, 0, 4), (jeq, 0, "deny", spec["arch"]), (ld, 0, 0, 0)]
    if spec["arch"] == 0xC000003E:
        prog.append((jge, "deny", 0, 0x40000000))  # the x32 ABI
    prog += [(jeq, "deny", 0, nr) for nr in spec["deny"]]
    prog += [(jeq, f"flags{nr}", 0, nr) for nr in spec["flags"]]
    prog.append((ret, 0, 0, 0x7FFF0000))
    for nr, arg in spec["flags"].items():
        prog.append((f"flags{nr}", ld, 0, 0, 16 + 8 * arg))  # low word of the flags argument
        prog.append((jset, "deny", 0, _WRITE_FLAGS))
        prog.append((ret, 0, 0, 0x7FFF0000))  # BPF jumps only forward: each block allows itself
    prog.append(("deny", ret, 0, 0, 0x00050000 | _EPERM))
    labels, plain = {}, []
    for ins in prog:
        if isinstance(ins[0], str):
            labels[ins[0]] = len(plain)
            ins = ins[1:]
        plain.append(ins)
    out = []
    for i, (code, jt, jf, k) in enumerate(plain):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        out.append(struct.pack("HBBI", code, jt, jf, k))
    return b"".join(out)


def confine(limits):
    import ctypes
    import resource

    def cap(which, value, grace=0):
        soft, hard = resource.getrlimit(which)
        top = value + grace if hard == resource.RLIM_INFINITY else min(value + grace, hard)
        resource.setrlimit(which, (min(value, top), top))

    # CPU: the soft limit sends SIGXCPU (which ends the process and names the cause); the
    # hard limit one second later is the kernel's SIGKILL backstop (soft == hard would
    # skip SIGXCPU and kill without saying why)
    cap(resource.RLIMIT_CPU, int(limits["cpu_s"]), grace=1)
    cap(resource.RLIMIT_AS, int(limits["memory_mb"]) << 20)
    cap(resource.RLIMIT_FSIZE, 0)
    cap(resource.RLIMIT_CORE, 0)
    cap(resource.RLIMIT_NOFILE, 32)
    libc = ctypes.CDLL(None, use_errno=True)
    applied = ["rlimits"]
    if limits.get("unshare_net") and os.geteuid() == 0:
        if libc.unshare(0x40000000) == 0:  # CLONE_NEWNET
            applied.append("netns")
    if not limits.get("seccomp", True):
        return applied  # macOS: sandbox-exec is the boundary
    prog = seccomp_program()
    if prog is None:
        raise OSError(f"no seccomp filter for the architecture {platform.machine()}: the candidate is not run")
    if prog is not None:
        PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2

        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

        fprog = SockFprog(len(prog) // 8, prog)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")
        applied.append("seccomp")
    return applied


# --------------------------------------------------------------------------- the candidate


def restricted_builtins(names, modules):
    real_import = builtins.__import__
    roots = {m.split(".")[0] for m in modules}  # numpy imports its own parts lazily through this hook

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level or name.split(".")[0] not in roots:
            raise ImportError(f"import of {name!r} is outside the capability set")
        return real_import(name, globals, locals, fromlist, level)

    table = {n: getattr(builtins, n) for n in names if hasattr(builtins, n)}
    table["__import__"] = guarded_import
    table["__build_class__"] = builtins.__build_class__  # class statements need it
    return table


def main():
    out = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol channel
    os.dup2(2, 1)  # the candidate's prints go to stderr
    sys.stdout = sys.stderr

    def send(msg):
        out.write(json.dumps(msg) + "\n")
        out.flush()

    import numpy as np  # before confinement: its import may need what the filter refuses

    first = json.loads(sys.stdin.readline())
    applied = confine(first["limits"])
    try:
        namespace = {"__name__": "candidate", "__builtins__": restricted_builtins(first["builtins"], set(first["modules"]))}
        exec(compile(first["code"], "<candidate>", "exec"), namespace)  # noqa: S102 - this process is the sandbox
        # one controller per scenario: each keeps its own state (an integral, a history)
        controllers = [namespace["Controller"](json.loads(json.dumps(first["spec"]))) for _ in range(int(first["copies"]))]
    except BaseException as exc:  # noqa: BLE001 - report every failure of the candidate in one line
        send({"error": "loading the candidate: " + describe(exc), "confined": applied})
        return 0
    send({"ok": True, "confined": applied})
    for line in sys.stdin:
        batch = json.loads(line)["obs"]
        rows = []
        for i, (controller, obs) in enumerate(zip(controllers, batch)):
            try:
                rows.append(np.asarray(controller.step(obs), dtype=float).ravel().tolist())
            except BaseException as exc:  # noqa: BLE001
                send({"error": f"step {obs.get('step')}, scenario {i}: " + describe(exc)})
                return 0
        send({"u": rows})
    return 0


def describe(exc):
    tb = traceback.extract_tb(exc.__traceback__)
    where = next((f"line {f.lineno}: " for f in reversed(tb) if f.filename == "<candidate>"), "")
    text = f"{where}{type(exc).__name__}: {exc}"
    return text if len(text) < 500 else text[:497] + "..."


if __name__ == "__main__":
    sys.exit(main())
