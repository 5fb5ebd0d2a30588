"""`scf verify`: the safety gate's rules and physical checks, offline (docs/value-loop.md).

The same functions the running gate calls (`scf.consumers.safety.rule_state`,
`rule_intent`, `rule_code`) on a proposed state, a deploy intent or a capsule, without a
bus: every finding is returned, nothing is published. The strike loop calls `check_state`
before it proposes anything, so a decision the gate would refuse never reaches the log.
"""

from __future__ import annotations

import json
from pathlib import Path

from scf.bus import events as ev
from scf.bus.errors import SCFError
from scf.consumers.safety import GateView, Ruling, rule_intent, rule_state


class ComplianceError(SCFError):
    """Input `scf verify` cannot read: the message names it and the fix."""


def check_state(domain: str, context, state, previous=None) -> Ruling:
    """The gate's physical ruling on one proposed state (bounds, constraints, ramps)."""
    proposal = ev.StateProposal(proposal_id="offline", domain=domain, context=[float(x) for x in context],
                                state=[float(x) for x in state],
                                previous_state=None if previous is None else [float(x) for x in previous])
    return rule_state(GateView(), proposal)


def check_deploy(domain: str, params: dict, gear: str = "STANDARD", facts: dict | None = None) -> Ruling:
    """The regulator's and the gear's ruling on a deploy intent for `domain`."""
    intent = ev.Intent(intent_id="offline", kind="deploy", domain=domain, params=params, gear=gear)  # type: ignore[arg-type]
    return rule_intent(GateView(gear=gear, facts=facts or {}), intent)


def verify_file(path: Path, trust=None, gear: str = "STANDARD") -> list[tuple[str, Ruling]]:
    """Every ruling on `path`: a capsule directory (signature, hashes, each decision row's
    physics, and the deploy rule at `gear`) or a state JSON {domain, context, state,
    previous?}."""
    path = Path(path)
    if path.is_dir():
        from scf.producers import capsule

        if trust is None:
            raise ComplianceError("checking a capsule needs the trust list ($SCF_HOME/keys/trusted.json)")
        checked = capsule.verify(path, trust)
        out = [("capsule", Ruling("APPROVE" if checked.ok else "REJECT", "capsule",
                                  checked.findings or [f"signed by {checked.signer}; artifacts match the manifest; every row holds"]))]
        if checked.manifest is not None:
            out.append(("deploy", check_deploy(checked.manifest.domain, {"capsule_id": checked.manifest.capsule_id}, gear)))
        return out
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ComplianceError(f"{path}: not a readable state JSON ({exc}); give {{\"domain\", \"context\", \"state\"}} or a capsule directory") from None
    if not isinstance(raw, dict) or not {"domain", "context", "state"} <= set(raw):
        raise ComplianceError(f"{path}: a state JSON needs domain, context and state")
    try:
        return [("state", check_state(str(raw["domain"]), raw["context"], raw["state"], raw.get("previous")))]
    except (TypeError, ValueError) as exc:
        raise ComplianceError(f"{path}: context, state and previous are lists of numbers ({exc})") from None
