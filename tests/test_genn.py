"""GenN: the search backend (good and bad code, deterministic), answers parsed into code or a
reason, the http backend against a real OpenAI-compatible HTTP server started here, and the
loop on a real bus: a codegen intent → the safety gate → GenN → proposals → the gate → the
archive → a CFR dataset whose prompts are byte-identical to the served ones."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from scf.bus import events as ev
from scf.domains import ethics
from scf.producers.genn import CodeRequest, GennSettings, extract_code, open_generator, proposals
from scf.producers.genn.search import DEFECTS, SearchGenerator
from tests.conftest import cli, wait_for

GOOD = (
    "import numpy as np\n\n\nclass Controller:\n    def __init__(self, spec):\n        self.hi = spec['state_hi']\n\n"
    "    def step(self, observation):\n        return [0.0 for _ in self.hi]\n"
)


def _gate(code: str) -> list:
    gate = getattr(ethics, "gate", None)
    return gate(code) if gate is not None else ethics.analyse(code)


def _request(domain: str = "hvac:office3", intent_id: str = "i-1") -> CodeRequest:
    return CodeRequest.for_intent(ev.Intent(intent_id=intent_id, kind="codegen", domain=domain, params={"objective": "energy"}))


# --------------------------------------------------------------------------- search


@pytest.mark.parametrize("domain", ["grid:case14", "hvac:office3"])
def test_search_writes_good_and_bad_code_and_repeats_itself(domain):
    g = SearchGenerator(bug_rate=0.35)
    req = _request(domain)
    a = g.generate(req, 40, seed=5)
    assert [c.code for c in a] == [c.code for c in g.generate(req, 40, seed=5)]  # deterministic
    assert [c.code for c in a] != [c.code for c in g.generate(req, 40, seed=6)]
    clean = [c for c in a if not any(n.startswith("defect") for n in c.notes)]
    broken = [c for c in a if any(n.startswith("defect") for n in c.notes)]
    assert clean and broken
    # every clean candidate passes the static gate, and the template is for the domain's kind
    assert [c.notes for c in clean if _gate(c.code)] == []
    assert all(c.notes[0].split(".")[0] in (domain.split(":")[0], "any") for c in a)
    # defects the gate can see are refused by it
    visible = [c for c in broken if c.notes[-1].removeprefix("defect: ") in ("network price lookup", "log file", "eval of a formula",
                                                                             "environment read", "subprocess", "syntax slip")]
    assert all(_gate(c.code) for c in visible)
    assert g.identity.backend == "search" and len(g.identity.sha256) == 64


def test_every_defect_changes_every_template():
    import random

    from scf.producers.genn.search import TEMPLATES

    for t in TEMPLATES:
        code = t.source.format(**t.params(random.Random(0), 0.8))
        for name, apply in DEFECTS.items():
            assert apply(code, random.Random(0)) != code, (t.name, name)


# --------------------------------------------------------------------------- answers


def test_answers_become_code_or_a_reason():
    assert extract_code(f"Here you go:\n```python\n{GOOD}```\nEnjoy.").code == GOOD
    assert extract_code(f"```\nx = 1\n```\n```py\n{GOOD}```").code == GOOD  # the block with the Controller
    assert extract_code(GOOD).error == ""
    assert extract_code("").error == "malformed answer: empty"
    assert extract_code(None).error == "malformed answer: empty"
    assert extract_code("I cannot help with that.").error.startswith("malformed answer: not Python (line 1")
    assert extract_code("```python\ndef step(obs):\n    return []\n```").error == (
        "malformed answer: no class Controller (the code contract, docs/codegen.md)"
    )
    assert extract_code("```python\nclass Controller:\n    def step(self,\n").error.startswith("malformed answer: not Python")


def test_proposals_carry_the_identity_and_repeat_their_ids():
    g = SearchGenerator()
    req = _request()
    cands = g.generate(req, 3, seed=1) + [extract_code("no code here")]
    a = proposals(req, cands, g.identity, seed=1, source="genn", cause=None)
    b = proposals(req, cands, g.identity, seed=1, source="genn", cause=None)
    assert [p.data.proposal_id for p in a] == [p.data.proposal_id for p in b]
    assert len({p.data.proposal_id for p in a}) == 4
    d = a[0].data
    assert (d.backend, d.model, d.model_sha256) == ("search", "search-v1", g.identity.sha256)
    assert d.sampling == {"temperature": 0.8, "bug_rate": 0.35, "seed": 1, "index": 0}
    assert d.prompt == req.task and d.generator == g.identity.label()
    assert a[3].data.error.startswith("malformed answer: not Python")


# --------------------------------------------------------------------------- http: a real server speaking chat completions


class _Peer(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint whose answers the test scripts, one per request."""

    script: list = []
    seen: list = []

    def log_message(self, *a):  # quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        kind = type(self).script.pop(0) if type(self).script else "good"
        if kind == "hang":
            threading.Event().wait(3)
            kind = "good"
        if kind == "500":
            return self._send(500, {"error": {"message": "overloaded", "type": "server_error"}})
        if kind == "garbage":
            return self._send(200, b"this is not json", raw=True)
        content = {"good": f"```python\n{GOOD}```", "prose": "Sure! A controller keeps the temperature.", "empty": ""}.get(kind)
        if kind == "nochoices":
            return self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": []})
        self._send(200, {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        })

    def _send(self, status, payload, raw=False):
        data = payload if raw else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (the timeout case)
            pass


@pytest.fixture
def peer():
    _Peer.script, _Peer.seen = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Peer)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_http_backend_against_a_real_endpoint(peer, monkeypatch):
    monkeypatch.setenv("GENN_TEST_KEY", "sk-test")
    cfg = GennSettings(backend="http", base_url=peer, model="coder-7b", api_key_env="GENN_TEST_KEY", retries=1, timeout_s=1.0,
                       model_sha256="ab" * 32)
    gen = open_generator(cfg)
    req = _request()
    _Peer.script = ["good", "prose", "empty", "500", "500", "garbage", "nochoices", "hang", "hang", "500", "good"]
    out = gen.generate(req, 8, seed=2)
    gen.close()
    assert out[0].code == GOOD and out[0].error == ""
    assert out[1].error.startswith("malformed answer: not Python")
    assert out[2].error == "malformed answer: empty"
    assert out[3].code == "" and out[3].error.startswith(f"endpoint {peer}: HTTP 500: ")  # 500, retried once, 500 again
    assert out[4].code == "" and out[4].error.startswith(f"endpoint {peer}: ")  # a body that is not JSON
    assert out[5].error == f"endpoint {peer}: malformed response (no choices)"
    assert out[6].error == f"endpoint {peer}: no answer within 1s after 1 retries"  # hang, retried, hang
    assert out[7].code == GOOD and out[7].error == ""  # a 500, retried: the answer
    assert len(_Peer.seen) == 11
    first = _Peer.seen[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert first["body"]["messages"] == req.messages() and first["body"]["model"] == "coder-7b"
    assert first["body"]["seed"] == 2000 and first["body"]["temperature"] == 0.8
    assert gen.identity.sha256 == "ab" * 32 and gen.identity.sampling["base_url"] == peer


def test_http_backend_with_nobody_listening_is_a_reason_not_a_crash():
    from scf.bus.server import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    gen = open_generator(GennSettings(backend="http", base_url=url, model="m", retries=0, timeout_s=2.0, api_key_env=""))
    [c] = gen.generate(_request(), 1, seed=0)
    assert c.code == "" and c.error.startswith(f"endpoint {url}: cannot connect")


def test_backend_errors_are_one_line():
    from scf.producers.genn import GenNError

    with pytest.raises(GenNError, match=r"^unknown GenN backend 'gpt': use one of search, http, local, smollm2"):
        open_generator(GennSettings(), backend="gpt")
    with pytest.raises(GenNError, match=r"^\[genn\] model is empty"):
        open_generator(GennSettings(backend="http"))
    with pytest.raises(GenNError, match=r"^\[genn\] checkpoint is empty"):
        open_generator(GennSettings(backend="local"))


# --------------------------------------------------------------------------- CLI


def test_cli_generate_and_its_errors(tmp_path, monkeypatch):
    env = {"SCF_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    r = cli("genn", "generate", "--domain", "grid:case14", "-n", "3", "--json", env=env)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["index"] for x in rows] == [0, 1, 2] and all(x["backend"] == "search" for x in rows)
    assert all("class " in x["code"] for x in rows)
    r = cli("genn", "generate", "--contract", "c-1", "--domain", "grid:case14", env=env)
    assert r.returncode == 1 and r.stderr.strip() == (
        "Error: --contract brings its own domain and constraints: give --contract alone, or --domain with --constraints"
    )
    bad = tmp_path / "c.json"
    bad.write_text("[1, 2]")
    r = cli("genn", "generate", "--domain", "grid:case14", "--constraints", str(bad), env=env)
    assert r.stderr.strip() == f"Error: constraints file {bad} holds a list: give a JSON object such as {{\"max_cost\": 5000}}"
    r = cli("genn", "generate", "--domain", "grid:nowhere", env=env)
    assert r.returncode == 1 and r.stderr.startswith("Error: unknown domain 'grid:nowhere': use one of grid:case9")
    good = tmp_path / "ok.json"
    good.write_text('{"max_cost_usd_h": 5000}')
    r = cli("genn", "generate", "--domain", "hvac:office3", "--constraints", str(good), "--prompt", "-n", "1", env=env)
    assert r.returncode == 0 and 'Contract constraints: {"max_cost_usd_h": 5000}' in r.stdout
    assert "- params: {\"constraint.max_cost_usd_h\": 5000}" in r.stdout


# --------------------------------------------------------------------------- the loop on a real bus


async def _signed_contract(settings, doc: dict) -> None:
    """Register `doc` signed by an operator key trusted in $SCF_HOME/keys/trusted.json (the
    regiment's view: what GenN reads a contract from)."""
    from scf.bus.client import Bus
    from scf.bus.signing import SigningKey, TrustList
    from scf.producers import contracts

    key = SigningKey.generate("alice")
    trust = TrustList.load(settings.keys_dir / "trusted.json")
    trust.trust(key.public_b64, "alice", ["operator"])
    trust.save()
    op = await Bus.connect(settings, "operator", key=key)
    try:
        await contracts.add(op, contracts.parse_doc(doc), by="alice", trust=trust)
    finally:
        await op.close()


def _regiment_trust(settings):
    from scf.cli.strike import signed_terms, trust_list

    return lambda: signed_terms(settings, trust_list(settings))

@pytest.mark.anyio
async def test_loop_fills_the_cfr_dataset_with_the_served_prompts(bus, settings, scf_env, tmp_path):
    from scf.bus.reader import read
    from scf.consumers.safety import SafetyGate, SafetySettings
    from scf.producers import contracts
    from scf.producers.genn.service import GennProcess
    from scf.projections import archive, cfr

    await _signed_contract(settings, {"contract_id": "acme-1", "client": "acme", "domain": "hvac:office3",
                                      "constraints": {"T_out": 2.0, "budget": 30.0}})
    # an unsigned update of its terms on the log: not the regiment's view, so never in a prompt
    await contracts.add(bus, contracts.parse_doc({"contract_id": "acme-1", "client": "acme", "domain": "hvac:office3",
                                                  "constraints": {"T_out": 9.0, "budget": 99.0}}), by="mallory")
    stop = asyncio.Event()
    gen = SearchGenerator(bug_rate=0.5)
    proc = GennProcess(bus, GennSettings(proposals=6), gen, trust=_regiment_trust(settings))
    # the sandbox scores every candidate that passes the gate: a short trial keeps the test cheap
    gate = SafetyGate(bus, SafetySettings(sandbox_scenarios=1, sandbox_hours=2.0, sandbox_step_minutes=30.0))
    tasks = [asyncio.create_task(gate.run(stop)), asyncio.create_task(proc.runner().run(stop))]
    try:
        for i, target in enumerate((["--domain", "grid:case14", "--param", "load_scale=1.15", "--param", "target=0.95"], ["--contract", "acme-1"],
                                    ["--domain", "grid:case9"])):
            r = await asyncio.to_thread(cli, "genn", "request", *target, "-n", "6", "--id", f"cg-{i}", env=scf_env)
            assert r.returncode == 0, r.stderr
            assert r.stdout.strip() == f"intent.created.codegen.cg-{i} (new)"

        async def code_verdicts():
            return len(await read(bus, "VERDICTS", "verdict.code.>")) >= 18

        await wait_for(code_verdicts, 60, "18 code verdicts")
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    from scf.bus import codec

    props = [codec.decode(m.data) for m in await read(bus, "INTENTS", "code.proposed")]
    assert len(props) == 18 and {p.data.backend for p in props} == {"search"}
    assert {p.data.domain for p in props} == {"grid:case14", "hvac:office3", "grid:case9"}
    # the contract's constraints are in the task GenN was given
    contract_tasks = [p.data.prompt for p in props if p.data.intent_id == "cg-1"]
    assert len(contract_tasks) == 6
    assert all("Contract constraints: {" in t and '"T_out": 2.0' in t and '"budget": 30.0' in t for t in contract_tasks)
    # the code contract's parameters are in its task: the scenario and the target
    scaled = [p.data.prompt for p in props if p.data.intent_id == "cg-0"]
    assert all("at 1.15 x the case's nominal 259 MW" in t and "Target: a total cost at most 0.95 x" in t for t in scaled)
    assert all(p.data.model_sha256 == gen.identity.sha256 for p in props)

    await archive.replay(settings)
    ds = cfr.build(settings.archive_dir, tmp_path / "cfr")
    assert ds.counts["tuples"] == 18 and ds.counts["approved"] > 0 and ds.counts["rejected"] > 0
    # the prompt in the dataset is, byte for byte, the prompt GenN served
    from scf.producers.genn import render

    served = {}
    for p in props:
        intent = (await bus.last(f"intent.created.codegen.{p.data.intent_id}"))[1].data
        served[p.data.proposal_id] = render(intent, p.data.prompt)
    rows = [json.loads(line) for split in ("train", "validation") for line in (tmp_path / "cfr" / "unpaired" / f"{split}.jsonl").read_text().splitlines()]
    assert len(rows) == 18
    import pyarrow.parquet as pq

    by_id = {r["proposal_id"]: r for r in pq.read_table(tmp_path / "cfr" / "unpaired.parquet").to_pylist()}
    for pid, user in served.items():
        assert by_id[pid]["prompt"] == [{"role": "system", "content": cfr.SYSTEM_PROMPT}, {"role": "user", "content": user}]
    # supervised rows: approved code no worse than the status quo (the verdict's relative cost < 1)
    tuples = pq.read_table(tmp_path / "cfr" / "tuples.parquet").to_pylist()
    worse = [t for t in tuples if t["decision"] == "APPROVE" and t["relative_cost"] >= 1.0]
    assert all(t["relative_cost"] is not None for t in tuples if t["decision"] == "APPROVE")  # every approval ran the sandbox
    assert ds.counts["approved_worse"] == len(worse) > 0
    assert ds.counts["sft"]["train"] + ds.counts["sft"]["validation"] == ds.counts["approved"] - len(worse)
    sft_codes = {r["completion"][0]["content"] for split in ("train", "validation")
                 for r in map(json.loads, (tmp_path / "cfr" / "sft" / f"{split}.jsonl").read_text().splitlines())}
    assert not sft_codes & {t["code"] for t in worse}


@pytest.mark.anyio
async def test_the_demo_step_gets_approved_and_rejected_code(bus):
    """ops/demo.py's codegen step against the real gate (capability gate + sandbox) and GenN."""
    from scf.consumers.safety import SafetyGate, SafetySettings
    from scf.ops import demo
    from scf.producers.genn.service import GennProcess

    stop = asyncio.Event()
    gate = SafetyGate(bus, SafetySettings(sandbox_scenarios=1, sandbox_hours=2.0, sandbox_step_minutes=30.0))
    proc = GennProcess(bus, GennSettings(), SearchGenerator())
    tasks = [asyncio.create_task(gate.run(stop)), asyncio.create_task(proc.runner().run(stop))]
    lines: list[str] = []
    try:
        follow = await demo.Follower(bus).start()
        counts = await demo._codegen_step(bus, follow, lines.append, 120)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert counts["approved"] > 0 and counts["rejected"] > 0
    assert counts["approved"] + counts["rejected"] == demo.CODEGEN_PROPOSALS
    assert lines[-1] == f"   {counts['approved']} approved, {counts['rejected']} rejected"
    assert any("REJECT (ethics)" in line for line in lines) and any("REJECT (sandbox)" in line for line in lines)


def test_the_reward_is_the_gate_then_the_sandbox():
    from scf.ml.genn import judge

    g = SearchGenerator(bug_rate=0.0)
    [good] = g.generate(_request("grid:case14", "r-1"), 1, seed=0)
    j = judge(good.code, "grid:case14", hours=2.0)
    assert j.gate_ok and j.sandbox_ok and j.relative_cost is not None
    assert j.reward == pytest.approx(1.0 / (1.0 + j.relative_cost))
    refused = judge("import os\n" + good.code, "grid:case14")
    assert (refused.gate_ok, refused.sandbox_ok, refused.reward) == (False, False, 0.0) and "os" in refused.reason
    short = good.code.rstrip("\n").rsplit(".tolist()", 1)[0] + ".tolist()[:-1]\n"
    failed = judge(short, "grid:case14", hours=2.0)
    assert (failed.gate_ok, failed.sandbox_ok, failed.reward) == (True, False, 0.0) and "expected (1, 5)" in failed.reason


def test_best_of_n_pairs_the_best_and_the_worst_answer():
    """Offline best-of-N with the search backend as the policy: each answer judged by the gate and
    the sandbox; the pair's chosen answer scores higher than its rejected one."""
    from scf.ml.genn import best_of_n_pairs, judge
    from scf.projections.cfr_prompt import messages

    g = SearchGenerator(bug_rate=0.5)

    def answer(msgs, seed):
        [c] = g.generate(_request("grid:case14", "bon"), 1, seed)
        return "Here:\n```python\n" + c.code + "```" if seed % 3 else "I would rather not."

    prompts = [(messages(_request("grid:case14", "bon").user), "grid:case14")]
    pairs, stats = best_of_n_pairs(answer, prompts, 6, seed=0)
    assert (stats["prompts"], stats["samples"], stats["pairs"]) == (1, 6, 1)
    [p] = pairs
    assert p["prompt"] == prompts[0][0]
    chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
    assert judge(chosen, "grid:case14", hours=2.0).reward > 0.0
    assert judge(rejected, "grid:case14", hours=2.0).reward == 0.0  # a refusal, or refused code


@pytest.mark.anyio
async def test_cli_generate_for_a_contract_reads_it_from_the_bus(bus, settings, scf_env):
    """GenN reads a contract as the regiment does (operator-signed terms, `scf contract show`):
    an unsigned contract on the log is refused with the reason."""
    from scf.producers import contracts

    await contracts.add(bus, contracts.parse_doc({"contract_id": "grid-6", "client": "utility", "domain": "grid:case30",
                                                   "constraints": {"budget": 1.0}}), by="mallory")
    r = await asyncio.to_thread(cli, "genn", "generate", "--contract", "grid-6", "-n", "1", env=scf_env)
    assert r.returncode == 1
    assert r.stderr.strip() == ("Error: no contract 'grid-6' signed by an operator key (SCF_KEY): register it with "
                                "`scf contract add FILE` (see `scf contract ls`)")
    r = await asyncio.to_thread(cli, "genn", "request", "--contract", "grid-6", env=scf_env)
    assert r.returncode == 1 and "no contract 'grid-6' signed by an operator key" in r.stderr
    await _signed_contract(settings, {"contract_id": "grid-7", "client": "utility", "domain": "grid:case30",
                                      "constraints": {"load_scale": 1.1, "budget": 9000.0}})
    r = await asyncio.to_thread(cli, "genn", "generate", "--contract", "grid-7", "--prompt", "-n", "1", env=scf_env)
    assert r.returncode == 0, r.stderr
    assert "controls grid:case30" in r.stdout and '"load_scale": 1.1' in r.stdout and '"budget": 9000.0' in r.stdout
    assert '- params: {"contract": "grid-7"}' in r.stdout
    r = await asyncio.to_thread(cli, "genn", "generate", "--contract", "nope", env=scf_env)
    assert r.returncode == 1
    assert r.stderr.strip() == "Error: no contract 'nope' signed by an operator key (SCF_KEY): register it with `scf contract add FILE` (see `scf contract ls`)"


@pytest.mark.anyio
async def test_scf_run_genn_answers_an_approved_intent_and_stops_on_sigterm(bus, scf_env, tmp_path):
    """The real process: an approved codegen intent in, proposals out; a redelivered verdict adds nothing."""
    import signal
    import subprocess
    import sys

    from tests.conftest import spawn, stream_count

    intent = ev.IntentCreated.new(ev.Intent(intent_id="cg-proc", kind="codegen", domain="hvac:office3", params={"proposals": 3}), source="test")
    verdict = ev.VerdictIssued.new(ev.Verdict(verdict_id="v-cg-proc", subject_id="cg-proc", subject_type="intent", decision="APPROVE",
                                              gate="regulator", kind="codegen", domain="hvac:office3"), source="test", cause=intent)
    await bus.publish_once(intent)
    await bus.publish(verdict)
    # a rejected intent and another kind are not answered
    await bus.publish(ev.VerdictIssued.new(ev.Verdict(verdict_id="v-train", subject_id="t-1", subject_type="intent", decision="APPROVE",
                                                      gate="regulator", kind="train"), source="test"))
    proc = spawn([sys.executable, "-m", "scf.cli.main", "run", "genn", "--backend", "search"], scf_env, tmp_path / "genn.log")
    try:
        async def proposed(n):
            return await stream_count(bus, "INTENTS", "code.proposed") >= n

        await wait_for(lambda: proposed(3), 60, "3 proposals from scf run genn")
        await wait_for(lambda: _acked(bus, 2), 30, "both verdicts acked")
        info = await bus.js.consumer_info("VERDICTS", "genn")
        assert info.config.filter_subject == "verdict.intent.approve"
        # the same verdict again (a redelivery): the same proposal ids, deduplicated by the stream
        from scf.bus import codec

        await bus.js.publish(verdict.subject(), codec.encode(verdict))
        await wait_for(lambda: _acked(bus, 3), 30, "the repeat acked")
        assert await stream_count(bus, "INTENTS", "code.proposed") == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, (tmp_path / "genn.log").read_text()[-2000:]


async def _acked(bus, n: int) -> bool:
    info = await bus.js.consumer_info("VERDICTS", "genn")
    return info.ack_floor.stream_seq >= n and info.num_ack_pending == 0


# --------------------------------------------------------------------------- code contracts: the prompt names what each asks


def test_each_code_contract_has_its_own_prompt_naming_what_it_asks():
    from scf.projections.cfr_prompt import render_user

    def req(domain, params):
        return CodeRequest.for_intent(ev.Intent(intent_id="c-1", kind="codegen", domain=domain, params=params))

    a = req("grid:case14", {"load_scale": 1.1, "voll": 2000, "target": 0.95})
    b = req("grid:case14", {"load_scale": 0.85, "voll": 500, "target": 1.0})
    h = req("hvac:office3", {"t_out_shift": -4.5, "comfort_weight": 20, "target": 0.8})
    assert len({a.user, b.user, h.user}) == 3
    assert "at 1.1 x the case's nominal 259 MW (about 285 MW in all)" in a.task and "imbalance" in a.task and "costs 2000 $" in a.task
    assert "Target: a total cost at most 0.95 x the status quo's (pro rata on capacity" in a.task
    assert "Pg1@bus1 0.043029 p^2 + 20 p" in a.task  # the units' cost curves, as spec["cost_c2"], spec["cost_c1"]
    assert "shifted by -4.5 °C" in h.task and "costs 20 kWh" in h.task and "at most 0.8 x the status quo's (a scheduled thermostat)" in h.task
    # without contract parameters: the defaults are stated, no target
    plain = req("hvac:office3", {})
    assert "shifted by +0 °C" in plain.task and "costs 10 kWh" in plain.task and "Target:" not in plain.task
    # the served prompt is the CFR builder's rendering of the same intent and task
    assert a.user == render_user(domain="grid:case14", gear=None, kind="codegen", hypothesis=0,
                                 params={"load_scale": 1.1, "voll": 2000, "target": 0.95}, reason=None, task=a.task)


def test_the_judge_runs_the_contracts_scenario_and_says_how_much_better_than_the_status_quo():
    """The same controller under two code contracts: the scenario (loads x 1.2) changes both the
    candidate's and the status quo's cost; economic dispatch on the cost curves beats pro rata."""
    from scf.ml.genn import judge, reward_of
    from scf.producers.genn.search import GRID_ECONOMIC, GRID_PRORATA

    econ = GRID_ECONOMIC.format(margin=0.0, ramp_use=1.0, iterations=50)
    base = judge(econ, "grid:case14", hours=2.0)
    high = judge(econ, "grid:case14", hours=2.0, params={"load_scale": 1.2})
    assert base.sandbox_ok and high.sandbox_ok
    assert base.beats_status_quo and base.relative_cost < 1.0 and base.improvement == pytest.approx(1.0 - base.relative_cost)
    assert base.reward == pytest.approx(reward_of(base.relative_cost)) and base.reward > 0.5
    assert high.relative_cost != pytest.approx(base.relative_cost)
    same = judge(GRID_PRORATA.format(margin=0.0), "grid:case14", hours=2.0)  # the status quo itself
    assert same.relative_cost == pytest.approx(1.0) and not same.beats_status_quo and same.reward == pytest.approx(0.5)
    worse = judge(GRID_PRORATA.format(margin=0.03), "grid:case14", hours=2.0, params={"voll": 5000})  # 3 % too much: imbalance
    assert worse.sandbox_ok and worse.relative_cost > 1.0 and worse.improvement < 0 and 0 < worse.reward < 0.5
    assert reward_of(None) == 0.0 and reward_of(float("inf")) == 0.0


def test_rejection_sampling_keeps_only_answers_that_beat_the_status_quo():
    from scf.ml.genn import rejection_rows
    from scf.producers.genn.search import GRID_ECONOMIC, GRID_PRORATA
    from scf.projections.cfr_prompt import messages

    req = CodeRequest.for_intent(ev.Intent(intent_id="rs", kind="codegen", domain="grid:case14", params={"load_scale": 0.9}))
    best = GRID_ECONOMIC.format(margin=0.0, ramp_use=1.0, iterations=50)
    answers = [["```python\n" + best + "```", "```python\n" + best + "```",  # the same code twice: kept once
                "```python\n" + GRID_PRORATA.format(margin=0.0) + "```",  # runs, but only as good as the status quo
                "no code here", "```python\nimport os\n" + best + "```"]]
    rows, stats = rejection_rows([(messages(req.user), "grid:case14")], answers, keep=2, hours=2.0)
    assert (stats["samples"], stats["code"], stats["passed"], stats["beat"], stats["kept"]) == (5, 4, 3, 2, 1)
    [row] = rows
    assert row["prompt"] == messages(req.user) and row["completion"] == [{"role": "assistant", "content": best}]


def test_the_ebdms_energy_of_the_produced_states_enters_the_reward(tmp_path):
    """EnergyScorer: the EBDM's mean energy of the candidate's hourly states minus the status
    quo's at the same contexts. The status quo's own code has gap 0 (the same states); another
    controller's gap moves the reward by -weight x tanh(gap)."""
    torch = pytest.importorskip("torch")
    from scf.ml.checkpoint import save_checkpoint
    from scf.ml.ebdm import EBDM, EBDMConfig
    from scf.ml.genn import EnergyScorer, judge, reward_of
    from scf.producers.genn.search import GRID_ECONOMIC, GRID_PRORATA

    torch.manual_seed(0)
    model = EBDM(EBDMConfig(domain="grid:case14", hidden=16, depth=1, fourier_features=4, sigma_features=2))
    path = save_checkpoint(tmp_path / "ebdm.safetensors", model, lineage={"test": True}, metrics={})
    scorer = EnergyScorer({"grid:case14": path}, weight=0.2)
    same = judge(GRID_PRORATA.format(margin=0.0), "grid:case14", hours=2.0, energy=scorer)
    assert same.energy_gap == pytest.approx(0.0, abs=1e-5) and same.reward == pytest.approx(0.5, abs=1e-4)
    econ = judge(GRID_ECONOMIC.format(margin=0.0, ramp_use=1.0, iterations=50), "grid:case14", hours=2.0, energy=scorer)
    plain = judge(GRID_ECONOMIC.format(margin=0.0, ramp_use=1.0, iterations=50), "grid:case14", hours=2.0)
    assert econ.energy_gap is not None and econ.energy_gap != pytest.approx(0.0, abs=1e-4) and plain.energy_gap is None
    assert econ.relative_cost == pytest.approx(plain.relative_cost)
    assert econ.reward == pytest.approx(reward_of(econ.relative_cost, econ.energy_gap, 0.2)) != pytest.approx(plain.reward)
    # no model for the domain: no energy term; a model of another domain: one clear line
    assert judge(GRID_PRORATA.format(margin=0.0), "grid:case30", hours=2.0, energy=scorer).energy_gap is None
    from scf.ml.genn import ModelError

    wrong = EnergyScorer({"grid:case30": path})
    with pytest.raises(ModelError, match="give a checkpoint trained on grid:case30"):
        judge(GRID_PRORATA.format(margin=0.0), "grid:case30", hours=2.0, energy=wrong)
