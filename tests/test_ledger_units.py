"""Units in the ledger (issue 13): a grid site's Option D measurement is kWh of fuel, an HVAC
site's kWh of electricity; the ledger mints each as its own instrument and never adds them.
A real nats-server, the real ledger loop, signed measurements, the DuckDB views over real
Parquet and the `scf ledger` CLI (docs/ledger.md, "Units")."""

from __future__ import annotations

import asyncio
import datetime as dt

import msgspec
import pytest

from scf.bus import events as ev
from scf.bus.errors import ConfigError
from scf.bus.ids import new_id
from scf.bus.settings import load as load_settings
from scf.consumers.energy import measurement_event
from scf.consumers.ledger import (
    ELECTRIC,
    FUEL,
    LedgerError,
    LedgerSettings,
    balances,
    balances_by_unit,
    read_transfers,
    transfer_for,
    unit_of,
    verify,
)
from scf.consumers.nodes import NodeInfo, register
from scf.projections import report, sample, views
from scf.projections.store import ArchiveStore
from tests.conftest import cli, wait_for
from tests.mv_support import passing_mv
from tests.test_deploy_helpers import Keys, utc
from tests.test_ledger import consumer_done, publish_signed, rejections, running_ledger

T0 = utc(2026, 11, 1, 0, 0)
SETTINGS = LedgerSettings(rate=1.0, max_saved_kwh=1e7)


async def drained(bus) -> bool:
    """The ledger has handled everything on DEPLOY up to its last message."""
    return await consumer_done(bus, await bus.stream_last_seq("DEPLOY") - 1)


def reading(node: str, baseline: float, actual: float, hour: int = 0, meter: str = "", unit: str = "") -> ev.EnergyMeasured:
    start = T0 + dt.timedelta(hours=hour)
    return measurement_event(node, period_start=start, period_end=start + dt.timedelta(hours=1), baseline_kwh=baseline,
                             actual_kwh=actual, method="ipmvp-option-d test", meter=meter, unit=unit, source="test",
                             **passing_mv(baseline, actual))


def test_the_unit_comes_from_the_measurement_or_its_meter():
    s = LedgerSettings()
    assert unit_of(reading("n1", 10, 9).data, "main", s) == (ELECTRIC, None)  # an HVAC site's main meter
    assert unit_of(reading("g1", 10, 9, meter="fuel").data, "fuel", s) == (FUEL, None)
    assert unit_of(reading("g1", 10, 9, meter="fuel", unit=" KWh-Fuel ").data, "fuel", s) == (FUEL, None)
    assert unit_of(reading("g1", 10, 9, meter="aux", unit="kwh-electric").data, "aux", s) == (ELECTRIC, None)
    unit, why = unit_of(reading("g1", 10, 9, meter="aux").data, "aux", s)
    assert unit == "" and why.startswith("no unit: meter 'aux' of node g1 has none in [ledger] meter_units")
    unit, why = unit_of(reading("g1", 10, 9, meter="fuel", unit="kWh").data, "fuel", s)
    assert unit == "" and why.startswith("unknown unit 'kWh' (ambiguous: kWh of what?)") and "kwh-fuel (kWh of fuel" in why
    unit, why = unit_of(reading("g1", 10, 9, meter="fuel", unit="kwh-electric").data, "fuel", s)
    assert unit == "" and why.startswith("unit kwh-electric contradicts meter fuel, which measures kwh-fuel")
    # the map is a setting: a site that meters fuel on its main meter says so
    assert unit_of(reading("g2", 10, 9).data, "main", LedgerSettings(meter_units={"main": "kwh-fuel"})) == (FUEL, None)
    with pytest.raises(msgspec.ValidationError, match=r"meter_units.main = 'therms' is not a unit the ledger knows"):
        msgspec.convert({"meter_units": {"main": "therms"}}, LedgerSettings)


def test_meter_units_from_scf_toml(tmp_path):
    (tmp_path / "scf.toml").write_text('[ledger]\nmeter_units = { main = "kwh-electric", boiler = "kwh-fuel" }\n')
    s = load_settings(env={"SCF_HOME": str(tmp_path)}).section("ledger", LedgerSettings)
    assert unit_of(reading("n1", 10, 9, meter="boiler").data, "boiler", s) == (FUEL, None)
    assert unit_of(reading("n1", 10, 9, meter="fuel").data, "fuel", s)[0] == ""  # the table replaces the default
    (tmp_path / "scf.toml").write_text('[ledger]\nmeter_units = { main = "therms" }\n')
    with pytest.raises(ConfigError, match=r"^\[ledger\] in .*scf.toml: meter_units.main = 'therms' is not a unit the ledger knows: "
                                          r"use one of kwh-electric, kwh-fuel"):
        load_settings(env={"SCF_HOME": str(tmp_path)}).section("ledger", LedgerSettings)


@pytest.mark.anyio
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["batched", "runner"])
async def test_fuel_and_electric_savings_mint_into_different_instruments(bus, settings, mode, tmp_path):
    keys = Keys(settings)
    n1, g1 = keys.node("n1"), keys.node("g1")
    await register(bus, NodeInfo(node="g1", labels={"meters": "fuel,aux"}), key=g1)
    fuel = reading("g1", 1000.0, 900.0, meter="fuel", unit="kwh-fuel")
    sent = [
        (reading("n1", 10.0, 7.5), n1),  # HVAC: electric on the main meter, no unit stated
        (fuel, g1),  # grid: fuel, stated
        # the same cause with the unit left to its meter: the same transfer, a repeat
        (ev.EnergyMeasured.new(msgspec.structs.replace(fuel.data, unit=""), source="test", id=new_id()), g1),
        (reading("g1", 50.0, 40.0, hour=1, meter="aux"), g1),  # no unit, none for the meter
        (reading("g1", 50.0, 40.0, hour=2, meter="fuel", unit="kWh"), g1),  # kWh of what?
        (reading("g1", 50.0, 40.0, hour=3, meter="fuel", unit="kwh-electric"), g1),  # contradicts the fuel meter
        (reading("g1", 5.0, 4.0, hour=4, meter="aux", unit="kwh-electric"), g1),  # stated, on a meter without one
    ]
    async with running_ledger(bus, keys, SETTINGS, mode=mode) as ledger:
        for event, key in sent:
            await publish_signed(bus, event, key)
        await wait_for(lambda: drained(bus), 60, "the ledger to drain")
    assert ledger.counts["new"] == 3 and ledger.counts["duplicate"] == 1, dict(ledger.counts)
    entries = await read_transfers(bus)
    units = {(e.transfer.node, e.transfer.meter): e.transfer.unit for e in entries}
    assert units == {("n1", "main"): ELECTRIC, ("g1", "fuel"): FUEL, ("g1", "aux"): ELECTRIC}
    assert balances_by_unit(entries) == {
        ELECTRIC: {"issuer:negentropy": -3_500_000, "node:n1": 2_500_000, "node:g1": 1_000_000},
        FUEL: {"issuer:negentropy": -100_000_000, "node:g1": 100_000_000},
    }
    assert balances(entries, "kwh-fuel") == {"issuer:negentropy": -100_000_000, "node:g1": 100_000_000}
    with pytest.raises(LedgerError, match=r"several units \(kwh-electric, kwh-fuel\): they are not added together"):
        balances(entries)
    reasons = sorted(r.reason for r in await rejections(bus))
    assert len(reasons) == 3, reasons
    assert reasons[0].startswith("no unit: meter 'aux' of node g1")
    assert reasons[1].startswith("unit kwh-electric contradicts meter fuel, which measures kwh-fuel")
    assert reasons[2].startswith("unknown unit 'kWh' (ambiguous: kWh of what?)")
    checked = await verify(bus, trust=keys.trust, settings=SETTINGS)
    assert checked.ok, checked.lines()
    assert checked.issued == {ELECTRIC: 3_500_000, FUEL: 100_000_000}
    assert "kwh-electric 3.500000; kwh-fuel 100.000000" in checked.lines()[0]

    # The views show the units apart; each unit's books balance on their own.
    store = ArchiveStore(tmp_path / "archive")
    from tests.test_deploy_helpers import events_on

    measured = [e for _, e in await events_on(bus, "DEPLOY", "energy.measured.>", [ev.EnergyMeasured])]
    sample.write_archive(store, measured + [e for _, e in await events_on(bus, "LEDGER", "ledger.transfer.>", [ev.LedgerTransfer])])
    views.write_database(store.root)
    con = views.connect(store.root)
    try:
        rows = con.sql("SELECT account, unit, balance_micro FROM balances ORDER BY unit, account").fetchall()
        assert rows == [("issuer:negentropy", ELECTRIC, -3_500_000), ("node:g1", ELECTRIC, 1_000_000), ("node:n1", ELECTRIC, 2_500_000),
                        ("issuer:negentropy", FUEL, -100_000_000), ("node:g1", FUEL, 100_000_000)]
        assert con.sql("SELECT unit, sum(balance_micro) FROM balances GROUP BY unit ORDER BY unit").fetchall() == [(ELECTRIC, 0), (FUEL, 0)]
        assert con.sql("SELECT meter, unit, kwh FROM ledger WHERE node = 'g1' ORDER BY meter").fetchall() == [
            ("aux", ELECTRIC, 1.0), ("fuel", FUEL, 100.0)]
        # the energy view: every measurement in its unit, stated or its meter's ('' for none: rejected)
        assert con.sql("SELECT unit, count(*) FROM energy GROUP BY unit ORDER BY unit").fetchall() == [
            ("", 1), ("kwh", 1), (ELECTRIC, 3), (FUEL, 2)]
        by_unit = dict(con.sql("SELECT unit, sum(saved_kwh) FROM energy GROUP BY unit").fetchall())
    finally:
        con.close()
    # the value report keeps them apart: credits and energy saved per unit, never one sum
    r = report.build(store.root, tmp_path / "report")
    md = r.markdown.read_text()
    assert "- credits minted (ledger balances, all time): **3.50** kwh-electric; **100.00** kwh-fuel (separate instruments" in md
    assert "| node:g1 | 100.000000 | kwh-fuel | 1 |" in md and "| node:g1 | 1.000000 | kwh-electric | 1 |" in md
    assert r.summary["saved_kwh"] is None  # no single figure across units
    assert r.summary["saved_by_unit"] == pytest.approx(by_unit) and len(by_unit) == 4
    assert f"**{by_unit[FUEL]:.1f} kWh of fuel**" in md and "| g1 | " in md

    # A transfer minted in another unit than its measurement's fails verification.
    later = reading("g1", 30.0, 20.0, hour=5, meter="fuel", unit="kwh-fuel")
    await publish_signed(bus, later, g1)  # no ledger runs: only the forger mints it
    forged = transfer_for(later, "node:g1", SETTINGS, "mallory", unit=ELECTRIC)
    await bus.publish(forged)
    bad = await verify(bus, trust=keys.trust, settings=SETTINGS)
    assert not bad.ok
    assert bad.problems == [f"transfer {forged.data.transfer_id} is minted in kwh-electric, but its measurement "
                            f"(cause {forged.data.cause_id}) is in kwh-fuel"], bad.problems


@pytest.mark.anyio
@pytest.mark.timeout(300)
async def test_scf_ledger_balance_lists_one_unit(bus, settings, scf_env):
    keys = Keys(settings)
    n1, g1 = keys.node("n1"), keys.node("g1")
    await register(bus, NodeInfo(node="g1", labels={"meters": "fuel"}), key=g1)
    async with running_ledger(bus, keys, SETTINGS):
        await publish_signed(bus, reading("n1", 10.0, 4.0), n1)
        await publish_signed(bus, reading("g1", 900.0, 880.0, meter="fuel", unit="kwh-fuel"), g1)
        await wait_for(lambda: drained(bus), 60, "the ledger to drain")
    electric = await asyncio.to_thread(cli, "ledger", "balance", env=scf_env)
    assert electric.returncode == 0, electric.stderr
    assert electric.stdout.split() == ["issuer:negentropy", "-6.000000", "node:n1", "6.000000"]
    assert "kwh-electric: credits of kWh of electricity" in electric.stderr and "also holds kwh-fuel" in electric.stderr
    fuel = await asyncio.to_thread(cli, "ledger", "balance", "node:g1", "--unit", "kwh-fuel", env=scf_env)
    assert fuel.returncode == 0 and fuel.stdout.strip() == "node:g1  20.000000", fuel.stdout + fuel.stderr
    wrong = await asyncio.to_thread(cli, "ledger", "balance", "--unit", "therms", env=scf_env)
    assert wrong.returncode == 1 and wrong.stderr.strip() == (
        "Error: --unit 'therms' is not a unit of the ledger: use one of kwh-electric, kwh-fuel (or none)")
    hist = await asyncio.to_thread(cli, "ledger", "history", env=scf_env)
    assert " 6 kwh-electric @ 1 " in hist.stdout and " 20 kwh-fuel @ 1 " in hist.stdout, hist.stdout
