"""Checkpoint verification and the promotion decision (the daemon's "act" step).

    verification = await verifier(checkpoint_event, production)   # I/O + torch
    events = decide_promotion(checkpoint_event, production, verification, ...)   # pure

A produced checkpoint is promoted to an alias (default `production`) when

1. its artifact's SHA-256 and size match the event (the store checks the digest on fetch;
   checked again here on the bytes that will be loaded),
2. it loads without pickle (`ml.checkpoint.load_checkpoint`: safetensors + JSON metadata;
   a learned optimiser, format `scf-opt/1`, through `ml.optimize.load_optimiser`),
3. evaluated on held-out fossils of its domain (the loader's split: fossils whose id ends
   in a hex digit ≡ 0 mod 16, read from FOSSILS), its metric beats the current production
   checkpoint's on the *same* fossils by the configured relative margin, and its sample
   violation rate is not worse by more than the configured tolerance. With no production
   checkpoint, finite metrics suffice. The metric (`primary_metric`) is **decision
   quality** where both sides carry it: `decision_regret`, the share of the achievable
   savings (held-out state → exact optimum) that the checkpoint's repaired decisions miss
   on `decision_contexts` held-out contexts, and every repaired decision must pass the
   domain's own check (`min_feasible`). A learned optimiser always carries it; an EBDM
   does when `ebdm_decisions` is set or when it is the production a learned optimiser is
   compared with (sampling is slow: 30-700 ms a context). Otherwise `metric` (default
   `heldout_dsm`, lower is better), and for a learned optimiser of a domain without an
   exact solver, its cost model's error on the measured energies (`cost_heldout_mae_rel`).

Otherwise it is rejected with every reason.

A ternary student (`scf distill`: job `distill-<teacher id>`) is judged against the teacher
its lineage names, on the same held-out fossils (`ml.distill.judge_student`), and promoted
to `student_alias` (default `edge`), never to production: an EBDM student on its held-out
DSM (at most `student_max_dsm_ratio` × the teacher's), its energy ranking (Spearman at
least `student_min_rank_corr`) and its decisions on `student_decision_contexts` held-out
contexts, sampled PAIRED with the teacher's (the same noise, repaired, against the same
exact optimum: refused when the 95 % interval of the difference shows it worse than the
teacher by more than `student_max_decision_pp` percentage points of gap or of savings
captured, by `student_decision_rule`); an optimiser student on its repaired decisions.

A code student (`scf-ternary-lm/1` in domain `genn`, `scf genn publish FILE`; job
`distill-<teacher id>`) is told from a code model by its artifact's stated format, judged
with the numpy `student` backend (no torch) on the code models' held-out contracts, and
promoted to `student_alias` when at least one answer passed the sandbox and its gate-pass
and sandbox-pass rates are at least `code_student_min_ratio` × its teacher's recorded ones
(`compare_code_student`; docs/codegen.md).

An alias has one head per (domain, model kind): `ebdm`, `optimiser` (format `scf-opt/1`)
and `code` (domain `genn`) — a candidate is judged against, and replaces, the head of its
own kind only, so promoting a learned optimiser leaves the EBDM in production and vice
versa. The kind is read from the artifact's header (`Promotion.kind`; a promotion without
one, written before 2026-12-02, is an EBDM's, or a code model's in domain `genn`). The
versions of an alias count up by one per (domain, alias) over every kind (an edge agent
refuses to go down), each promotion names the checkpoint of its kind it replaces, and the
history of an alias is the sequence of `checkpoint.promoted.<domain>` events.

torch is imported lazily (here and in `ml/`): the daemon runs without it, and then it does
not verify at all — `available()` says why, the daemon logs it once, and produced
checkpoints wait in CHECKPOINTS (durable consumer `daemon-checkpoints`) until a daemon with
`pip install 'scf[train]'` runs. Nothing is rejected for lack of torch.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Literal

import msgspec

from scf.bus import events as ev
from scf.bus.errors import SCFError
from scf.bus.files import sha256_file
from scf.bus.ids import derived_id, subject_token
from scf.bus.reader import StreamMsg, StreamReader, read

log = logging.getLogger("scf.verify")


class VerifySettings(msgspec.Struct, frozen=True, kw_only=True):
    """The checkpoint part of `[daemon]` in scf.toml."""

    alias: str = "production"
    metric: str = "heldout_dsm"  # lower is better
    margin: float = 0.02  # the candidate must be at least 2 % better than production
    violation_tolerance: float = 0.0  # allowed increase of violation_rate over production
    heldout_limit: int = 2048  # held-out fossils evaluated
    min_heldout: int = 16  # fewer held-out fossils than this: reject (cannot judge)
    # ternary students (`scf distill`, docs/distill.md): judged against their teacher, promoted to their own alias
    student_alias: str = "edge"
    student_max_dsm_ratio: float = 1.02  # held-out DSM at most this × the teacher's, on the same fossils
    student_min_rank_corr: float = 0.98  # Spearman of the student's energies against the teacher's
    # … and its decisions on this many held-out contexts, paired with the teacher's (an EBDM student: sampled with the
    # same noise, ~0.2 s a context and model on a CPU at hidden 256; 0: an EBDM student's decisions are not judged)
    student_decision_contexts: int = 256
    student_max_decision_pp: float = 0.1  # percentage points of gap to the optimum and of savings captured (issue 14)
    # EBDM students: refused when the paired 95 % interval shows them worse than the teacher by more than that
    # ("no_worse"), outside ±that either side ("within"), or unless it shows them no worse ("proven": thousands of contexts)
    student_decision_rule: Literal["no_worse", "within", "proven"] = "no_worse"
    decisions: bool = True  # judge on decision quality (decision_regret) where both sides carry it
    decision_contexts: int = 64  # held-out contexts decided, repaired and solved exactly per checkpoint
    ebdm_decisions: bool = False  # decide with EBDM checkpoints too (sampling: 30-700 ms a context on a CPU)
    min_feasible: float = 1.0  # share of repaired decisions that must pass the domain's check
    # code models (GenN, domain `genn`, format scf-code-model/1): judged on held-out contracts
    code_heldout: tuple[str, ...] = ("grid:case9",)  # domains of the held-out codegen intents
    code_prompts: int = 2  # held-out intents per domain
    code_samples: int = 4  # answers sampled per intent (seeded: candidate and baseline see the same seeds)
    code_max_new_tokens: int = 384
    code_tolerance: float = 0.0  # allowed drop of a code metric below the baseline's ("not worse")
    code_workers: int = 2  # sandbox runs at once
    code_base: str = ""  # a base model directory to compare with when no code model is in production yet
    # code students (scf-ternary-lm/1 in domain genn): judged with the numpy `student` backend on the same held-out contracts,
    # promoted to `student_alias` when their gate-pass and sandbox-pass rates are at least this × their teacher's (issue 14)
    code_student_min_ratio: float = 0.9


@dataclass(frozen=True)
class Verification:
    """What verifying a candidate found (before the promotion decision)."""

    checkpoint_id: str
    ok: bool  # digest, load and evaluation all ran
    reasons: list[str] = field(default_factory=list)  # why not ok, when not ok
    metrics: dict[str, float] = field(default_factory=dict)
    baseline_checkpoint_id: str | None = None
    baseline_metrics: dict[str, float] = field(default_factory=dict)
    alias: str = ""  # a ternary student's: the alias it goes to instead of `settings.alias` (baseline: its teacher) …
    head: ev.Promotion | None = None  # … and that alias's head, which its version counts from


STUDENT_JOB_PREFIX = "distill-"  # job_id of a ternary student's checkpoint.produced (ml.distill.distill_on_bus)


Verifier = Callable[[ev.CheckpointProduced, ev.Promotion | None], Awaitable[Verification]]


# --------------------------------------------------------------------------- pure decisions


CODE_DOMAIN = "genn"  # the domain of code-model checkpoints (checkpoint.*.genn): GenN's models, not a plant's
EBDM, OPTIMISER, CODE = "ebdm", "optimiser", "code"  # model kinds: an alias has one head per (domain, kind)
KINDS = (EBDM, OPTIMISER, CODE)
CODE_METRICS = ("code_mean_reward", "code_sandbox_pass_rate", "code_gate_pass_rate")  # higher is better, in this order
DECISION_METRIC = "decision_regret"  # 1 - savings captured on held-out contexts (domains.quality)
COST_METRIC = "cost_heldout_mae_rel"  # the learned cost against measured energy, where no optimum is known


def primary_metric(metrics: dict[str, float], baseline: dict[str, float] | None, settings: VerifySettings) -> str:
    """The metric a candidate is judged on: decision quality (`decision_regret`: the share of
    the achievable savings its repaired decisions miss, against the exact optimum) when
    `settings.decisions` and both sides carry it; else `settings.metric` (held-out DSM) when
    the candidate has it; else the learned cost's error on measured energy (a learned
    optimiser of a domain with no exact solver)."""
    if settings.decisions and DECISION_METRIC in metrics and (not baseline or DECISION_METRIC in baseline):
        return DECISION_METRIC
    if settings.metric in metrics or COST_METRIC not in metrics:
        return settings.metric
    return COST_METRIC


def compare(
    metrics: dict[str, float], baseline: dict[str, float] | None, settings: VerifySettings
) -> list[str]:
    """Why the candidate does not beat the baseline (empty when it does)."""
    why: list[str] = []
    m = primary_metric(metrics, baseline, settings)
    feasible = metrics.get("decision_feasible")
    if feasible is not None and feasible < settings.min_feasible:
        why.append(
            f"decision_feasible {feasible:.4g}: some repaired decisions on held-out contexts break a constraint "
            f"(needs >= {settings.min_feasible:.4g})"
        )
    value = metrics.get(m)
    if value is None or not math.isfinite(value):
        return [f"metric {m} is missing or not finite ({value}) on held-out fossils"]
    for name, v in metrics.items():
        if not math.isfinite(v) and name in ("violation_rate",):
            why.append(f"metric {name} is not finite ({v})")
    if not baseline:
        return why
    base = baseline.get(m)
    if base is None or not math.isfinite(base):
        return why  # a broken production checkpoint is beaten by any finite candidate
    needed = base - settings.margin * abs(base)
    if value > needed:
        why.append(
            f"{m} {value:.6g} does not beat production's {base:.6g} by the margin {settings.margin:.1%} "
            f"(needs <= {needed:.6g})"
        )
    vr, bvr = metrics.get("violation_rate"), baseline.get("violation_rate")
    if vr is not None and bvr is not None and math.isfinite(vr) and vr > bvr + settings.violation_tolerance:
        why.append(
            f"violation_rate {vr:.4g} is worse than production's {bvr:.4g} (tolerance {settings.violation_tolerance:.4g})"
        )
    return why


def compare_code(metrics: dict[str, float], baseline: dict[str, float] | None, settings: VerifySettings, who: str = "production") -> list[str]:
    """Why a code model is worse than its baseline on held-out contracts (empty when it is not
    worse): its mean reward, sandbox-pass and gate-pass rates may each fall at most
    `code_tolerance` below the baseline's. With no baseline, finite metrics suffice."""
    why = [f"metric {m} is missing or not finite ({metrics.get(m)}) on held-out contracts" for m in CODE_METRICS
           if m not in metrics or not math.isfinite(metrics[m])]
    if why or not baseline:
        return why
    for m in CODE_METRICS:
        b = baseline.get(m)
        if b is not None and math.isfinite(b) and metrics[m] < b - settings.code_tolerance:
            why.append(f"{m} {metrics[m]:.4g} is worse than {who}'s {b:.4g} on the same held-out contracts (tolerance {settings.code_tolerance:.4g})")
    return why


CODE_STUDENT_RATES = ("code_gate_pass_rate", "code_sandbox_pass_rate")  # a code student's, against its teacher's


def compare_code_student(metrics: dict[str, float], teacher: dict[str, float] | None, settings: VerifySettings,
                         who: str = "its teacher") -> list[str]:
    """Why a code student may not be promoted (empty when it may): its code metrics must be
    finite, at least one of its answers must pass the sandbox, and where its teacher's rates
    are known its gate-pass and sandbox-pass rates must each be at least
    `code_student_min_ratio` × the teacher's. With no teacher rates the first two suffice."""
    why = [f"metric {m} is missing or not finite ({metrics.get(m)}) on held-out contracts" for m in CODE_METRICS
           if m not in metrics or not math.isfinite(metrics[m])]
    if why:
        return why
    if metrics["code_sandbox_pass_rate"] <= 0:
        n = metrics.get("code_samples", float("nan"))
        why.append(f"none of its {n:.0f} answers to held-out contracts passed the sandbox (code_rate {metrics.get('code_rate', float('nan')):.4g}, "
                   f"code_gate_pass_rate {metrics['code_gate_pass_rate']:.4g}): a code student must write code that runs")
    r = settings.code_student_min_ratio
    for m in CODE_STUDENT_RATES:
        t = (teacher or {}).get(m)
        if t is not None and math.isfinite(t) and metrics[m] < r * t - 1e-9:  # rates are ratios of counts: 0.72 meets 0.9 × 0.8
            why.append(f"{m} {metrics[m]:.4g} is below {r:.4g} × {who}'s {t:.4g} (needs >= {r * t:.4g})")
    return why


def kind_of(p: ev.Promotion) -> str:
    """A promotion's model kind: its `kind`, or for one written before kinds existed an
    EBDM's (a code model's in domain `genn`)."""
    return p.kind or (CODE if p.domain == CODE_DOMAIN else EBDM)


def kind_of_format(fmt: str | None, domain: str) -> str:
    """The model kind of a checkpoint from its header's `format` (None: unreadable)."""
    if domain == CODE_DOMAIN:
        return CODE
    return OPTIMISER if fmt == "scf-opt/1" else EBDM


def decide_promotion(
    event: ev.CheckpointProduced,
    production: ev.Promotion | None,
    verification: Verification,
    settings: VerifySettings,
    *,
    source: str,
    kind: str = "",
    version: int | None = None,
) -> list[ev.Event]:
    """checkpoint.verified + checkpoint.promoted, or checkpoint.rejected with every reason.
    `production` is the head of the candidate's `kind` under the alias (what it replaces);
    `version` the alias's next version over every kind (default: production's + 1)."""
    c = event.data
    if verification.alias:  # a ternary student: judged against its teacher by the verifier, its own alias
        return _decide_student(event, verification, settings, source)
    code = c.domain == CODE_DOMAIN  # a code model: judged against production, or its base, on held-out contracts
    if not verification.ok:
        reasons = list(verification.reasons)
    elif code:
        who = "production" if production else f"its base {verification.baseline_checkpoint_id}"
        reasons = compare_code(verification.metrics, verification.baseline_metrics or None, settings, who)
    else:
        reasons = compare(verification.metrics, verification.baseline_metrics if production else None, settings)
    if reasons:
        return [ev.CheckpointRejected.new(ev.CheckpointRejection(
            checkpoint_id=c.checkpoint_id, domain=c.domain, reasons=reasons, metrics=_finite(verification.metrics),
            baseline_checkpoint_id=verification.baseline_checkpoint_id if verification.baseline_metrics else None,
            baseline_metrics=_finite(verification.baseline_metrics),
        ), source=source, cause=event)]
    verified = ev.CheckpointVerified.new(
        ev.CheckpointVerification(
            checkpoint_id=c.checkpoint_id,
            domain=c.domain,
            metrics=verification.metrics,
            baseline_checkpoint_id=production.checkpoint_id if production else (verification.baseline_checkpoint_id if code else None),
            baseline_metrics=verification.baseline_metrics if production or code else {},
            margin=0.0 if code else settings.margin,
        ),
        source=source,
        cause=event,
    )
    promoted = ev.CheckpointPromoted.new(
        ev.Promotion(
            checkpoint_id=c.checkpoint_id,
            domain=c.domain,
            alias=settings.alias,
            version=version or ((production.version + 1) if production else 1),
            uri=c.uri,
            sha256=c.sha256,
            size=c.size,
            previous_checkpoint_id=production.checkpoint_id if production else None,
            kind=kind or (CODE if code else EBDM),
        ),
        source=source,
        cause=event,
        id=derived_id(event.id, "checkpoint.promoted", settings.alias),
    )
    return [verified, promoted]


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    """The finite metrics (JSON has no NaN: a rejection for a non-finite metric still encodes)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def _decide_student(event: ev.CheckpointProduced, verification: Verification, settings: VerifySettings, source: str) -> list[ev.Event]:
    """A ternary student's verdict: rejected with the verifier's reasons, or verified
    (baseline: its teacher) and promoted to `verification.alias` after that alias's head."""
    c, head, alias = event.data, verification.head, verification.alias
    if head is not None and head.checkpoint_id == c.checkpoint_id:
        return []  # already the head of its alias (a redelivery)
    if verification.reasons or not verification.ok:
        reasons = list(verification.reasons) or ["the student could not be judged"]
        measured = {}  # a code student's rejection carries what was measured, and its teacher's rates, as a code model's does
        if c.domain == CODE_DOMAIN:
            measured = {"metrics": _finite(verification.metrics), "baseline_metrics": _finite(verification.baseline_metrics),
                        "baseline_checkpoint_id": verification.baseline_checkpoint_id}
        return [ev.CheckpointRejected.new(ev.CheckpointRejection(checkpoint_id=c.checkpoint_id, domain=c.domain, reasons=reasons, **measured),
                                          source=source, cause=event)]
    verified = ev.CheckpointVerified.new(
        ev.CheckpointVerification(
            checkpoint_id=c.checkpoint_id, domain=c.domain, metrics=verification.metrics,
            baseline_checkpoint_id=verification.baseline_checkpoint_id, baseline_metrics=verification.baseline_metrics,
            margin=(1.0 - settings.code_student_min_ratio) if c.domain == CODE_DOMAIN else settings.student_max_dsm_ratio - 1.0,
        ),
        source=source, cause=event,
    )  # fmt: skip
    promoted = ev.CheckpointPromoted.new(
        ev.Promotion(
            checkpoint_id=c.checkpoint_id, domain=c.domain, alias=alias, version=(head.version + 1) if head else 1,
            uri=c.uri, sha256=c.sha256, size=c.size, previous_checkpoint_id=head.checkpoint_id if head else None,
        ),
        source=source, cause=event, id=derived_id(event.id, "checkpoint.promoted", alias),
    )  # fmt: skip
    return [verified, promoted]


# --------------------------------------------------------------------------- the log


async def alias_head_events(bus, domain: str, alias: str) -> dict[str, tuple[ev.Promotion, bytes]]:
    """The heads of `alias` in `domain`, one per model kind (`kind_of`), each with its
    event's bytes as stored (for a signature check), from CHECKPOINTS."""
    from scf.bus.codec import Codec

    subject = f"checkpoint.promoted.{subject_token(domain)}"
    last = await bus.last(subject)
    if last is None:
        return {}
    seq, _ = last
    codec = Codec([ev.CheckpointPromoted])
    heads: dict[str, tuple[ev.Promotion, bytes]] = {}
    for msg in await read(bus, "CHECKPOINTS", subject, end_seq=seq):
        e = codec.decode(msg.data)
        if isinstance(e, ev.CheckpointPromoted) and e.data.alias == alias:
            heads[kind_of(e.data)] = (e.data, bytes(msg.data))
    return heads


async def alias_heads(bus, domain: str, alias: str) -> dict[str, ev.Promotion]:
    """The heads of `alias` in `domain`, one per model kind (`kind_of`), from CHECKPOINTS."""
    return {k: p for k, (p, _) in (await alias_head_events(bus, domain, alias)).items()}


async def current_promotion(bus, domain: str, alias: str, kind: str | None = None) -> ev.Promotion | None:
    """The head of `alias` in `domain` for model `kind` (None: the latest of any kind), from CHECKPOINTS."""
    heads = await alias_heads(bus, domain, alias)
    if kind is not None:
        return heads.get(kind)
    return max(heads.values(), key=lambda p: p.version, default=None)


def next_version(heads: dict[str, ev.Promotion]) -> int:
    """The alias's next version: one above every kind's head."""
    return 1 + max((p.version for p in heads.values()), default=0)


async def heldout_fossils(bus, domain: str, limit: int) -> list[ev.Fossil]:
    """Up to `limit` held-out fossils of `domain` (the loader's split), oldest first."""
    from scf.bus.codec import Codec

    try:
        from scf.ml.loader import in_split  # the loader's split: the verifier must hold out what training did
    except ImportError as exc:
        raise SCFError(
            f"cannot pick the held-out fossils of {domain}: scf.ml.loader does not import ({exc}): "
            "reinstall SCF with its train extra (`pip install 'scf[train]'`)"
        ) from exc

    codec = Codec([ev.FossilRecorded])
    out: list[ev.Fossil] = []
    enough = asyncio.Event()

    def take(msg: StreamMsg) -> None:
        if in_split(msg.subject.rsplit(".", 1)[-1], "heldout"):
            e = codec.decode(msg.data)
            if isinstance(e, ev.FossilRecorded):
                out.append(e.data)
                if len(out) >= limit:
                    enough.set()  # the rest of the stream is not read

    if limit > 0:
        await StreamReader(bus.nc, bus.js, "FOSSILS", f"fossil.recorded.{subject_token(domain)}.>").scan(take, enough)
    return out


# --------------------------------------------------------------------------- torch side


def available() -> str | None:
    """None when this host can verify checkpoints; otherwise why not (one line). Finds the
    modules without importing them: torch is imported at the first verification only."""
    from importlib.util import find_spec

    if find_spec("torch") is None or find_spec("safetensors") is None:
        return "torch / safetensors are not installed: install them with `pip install 'scf[train]'` to verify checkpoints"
    if find_spec("scf.ml.checkpoint") is None or find_spec("scf.ml.ebdm") is None:
        return "ml.checkpoint is not available: this build cannot load checkpoints"
    return None




def _model_of(loaded: Any):
    """The torch module inside whatever ml.checkpoint.load_checkpoint returns."""
    from torch import nn

    if isinstance(loaded, nn.Module):
        return loaded
    for attr in ("model", "module"):
        m = getattr(loaded, attr, None)
        if isinstance(m, nn.Module):
            return m
    if isinstance(loaded, (tuple, list)):
        for item in loaded:
            if isinstance(item, nn.Module):
                return item
    raise TypeError(f"load_checkpoint returned {type(loaded).__name__}, which holds no torch module")


def evaluate_file(
    path: Path, domain: str, fossils: list[ev.Fossil], seed: int = 0, *, decisions: bool = False, decision_contexts: int = 64
) -> dict[str, float]:
    """Load a checkpoint without pickle and evaluate it on held-out fossils (blocking: run
    it in a thread). A learned optimiser (`scf-opt/1`) is judged on its decisions for the
    first `decision_contexts` held-out contexts; an EBDM on held-out DSM and its samples,
    and with `decisions` also on its samples as decisions."""
    from scf.ml.checkpoint import load_checkpoint
    from scf.ml.optimize import FORMAT as OPTIMISER
    from scf.ml.optimize import checkpoint_format

    if checkpoint_format(path) == OPTIMISER:
        return evaluate_optimiser_on(path, domain, fossils[:decision_contexts])
    model = _model_of(load_checkpoint(path))
    metrics = evaluate_on(model, domain, fossils, seed)
    if decisions:
        metrics.update(ebdm_decisions_on(model, domain, fossils[:decision_contexts], seed))
    return metrics


def _arrays(fossils: list[ev.Fossil]):
    import numpy as np

    x = np.asarray([f.state for f in fossils], dtype=float)
    c = np.asarray([f.context for f in fossils], dtype=float)
    return x, c, np.asarray([f.energy for f in fossils], dtype=float)


def evaluate_optimiser_on(path: Path, domain: str, fossils: list[ev.Fossil]) -> dict[str, float]:
    """A learned optimiser's decisions on held-out contexts: feasibility after repair, gap to
    the exact optimum, savings captured and regret (status quo: the held-out states), and its
    learned cost against the measured energies (`ml.optimize.evaluate_optimiser`)."""
    from scf import domains
    from scf.ml.optimize import evaluate_optimiser, load_optimiser

    model, _ = load_optimiser(path)
    return evaluate_optimiser(model, domains.get(domain), _arrays(fossils), limit=len(fossils))


def ebdm_decisions_on(model, domain: str, fossils: list[ev.Fossil], seed: int = 0) -> dict[str, float]:
    """An EBDM's samples as decisions on held-out contexts, repaired and measured alike."""
    from scf import domains
    from scf.ml.optimize import ebdm_decisions

    x, c, _ = _arrays(fossils)
    return ebdm_decisions(model, domains.get(domain), x, c, seed=seed)


def evaluate_on(model, domain: str, fossils: list[ev.Fossil], seed: int = 0) -> dict[str, float]:
    """`ml.ebdm.evaluate_model` of a loaded model on held-out fossils, with the domain's
    constraint penalty (so `violation_rate` is measured)."""
    import numpy as np
    import torch

    from scf.ml.ebdm import evaluate_model

    x = np.asarray([f.state for f in fossils], dtype=np.float32)
    c = np.asarray([f.context for f in fossils], dtype=np.float32)
    cost = np.asarray([f.energy for f in fossils], dtype=np.float64)
    penalty = None
    try:
        from scf import domains
        from scf.ml.physics import penalty_for

        penalty = penalty_for(domains.get(domain))
    except Exception as exc:  # noqa: BLE001 - an unknown domain evaluates without the physics metrics
        log.warning("no constraint penalty for %s (%s): violation_rate is not measured", domain, exc)
    torch.manual_seed(seed)
    return {k: float(v) for k, v in evaluate_model(model, x, c, cost, penalty, seed=seed).items()}


def judge_code_student(path: Path, cfg: VerifySettings) -> dict[str, float]:
    """A code student's answers to the held-out contracts of `cfg` (`code_heldout`,
    `code_prompts`, `code_samples`, `code_max_new_tokens`; T 0.7, top-p 0.95 as a code model's),
    written by the numpy `student` backend — no torch — and judged by the gate and the sandbox
    like a code model's (`ml.genn.judge_answers`, which needs no torch either). Blocking."""
    from scf.ml import genn as mg
    from scf.producers.genn.student import StudentGenerator

    prompts = mg.heldout_requests(list(cfg.code_heldout), cfg.code_prompts)
    if not prompts:
        raise ValueError("no held-out domains to judge a code student on: set [daemon] checkpoint.code_heldout")
    gen = StudentGenerator(path, temperature=0.7, top_p=0.95, max_new_tokens=cfg.code_max_new_tokens)
    return mg.judge_answers(prompts, gen.answers_many(prompts, cfg.code_samples, 0), workers=cfg.code_workers)


class CheckpointVerifier:
    """`await verifier(event, production)`: fetch, check the digest, load, evaluate both."""

    def __init__(self, bus, settings, config: VerifySettings | None = None) -> None:
        self.bus = bus
        self.settings = settings
        self.config = config or VerifySettings()
        self.cache = Path(settings.path("model_zoo", "verify"))
        self._baseline: dict[tuple[str, int, bool], dict[str, float]] = {}  # (checkpoint, n fossils, decisions) -> metrics
        self._code_baseline: dict[str, dict[str, float]] = {}  # code model (or base sha256) -> metrics on held-out contracts

    async def kind(self, event: ev.CheckpointProduced) -> str:
        """The candidate's model kind (`ebdm`, `optimiser`, `code`), from its artifact's header
        (fetched, digest checked, kept for `__call__`); an EBDM's when it cannot be read (the
        verifier then rejects it with the reason)."""
        c = event.data
        if c.domain == CODE_DOMAIN:
            return CODE
        try:
            path = await self._fetch(c.uri, c.sha256, c.size, f"{subject_token(c.checkpoint_id)}.ckpt")
            from scf.ml.optimize import checkpoint_format

            return kind_of_format(await asyncio.to_thread(checkpoint_format, path), c.domain)
        except Exception as exc:  # noqa: BLE001 - judged (and rejected with the reason) by __call__
            log.warning("checkpoint %s: its kind cannot be read (%s): taken for an EBDM", c.checkpoint_id, exc)
            return EBDM

    async def _fetch(self, uri: str, sha256: str, size: int, name: str) -> Path:
        from scf.bus.artifacts import open_store

        self.cache.mkdir(parents=True, exist_ok=True)
        dest = self.cache / name
        want = sha256.removeprefix("sha256:").lower()
        if dest.is_file() and (await asyncio.to_thread(sha256_file, dest))[0] == want:
            return dest  # fetched before (`kind`, a baseline), digest checked again on the bytes that will be loaded
        store = open_store(self.bus, self.settings)
        path = Path(await store.get(uri, dest, sha256=sha256, size=size or None))  # another size: refused unread
        digest, got = await asyncio.to_thread(sha256_file, path)
        if digest != sha256.removeprefix("sha256:").lower():
            raise ValueError(f"digest mismatch: artifact has sha256 {digest}, the event says {sha256}")
        if size and got != size:
            raise ValueError(f"size mismatch: artifact has {got} bytes, the event says {size}")
        return path

    async def _verify_student(self, event: ev.CheckpointProduced) -> Verification:
        """A ternary student: fetch it and the teacher its lineage names (digest from the
        teacher's own checkpoint.produced), judge both on the same held-out fossils
        (`ml.distill.judge_student`: held-out DSM and energy ranking for an EBDM student, and
        for either kind its decisions against the teacher's on `student_decision_contexts`
        held-out contexts, an EBDM's sampled paired); promoted to `student_alias`, never to
        production."""
        import numpy as np

        from scf.ml.distill import find_produced, judge_student, read_header

        c, cfg = event.data, self.config
        head = await current_promotion(self.bus, c.domain, cfg.student_alias)

        def out(reasons: list[str], metrics=None, teacher_id=None, teacher_metrics=None) -> Verification:
            return Verification(c.checkpoint_id, True, reasons, metrics or {}, teacher_id, teacher_metrics or {}, alias=cfg.student_alias, head=head)

        if head is not None and head.checkpoint_id == c.checkpoint_id:
            return out([])  # already the head of its alias (a redelivery): nothing to judge or publish
        try:
            path = await self._fetch(c.uri, c.sha256, c.size, f"{subject_token(c.checkpoint_id)}.ckpt")
            teacher_id = str((await asyncio.to_thread(read_header, path))["lineage"]["teacher"]["checkpoint_id"])
        except Exception as exc:  # noqa: BLE001 - an untrusted file: whatever breaks is a named rejection
            return out([f"student {c.uri}: {type(exc).__name__}: {exc}"])
        produced = await find_produced(self.bus, teacher_id)
        if produced is None or produced.data.domain != c.domain:
            return out([f"its teacher {teacher_id} has no checkpoint.produced of {c.domain}: a student is judged against its teacher"])
        t = produced.data
        try:
            tpath = await self._fetch(t.uri, t.sha256, t.size, f"{subject_token(t.checkpoint_id)}.ckpt")
        except Exception as exc:  # noqa: BLE001
            return out([f"teacher {t.uri}: {type(exc).__name__}: {exc}"])
        fossils = await heldout_fossils(self.bus, c.domain, cfg.heldout_limit)
        if len(fossils) < cfg.min_heldout:
            return out([f"only {len(fossils)} held-out fossils of {c.domain} (need {cfg.min_heldout}): cannot judge the student"])
        x, cc, e = (np.asarray([getattr(f, k) for f in fossils], dtype=float) for k in ("state", "context", "energy"))
        try:
            metrics, teacher_metrics, reasons = await asyncio.to_thread(
                judge_student, path, tpath, x, cc, e, max_dsm_ratio=cfg.student_max_dsm_ratio, min_rank_corr=cfg.student_min_rank_corr,
                max_decision_pp=cfg.student_max_decision_pp, decision_contexts=cfg.student_decision_contexts,
                decision_rule=cfg.student_decision_rule,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            return out([f"cannot load or judge the student without pickle: {type(exc).__name__}: {exc}"])
        return out(reasons, metrics, t.checkpoint_id, teacher_metrics)

    def _judge_code(self, directory: Path) -> dict[str, float]:
        from scf.ml import genn as mg

        cfg = self.config
        return mg.judge_model(directory, list(cfg.code_heldout), per_domain=cfg.code_prompts, samples=cfg.code_samples,
                              max_new_tokens=cfg.code_max_new_tokens, seed=0, workers=cfg.code_workers)

    def _code_base(self, base_sha256: str) -> Path | None:
        """The code model's base, when this host has it (`code_base`, or the converted offline model) and its digest matches."""
        from scf.ml import genn as mg

        for d in (self.config.code_base, str(self.settings.path("model_zoo", mg.SMOLLM2_DIR))):
            if d and base_sha256 and Path(d).is_dir():
                try:
                    if mg.weights_sha256(Path(d)) == base_sha256:
                        return Path(d)
                except mg.ModelError:
                    continue
        return None

    async def _verify_code_model(self, event: ev.CheckpointProduced, production: ev.Promotion | None) -> Verification:
        """A code model (`scf-code-model/1`, one safetensors file): fetched (digest checked),
        unpacked without pickle, its answers to held-out codegen intents judged by the gate and
        the sandbox; the baseline is production's code model on the same prompts and seeds, or,
        with none, its base model where this host has it (else it is judged alone)."""
        from scf.ml import genn as mg
        from scf.producers.genn.student import is_student_file

        c = event.data
        token = subject_token(c.checkpoint_id)
        try:
            path = await self._fetch(c.uri, c.sha256, c.size, f"{token}.ckpt")
        except Exception as exc:  # noqa: BLE001 - fetched bytes that are not the event's are never read
            return Verification(c.checkpoint_id, False, [f"code model {c.uri}: {type(exc).__name__}: {exc}"])
        if await asyncio.to_thread(is_student_file, path):  # scf-ternary-lm/1: a code student
            return await self._verify_code_student(event, path)
        try:
            head = await asyncio.to_thread(mg.code_model_header, path)
            directory = await asyncio.to_thread(mg.unpack_code_model, path, self.cache / f"{token}.d")
            metrics = await asyncio.to_thread(self._judge_code, directory)
        except Exception as exc:  # noqa: BLE001 - an untrusted file: whatever breaks is a named rejection
            return Verification(c.checkpoint_id, False, [f"code model {c.uri}: {type(exc).__name__}: {exc}"])
        baseline_id, baseline = None, {}
        try:
            if production is not None:
                baseline_id = production.checkpoint_id
                baseline = self._code_baseline.get(baseline_id, {})
                if not baseline:
                    ptoken = subject_token(production.checkpoint_id)
                    ppath = await self._fetch(production.uri, production.sha256, production.size, f"{ptoken}.ckpt")
                    pdir = await asyncio.to_thread(mg.unpack_code_model, ppath, self.cache / f"{ptoken}.d")
                    baseline = self._code_baseline[baseline_id] = await asyncio.to_thread(self._judge_code, pdir)
            else:
                base = await asyncio.to_thread(self._code_base, head["base_sha256"])
                if base is not None:
                    baseline_id = f"base:{head['base_sha256'][:16]}"
                    baseline = self._code_baseline.get(baseline_id, {})
                    if not baseline:
                        baseline = self._code_baseline[baseline_id] = await asyncio.to_thread(self._judge_code, base)
        except Exception as exc:  # noqa: BLE001 - a broken baseline is beaten by any judged candidate
            log.error("the baseline code model %s cannot be judged (%s): judging the candidate on its own", baseline_id, exc)
            baseline = {}
        return Verification(c.checkpoint_id, True, [], metrics, baseline_id if baseline else None, baseline)

    async def _teacher_rates(self, teacher_id: str) -> tuple[ev.CheckpointProduced | None, dict[str, float], str]:
        """A code student's teacher: its checkpoint.produced.genn, and its recorded rates — this
        verifier's judgement of it on held-out contracts (its checkpoint.verified, else
        checkpoint.rejected, the latest), else the rates its checkpoint.produced carries (the
        fine-tuning's evaluation); {} when neither has both rates. And where they came from."""
        from scf.bus.codec import Codec

        token = subject_token(CODE_DOMAIN)
        produced, judged = None, {}
        codec = Codec([ev.CheckpointProduced, ev.CheckpointVerified, ev.CheckpointRejected])
        for subject in (f"checkpoint.produced.{token}", f"checkpoint.rejected.{token}", f"checkpoint.verified.{token}"):
            for msg in await read(self.bus, "CHECKPOINTS", subject):
                e = codec.decode(msg.data)
                if e.data.checkpoint_id != teacher_id:
                    continue
                if isinstance(e, ev.CheckpointProduced):
                    produced = e
                elif all(m in e.data.metrics for m in CODE_STUDENT_RATES):
                    judged = dict(e.data.metrics)  # verified read after rejected: a verification wins
        if judged:
            return produced, judged, "the verifier's judgement"
        if produced is not None and all(m in produced.data.metrics for m in CODE_STUDENT_RATES):
            return produced, dict(produced.data.metrics), "its checkpoint.produced"
        return produced, {}, "none"

    async def _verify_code_student(self, event: ev.CheckpointProduced, path: Path) -> Verification:
        """A code student (`scf-ternary-lm/1`, fetched, digest checked): its teacher is the one its
        job names (`distill-<teacher id>`, as an EBDM student's), which must have a
        checkpoint.produced.genn; judged with the numpy `student` backend on the same held-out
        contracts, samples and judges as a code model (`judge_code_student`), against its
        teacher's recorded rates (`compare_code_student`); promoted to `student_alias`, never to
        production. A teacher without recorded rates: judged on its own."""
        from scf.producers.genn.student import teacher_of

        c, cfg = event.data, self.config
        head = await current_promotion(self.bus, CODE_DOMAIN, cfg.student_alias, CODE)

        def out(reasons: list[str], metrics=None, teacher_id=None, teacher_metrics=None) -> Verification:
            return Verification(c.checkpoint_id, True, reasons, metrics or {}, teacher_id, teacher_metrics or {}, alias=cfg.student_alias, head=head)

        if head is not None and head.checkpoint_id == c.checkpoint_id:
            return out([])  # already the head of its alias (a redelivery): nothing to judge or publish
        teacher_id, teacher = teacher_of(c.job_id), {}
        if teacher_id is not None:
            produced, teacher, source = await self._teacher_rates(teacher_id)
            if produced is None:
                return out([f"its teacher {teacher_id} has no checkpoint.produced of {CODE_DOMAIN}: a student is judged against its teacher"])
            if not teacher:
                log.warning("code student %s: its teacher %s has no recorded gate/sandbox rates: judged on its own", c.checkpoint_id, teacher_id)
            else:
                log.info("code student %s: against its teacher %s's rates (%s)", c.checkpoint_id, teacher_id, source)
        try:
            metrics = await asyncio.to_thread(judge_code_student, path, cfg)
        except Exception as exc:  # noqa: BLE001 - an untrusted file: whatever breaks is a named rejection
            return out([f"code student {c.uri}: {type(exc).__name__}: {exc}"], teacher_id=teacher_id, teacher_metrics=teacher)
        reasons = compare_code_student(metrics, teacher, cfg, f"its teacher {teacher_id}" if teacher_id else "its teacher")
        return out(reasons, metrics, teacher_id, {k: teacher[k] for k in CODE_STUDENT_RATES} if teacher else {})

    async def __call__(self, event: ev.CheckpointProduced, production: ev.Promotion | None) -> Verification:
        c = event.data
        if c.domain == CODE_DOMAIN:  # a code model or a code student (GenN): judged on held-out contracts
            return await self._verify_code_model(event, production)
        if c.job_id.startswith(STUDENT_JOB_PREFIX):  # a ternary student (`scf distill`): judged against its teacher
            return await self._verify_student(event)
        try:
            path = await self._fetch(c.uri, c.sha256, c.size, f"{subject_token(c.checkpoint_id)}.ckpt")
        except Exception as exc:  # noqa: BLE001 - any failure to fetch is a reason to reject, named
            return Verification(c.checkpoint_id, False, [f"artifact {c.uri}: {type(exc).__name__}: {exc}"])
        fossils = await heldout_fossils(self.bus, c.domain, self.config.heldout_limit)
        if len(fossils) < self.config.min_heldout:
            return Verification(
                c.checkpoint_id, False,
                [f"only {len(fossils)} held-out fossils of {c.domain} (need {self.config.min_heldout}): cannot judge the checkpoint"],
            )
        cfg = self.config
        try:
            metrics = await asyncio.to_thread(
                evaluate_file, path, c.domain, fossils, decisions=cfg.ebdm_decisions, decision_contexts=cfg.decision_contexts
            )
        except Exception as exc:  # noqa: BLE001 - an untrusted file: whatever breaks is a named rejection
            return Verification(c.checkpoint_id, False, [f"cannot load or evaluate the checkpoint without pickle: {type(exc).__name__}: {exc}"])
        baseline: dict[str, float] = {}
        if production is not None:
            decide = cfg.ebdm_decisions or DECISION_METRIC in metrics  # judged alike: on decisions if the candidate is
            key = (production.checkpoint_id, len(fossils), decide)
            baseline = self._baseline.get(key, {})
            if not baseline:
                try:
                    bpath = await self._fetch(production.uri, production.sha256, production.size, f"{subject_token(production.checkpoint_id)}.ckpt")
                    baseline = await asyncio.to_thread(
                        evaluate_file, bpath, c.domain, fossils, decisions=decide, decision_contexts=cfg.decision_contexts
                    )
                    self._baseline[key] = baseline
                except Exception as exc:  # noqa: BLE001 - a broken production is beaten by any good candidate
                    log.error("production checkpoint %s cannot be evaluated (%s): judging the candidate on its own", production.checkpoint_id, exc)
                    baseline = {}
            if cfg.decisions and DECISION_METRIC in baseline and DECISION_METRIC not in metrics:
                # an EBDM against a learned optimiser in production: judged on its decisions too
                # (else its DSM, which the optimiser has none of, would replace it unjudged)
                try:
                    metrics = await asyncio.to_thread(
                        evaluate_file, path, c.domain, fossils, decisions=True, decision_contexts=cfg.decision_contexts
                    )
                except Exception as exc:  # noqa: BLE001
                    return Verification(c.checkpoint_id, False, [f"cannot judge the checkpoint's decisions: {type(exc).__name__}: {exc}"])
        return Verification(
            c.checkpoint_id, True, [], metrics, production.checkpoint_id if production else None, baseline
        )


__all__ = [
    "VerifySettings", "Verification", "Verifier", "compare", "compare_code", "CODE_DOMAIN", "decide_promotion", "current_promotion",
    "alias_heads", "alias_head_events", "next_version", "kind_of", "kind_of_format", "EBDM", "OPTIMISER", "CODE", "KINDS",
    "heldout_fossils", "available", "CheckpointVerifier", "evaluate_file", "evaluate_on", "evaluate_optimiser_on",
    "ebdm_decisions_on", "primary_metric", "DECISION_METRIC", "COST_METRIC", "compare_code_student", "CODE_STUDENT_RATES", "judge_code_student",
]
