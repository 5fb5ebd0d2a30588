"""Capsules: signed, versioned bundles a strike deploys (docs/value-loop.md).

A capsule is a directory:

    manifest.yaml      what it is: contract, domain, the decision and its certificate, the
                       model that produced it, the safety envelope, the runtime monitor's
                       thresholds, the M&V baseline, and the sha256 of every artifact
    model.safetensors  the artifact the edge agent installs: the `decision` tensor (one row
                       per hour of the day) with metadata `scf.envelope` (the envelope and
                       monitor thresholds as the edge control loop reads them) and
                       `scf.capsule` (the manifest's text)
    capsule.sig        {"kid", "sig"}: Ed25519 (release key) over the manifest's bytes

The manifest lists the artifacts' hashes, so its signature covers them. Unknown manifest
keys are refused with their path. `verify` checks the signature, the hashes, the manifest
and the decision against the safety gate's physical checks (the same `rule_state` the
running gate calls); `deploy` uploads the artifact and publishes a signed
`checkpoint.promoted` plus the deploy intent, so the existing planner and edge agents carry
it (verify before activate, atomic switch, history, rollback).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import msgspec

from scf.bus.errors import SCFError
from scf.bus.files import InputTooLarge, load_yaml, read_bounded

FORMAT = "scf-capsule/1"
MANIFEST = "manifest.yaml"
MAX_MANIFEST = 1 << 20  # bytes: a manifest is a page of YAML; a larger file is refused unread
ARTIFACT = "model.safetensors"
SIGNATURE = "capsule.sig"
ALIAS = "capsule"  # the promotion alias capsules are published under (the planner's own aliases stay untouched)


class CapsuleError(SCFError):
    """A capsule that cannot be built, read or trusted: the message says which and the fix."""


class DecisionInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: str = "decision"  # a `decision` tensor (rows: hours of the day)
    hours: list[int] = []
    contexts: list[list[float]] = []  # the context each row was decided for (the gate checks the row in it)
    state_names: list[str] = []
    method: str = "exact"
    cost: float = 0.0  # summed over the rows
    lower_bound: float = 0.0  # summed certified lower bounds
    rel_gap: float = 0.0  # the worst row's certified relative gap


class SafetyEnvelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    u_min_kw: list[float] | None = None
    u_max_kw: list[float] | None = None
    ramp_kw: list[float] | None = None


class MonitorThresholds(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The edge runtime monitor's breach rules (consumers/edge/control.py `Envelope`)."""

    comfort_tol_k: float = 1.5
    comfort_periods: int = 4
    energy_margin: float = 0.3
    energy_floor_kwh: float = 0.5
    energy_window: int = 4


class MvBaseline(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    method: str = "ipmvp-option-d"  # calibrated simulation of the status quo (domains/mv.py)
    baseline: str = "status-quo:thermostat"
    confidence: float = 0.9
    report_hours: float = 24.0


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: str
    capsule_id: str
    version: int
    contract_id: str
    domain: str
    activity_id: str
    inputs_sha256: str
    model: str  # what produced the decision: "highs" (exact) or a checkpoint id
    decision: DecisionInfo
    envelope: SafetyEnvelope = SafetyEnvelope()
    monitor: MonitorThresholds = MonitorThresholds()
    mv: MvBaseline = MvBaseline()
    artifacts: dict[str, str] = {}  # name -> sha256 hex


def edge_envelope(m: Manifest) -> dict[str, Any]:
    """The adapter to the edge control loop: its `Envelope` (scf.envelope metadata) is the
    manifest's envelope and monitor thresholds together."""
    out = {k: v for k, v in msgspec.to_builtins(m.envelope).items() if v is not None}
    out.update(msgspec.to_builtins(m.monitor))
    return out


def manifest_text(m: Manifest) -> str:
    import yaml

    return yaml.safe_dump(msgspec.to_builtins(m), sort_keys=True)


def parse_manifest(text: str | bytes, where: str = MANIFEST) -> Manifest:
    import yaml

    try:
        raw = load_yaml(text)
    except (yaml.YAMLError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
        raise CapsuleError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    try:
        m = msgspec.convert(raw, Manifest)
    except msgspec.ValidationError as exc:
        raise CapsuleError(f"{where}: {exc} (rebuild it with `scf capsule build`)") from None
    if m.format != FORMAT:
        raise CapsuleError(f"{where}: format {m.format!r} is not {FORMAT}: this SCF reads {FORMAT} only")
    return m


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out: Path, manifest: Manifest, decision, key) -> Path:
    """Write the capsule to `out` (a new or empty directory), signed with `key`."""
    import numpy as np
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d = np.asarray(decision, dtype=np.float32)
    if d.ndim != 2 or not np.isfinite(d).all():
        raise CapsuleError(f"a capsule's decision is a finite (rows, state) array, got shape {list(d.shape)}")
    unsigned = msgspec.structs.replace(manifest, artifacts={})
    meta = {"scf.envelope": json.dumps(edge_envelope(manifest)), "scf.capsule": manifest_text(unsigned), "format": FORMAT}
    save_file({"decision": d}, str(out / ARTIFACT), metadata=meta)
    signed = msgspec.structs.replace(manifest, artifacts={ARTIFACT: _sha(out / ARTIFACT)})
    text = manifest_text(signed).encode()
    (out / MANIFEST).write_bytes(text)
    (out / SIGNATURE).write_text(json.dumps({"kid": key.kid, "sig": key.sign(text)}) + "\n")
    return out


class Checked(msgspec.Struct, frozen=True, kw_only=True):
    manifest: Manifest | None
    signer: str | None
    findings: list[str]  # empty: the capsule holds

    @property
    def ok(self) -> bool:
        return not self.findings


def verify(directory: Path, trust, *, physics: bool = True) -> Checked:
    """Every finding against the capsule at `directory` (none: it holds). The signature is
    checked on the manifest's bytes before they are parsed."""
    directory = Path(directory)
    findings: list[str] = []
    odd = [n for n in (MANIFEST, SIGNATURE) if (directory / n).is_symlink() or ((directory / n).exists() and not (directory / n).is_file())]
    if odd:  # a FIFO would block the read; a link can be retargeted after the check
        return Checked(manifest=None, signer=None, findings=[f"{directory}: {odd[0]} is not a regular file; rebuild the capsule with `scf capsule build`"])
    try:
        text = read_bounded(directory / MANIFEST, MAX_MANIFEST, "capsule manifest")
        sig = json.loads(read_bounded(directory / SIGNATURE, MAX_MANIFEST, "capsule signature"))
    except InputTooLarge as exc:
        return Checked(manifest=None, signer=None, findings=[str(exc)])
    except (OSError, ValueError, RecursionError) as exc:
        return Checked(manifest=None, signer=None, findings=[f"{directory}: not a capsule ({str(exc)[:120]}); build one with `scf capsule build`"])
    if not isinstance(sig, dict):
        return Checked(manifest=None, signer=None, findings=[f"{directory}: {SIGNATURE} is not a JSON object; build the capsule with `scf capsule build`"])
    try:
        signer = trust.verify(text, sig.get("sig"), sig.get("kid"), role="release")
    except SCFError as exc:
        return Checked(manifest=None, signer=None, findings=[f"signature: {exc}"])
    try:
        m = parse_manifest(text, str(directory / MANIFEST))
    except CapsuleError as exc:
        return Checked(manifest=None, signer=signer, findings=[str(exc)])
    for name, want in sorted(m.artifacts.items()):
        p = directory / name
        if not p.is_file() or "/" in name or name.startswith("."):
            findings.append(f"artifact {name}: missing")
        elif p.is_symlink():
            findings.append(f"artifact {name}: a symlink, not the file itself (it can be retargeted after the check)")
        elif _sha(p) != want:
            findings.append(f"artifact {name}: sha256 differs from the signed manifest (altered after signing)")
    if ARTIFACT not in m.artifacts:
        findings.append(f"the manifest lists no {ARTIFACT}")
    if not findings and physics:
        findings += check_decision(m, load_decision(directory / ARTIFACT))
    return Checked(manifest=m, signer=signer, findings=findings)


def load_decision(path: Path):
    from safetensors.numpy import load_file

    return load_file(str(path))["decision"]


def check_decision(m: Manifest, decision) -> list[str]:
    """The safety gate's physical checks (`consumers.safety.rule_state`, the running gate's
    code) on every row of the decision, in the context it was decided for."""
    from scf.producers.compliance import check_state

    if len(m.decision.contexts) != len(decision):
        return [f"the manifest gives {len(m.decision.contexts)} contexts for {len(decision)} decision rows"]
    findings = []
    for row, hour, context in zip(decision, m.decision.hours or range(len(decision)), m.decision.contexts):
        ruling = check_state(m.domain, context, [float(x) for x in row])
        if ruling.decision != "APPROVE":
            findings += [f"hour {hour}: {r}" for r in ruling.reasons]
    return findings
