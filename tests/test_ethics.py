"""The ethics limiter against a corpus of malicious and benign snippets (tests/data/ethics).

The corpus: realistic generated code, malicious (process execution, eval/exec and their
evasions, dynamic import, network, writes and deletes outside the sandbox, native code,
unsafe deserialisation, obfuscated payloads, sandbox escapes) and benign (numpy / scipy /
pandas / torch optimisation code, writes inside the sandbox, formatting, maths). The gate
must catch at least 95 % of the malicious ones and flag at most 5 % of the benign ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scf.domains import ethics

CORPUS = Path(__file__).parent / "data" / "ethics"
MALICIOUS = sorted((CORPUS / "malicious").glob("*.py"))
BENIGN = sorted((CORPUS / "benign").glob("*.py"))


def test_corpus_size():
    assert len(MALICIOUS) >= 60 and len(BENIGN) >= 60


def test_recall_and_false_alarm_rate(capsys):
    missed = [p.stem for p in MALICIOUS if not ethics.analyse(p.read_text())]
    alarms = {p.stem: ethics.reasons(ethics.analyse(p.read_text())) for p in BENIGN}
    alarms = {k: v for k, v in alarms.items() if v}
    recall = 1 - len(missed) / len(MALICIOUS)
    false_alarms = len(alarms) / len(BENIGN)
    with capsys.disabled():
        print(
            f"\nethics limiter: recall {recall:.3f} ({len(MALICIOUS) - len(missed)}/{len(MALICIOUS)} malicious caught), "
            f"false alarms {false_alarms:.3f} ({len(alarms)}/{len(BENIGN)} benign flagged)"
        )
        for name in missed:
            print(f"  missed: {name}")
        for name, why in alarms.items():
            print(f"  false alarm: {name}: {why[0]}")
    assert recall >= 0.95, missed
    assert false_alarms <= 0.05, alarms


@pytest.mark.parametrize(
    "code, category, line, fragment",
    [
        ("import os\nos.system('ls')", ethics.PROCESS, 2, "os.system"),
        ("x = 1\ngetattr(__builtins__, 'ev' + 'al')('x')", ethics.EVAL, 2, "eval()"),
        ("import base64\nexec(base64.b64decode('aW1wb3J0IG9z'))", ethics.OBFUSCATION, 2, "base64.b64decode"),
        ("import importlib\nm = importlib.import_module('o' + 's')\nm.popen('id')", ethics.PROCESS, 3, "os.popen"),
        ("import ctypes", ethics.NATIVE, 1, "ctypes"),
        ("import pickle\n\n\npickle.loads(b'')", ethics.DESERIALISE, 4, "pickle.loads"),
        ("import os\nos.popen('id').read()", ethics.PROCESS, 2, "os.popen"),
        ("import socket\n", ethics.NETWORK, 1, "socket"),
        ("from urllib.request import urlopen", ethics.NETWORK, 1, "urllib.request"),
        ("import shutil\nshutil.rmtree('/')", ethics.FILESYSTEM, 2, "'/', outside the sandbox"),
        ("open('/etc/passwd', 'w')", ethics.FILESYSTEM, 1, "'/etc/passwd'"),
        ("import os\nf = getattr(os, 'metsys'[::-1])", ethics.PROCESS, 2, "os.system"),
        ("import os\nf = os.__dict__['sys' + 'tem']", ethics.PROCESS, 2, "os.system"),
        ("import sys\nsys.modules['subprocess'].run(['id'])", ethics.PROCESS, 2, "subprocess.run"),
        ("def f():\n    return ().__class__.__base__.__subclasses__()", ethics.ESCAPE, 2, "__subclasses__"),
        ("exec('import os\\nos.system(1)')", ethics.PROCESS, 1, "code passed to exec"),
        ("import yaml\nyaml.load(s)", ethics.DESERIALISE, 2, "safe Loader"),
        ("print(1)\n)", ethics.INVALID, 2, "does not parse"),
    ],
)
def test_findings_name_the_line_and_the_category(code, category, line, fragment):
    found = ethics.analyse(code)
    hits = [f for f in found if f.category == category and f.line == line]
    assert hits, [str(f) for f in found]
    assert any(fragment in f.detail for f in hits), [str(f) for f in hits]
    assert str(hits[0]).startswith(f"line {line}: {category}: ")


@pytest.mark.parametrize(
    "code",
    [
        "import numpy as np\nnp.save('out/x.npy', np.zeros(3))",
        "open('/sandbox/a.txt', 'w').write('x')",
        "from pathlib import Path\n(Path('runs') / 'a.json').write_text('{}')",
        "import os\nos.remove(os.path.join('tmp', 'x'))",
        "for i in range(3):\n    open(f'out/{i}.txt', 'w').close()",
        "import torch\nm = torch.nn.Linear(2, 2)\nm.eval()",
        "def eval(x):\n    return x\neval(3)",
        "import re\nre.compile('a+')",
        "import base64\nb = base64.b64encode(b'data')",
        "s = 'eval is a word in a string; so is os.system'",
    ],
)
def test_benign_constructs(code):
    assert ethics.analyse(code) == []


def test_sandbox_roots_are_configurable():
    code = "open('/data/run/out.csv', 'w')"
    assert ethics.analyse(code)
    assert ethics.analyse(code, ethics.EthicsConfig(sandbox_roots=("/data/run",))) == []


def test_code_is_never_executed(tmp_path):
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('x')\nimport os\nos.system('touch {marker}')"
    assert ethics.analyse(code)
    assert not marker.exists()


def test_oversized_and_pathological_code_is_rejected_not_crashed():
    assert ethics.analyse("x = 1\n" * 200_000, ethics.EthicsConfig(max_bytes=1000))[0].category == ethics.INVALID
    deep = "x = " + "(" * 5000 + "1" + ")" * 5000
    assert ethics.analyse(deep)[0].category == ethics.INVALID
    loop = "a = b\nb = a\nexec(a)"
    assert any(f.category == ethics.EVAL for f in ethics.analyse(loop))
