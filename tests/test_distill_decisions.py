"""An EBDM student's decisions judged against its teacher's (issue 14: "within 0.1
percentage point"): `ml.distill.judge_student` samples both PAIRED (the same noise) on
held-out contexts, repairs both and measures both against the same exact optimum; the
verifier refuses a student whose decisions are worse than its teacher's by more than the
tolerance, naming the interval. Real parts: tiny trained EBDMs, the HiGHS optimum, a real
nats-server, the artifact store and the daemon's own verifier."""

from __future__ import annotations

import dataclasses
import math

import pytest

from scf.bus import events as ev
from scf.bus.errors import ConfigError
from scf.ml.checkpoint import save_checkpoint
from scf.ml.distill import decision_reasons, distill_ebdm, export_student, judge_student, make_student
from scf.ml.loader import in_split
from scf.ml.ternary import freeze
from scf.producers.verify import CheckpointVerifier, VerifySettings
from tests.daemon_support import FIXED_TIME, recorded_fossils
from tests.test_distill import FEW, case9, tiny_teacher

ANY_QUALITY = {"max_dsm_ratio": 10.0, "min_rank_corr": -1.0}  # judged on decisions alone


def students(tmp_path, teacher):
    """(a student distilled from `teacher`, a "student" of the same architecture whose
    network was never trained: its decisions are worse) as packed files naming the teacher."""
    _, x, c, _ = case9(160, seed=1)
    good, _ = distill_ebdm(teacher, x, c, FEW)
    bad = make_student(tiny_teacher(steps=0), "ebdm")
    freeze(bad)
    lineage = {"teacher": {"checkpoint_id": "ck-teacher"}}
    return [
        export_student(tmp_path / f"{name}.safetensors", model.eval(), kind="ebdm", config=dataclasses.asdict(teacher.config), packing="2bit",
                       lineage=lineage, metrics={})  # fmt: skip
        for name, model in (("good", good), ("bad", bad))
    ]


def test_paired_decisions_judge_an_ebdm_student_against_its_teacher(tmp_path):
    teacher = tiny_teacher()
    tpath = save_checkpoint(tmp_path / "teacher.safetensors", teacher, lineage={}, metrics={})
    good, bad = students(tmp_path, teacher)
    _, hx, hc, he = case9(64, seed=5)

    metrics, teacher_metrics, reasons = judge_student(good, tpath, hx, hc, he, decision_contexts=64, **ANY_QUALITY)
    assert reasons == [], reasons  # its interval does not show it worse by more than 0.1 pp
    assert metrics["decision_contexts"] == metrics["decision_paired_contexts"] == 64
    assert metrics["decision_gap_diff_low_pp"] < metrics["decision_gap_mean_diff_pp"] < metrics["decision_gap_diff_high_pp"]
    assert math.isclose(metrics["decision_gap_mean_diff_pp"], 100 * (metrics["decision_gap_mean"] - teacher_metrics["decision_gap_mean"]))
    assert metrics["decision_feasible"] == teacher_metrics["decision_feasible"] == 1.0

    metrics, _, reasons = judge_student(bad, tpath, hx, hc, he, decision_contexts=64, **ANY_QUALITY)
    assert metrics["decision_gap_diff_low_pp"] > 0.1  # measured 2026-12-02: +3.65 pp [+1.33, +5.97]
    assert reasons[0].startswith("its decisions' gap to the optimum is +") and "on 64 paired held-out contexts" in reasons[0]
    assert reasons[0].endswith("higher, worse by more than the allowed 0.1 pp")
    # a wider tolerance takes it; not judging decisions takes it too
    assert judge_student(bad, tpath, hx, hc, he, decision_contexts=64, max_decision_pp=50.0, **ANY_QUALITY)[2] == []
    metrics, _, reasons = judge_student(bad, tpath, hx, hc, he, decision_contexts=0, **ANY_QUALITY)
    assert reasons == [] and "decision_gap_mean" not in metrics

    # "proven": an interval this wide cannot show the good student within 0.1 pp, so it is refused
    _, _, reasons = judge_student(good, tpath, hx, hc, he, decision_contexts=64, decision_rule="proven", **ANY_QUALITY)
    assert reasons and all("not shown to be within the allowed 0.1 pp on the worse side" in r for r in reasons), reasons
    with pytest.raises(ConfigError, match="decision rule 'best' is not one of"):
        judge_student(good, tpath, hx, hc, he, decision_rule="best")


def test_paired_decisions_summarised_from_slices_of_the_contexts_are_the_same():
    """A process pool measures slices of the contexts (`decision_outcome`); joined in order
    (`join_outcomes`), `paired_summary` gives what `paired_decisions` gives on them all."""
    from scf.domains.quality import optimum_costs
    from scf.ml.distill import _sample_decisions, decision_outcome, join_outcomes, paired_decisions, paired_summary

    teacher = tiny_teacher()
    d, hx, hc, _ = case9(40, seed=5)
    optimum = optimum_costs(d, hc)[1]
    whole = paired_decisions(teacher, teacher, d, hx, hc, seed=3, student_seed=4, batch=16, optimum=optimum)
    runs = []
    for s in (3, 4):
        samples = _sample_decisions(teacher, d, hc, seed=s, batch=16, device="cpu")
        runs.append(join_outcomes(decision_outcome(d, hc[i : i + 7], hx[i : i + 7], samples[i : i + 7], optimum[i : i + 7]) for i in range(0, 40, 7)))
    assert len(runs[0][0].gap) == len(runs[0][1]) == 40
    pieces = paired_summary(*runs)
    assert pieces.keys() == whole.keys() and whole["paired_contexts"] == 40.0
    for k, v in whole.items():
        assert pieces[k] == v or (isinstance(v, float) and math.isnan(v) and math.isnan(pieces[k])), k


def interval(diff, low, high, tol=0.1):
    from scf.ml.distill import no_worse, verdict

    return {"diff_pp": diff, "diff_low_pp": low, "diff_high_pp": high, "no_worse": no_worse(low, high, tol), "verdict": verdict(low, high, tol)}


def paired(gap, savings, feasible=(1.0, 1.0)):
    """A `paired_decisions` result with these (diff, low, high) intervals in pp; the
    savings' one-sided verdict is on how much LOWER the student's share is."""
    from scf.ml.distill import no_worse

    out = {"paired_contexts": 100.0, "decision_feasible": feasible[0], "teacher_decision_feasible": feasible[1]}
    out.update({f"gap_{k}": v for k, v in interval(*gap).items()})
    out.update({f"savings_{k}": v for k, v in interval(*savings).items()})
    out["savings_no_worse"] = no_worse(-savings[2], -savings[1], 0.1)
    return out


@pytest.mark.parametrize(
    ("gap", "savings", "rule", "refused"),
    [
        ((0.5, 0.3, 0.7), (0.0, -0.05, 0.05), "no_worse", ["gap"]),  # surely worse: higher gap
        ((0.0, -0.05, 0.05), (-0.5, -0.7, -0.3), "no_worse", ["savings"]),  # surely worse: lower savings
        ((-0.5, -0.7, -0.3), (0.5, 0.3, 0.7), "no_worse", []),  # surely better: taken
        ((-0.5, -0.7, -0.3), (0.5, 0.3, 0.7), "within", ["gap", "savings"]),  # … but not within ±0.1 pp
        ((0.05, -0.2, 0.3), (0.0, -0.05, 0.05), "no_worse", []),  # undecided: taken
        ((0.05, -0.2, 0.3), (0.0, -0.05, 0.05), "proven", ["gap"]),  # undecided: refused when it must be shown
        ((0.0, -0.05, 0.05), (0.0, -0.05, 0.05), "proven", []),
    ],
)
def test_the_decision_rules(gap, savings, rule, refused):
    reasons = decision_reasons(paired(gap, savings), 0.1, rule)
    named = [k for k, text in (("gap", "gap to the optimum"), ("savings", "savings captured")) if any(text in r for r in reasons)]
    assert named == refused, reasons


def test_fewer_feasible_decisions_than_the_teacher_refuse_and_no_optimum_judges_nothing():
    ok = ((0.0, -0.05, 0.05), (0.0, -0.05, 0.05))
    assert decision_reasons(paired(*ok, feasible=(0.98, 1.0)), 0.1) == [
        "only 98.0% of its repaired decisions pass the domain's check (its teacher's: 100.0%)"
    ]
    assert decision_reasons({"paired_contexts": 0.0}, 0.1) == []


@pytest.mark.anyio
async def test_the_verifier_refuses_a_student_that_decides_worse_than_its_teacher(bus, settings, tmp_path):
    from scf.bus.artifacts import open_store

    d, x, c, cost = case9(1200, seed=3)
    # held out: 1 fossil in 16 by its content id, which holds the time it was observed: a fixed time, so
    # the same held-out contexts in every run (observed now, CI saw 61 held out of 1200 once, and the
    # distilled student worse than its teacher by > 0.1 pp on some draws of them)
    fossils = recorded_fossils(d, x, c, cost, observed_at=FIXED_TIME)
    await bus.publish_many(fossils)
    n = min(64, sum(in_split(f.data.fossil_id, "heldout") for f in fossils))
    teacher = tiny_teacher()
    store = open_store(bus, settings)
    tref = await store.put(save_checkpoint(tmp_path / "teacher.safetensors", teacher, lineage={}, metrics={}), "grid_case9/teacher.safetensors")
    info = ev.CheckpointInfo(checkpoint_id="ck-teacher", job_id="job-teacher", domain=d.name, uri=tref.uri, sha256=tref.sha256, size=tref.size)
    await bus.publish(ev.CheckpointProduced.new(info, source="worker"))
    produced = {}
    for path in students(tmp_path, teacher):
        ref = await store.put(path, f"grid_case9/{path.name}")
        info = ev.CheckpointInfo(checkpoint_id=f"ck-{path.stem}", job_id=f"distill-ck-teacher-{path.stem}", domain=d.name, uri=ref.uri,
                                 sha256=ref.sha256, size=ref.size)  # fmt: skip
        produced[path.stem] = ev.CheckpointProduced.new(info, source="distill")

    cfg = VerifySettings(min_heldout=4, student_max_dsm_ratio=10.0, student_min_rank_corr=-1.0, student_decision_contexts=64)
    verifier = CheckpointVerifier(bus, settings, cfg)
    v = await verifier(produced["bad"], None)
    assert (v.alias, v.baseline_checkpoint_id) == ("edge", "ck-teacher")
    # all n contexts judged; paired are those where both repaired decisions pass the domain's check (the
    # bad student's repair can fail a few — counted by decision_feasible, not paired)
    infeasible = round(n * (1 - v.metrics["decision_feasible"])) + round(n * (1 - v.baseline_metrics["decision_feasible"]))
    assert v.metrics["decision_contexts"] == n and n - infeasible <= v.metrics["decision_paired_contexts"] <= n
    assert "decision_gap_mean" in v.baseline_metrics
    assert any(r.startswith("its decisions' gap to the optimum is +") and r.endswith("worse by more than the allowed 0.1 pp") for r in v.reasons), v.reasons
    v = await verifier(produced["good"], None)
    assert v.reasons == [] and v.metrics["decision_paired_contexts"] == n
