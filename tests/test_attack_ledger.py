"""Attacks on the ledger and the node registry (issue 10, defects 5 and 6 and the registry
item), each reproduced against a real nats-server and the real ledger:

* the same hour of savings reported many ways (a `+01:00` offset, the method in another
  case, an end 1 µs later, an overlapping half hour, random ids, an undeclared meter) is
  minted once; the periods survive a SIGKILLed `scf run ledger`;
* `scf ledger verify` fails on each forged transfer (an overlap, a cause id that does not
  match its content, an unbalanced transfer, a transfer without a signed measurement);
* NaN / inf energy: `scf energy report` refuses it; a signed measurement whose energy is
  JSON `null` becomes `ledger.rejected` with the reason, not a dead letter;
* the registry, with the production `edge` login of nats/users.conf: another node's entry
  rewritten (`account=evil`) is believed by neither the ledger nor the planner.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import signal
import sys

import msgspec
import pytest

from scf.bus import codec
from scf.bus import events as ev
from scf.bus.client import Bus
from scf.bus.ids import new_id
from scf.bus.settings import Settings, init_home
from scf.bus.streams import ensure
from scf.consumers import nodes as nodes_mod
from scf.consumers.energy import cause_id, measurement_event, utc_micros
from scf.consumers.ledger import Ledger, LedgerSettings, balances, read_transfers, transfer_id_for, verify
from tests.conftest import cli, spawn, stream_count, wait_for
from tests.mv_support import mv_fields, passing_mv
from tests.test_deploy_helpers import Keys
from tests.test_ledger import consumer_done, publish_signed, rejections

pytestmark = pytest.mark.anyio

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 11, 3, 10, 0, tzinfo=UTC)
HOUR = dt.timedelta(hours=1)


def reading(node="n1", start=T0, end=T0 + HOUR, baseline=20.0, actual=2.0, method="metered-vs-baseline", meter="",
            measurement_id: str | None = None) -> ev.EnergyMeasured:
    """A measurement exactly as a (possibly hostile) node would write it: times as given
    (no conversion to UTC), any measurement id, a fresh envelope id (a new Nats-Msg-Id)."""
    m = measurement_event(node, period_start=start, period_end=end, baseline_kwh=baseline, actual_kwh=actual,
                          method=method, meter=meter, source="attacker", **passing_mv(baseline, actual)).data
    m = msgspec.structs.replace(m, period_start=start, period_end=end, meter=meter,
                                measurement_id=measurement_id or m.measurement_id)
    return ev.EnergyMeasured.new(m, source="attacker", id=new_id())


def sign_raw(body: bytes, key) -> bytes:
    """Sign an encoded event as it stands (whatever its payload bytes say)."""
    wire = msgspec.json.decode(body, type=codec.Wire)
    wire.kid = key.kid
    wire.sig = key.sign(codec.canonical_bytes(msgspec.json.encode(wire)))
    return msgspec.json.encode(wire)


@contextlib.asynccontextmanager
async def running_ledger(bus: Bus, trust, mode: str = "batched", settings: LedgerSettings = LedgerSettings()):
    ledger = Ledger(bus, trust, settings)
    stop = asyncio.Event()
    if mode == "batched":
        task = asyncio.create_task(ledger.run(stop, fetch_timeout=0.2))
    else:
        task = asyncio.create_task(ledger.runner(fetch_timeout=0.2).run(stop))
    try:
        yield ledger
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def drained(bus: Bus) -> bool:
    last = await bus.stream_last_seq("DEPLOY")
    return await consumer_done(bus, last - 1)


# --------------------------------------------------------------------------- defect 5


@pytest.mark.parametrize("mode", ["batched", "runner"])
async def test_the_same_hour_is_minted_once_however_it_is_written(bus, settings, mode):
    keys = Keys(settings)
    k = keys.node("n1")
    plus1 = dt.timezone(dt.timedelta(hours=1))
    attacks = [
        reading(),  # the honest hour: 18 kWh
        reading(start=T0.astimezone(plus1), end=(T0 + HOUR).astimezone(plus1)),  # same instants, +01:00
        reading(start=T0.replace(tzinfo=None), end=(T0 + HOUR).replace(tzinfo=None)),  # no offset (UTC)
        reading(method="METERED-VS-BASELINE"),  # the method in another case
        reading(method="  Metered-vs-Baseline "),
        reading(measurement_id=new_id()),  # random ids
        reading(measurement_id=new_id(), baseline=100_020.0, actual=20.0),  # random id, another amount
        reading(end=T0 + HOUR + dt.timedelta(microseconds=1)),  # an end 1 µs later
        reading(start=T0 + HOUR / 2, end=T0 + HOUR + HOUR / 2),  # an overlapping half hour
        reading(start=T0 - HOUR / 2, end=T0 + HOUR / 2),
        reading(start=T0 + dt.timedelta(minutes=10), end=T0 + dt.timedelta(minutes=20)),  # inside
        reading(start=T0 - HOUR, end=T0 + 2 * HOUR),  # around
        reading(meter="sub-2"),  # a meter the node never declared
        reading(meter=" MAIN "),  # the main meter, spelt otherwise
    ]
    async with running_ledger(bus, keys.trust, mode) as ledger:
        for a in attacks:
            await publish_signed(bus, a, k)
        await wait_for(lambda: drained(bus), 30, "the ledger to drain")
        # the next hour is a new saving (half-open periods: adjacent is not overlapping)
        await publish_signed(bus, reading(start=T0 + HOUR, end=T0 + 2 * HOUR, baseline=3.0, actual=1.0), k)
        await wait_for(lambda: drained(bus), 30, "the ledger to drain")
    assert ledger.counts["new"] == 2
    entries = await read_transfers(bus)
    assert balances(entries) == {"issuer:negentropy": -20_000_000, "node:n1": 20_000_000}
    reasons = [r.reason for r in await rejections(bus)]
    assert sum(r.startswith("overlap:") for r in reasons) == 5, reasons
    assert sum(r.startswith("conflict:") for r in reasons) == 1, reasons  # the other amount
    assert sum(r.startswith("unknown meter 'sub-2'") for r in reasons) == 1, reasons
    assert len(reasons) == 7, reasons
    overlap = next(r for r in reasons if r.startswith("overlap:"))
    first = next(e for e in entries if e.transfer.period_start_us == utc_micros(T0))
    assert first.transfer.transfer_id in overlap and f"LEDGER seq {first.seq}" in overlap
    assert await stream_count(bus, "DLQ") == 0
    report = await verify(bus, trust=keys.trust)
    assert report.ok, report.lines()


async def test_periods_survive_a_sigkilled_ledger(bus, settings, scf_env, tmp_path):
    """The minted periods are rebuilt from the LEDGER stream: a ledger killed after minting
    and started again still refuses an overlapping period."""
    keys = Keys(settings)
    k = keys.node("n1")
    argv = [sys.executable, "-m", "scf.cli.main", "run", "ledger"]
    proc = spawn(argv, scf_env, tmp_path / "ledger-1.log")
    try:
        await publish_signed(bus, reading(), k)
        await wait_for(lambda: stream_count(bus, "LEDGER", "ledger.transfer.>"), 60, "the first transfer")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = spawn(argv, scf_env, tmp_path / "ledger-2.log")
        await publish_signed(bus, reading(start=T0 + HOUR / 2, end=T0 + HOUR + HOUR / 2), k)
        await publish_signed(bus, reading(start=T0.astimezone(dt.timezone(dt.timedelta(hours=-5))),
                                          end=(T0 + HOUR).astimezone(dt.timezone(dt.timedelta(hours=-5)))), k)
        await wait_for(lambda: stream_count(bus, "LEDGER", "ledger.rejected.>"), 60, "the overlap's rejection")
        await wait_for(lambda: drained(bus), 60, "the restarted ledger to drain")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert await stream_count(bus, "LEDGER", "ledger.transfer.>") == 1
    reasons = [r.reason for r in await rejections(bus)]
    assert len(reasons) == 1 and reasons[0].startswith("overlap:"), reasons
    assert (await verify(bus, trust=keys.trust)).ok


@pytest.mark.parametrize(("mode", "hours"), [("batched", 1), ("runner", 1), ("batched", 300)])
async def test_a_second_ledger_with_a_stale_index_cannot_mint_an_overlap(bus, settings, mode, hours):
    """Two ledgers at once (a second `scf run ledger` by mistake, or a failover): B loads
    the minted periods, then A mints an hour; B, whose index does not have it, is handed a
    measurement overlapping that hour. Its mint is fenced on the LEDGER sequence it last
    saw: refused, it catches up and rejects the overlap; a repeat of A's hour is a repeat."""
    keys = Keys(settings)
    k = keys.node("n1")
    b_bus = await Bus.connect(settings, "ledger-b")
    try:
        ledger_b = Ledger(b_bus, keys.trust)
        await ledger_b.load()  # B's view: nothing minted
        async with running_ledger(bus, keys.trust, mode):  # A (300 hours: B catches up by a scan, not by reads)
            for h in range(hours):
                await publish_signed(bus, reading(start=T0 + h * HOUR, end=T0 + (h + 1) * HOUR), k)
            await wait_for(lambda: drained(bus), 60, "ledger A to mint")
        assert ledger_b.periods.overlapping(("n1", "main"), utc_micros(T0), utc_micros(T0 + HOUR), "x") is None
        stop = asyncio.Event()
        run_b = (ledger_b.run(stop, fetch_timeout=0.2) if mode == "batched"
                 else ledger_b.runner(fetch_timeout=0.2).run(stop))
        task = asyncio.create_task(run_b)
        try:
            await publish_signed(bus, reading(start=T0 + HOUR / 2, end=T0 + HOUR + HOUR / 2), k)
            await publish_signed(bus, reading(), k)  # A's hour again: a repeat for B
            await wait_for(lambda: drained(bus), 30, "ledger B to decide")
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    finally:
        await b_bus.close()
    assert await stream_count(bus, "LEDGER", "ledger.transfer.>") == hours
    reasons = [r.reason for r in await rejections(bus)]
    assert len(reasons) == 1 and reasons[0].startswith("overlap:"), reasons
    assert ledger_b.counts["duplicate"] == 1 and ledger_b.counts["new"] == 0
    assert len(ledger_b.periods) == hours
    assert (await verify(bus, trust=keys.trust)).ok


def forged(t: ev.Transfer, **changes) -> ev.LedgerTransfer:
    return ev.LedgerTransfer.new(msgspec.structs.replace(t, **changes), source="mallory")


def rederive(t: ev.Transfer, start: dt.datetime, end: dt.datetime) -> dict:
    """Fields of a transfer for another period whose ids are all correctly derived."""
    cid = cause_id(t.node, t.meter, utc_micros(start), utc_micros(end))
    return dict(cause_id=cid, transfer_id=transfer_id_for(cid), period_start_us=utc_micros(start), period_end_us=utc_micros(end))


FORGERIES = {
    # a second, correctly derived transfer for an overlapping half hour
    "overlap": (lambda t: forged(t, **rederive(t, T0 + HOUR / 2, T0 + HOUR + HOUR / 2)), "overlapping periods"),
    # a valid cause id for another hour, put on a transfer that claims this hour
    "cause id": (lambda t: forged(t, **{**rederive(t, T0 + 5 * HOUR, T0 + 6 * HOUR), "period_start_us": utc_micros(T0) + 7,
                                       "period_end_us": utc_micros(T0 + HOUR)}), "does not match its normalised content"),
    # a random cause id (and a transfer id derived from it)
    "random id": (lambda t: forged(t, cause_id=new_id(), transfer_id=transfer_id_for("x")), "not derived from its cause"),
    # unbalanced: the amount is not kWh × rate
    "amount": (lambda t: forged(t, **rederive(t, T0 + 3 * HOUR, T0 + 4 * HOUR), micro_credits=10**12), "the transfer says"),
    # unbalanced: debits and credits one account
    "same account": (lambda t: forged(t, **rederive(t, T0 + 3 * HOUR, T0 + 4 * HOUR), debit_account="node:n1"),
                     "debits and credits the same account"),
    # a well-formed transfer for an hour nobody measured
    "no measurement": (lambda t: forged(t, **rederive(t, T0 + 8 * HOUR, T0 + 9 * HOUR)), "is not a measurement signed"),
}


@pytest.mark.parametrize("case", sorted(FORGERIES))
async def test_verify_fails_on_each_forged_transfer(bus, settings, scf_env, case):
    keys = Keys(settings)
    k = keys.node("n1")
    async with running_ledger(bus, keys.trust):
        await publish_signed(bus, reading(), k)
        await wait_for(lambda: drained(bus), 30, "the ledger to drain")
    ok = await asyncio.to_thread(cli, "ledger", "verify", env=scf_env)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 1 transfers"), ok.stdout + ok.stderr
    make, expected = FORGERIES[case]
    honest = (await read_transfers(bus))[0].transfer
    await bus.publish(make(honest))  # a service login writing the LEDGER stream directly
    bad = await asyncio.to_thread(cli, "ledger", "verify", env=scf_env)
    assert bad.returncode == 1, bad.stdout
    assert bad.stdout.startswith("FAILED") and expected in bad.stdout, bad.stdout


async def test_verify_fails_on_an_unsigned_measurement_behind_a_transfer(bus, settings, scf_env):
    """A forged measurement (unsigned, as a service login could write it) plus a transfer
    that matches it exactly: verify with the trust list refuses the pair."""
    keys = Keys(settings)
    keys.node("n1")
    fake = reading(start=T0 + 4 * HOUR, end=T0 + 5 * HOUR)
    await publish_signed(bus, fake, None)
    m = fake.data
    from scf.consumers.ledger import transfer_for

    await bus.publish(transfer_for(fake, "node:n1", LedgerSettings(), "mallory"))
    report = await verify(bus)  # without the trust list the pair is consistent ...
    assert report.ok, report.lines()
    bad = await asyncio.to_thread(cli, "ledger", "verify", env=scf_env)  # ... with it, not
    assert bad.returncode == 1 and "is not a measurement signed by its node's trusted key" in bad.stdout, bad.stdout
    assert m.node == "n1"


# --------------------------------------------------------------------------- defect 6


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "1e300"])
async def test_energy_report_refuses_non_finite_or_absurd_energy(bus, settings, scf_env, value):
    Keys(settings).node("n1")
    for flag, other in (("--baseline", "--actual"), ("--actual", "--baseline")):
        out = await asyncio.to_thread(
            cli, "energy", "report", "--node", "n1", flag, value, other, "1", "--start", "2026-11-01T00:00:00Z",
            "--end", "2026-11-01T01:00:00Z", env=scf_env,
        )
        assert out.returncode == 1, out.stdout
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: {flag} is "), out.stderr
        assert f"(e.g. {flag} 12.5)" in lines[0]
    assert await stream_count(bus, "DEPLOY") == 0


@pytest.mark.parametrize("mode", ["batched", "runner"])
async def test_null_energy_is_rejected_with_a_reason_not_dead_lettered(bus, settings, mode):
    keys = Keys(settings)
    k = keys.node("n1")
    async with running_ledger(bus, keys.trust, mode):
        for i, bad in enumerate([float("nan"), float("inf")]):
            # msgspec writes NaN and infinity as JSON null; the node's key signs it as such
            e = reading(start=T0 + i * HOUR, end=T0 + (i + 1) * HOUR, baseline=bad)
            raw = codec.sign(e, k)
            assert b'"baseline_kwh":null' in raw
            await bus.js.publish(e.subject(), raw, headers=Bus.headers(e))
        # a number beyond a float's range, signed as it stands
        e = reading(start=T0 + 2 * HOUR, end=T0 + 3 * HOUR, baseline=1.5)
        raw = sign_raw(codec.encode(e).replace(b'"baseline_kwh":1.5', b'"baseline_kwh":1e999'), k)
        await bus.js.publish(e.subject(), raw, headers=Bus.headers(e))
        await wait_for(lambda: drained(bus), 30, "the ledger to drain")
    rej = await rejections(bus)
    assert len(rej) == 3, rej
    assert all(r.reason.startswith("unreadable measurement") and "baseline_kwh" in r.reason for r in rej), rej
    assert sum("got `null`" in r.reason for r in rej) == 2 and sum("out of range" in r.reason for r in rej) == 1, rej
    assert {r.cause_id for r in rej} == {cause_id("n1", "main", utc_micros(T0 + i * HOUR), utc_micros(T0 + (i + 1) * HOUR))
                                         for i in range(3)}
    assert await read_transfers(bus) == []
    assert await stream_count(bus, "DLQ") == 0


# --------------------------------------------------------------------------- the node registry


@pytest.fixture
def users_server(tmp_path):
    """nats-server with nats/users.conf as written (no TLS: the logins are the point)."""
    from tests.test_nats_configs import NATS_DIR, base_env, free_port, start_server, users_env

    passwords = {u: "p" + new_id().replace("-", "")[:20] for u in ("service", "operator", "worker", "edge", "analyst")}
    env = {**base_env(), **users_env({**passwords, "worker": "wGpuTestPassw0rd"})}
    workdir = tmp_path / "users-server"
    workdir.mkdir()
    (workdir / "users.conf").write_text((NATS_DIR / "users.conf").read_text())
    (workdir / "server.conf").write_text(f'jetstream {{ store_dir: "{workdir / "store"}" }}\ninclude users.conf\n')
    port = free_port()
    server = start_server("users", ["-c", str(workdir / "server.conf"), "-a", "127.0.0.1", "-p", str(port)], env, workdir, port)
    try:
        yield server, passwords
    finally:
        server.stop()


async def test_edge_login_cannot_redirect_another_nodes_credits(users_server, tmp_path):
    server, passwords = users_server
    home = tmp_path / "home"

    def login(user: str) -> Settings:
        s = Settings(home=str(home), nats_url=server.url(user, passwords[user]), source=user)
        return s

    service_settings = login("service")
    init_home(service_settings)
    keys = Keys(service_settings)
    kx, kevil = keys.node("node-x"), keys.node("node-evil")
    service = await Bus.connect(service_settings, "service")
    await ensure(service.js)
    node_x = await Bus.connect(login("edge"), "edge-node-x", key=kx)
    attacker = await Bus.connect(login("edge"), "edge-node-evil", key=kevil)  # a compromised edge box
    buses = [service, node_x, attacker]
    try:
        when = dt.datetime(2026, 11, 3, tzinfo=UTC)
        await nodes_mod.register(node_x, nodes_mod.NodeInfo(node="node-x", labels={"account": "acme"}, updated_at=when))
        assert (await nodes_mod.get_node(service, "node-x", trust=keys.trust)).labels == {"account": "acme"}

        evil = nodes_mod.NodeInfo(node="node-x", labels={"account": "evil", "domain": "grid:x"}, updated_at=when + HOUR)
        kv = await attacker.kv(nodes_mod.NODES_BUCKET)
        forgeries = {
            "plain JSON, as before signing": msgspec.json.encode(evil),
            "unsigned entry": nodes_mod.encode_entry(evil, None),
            "signed by the attacker's own node key": nodes_mod.encode_entry(evil, kevil),
            "the attacker's own signed entry copied under node-x": nodes_mod.encode_entry(
                nodes_mod.NodeInfo(node="node-evil", labels={"account": "evil"}), kevil),
        }
        async with running_ledger(service, keys.trust) as ledger:
            await publish_signed(service, reading("node-x", T0 - HOUR, T0), kx)  # credited to client:acme
            await wait_for(lambda: drained(service), 30, "the ledger to mint the genuine hour")
            for hour, (what, value) in enumerate(forgeries.items()):
                await kv.put(nodes_mod.node_key("node-x"), value)  # the production edge user may write it ...
                ledger._labels.clear()  # (the ledger caches labels for 30 s)
                await publish_signed(service, reading("node-x", T0 + hour * HOUR, T0 + (hour + 1) * HOUR), kx)
                await wait_for(lambda: drained(service), 30, f"the ledger to mint ({what})")
                # ... but no reader that acts on the registry believes it
                assert await nodes_mod.get_node(service, "node-x", trust=keys.trust) is None, what
                assert nodes_mod.select(await nodes_mod.list_nodes(service, trust=keys.trust),
                                        nodes_mod.parse_target("account=evil")) == [], what
            # deleting the entry (an edge login may) does not move the credits either
            await kv.delete(nodes_mod.node_key("node-x"))
            ledger._labels.clear()
            await publish_signed(service, reading("node-x", T0 + 8 * HOUR, T0 + 9 * HOUR), kx)
            await wait_for(lambda: drained(service), 30, "the ledger to mint after the deletion")
        # a restarted ledger (nothing in memory) with a forged entry in place: the account of
        # node-x's latest transfer, from the log
        await kv.put(nodes_mod.node_key("node-x"), forgeries["signed by the attacker's own node key"])
        async with running_ledger(service, keys.trust) as ledger:
            await publish_signed(service, reading("node-x", T0 + 9 * HOUR, T0 + 10 * HOUR), kx)
            await wait_for(lambda: drained(service), 30, "the restarted ledger to mint")
            # node-x's agent registers again (it does at every start and order): believed again
            await nodes_mod.register(node_x, nodes_mod.NodeInfo(node="node-x", labels={"account": "acme-2"},
                                                                updated_at=when + 2 * HOUR))
            ledger._labels.clear()
            await publish_signed(service, reading("node-x", T0 + 10 * HOUR, T0 + 11 * HOUR), kx)
            await wait_for(lambda: drained(service), 30, "the ledger to mint after re-registration")
        bal = balances(await read_transfers(service))
        assert not any("evil" in account for account in bal), bal
        # every hour went to the account node-x itself named last
        assert bal == {"issuer:negentropy": -8 * 18_000_000, "client:acme": 7 * 18_000_000,
                       "client:acme-2": 18_000_000}, bal
        out = await asyncio.to_thread(cli, "nodes", "ls", env={"NATS_URL": service_settings.nats_url, "SCF_HOME": str(home)})
        assert out.returncode == 0 and "node-x" in out.stdout, out.stdout + out.stderr
    finally:
        for b in buses:
            await b.close()


async def test_registry_entry_signature_binds_node_and_key(bus, settings):
    """Pure checks on the entry format: tampered bytes, a wrong role, the wrong KV key."""
    keys = Keys(settings)
    k = keys.node("n1")
    info = nodes_mod.NodeInfo(node="n1", labels={"account": "acme"})
    good = nodes_mod.encode_entry(info, k)
    assert nodes_mod.decode_entry("n1", good, keys.trust) == (info, None)
    tampered = good.replace(b"acme", b"evil")
    assert nodes_mod.decode_entry("n1", tampered, keys.trust)[0] is None
    assert nodes_mod.decode_entry("n2", good, keys.trust)[0] is None  # copied under another key
    by_operator = nodes_mod.encode_entry(info, keys.operator)
    found, problem = nodes_mod.decode_entry("n1", by_operator, keys.trust)
    assert found is None and "lacks the 'node' role" in problem


async def test_edge_agent_never_reports_a_non_finite_or_absurd_meter_file(bus, settings, tmp_path):
    """Meter files from a bridge: out-of-range, negative and absurd readings go to
    meter/bad/ with a log line; a good one is sent. A mixed naive/aware period is one the
    ledger can still order (no exception: a rejection)."""
    import json

    from scf.consumers.edge import EdgeAgent

    keys = Keys(settings)
    k = keys.node("n1")
    node_bus = await Bus.connect(settings, "edge-n1", key=k)
    try:
        agent = EdgeAgent(node_bus, "n1", tmp_path / "n1", keys.trust, register=False)
        meter = tmp_path / "n1" / "meter"
        period = {"period_start": "2026-11-03T10:00:00Z", "period_end": "2026-11-03T11:00:00Z"}
        (meter / "a.json").write_text(json.dumps({**period, "baseline_kwh": -1.0, "actual_kwh": 1.0}))
        (meter / "b.json").write_text(json.dumps({**period, "baseline_kwh": 1e300, "actual_kwh": 1.0}))
        (meter / "c.json").write_bytes(b'{"period_start": "2026-11-03T10:00:00Z", "period_end": "2026-11-03T11:00:00Z",'
                                       b' "baseline_kwh": 1e999, "actual_kwh": 1.0}')
        (meter / "d.json").write_text(json.dumps({**period, "baseline_kwh": 5.0, "actual_kwh": 1.0, "meter": " Main",
                                                  **mv_fields(5.0, 1.0)}))
        assert await agent.meter.report_files() == 1
        assert sorted(p.name for p in (meter / "bad").iterdir()) == ["a.json", "b.json", "c.json"]
        assert await stream_count(bus, "DEPLOY", "energy.measured.>") == 1
    finally:
        await node_bus.close()
    mixed = reading(start=T0.replace(tzinfo=None), end=T0 - HOUR)
    async with running_ledger(bus, keys.trust):
        await publish_signed(bus, mixed, k)
        await wait_for(lambda: drained(bus), 30, "the ledger to drain")
    reasons = sorted(r.reason for r in await rejections(bus))
    assert len(reasons) == 1 and "before it starts" in reasons[0], reasons
    assert len(await read_transfers(bus)) == 1  # the good meter file's hour


async def test_a_node_label_cannot_credit_the_issuer_or_another_node(bus, settings):
    """A node's own (validly signed) entry naming the issuer (a transfer debiting and
    crediting one account: `verify` would fail for everyone) or another node's account."""
    keys = Keys(settings)
    k = keys.node("n1")
    async with running_ledger(bus, keys.trust) as ledger:
        for hour, account in enumerate(["issuer:negentropy", "node:n2", "client:", "acme"]):
            await nodes_mod.register(bus, nodes_mod.NodeInfo(node="n1", labels={"account": account}), key=k)
            ledger._labels.clear()  # (the ledger caches labels for 30 s)
            await publish_signed(bus, reading(start=T0 + hour * HOUR, end=T0 + (hour + 1) * HOUR), k)
            await wait_for(lambda: drained(bus), 30, f"the ledger to decide ({account})")
    reasons = [r.reason for r in await rejections(bus)]
    assert len(reasons) == 3 and all("names no client account" in r for r in reasons), reasons
    assert balances(await read_transfers(bus)) == {"issuer:negentropy": -18_000_000, "client:acme": 18_000_000}
    assert (await verify(bus, trust=keys.trust)).ok


def test_periods_index_half_open_overlaps():
    from scf.consumers.ledger import Claim, Periods

    p = Periods()
    key = ("n1", "main")
    for i in (0, 2, 4):  # [0,10) [20,30) [40,50)
        p.add(key, Claim(i * 10, i * 10 + 10, f"c{i}", f"t{i}", i))
    assert p.overlapping(key, 10, 20, "new") is None  # adjacent on both sides
    assert p.overlapping(key, 0, 10, "c0") is None  # the same cause is a repeat, not an overlap
    assert p.overlapping(key, 9, 11, "new").cause_id == "c0"
    assert p.overlapping(key, 29, 41, "new").cause_id == "c4"  # the latest one it reaches
    assert p.overlapping(key, -5, 100, "new") is not None  # around everything
    assert p.overlapping(key, 22, 23, "new").cause_id == "c2"  # inside
    assert p.overlapping(("n1", "pv"), 0, 10, "new") is None  # another meter
    p.add(key, Claim(0, 10, "c0", "t0", 99))  # a cause is indexed once
    assert len(p) == 3
