"""The CFR dataset from a hand-built scenario on a real bus, archived to real Parquet: exactly
the expected supervised example and preference pair, byte-identical rebuilds, as-of cuts."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pyarrow.parquet as pq
import pytest

from scf.bus import events as ev
from scf.bus.ids import new_id
from scf.projections import archive, cfr
from scf.projections.store import ArchiveStore
from tests.conftest import cli

pytestmark = pytest.mark.anyio

GOOD = "def setpoints(ctx):\n    return [min(1.0, x / 80) for x in ctx]\n"
BAD = "import socket\n\ndef setpoints(ctx):\n    socket.create_connection(('x', 80))\n    return ctx\n"
TASK = "Write setpoints(ctx) that shave the evening peak."
USER = (
    "Context:\n"
    "- domain: grid:case14\n"
    "- gear: ACCELERATED\n"
    "- intent: codegen (hypothesis 0)\n"
    '- params: {"horizon": 24, "objective": "peak"}\n'
    "- why: peak shaving for tomorrow\n"
    "\n"
    "Task:\n"
    f"{TASK}"
)


async def _scenario(bus) -> dict[str, int]:
    """Context (a gear shift), an intent, two proposals, one approved, one rejected."""
    gear = ev.GearChanged.new(ev.GearChange(from_gear="STANDARD", to_gear="ACCELERATED", by="ops"), source="daemon")
    intent = ev.IntentCreated.new(
        ev.Intent(intent_id="intent-peak-1", kind="codegen", domain="grid:case14", gear="ACCELERATED",
                  params={"objective": "peak", "horizon": 24}, reason="peak shaving for tomorrow"),
        source="daemon",
    )
    ruling = ev.VerdictIssued.new(
        ev.Verdict(verdict_id="v-intent", subject_id="intent-peak-1", subject_type="intent", decision="APPROVE", gate="regulator"),
        source="safety", cause=intent,
    )
    # Explicit ids: bus.events derives an effect's id from (cause, type, intent_id) for a
    # CodeProposal, so two proposals for one intent would collide (reported to the lead).
    good = ev.CodeProposed.new(ev.CodeProposal(proposal_id="p-good", intent_id="intent-peak-1", code=GOOD, prompt=TASK, generator="coder"),
                               source="coder", cause=intent, id=new_id())
    bad = ev.CodeProposed.new(ev.CodeProposal(proposal_id="p-bad", intent_id="intent-peak-1", code=BAD, prompt=TASK, generator="coder"),
                              source="coder", cause=intent, id=new_id())
    await bus.publish_many([gear, intent, ruling, good, bad])
    before_code_verdicts = (await bus.js.stream_info("VERDICTS")).state.last_seq
    await bus.publish_many([
        ev.VerdictIssued.new(ev.Verdict(verdict_id="v-good", subject_id="p-good", subject_type="code", decision="APPROVE", gate="ethics"), source="safety", cause=good),
        ev.VerdictIssued.new(ev.Verdict(verdict_id="v-bad", subject_id="p-bad", subject_type="code", decision="REJECT", gate="ethics",
                                        reasons=["network access: socket.create_connection"]), source="safety", cause=bad),
    ])
    return {"verdicts_before_code": before_code_verdicts}


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_hand_built_scenario_gives_exactly_the_expected_examples(bus, settings, tmp_path):
    await _scenario(bus)
    await archive.replay(settings)
    out = tmp_path / "cfr"
    ds = cfr.build(settings.archive_dir, out)
    split = cfr.split_of("intent-peak-1", 10.0)
    other = "validation" if split == "train" else "train"

    prompt = [{"role": "system", "content": cfr.SYSTEM_PROMPT}, {"role": "user", "content": USER}]
    good, bad = [{"role": "assistant", "content": GOOD}], [{"role": "assistant", "content": BAD}]
    # Conversational prompt/completion: the trainer's loss falls on the completion only.
    assert _lines(out / "sft" / f"{split}.jsonl") == [{"prompt": prompt, "completion": good}]
    assert _lines(out / "preference" / f"{split}.jsonl") == [{"prompt": prompt, "chosen": good, "rejected": bad}]
    assert _lines(out / "unpaired" / f"{split}.jsonl") == [
        {"prompt": prompt, "completion": bad, "label": False},  # proposals in id order: p-bad, p-good
        {"prompt": prompt, "completion": good, "label": True},
    ]
    for name in ("sft", "preference", "unpaired"):
        assert (out / name / f"{other}.jsonl").read_text() == ""

    pairs = pq.read_table(out / "preference.parquet").to_pylist()
    assert pairs == [{
        "split": split, "intent_id": "intent-peak-1", "chosen_proposal_id": "p-good", "rejected_proposal_id": "p-bad",
        "rejected_reasons": ["network access: socket.create_connection"], "prompt": prompt, "chosen": good, "rejected": bad,
    }]
    tuples = pq.read_table(out / "tuples.parquet").to_pylist()
    assert [(t["proposal_id"], t["decision"], t["gear"], json.loads(t["params"])) for t in tuples] == [
        ("p-bad", "REJECT", "ACCELERATED", {"objective": "peak", "horizon": 24}),
        ("p-good", "APPROVE", "ACCELERATED", {"objective": "peak", "horizon": 24}),
    ]
    assert ds.counts == {
        "tuples": 2, "approved": 1, "approved_worse": 0, "rejected": 1, "pending": 0, "intents": 1,
        "sft": {split: 1, other: 0}, "preference": {split: 1, other: 0}, "unpaired": {split: 2, other: 0},
    }
    card = (out / "README.md").read_text()
    intents_last = (await bus.js.stream_info("INTENTS")).state.last_seq
    verdicts_last = (await bus.js.stream_info("VERDICTS")).state.last_seq
    assert f"| INTENTS | 1 | {intents_last} | {intents_last} |" in card
    assert f"| VERDICTS | 1 | {verdicts_last} | {verdicts_last} |" in card
    assert f"`scf dataset cfr --out DIR --as-of-seq INTENTS={intents_last} --as-of-seq VERDICTS={verdicts_last}`" in card
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["lineage"]["archive_files_sha256"] in card and len(meta["lineage"]["archive_rows_sha256"]) == 64


async def test_building_twice_gives_byte_identical_files(bus, settings, scf_env, tmp_path):
    from scf.projections import sample

    await _scenario(bus)
    await sample.publish(bus, sample.history(cycles=60, seed=13))
    await archive.replay(settings)
    a, b = tmp_path / "a", tmp_path / "b"
    r = await asyncio.to_thread(cli, "dataset", "cfr", "--out", str(a), env=scf_env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"CFR dataset in {a}")
    cfr.build(settings.archive_dir, b)

    def digest(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}

    da, db = digest(a), digest(b)
    assert da == db
    assert {"README.md", "dataset.json", "sft/train.jsonl", "preference/validation.jsonl", "unpaired.parquet", "tuples.parquet"} <= set(da)
    # Compaction changes the files, not the rows: the dataset stays the same, only the
    # file hash in the card's lineage moves.
    ArchiveStore(settings.archive_dir).compact("INTENTS", target_rows=10_000, small_rows=10_000)
    c = tmp_path / "c"
    cfr.build(settings.archive_dir, c)
    dc = digest(c)
    assert {k: v for k, v in dc.items() if k not in ("README.md", "dataset.json")} == {
        k: v for k, v in da.items() if k not in ("README.md", "dataset.json")
    }


async def test_as_of_cuts_the_log_and_held_code_is_left_out(bus, settings, scf_env, tmp_path):
    cut = await _scenario(bus)
    await archive.replay(settings)
    ds = cfr.build(settings.archive_dir, tmp_path / "early", as_of={"VERDICTS": cut["verdicts_before_code"]})
    assert ds.counts["tuples"] == 0 and ds.counts["pending"] == 2
    assert ds.lineage["streams"]["VERDICTS"]["to_seq"] == cut["verdicts_before_code"]

    held = ev.CodeProposed.new(ev.CodeProposal(proposal_id="p-held", intent_id="intent-peak-1", code=GOOD + "# v2\n"), source="coder")
    await bus.publish_many([
        held,
        ev.VerdictIssued.new(ev.Verdict(verdict_id="v-held", subject_id="p-held", subject_type="code", decision="HOLD", gate="ethics", final=False), source="safety"),
    ])
    await archive.replay(settings)
    ds = cfr.build(settings.archive_dir, tmp_path / "late")
    assert (ds.counts["tuples"], ds.counts["pending"]) == (2, 1)

    r = await asyncio.to_thread(cli, "dataset", "cfr", "--out", str(tmp_path / "x"), "--as-of-seq", "FOSSILS=3", env=scf_env)
    assert r.returncode == 1
    assert r.stderr.strip() == "Error: --as-of-seq names FOSSILS: the CFR dataset reads only INTENTS, VERDICTS"
    r = await asyncio.to_thread(cli, "dataset", "cfr", "--out", str(tmp_path / "x"), "--as-of-seq", "INTENTS=x", env=scf_env)
    assert r.stderr.strip() == "Error: --as-of-seq 'INTENTS=x': expected N or STREAM=N (e.g. INTENTS=5000)"


def test_split_is_by_intent_and_stable():
    ids = [f"intent-{i}" for i in range(2000)]
    splits = [cfr.split_of(i, 10.0) for i in ids]
    assert splits == [cfr.split_of(i, 10.0) for i in ids]
    share = splits.count("validation") / len(ids)
    assert 0.07 < share < 0.13
    assert cfr.split_of("intent-peak-1", 0.0) == "train" and cfr.split_of("intent-peak-1", 100.0) == "validation"
