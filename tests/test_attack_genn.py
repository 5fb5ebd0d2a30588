"""A hostile chat-completions endpoint behind GenN's `http` backend (the sweep of the newest
surfaces): answers of 30 MB, bodies that are not UTF-8, JSON nested 200 000 deep (Python's
JSON reader raised RecursionError out of `generate`), a lone surrogate in the text (no event
can carry it: msgspec refuses to encode it, so the proposal could not be published), content
of the wrong type, NaN. Each answer must become a candidate with its reason, the proposals
must be publishable events, and the real `scf genn generate` process must print every
candidate and exit 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from scf.bus.codec import encode
from scf.producers.genn import GennSettings, open_generator, proposals
from tests.test_genn import _request

pytestmark = pytest.mark.timeout(180)


def _completion(content) -> bytes:
    return json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                       "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]}).encode()


HOSTILE = {
    "huge": lambda: _completion("```python\n" + "x = 1\n" * 5_000_000 + "```"),
    "not utf-8": lambda: b'{"choices": [{"message": {"content": "\xff\xfe\x80"}}]}',
    "deep": lambda: b"[" * 200_000 + b"]" * 200_000,
    "deep inside": lambda: _completion("a")[:-1] + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "lone surrogate": lambda: b'{"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": [{"index": 0, '
                              b'"message": {"role": "assistant", "content": "\\ud800 class Controller: pass"}}]}',
    "choices not a list": lambda: b'{"choices": "abc"}',
    "content a list": lambda: _completion([{"type": "text", "text": "class Controller: pass"}]),
    "nan": lambda: b'{"choices": [{"message": {"content": NaN}}]}',
    "nul": lambda: _completion("```python\nclass Controller:\n    x = '\x00'\n```"),
}


class _Hostile(BaseHTTPRequestHandler):
    script: list[str] = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        data = HOSTILE[type(self).script.pop(0)]()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def endpoint():
    _Hostile.script = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_every_hostile_answer_is_a_candidate_with_a_reason_and_a_publishable_proposal(endpoint):
    gen = open_generator(GennSettings(backend="http", base_url=endpoint, model="m", retries=0, timeout_s=30.0, api_key_env=""))
    _Hostile.script = list(HOSTILE)
    req = _request()
    try:
        out = gen.generate(req, len(HOSTILE), seed=1)  # one request per candidate: one hostile answer each
    finally:
        gen.close()
    assert len(out) == len(HOSTILE)
    for name, c in zip(HOSTILE, out):
        assert c.error, f"{name}: accepted as code"
        assert "\n" not in c.error and len(c.error) < 400, f"{name}: {c.error[:500]!r}"
    why = dict(zip(HOSTILE, (c.error for c in out)))
    assert "RecursionError" in why["deep"] and "RecursionError" in why["deep inside"]
    assert "not valid Unicode" in why["lone surrogate"]
    for event in proposals(req, out, gen.identity, seed=1, source="test", cause=None):
        assert len(encode(event)) < 1 << 20  # publishable: encodes, and fits the server's max_payload


def test_scf_genn_generate_prints_every_hostile_answer_and_exits_0(endpoint, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "scf.toml").write_text(f'[genn]\nbackend = "http"\nbase_url = "{endpoint}"\nmodel = "m"\nretries = 0\n'
                                   'timeout_s = 30.0\napi_key_env = ""\n')
    _Hostile.script = list(HOSTILE)
    env = {**os.environ, "SCF_HOME": str(home)}
    env.pop("NATS_URL", None)
    r = subprocess.run([sys.executable, "-m", "scf.cli.main", "genn", "generate", "--domain", "hvac:office3", "-n", str(len(HOSTILE)),
                        "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["index"] for x in rows] == list(range(len(HOSTILE))) and all(x["error"] for x in rows), rows
