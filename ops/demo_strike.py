"""The demo's last step (docs/value-loop.md): a client contract, a strike and its proof.

Kept apart from ops/demo.py so that the demo's other steps and this one change separately.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from scf.bus.settings import Settings
from scf.bus.signing import SigningKey, TrustList

CONTRACT = {"contract_id": "demo-client", "client": "Demo Client", "domain": "hvac:office3",
            "constraints": {"T_out": 9.0, "preheat_hours": 3, "comfort": {"occupied": [21, 24]}}, "schedule_s": 0}


async def strike_step(bus, settings: Settings, echo: Callable[[str], None], node: str, wait_s: float = 120.0) -> Path:
    """Register a contract for `node`, strike it (simulated M&V), verify its proof against
    the release keys and the log; returns the proof's path (raises when any part fails)."""
    from scf.producers import contracts
    from scf.producers import strike as st

    key = SigningKey.load(settings.keys_dir / "release.key")
    trust = TrustList.load(settings.keys_dir / "trusted.json")
    what, _, seq = await contracts.add(bus, contracts.parse_doc(dict(CONTRACT, nodes=[node])), by="demo")
    echo(f"   contract {CONTRACT['contract_id']} {what} (CONTRACTS seq {seq}) for {node}")
    c = await contracts.get(bus, CONTRACT["contract_id"])
    opts = st.StrikeOptions(measure="sim", wait_s=wait_s, sim_hours=48.0, history_hours=24.0,
                            model=await st.production_model(bus, c.spec.domain))
    r = await st.strike(bus, settings, c.spec, key=key, trust=trust, opts=opts, contract_seq=c.seq, contract_event_id=c.event_id)
    echo(f"   {st.summary(r)}")
    if r.proof is None or r.proof_path is None:
        raise st.StrikeError(f"the strike ended {r.status}: {r.detail}")
    body = st.verify_proof(r.proof, trust)
    problems = await st.check_against_log(bus, body)
    if problems:
        raise st.StrikeError("the proof does not match the log: " + "; ".join(problems))
    echo(f"   proof {r.proof_path}: signed by a release key, {len(body['events'])} events match the log "
         f"(`scf proof verify {r.proof_path} --online`)")
    return r.proof_path
