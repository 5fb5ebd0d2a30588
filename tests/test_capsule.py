"""Capsules offline: built and signed, verified (signature before parsing, artifact hashes,
manifest keys, each row's physics through the gate's own rule_state); `scf verify` and
`scf capsule verify` print every finding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scf.bus.signing import SigningKey, TrustList
from scf.producers import capsule as cap
from scf.producers import contracts
from scf.producers import strike as st
from tests.conftest import cli

SPEC = contracts.spec_of(contracts.parse_doc({"contract_id": "acme", "client": "ACME", "domain": "hvac:office3",
                                              "nodes": ["edge-a"], "constraints": {"T_out": 9.0, "preheat_hours": 3}}))


@pytest.fixture(scope="module")
def solved():
    return st.solve(SPEC, st.StrikeOptions())


def manifest(solved) -> cap.Manifest:
    return cap.Manifest(format=cap.FORMAT, capsule_id="capsule-acme-1", version=1, contract_id="acme", domain=SPEC.domain,
                        activity_id="a1", inputs_sha256="0" * 64, model=solved.model_id,
                        decision=cap.DecisionInfo(hours=solved.hours, contexts=solved.contexts.tolist(), cost=solved.cost))


def keys(settings=None):
    k = SigningKey.generate("release")
    trust = TrustList(path=None) if settings is None else TrustList.load(settings.keys_dir / "trusted.json")
    trust.trust(k.public_b64, "release", ["release"])
    return k, trust


def test_build_and_verify(solved, tmp_path):
    k, trust = keys()
    d = cap.build(tmp_path / "c", manifest(solved), solved.states, k)
    checked = cap.verify(d, trust)
    assert checked.ok and checked.signer == "release" and checked.manifest.decision.cost == pytest.approx(solved.cost)
    # the artifact carries what the edge control loop reads: the decision and its envelope
    from safetensors import safe_open

    with safe_open(str(d / cap.ARTIFACT), framework="numpy") as fh:
        assert fh.get_tensor("decision").shape == (24, 3)
        env = json.loads(fh.metadata()["scf.envelope"])
    assert env == {"comfort_tol_k": 1.5, "comfort_periods": 4, "energy_margin": 0.3, "energy_floor_kwh": 0.5, "energy_window": 4}
    import msgspec

    from scf.consumers.edge.control import Envelope

    msgspec.json.decode(json.dumps(env).encode(), type=Envelope)  # the loop's own struct accepts it


def test_tampering_and_unknown_keys_are_refused(solved, tmp_path):
    k, trust = keys()
    d = cap.build(tmp_path / "c", manifest(solved), solved.states, k)
    # an artifact changed after signing
    art = (d / cap.ARTIFACT).read_bytes()
    (d / cap.ARTIFACT).write_bytes(art[:-1] + bytes([art[-1] ^ 1]))
    assert cap.verify(d, trust).findings == ["artifact model.safetensors: sha256 differs from the signed manifest (altered after signing)"]
    (d / cap.ARTIFACT).write_bytes(art)
    # the manifest changed: the signature fails before anything is parsed
    text = (d / cap.MANIFEST).read_text()
    (d / cap.MANIFEST).write_text(text.replace("version: 1", "version: 9"))
    assert cap.verify(d, trust).findings[0].startswith("signature: bad signature from key")
    # an unknown key, even signed, is refused with its path
    (d / cap.MANIFEST).write_text(text + "surprise: 1\n")
    (d / cap.SIGNATURE).write_text(json.dumps({"kid": k.kid, "sig": k.sign((d / cap.MANIFEST).read_bytes())}))
    [finding] = cap.verify(d, trust).findings
    assert finding.endswith("manifest.yaml: Object contains unknown field `surprise` (rebuild it with `scf capsule build`)")
    with pytest.raises(cap.CapsuleError, match=r"unknown field `colour` - at `\$.monitor`"):
        cap.parse_manifest(text.replace("monitor:\n", "monitor:\n  colour: red\n"))
    # signed by a key without the release role
    other = SigningKey.generate("op")
    trust.trust(other.public_b64, "op", ["operator"])
    (d / cap.MANIFEST).write_text(text)
    (d / cap.SIGNATURE).write_text(json.dumps({"kid": other.kid, "sig": other.sign(text.encode())}))
    assert "lacks the 'release' role" in cap.verify(d, trust).findings[0]


def test_a_decision_the_gate_refuses_is_a_finding(solved, tmp_path):
    k, trust = keys()
    bad = solved.states.copy()
    bad[12] = [12.0, 6.0, 8.0]  # full heat at noon: beyond the occupied band's top
    d = cap.build(tmp_path / "c", manifest(solved), bad, k)
    findings = cap.verify(d, trust).findings
    assert findings and all(f.startswith("hour 12: comfort[") and "above the occupied band 21.0-24.0 °C" in f for f in findings)


def test_verify_commands(solved, settings, tmp_path):
    env = {"SCF_HOME": str(settings.home_path), "NATS_URL": settings.url}
    k, _ = keys(settings)
    trust = TrustList.load(settings.keys_dir / "trusted.json")
    trust.trust(k.public_b64, "release", ["release"])
    trust.save()
    d = cap.build(tmp_path / "c", manifest(solved), solved.states, k)
    r = cli("capsule", "verify", str(d), env=env)
    assert r.returncode == 0 and r.stdout.startswith("OK: capsule-acme-1 v1 for contract acme (hvac:office3), signed by release")
    r = cli("verify", str(d), env=env)
    assert r.returncode == 0 and "capsule: APPROVE (capsule)" in r.stdout
    assert "deploy: HOLD (gear, not final)" in r.stdout and "gear STANDARD needs a human for deploy intents" in r.stdout
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"domain": "hvac:office3", "context": solved.contexts[3].tolist(), "state": [1, 1, 1000]}))
    r = cli("verify", str(state), env=env)
    assert r.returncode == 1
    assert r.stdout.splitlines() == ["state: REJECT (physics)", "  - bounds: state[u[south_office]] = 1000 is above its bound 8"]
    state.write_text("{")
    r = cli("verify", str(state), env=env)
    assert r.returncode == 1 and r.stderr.startswith(f"Error: {state}: not a readable state JSON")
    assert np.isfinite(solved.states).all()
