"""The weekly release: selection, DSSE / in-toto / SLSA, immutability, offline verification."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import subprocess
import sys

import pytest

from scf.bus.signing import SigningKey
from scf.projections import release, sample
from scf.projections.store import ArchiveStore
from tests.conftest import ROOT, cli

DAY = dt.date(2026, 11, 22)  # sample.write_archive publishes everything on this Sunday


@pytest.fixture
def store(tmp_path):
    s = ArchiveStore(tmp_path / "archive")
    sample.write_archive(s, sample.history(30, seed=11))
    return s


def test_pae_matches_the_dsse_spec_example():
    # DSSE v1 protocol.md: PAE("http://example.com/HelloWorld", "hello world")
    assert release.pae("http://example.com/HelloWorld", b"hello world") == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


def test_selection_picks_the_best_production_checkpoint_per_domain(store):
    cands, position = release.candidates(store, release.week_of(DAY)[1])
    chosen = release.select(cands)
    assert chosen and position["CHECKPOINTS"] == store.position("CHECKPOINTS")
    for domain, c in chosen.items():
        others = [x for x in cands.values() if x.domain == domain]
        assert min(release.selection_key(x) for x in others) == release.selection_key(c)
    # Nothing promoted before the week: refused in one line.
    with pytest.raises(release.ReleaseError, match="no checkpoint was promoted to production before 2026-11-16"):
        release.build(store, dt.date(2026, 11, 10), SigningKey.generate("release"))


def test_weekly_release_is_signed_immutable_and_verifies_offline(store, tmp_path):
    key = SigningKey.generate("release")
    history = tmp_path / "release_history"
    first = release.weekly(store, history, DAY, key)
    assert first.status == "written" and first.directory.name == "week-2026-11-16"
    assert release.verify_release(first.directory, key.public_raw)["week"] == "week-2026-11-16"
    env = json.loads((first.directory / release.ENVELOPE).read_text())
    stmt = json.loads(base64.b64decode(env["payload"]))
    assert stmt["_type"] == "https://in-toto.io/Statement/v1" and stmt["predicateType"] == "https://slsa.dev/provenance/v1"
    assert {s["name"] for s in stmt["subject"]} >= {"release.json", "RELEASE_NOTES.md"}
    # Lineage: the checkpoint's events, its job's events and the fossils it was trained on.
    lineage = json.loads(next(first.directory.glob("*/lineage.json")).read_text())
    assert set(lineage["archive"]) >= {"CHECKPOINTS", "TRAINING"}
    assert lineage["sequences"]["TRAINING"] and lineage["job_id"]
    sel = lineage["data_selection"]  # "up to the last at dispatch" resolved to a sequence
    assert lineage["archive"]["FOSSILS"] == [1, sel["end_seq"]] and sel["end_seq"] >= sel["count"] > 0
    # A second run (another day of the same week) reproduces it byte for byte.
    assert release.weekly(store, history, DAY - dt.timedelta(days=2), key).status == "reproduced"
    # Another key would change the envelope: refused, the release stays.
    with pytest.raises(release.ReleaseError, match="exists and differs .*provenance.dsse.json.*releases are immutable"):
        release.weekly(store, history, DAY, SigningKey.generate("other"))
    with pytest.raises(release.ReleaseError, match="not signed by the release key given"):
        release.verify_release(first.directory, SigningKey.generate("x").public_raw)
    # A changed file is caught by its digest.
    card = next(first.directory.glob("*/metrics.json"))
    os.chmod(card, 0o644)
    card.write_text(card.read_text().replace("0.", "0.0", 1))
    with pytest.raises(release.ReleaseError, match=r"metrics.json does not match its digest in the signed statement"):
        release.verify_release(first.directory, key.public_raw)


def test_release_cli_verify_is_offline(store, tmp_path):
    key = SigningKey.generate("release")
    result = release.weekly(store, tmp_path / "h", DAY, key)
    pub = tmp_path / "release.pub"
    pub.write_text(key.public_b64 + "\n")
    bare = {"PATH": os.environ["PATH"]}
    r = cli("release", "verify", str(result.directory), "--key", str(pub), env=bare)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK: week-2026-11-16: signature, statement and ")
    (result.directory / "extra.txt").write_text("x")
    r = cli("release", "verify", str(result.directory), "--key", str(pub), env=bare)
    assert r.returncode == 1
    assert r.stderr.strip() == f"Error: release does not verify: {result.directory} holds files the statement does not list: extra.txt"


def test_release_verify_refuses_links_fifos_and_a_missing_statement(store, tmp_path):
    """A hostile release directory, checked by a real `scf release verify` process: a symlinked
    directory used to hide unlisted files from the walk, a listed file replaced by a symlink
    to a same-bytes copy (retargetable after it verified) passed, a FIFO would block the
    read, a missing statement was a traceback."""
    key = SigningKey.generate("release")
    result = release.weekly(store, tmp_path / "h", DAY, key)
    pub = tmp_path / "release.pub"
    pub.write_text(key.public_b64 + "\n")
    d = result.directory
    os.chmod(d, 0o755)

    def verify() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "scf.cli.main", "release", "verify", str(d), "--key", str(pub)],
                              env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)}, cwd=ROOT, capture_output=True, text=True, timeout=120)

    assert verify().returncode == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "payload.py").write_text("print('unlisted')")
    card = next(d.glob("*/metrics.json"))
    rel = card.relative_to(d).as_posix()
    copy = tmp_path / "metrics-copy.json"
    copy.write_bytes(card.read_bytes())
    attacks = {
        "linked directory": (lambda: (d / "extra").symlink_to(elsewhere), lambda: (d / "extra").unlink(),
                             "extra in {d} is a symlink"),
        "linked listed file": (lambda: (os.chmod(card.parent, 0o755), card.unlink(), card.symlink_to(copy)),
                               lambda: (card.unlink(), card.write_bytes(copy.read_bytes())), f"{rel} in {{d}} is a symlink"),
        "fifo": (lambda: os.mkfifo(d / "pipe"), lambda: (d / "pipe").unlink(), "pipe in {d} is a FIFO"),
        "no statement": (lambda: (d / release.STATEMENT).rename(tmp_path / "stmt"), lambda: (tmp_path / "stmt").rename(d / release.STATEMENT),
                         f"{{d}} has no {release.STATEMENT}: the release is incomplete"),
    }
    for what, (attack, undo, message) in attacks.items():
        attack()
        r = verify()
        assert r.returncode == 1 and "Traceback" not in r.stderr, (what, r.stderr)
        assert r.stderr.startswith(f"Error: release does not verify: {message.format(d=d)}"), (what, r.stderr)
        undo()
        assert verify().returncode == 0, what


@pytest.mark.anyio
async def test_scf_release_weekly_records_the_release_once(bus, settings, scf_env):
    import asyncio

    sample.write_archive(ArchiveStore(settings.archive_dir), sample.history(30, seed=11))
    r = await asyncio.to_thread(cli, "release", "weekly", "--date", "2026-11-22", env=scf_env)
    assert r.returncode == 1 and r.stderr.startswith("Error: no release key ")
    SigningKey.generate("release").save(settings.keys_dir)
    r = await asyncio.to_thread(cli, "release", "weekly", "--date", "2026-11-22", env=scf_env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("wrote ") and "(new), event " in r.stdout
    r = await asyncio.to_thread(cli, "release", "weekly", "--date", "2026-11-20", env=scf_env)
    assert "reproduced byte for byte" in r.stdout and "(duplicate), event " in r.stdout
    seq, event = await bus.last("proof.release.week-2026-11-16")
    assert event.data.week == "week-2026-11-16" and seq > 0
    assert r.stdout.rstrip().endswith(f"event {event.id}")  # the id of the event stored first

    # The transparency log covers the release: its proof.release event's inclusion proof
    # ties the directory to the log, offline.
    from scf.projections import tlog
    from scf.projections.archive import replay
    from tests.conftest import wait_for

    async def release_logged() -> bool:
        await replay(settings, streams=["PROOFS"])
        await tlog.checkpoint(settings, bus)
        return tlog.open_log(settings).state.positions.get("PROOFS", tlog.StreamPos()).seq >= seq

    await wait_for(release_logged, 30, "the proof.release event in the log")
    await tlog.checkpoint(settings, bus)
    proof = settings.home_path / "release.proof.json"
    r = await asyncio.to_thread(cli, "proof", "inclusion", event.id, "--out", str(proof), env=scf_env)
    assert r.returncode == 0, r.stderr
    vkey = (await asyncio.to_thread(cli, "proof", "key", env=scf_env)).stdout.strip()
    pub = settings.keys_dir / "release.pub"
    week_dir = settings.path("release_history", "week-2026-11-16")
    bare = {"PATH": scf_env["PATH"]}
    r = await asyncio.to_thread(cli, "release", "verify", str(week_dir), "--key", str(pub), "--log-proof", str(proof), "--log-key", vkey, env=bare)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1].startswith("OK: recorded in the transparency log scf.local/tlog/")
    # The proof vouches for this envelope only: another one (a re-signed release) fails.
    with pytest.raises(release.ReleaseError, match="the logged release is not this one"):
        release._verify_logged(proof.read_bytes(), vkey, "week-2026-11-16", "0" * 64)


def test_the_weekly_workflow_runs_real_commands():
    """actionlint is not installable offline here (docs/proofs.md); instead: the workflow's
    `scf` command lines name commands and options the CLI has, and it is scheduled."""
    import re
    from pathlib import Path

    import typer

    from scf.cli.main import app

    text = (Path(__file__).parent.parent / ".github" / "workflows" / "weekly-release.yml").read_text()
    assert re.search(r'^\s+- cron: "0 6 \* \* 1"$', text, re.M)
    root = typer.main.get_command(app)
    seen = set()
    for line in re.findall(r"\.venv/bin/scf (.*)$", text, re.M):
        tokens = line.split()
        words = [t for t in tokens[:2] if re.fullmatch(r"[a-z-]+", t)]
        seen.add(" ".join(words))
        cmd = root
        for w in words:
            cmd = cmd.commands[w]  # KeyError: the workflow calls a command that does not exist
        options = {o for p in cmd.params for o in p.opts}
        for t in tokens:
            if t.startswith("--"):
                assert t in options, f"scf {' '.join(words)} has no {t}"
    assert seen == {"proof checkpoint", "proof inclusion", "proof key", "release weekly", "release verify"}


def test_each_model_kind_is_ranked_by_its_own_measure():
    """An alias has one head per (domain, kind): the release takes the best of each kind, each by
    its own measure (an optimiser has no DSM: ranked against EBDMs it always came last)."""
    def cand(cid, kind, verified, at):
        return release.Candidate(cid, "grid:case14", verified_metrics=verified, promoted_at=at, kind=kind)

    cands = [cand("e1", "ebdm", {"heldout_dsm": 0.5}, 1), cand("e2", "", {"heldout_dsm": 0.4}, 2),
             cand("o1", "optimiser", {"decision_regret": 0.10}, 3), cand("o2", "optimiser", {"decision_regret": 0.05}, 4),
             cand("o3", "optimiser", {"cost_heldout_mae_rel": 0.01}, 5),  # no decision measure: after those that have one
             release.Candidate("g1", "genn", verified_metrics={"code_mean_reward": 0.2}, kind="code"),
             release.Candidate("g2", "genn", verified_metrics={"code_mean_reward": 0.3}, kind="code")]
    chosen = release.select({c.checkpoint_id: c for c in cands})
    assert {k: c.checkpoint_id for k, c in chosen.items()} == {"grid:case14": "e2", "grid:case14/optimiser": "o2", "genn": "g2"}
    files = release._files(chosen["grid:case14/optimiser"], "week-x", {})
    assert sorted(files) == [f"grid_case14_optimiser/{n}" for n in ("dataset_card.md", "lineage.json", "metrics.json", "model_card.md")]
    card = files["grid_case14_optimiser/model_card.md"].decode()
    assert "- model: learned optimiser" in card and "`decision_regret`" in card
    assert json.loads(files["grid_case14_optimiser/metrics.json"])["selection_key"] == [0.05, float("inf"), float("inf")]
