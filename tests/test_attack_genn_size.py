"""An endpoint behind GenN's `http` backend that answers without end.

The tester's attack: the openai client reads a whole answer into memory, with no size limit,
and its timeout bounds each read, not the answer: an endpoint that streams a chat completion
forever (chunked, no length), declares a 10 GB body, sends a gzip bomb (a few kB that decode
to gigabytes), an error status with an endless body, or trickles bytes slower than any read
timeout, held the generator for ever and grew its memory until the host killed it. Now
(producers/genn/http.py, `[genn] max_answer_bytes`, 4 MiB by default) every answer is cut at
the cap or 2 x `timeout_s` after its connection was made (headers trickled too), its
connection shut down, and it becomes a rejected candidate with the reason; the next genuine
answer is accepted. A real HTTP server in a
thread, the generator in this process and the real `scf genn generate` process.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from scf.producers.genn import GennSettings, open_generator
from tests.test_genn import GOOD, _request

pytestmark = pytest.mark.timeout(180)

LIMIT = 256 << 10  # the test's [genn] max_answer_bytes
HEAD = b'{"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": "'


def _completion(content: str) -> bytes:
    return json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                       "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]}).encode()


class _Endless(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    script: list[str] = []
    sent: dict[str, int] = {}  # bytes each answer got onto the wire before the client hung up
    stop = threading.Event()  # the test is over: stop whatever still streams
    hung_up = threading.Event()  # the client closed the slow-headers connection

    def log_message(self, *a):
        pass

    def _stream(self, name: str, status: int = 200, chunk: bytes = b"x" * 65536, pause: float = 0.0) -> None:
        """A chunked answer that never ends: until the client closes the connection."""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        try:
            for part in itertools.chain([HEAD], itertools.repeat(chunk)):
                if type(self).stop.is_set():
                    break
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.flush()
                sent += len(part)
                if pause:
                    time.sleep(pause)  # the attacker's trickle (server side), not a wait in the test
        except (BrokenPipeError, ConnectionResetError):
            pass
        type(self).sent[name] = sent
        self.close_connection = True

    def _whole(self, data: bytes, headers: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        name = type(self).script.pop(0)
        if name == "endless":
            self._stream(name)
        elif name == "endless 500":
            self._stream(name, status=500)
        elif name == "trickle":
            self._stream(name, chunk=b"x", pause=0.05)
        elif name == "slow headers":  # each byte within the read timeout, the headers never done
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            try:
                while not type(self).stop.is_set():
                    self.wfile.write(b"a")
                    self.wfile.flush()
                    time.sleep(0.2)  # the attacker's trickle (server side)
            except (BrokenPipeError, ConnectionResetError):
                type(self).hung_up.set()
            self.close_connection = True
        elif name == "declared 10 GB":
            self._whole(HEAD + b"x" * 65536, {"Content-Length": str(10 << 30)})
        elif name == "gzip bomb":
            bomb = gzip.compress(HEAD + b"x" * (64 << 20), 9)  # 64 MiB decoded, ~64 kB on the wire
            self._whole(bomb, {"Content-Length": str(len(bomb)), "Content-Encoding": "gzip"})
        else:  # "good": the endpoint's next genuine answer
            data = _completion(f"```python\n{GOOD}```")
            self._whole(data, {"Content-Length": str(len(data))})


ATTACKS = ["endless", "declared 10 GB", "gzip bomb", "endless 500", "trickle"]
REASONS = {
    "endless": f"answer larger than [genn] max_answer_bytes ({LIMIT} bytes): cut off unread",
    "declared 10 GB": f"answer of {10 << 30} bytes, larger than [genn] max_answer_bytes ({LIMIT} bytes): not read",
    "gzip bomb": "answer compressed (gzip) though an uncompressed one was asked: its size cannot be bounded",
    "endless 500": f"answer larger than [genn] max_answer_bytes ({LIMIT} bytes): cut off unread",
    "trickle": "answer still arriving 6s after connecting (2 x [genn] timeout_s): cut off",
}


@pytest.fixture
def endpoint():
    _Endless.script, _Endless.sent = [], {}
    _Endless.stop.clear()
    _Endless.hung_up.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endless)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    _Endless.stop.set()
    server.shutdown()
    server.server_close()


def settings(endpoint: str, **kw) -> GennSettings:
    return GennSettings(backend="http", base_url=endpoint, model="m", api_key_env="",
                        **{"retries": 2, "timeout_s": 3.0, "max_answer_bytes": LIMIT, **kw})


def test_an_answer_without_end_is_a_rejected_candidate_and_the_next_one_is_accepted(endpoint):
    gen = open_generator(settings(endpoint))
    _Endless.script = [*ATTACKS, "good"]
    try:
        out = gen.generate(_request(), len(ATTACKS) + 1, seed=1)  # one request per candidate
    finally:
        gen.close()
    why = {name: c.error for name, c in zip(ATTACKS, out)}
    for name in ATTACKS:
        assert why[name] == f"endpoint {endpoint}: {REASONS[name]}", (name, why[name])
    assert out[-1].error == "" and out[-1].code == GOOD  # the generator still works
    assert _Endless.script == []  # nothing was retried: a cut answer is the endpoint's answer
    # the endless answers were cut near the cap: the server saw the connection closed
    assert 0 < _Endless.sent["endless"] < 64 << 20 and 0 < _Endless.sent["endless 500"] < 64 << 20, _Endless.sent


def test_headers_trickled_forever_are_cut_at_the_deadline(endpoint):
    """Each header byte arrives within the read timeout, so the openai client's timeout never
    fires: the connection is shut down 2 x `timeout_s` after it was made, and retried as a failed
    connection (here: no retry), then the next answer is read as usual."""
    gen = open_generator(settings(endpoint, retries=0))
    _Endless.script = ["slow headers", "good"]
    try:
        out = gen.generate(_request(), 2, seed=1)
    finally:
        gen.close()
    assert out[0].error == (f"endpoint {endpoint}: no complete answer 6s after connecting (2 x [genn] timeout_s): "
                            "the connection was cut (0 retries)"), out[0].error
    assert out[1].error == "" and out[1].code == GOOD
    assert _Endless.hung_up.wait(30)  # the server sees its connection closed (not left open for ever)


def test_max_answer_bytes_must_be_positive(endpoint):
    from scf.producers.genn import GenNError

    with pytest.raises(GenNError, match=r"\[genn\] max_answer_bytes = 0: give the most bytes"):
        open_generator(settings(endpoint, max_answer_bytes=0))


def test_scf_genn_generate_survives_an_endless_answer_with_the_default_cap(endpoint, tmp_path):
    """The real process with the default `max_answer_bytes` (4 MiB): an endless answer is a
    rejected row, the genuine one after it is printed, exit 0."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "scf.toml").write_text(f'[genn]\nbackend = "http"\nbase_url = "{endpoint}"\nmodel = "m"\nretries = 0\n'
                                   'timeout_s = 60.0\napi_key_env = ""\n')
    _Endless.script = ["endless", "good"]
    env = {**os.environ, "SCF_HOME": str(home)}
    env.pop("NATS_URL", None)
    r = subprocess.run([sys.executable, "-m", "scf.cli.main", "genn", "generate", "--domain", "hvac:office3", "-n", "2", "--json"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows[0]["error"] == f"endpoint {endpoint}: answer larger than [genn] max_answer_bytes ({4 << 20} bytes): cut off unread", rows[0]
    assert rows[1]["error"] == "" and rows[1]["code"] == GOOD, rows[1]
