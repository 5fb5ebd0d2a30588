"""The safety gate as a process on a real nats-server: verdicts on intents (rules and
context facts, the gear), code proposals and proposed states."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import replace

import numpy as np
import pytest

from scf import domains
from scf.bus import codec, gears
from scf.bus import events as ev
from scf.consumers.regulator import RuleSet
from scf.consumers.safety import DecidePool, DecideWorkerError, GateView, SafetySettings, decide, decide_workers, rule_code
from tests.conftest import spawn, wait_for
from tests.daemon_support import events, running_safety, wait_events

pytestmark = pytest.mark.anyio


def intent(i: str, kind: str = "train", domain: str = "grid:case14") -> ev.IntentCreated:
    return ev.IntentCreated.new(ev.Intent(intent_id=i, kind=kind, domain=domain), source="test")


async def verdict_for(bus, subject_id: str) -> ev.Verdict:
    found: list[ev.Verdict] = []

    async def seen() -> bool:
        found[:] = [e.data for e in await events(bus, "VERDICTS", "verdict.>") if e.data.subject_id == subject_id]
        return bool(found)

    await wait_for(seen, 20, f"a verdict on {subject_id}")
    assert len(found) == 1, found
    return found[0]


# the gate with `decide` in the loop (0) and in two forked decide workers (2)
WORKERS = [pytest.param(0, id="in-loop"), pytest.param(2, id="2-workers")]


@pytest.mark.parametrize("workers", WORKERS)
async def test_rules_and_context_facts(bus, settings, workers):
    context = await bus.kv("scf_context")
    await context.put("grid.state", b"blackout")
    async with running_safety(settings, SafetySettings(concurrency=4, decide_workers=workers)) as gate:
        if workers:
            await wait_for(lambda: gate.pool is not None, 20, "the gate's decide workers")
        assert gate.view.facts["grid.state"] == "blackout"
        await bus.publish_many([intent("opt-1", "optimise"), intent("opt-2", "optimise", "hvac:office3"), intent("odd-1", "mine_crypto")])
        v = await verdict_for(bus, "opt-1")
        assert (v.decision, v.gate, v.final) == ("REJECT", "regulator", True)
        assert "blackout" in v.reasons[0]
        assert (await verdict_for(bus, "opt-2")).decision == "APPROVE"
        odd = await verdict_for(bus, "odd-1")
        assert odd.decision == "REJECT" and "default deny" in odd.reasons[0]

        await context.put("grid.state", b"normal")  # the gate watches the bucket
        await wait_for(lambda: gate.view.facts.get("grid.state") == "normal", 10, "the new fact")
        await bus.publish(intent("opt-3", "optimise"))
        assert (await verdict_for(bus, "opt-3")).decision == "APPROVE"


@pytest.mark.parametrize("workers", WORKERS)
async def test_gear_decides_who_approves(bus, settings, workers):
    async with running_safety(settings, SafetySettings(concurrency=4, decide_workers=workers)) as gate:
        if workers:
            await wait_for(lambda: gate.pool is not None, 20, "the gate's decide workers")
        await bus.publish(intent("t-std"))
        v = await verdict_for(bus, "t-std")
        assert (v.decision, v.gate, v.final, v.kind, v.domain) == ("HOLD", "gear", False, "train", "grid:case14")
        await gears.write_gear(bus, gears.GearState(gear="HYPER"))
        await wait_for(lambda: gate.view.gear == "HYPER", 10, "the gate to see HYPER")
        await bus.publish_many([intent("t-hyper"), intent("d-hyper", "deploy")])
        assert (await verdict_for(bus, "t-hyper")).decision == "APPROVE"
        assert (await verdict_for(bus, "d-hyper")).decision == "APPROVE"
        await gears.write_gear(bus, gears.GearState(gear="ACCELERATED"))
        await wait_for(lambda: gate.view.gear == "ACCELERATED", 10, "the gate to see ACCELERATED")
        await bus.publish_many([intent("t-acc"), intent("d-acc", "deploy")])
        assert (await verdict_for(bus, "t-acc")).decision == "APPROVE"
        assert (await verdict_for(bus, "d-acc")).decision == "HOLD"
        assert not workers or gate.pool.asked == 5  # ruled by the workers


async def test_code_and_state_proposals(bus, settings):
    d = domains.get("grid:case14")
    c = d.sample_context(np.random.default_rng(3))
    x = d.reference_solution(c)
    over = x.copy()
    over[-1] += 40.0
    async with running_safety(settings):
        await bus.publish_many([
            ev.CodeProposed.new(ev.CodeProposal(proposal_id="code-bad", intent_id="i", code="import numpy as np\nimport os\nos.popen('id')"), source="gen"),
            ev.CodeProposed.new(ev.CodeProposal(proposal_id="code-ok", intent_id="i", code="import numpy as np\nprint(np.ones(3).sum())"), source="gen"),
            ev.StateProposed.new(ev.StateProposal(proposal_id="state-ok", domain=d.name, context=c.tolist(), state=x.tolist()), source="opt"),
            ev.StateProposed.new(ev.StateProposal(proposal_id="state-bad", domain=d.name, context=c.tolist(), state=over.tolist()), source="opt"),
        ])
        bad = await verdict_for(bus, "code-bad")
        assert (bad.decision, bad.gate, bad.subject_type) == ("REJECT", "ethics", "code")
        assert bad.reasons[0].startswith("line 2: capability: `import os`: module os is outside the capability set")
        assert bad.reasons[-1] == "why it matters: line 3: process execution: os.popen runs a shell command"
        assert (await verdict_for(bus, "code-ok")).decision == "APPROVE"
        assert (await verdict_for(bus, "state-ok")).decision == "APPROVE"
        sb = await verdict_for(bus, "state-bad")
        assert (sb.decision, sb.gate, sb.domain) == ("REJECT", "physics", "grid:case14")
        assert any("power_balance" in r and "40.000 MW" in r for r in sb.reasons), sb.reasons
    rejects = await events(bus, "VERDICTS", "verdict.code.reject")
    assert len(rejects) == 1 and rejects[0].subject() == "verdict.code.reject"


class _FailingRules:
    """The default rules, failing on intents of kind "boom" (a bug in a rule)."""

    source = "<test>"

    def __init__(self) -> None:
        self.rules = RuleSet.load()

    def rule(self, kind, domain, params, facts):
        if kind == "boom":
            raise ValueError("a rule failed on boom")
        return self.rules.rule(kind, domain, params, facts)


def _proposals() -> list[ev.Event]:
    d = domains.get("grid:case14")
    c = d.sample_context(np.random.default_rng(5))
    x = d.reference_solution(c)
    return [
        intent("p-train"), intent("p-deploy", "deploy"), intent("p-opt", "optimise"), intent("p-odd", "mine_crypto"),
        ev.CodeProposed.new(ev.CodeProposal(proposal_id="p-bad", intent_id="i", code="import subprocess\nsubprocess.run(['id'])"), source="gen"),
        ev.CodeProposed.new(ev.CodeProposal(proposal_id="p-ok", intent_id="i", code="import numpy as np\nprint(np.ones(3).sum())"), source="gen"),
        ev.StateProposed.new(ev.StateProposal(proposal_id="p-state", domain=d.name, context=c.tolist(), state=x.tolist()), source="opt"),
        ev.StateProposed.new(ev.StateProposal(proposal_id="p-over", domain=d.name, context=c.tolist(), state=(x + 30).tolist()), source="opt"),
    ]


async def test_decide_workers_rule_as_the_loop_does():
    view = GateView(gear="STANDARD", facts={"grid.state": "normal"}, rules=_FailingRules())
    pool = await DecidePool(view, 2, "test").start()
    try:
        evs = _proposals()
        got = await asyncio.gather(*(pool.decide(view, codec.encode(e)) for e in evs))
        assert [[v.data for v in out] for out in got] == [[v.data for v in decide(view, e, source="test")] for e in evs]
        assert {v[0].data.decision for v in got} == {"APPROVE", "REJECT", "HOLD"}
        # the static ruling of code that names a domain (the gate then runs the sandbox itself)
        for code in ("import numpy as np\nimport os\n", "class Controller:\n    def act(self, obs):\n        return obs\n"):
            p = ev.CodeProposed.new(ev.CodeProposal(proposal_id="p-dom", intent_id="i", domain="grid:case14", code=code), source="gen")
            assert await pool.static(view, codec.encode(p)) == rule_code(view, p.data)

        # each message is ruled on the view it was handed over under, whatever came after
        hyper = replace(view, gear="HYPER", facts={"grid.state": "blackout"})
        train, opt = codec.encode(intent("v-train")), codec.encode(intent("v-opt", "optimise"))
        before, after, blackout, normal = await asyncio.gather(
            pool.decide(view, train), pool.decide(hyper, train), pool.decide(hyper, opt), pool.decide(view, opt))
        assert (before[0].data.decision, after[0].data.decision) == ("HOLD", "APPROVE")
        assert (blackout[0].data.decision, normal[0].data.decision) == ("REJECT", "APPROVE")

        # a ruling that fails raises in the handler what it raises in the loop
        with pytest.raises(ValueError, match="^a rule failed on boom$"):
            await pool.decide(view, codec.encode(intent("b-1", "boom")))
        with pytest.raises(ValueError, match="^a rule failed on boom$"):
            decide(view, intent("b-1", "boom"))

        # a worker that dies fails the rulings it holds (the runner retries them); the pool
        # goes on with the others, and says when none is left
        held = [asyncio.ensure_future(pool.decide(view, codec.encode(e))) for e in evs * 4]
        await asyncio.sleep(0)  # handed over: each worker holds some
        first, second = pool._procs
        assert first.pending and second.pending
        os.kill(first.pid, signal.SIGKILL)
        results = await asyncio.gather(*held, return_exceptions=True)
        lost = [r for r in results if isinstance(r, BaseException)]
        assert lost and all(isinstance(r, DecideWorkerError) and "killed by signal 9" in str(r) for r in lost), lost
        assert pool.alive and not first.alive
        again = await pool.decide(view, codec.encode(evs[0]))
        assert again[0].data == decide(view, evs[0], source="test")[0].data
        os.kill(second.pid, signal.SIGKILL)
        await wait_for(lambda: not pool.alive, 10, "the pool to see its last worker gone")
    finally:
        await pool.close()
    assert all(w.exit for w in pool._procs)  # reaped

    # a gate that goes without closing its pool (its tasks cancelled) takes its workers along
    pool = await DecidePool(view, 2, "test").start()
    for w in pool._procs:
        w.task.cancel()
    await asyncio.gather(*(w.task for w in pool._procs), return_exceptions=True)
    assert [w.exit for w in pool._procs] == ["killed by signal 9"] * 2


async def test_gate_rules_in_the_loop_when_its_workers_are_gone(bus, settings):
    assert decide_workers(SafetySettings(concurrency=1, decide_workers=2)) == 0  # concurrency 1 keeps order: in the loop
    async with running_safety(settings, SafetySettings(concurrency=4, decide_workers=2)) as gate:
        await wait_for(lambda: gate.pool is not None, 20, "the gate's decide workers")
        await bus.publish(intent("w-1", "deploy"))
        assert (await verdict_for(bus, "w-1")).decision == "HOLD"
        for w in gate.pool._procs:
            os.kill(w.pid, signal.SIGKILL)
        await wait_for(lambda: not gate.pool.alive, 10, "the gate to see its workers gone")
        await bus.publish_many([intent("w-2", "deploy"), intent("w-3", "mine_crypto")])
        assert (await verdict_for(bus, "w-2")).decision == "HOLD"
        assert (await verdict_for(bus, "w-3")).decision == "REJECT"


async def test_scf_run_safety_process(bus, settings, scf_env, tmp_path):
    proc = spawn([sys.executable, "-m", "scf.cli.main", "run", "safety"], scf_env, tmp_path / "safety.log")
    try:
        await bus.publish(intent("cli-1", "deploy"))
        [v] = await wait_events(bus, "VERDICTS", "verdict.intent.hold", 1, timeout=40)
        assert v.data.subject_id == "cli-1"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "safety.log").read_text()[-2000:]


async def test_safety_cli_tools(bus, settings, scf_env, tmp_path):
    from tests.conftest import cli

    r = await asyncio.to_thread(cli, "safety", "context", "grid.state", "blackout", env=scf_env)
    assert r.returncode == 0, r.stderr
    r = await asyncio.to_thread(cli, "safety", "context", env=scf_env)
    assert "grid.state = blackout" in r.stdout
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nos.system('id')\n")
    r = await asyncio.to_thread(cli, "safety", "check-code", str(bad), env=scf_env)
    assert r.returncode == 1 and f"{bad}:2: process execution: os.system runs a shell command" in r.stdout
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nname = "x"\ndecision = "perhaps"\n')
    r = await asyncio.to_thread(cli, "safety", "check-rules", str(rules), env=scf_env)
    assert r.returncode == 1 and r.stderr.startswith(f"Error: {rules}: Invalid enum value 'perhaps'")
    r = await asyncio.to_thread(cli, "safety", "held", env=scf_env)
    assert r.returncode == 0 and "nothing is waiting for a human" in r.stdout
