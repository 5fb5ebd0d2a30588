"""Generated code through the safety gate on a real nats-server: code.proposed -> the
capability gate -> the sandbox against the domain's simulator -> a verdict with scores."""

from __future__ import annotations

from pathlib import Path

import pytest

from scf.bus import events as ev
from scf.consumers.safety import GateView, SafetySettings, decide, rule_code
from tests.daemon_support import running_safety
from tests.test_safety import verdict_for

pytestmark = pytest.mark.anyio

BENIGN = Path(__file__).parent / "data" / "codegate" / "benign"
GRID = next(BENIGN.glob("*grid_reserve_aware_0.py")).read_text()
HAS_ERROR = "error" in ev.CodeProposal.__struct_fields__  # GenN's field for a malformed answer
CONFIG = SafetySettings(concurrency=4, sandbox_scenarios=2, sandbox_hours=2)


def proposal(pid: str, code: str, domain: str = "grid:case14", **kw) -> ev.CodeProposed:
    return ev.CodeProposed.new(ev.CodeProposal(proposal_id=pid, intent_id="i-" + pid, code=code, domain=domain, **kw), source="genn")


async def test_code_is_judged_statically_then_scored_in_the_sandbox(bus, settings):
    wrong_shape = GRID.replace("return out.tolist()", "return out.tolist()[:2]")
    escaping = GRID.replace("import numpy as np", "import numpy as np\nimport shutil", 1).replace(
        "left = float(", "shutil.os.system('id')\n        left = float(", 1
    )
    async with running_safety(settings, CONFIG):
        await bus.publish_many([
            proposal("good", GRID),
            proposal("short", wrong_shape),
            proposal("escape", escaping),
            proposal("nocontract", "import math\nx = math.pi\n"),
            *([proposal("malformed", "", error="no code block in the answer")] if HAS_ERROR else []),
            proposal("static-only", "import math\nprint(math.pi)\n", domain=""),
            proposal("nowhere", GRID, domain="grid:case999"),
        ])  # fmt: skip
        good = await verdict_for(bus, "good")
        assert (good.decision, good.gate, good.domain, good.subject_type) == ("APPROVE", "sandbox", "grid:case14", "code")
        assert good.scores["steps"] == 8 and good.scores["scenarios"] == 2 and good.scores["violations"] == 0
        assert good.scores["cost"] < good.scores["baseline_cost"]
        assert any(r.startswith("sandbox (") and "relative 0." in r for r in good.reasons), good.reasons
        short = await verdict_for(bus, "short")
        assert (short.decision, short.gate, short.scores) == ("REJECT", "sandbox", {})
        assert short.reasons[-1].endswith("step 0: the answer has shape (2, 2), expected (2, 5) (scenarios, setpoints)")
        esc = await verdict_for(bus, "escape")
        assert (esc.decision, esc.gate) == ("REJECT", "ethics")
        assert esc.reasons[0].startswith("line 6: capability: `import shutil`: module shutil is outside the capability set")
        nc = await verdict_for(bus, "nocontract")
        assert nc.decision == "REJECT" and any("no class Controller" in r for r in nc.reasons)
        if HAS_ERROR:
            bad = await verdict_for(bus, "malformed")
            assert bad.decision == "REJECT" and bad.reasons == ["the generator's answer is malformed: no code block in the answer"]
        assert (await verdict_for(bus, "static-only")).decision == "APPROVE"
        nowhere = await verdict_for(bus, "nowhere")
        assert nowhere.decision == "REJECT" and "unknown domain 'grid:case999'" in nowhere.reasons[-1]


def test_decide_stays_pure_and_never_runs_code(tmp_path):
    marker = tmp_path / "ran"
    code = GRID.replace("def step(self, observation):", f"def step(self, observation):\n        open({str(marker)!r}, 'w')", 1)
    event = proposal("p", code)
    assert rule_code(GateView(), event.data).decision == "REJECT"
    [v] = decide(GateView(), proposal("q", GRID))  # no sandbox result given: the static ruling only
    assert (v.data.decision, v.data.gate, v.data.scores) == ("APPROVE", "ethics", {})
    assert not marker.exists()
