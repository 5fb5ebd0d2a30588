"""The ethics limiter: static analysis (AST) of generated Python code. Code is never run.

Two analysers. `gate(code)` is the one that decides for generated code, and it is default
deny: only the declared capability set (domains/data/codegate_allow.txt: math, numpy and
its linalg/random/fft, statistics, dataclasses, typing, itertools, functools, collections
… and per module the names it may give; allow-listed builtins) passes, and everything else
is refused with its line, the construct and the rule; with a contract it also checks that
the code defines what the contract asks (docs/codegen.md). `analyse(code)`, below, is the
older deny-list: it names *why* refused code matters (`explain`) and still judges code
that is not generated controllers.

`analyse(code)` returns findings, each naming its line and what it found:

* **process execution** — os.system / os.popen / os.exec* / os.spawn* / os.fork / os.kill,
  subprocess, pty, asyncio subprocesses, platform.popen;
* **eval/exec and dynamic import** — eval, exec, compile, __import__, importlib, runpy,
  types.FunctionType / CodeType, breakpoint;
* **network access** — socket, ssl, urllib.request, http.client/server, requests, httpx,
  aiohttp, ftplib, smtplib, paramiko, websockets, asyncio.open_connection …;
* **filesystem** — writes (open in w/a/x/+ mode, pathlib write_*, numpy/pandas savers,
  copies) and deletes / renames / permission changes whose path is not provably inside
  the sandbox directory; reads of credential and system files;
* **native code** — ctypes, cffi, extension loaders;
* **deserialisation** — pickle / dill / marshal / shelve / joblib / jsonpickle loads,
  yaml.load without a safe loader, numpy.load(allow_pickle=True), torch.load without
  weights_only=True, pandas.read_pickle;
* **obfuscation** — encoded strings (base64, hex, rot13, zlib, chr lists, reversed
  strings) that reach exec / eval / import / getattr, and encoded payloads that decode to
  code with findings of their own (the decoded text is analysed, never run);
* **sandbox escape** — __subclasses__, __globals__, __builtins__, frame objects,
  sys.modules surgery, LD_PRELOAD-style environment tampering.

Evasions are seen through by resolving names: import aliases (`import os as o`,
`from os import system as s`), assignments (`f = os.popen`), `getattr(obj, NAME)` and
`obj.__dict__[NAME]` / `vars(obj)[NAME]` / `globals()[NAME]` / `sys.modules[NAME]`, where
NAME is folded statically from constants ('ev' + 'al', ''.join([...]), 'lave'[::-1],
'%s%s' % (…), f-strings, .format, chr(…), bytes.fromhex, base64 …).

Paths are folded the same way (os.path.join, pathlib `/`, f-strings); a path is inside
the sandbox when it is relative without `..` (generated code runs with the sandbox as its
working directory) or absolute under one of `sandbox_roots`. A write whose path cannot be
folded is reported: the gate approves only what it can prove.

Known limits: values that flow through containers, function returns or attributes of
objects are not traced (a name bound to several different values is treated as unknown);
an unknown part of an f-string after a sandbox directory (`f"out/{name}"`) is accepted.
"""

from __future__ import annotations

import ast
import base64
import builtins
import codecs
import posixpath
import re
import zlib
from dataclasses import dataclass
from typing import Iterable

# --------------------------------------------------------------------------- findings

PROCESS = "process execution"
EVAL = "eval/exec"
DYNAMIC_IMPORT = "dynamic import"
NETWORK = "network access"
FILESYSTEM = "filesystem"
NATIVE = "native code"
DESERIALISE = "deserialisation"
OBFUSCATION = "obfuscation"
ESCAPE = "sandbox escape"
SENSITIVE = "sensitive read"
INVALID = "invalid code"


@dataclass(frozen=True, order=True)
class Finding:
    line: int
    category: str
    detail: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.category}: {self.detail}"


@dataclass(frozen=True)
class EthicsConfig:
    sandbox_roots: tuple[str, ...] = ("/sandbox", "/tmp/scf-sandbox")
    max_bytes: int = 512_000
    max_decode_depth: int = 3


# --------------------------------------------------------------------------- the tables

# Modules whose import (or any use) is a finding by itself.
MODULES: dict[str, str] = {
    **{m: PROCESS for m in ("subprocess", "pty", "pexpect", "commands", "popen2", "_posixsubprocess", "plumbum", "sh")},
    **{
        m: NETWORK
        for m in (
            "socket", "_socket", "socketserver", "ssl", "http.client", "http.server", "urllib.request", "urllib2",
            "urllib3", "requests", "httpx", "aiohttp", "ftplib", "smtplib", "poplib", "imaplib", "telnetlib",
            "nntplib", "xmlrpc", "paramiko", "websocket", "websockets", "pycurl", "grpc", "zmq", "asyncssh",
            "scapy", "webbrowser", "httplib", "smtpd", "asyncore",
        )
    },
    **{m: NATIVE for m in ("ctypes", "_ctypes", "cffi")},
    **{m: DYNAMIC_IMPORT for m in ("importlib", "imp", "runpy", "zipimport", "pkgutil", "code", "codeop")},
    **{m: DESERIALISE for m in ("marshal", "shelve", "jsonpickle")},
}
# Parts of a flagged module that are harmless.
MODULE_EXCEPTIONS = ("importlib.metadata", "importlib.resources")

# Functions (fully qualified) that are findings wherever they are referenced.
FUNCTIONS: dict[str, tuple[str, str]] = {
    "builtins.eval": (EVAL, "eval() runs arbitrary code"),
    "builtins.exec": (EVAL, "exec() runs arbitrary code"),
    "builtins.compile": (EVAL, "compile() builds code objects to run"),
    "builtins.__import__": (DYNAMIC_IMPORT, "__import__() imports a module chosen at run time"),
    "builtins.breakpoint": (EVAL, "breakpoint() opens an interactive debugger"),
    "types.FunctionType": (EVAL, "types.FunctionType builds a function from a code object"),
    "types.CodeType": (EVAL, "types.CodeType builds a code object"),
    "os.system": (PROCESS, "os.system runs a shell command"),
    "os.popen": (PROCESS, "os.popen runs a shell command"),
    "os.fork": (PROCESS, "os.fork starts a process"),
    "os.forkpty": (PROCESS, "os.forkpty starts a process"),
    "os.kill": (PROCESS, "os.kill signals other processes"),
    "os.killpg": (PROCESS, "os.killpg signals other processes"),
    "os.startfile": (PROCESS, "os.startfile runs a program"),
    "os.setuid": (PROCESS, "os.setuid changes the process's user"),
    "os.setgid": (PROCESS, "os.setgid changes the process's group"),
    "os.chroot": (PROCESS, "os.chroot changes the root directory"),
    "platform.popen": (PROCESS, "platform.popen runs a shell command"),
    "asyncio.create_subprocess_exec": (PROCESS, "asyncio.create_subprocess_exec starts a process"),
    "asyncio.create_subprocess_shell": (PROCESS, "asyncio.create_subprocess_shell runs a shell command"),
    "asyncio.open_connection": (NETWORK, "asyncio.open_connection opens a network connection"),
    "asyncio.start_server": (NETWORK, "asyncio.start_server listens on the network"),
    "multiprocessing.connection.Client": (NETWORK, "multiprocessing.connection.Client opens a network connection"),
    "multiprocessing.connection.Listener": (NETWORK, "multiprocessing.connection.Listener listens on the network"),
    "pickle.load": (DESERIALISE, "pickle.load deserialises untrusted data (runs code)"),
    "pickle.loads": (DESERIALISE, "pickle.loads deserialises untrusted data (runs code)"),
    "pickle.Unpickler": (DESERIALISE, "pickle.Unpickler deserialises untrusted data (runs code)"),
    "_pickle.loads": (DESERIALISE, "_pickle.loads deserialises untrusted data (runs code)"),
    "_pickle.load": (DESERIALISE, "_pickle.load deserialises untrusted data (runs code)"),
    "cPickle.loads": (DESERIALISE, "cPickle.loads deserialises untrusted data"),
    "cPickle.load": (DESERIALISE, "cPickle.load deserialises untrusted data"),
    "dill.load": (DESERIALISE, "dill.load deserialises untrusted data (runs code)"),
    "dill.loads": (DESERIALISE, "dill.loads deserialises untrusted data (runs code)"),
    "cloudpickle.load": (DESERIALISE, "cloudpickle.load deserialises untrusted data (runs code)"),
    "cloudpickle.loads": (DESERIALISE, "cloudpickle.loads deserialises untrusted data (runs code)"),
    "joblib.load": (DESERIALISE, "joblib.load unpickles a file"),
    "pandas.read_pickle": (DESERIALISE, "pandas.read_pickle unpickles a file"),
    "yaml.unsafe_load": (DESERIALISE, "yaml.unsafe_load builds arbitrary objects"),
    "yaml.unsafe_load_all": (DESERIALISE, "yaml.unsafe_load_all builds arbitrary objects"),
    "yaml.UnsafeLoader": (DESERIALISE, "yaml.UnsafeLoader builds arbitrary objects"),
    "sys._getframe": (ESCAPE, "sys._getframe reaches the caller's frames"),
    "sys.addaudithook": (ESCAPE, "sys.addaudithook tampers with auditing"),
    "sys.settrace": (ESCAPE, "sys.settrace hooks every frame"),
    "sys.setprofile": (ESCAPE, "sys.setprofile hooks every call"),
    "gc.get_referrers": (ESCAPE, "gc.get_referrers reaches objects outside the code"),
    "gc.get_objects": (ESCAPE, "gc.get_objects reaches objects outside the code"),
    "inspect.currentframe": (ESCAPE, "inspect.currentframe reaches the caller's frames"),
    "os.add_dll_directory": (NATIVE, "os.add_dll_directory loads native code"),
    "code.interact": (EVAL, "code.interact opens an interpreter"),
}
# Prefixes: anything under these names.
PREFIXES: tuple[tuple[str, str, str], ...] = (
    ("os.exec", PROCESS, "runs a program in place of this process"),
    ("os.spawn", PROCESS, "starts a process"),
    ("os.posix_spawn", PROCESS, "starts a process"),
    ("os.popen", PROCESS, "runs a shell command"),
)

# Calls that write or delete: qualified name -> (indexes of path arguments, keyword names, verb).
PATH_FUNCTIONS: dict[str, tuple[tuple[int, ...], tuple[str, ...], str]] = {
    "os.remove": ((0,), ("path",), "deletes"),
    "os.unlink": ((0,), ("path",), "deletes"),
    "os.rmdir": ((0,), ("path",), "deletes"),
    "os.removedirs": ((0,), ("name",), "deletes"),
    "os.truncate": ((0,), ("path",), "truncates"),
    "os.chmod": ((0,), ("path",), "changes permissions of"),
    "os.lchmod": ((0,), ("path",), "changes permissions of"),
    "os.chown": ((0,), ("path",), "changes the owner of"),
    "os.lchown": ((0,), ("path",), "changes the owner of"),
    "os.mkdir": ((0,), ("path",), "creates"),
    "os.makedirs": ((0,), ("name",), "creates"),
    "os.mkfifo": ((0,), ("path",), "creates"),
    "os.mknod": ((0,), ("path",), "creates"),
    "os.utime": ((0,), ("path",), "modifies"),
    "os.rename": ((0, 1), ("src", "dst"), "renames"),
    "os.renames": ((0, 1), ("old", "new"), "renames"),
    "os.replace": ((0, 1), ("src", "dst"), "replaces"),
    "os.symlink": ((0, 1), ("src", "dst"), "links"),
    "os.link": ((0, 1), ("src", "dst"), "links"),
    "shutil.rmtree": ((0,), ("path",), "deletes"),
    "shutil.move": ((0, 1), ("src", "dst"), "moves"),
    "shutil.copy": ((1,), ("dst",), "writes"),
    "shutil.copy2": ((1,), ("dst",), "writes"),
    "shutil.copyfile": ((1,), ("dst",), "writes"),
    "shutil.copytree": ((1,), ("dst",), "writes"),
    "shutil.copymode": ((1,), ("dst",), "changes permissions of"),
    "shutil.copystat": ((1,), ("dst",), "changes permissions of"),
    "shutil.chown": ((0,), ("path",), "changes the owner of"),
    "shutil.make_archive": ((0,), ("base_name",), "writes"),
    "shutil.unpack_archive": ((1,), ("extract_dir",), "writes"),
    "numpy.save": ((0,), ("file",), "writes"),
    "numpy.savez": ((0,), ("file",), "writes"),
    "numpy.savez_compressed": ((0,), ("file",), "writes"),
    "numpy.savetxt": ((0,), ("fname",), "writes"),
    "scipy.io.savemat": ((0,), ("file_name",), "writes"),
    "torch.save": ((1,), ("f",), "writes"),
    "json.dump": ((), (), "writes"),  # writes to a handle: the handle's open() is checked
}
# Methods that write through their first argument (or `path`-like keyword) whatever the receiver.
WRITER_METHODS: dict[str, tuple[str, ...]] = {
    "to_csv": ("path_or_buf",),
    "to_parquet": ("path",),
    "to_json": ("path_or_buf",),
    "to_excel": ("excel_writer",),
    "to_hdf": ("path_or_buf",),
    "to_feather": ("path",),
    "to_pickle": ("path",),
    "to_html": ("buf",),
    "to_netcdf": ("path",),
    "savefig": ("fname",),
    "tofile": ("fid",),
    "extractall": ("path",),
}
# pathlib methods: the receiver is the path.
PATH_METHODS: dict[str, str] = {
    "write_text": "writes",
    "write_bytes": "writes",
    "touch": "creates",
    "unlink": "deletes",
    "rmdir": "deletes",
    "symlink_to": "links",
    "hardlink_to": "links",
    "chmod": "changes permissions of",
    "lchmod": "changes permissions of",
}
# pathlib methods whose names are common elsewhere (str.replace, DataFrame.rename):
# checked only when the receiver is recognisably a path.
PATH_METHODS_IF_PATH: dict[str, str] = {"rename": "renames", "replace": "replaces", "mkdir": "creates", "open": "opens"}

SENSITIVE_PATHS = re.compile(
    r"(^/etc/(passwd|shadow|sudoers|group|gshadow|ssh/)|^/root(/|$)|/\.ssh(/|$)|id_rsa|id_ed25519|/\.aws/|"
    r"/\.netrc$|/\.bash_history$|/\.gnupg/|^/proc/[^/]+/(environ|mem|maps)|^/var/run/secrets|^/dev/(mem|kmem|sd)|"
    r"EMERGENCY_LOCK|/keys/|\.pem$|\.key$)"
)

ESCAPE_ATTRS = {
    "__subclasses__", "__globals__", "__builtins__", "__code__", "__bases__", "__base__", "__mro__",
    "__closure__", "__loader__", "__import__", "f_globals", "f_locals", "f_back", "f_builtins", "f_code",
    "gi_frame", "gi_code", "cr_frame", "ag_frame", "tb_frame", "co_code", "func_globals", "__reduce_ex__",
}
ENV_DANGER = re.compile(r"^(LD_|DYLD_|PYTHON|PATH$|BASH_ENV$|ENV$|PERL5|NODE_OPTIONS$)")

STAR_DANGER = {"os", "posix", "nt", "subprocess", "socket", "ctypes", "builtins", "pickle", "shutil", "importlib", "pty", "marshal"}
BUILTIN_NAMES = frozenset(n for n in dir(builtins) if not n.startswith("_")) | {"__import__"}
# Consumers of a string that turn it into behaviour: where an encoded string must not go.
SINKS = {
    "builtins.eval", "builtins.exec", "builtins.compile", "builtins.__import__", "importlib.import_module",
    "builtins.getattr", "os.system", "os.popen", "subprocess.run", "subprocess.call", "subprocess.Popen",
    "subprocess.check_output", "subprocess.check_call", "subprocess.getoutput", "subprocess.getstatusoutput",
    "pickle.loads", "marshal.loads", "types.FunctionType", "types.CodeType",
}
DECODERS = {
    "base64.b64decode", "base64.b32decode", "base64.b16decode", "base64.a85decode", "base64.b85decode",
    "base64.urlsafe_b64decode", "base64.decodebytes", "base64.decodestring", "binascii.a2b_base64",
    "binascii.unhexlify", "binascii.a2b_hex", "codecs.decode", "zlib.decompress", "gzip.decompress",
    "bz2.decompress", "lzma.decompress", "bytes.fromhex", "bytearray.fromhex", "builtins.chr",
}

_UNKNOWN = "\x00"  # an unknown fragment inside a folded string
_NS = "#ns"  # suffix: a module's namespace dict (os.__dict__, vars(os), globals())
_MODULES_NS = "sys.modules"
_MAX_FOLD = 100_000


def _canonical(qual: str) -> str:
    for alias, real in (("posix.", "os."), ("nt.", "os."), ("__builtin__.", "builtins."), ("_io.", "io.")):
        if qual.startswith(alias):
            return real + qual[len(alias):]
    if qual in ("posix", "nt"):
        return "os"
    return qual


# --------------------------------------------------------------------------- the analyser


class _Scope:
    """What the names of a module mean: imports, assignments, user definitions."""

    def __init__(self) -> None:
        self.imports: dict[str, str] = {}  # local name -> qualified name
        self.assigned: dict[str, list[ast.AST]] = {}  # name -> every value assigned to it
        self.defined: set[str] = set()  # functions, classes, parameters, loop targets …


class Analyzer:
    def __init__(self, config: EthicsConfig | None = None, depth: int = 0, line_offset: int = 0, origin: str = "") -> None:
        self.config = config or EthicsConfig()
        self.depth = depth
        self.line_offset = line_offset
        self.origin = origin  # "" for the code itself; "decoded payload" for nested analyses
        self.scope = _Scope()
        self.findings: dict[tuple[int, str], Finding] = {}
        self._resolving: set[str] = set()
        self._bindings: dict[str, ast.AST | None] = {}
        self._quals: dict[int, str | None] = {}

    # ----------------------------------------------------------------- entry
    def run(self, code: str) -> list[Finding]:
        if len(code.encode("utf-8", "replace")) > self.config.max_bytes:
            self._add(1, INVALID, f"code is larger than {self.config.max_bytes} bytes: split it or raise [safety] max_code_bytes")
            return self.result()
        try:
            tree = ast.parse(code)
        except SyntaxError as exc:
            self._add(exc.lineno or 1, INVALID, f"does not parse ({exc.msg}): the gate rules only on valid Python")
            return self.result()
        except (ValueError, RecursionError, MemoryError) as exc:
            self._add(1, INVALID, f"cannot be parsed ({type(exc).__name__}): the gate rules only on valid Python")
            return self.result()
        self._collect(tree)
        for node in ast.walk(tree):
            self._check(node)
        return self.result()

    def result(self) -> list[Finding]:
        return sorted(self.findings.values())

    def _add(self, line: int, category: str, detail: str) -> None:
        line = (line or 1) + self.line_offset
        if self.origin:
            detail = f"{self.origin}: {detail}"
        # one finding per line and category: the outermost expression (found first) names it
        self.findings.setdefault((line, category), Finding(line, category, detail))

    # ----------------------------------------------------------------- pass 1: names
    def _collect(self, tree: ast.AST) -> None:
        s = self.scope
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname:
                        s.imports[a.asname] = _canonical(a.name)
                    else:
                        top = a.name.split(".")[0]
                        s.imports[top] = _canonical(top)
            elif isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                for a in node.names:
                    if a.name != "*":
                        s.imports[a.asname or a.name] = _canonical(f"{mod}.{a.name}" if mod else a.name)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                s.defined.add(node.name)
                if not isinstance(node, ast.ClassDef):
                    args = node.args
                    for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
                        if a is not None:
                            s.defined.add(a.arg)
            elif isinstance(node, ast.Lambda):
                for a in node.args.args:
                    s.defined.add(a.arg)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    self._bind(target, node.value)
            elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and node.value is not None:
                self._bind(node.target, node.value)
            elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
                s.assigned.setdefault(node.target.id, []).append(ast.BinOp(ast.Name(node.target.id), node.op, node.value))
            elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
                self._define_targets(node.target)
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                for item in node.items:
                    if item.optional_vars is not None:
                        self._bind(item.optional_vars, item.context_expr)
            elif isinstance(node, ast.ExceptHandler) and node.name:
                s.defined.add(node.name)

    def _bind(self, target: ast.AST, value: ast.AST) -> None:
        if isinstance(target, ast.Name):
            self.scope.assigned.setdefault(target.id, []).append(value)
        elif isinstance(target, (ast.Tuple, ast.List)):
            if isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) == len(target.elts):
                for t, v in zip(target.elts, value.elts):
                    self._bind(t, v)
            else:
                self._define_targets(target)

    def _define_targets(self, target: ast.AST) -> None:
        for n in ast.walk(target):
            if isinstance(n, ast.Name):
                self.scope.defined.add(n.id)

    def _binding(self, name: str) -> ast.AST | None:
        """The one value a name is bound to, or None (unbound, rebound, or a parameter)."""
        if name in self._bindings:
            return self._bindings[name]
        values = self.scope.assigned.get(name)
        found = None
        if values and name not in self.scope.defined:
            found = values[0]
            if len(values) > 1:
                first = ast.dump(values[0])
                if any(ast.dump(v) != first for v in values[1:]):
                    found = None
        self._bindings[name] = found
        return found

    # ----------------------------------------------------------------- resolving names
    def qual(self, node: ast.AST) -> str | None:
        """The qualified name an expression refers to ("os.system"), or None."""
        key = id(node)
        if key in self._quals:
            return self._quals[key]
        out = self._qual(node)
        if out is not None or not self._resolving:  # a None inside a cycle guard is not final
            self._quals[key] = out
        return out

    def _qual(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            name = node.id
            if name in self._resolving:
                return None
            self._resolving.add(name)
            try:
                return self._qual_name(name)
            finally:
                self._resolving.discard(name)
        if isinstance(node, ast.Attribute):
            base = self.qual(node.value)
            if base is None:
                return None
            if node.attr == "__dict__":
                return base.removesuffix(_NS) + _NS
            if base.endswith(_NS):
                return None
            if base == "builtins" and node.attr == "__builtins__":
                return "builtins"
            return _canonical(f"{base}.{node.attr}")
        if isinstance(node, ast.Call):
            return self._qual_call(node)
        if isinstance(node, ast.Subscript):
            base = self.qual(node.value)
            if base is None:
                return None
            name = self.fold(node.slice)
            if name is None or _UNKNOWN in name:
                return None
            if base == _MODULES_NS:
                return _canonical(name)
            if base.endswith(_NS):
                return self._in_namespace(base, name)
            if base == "builtins":  # __builtins__ is a dict outside __main__
                return f"builtins.{name}"
            return None
        return None

    def _qual_name(self, name: str) -> str | None:
        s = self.scope
        if name in s.imports:
            return s.imports[name]
        bound = self._binding(name)
        if bound is not None:
            return self.qual(bound)
        if name in s.assigned or name in s.defined:
            return None
        if name == "__builtins__":
            return "builtins"
        if name in BUILTIN_NAMES:
            return f"builtins.{name}"
        return None

    def _in_namespace(self, ns: str, name: str) -> str | None:
        owner = ns.removesuffix(_NS)
        if owner == "<globals>":
            if name == "__builtins__":
                return "builtins"
            return self._qual_name(name)
        return _canonical(f"{owner}.{name}")

    def _qual_call(self, node: ast.Call) -> str | None:
        func = self.qual(node.func)
        args = node.args
        # operator.attrgetter("system")(os) / operator.methodcaller("system", "id")(os)
        if isinstance(node.func, ast.Call) and args:
            getter = self.qual(node.func.func)
            if getter in ("operator.attrgetter", "operator.methodcaller") and node.func.args:
                base, name = self.qual(args[0]), self.fold(node.func.args[0])
                if base and name and _UNKNOWN not in name:
                    return _canonical(f"{base.removesuffix(_NS)}.{name}")
        if func == "builtins.getattr" and len(args) >= 2:
            base = self.qual(args[0])
            name = self.fold(args[1])
            if base is None or name is None or _UNKNOWN in name:
                return None
            if name == "__dict__":
                return base + _NS
            if base.endswith(_NS):
                return self._in_namespace(base, name)
            return _canonical(f"{base}.{name}")
        if func in ("builtins.__import__", "importlib.import_module", "importlib.__import__") and args:
            name = self.fold(args[0])
            if name and _UNKNOWN not in name:
                return _canonical(name)
            return None
        if func == "builtins.vars" and args:
            base = self.qual(args[0])
            return base + _NS if base and not base.endswith(_NS) else None
        if func in ("builtins.globals", "builtins.locals"):
            return "<globals>" + _NS
        if isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "pop", "setdefault") and args:
            base = self.qual(node.func.value)
            name = self.fold(args[0])
            if base and name and _UNKNOWN not in name:
                if base == _MODULES_NS:
                    return _canonical(name)
                if base.endswith(_NS):
                    return self._in_namespace(base, name)
        return None

    # ----------------------------------------------------------------- folding strings
    def fold(self, node: ast.AST, _depth: int = 0) -> str | None:
        """The string value of an expression where it is static; unknown parts as _UNKNOWN."""
        if _depth > 40:
            return None
        f = lambda n: self.fold(n, _depth + 1)  # noqa: E731
        if isinstance(node, ast.Constant):
            if isinstance(node.value, str):
                return node.value
            if isinstance(node.value, bytes):
                return node.value.decode("latin-1")
            if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
                return str(node.value)
            return None
        if isinstance(node, ast.Name):
            if node.id in self._resolving:
                return None
            bound = self._binding(node.id)
            if bound is None:
                return None
            self._resolving.add(node.id)
            try:
                return f(bound)
            finally:
                self._resolving.discard(node.id)
        if isinstance(node, ast.JoinedStr):
            parts = []
            for v in node.values:
                if isinstance(v, ast.FormattedValue):
                    inner = f(v.value)
                    parts.append(inner if inner is not None and v.format_spec is None else _UNKNOWN)
                else:
                    parts.append(f(v) or "")
            return _cap("".join(parts))
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Add):
                a, b = f(node.left), f(node.right)
                if a is None and b is None:
                    return None
                return _cap((a if a is not None else _UNKNOWN) + (b if b is not None else _UNKNOWN))
            if isinstance(node.op, ast.Mod):
                fmt = f(node.left)
                if fmt is None:
                    return None
                items = node.right.elts if isinstance(node.right, ast.Tuple) else [node.right]
                vals = tuple((f(i) if f(i) is not None else _UNKNOWN) for i in items)
                try:
                    return _cap(fmt % vals)
                except (TypeError, ValueError):
                    return None
            if isinstance(node.op, ast.Div):  # pathlib: Path(a) / b
                a, b = self.fold_path_like(node.left), f(node.right)
                if a is None:
                    return None
                return posixpath.join(a, b if b is not None else _UNKNOWN)
            if isinstance(node.op, ast.Mult):
                a, n = f(node.left), node.right
                if a is not None and isinstance(n, ast.Constant) and isinstance(n.value, int) and 0 <= n.value * len(a) <= _MAX_FOLD:
                    return a * n.value
            return None
        if isinstance(node, ast.Subscript):
            base = f(node.value)
            if base is None or _UNKNOWN in base:
                return None
            sl = node.slice
            if isinstance(sl, ast.Slice):
                try:
                    lo, hi, st = (self._int(x) for x in (sl.lower, sl.upper, sl.step))
                    return base[slice(lo, hi, st)]
                except (TypeError, ValueError):
                    return None
            i = self._int(sl)
            if isinstance(i, int) and -len(base) <= i < len(base):
                return base[i]
            return None
        if isinstance(node, ast.Call):
            return self._fold_call(node, _depth)
        return None

    def _int(self, node: ast.AST | None) -> int | None:
        if node is None:
            return None
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            if isinstance(node.operand.value, int):
                return -node.operand.value
        raise TypeError("not a static int")

    def _int_list(self, node: ast.AST) -> list[int] | None:
        if isinstance(node, ast.Name):
            bound = self._binding(node.id)
            return self._int_list(bound) if bound is not None else None
        if isinstance(node, (ast.List, ast.Tuple)):
            out = []
            for e in node.elts:
                if isinstance(e, ast.Constant) and isinstance(e.value, int):
                    out.append(e.value)
                elif isinstance(e, ast.BinOp):  # chr(100 + 1) style
                    try:
                        out.append(int(_eval_arith(e)))
                    except (TypeError, ValueError):
                        return None
                else:
                    return None
            return out
        return None

    def _str_items(self, node: ast.AST, depth: int) -> list[str] | None:
        """The folded strings of a list / tuple / comprehension / map(chr, …) argument."""
        if isinstance(node, ast.Name):
            bound = self._binding(node.id)
            return self._str_items(bound, depth) if bound is not None else None
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [self.fold(e, depth + 1) for e in node.elts]
            return None if any(i is None for i in items) else items  # type: ignore[return-value]
        if isinstance(node, (ast.ListComp, ast.GeneratorExp)) and len(node.generators) == 1:
            gen = node.generators[0]
            elt = node.elt
            if (
                isinstance(elt, ast.Call)
                and self.qual(elt.func) == "builtins.chr"
                and len(elt.args) == 1
                and isinstance(elt.args[0], ast.Name)
                and isinstance(gen.target, ast.Name)
                and elt.args[0].id == gen.target.id
            ):
                ints = self._int_list(gen.iter)
                if ints is not None:
                    return [_chr(i) for i in ints]
            if isinstance(elt, ast.Name) and isinstance(gen.target, ast.Name) and elt.id == gen.target.id:
                return self._str_items(gen.iter, depth)
            return None
        if isinstance(node, ast.Call):
            q = self.qual(node.func)
            if q == "builtins.map" and len(node.args) == 2 and self.qual(node.args[0]) == "builtins.chr":
                ints = self._int_list(node.args[1])
                return [_chr(i) for i in ints] if ints is not None else None
            if q in ("builtins.reversed",) and node.args:
                items = self._str_items(node.args[0], depth)
                if items is None:
                    s = self.fold(node.args[0], depth + 1)
                    return list(reversed(s)) if s is not None else None
                return list(reversed(items))
        s = self.fold(node, depth + 1)
        return list(s) if s is not None else None

    def _fold_call(self, node: ast.Call, depth: int) -> str | None:
        f = lambda n: self.fold(n, depth + 1)  # noqa: E731
        func = node.func
        q = self.qual(func)
        args = node.args
        if q == "builtins.chr" and len(args) == 1:
            try:
                return _chr(int(_eval_arith(args[0])))
            except (TypeError, ValueError):
                return None
        if q in ("builtins.str", "os.fspath", "os.path.normpath", "os.path.abspath", "os.path.realpath", "builtins.format") and args:
            return f(args[0])
        if q in ("os.path.join",) and args:
            parts = [f(a) for a in args]
            return posixpath.join(*[p if p is not None else _UNKNOWN for p in parts])
        if q in ("pathlib.Path", "pathlib.PurePath", "pathlib.PosixPath", "pathlib.PurePosixPath"):
            if not args:
                return "."
            parts = [f(a) for a in args]
            return posixpath.join(*[p if p is not None else _UNKNOWN for p in parts])
        if q in ("os.getcwd", "pathlib.Path.cwd"):
            return "."
        if q in ("pathlib.Path.home",):
            return "~"
        if q in ("tempfile.gettempdir",):
            return "/tmp"
        if q == "os.path.expanduser" and args:
            return f(args[0])
        if q in ("os.path.dirname",) and args:
            a = args[0]
            if isinstance(a, ast.Name) and a.id == "__file__":
                return "."
            inner = f(a)
            return posixpath.dirname(inner) if inner is not None else None
        if q in ("os.getenv", "os.environ.get") and args:
            name = f(args[0])
            if name in ("HOME", "USERPROFILE"):
                return "~"
            return None
        if q in ("bytes.fromhex", "bytearray.fromhex", "binascii.unhexlify", "binascii.a2b_hex") and args:
            s = f(args[0])
            return _try(lambda: bytes.fromhex(s).decode("latin-1")) if s else None
        if q in ("base64.b64decode", "base64.decodebytes", "base64.decodestring", "binascii.a2b_base64", "base64.standard_b64decode") and args:
            s = f(args[0])
            return _try(lambda: base64.b64decode(s.encode("latin-1") + b"==", validate=False).decode("latin-1")) if s else None
        if q == "base64.urlsafe_b64decode" and args:
            s = f(args[0])
            return _try(lambda: base64.urlsafe_b64decode(s.encode("latin-1") + b"==").decode("latin-1")) if s else None
        if q == "base64.b32decode" and args:
            s = f(args[0])
            return _try(lambda: base64.b32decode(s.encode("latin-1")).decode("latin-1")) if s else None
        if q == "base64.b16decode" and args:
            s = f(args[0])
            return _try(lambda: base64.b16decode(s.encode("latin-1"), casefold=True).decode("latin-1")) if s else None
        if q in ("base64.a85decode", "base64.b85decode") and args:
            s = f(args[0])
            fn = base64.a85decode if q.endswith("a85decode") else base64.b85decode
            return _try(lambda: fn(s.encode("latin-1")).decode("latin-1")) if s else None
        if q in ("zlib.decompress", "gzip.decompress", "bz2.decompress", "lzma.decompress") and args:
            s = f(args[0])
            mod = __import__(q.split(".")[0])
            return _try(lambda: _bounded_decompress(mod, s.encode("latin-1"))) if s else None
        if q == "codecs.decode" and args:
            s = f(args[0])
            enc = f(args[1]) if len(args) > 1 else "utf-8"
            if s is None or enc is None:
                return None
            enc = enc.lower().replace("-", "_")
            if enc in ("rot13", "rot_13"):
                return codecs.decode(s, "rot13")
            if enc in ("hex", "hex_codec"):
                return _try(lambda: bytes.fromhex(s).decode("latin-1"))
            if enc in ("base64", "base64_codec"):
                return _try(lambda: base64.b64decode(s.encode("latin-1") + b"==").decode("latin-1"))
            return s
        if q in ("builtins.bytes", "builtins.bytearray") and args:
            ints = self._int_list(args[0])
            if ints is not None:
                return _try(lambda: bytes(ints).decode("latin-1"))
            return f(args[0])
        if isinstance(func, ast.Attribute):
            method = func.attr
            if method == "join" and len(args) == 1:
                sep = f(func.value)
                if sep is None:
                    # os.path.join written as a method on a module alias is handled above
                    return None
                items = self._str_items(args[0], depth)
                return _cap(sep.join(items)) if items is not None else None
            if method in ("decode", "encode", "strip", "lstrip", "rstrip", "lower", "upper", "casefold", "title", "capitalize") and not args:
                base = f(func.value)
                return getattr(base, method)() if base is not None and method not in ("decode", "encode") else base
            if method in ("decode", "encode") and args:
                base = f(func.value)
                enc = f(args[0])
                if base is not None and enc and enc.lower().replace("-", "_") in ("rot13", "rot_13"):
                    return codecs.decode(base, "rot13")
                return base
            if method == "replace" and len(args) >= 2:
                base, old, new = f(func.value), f(args[0]), f(args[1])
                if None in (base, old, new):
                    return None
                return _cap(base.replace(old, new))  # type: ignore[union-attr]
            if method == "format":
                base = f(func.value)
                if base is None:
                    return None
                pos = [(f(a) if f(a) is not None else _UNKNOWN) for a in args]
                kw = {k.arg: (f(k.value) if f(k.value) is not None else _UNKNOWN) for k in node.keywords if k.arg}
                try:
                    return _cap(base.format(*pos, **kw))
                except (IndexError, KeyError, ValueError):
                    return None
            if method == "joinpath":
                base = self.fold_path_like(func.value)
                if base is None:
                    return None
                parts = [f(a) for a in args]
                return posixpath.join(base, *[p if p is not None else _UNKNOWN for p in parts])
            if method in ("resolve", "absolute", "expanduser"):
                return self.fold_path_like(func.value)
        return None

    def fold_path_like(self, node: ast.AST) -> str | None:
        """A folded path where `node` is a path expression (str or pathlib)."""
        return self.fold(node)

    def is_path_expr(self, node: ast.AST) -> bool:
        """Whether `node` is recognisably a pathlib path (for ambiguous method names)."""
        if isinstance(node, ast.Name):
            bound = self._binding(node.id)
            return bound is not None and self.is_path_expr(bound)
        if isinstance(node, ast.Call):
            q = self.qual(node.func)
            if q and q.startswith("pathlib."):
                return True
            if isinstance(node.func, ast.Attribute) and node.func.attr in ("joinpath", "with_suffix", "with_name", "resolve", "absolute", "expanduser"):
                return self.is_path_expr(node.func.value)
            return False
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            return self.is_path_expr(node.left)
        return False

    # ----------------------------------------------------------------- pass 2: checks
    def _check(self, node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            for a in node.names:
                self._check_module(node.lineno, _canonical(a.name), "imports")
        elif isinstance(node, ast.ImportFrom):
            mod = _canonical(node.module or "")
            if node.level == 0 and mod:
                self._check_module(node.lineno, mod, "imports")
                for a in node.names:
                    if a.name == "*":
                        if mod.split(".")[0] in STAR_DANGER:
                            self._add(node.lineno, ESCAPE, f"`from {mod} import *` makes every function of {mod} reachable")
                    else:
                        self._check_qual(node.lineno, _canonical(f"{mod}.{a.name}"), "imports")
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            if node.id == "__builtins__":
                self._add(node.lineno, ESCAPE, "direct access to __builtins__")
            q = self.qual(node)
            if q:
                self._check_qual(node.lineno, q, "uses")
        elif isinstance(node, ast.Attribute):
            if node.attr in ESCAPE_ATTRS:
                self._add(node.lineno, ESCAPE, f"introspection through .{node.attr} reaches outside the code")
            q = self.qual(node)
            if q:
                self._check_qual(node.lineno, q, "uses")
        elif isinstance(node, ast.Subscript):
            base = self.qual(node.value)
            if base == _MODULES_NS:
                self._add(node.lineno, ESCAPE, "sys.modules is indexed directly (import bypass)")
            q = self.qual(node)
            if q:
                self._check_qual(node.lineno, q, "reaches")
            if isinstance(node.ctx, ast.Store) and self.qual(node.value) == "os.environ":
                key = self.fold(node.slice)
                if key and ENV_DANGER.match(key):
                    self._add(node.lineno, ESCAPE, f"sets os.environ[{key!r}], which changes what later processes load")
        elif isinstance(node, ast.Call):
            q = self.qual(node)  # what the call's value is: getattr(os, "system") -> os.system
            if q:
                self._check_qual(node.lineno, q, "reaches")
            self._check_call(node)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            self._check_encoded_constant(node)

    def _check_module(self, line: int, module: str, verb: str) -> None:
        parts = module.split(".")
        prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
        if any(p in MODULE_EXCEPTIONS for p in prefixes):
            return
        for p in prefixes:
            category = MODULES.get(p)
            if category:
                self._add(line, category, f"{verb} {module}")
                return

    def _check_qual(self, line: int, qual: str, verb: str) -> None:
        qual = qual.removesuffix(_NS)
        hit = FUNCTIONS.get(qual)
        if hit:
            self._add(line, hit[0], hit[1])
            return
        for prefix, category, what in PREFIXES:
            if qual.startswith(prefix):
                self._add(line, category, f"{qual} {what}")
                return
        if qual in PATH_FUNCTIONS or qual in ("builtins.open", "io.open", "codecs.open", "os.open"):
            return  # judged at the call, by its path
        self._check_module(line, qual, verb)

    # ----------------------------------------------------------------- calls
    def _check_call(self, node: ast.Call) -> None:
        q = self.qual(node.func)
        line = node.lineno
        if q in ("builtins.getattr", "builtins.setattr", "builtins.delattr") and len(node.args) >= 2:
            target = self.qual(node.args[0])
            name = self.fold(node.args[1])
            if target and (name is None or _UNKNOWN in name) and _is_module_like(target):
                self._add(line, ESCAPE, f"{q.split('.')[-1]}() on {target.removesuffix(_NS)} with a name computed at run time")
            if name and _UNKNOWN not in name and name in ESCAPE_ATTRS:
                self._add(line, ESCAPE, f"introspection through {name} reaches outside the code")
        if q in ("builtins.open", "io.open", "codecs.open"):
            self._check_open(node)
        elif q == "os.open":
            self._check_os_open(node)
        elif q in PATH_FUNCTIONS:
            idx, kws, verb = PATH_FUNCTIONS[q]
            for i, arg in self._path_args(node, idx, kws):
                self._check_path(line, arg, f"{q} {verb}")
        elif q == "yaml.load" or q == "yaml.load_all":
            loader = node.args[1] if len(node.args) > 1 else _kw(node, "Loader")
            lq = self.qual(loader) if loader is not None else None
            if lq not in ("yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"):
                self._add(line, DESERIALISE, f"{q} without a safe Loader builds arbitrary objects: use yaml.safe_load")
        elif q == "numpy.load":
            v = _kw(node, "allow_pickle")
            if isinstance(v, ast.Constant) and v.value is True:
                self._add(line, DESERIALISE, "numpy.load(allow_pickle=True) unpickles untrusted data")
        elif q == "torch.load":
            v = _kw(node, "weights_only")
            if not (isinstance(v, ast.Constant) and v.value is True):
                self._add(line, DESERIALISE, "torch.load without weights_only=True unpickles untrusted data")
        elif q in ("tarfile.open", "zipfile.ZipFile"):
            pass
        if isinstance(node.func, ast.Attribute):
            self._check_method(node)
        if q in SINKS or (q and q.startswith("subprocess.")):
            self._check_sink(node, q)

    def _path_args(self, node: ast.Call, idx: tuple[int, ...], kws: tuple[str, ...]) -> Iterable[tuple[int, ast.AST]]:
        for n, i in enumerate(idx):
            if i < len(node.args):
                yield i, node.args[i]
            elif n < len(kws):
                v = _kw(node, kws[n])
                if v is not None:
                    yield i, v

    def _check_open(self, node: ast.Call) -> None:
        path = node.args[0] if node.args else _kw(node, "file")
        mode_node = node.args[1] if len(node.args) > 1 else _kw(node, "mode")
        mode = self.fold(mode_node) if mode_node is not None else "r"
        if path is None:
            return
        writing = mode is None or _UNKNOWN in mode or any(c in mode for c in "wax+")
        if writing:
            self._check_path(node.lineno, path, "open() for writing" if mode is not None else "open() with a mode computed at run time")
        else:
            self._check_read(node.lineno, path)

    def _check_os_open(self, node: ast.Call) -> None:
        if not node.args:
            return
        flags = node.args[1] if len(node.args) > 1 else _kw(node, "flags")
        nodes = list(ast.walk(flags)) if flags is not None else []
        names = {n.attr for n in nodes if isinstance(n, ast.Attribute)} | {n.id for n in nodes if isinstance(n, ast.Name)}
        if names & {"O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND"} or flags is None or not names:
            self._check_path(node.lineno, node.args[0], "os.open() for writing")
        else:
            self._check_read(node.lineno, node.args[0])

    def _check_method(self, node: ast.Call) -> None:
        func = node.func
        assert isinstance(func, ast.Attribute)
        method = func.attr
        line = node.lineno
        receiver_qual = self.qual(func.value)
        if receiver_qual and _is_module_like(receiver_qual) and not self.is_path_expr(func.value):
            return  # a module function: judged by its qualified name
        if method in PATH_METHODS:
            self._check_path(line, func.value, f".{method}() {PATH_METHODS[method]}")
        elif method in PATH_METHODS_IF_PATH and self.is_path_expr(func.value):
            if method == "open":
                mode_node = node.args[0] if node.args else _kw(node, "mode")
                mode = self.fold(mode_node) if mode_node is not None else "r"
                if mode is None or any(c in mode for c in "wax+"):
                    self._check_path(line, func.value, ".open() for writing")
                else:
                    self._check_read(line, func.value)
            else:
                self._check_path(line, func.value, f".{method}() {PATH_METHODS_IF_PATH[method]}")
                if method in ("rename", "replace") and node.args:
                    self._check_path(line, node.args[0], f".{method}() {PATH_METHODS_IF_PATH[method]}")
        elif method in ("read_text", "read_bytes") and self.is_path_expr(func.value):
            self._check_read(line, func.value)
        elif method in WRITER_METHODS:
            target = node.args[0] if node.args else None
            for kw in WRITER_METHODS[method]:
                target = target if target is not None else _kw(node, kw)
            if method == "extractall":
                if target is None:
                    self._add(line, FILESYSTEM, "extractall() without a path extracts into the working directory unchecked: give a sandbox path")
                else:
                    self._check_path(line, target, ".extractall() writes")
                return
            if target is None:
                return  # to_csv() with no path returns a string
            if isinstance(target, ast.Name) and self._binding(target.id) is not None and self._is_handle(self._binding(target.id)):
                return  # a handle from open(): its open() was checked
            self._check_path(line, target, f".{method}() writes")

    def _is_handle(self, node: ast.AST) -> bool:
        return isinstance(node, ast.Call) and self.qual(node.func) in ("builtins.open", "io.open", "io.StringIO", "io.BytesIO")

    # ----------------------------------------------------------------- paths
    def _check_path(self, line: int, node: ast.AST, what: str) -> None:
        if isinstance(node, ast.Name) and self._binding(node.id) is not None and self._is_handle(self._binding(node.id)):
            return
        if isinstance(node, ast.Call) and self.qual(node.func) in ("io.StringIO", "io.BytesIO"):
            return
        path = self.fold(node)
        verdict = self.inside_sandbox(path)
        if verdict is True:
            return
        if path is None or verdict is None:
            self._add(line, FILESYSTEM, f"{what} a path the gate cannot resolve statically: write to a literal path inside the sandbox")
        else:
            self._add(line, FILESYSTEM, f"{what} {_show(path)}, outside the sandbox")

    def _check_read(self, line: int, node: ast.AST) -> None:
        path = self.fold(node)
        known = path.split(_UNKNOWN)[0] if path else ""
        if known and SENSITIVE_PATHS.search(posixpath.normpath(known)):
            self._add(line, SENSITIVE, f"reads {_show(path)}, a credential or system file")

    def inside_sandbox(self, path: str | None) -> bool | None:
        if path is None:
            return None
        known, _, rest = path.partition(_UNKNOWN)
        if _UNKNOWN in path:
            # an unknown part is accepted only after a directory proven inside the sandbox
            if not known or "/" not in known:
                return None
            known = known[: known.rindex("/") + 1]
        if known.startswith("~"):
            return False
        norm = posixpath.normpath(known) if known else "."
        if norm.startswith("/"):
            return any(norm == r or norm.startswith(r.rstrip("/") + "/") for r in self.config.sandbox_roots)
        return not (norm == ".." or norm.startswith("../"))

    # ----------------------------------------------------------------- obfuscation
    def _check_sink(self, node: ast.Call, sink: str) -> None:
        for arg in list(node.args) + [k.value for k in node.keywords]:
            how = self._encoding_in(arg, set())
            if how:
                self._add(node.lineno, OBFUSCATION, f"{how} fed to {sink.removeprefix('builtins.')}")
            text = self.fold(arg)
            if text and _UNKNOWN not in text and sink in ("builtins.eval", "builtins.exec", "builtins.compile"):
                self._nested(node.lineno, text, "code passed to " + sink.removeprefix("builtins."))

    def _encoding_in(self, node: ast.AST, seen: set[str]) -> str | None:
        """Whether an expression decodes or assembles a hidden string (base64, chr …)."""
        for n in ast.walk(node):
            if isinstance(n, ast.Call):
                q = self.qual(n.func)
                if q in DECODERS and q != "builtins.chr":
                    return f"an encoded string ({q})"
                if q == "builtins.chr":
                    return "a string assembled from chr() codes"
                if isinstance(n.func, ast.Attribute) and n.func.attr in ("decode",) and n.args:
                    enc = self.fold(n.args[0])
                    if enc and enc.lower().replace("-", "_") in ("rot13", "rot_13", "hex", "base64", "zlib"):
                        return f"an encoded string ({enc})"
                if isinstance(n.func, ast.Attribute) and n.func.attr == "join":
                    if any(isinstance(a, (ast.GeneratorExp, ast.ListComp)) or (isinstance(a, ast.Call) and self.qual(a.func) in ("builtins.map", "builtins.reversed")) for a in n.args):
                        return "a string assembled at run time (join)"
            elif isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Slice) and n.slice.step is not None:
                return "a reversed or sliced string"
            elif isinstance(n, ast.Name) and n.id not in seen:
                bound = self._binding(n.id)
                if bound is not None:
                    seen.add(n.id)
                    how = self._encoding_in(bound, seen)
                    if how:
                        return how
        return None

    def _check_encoded_constant(self, node: ast.Constant) -> None:
        """A string constant that decodes to code with findings of its own."""
        s = node.value
        if self.depth >= self.config.max_decode_depth or len(s) < 16:
            return
        compact = s.strip()
        decoded = None
        if re.fullmatch(r"[A-Za-z0-9+/=\s_-]{16,}", compact) and not re.fullmatch(r"[A-Za-z_ ]+", compact):
            decoded = _try(lambda: base64.b64decode(compact + "==", altchars=b"-_" if ("-" in compact or "_" in compact) else None).decode("utf-8"))
        if decoded is None and re.fullmatch(r"(?:[0-9a-fA-F]{2}){8,}", compact):
            decoded = _try(lambda: bytes.fromhex(compact).decode("utf-8"))
        if decoded:
            self._nested(node.lineno, decoded, "encoded payload")

    def _nested(self, line: int, text: str, what: str) -> None:
        if self.depth >= self.config.max_decode_depth or not _looks_like_code(text):
            return
        inner = Analyzer(self.config, self.depth + 1, origin=f"{what} (line {line})")
        found = [f for f in inner.run(text) if f.category != INVALID]
        for f in found:
            self._add(line, OBFUSCATION if what == "encoded payload" else f.category, f"{f.detail}")


# --------------------------------------------------------------------------- helpers


def _kw(node: ast.Call, name: str) -> ast.AST | None:
    for k in node.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_module_like(qual: str) -> bool:
    q = qual.removesuffix(_NS)
    root = q.split(".")[0]
    return root in {"os", "builtins", "subprocess", "sys", "importlib", "socket", "ctypes", "shutil", "pickle", "marshal", "pty", "io", "codecs", "posix", "nt", "<globals>"} or qual.endswith(_NS)


def _chr(i: int) -> str:
    return chr(i) if 0 <= i < 0x110000 else "?"


def _eval_arith(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp):
        a, b = _eval_arith(node.left), _eval_arith(node.right)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult) and abs(a * b) < 1 << 40:
            return a * b
        if isinstance(node.op, ast.BitXor):
            return int(a) ^ int(b)
    raise TypeError("not static arithmetic")


def _try(fn):
    try:
        out = fn()
    except Exception:  # noqa: BLE001 - folding hostile input: whatever fails to fold is not a static value
        return None
    return _cap(out) if isinstance(out, str) else out


def _cap(s: str | None) -> str | None:
    if s is None or len(s) > _MAX_FOLD:
        return None
    return s


def _bounded_decompress(mod, data: bytes) -> str:
    if mod is zlib:
        d = zlib.decompressobj()
        out = d.decompress(data, _MAX_FOLD)
        return out.decode("latin-1")
    return mod.decompress(data)[:_MAX_FOLD].decode("latin-1")


def _looks_like_code(text: str) -> bool:
    if not text or "\x00" in text:
        return False
    printable = sum(ch.isprintable() or ch in "\n\t\r" for ch in text)
    return printable / len(text) > 0.95


def _show(path: str) -> str:
    return repr(path.replace(_UNKNOWN, "…"))


# --------------------------------------------------------------------------- the capability gate
#
# Default deny, for generated code: the code may import only the modules of a declared
# capability set and use only the names listed for each (domains/data/codegate_allow.txt),
# call only allow-listed builtins, and never touch a dunder attribute, a frame, a module
# object as a value, or a module's attributes by assignment. Everything else is refused with
# its line, the construct and the rule. The deny-list analyser above stays as the
# explanation of *why* a refused construct matters (`explain`).

CAPABILITY = "capability"
CONTRACT = "contract"

ALLOW_FILE = "codegate_allow.txt"

ALLOWED_BUILTINS = frozenset(
    {
        "abs", "all", "any", "bool", "dict", "divmod", "enumerate", "filter", "float", "frozenset", "int",
        "isinstance", "len", "list", "map", "max", "min", "next", "pow", "range", "reversed", "round", "set",
        "slice", "sorted", "str", "sum", "tuple", "zip", "print", "complex", "iter", "repr", "format", "hash",
        "callable", "chr", "ord", "bin", "hex", "oct", "bytes", "property", "staticmethod", "classmethod",
        "super", "object", "issubclass", "NotImplemented", "Ellipsis",
        "Exception", "ArithmeticError", "AssertionError", "AttributeError", "FloatingPointError", "IndexError", "KeyError",
        "LookupError", "NotImplementedError", "OverflowError", "RuntimeError", "StopIteration", "TypeError",
        "ValueError", "ZeroDivisionError",
    }
)
# dunder names a module may name (read or bind) and dunder methods a class may define
ALLOWED_DUNDER_NAMES = frozenset({"__name__", "__all__", "__slots__", "__doc__"})
ALLOWED_DUNDER_DEFS = frozenset(
    {
        "__init__", "__post_init__", "__call__", "__repr__", "__str__", "__len__", "__iter__", "__next__",
        "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__", "__getitem__", "__contains__",
        "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__neg__",
        "__bool__", "__float__", "__int__",
    }
)
# attributes refused on any object (they lead to frames, code, native memory or files)
DENIED_OBJECT_ATTRS: dict[str, str] = {
    **{a: "reaches interpreter frames or code objects" for a in (
        "f_globals", "f_locals", "f_back", "f_builtins", "f_code", "f_trace", "gi_frame", "gi_code",
        "gi_yieldfrom", "cr_frame", "cr_code", "ag_frame", "ag_code", "tb_frame", "tb_next", "co_code",
        "co_consts", "func_globals", "func_code", "mro")},
    "ctypes": "exposes raw memory through ctypes",
    "cffi": "exposes raw memory through cffi",
    "tofile": "writes a file",
    "dump": "writes a file (pickle)",
    "dumps": "pickles an object",
    "format_map": "formats with attribute lookups chosen by data",
}
MAX_INT = 2**31  # integer constants beyond this are resource bombs in a controller
MAX_ELEMENTS = 10**8  # a constant shape with more elements is a memory bomb
INFINITE_ITERATORS = frozenset({"itertools.count", "itertools.cycle", "itertools.repeat"})
CONSUMERS = frozenset({"list", "tuple", "set", "frozenset", "sorted", "sum", "max", "min", "dict", "any", "all"})


@dataclass(frozen=True)
class Capabilities:
    """What generated code may use: module -> the names it may take from it."""

    modules: dict[str, frozenset[str]]
    builtins: frozenset[str] = ALLOWED_BUILTINS

    @classmethod
    def load(cls, path: str | None = None) -> "Capabilities":
        from pathlib import Path

        text = (Path(path) if path else Path(__file__).parent / "data" / ALLOW_FILE).read_text()
        modules: dict[str, set[str]] = {}
        current = None
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("[") and line.endswith("]"):
                current = line[1:-1].strip()
                modules.setdefault(current, set())
            elif current is None:
                raise ValueError(f"{path or ALLOW_FILE}: names before the first [module] header")
            else:
                modules[current].update(line.split())
        return cls({m: frozenset(n) for m, n in modules.items()})

    def is_module(self, qual: str) -> bool:
        return qual in self.modules


_CAPS: list[Capabilities] = []


def capabilities() -> Capabilities:
    """The shipped capability set (read once)."""
    if not _CAPS:
        _CAPS.append(Capabilities.load())
    return _CAPS[0]


@dataclass(frozen=True)
class Contract:
    """What the code must define: a class `Controller` with `step(self, observation)` and an
    optional `__init__(self, spec)` (docs/codegen.md)."""

    cls: str = "Controller"
    method: str = "step"
    method_params: tuple[str, ...] = ("self", "observation")
    init_params: tuple[str, ...] = ("self", "spec")


CONTROLLER = Contract()


def _construct(node: ast.AST) -> str:
    try:
        text = ast.unparse(node)
    except Exception:  # noqa: BLE001 - unparse of a hostile tree: name the node type instead
        text = type(node).__name__
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."


class _Gate:
    def __init__(self, caps: Capabilities) -> None:
        self.caps = caps
        self.findings: dict[tuple[int, str], Finding] = {}
        self.modules: dict[str, str] = {}  # local name -> module it is bound to by an import
        self.bound: set[str] = set()
        self.parent: dict[int, ast.AST] = {}

    def deny(self, node: ast.AST, why: str, rule: str, category: str = CAPABILITY) -> None:
        line = getattr(node, "lineno", 1) or 1
        detail = f"`{_construct(node)}`: {why} [rule: {rule}]"
        self.findings.setdefault((line, detail), Finding(line, category, detail))

    # ----------------------------------------------------------------- pass 1
    def collect(self, tree: ast.AST) -> None:
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                self.parent[id(child)] = node
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname:
                        self.modules[a.asname] = a.name
                    else:
                        self.modules[a.name.split(".")[0]] = a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    qual = f"{node.module}.{a.name}"
                    if self.caps.is_module(qual):
                        self.modules[a.asname or a.name] = qual
                    else:
                        self.bound.add(a.asname or a.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
                self.bound.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.bound.add(node.name)
            elif isinstance(node, ast.arg):
                self.bound.add(node.arg)
            elif isinstance(node, ast.ExceptHandler) and node.name:
                self.bound.add(node.name)
            elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
                self.bound.add(node.name)
            elif isinstance(node, ast.MatchMapping) and node.rest:
                self.bound.add(node.rest)
            elif isinstance(node, (ast.Global, ast.Nonlocal)):
                self.bound.update(node.names)

    # ----------------------------------------------------------------- pass 2
    def check(self, tree: ast.AST) -> None:
        for name in self.modules:
            if name in self.bound:
                self.deny(ast.Name(id=name, lineno=1), f"the module name {name!r} is bound again elsewhere", "module names are never re-bound")
        for node in ast.walk(tree):
            method = getattr(self, "_" + type(node).__name__, None)
            if method is not None:
                method(node)

    def module_of(self, node: ast.AST) -> str | None:
        """The allowed module an expression names (`np`, `np.linalg`), or None."""
        if isinstance(node, ast.Name):
            return self.modules.get(node.id)
        if isinstance(node, ast.Attribute):
            outer = self.module_of(node.value)
            if outer is not None and self.caps.is_module(f"{outer}.{node.attr}") and node.attr in self.caps.modules.get(outer, ()):
                return f"{outer}.{node.attr}"
        return None

    def _Import(self, node: ast.Import) -> None:
        for a in node.names:
            if not self.caps.is_module(a.name):
                self.deny(node, f"module {a.name} is outside the capability set ({', '.join(sorted(m for m in self.caps.modules if '.' not in m and m != '__future__'))})", "allowed imports")

    def _ImportFrom(self, node: ast.ImportFrom) -> None:
        mod = node.module or ""
        if node.level:
            self.deny(node, "relative imports reach outside the code", "allowed imports")
            return
        if not self.caps.is_module(mod):
            self.deny(node, f"module {mod} is outside the capability set", "allowed imports")
            return
        for a in node.names:
            if a.name == "*":
                self.deny(node, "a star import brings in names unseen", "allowed imports")
            elif a.name not in self.caps.modules[mod]:
                self.deny(node, f"{mod}.{a.name} is not in the capability set of {mod}", "allowed names of a module")

    def _Name(self, node: ast.Name) -> None:
        name = node.id
        if name.startswith("__") and name.endswith("__") and name not in ALLOWED_DUNDER_NAMES:
            self.deny(node, f"the dunder name {name} reaches the interpreter's internals", "no dunder access")
            return
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            if name in BUILTIN_NAMES and name not in self.caps.builtins:
                self.deny(node, f"re-binds the builtin {name}, which is outside the allowed builtins", "no builtins outside the allow-list")
            return
        if name in self.modules:
            parent = self.parent.get(id(node))
            if not (isinstance(parent, ast.Attribute) and parent.value is node):
                self.deny(node, f"the module {self.modules[name]} is used as a value (passed, stored or returned)", "modules only as the root of an attribute")
            return
        if name in self.bound or name in ALLOWED_DUNDER_NAMES:
            return
        if name in self.caps.builtins:
            return
        if name in BUILTIN_NAMES:
            self.deny(node, f"the builtin {name} is outside the allowed builtins", "no builtins outside the allow-list")
        else:
            self.deny(node, f"{name} is never defined in the code", "every name defined or allowed")

    def _Attribute(self, node: ast.Attribute) -> None:
        attr = node.attr
        if attr.startswith("__") and attr.endswith("__"):
            if not (attr == "__init__" and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name) and node.value.func.id == "super"):
                self.deny(node, f"the dunder attribute {attr} reaches the interpreter's internals", "no dunder access")
            return
        if attr in DENIED_OBJECT_ATTRS:
            self.deny(node, f".{attr} {DENIED_OBJECT_ATTRS[attr]}", "no frames, raw memory or files")
            return
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            root = node.value
            while isinstance(root, (ast.Attribute, ast.Subscript, ast.Call)):
                root = root.func if isinstance(root, ast.Call) else root.value
            if isinstance(root, ast.Name) and root.id in self.modules:
                self.deny(node, f"changes {_construct(node)}, which the module {self.modules[root.id]} owns (monkeypatching)", "modules are read-only")
                return
        mod = self.module_of(node.value)
        if mod is None:
            return
        if attr not in self.caps.modules.get(mod, ()):
            self.deny(node, f"{mod}.{attr} is not in the capability set of {mod}", "allowed names of a module")

    def _Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "format" and isinstance(func.value, ast.Constant) and isinstance(func.value.value, str):
            import string

            try:
                fields = [f for _, f, _, _ in string.Formatter().parse(func.value.value) if f]
            except ValueError:
                fields = ["?"]
            if any("." in f or "[" in f for f in fields):
                self.deny(node, "a format string that looks up attributes or items of its arguments", "no dynamic attribute access")
        elif isinstance(func, ast.Attribute) and func.attr == "format" and not isinstance(func.value, (ast.Constant, ast.JoinedStr)):
            self.deny(node, "str.format on a string that is not a literal", "no dynamic attribute access")
        name = func.id if isinstance(func, ast.Name) and func.id not in self.bound else None
        if name in CONSUMERS and node.args and isinstance(node.args[0], ast.Call):
            inner = node.args[0]
            mod = self.module_of(inner.func.value) if isinstance(inner.func, ast.Attribute) else None
            qual = f"{mod}.{inner.func.attr}" if mod else None
            if qual is None and isinstance(inner.func, ast.Name) and inner.func.id in self.bound:
                qual = next((f"itertools.{inner.func.id}" for _ in [0] if f"itertools.{inner.func.id}" in INFINITE_ITERATORS), None)
            if qual in INFINITE_ITERATORS and not (qual == "itertools.repeat" and (len(inner.args) > 1 or inner.keywords)):
                self.deny(node, f"{name}() consumes the endless {qual}()", "bounded resources")

    def _shadow(self, node: ast.FunctionDef | ast.ClassDef) -> None:
        if node.name in BUILTIN_NAMES:
            self.deny(node, f"defines {node.name}, replacing the builtin of that name", "no builtins re-defined")

    def _ClassDef(self, node: ast.ClassDef) -> None:
        self._shadow(node)
        for k in node.keywords:
            self.deny(node, f"class keyword {k.arg}= (metaclasses and class hooks)", "plain classes only")

    def _FunctionDef(self, node: ast.FunctionDef) -> None:
        self._shadow(node)
        if node.name.startswith("__") and node.name.endswith("__") and node.name not in ALLOWED_DUNDER_DEFS:
            self.deny(node, f"defines the hook {node.name}, which the interpreter calls implicitly", "no dunder access")

    def _AsyncFunctionDef(self, node: ast.AST) -> None:
        self.deny(node, "async code is outside the capability set", "synchronous code only")

    _Await = _AsyncFor = _AsyncWith = _AsyncFunctionDef

    def _Constant(self, node: ast.Constant) -> None:
        v = node.value
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT:
            self.deny(node, f"the integer {v} exceeds 2**31", "bounded resources")

    def _BinOp(self, node: ast.BinOp) -> None:
        if isinstance(node.op, (ast.Pow, ast.LShift, ast.Mult)):
            try:
                value = _fold_int(node)
            except (TypeError, OverflowError, ValueError):
                return
            if abs(value) > MAX_INT:
                self.deny(node, "a constant expression beyond 2**31", "bounded resources")
            elif isinstance(node.op, ast.Mult) and _is_sequence_literal(node) and abs(value) > MAX_ELEMENTS // 100:
                self.deny(node, "a sequence repeated into a huge constant size", "bounded resources")
        if isinstance(node.op, ast.Mult) and (_is_sequence_literal(node.left) or _is_sequence_literal(node.right)):
            other = node.right if _is_sequence_literal(node.left) else node.left
            try:
                n = _fold_int(other)
            except (TypeError, OverflowError, ValueError):
                return
            if n > MAX_ELEMENTS // 100:
                self.deny(node, f"a sequence repeated {n} times", "bounded resources")

    def _Tuple(self, node: ast.Tuple) -> None:
        sizes = []
        for e in node.elts:
            try:
                sizes.append(_fold_int(e))
            except (TypeError, OverflowError, ValueError):
                return
        total = 1
        for s in sizes:
            total *= max(int(s), 0)
        if len(sizes) >= 2 and total > MAX_ELEMENTS:
            self.deny(node, f"a constant shape of {total} elements", "bounded resources")

    def _While(self, node: ast.While) -> None:
        try:
            always = isinstance(node.test, ast.Constant) and bool(node.test.value)
        except Exception:  # noqa: BLE001
            always = False
        if always and not _has_exit(node.body):
            self.deny(node, "a loop with a constant-true test and no break, return or raise", "bounded resources")

    def _Global(self, node: ast.Global) -> None:
        for name in node.names:
            if name in self.modules:
                self.deny(node, f"global {name} lets a function re-bind a module name", "module names are never re-bound")


def _fold_int(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_fold_int(node.operand)
    if isinstance(node, ast.BinOp):
        a, b = _fold_int(node.left), _fold_int(node.right)
        if isinstance(node.op, ast.Pow):
            if b < 0 or (abs(a) > 1 and b > 256):
                return MAX_INT * 2 if abs(a) > 1 else 1
            return a**b
        if isinstance(node.op, ast.LShift):
            return MAX_INT * 2 if b > 62 else a << b
        if isinstance(node.op, ast.Mult):
            return a * b
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
    raise TypeError("not a constant integer")


def _is_sequence_literal(node: ast.AST) -> bool:
    return isinstance(node, (ast.List, ast.Tuple)) or (isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)))


def _has_exit(body: list[ast.stmt]) -> bool:
    stack: list[ast.AST] = list(body)
    while stack:
        n = stack.pop()
        if isinstance(n, (ast.Break, ast.Return, ast.Raise)):
            return True
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.While, ast.For)):
            if isinstance(n, (ast.While, ast.For)):
                stack.extend(s for s in ast.walk(n) if isinstance(s, (ast.Return, ast.Raise)))
            continue
        stack.extend(ast.iter_child_nodes(n))
    return False


def check_contract(tree: ast.Module, contract: Contract = CONTROLLER) -> list[Finding]:
    """Findings where `tree` does not define what the contract asks, or runs code at import."""
    out: list[Finding] = []
    cls = None
    for stmt in tree.body:
        if isinstance(stmt, ast.ClassDef) and stmt.name == contract.cls:
            cls = stmt
        elif isinstance(stmt, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign, ast.Pass)):
            continue
        elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # a docstring
        elif isinstance(stmt, ast.If) and _construct(stmt.test) in ('__name__ == "__main__"', "__name__ == '__main__'"):
            continue  # never runs: the sandbox imports the module under another name
        else:
            out.append(Finding(stmt.lineno, CONTRACT, f"`{_construct(stmt)}`: a statement at module level runs at import: move it into a function [rule: definitions only at module level]"))
    if cls is None:
        out.append(Finding(1, CONTRACT, f"no class {contract.cls}: define `class {contract.cls}` with `def {contract.method}({', '.join(contract.method_params)})` [rule: the code contract, docs/codegen.md]"))
        return out
    methods = {s.name: s for s in cls.body if isinstance(s, ast.FunctionDef)}
    for name, want in ((contract.method, contract.method_params), ("__init__", contract.init_params)):
        fn = methods.get(name)
        if fn is None:
            if name == contract.method:
                out.append(Finding(cls.lineno, CONTRACT, f"class {contract.cls} has no method {name}: define `def {name}({', '.join(want)})` [rule: the code contract, docs/codegen.md]"))
            continue
        a = fn.args
        positional = [x.arg for x in a.posonlyargs + a.args]
        required = len(positional) - len(a.defaults)
        if len(positional) < len(want) or required > len(want) or a.kwonlyargs and len(a.kw_defaults) != len([d for d in a.kw_defaults if d is not None]):
            out.append(Finding(fn.lineno, CONTRACT, f"{contract.cls}.{name} takes ({', '.join(positional)}): it must accept ({', '.join(want)}) [rule: the code contract, docs/codegen.md]"))
        if any(isinstance(d, ast.AST) and not isinstance(d, ast.Constant) for d in a.defaults):
            out.append(Finding(fn.lineno, CONTRACT, f"{contract.cls}.{name} has a default that is not a constant [rule: the code contract, docs/codegen.md]"))
    return out


def gate(code: str, contract: Contract | None = CONTROLLER, caps: Capabilities | None = None, max_bytes: int = 512_000) -> list[Finding]:
    """The capability gate: every construct in `code` outside the declared capability set
    (and, with a contract, what the contract is missing). Empty when the code may run in the
    sandbox. Code is never run."""
    caps = caps or capabilities()
    if len(code.encode("utf-8", "replace")) > max_bytes:
        return [Finding(1, INVALID, f"code is larger than {max_bytes} bytes: split it or raise [safety] max_code_bytes")]
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        return [Finding(exc.lineno or 1, INVALID, f"does not parse ({exc.msg}): the gate rules only on valid Python")]
    except (ValueError, RecursionError, MemoryError) as exc:
        return [Finding(1, INVALID, f"cannot be parsed ({type(exc).__name__}): the gate rules only on valid Python")]
    g = _Gate(caps)
    try:
        g.collect(tree)
        g.check(tree)
    except RecursionError:
        return [Finding(1, INVALID, "nested too deeply to analyse: the gate rules only on code it can read")]
    out = list(g.findings.values())
    if contract is not None:
        out += check_contract(tree, contract)
    return sorted(out)


def explain(code: str, config: EthicsConfig | None = None) -> list[Finding]:
    """Why refused code matters: the deny-list analyser's findings (process execution,
    network, files, escapes …), for the record; the capability gate decides."""
    return [f for f in analyse(code, config) if f.category != INVALID]


# --------------------------------------------------------------------------- API


def analyse(code: str, config: EthicsConfig | None = None) -> list[Finding]:
    """Every finding in `code` (empty when the gate has nothing against it)."""
    return Analyzer(config).run(code)


def reasons(findings: Iterable[Finding]) -> list[str]:
    return [str(f) for f in findings]


__all__ = ["analyse", "reasons", "Finding", "EthicsConfig", "Analyzer", "gate", "explain", "check_contract", "Capabilities", "capabilities", "Contract", "CONTROLLER", "CAPABILITY", "CONTRACT"]
