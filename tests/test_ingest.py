"""Fossil ingest against a real nats-server: exact counts for every kind of bad line,
exactly-once recording across re-runs (inside and beyond the duplicate window), the
quarantine, resuming mid-shard, the process pool and the CLI."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec
import pytest

from scf.bus import events as ev
from scf.bus.codec import Codec
from scf.bus.headers import MSG_ID
from scf.domains.fossils import synth_shards
from scf.producers.ingest import Ingester, IngestError, IngestSettings, ingest
from tests.conftest import cli, stream_count, wait_for

pytestmark = pytest.mark.anyio

DOMAIN = "grid:case14"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    synth_shards(DOMAIN, 240, out, shard_size=120, seed=7)
    return out


def good_lines(shards: Path) -> list[bytes]:
    return [ln for p in sorted(shards.glob("*.ndjson")) for ln in p.read_bytes().splitlines()]


def with_id(fossil: dict) -> bytes:
    """Re-derive the content id after an edit (so only the edit is wrong)."""
    f = msgspec.convert(fossil, ev.Fossil)
    fossil["fossil_id"] = ev.fossil_content_id(f)
    return json.dumps(fossil).encode()


def bad_shard(shards: Path, dest: Path) -> tuple[Path, int]:
    """60 good lines, one duplicate of them, and one line of each kind of fault."""
    good = good_lines(shards)[:60]
    f = json.loads(good[0])
    wrong_id = dict(f, energy=f["energy"] + 1.0)  # content changed, id kept
    no_prov = {k: v for k, v in json.loads(good[1]).items() if k != "provenance"}
    oob = json.loads(good[2])
    oob["state"][0] = 10_000.0  # Pg1 is bounded by 332.4 MW
    unverified = json.loads(good[3])
    unverified["provenance"]["verified"] = False
    lines = good[:30] + [
        b'{"domain": "grid:case14", "context": [1, 2',  # malformed JSON (line 31)
        json.dumps(wrong_id).encode(),  # 32
        json.dumps(no_prov).encode(),  # 33
        with_id(oob),  # 34
        good[5],  # 35: a duplicate of line 6
        with_id(unverified),  # 36
    ] + good[30:]
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "bad-00000.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, len(lines)


async def rejected_events(bus) -> list[ev.FossilRejected]:
    out = []
    codec = Codec([ev.FossilRejected])
    info = await bus.js.stream_info("FOSSILS")
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await bus.js.get_msg("FOSSILS", seq)
        if msg.subject == "fossil.rejected":
            out.append(codec.decode(msg.data))
    return out


async def test_bad_shard_exact_counts_events_and_quarantine(bus, settings, shards, tmp_path):
    path, n = bad_shard(shards, tmp_path / "in")
    report = await ingest(bus, [path], settings=settings)
    assert report.lines == n == 66
    assert (report.recorded, report.duplicate, report.rejected) == (60, 1, 5)
    assert report.balanced
    assert dict(report.reasons) == {
        "malformed_json": 1, "content_id_mismatch": 1, "missing_provenance": 1, "out_of_bounds": 1, "verifier_failed": 1,
    }
    assert await stream_count(bus, "FOSSILS", "fossil.recorded.>") == 60
    assert await stream_count(bus, "FOSSILS", "fossil.rejected") == 5

    rejected = sorted(await rejected_events(bus), key=lambda e: e.data.line)
    assert [(e.data.line, e.data.reason.split(":")[0]) for e in rejected] == [
        (31, "malformed_json"), (32, "content_id_mismatch"), (33, "missing_provenance"), (34, "out_of_bounds"), (36, "verifier_failed"),
    ]
    assert all(e.data.shard == str(path.resolve()) for e in rejected)
    assert "Pg1@bus1" in rejected[3].data.reason
    lines = path.read_bytes().splitlines()
    assert rejected[0].data.raw == lines[30].decode()

    sha = report.shards[0].sha256
    quarantine = settings.path("fossil_vault", "quarantine")
    assert (quarantine / f"bad-00000.{sha[:12]}.ndjson").read_bytes().splitlines() == [lines[i - 1] for i in (31, 32, 33, 34, 36)]
    reasons = [json.loads(x) for x in (quarantine / f"bad-00000.{sha[:12]}.reasons.ndjson").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in reasons] == [(e.data.line, e.data.reason.split(":")[0]) for e in rejected]


async def test_reingest_adds_nothing_even_beyond_the_duplicate_window(bus, settings, shards, tmp_path):
    path, _ = bad_shard(shards, tmp_path / "in")
    first = await ingest(bus, [path, shards], settings=settings)
    assert (first.lines, first.recorded, first.duplicate, first.rejected) == (66 + 240, 240, 61, 5)
    before = await stream_count(bus, "FOSSILS")

    again = await ingest(bus, [path, shards], settings=settings)
    assert again.skipped == 3 and again.lines == 0  # finished shards are not read again

    forced = await ingest(bus, [path, shards], settings=settings, force=True)
    assert (forced.lines, forced.recorded, forced.duplicate, forced.rejected) == (306, 0, 301, 5)
    assert await stream_count(bus, "FOSSILS") == before  # rejections deduplicated by id

    # Days later: JetStream's duplicate window has long forgotten the message ids. Shrink
    # it and wait until it really forgot; the per-fossil subjects still refuse a second copy.
    cfg = (await bus.js.stream_info("FOSSILS")).config
    cfg.duplicate_window = 0.2
    await bus.js.update_stream(cfg)
    probe = {"n": 0}

    async def window_passed() -> bool:
        probe["n"] += 1
        ack = await bus.js.publish("fossil.probe", b"x", headers={MSG_ID: "probe"})
        return probe["n"] > 1 and not ack.duplicate

    await wait_for(window_passed, 10, "the duplicate window to expire")
    probes = await stream_count(bus, "FOSSILS", "fossil.probe")
    later = await ingest(bus, [shards], settings=settings, force=True)
    assert (later.lines, later.recorded, later.duplicate, later.rejected) == (240, 0, 240, 0)
    assert await stream_count(bus, "FOSSILS", "fossil.recorded.>") == 240
    assert await stream_count(bus, "FOSSILS") == before + probes


class Crash(Exception):
    pass


async def test_resume_mid_shard_counts_every_line_once(bus, settings, shards, tmp_path):
    path, n = bad_shard(shards, tmp_path / "in")
    cfg = IngestSettings(block_bytes=8 * 1024, workers=0)  # many small batches
    batches = {"n": 0}

    def crash_after_two(progress) -> None:
        batches["n"] += 1
        if batches["n"] == 2:
            raise Crash()

    with pytest.raises(Crash):
        await Ingester(bus, home=settings.home_path, config=cfg, on_progress=crash_after_two).run([path])
    prog_file = next(settings.path("fossil_vault", "ingest").glob("*.json"))
    done = json.loads(prog_file.read_text())
    assert 0 < done["lines"] < n and not done["complete"]
    # A crash can leave quarantine lines after the checkpoint: the resume cuts them off.
    quarantine = settings.path("fossil_vault", "quarantine", f"bad-00000.{done['sha256'][:12]}.ndjson")
    with open(quarantine, "ab") as f:
        f.write(b"written after the checkpoint\n")

    report = await Ingester(bus, home=settings.home_path, config=cfg).run([path])
    shard = report.shards[0]
    assert shard.resumed_from_line == done["lines"] and shard.lines == n - done["lines"]
    total = shard.total
    assert total.lines == n and total.complete
    assert total.lines == total.recorded + total.duplicate + total.rejected
    assert (total.recorded + total.duplicate, total.rejected) == (61, 5)
    assert await stream_count(bus, "FOSSILS", "fossil.recorded.>") == 60
    assert await stream_count(bus, "FOSSILS", "fossil.rejected") == 5
    assert len(quarantine.read_bytes().splitlines()) == 5


async def test_process_pool_gives_the_same_answer(bus, settings, shards, tmp_path):
    path, _ = bad_shard(shards, tmp_path / "in")
    report = await ingest(bus, [path, shards], settings=settings, workers=2)
    assert (report.lines, report.recorded, report.duplicate, report.rejected) == (306, 240, 61, 5)


async def test_missing_path_is_one_clear_error(bus, settings, tmp_path):
    with pytest.raises(IngestError, match=r"no file or directory at .*/nope: check the path"):
        await ingest(bus, [tmp_path / "nope"], settings=settings)


async def test_cli_synth_then_ingest(scf_env, bus, tmp_path):
    out = tmp_path / "synth"
    r = await asyncio.to_thread(cli, "fossils", "synth", "--domain", DOMAIN, "--n", "50", "--out", str(out), "--shard-size", "20", env=scf_env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote 50 fossils of {DOMAIN} in 3 shards under {out}"
    r = await asyncio.to_thread(cli, "fossils", "ingest", str(out), "--json", env=scf_env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert (got["lines"], got["recorded"], got["duplicate"], got["rejected"]) == (50, 50, 0, 0)
    r = await asyncio.to_thread(cli, "fossils", "ingest", str(out), env=scf_env)
    assert r.returncode == 0, r.stderr
    assert "3 shards already ingested" in r.stdout
    r = await asyncio.to_thread(cli, "fossils", "ingest", str(tmp_path / "missing"), env=scf_env)
    assert r.returncode == 1
    assert r.stderr.strip() == f"Error: no file or directory at {tmp_path / 'missing'}: check the path"
