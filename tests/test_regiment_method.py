"""`scf run regiment` takes the method `scf strike --method` takes ([regiment] method, or
--method): exact (the default), learned (the learned optimiser promoted for the contract's
domain; none promoted fails that domain's strikes in one line) or auto (learned where one
is promoted, else exact, saying why). What decided each domain is printed (and kept in the
progress record); what was proposed is that model's decision. Real nats-server, real
artifact store, a real (small) trained optimiser, `scf run regiment --once` as a user runs it."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from scf.bus.artifacts import open_store
from scf.bus.client import Bus
from scf.producers import contracts
from scf.producers.regiment import RegimentSettings
from tests.conftest import cli
from tests.test_deploy_helpers import Keys
from tests.test_optimiser_jobs import read_all
from tests.test_strike_learned import DOMAIN, optimiser, promotion  # noqa: F401 - `optimiser` is a module fixture

pytestmark = pytest.mark.anyio
PROFILE = {"profile": [{"hour": 18, "load_scale": 1.1}, {"hour": 3}]}
CONTRACT = {"contract_id": "grid-1", "client": "ACME", "domain": DOMAIN, "nodes": ["edge-a"], "constraints": PROFILE, "schedule_s": 0}


def decisions(method: str, checkpoint=None) -> np.ndarray:
    from scf.producers import optimize as opt

    c = contracts.parse_constraints(DOMAIN, PROFILE)
    target = opt.target(domain=DOMAIN)
    problems = [opt.problem(target, contracts.problem_spec(target, c, h)) for h in contracts.hours(c)]
    return np.array([d.state for d in opt.optimize(problems, method=method, checkpoint=checkpoint)], float)


@pytest.mark.slow
async def test_the_regiment_strikes_with_the_configured_method(bus, settings, scf_env, tmp_path, optimiser):  # noqa: F811
    keys = Keys(settings)
    keys.release.save(settings.keys_dir)  # as release.key: the regiment signs capsules and proofs with it
    toml = settings.home_path / "scf.toml"
    base = (toml.read_text() if toml.exists() else "") + '\n[regiment]\nmeasure = "none"\nwait_s = 1.0\n'
    toml.write_text(base)
    op = await Bus.connect(settings, "operator", key=keys.operator)  # the regiment strikes operator-signed contracts only
    try:
        await contracts.add(op, contracts.parse_doc(CONTRACT))
    finally:
        await op.close()

    async def regiment(*args: str, config: str = ""):
        toml.write_text(base + config)
        return await asyncio.to_thread(cli, "run", "regiment", "--once", *args, env=scf_env)

    async def activity() -> str:  # the last strike's, from its proposals
        return [e.data.intent_id for e in await read_all(bus, "INTENTS", "state.proposed.>")][-1]

    spec = (await contracts.load(bus)).get("grid-1").spec

    def activity_for(method: str, model: str) -> str:
        from scf.producers import strike as st

        return st.activity_id_for("grid-1", st.sha256_json(st.inputs_of(spec, st.StrikeOptions(method=method, model=model))))

    async def proposed() -> np.ndarray:  # the last strike's two states (hours 18 and 3)
        return np.array([e.data.state for e in await read_all(bus, "INTENTS", "state.proposed.>")][-2:], float)

    none = (f"no learned optimiser is promoted to production for {DOMAIN}: train one with `scf train-optimiser --bus --domain "
            f"{DOMAIN}` (the daemon judges and promotes it), or pass --checkpoint FILE")
    # 1. learned, none promoted: the domain's contract is not struck; the reason is its result
    r = await regiment("--method", "learned")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == ["1 contracts, 1 due: {'failed': 1} in " + r.stdout.split(" in ")[1].splitlines()[0],
                                     f"{DOMAIN}: decided by method learned: {none}"]
    assert await read_all(bus, "INTENTS", "state.proposed.>") == []

    # 2. auto from scf.toml, none promoted: exact, saying why
    r = await regiment(config='method = "auto"\n')
    assert r.stdout.splitlines()[1] == f"{DOMAIN}: decided by exact (HiGHS): {none}", r.stdout + r.stderr
    assert np.allclose(await proposed(), decisions("exact"), atol=1e-6)
    assert await activity() == activity_for("exact", "")

    # 3. an optimiser is promoted: auto decides with it, named by id, version and digest
    ref = await open_store(bus, settings).put(optimiser, "grid_case14/opt-1.safetensors")
    daemon = await Bus.connect(settings, "daemon", key=keys.release)
    try:
        await daemon.publish(promotion("opt-1", 1, ref, "optimiser"))
    finally:
        await daemon.close()
    sha = ref.sha256.removeprefix("sha256:")
    r = await regiment(config='method = "auto"\n')
    assert r.stdout.splitlines()[1] == f"{DOMAIN}: decided by learned optimiser opt-1 (production v1 of {DOMAIN}, sha256 {sha})"
    learned = decisions("learned", optimiser)
    assert np.allclose(await proposed(), learned, atol=1e-6)
    assert not np.allclose(learned, decisions("exact"), atol=1e-9, rtol=0)  # not the exact path in disguise
    # the strike's inputs (its activity id, which every event of the strike carries) name the method and the model
    assert await activity() == activity_for("learned", f"opt-1 sha256:{sha}")

    # 4. --method overrides scf.toml; exact is the default
    r = await regiment("--method", "exact", config='method = "learned"\n')
    assert r.stdout.splitlines()[1] == f"{DOMAIN}: decided by exact (HiGHS)", r.stdout + r.stderr
    assert np.allclose(await proposed(), decisions("exact"), atol=1e-6)
    assert await activity() == activity_for("exact", "opt-1")  # exact: the domain's production model is in the inputs, as before

    # 5. bad settings: one line, nothing asked of the server
    r = await regiment("--method", "fast")
    assert (r.returncode, r.stderr) == (1, "Error: [regiment] method = 'fast': use exact, learned or auto\n")
    r = await regiment("--checkpoint", str(optimiser))
    assert (r.returncode, r.stderr) == (1, 'Error: [regiment] checkpoint is a learned optimiser\'s file: set method = "learned" '
                                           'or "auto" with it\n')
    r = await regiment("--method", "learned", "--checkpoint", str(tmp_path / "none.safetensors"))
    assert r.returncode == 1 and "no such file" in r.stderr


def test_regiment_settings_default_to_exact():
    assert RegimentSettings().method == "exact" and RegimentSettings().options().method == "exact"
    assert json.loads('{"method": "exact"}')["method"] == RegimentSettings().method
