"""`scf strike --method learned` decides with the learned optimiser PROMOTED for the
contract's domain (producers/promoted.py): fetched from the bus, its release signature,
sha256 and format checked before it is read; the model that decided (id, sha256) is printed
and goes into the strike's inputs. An alias has one head per (domain, model kind): a
promoted EBDM never stands in for the optimiser. Real nats-server, real artifact store, a
real (small) trained optimiser, `scf strike` as a user runs it."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import numpy as np
import pytest

from scf.bus import events as ev
from scf.bus.artifacts import open_store
from scf.bus.client import Bus
from scf.producers import promoted as pm
from scf.producers.verify import EBDM, OPTIMISER, alias_heads, current_promotion, next_version
from tests.conftest import cli
from tests.test_deploy_helpers import Keys
from tests.test_optimiser_jobs import read_all

pytestmark = pytest.mark.anyio
pytest.importorskip("torch")

DOMAIN = "grid:case14"


@pytest.fixture(scope="module")
def optimiser(case14_optimiser):
    return case14_optimiser  # the run's one (conftest): trained once for this file and test_deploy_kinds


def promotion(cid: str, version: int, ref, kind: str = "", previous: str | None = None) -> ev.CheckpointPromoted:
    return ev.CheckpointPromoted.new(ev.Promotion(checkpoint_id=cid, domain=DOMAIN, alias="production", version=version, uri=ref.uri,
                                                  sha256=ref.sha256, size=ref.size, previous_checkpoint_id=previous, kind=kind), source="daemon")


async def test_strike_decides_with_the_promoted_optimiser_and_names_it(bus, settings, scf_env, tmp_path, optimiser):
    keys = Keys(settings)
    keys.release.save(settings.keys_dir)
    cfile = tmp_path / "c.json"
    cfile.write_text(json.dumps({"profile": [{"hour": 18, "load_scale": 1.1}, {"hour": 3}]}))
    strike = ("strike", "--domain", DOMAIN, "--constraints", str(cfile), "--nodes", "edge-a", "--measure", "none", "--wait", "1")
    run = lambda *a: asyncio.to_thread(cli, *a, env=scf_env)  # noqa: E731
    none = (f"Error: no learned optimiser is promoted to production for {DOMAIN}: train one with "
            f"`scf train-optimiser --bus --domain {DOMAIN}` (the daemon judges and promotes it), or pass --checkpoint FILE\n")

    r = await run(*strike, "--method", "learned")
    assert (r.returncode, r.stderr) == (1, none)

    store = open_store(bus, settings)
    ebdm_file = tmp_path / "ebdm.safetensors"
    ebdm_file.write_bytes(b"not read: an EBDM's promotion must not be fetched for the optimiser")
    ebdm_ref = await store.put(ebdm_file, "grid_case14/ebdm-1.safetensors")
    daemon = await Bus.connect(settings, "daemon", key=keys.release)
    try:
        await daemon.publish(promotion("ebdm-1", 1, ebdm_ref))  # written before kinds: an EBDM's
        r = await run(*strike, "--method", "learned")
        assert (r.returncode, r.stderr) == (1, none), "a promoted EBDM stood in for the optimiser"

        ref = await store.put(optimiser, "grid_case14/opt-1.safetensors")
        await daemon.publish(promotion("opt-1", 2, ref, OPTIMISER))
        await daemon.publish(promotion("ebdm-2", 3, ebdm_ref, EBDM, previous="ebdm-1"))  # the EBDM's head moves on alone
    finally:
        await daemon.close()
    heads = await alias_heads(bus, DOMAIN, "production")
    assert {k: (p.checkpoint_id, p.version) for k, p in heads.items()} == {EBDM: ("ebdm-2", 3), OPTIMISER: ("opt-1", 2)}
    assert next_version(heads) == 4 and (await current_promotion(bus, DOMAIN, "production")).checkpoint_id == "ebdm-2"

    r = await run(*strike, "--method", "learned")
    sha = ref.sha256.removeprefix("sha256:")
    decided = f"decided by: learned optimiser opt-1 (production v2 of {DOMAIN}, sha256 {sha})"
    assert r.stdout.splitlines()[1] == decided, r.stdout + r.stderr
    assert "failed (the safety gate ruled on 0 of 2 states within 1 s" in r.stdout  # decided and proposed; no gate runs here
    # what was proposed is the promoted optimiser's decision, and the inputs name the model by id and digest
    from scf.producers import contracts
    from scf.producers import optimize as opt

    c = contracts.parse_constraints(DOMAIN, json.loads(cfile.read_text()))
    target = opt.target(domain=DOMAIN)
    problems = [opt.problem(target, contracts.problem_spec(target, c, h)) for h in contracts.hours(c)]
    want = [d.state for d in opt.optimize(problems, method="learned", checkpoint=optimiser)]
    states = np.array([e.data.state for e in await read_all(bus, "INTENTS", "state.proposed.>")])
    assert np.allclose(states, np.array(want, float), atol=1e-6)
    exact = np.array([d.state for d in opt.optimize(problems, method="exact")], float)
    assert not np.allclose(states, exact, atol=1e-9, rtol=0)  # not the exact path in disguise

    # --method auto takes the promoted one too; exact says so; a --checkpoint file is named by its digest
    r = await run(*strike, "--method", "auto")
    assert r.stdout.splitlines()[1] == decided
    r = await run(*strike)
    assert r.stdout.splitlines()[1] == "decided by: exact (HiGHS)"
    r = await run(*strike, "--method", "learned", "--checkpoint", str(optimiser))
    assert r.stdout.splitlines()[1] == f"decided by: learned optimiser {optimiser} (--checkpoint, sha256 {sha})"
    r = await run(*strike, "--method", "fast")
    assert (r.returncode, r.stderr) == (1, "Error: --method 'fast': use exact, learned or auto\n")


async def test_a_promoted_optimiser_that_fails_a_check_is_refused_in_one_line(bus, settings, tmp_path, optimiser):
    keys = Keys(settings)
    store = open_store(bus, settings)
    ref = await store.put(optimiser, "grid_case14/opt-1.safetensors")
    unsigned = promotion("opt-1", 1, ref, OPTIMISER)
    await bus.publish(unsigned)  # the test's bus signs with no release key
    with pytest.raises(pm.PromotedRefused, match="has no trusted release signature"):
        await pm.fetch_promoted(bus, settings, DOMAIN, trust=keys.trust)
    m = await pm.fetch_promoted(bus, settings, DOMAIN, trust=keys.trust, verify_release=False)  # [deploy] verify_release = false
    assert m.promotion.checkpoint_id == "opt-1" and m.path.read_bytes() == optimiser.read_bytes()

    daemon = await Bus.connect(settings, "daemon", key=keys.release)
    try:
        other = tmp_path / "other.safetensors"
        other.write_bytes(optimiser.read_bytes()[:-8] + b"\0" * 8)
        bad = await store.put(other, "grid_case14/opt-2.safetensors")
        lying = SimpleNamespace(uri=bad.uri, size=bad.size, sha256=ref.sha256)  # the signed digest is not the stored file's
        await daemon.publish(promotion("opt-2", 2, lying, OPTIMISER, previous="opt-1"))
        with pytest.raises(pm.PromotedRefused, match="opt-2"):
            await pm.fetch_promoted(bus, settings, DOMAIN, trust=keys.trust)
        from safetensors.numpy import save_file

        save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "ebdm.safetensors"), metadata={"format": "scf-ebdm/1"})
        ebdm = await store.put(tmp_path / "ebdm.safetensors", "grid_case14/ebdm-9.safetensors")
        await daemon.publish(promotion("opt-3", 3, ebdm, OPTIMISER, previous="opt-2"))  # signed, digest right, not an optimiser's format
        with pytest.raises(pm.PromotedRefused, match="has format"):
            await pm.fetch_promoted(bus, settings, DOMAIN, trust=keys.trust)
    finally:
        await daemon.close()
