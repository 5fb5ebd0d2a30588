"""Paired decisions of a student against its teacher (`ml.distill.paired_decisions`): both
sample with the same noise, so a model paired with itself differs by exactly nothing, while
another seed shows the sampler's own spread; the interval of the savings difference (a
ratio with a shared denominator) agrees with a bootstrap; the verdict reads the interval."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from scf import domains
from scf.ml.distill import _ratio_diff_ci, distill_ebdm, no_worse, paired_decisions, verdict
from tests.test_distill import FEW, case9, tiny_teacher


@pytest.fixture(scope="module")
def models():
    teacher = tiny_teacher()
    _, x, c, _ = case9(160, seed=1)
    student, _ = distill_ebdm(teacher, x, c, dataclasses.replace(FEW, steps=4))
    _, hx, hc, _ = case9(40, seed=7)
    return teacher, student, hx, hc


def test_a_model_paired_with_itself_differs_by_nothing_and_another_seed_shows_the_noise(models):
    teacher, _, hx, hc = models
    d = domains.get("grid:case9")
    same = paired_decisions(teacher, teacher, d, hx, hc, seed=3, batch=16)
    assert same["paired_contexts"] == 40 and same["identical_decisions"] == 1.0
    assert same["gap_diff_pp"] == same["gap_diff_low_pp"] == same["gap_diff_high_pp"] == 0.0
    assert same["savings_diff_pp"] == 0.0 and same["gap_verdict"] == same["savings_verdict"] == "met"
    assert same["gap_no_worse"] == same["savings_no_worse"] == "met"
    other = paired_decisions(teacher, teacher, d, hx, hc, seed=3, student_seed=4, batch=16)
    assert other["identical_decisions"] < 1.0 and other["gap_diff_sd_pp"] > 0  # unpaired: the sampler's own spread
    assert other["gap_diff_low_pp"] < other["gap_diff_pp"] < other["gap_diff_high_pp"]
    assert other["teacher_decision_gap_mean"] == same["teacher_decision_gap_mean"]  # the teacher's run is the same run


def test_a_student_paired_with_its_teacher(models):
    teacher, student, hx, hc = models
    p = paired_decisions(teacher, student, domains.get("grid:case9"), hx, hc, seed=0, batch=64)
    for k in ("gap_diff", "savings_diff"):
        assert p[k + "_low_pp"] <= p[k + "_pp"] <= p[k + "_high_pp"], k
    assert p["gap_diff_pp"] == pytest.approx(100 * (p["decision_gap_mean"] - p["teacher_decision_gap_mean"]), abs=1e-9)
    if p["decision_feasible"] == p["teacher_decision_feasible"] == 1.0:  # a shared denominator: the ratio's difference
        want = 100 * (p["decision_savings_captured"] - p["teacher_decision_savings_captured"])
        assert p["savings_diff_pp"] == pytest.approx(want, abs=1e-9)
    assert p["gap_verdict"] in ("met", "missed", "undecided")


def test_the_savings_interval_agrees_with_a_bootstrap():
    rng = np.random.default_rng(0)
    a = rng.gamma(2.0, 1.0, 400)  # achievable savings per context
    u = 0.01 * a + rng.normal(0, 0.05, 400)  # the student's extra savings, correlated with a
    r, lo, hi = _ratio_diff_ci(u, a, 1.0)
    assert r == pytest.approx(u.sum() / a.sum())
    idx = rng.integers(0, 400, (4000, 400))
    boot = u[idx].sum(1) / a[idx].sum(1)
    assert (hi - lo) / 2 == pytest.approx(float(np.std(boot)), rel=0.1)


@pytest.mark.parametrize(("low", "high", "want"), [(-0.05, 0.08, "met"), (0.12, 0.3, "missed"), (-0.3, -0.11, "missed"),
                                                    (0.05, 0.2, "undecided"), (-0.2, 0.2, "undecided"), (math.nan, 0.0, "undecided")])  # fmt: skip
def test_the_verdict_reads_the_interval(low, high, want):
    assert verdict(low, high, 0.1) == want


@pytest.mark.parametrize(("low", "high", "want"), [(-0.6, 0.05, "met"), (-0.6, -0.2, "met"), (0.12, 0.3, "missed"), (-0.2, 0.2, "undecided")])
def test_no_worse_is_one_sided(low, high, want):
    assert no_worse(low, high, 0.1) == want
