"""Hostile fossil shards (issue 10, lower severity), against a real nats-server and the
real CLI: a 10 MB rejected line is quarantined whole, verbatim; absurd energies (-1e308)
are refused with a reason, by domain, with configurable bounds; unknown fields are counted
per field name, or refused with --strict."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from scf import domains
from scf.bus import events as ev
from scf.domains.fossils import FossilInvalid, check_line, synth_shards, validate_line
from scf.producers.ingest import LongLine, ingest, iter_batches
from tests.conftest import cli, stream_count

pytestmark = pytest.mark.anyio

DOMAIN = "grid:case14"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> list[bytes]:
    out = tmp_path_factory.mktemp("shards")
    synth_shards(DOMAIN, 20, out, shard_size=20, seed=3)
    return (out / "fossils-00000.ndjson").read_bytes().splitlines()


async def in_process(*args: str, env: dict[str, str]):
    """`scf ARGS` in this process (conftest.cli, in a thread: the command runs its own event
    loop); the one test that needs a real process (a file-size limit on it) starts its own."""
    return await asyncio.to_thread(cli, *args, env=env)


def with_id(fossil: dict) -> bytes:
    """Re-derive the content id after an edit (so only the edit is wrong)."""
    fossil = {k: v for k, v in fossil.items() if k != "fossil_id"}
    f = msgspec.convert(dict(fossil, fossil_id=""), ev.Fossil)
    return json.dumps(dict(fossil, fossil_id=ev.fossil_content_id(f))).encode()


def write(path, lines: list[bytes]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("workers", [0, 1])
async def test_a_10_mb_rejected_line_is_quarantined_verbatim(bus, settings, good, tmp_path, workers):
    huge_json = b'{"domain": "grid:case14", "note": "' + b"x" * (10 << 20) + b'"}'
    huge_junk = (bytes(range(256)) * (40 << 10)).replace(b"\n", b" ")  # 10 MiB of every other byte value
    long_json = b'{"domain": "grid:case14", "note": "' + b"y" * (200 << 10) + b'"}'  # > 64 KiB, < max_line_bytes: parsed
    lines = good[:3] + [huge_json] + good[3:5] + [huge_junk] + good[5:6] + [long_json]
    path = write(tmp_path / "in" / "big-00000.ndjson", lines)
    report = await ingest(bus, [path], settings=settings, workers=workers)
    assert (report.lines, report.recorded, report.rejected) == (9, 6, 3) and report.balanced
    assert dict(report.reasons) == {"too_long": 2, "schema": 1}

    sha = report.shards[0].sha256
    quarantine = settings.path("fossil_vault", "quarantine")
    assert (quarantine / f"big-00000.{sha[:12]}.ndjson").read_bytes() == b"\n".join([huge_json, huge_junk, long_json]) + b"\n"
    reasons = [json.loads(x) for x in (quarantine / f"big-00000.{sha[:12]}.reasons.ndjson").read_text().splitlines()]
    assert [(r["line"], r["reason"], r["bytes"]) for r in reasons] == [
        (4, "too_long", len(huge_json)), (7, "too_long", len(huge_junk)), (9, "schema", len(long_json)),
    ]
    assert reasons[0]["detail"].startswith("too_long: the line is 10,485,797 bytes, longer than any fossil ([ingest] max_line_bytes)")
    assert "missing required field" in reasons[2]["detail"]
    # The events stay within max_payload: their raw is cut; the quarantine has the whole lines.
    rejected = [e for e in await rejected_events(bus)]
    assert sorted((e.data.line, len(e.data.raw.encode())) for e in rejected)[0] == (4, 64 << 10)


async def rejected_events(bus) -> list[ev.FossilRejected]:
    from scf.bus.codec import Codec

    codec, out = Codec([ev.FossilRejected]), []
    info = await bus.js.stream_info("FOSSILS")
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await bus.js.get_msg("FOSSILS", seq)
        if msg.subject == "fossil.rejected":
            out.append(codec.decode(msg.data))
    return out


@hsettings(max_examples=300, deadline=None)
@given(
    st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=30),
    st.booleans(), st.integers(1, 17), st.integers(1, 5), st.integers(0, 25),
)
def test_iter_batches_reads_every_line_once_and_skips_long_ones(tmp_path_factory, lines, final_newline, block, max_lines, max_line):
    """Whatever the block size, batch size and line limit: the lines in order, long ones by
    position only, batch ends at line boundaries from which a resumed read gives the rest."""
    data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    path = tmp_path_factory.mktemp("lines") / "s.ndjson"
    path.write_bytes(data)
    want = data.split(b"\n")
    if want[-1] == b"":
        want.pop()

    def read(offset: int, first: int) -> tuple[list[bytes], list[tuple[int, int]]]:
        got, ends, n = [], [], first
        for first_line, end, group in iter_batches(path, offset, first, block, max_lines, max_line):
            assert first_line == n and 0 < len(group) <= max_lines
            n += len(group)
            for x in group:
                if isinstance(x, LongLine):
                    assert max_line and x.length > max_line and x.head == data[x.offset : x.offset + min(x.length, 64 << 10)]
                    x = data[x.offset : x.offset + x.length]
                else:
                    assert not max_line or len(x) <= max_line
                got.append(x)
            ends.append((end, n))
        return got, ends

    got, ends = read(0, 1)
    assert got == want
    assert (ends[-1][0] if ends else 0) == len(data)
    for end, following in ends:
        assert read(end, following)[0] == want[following - 1 :]


def test_every_domain_has_plausible_energy_bounds_and_synthesized_fossils_pass(tmp_path):
    for name in domains.names():
        d = domains.get(name)
        lo, hi = d.plausible_energy()
        assert lo < hi and abs(lo) < 1e7 and abs(hi) < 1e7, (name, lo, hi)
        if d.state_dim <= 20:  # the closed forms agree with the generic scan of the cost
            from scf.domains.base import Domain

            assert Domain.energy_range(d) == pytest.approx(d.energy_range(), rel=1e-9, abs=1e-9)
    for name in ("grid:case9", "hvac:office3"):
        out = tmp_path / name.replace(":", "_")
        synth_shards(name, 30, out, shard_size=30, seed=1, infeasible_fraction=0.2)
        for line in (out / "fossils-00000.ndjson").read_bytes().splitlines():
            try:
                validate_line(line)
            except FossilInvalid as exc:
                assert exc.reason == "verifier_failed", exc  # the infeasible ones, nothing else


@pytest.mark.parametrize("energy", [-1e308, 1e308, -5e4, 1e12])
def test_absurd_energy_is_refused_with_a_reason(good, energy):
    f = json.loads(good[0])
    with pytest.raises(FossilInvalid) as info:
        validate_line(with_id(dict(f, energy=energy)))
    assert info.value.reason == "out_of_bounds"
    assert "outside the plausible range" in str(info.value) and "[ingest] energy_bounds" in str(info.value)
    # Configurable per domain: a range that allows it lets it pass.
    assert validate_line(with_id(dict(f, energy=energy)), energy_bounds={DOMAIN: (-1e308, 1e308)}).energy == energy


async def test_energy_bounds_are_configurable_in_scf_toml(bus, settings, scf_env, good, tmp_path):
    f = json.loads(good[0])
    high = with_id(dict(f, energy=50_000.0))  # above grid:case14's default plausible range (about 34 543 $/h)
    path = write(tmp_path / "in" / "energy-00000.ndjson", [good[1], high, with_id(dict(f, energy=-1e308))])
    r = await in_process("fossils", "ingest", str(path), "--json", "-q", env=scf_env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["recorded"], out["rejected"], out["reasons"]) == (1, 2, {"out_of_bounds": 2})

    (settings.home_path / "scf.toml").write_text('[ingest]\nenergy_bounds = { "grid:case14" = [0.0, 100000.0] }\n')
    r = await in_process("fossils", "ingest", str(path), "--json", "-q", "--force", env=scf_env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["recorded"], out["duplicate"], out["rejected"]) == (1, 1, 1)  # 50 000 now passes; -1e308 still not

    (settings.home_path / "scf.toml").write_text('[ingest]\nenergy_bounds = { "grid:case99" = [0.0, 1.0] }\n')
    r = await in_process("fossils", "ingest", str(path), "-q", "--force", env=scf_env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("Error: [ingest] energy_bounds names an unknown domain 'grid:case99': use one of")
    (settings.home_path / "scf.toml").write_text('[ingest]\nenergy_bounds = { "grid:case14" = [5.0, 1.0] }\n')
    r = await in_process("fossils", "ingest", str(path), "-q", "--force", env=scf_env)
    assert r.returncode == 1 and "give a finite [LOW, HIGH] with LOW < HIGH" in r.stderr


def test_unknown_fields_are_named(good):
    f = json.loads(good[0])
    line = json.dumps(dict(f, colour="red", provenance=dict(f["provenance"], operator="bob"))).encode()
    fossil, dropped = check_line(line)
    assert dropped == ("colour", "provenance.operator") and fossil == validate_line(good[0])
    with pytest.raises(FossilInvalid, match=r"^unknown_field: fields colour, provenance.operator are not part of a fossil"):
        check_line(line, strict=True)
    assert check_line(good[0], strict=True)[1] == ()


async def test_unknown_fields_counted_or_refused_with_strict(bus, settings, scf_env, good, tmp_path):
    f0, f1 = json.loads(good[0]), json.loads(good[1])
    lines = [
        json.dumps(dict(f0, colour="red")).encode(),
        json.dumps(dict(f1, colour="blue", provenance=dict(f1["provenance"], operator="bob"))).encode(),
        good[2],
    ]
    path = write(tmp_path / "in" / "extra-00000.ndjson", lines)
    r = await in_process("fossils", "ingest", str(path), "-q", env=scf_env)
    assert r.returncode == 0, r.stderr
    assert "3 recorded, 0 duplicate, 0 rejected" in r.stdout
    assert "       2  line(s) with unknown field 'colour' (dropped; --strict refuses them)" in r.stdout
    assert "       1  line(s) with unknown field 'provenance.operator' (dropped; --strict refuses them)" in r.stdout

    # The same shard again with --strict (--force: a finished shard is otherwise skipped).
    r = await in_process("fossils", "ingest", str(path), "--strict", "--force", "--json", "-q", env=scf_env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["recorded"], out["duplicate"], out["rejected"], out["reasons"]) == (0, 1, 2, {"unknown_field": 2})
    assert out["unknown_fields"] == {}
    assert await stream_count(bus, "FOSSILS", "fossil.rejected") == 2


def _limit_file_size(limit: int):
    def apply() -> None:  # runs in the child before exec
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return apply


async def test_ingest_that_cannot_write_stops_in_one_line_and_resumes(bus, settings, scf_env, good, tmp_path):
    """The quarantine cannot be written (RLIMIT_FSIZE on the real CLI process: EFBIG, as on a
    full disk): one line, exit 1, no traceback; the next run resumes and nothing doubles."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    bad = b'{"domain": "grid:case14", "note": "' + b"z" * (200 << 10) + b'"}'
    path = write(tmp_path / "in" / "full-00000.ndjson", good[:4] + [bad] + good[4:8])
    r = subprocess.run(
        [sys.executable, "-m", "scf.cli.main", "fossils", "ingest", str(path), "-q"], env=scf_env, cwd=ROOT,
        capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size(100 << 10),
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: ingest of {path} stopped: File too large") and "run ingest again" in last, last

    r = await in_process("fossils", "ingest", str(path), "--json", "-q", env=scf_env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["lines"] == 9 and out["rejected"] == 1 and out["recorded"] + out["duplicate"] == 8
    assert await stream_count(bus, "FOSSILS", "fossil.recorded.>") == 8
    quarantine = settings.path("fossil_vault", "quarantine")
    (qfile,) = [p for p in quarantine.glob("full-00000.*.ndjson") if not p.name.endswith(".reasons.ndjson")]
    assert qfile.read_bytes() == bad + b"\n"
