"""The capability gate for generated code (domains/ethics.py `gate`), default deny.

Measured on the adversarial corpus of tests/data/codegate (built by its build.py): evasions
embedded in plausible controller modules — modules reached through other modules, stdlib
functions that run strings, frame and inspect walking, file-writing APIs, environment and
secret reads, signals, thread/process/memory bombs, monkeypatching of builtins, modules,
sys.modules and sys.meta_path, values passed through parameters, containers and match
captures, dunder escapes, network, native code, deserialisation, processes — and realistic
benign HVAC and grid controllers. Goal: recall >= 0.99 with false alarms <= 2 %.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from scf.domains import ethics

CORPUS = Path(__file__).parent / "data" / "codegate"
MALICIOUS = sorted((CORPUS / "malicious").glob("*.py"))
BENIGN = sorted((CORPUS / "benign").glob("*.py"))
FAMILIES = ("via_module", "runs_strings", "frames", "files", "secrets", "signals", "bombs", "monkeypatch", "values", "escape")


def test_corpus_covers_every_family_at_size():
    families = Counter(
        next(f for f in FAMILIES + ("network", "native", "deserialise", "process") if p.stem[4:].startswith(f)) for p in MALICIOUS
    )
    assert len(MALICIOUS) >= 120 and len(BENIGN) >= 80, (len(MALICIOUS), len(BENIGN))
    for family in FAMILIES:
        assert families[family] >= 5, (family, families)


def test_recall_and_false_alarms_on_the_adversarial_corpus(capsys):
    missed = [p.stem for p in MALICIOUS if not ethics.gate(p.read_text())]
    alarms = {p.stem: ethics.reasons(ethics.gate(p.read_text())) for p in BENIGN}
    alarms = {k: v for k, v in alarms.items() if v}
    old_caught = sum(1 for p in MALICIOUS if ethics.analyse(p.read_text()))
    recall = 1 - len(missed) / len(MALICIOUS)
    false_alarms = len(alarms) / len(BENIGN)
    with capsys.disabled():
        print(
            f"\ncapability gate: recall {recall:.3f} ({len(MALICIOUS) - len(missed)}/{len(MALICIOUS)}), "
            f"false alarms {false_alarms:.3f} ({len(alarms)}/{len(BENIGN)}); "
            f"the deny-list analyser alone: recall {old_caught / len(MALICIOUS):.3f} ({old_caught}/{len(MALICIOUS)})"
        )
        for name in missed:
            print(f"  missed: {name}")
        for name, why in alarms.items():
            print(f"  false alarm: {name}: {why[0]}")
    assert recall >= 0.99, missed
    assert false_alarms <= 0.02, alarms


def test_every_benign_controller_meets_the_contract():
    for p in BENIGN:
        assert ethics.check_contract(__import__("ast").parse(p.read_text())) == [], p.stem


@pytest.mark.parametrize(
    "code, line, fragment, rule",
    [
        ("import os", 1, "module os is outside the capability set", "allowed imports"),
        ("import shutil\nshutil.os.system('id')", 1, "module shutil", "allowed imports"),
        ("import numpy as np\nx = np.ctypeslib", 2, "numpy.ctypeslib is not in the capability set of numpy", "allowed names of a module"),
        ("from numpy import lib", 1, "numpy.lib is not in the capability set", "allowed names of a module"),
        ("x = eval('1')", 1, "the builtin eval is outside the allowed builtins", "no builtins outside the allow-list"),
        ("x = ().__class__", 1, "the dunder attribute __class__", "no dunder access"),
        ("import numpy as np\nm = [np]", 2, "the module numpy is used as a value", "modules only as the root of an attribute"),
        ("import numpy as np\nmatch np:\n    case m:\n        pass", 2, "used as a value", "modules only as the root of an attribute"),
        ("import math\ndef f(m=math):\n    return m", 2, "used as a value", "modules only as the root of an attribute"),
        ("import numpy as np\nnp.sum = abs", 2, "monkeypatching", "modules are read-only"),
        ("import numpy as np\nnp.random.Generator.normal = abs", 2, "monkeypatching", "modules are read-only"),
        ("def g(x):\n    return x.gi_frame", 2, ".gi_frame reaches interpreter frames", "no frames, raw memory or files"),
        ("x = [0] * 10 ** 10", 1, "beyond 2**31", "bounded resources"),
        ("while True:\n    pass", 1, "no break, return or raise", "bounded resources"),
        ("import itertools\nx = list(itertools.count())", 2, "consumes the endless itertools.count()", "bounded resources"),
        ("s = '{0.__globals__}'.format(len)", 1, "a format string that looks up attributes", "no dynamic attribute access"),
        ("def print(*a):\n    pass", 1, "replacing the builtin", "no builtins re-defined"),
        ("class A(metaclass=type):\n    pass", 1, "class keyword metaclass=", "plain classes only"),
        ("y = undefined_name + 1", 1, "undefined_name is never defined", "every name defined or allowed"),
    ],
)
def test_refusals_name_the_line_the_construct_and_the_rule(code, line, fragment, rule):
    found = [f for f in ethics.gate(code, contract=None) if f.category == ethics.CAPABILITY]
    hits = [f for f in found if f.line == line and fragment in f.detail]
    assert hits, [str(f) for f in found]
    assert hits[0].detail.endswith(f"[rule: {rule}]")
    assert str(hits[0]).startswith(f"line {line}: capability: `")


@pytest.mark.parametrize(
    "code",
    [
        "import numpy as np\nx = np.linalg.solve(np.eye(2), np.ones(2))",
        "from numpy.random import default_rng\nr = default_rng(0).normal(size=3)",
        "import math\nfrom collections import deque\nq = deque([math.sqrt(2)], maxlen=3)",
        "from dataclasses import dataclass\n@dataclass\nclass C:\n    a: float = 1.0",
        "class A:\n    def __init__(self):\n        super().__init__()",
        "if __name__ == '__main__':\n    print('demo')",
        "s = 'value {:.2f}'.format(3.14159)",
        "import numpy as np\nwith np.errstate(divide='ignore'):\n    r = np.divide(1.0, 0.0)",
        "max_iter = 10\nwhile True:\n    max_iter -= 1\n    if max_iter < 0:\n        break",
    ],
)
def test_allowed_constructs_pass(code):
    assert ethics.gate(code, contract=None) == []


@pytest.mark.parametrize(
    "code, fragment",
    [
        ("import numpy as np\n", "no class Controller"),
        ("class Controller:\n    pass", "has no method step"),
        ("class Controller:\n    def step(self):\n        return 0", "must accept (self, observation)"),
        (
            "class Controller:\n    def __init__(self):\n        pass\n    def step(self, o):\n        return 0",
            "Controller.__init__ takes (self)",
        ),
        ("print('at import')\nclass Controller:\n    def step(self, o):\n        return 0", "a statement at module level runs at import"),
    ],
)
def test_the_contract_is_checked_statically(code, fragment):
    found = ethics.gate(code)
    assert any(f.category == ethics.CONTRACT and fragment in f.detail for f in found), [str(f) for f in found]


def test_the_deny_list_explains_refused_code():
    code = "import os\nos.system('id')"
    assert any(f.category == ethics.PROCESS for f in ethics.explain(code))


def test_capability_file_is_the_declared_set():
    caps = ethics.capabilities()
    assert {"math", "numpy", "statistics", "dataclasses", "typing", "itertools", "functools", "collections"} <= set(caps.modules)
    for denied in ("load", "save", "savetxt", "fromfile", "memmap", "ctypeslib", "lib", "testing", "bmat"):
        assert denied not in caps.modules["numpy"], denied
    assert "get_type_hints" not in caps.modules["typing"] and "attrgetter" not in caps.modules["operator"]
    assert not {"eval", "exec", "open", "getattr", "__import__", "globals", "vars", "type"} & caps.builtins


def test_hostile_input_is_refused_not_crashed():
    assert ethics.gate("x = 1\n" * 200_000, max_bytes=1000)[0].category == ethics.INVALID
    assert ethics.gate("x = " + "(" * 5000 + "1" + ")" * 5000)[0].category == ethics.INVALID
    assert ethics.gate("def f(:\n")[0].category == ethics.INVALID
