"""The strike loop end to end with real processes: `scf run safety`, `scf run deploy` and two
`scf run edge` agents on a real nats-server. Two contracts, a strike each (held for a human
at STANDARD, resumed once approved), capsules deployed to the two agents, measured on the
simulated site by the edge control loop (runtime monitor and M&V); the proofs verify,
offline and against the log; changing any field of a proof makes `scf proof verify` fail;
re-running never deploys twice; the contract whose constraints misdescribe its site is
reverted by the runtime monitor; the regiment strikes both again when a model is promoted."""

from __future__ import annotations

import asyncio
import copy
import json

import pytest

from scf.bus.client import Bus
from scf.producers import contracts, regiment
from scf.producers import strike as st
from tests.conftest import cli, stream_count, wait_for
from tests.test_deploy_helpers import Keys, approve, logs, make_model, node_runs, promotion, publish_raw, start_edge, start_process, stop

pytestmark = pytest.mark.anyio

ACME = {"contract_id": "acme", "client": "ACME", "domain": "hvac:office3", "nodes": ["edge-a"],
        "constraints": {"T_out": 9.0, "preheat_hours": 3}, "schedule_s": 0}
# Its engineer wrote a warm site (zones at 23.5 °C, 19 °C outside): the optimum is to do
# nothing, the gate agrees in that context, the real site is colder: the monitor reverts.
GLOBEX = {"contract_id": "globex", "client": "Globex", "domain": "hvac:office3", "nodes": ["edge-b"],
          "constraints": {"T_out": 19.0, "T0": [23.5, 23.5, 23.5]}, "schedule_s": 0}
OPTS = st.StrikeOptions(measure="sim", wait_s=30.0, sim_hours=48.0, history_hours=24.0)
LIVE = st.StrikeOptions(measure="live", wait_s=60.0)
# the edge agents' simulated buildings: a day of status-quo history, then they hold for a
# model and run a day under it, measured (IPMVP Option D) and signed by the node
EDGE_CONTROL = """
[edge.control]
domain = "hvac:office3"
sim_hours = 48
min_history_hours = 24
report_hours = 24
hold_for_model = true
"""


def leaves(obj, path=()):
    """Every (path, value) of a JSON tree's leaves."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, path + (i,))
    else:
        yield path, obj


def tampered(proof: dict, path) -> dict:
    out = copy.deepcopy(proof)
    node = out
    for p in path[:-1]:
        node = node[p]
    v = node[path[-1]]
    node[path[-1]] = (not v) if isinstance(v, bool) else (v + 1 if isinstance(v, (int, float)) else ("x" if v is None else str(v) + "x"))
    return out


async def strike_approved(bus, settings, keys, c, opts=OPTS):
    """Strike; when held for a human, approve the deploy intent and strike again."""
    first = await st.strike(bus, settings, c.spec, key=keys.release, trust=keys.trust, opts=opts, contract_seq=c.seq,
                            contract_event_id=c.event_id)
    if first.status != "awaiting-approval":
        return first, first
    await bus.publish(approve(first.intent_id))
    second = await st.strike(bus, settings, c.spec, key=keys.release, trust=keys.trust, opts=opts, contract_seq=c.seq,
                             contract_event_id=c.event_id)
    return first, second


@pytest.mark.slow
async def test_two_contracts_strike_deploy_measure_and_prove(bus, settings, scf_env, tmp_path):
    keys = Keys(settings)
    for n in ("edge-a", "edge-b"):
        keys.node(n)
    logd = tmp_path / "logs"
    logd.mkdir()
    with open(settings.home_path / "scf.toml", "a") as fh:
        fh.write(EDGE_CONTROL)
    procs = [start_edge(scf_env, n, tmp_path / n, logd, {"domain": "hvac:office3", "plant": "sim"}) for n in ("edge-a", "edge-b")]
    procs += [start_process(scf_env, n, logd) for n in ("safety", "deploy", "archive")]
    try:
        await wait_for(lambda: node_runs(bus, "edge-a", None), 40, "edge-a to register")
        await wait_for(lambda: node_runs(bus, "edge-b", None), 40, "edge-b to register")
        op = await Bus.connect(settings, "operator", key=keys.operator)  # contracts are signed by an operator key
        try:
            for doc in (ACME, GLOBEX):
                await contracts.add(op, contracts.parse_doc(doc))
        finally:
            await op.close()
        cs = await contracts.load(bus)

        # 1. ACME: held for a human at STANDARD (nothing deployed), then approved and resumed.
        held, a = await strike_approved(bus, settings, keys, cs["acme"], LIVE)
        assert held.status == "awaiting-approval" and held.intent_id and "scf control approve" in held.detail
        assert a.activity_id == held.activity_id and a.status == "measured", (a.status, a.detail)
        assert await node_runs(bus, "edge-a", a.proof["capsule"]["capsule_id"])
        periods = a.proof["mv"]["periods"]  # measured by edge-a's control loop on its building, signed by its key
        assert [p["node"] for p in periods] == ["edge-a"] and a.proof["mv"]["mode"] == "live"
        assert all(p["uncertainty_kwh"] is not None and p["cv_rmse"] < 0.3 for p in periods)
        roles = [e["role"] for e in a.proof["events"]]
        assert roles.count("state") == 24 and roles.count("verdict") == 25  # 24 states and the deploy intent's final approval
        assert {"contract", "promotion", "intent", "order", "deployment", "measurement"} <= set(roles)
        cert = a.proof["decision"]
        assert cert["lower_bound"] <= cert["cost"] + 1e-6 and cert["rel_gap"] < 1e-6

        # 2. The same contract and inputs: the same activity, nothing deployed again.
        orders = await stream_count(bus, "DEPLOY", "deploy.requested.>")
        again = await st.strike(bus, settings, cs["acme"].spec, key=keys.release, trust=keys.trust, opts=LIVE,
                                contract_seq=cs["acme"].seq, contract_event_id=cs["acme"].event_id)
        assert again.resumed and again.activity_id == a.activity_id and again.status == "measured"
        assert await stream_count(bus, "DEPLOY", "deploy.requested.>") == orders

        # 3. GLOBEX: deployed to edge-b, and the runtime monitor reverts it on the simulated site.
        _, g = await strike_approved(bus, settings, keys, cs["globex"], LIVE)
        assert g.status == "reverted", (g.status, g.detail)
        assert any(r.startswith("edge-b: envelope breach: comfort") for r in g.proof["mv"]["reverts"]), g.proof["mv"]
        assert "rollback" in [e["role"] for e in g.proof["events"]]
        # the same capsule on the simulated site in this process: the same verdict from the monitor
        sim = await asyncio.to_thread(st.simulate_capsule, g.proof_path.parent / "capsule", "hvac:office3", OPTS)
        assert any(r.startswith("envelope breach: comfort") for r in sim["reverts"])

        # 4. The proofs verify offline and against the log; any field changed fails.
        for r in (a, g):
            body = st.verify_proof(r.proof, keys.trust)
            assert await st.check_against_log(bus, body) == []
        ok = await asyncio.to_thread(cli, "proof", "verify", str(a.proof_path), "--online", env=scf_env)
        assert ok.returncode == 0 and ok.stdout.startswith(f"OK: strike {a.activity_id} of contract acme (measured)"), ok.stdout + ok.stderr
        paths = [p for p, _ in leaves(a.proof)]
        assert len(paths) > 200
        for path in paths:
            with pytest.raises(st.ProofInvalid):
                st.verify_proof(tampered(a.proof, path), keys.trust)
        bad = tmp_path / "tampered.json"
        bad.write_text(json.dumps(tampered(a.proof, ("mv", "periods", 0, "saved_kwh"))))
        r = await asyncio.to_thread(cli, "proof", "verify", str(bad), env=scf_env)
        assert r.returncode == 1 and r.stderr.startswith("Error: proof does not hold: signature: bad signature"), r.stderr
        # a proof naming bytes the log does not hold fails against the log (the signature still holds: re-signed here)
        forged = copy.deepcopy(a.proof)
        forged["events"][0]["sha256"] = "0" * 64
        forged = st.sign_proof({k: v for k, v in forged.items() if k != "signature"}, keys.release)
        assert (await st.check_against_log(bus, st.verify_proof(forged, keys.trust)))[0].endswith("holds other bytes than the proof names")

        # the events' inclusion proofs against a signed checkpoint of the transparency log, checked offline
        logged = await st.attach_log_proof(bus, settings, a.proof_path, wait_s=60.0)
        vkey = logged["log_verifier_key"]
        r = await asyncio.to_thread(cli, "proof", "verify", str(a.proof_path), "--key", vkey, env=scf_env)
        n = len(a.proof["events"])
        assert r.returncode == 0 and f"; in the transparency log: {n} events in scf.local/tlog/" in r.stdout, r.stdout + r.stderr
        assert st.verify_proof(logged, keys.trust)  # the bundle sits beside the release signature
        broken = copy.deepcopy(logged)
        broken["log"]["events"][3]["proof"][0] = broken["log"]["events"][4]["proof"][0][::-1]
        with pytest.raises(st.ProofInvalid, match="^log: event 3: "):
            st.check_log_proof(broken, vkey)
        swapped = copy.deepcopy(logged)
        swapped["log"]["events"][0], swapped["log"]["events"][1] = swapped["log"]["events"][1], swapped["log"]["events"][0]
        with pytest.raises(st.ProofInvalid, match="is another event"):
            st.check_log_proof(swapped, vkey)
        retyped = copy.deepcopy(logged)  # the proof names another type at the same (stream, seq, id)
        retyped["events"][0]["type"] = "energy.measured"
        with pytest.raises(st.ProofInvalid, match="is another event"):
            st.check_log_proof(retyped, vkey)

        # 5. The contract's value report: Markdown, light HTML with inline SVG charts, a PDF.
        outd = tmp_path / "report"
        r = await asyncio.to_thread(cli, "report", "value", "--contract", "acme", "--out", str(outd), env=scf_env)
        assert r.returncode == 0 and "energy saved" in r.stdout, r.stdout + r.stderr
        saved = sum(p["saved_kwh"] for p in a.proof["mv"]["periods"])
        md = (outd / "acme.md").read_text()
        assert f"{saved:.2f} ± " in md and "from 1 verified strike proofs" in md and "stability score" in md
        page = (outd / "acme.html").read_text()
        assert page.count("<svg") == 2 and "<script" not in page and len(page) < 300_000
        assert (outd / "acme.pdf").read_bytes()[:5] == b"%PDF-"

        # 6. The regiment: nothing due; a newly promoted production model makes both due again.
        report = await regiment.one_pass(bus, settings, key=keys.release, trust=keys.trust, opts=OPTS)
        assert (report.contracts, report.due) == (2, 0)
        make_model(tmp_path / "better.safetensors", 7)
        await publish_raw(bus, promotion("ck-better", 1, tmp_path / "better.safetensors", domain="hvac:office3"), keys.release)
        report = await regiment.one_pass(bus, settings, key=keys.release, trust=keys.trust, opts=OPTS, concurrency=2)
        assert (report.contracts, report.due) == (2, 2) and report.statuses() == {"awaiting-approval": 2}
        held_pass = await regiment.one_pass(bus, settings, key=keys.release, trust=keys.trust, opts=OPTS)
        assert held_pass.due == 0  # held for a human: nothing is redone until the intents are ruled on
        for res in report.results:
            await bus.publish(approve(res.intent_id))
        report = await regiment.one_pass(bus, settings, key=keys.release, trust=keys.trust, opts=OPTS, concurrency=2)
        assert report.statuses() == {"measured": 1, "reverted": 1}, [r.detail for r in report.results]
        new = {r.proof["contract_id"]: r.proof for r in report.results}
        assert new["acme"]["inputs"]["model"] == "ck-better" and new["acme"]["activity_id"] != a.activity_id
        assert new["acme"]["capsule"]["version"] > a.proof["capsule"]["version"]
        assert await node_runs(bus, "edge-a", new["acme"]["capsule"]["capsule_id"])
        assert (await regiment.one_pass(bus, settings, key=keys.release, trust=keys.trust, opts=OPTS)).due == 0
    except BaseException:
        print(logs(logd))
        raise
    finally:
        for p in procs:
            stop(p)


async def test_bad_input_and_gate_refusal(bus, settings, tmp_path):
    keys = Keys(settings)
    spec = contracts.spec_of(contracts.parse_doc(dict(ACME, nodes=[])))
    with pytest.raises(st.StrikeError, match="names no nodes"):
        await st.strike(bus, settings, spec, key=keys.release, trust=keys.trust, opts=OPTS)
    spec = contracts.spec_of(contracts.parse_doc(ACME))
    with pytest.raises(st.StrikeError, match="measure 'later': use one of sim, live, none"):
        await st.strike(bus, settings, spec, key=keys.release, trust=keys.trust, opts=st.StrikeOptions(measure="later"))
    # A decision the gate refuses never reaches the log: rejected offline, recorded, signed.
    import numpy as np

    hot = np.full((24, 3), 12.0)
    r = await st.strike(bus, settings, spec, key=keys.release, trust=keys.trust,
                        opts=st.StrikeOptions(measure="none", decision_override=hot))
    assert r.status == "rejected" and "bounds: state[u[meeting]] = 12 is above its bound 6" in r.detail
    assert await stream_count(bus, "INTENTS") == 0
    assert st.verify_proof(r.proof, keys.trust)["status"] == "rejected"
    assert await stream_count(bus, "CONTRACTS", "strike.completed.>") == 1
