"""The ledger: rules (pure), then the runner against a real nats-server: one transfer per
cause, repeats acknowledged, conflicts and bad measurements rejected with reasons, a repeat
beyond the duplicate window, the emergency stop, and the CLI (balance / history / verify)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from decimal import Decimal

import msgspec
import pytest
from nats.js.errors import NotFoundError

from scf.bus import codec
from scf.bus import events as ev
from scf.bus.client import Bus
from scf.bus.emergency import EmergencyGate
from scf.bus.headers import MSG_ID
from scf.bus.ids import new_id
from scf.consumers.energy import measurement_event
from scf.consumers.ledger import (
    Ledger,
    LedgerSettings,
    balances,
    cause_digest,
    check,
    credit_account,
    micro_credits,
    read_transfers,
    saved_kwh,
    transfer_id_for,
    verify,
)
from scf.consumers.nodes import NodeInfo, register
from tests.conftest import cli, stream_count, wait_for
from tests.mv_support import mv_options, passing_mv
from tests.test_deploy_helpers import Keys, utc

T0 = utc(2026, 11, 1, 0, 0)


def measurement(node: str = "n1", baseline: float = 10.0, actual: float = 7.5, hour: int = 0, method: str = "metered-vs-baseline"):
    start = T0 + dt.timedelta(hours=hour)
    return measurement_event(node, period_start=start, period_end=start + dt.timedelta(hours=1), baseline_kwh=baseline,
                             actual_kwh=actual, method=method, source="test", **passing_mv(baseline, actual))


def again(event: ev.EnergyMeasured, **changes) -> ev.EnergyMeasured:
    """The same measurement re-sent later: a new envelope id (a new Nats-Msg-Id), same cause."""
    data = msgspec.structs.replace(event.data, **changes) if changes else event.data
    return ev.EnergyMeasured.new(data, source="test", id=new_id(), at=event.at + dt.timedelta(days=1))


# --------------------------------------------------------------------------- pure rules


def test_amounts_are_exact_integers():
    assert saved_kwh(measurement(baseline=0.3, actual=0.1).data) == 0.2
    assert micro_credits(0.2, 0.25) == 50_000
    assert micro_credits(1.0000005, 1.0) == 1_000_000  # half-even: 1000000.5 -> 1000000
    assert micro_credits(1.0000015, 1.0) == 1_000_002
    assert micro_credits(12345.678901, 0.1) == int(Decimal("12345.678901") * Decimal("0.1") * 1_000_000)


def test_check_rejects_with_reasons():
    s = LedgerSettings(max_saved_kwh=100.0)
    assert check(measurement().data, s) is None
    assert "negative saving" in check(measurement(baseline=5, actual=6).data, s)
    assert "no saving" in check(measurement(baseline=5, actual=5).data, s)
    assert "implausible" in check(measurement(baseline=500, actual=1).data, s)
    assert "negative" in check(measurement(baseline=-5, actual=-6).data, s)
    assert "not a number" in check(measurement(baseline=float("nan")).data, s)
    m = measurement().data
    backwards = msgspec.structs.replace(m, period_end=m.period_start - dt.timedelta(hours=1))
    assert "before it starts" in check(backwards, s)


def test_digest_and_accounts():
    a, b = measurement(), measurement()
    assert a.data.measurement_id == b.data.measurement_id and cause_digest(a.data) == cause_digest(b.data)
    assert cause_digest(a.data) != cause_digest(msgspec.structs.replace(a.data, actual_kwh=7.4))
    s = LedgerSettings()
    assert credit_account("n1", {}, s) == "node:n1"
    assert credit_account("n1", {"account": "acme"}, s) == "client:acme"
    assert credit_account("n1", {"account": "client:acme-gmbh"}, s) == "client:acme-gmbh"


# --------------------------------------------------------------------------- against nats-server



@contextlib.asynccontextmanager
async def running_ledger(bus: Bus, keys: Keys, settings: LedgerSettings = LedgerSettings(rate=0.5), pause=None, mode: str = "batched"):
    """The ledger's batched loop (what `scf run ledger` runs), or its per-message path in
    the standard runner."""
    ledger = Ledger(bus, keys.trust, settings)
    stop = asyncio.Event()
    if mode == "batched":
        task = asyncio.create_task(ledger.run(stop, pause=pause, fetch_timeout=0.2))
    else:
        task = asyncio.create_task(ledger.runner(pause=pause, fetch_timeout=0.2).run(stop))
    try:
        yield ledger
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def publish_signed(bus: Bus, event: ev.Event, key) -> int:
    raw = codec.sign(event, key) if key else codec.encode(event)
    ack = await bus.js.publish(event.subject(), raw, headers=Bus.headers(event))
    return ack.seq


async def consumer_done(bus: Bus, n_before: int = 0) -> bool:
    try:
        info = await bus.js.consumer_info("DEPLOY", "ledger")
    except NotFoundError:  # the ledger task has not created its consumer yet
        return False
    return info.num_pending == 0 and info.num_ack_pending == 0 and info.delivered.stream_seq > n_before


async def rejections(bus: Bus) -> list[ev.LedgerRejection]:
    from tests.test_deploy_helpers import events_on

    return [e.data for _, e in await events_on(bus, "LEDGER", "ledger.rejected.>", [ev.LedgerRejected])]


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["batched", "runner"])
async def test_one_transfer_per_cause_repeats_and_conflicts(bus, settings, mode):
    keys = Keys(settings)
    k1 = keys.node("n1")
    k2 = keys.node("n2")
    await register(bus, NodeInfo(node="n2", labels={"account": "acme"}), key=k2)  # signed by n2 itself
    async with running_ledger(bus, keys, mode=mode) as ledger:
        m1 = measurement("n1", 10.0, 7.5, hour=0)
        await publish_signed(bus, m1, k1)
        await publish_signed(bus, m1, k1)  # same event id: JetStream drops it
        await publish_signed(bus, again(m1), k1)  # a day later, new Nats-Msg-Id: same cause
        m2 = measurement("n2", 4.0, 1.0, hour=0)
        await publish_signed(bus, m2, k2)
        await publish_signed(bus, again(m1, actual_kwh=5.0), k1)  # same cause, different content
        await wait_for(lambda: consumer_done(bus), 20, "the ledger to drain")
        assert ledger.counts["new"] == 2
        assert ledger.counts["duplicate"] == 1
        assert ledger.counts["conflict"] == 1

    entries = await read_transfers(bus)
    assert len(entries) == 2
    assert balances(entries) == {"issuer:negentropy": -2_750_000, "node:n1": 1_250_000, "client:acme": 1_500_000}
    t1 = next(e.transfer for e in entries if e.transfer.cause_id == m1.data.measurement_id)
    assert t1.transfer_id == transfer_id_for(m1.data.measurement_id) and t1.kwh == 2.5 and t1.rate == 0.5
    rej = await rejections(bus)
    assert len(rej) == 1 and rej[0].reason.startswith("conflict:") and rej[0].cause_id == m1.data.measurement_id
    report = await verify(bus)
    assert report.ok, report.lines()
    assert report.transfers == 2 and report.debits == report.credits == 2_750_000


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["batched", "runner"])
async def test_bad_measurements_are_rejected_with_reasons(bus, settings, mode):
    keys = Keys(settings)
    k1 = keys.node("n1")
    keys.node("n2")
    async with running_ledger(bus, keys, LedgerSettings(max_saved_kwh=50.0), mode=mode):
        await publish_signed(bus, measurement("n1", 5, 6, hour=1), k1)  # negative
        await publish_signed(bus, measurement("n1", 500, 1, hour=2), k1)  # implausible
        await publish_signed(bus, measurement("n1", 9, 8, hour=3), None)  # unsigned
        await publish_signed(bus, measurement("n1", 9, 8, hour=4), keys.operator)  # not a node key
        await publish_signed(bus, measurement("n1", 9, 8, hour=5), keys.nodes["n2"])  # n2 reporting for n1
        await wait_for(lambda: consumer_done(bus), 20, "the ledger to drain")
    assert await read_transfers(bus) == []
    reasons = sorted(r.reason for r in await rejections(bus))
    assert len(reasons) == 5
    assert any("negative saving" in r for r in reasons)
    assert any("implausible" in r for r in reasons)
    assert any("unsigned or untrusted" in r and "missing signature" in r for r in reasons)
    assert any("lacks the 'node' role" in r for r in reasons)
    assert any("may only report its own savings" in r for r in reasons)
    assert await stream_count(bus, "DLQ") == 0


@pytest.mark.anyio
async def test_repeat_beyond_the_duplicate_window_mints_once(bus, settings):
    """The transfer's event id is derived from the measurement's: a redelivery within the
    window is dropped by JetStream's dedup. Here the LEDGER window is shortened to 1 s and
    the repeat arrives after it (a "day later"): only the per-subject expected sequence
    stops the second mint."""
    keys = Keys(settings)
    k1 = keys.node("n1")
    info = await bus.js.stream_info("LEDGER")
    cfg = info.config
    cfg.duplicate_window = 1.0
    await bus.js.update_stream(cfg)
    m = measurement("n1", 3.0, 1.0)
    async with running_ledger(bus, keys) as ledger:
        await publish_signed(bus, m, k1)
        await wait_for(lambda: stream_count(bus, "LEDGER"), 10, "the first transfer")
        minted_at = time.monotonic()
        await wait_for(lambda: time.monotonic() - minted_at > 1.2, 5, "the 1 s duplicate window to pass")
        # The identical event again (same envelope id → same transfer event id), under a
        # new Nats-Msg-Id so that DEPLOY's own window does not drop it first.
        raw = codec.sign(m, k1)
        await bus.js.publish(m.subject(), raw, headers={MSG_ID: f"{m.id}:day-2"})
        await wait_for(lambda: ledger.counts["duplicate"] == 1, 10, "the repeat to be acknowledged as done")
    assert len(await read_transfers(bus)) == 1
    assert (await verify(bus)).ok


@pytest.mark.anyio
async def test_emergency_stop_holds_minting(bus, settings):
    keys = Keys(settings)
    k1 = keys.node("n1")
    settings.emergency_lock.touch()
    gate = await EmergencyGate(bus, settings.emergency_lock, poll=0.05).start()
    try:
        async with running_ledger(bus, keys, pause=gate):
            await publish_signed(bus, measurement("n1", 3.0, 1.0), k1)
            held_since = time.monotonic()
            await wait_for(lambda: time.monotonic() - held_since > 0.5, 5, "half a second of emergency stop")
            assert await stream_count(bus, "LEDGER") == 0
            settings.emergency_lock.unlink()
            await wait_for(lambda: stream_count(bus, "LEDGER"), 10, "the mint after the release")
    finally:
        await gate.stop()


@pytest.mark.anyio
async def test_cli_balance_history_verify(bus, settings, scf_env):
    keys = Keys(settings)
    k1 = keys.node("n1")
    async with running_ledger(bus, keys, LedgerSettings(rate=2.0)):
        for h in range(2):
            await publish_signed(bus, measurement("n1", 10.0, 9.0, hour=h), k1)
        # The third through `scf energy report`, as a meter bridge would (signed with keys/n1.key).
        rep = await asyncio.to_thread(cli, "energy", "report", "--node", "n1", "--baseline", "10", "--actual", "9",
                  "--start", "2026-11-01T02:00:00Z", "--end", "2026-11-01T03:00:00Z", *mv_options(10, 9), env=scf_env)
        assert rep.returncode == 0 and "1 kWh saved ± 0.1 kWh (90%), calibration hourly CV(RMSE) 5.0% NMBE +1.0%" in rep.stdout, rep.stderr
        assert rep.stdout.startswith(f"measurement {measurement('n1', hour=2).data.measurement_id}")
        await wait_for(lambda: stream_count(bus, "LEDGER"), 10, "transfers")
        await wait_for(lambda: consumer_done(bus), 20, "the ledger to drain")
    out = await asyncio.to_thread(cli, "ledger", "balance", env=scf_env)
    assert out.returncode == 0, out.stderr
    assert "node:n1" in out.stdout and "6.000000" in out.stdout and "-6.000000" in out.stdout
    one = await asyncio.to_thread(cli, "ledger", "balance", "node:n1", env=scf_env)
    assert one.stdout.strip() == "node:n1  6.000000"
    hist = await asyncio.to_thread(cli, "ledger", "history", "--account", "node:n1", env=scf_env)
    assert hist.returncode == 0 and len(hist.stdout.strip().splitlines()) == 3
    nokey = await asyncio.to_thread(cli, "energy", "report", "--node", "ghost", "--baseline", "2", "--actual", "1",
                "--start", "2026-11-01T00:00:00Z", "--end", "2026-11-01T01:00:00Z", *mv_options(2, 1), env=scf_env)
    assert nokey.returncode == 1
    assert nokey.stderr.strip() == "Error: no signing key for node ghost: create it with `scf keys new ghost` or pass --key"
    ok = await asyncio.to_thread(cli, "ledger", "verify", env=scf_env)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 3 transfers"), ok.stdout + ok.stderr

    # A forged transfer (a second one for the same cause, on another subject) fails verify.
    first = (await read_transfers(bus))[0].transfer
    forged = ev.LedgerTransfer.new(
        ev.Transfer(transfer_id="forged", cause_id=first.cause_id, debit_account="issuer:negentropy",
                    credit_account="node:n1", micro_credits=1, kwh=first.kwh, rate=first.rate),
        source="mallory",
    )
    await bus.publish(forged)
    bad = await asyncio.to_thread(cli, "ledger", "verify", env=scf_env)
    assert bad.returncode == 1
    assert "minted 2 times" in bad.stdout and "not derived from its cause" in bad.stdout
