"""The safety gate's pure decisions: rule files, the regulator, the gear rule, physics."""

from __future__ import annotations

import numpy as np
import pytest

from scf import domains
from scf.bus import events as ev
from scf.bus.errors import ConfigError
from scf.consumers.regulator import DEFAULT_RULES, RuleSet, parse_fact
from scf.consumers.safety import GateView, decide, rule_code, rule_intent, rule_state

RULES = RuleSet.load()


def intent(kind="train", domain="grid:case14", **params):
    return ev.Intent(intent_id=f"{kind}-1", kind=kind, domain=domain, params=params)


def view(gear="STANDARD", **facts):
    return GateView(gear=gear, facts=facts, rules=RULES)


# --------------------------------------------------------------------------- the default rule file


def test_default_rules_load():
    assert RuleSet.load(DEFAULT_RULES).rules and RULES.source.endswith("default.toml")


def test_blackout_denies_grid_optimisation():
    r = RULES.rule("optimise", "grid:case14", {}, {"grid.state": "blackout"})
    assert r.decision == "deny" and r.rules == ("no-grid-optimisation-in-blackout",)
    assert RULES.rule("optimise", "grid:case14", {}, {"grid.state": "normal"}).decision == "allow"
    assert RULES.rule("optimise", "hvac:office3", {}, {"grid.state": "blackout"}).decision == "allow"
    assert RULES.rule("optimise", "grid:case14", {}, {"grid.state": "BLACKOUT "}).decision == "deny"  # facts are text


def test_unknown_intent_kinds_are_denied():
    r = RULES.rule("mine_crypto", "grid:case14", {}, {})
    assert r.decision == "deny" and "default deny" in r.reasons[0] and "'mine_crypto'" in r.reasons[0]


def test_hold_and_numeric_and_per_domain_rules():
    assert RULES.rule("deploy", "grid:case14", {}, {"grid.state": "restoration"}).decision == "hold"
    assert RULES.rule("deploy", "grid:case14", {}, {"grid.frequency_hz": 49.7}).decision == "hold"
    assert RULES.rule("deploy", "grid:case14", {}, {"grid.frequency_hz": "50.01"}).decision == "allow"
    assert RULES.rule("train", "hvac:office3", {}, {"freeze.hvac_office3": True}).decision == "deny"
    assert RULES.rule("train", "hvac:office3", {}, {"freeze.grid_case14": True}).decision == "allow"
    assert RULES.rule("train", "grid:case14", {"hypotheses": 512}, {}).decision == "deny"
    # deny wins over hold whatever the order of the rules
    r = RULES.rule("deploy", "grid:case14", {}, {"grid.state": "blackout", "grid.frequency_hz": 49.0})
    assert r.decision == "deny"


def test_rule_file_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown operator bigger"):
        RuleSet.parse('[[rule]]\nname = "a"\ndecision = "deny"\nwhen = { x = { bigger = 1 } }\n')
    with pytest.raises(ConfigError, match=r"Invalid enum value .maybe. - at `\$.rule\[0\].decision`"):
        RuleSet.parse('[[rule]]\nname = "a"\ndecision = "maybe"\n')
    with pytest.raises(ConfigError, match="unique"):
        RuleSet.parse('[[rule]]\nname = "a"\ndecision = "deny"\n[[rule]]\nname = "a"\ndecision = "allow"\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        RuleSet.parse("[[rule")
    with pytest.raises(ConfigError, match="does not exist"):
        RuleSet.load("/nonexistent/rules.toml")
    with pytest.raises(ConfigError, match="unknown field `when_not`"):
        RuleSet.parse('[[rule]]\nname = "a"\ndecision = "deny"\nwhen_not = {}\n')


def test_missing_facts_only_satisfy_exists_false():
    rules = RuleSet.parse(
        '[[rule]]\nname = "any"\ndecision = "allow"\n'
        '[[rule]]\nname = "unknown-state"\ndecision = "hold"\nwhen = { "grid.state" = { exists = false } }\n'
        '[[rule]]\nname = "not-normal"\ndecision = "deny"\nwhen = { "grid.state" = { ne = "normal" } }\n'
    )
    assert rules.rule("train", "d", {}, {}).decision == "hold"
    assert rules.rule("train", "d", {}, {"grid.state": "normal"}).decision == "allow"
    assert rules.rule("train", "d", {}, {"grid.state": "storm"}).decision == "deny"


def test_fact_values():
    assert parse_fact(b"blackout") == "blackout"
    assert parse_fact(b"49.7") == 49.7 and parse_fact(b"true") is True and parse_fact(b'"x"') == "x"
    assert parse_fact(b"[1, 2]") == "[1, 2]"


# --------------------------------------------------------------------------- gear rule


def test_standard_holds_training_hyper_approves():
    r = rule_intent(view("STANDARD"), intent("train"))
    assert (r.decision, r.gate, r.final) == ("HOLD", "gear", False)
    assert any("scf control approve train-1" in x for x in r.reasons)
    assert rule_intent(view("ACCELERATED"), intent("train")).decision == "APPROVE"
    assert rule_intent(view("ACCELERATED"), intent("deploy")).decision == "HOLD"
    for g in ("HYPER", "SINGULARITY"):
        r = rule_intent(view(g), intent("deploy"))
        assert (r.decision, r.gate, r.final) == ("APPROVE", "regulator", True)


def test_no_gear_overrides_a_deny():
    for g in ("STANDARD", "HYPER", "SINGULARITY"):
        r = rule_intent(view(g, **{"grid.state": "blackout"}), intent("optimise"))
        assert (r.decision, r.gate, r.final) == ("REJECT", "regulator", True)
        assert rule_intent(view(g), intent("exfiltrate")).decision == "REJECT"


def test_regulator_hold_is_not_final():
    r = rule_intent(view("HYPER", **{"grid.state": "restoration"}), intent("deploy"))
    assert (r.decision, r.gate, r.final) == ("HOLD", "regulator", False)


# --------------------------------------------------------------------------- code and states


def test_code_rulings():
    ok = rule_code(view(), ev.CodeProposal(proposal_id="p", intent_id="i", code="import math\nprint(math.pi)"))
    assert ok.decision == "APPROVE" and ok.gate == "ethics"
    bad = rule_code(view(), ev.CodeProposal(proposal_id="p", intent_id="i", code="import os\n\nos.system('x')"))
    assert bad.decision == "REJECT" and bad.reasons[0].startswith("line 1: capability: `import os`: module os is outside the capability set")
    assert "why it matters: line 3: process execution: os.system runs a shell command" in bad.reasons
    js = rule_code(view(), ev.CodeProposal(proposal_id="p", intent_id="i", code="1", language="javascript"))
    assert js.decision == "REJECT"


def test_state_rulings_name_the_constraint_and_its_size():
    d = domains.get("grid:case14")
    c = d.sample_context(np.random.default_rng(1))
    x = d.reference_solution(c)
    ok = rule_state(view(), ev.StateProposal(proposal_id="s", domain=d.name, context=list(c), state=list(x)))
    assert ok.decision == "APPROVE" and ok.gate == "physics"
    short = x.copy()
    short[0] -= 30.0
    bad = rule_state(view(), ev.StateProposal(proposal_id="s", domain=d.name, context=list(c), state=list(short)))
    assert bad.decision == "REJECT"
    assert any("power_balance" in r and "by 30.000 MW" in r for r in bad.reasons), bad.reasons
    ramp = rule_state(view(), ev.StateProposal(proposal_id="s", domain=d.name, context=list(c), state=list(x), previous_state=list(x + 500.0)))
    assert any(r.startswith("bounds:") or "ramp[" in r for r in ramp.reasons)
    wrong = rule_state(view(), ev.StateProposal(proposal_id="s", domain=d.name, context=list(c), state=[1.0]))
    assert wrong.decision == "REJECT" and "expects" in wrong.reasons[0]
    unknown = rule_state(view(), ev.StateProposal(proposal_id="s", domain="grid:mars", context=[], state=[]))
    assert unknown.decision == "REJECT" and "unknown domain" in unknown.reasons[0]


def test_ramp_rate_violation():
    d = domains.get("grid:case14")
    c = d.sample_context(np.random.default_rng(2))
    x = d.reference_solution(c)
    prev = x.copy()
    g = int(np.argmax(d.ramp < (d.state_bounds[1] - d.state_bounds[0])))
    prev[g] = x[g] - d.ramp[g] - 5.0 if x[g] - d.ramp[g] - 5.0 >= d.state_bounds[0][g] else x[g] + d.ramp[g] + 5.0
    r = rule_state(view(), ev.StateProposal(proposal_id="s", domain=d.name, context=list(c), state=list(x), previous_state=list(prev)))
    assert r.decision == "REJECT" and any(f"ramp[{d.state_names[g]}]" in x for x in r.reasons), r.reasons


def test_decide_builds_one_deterministic_verdict():
    e = ev.IntentCreated.new(intent("train"), source="daemon")
    [v] = decide(view("STANDARD"), e)
    assert v.subject() == "verdict.intent.hold" and v.data.kind == "train" and v.data.domain == "grid:case14"
    assert v.causation_id == e.id and decide(view("STANDARD"), e)[0].id == v.id
    [v] = decide(view("HYPER"), e)
    assert v.subject() == "verdict.intent.approve" and v.data.final
