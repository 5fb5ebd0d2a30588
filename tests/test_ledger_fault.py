"""The ledger under fault: `scf run ledger` (a real process) is killed with SIGKILL at
random points while measurements — with duplicates of every kind, and bad ones — flow, and
restarted each time. The final balances must equal a model computed independently from
the measurements, and `scf ledger verify` must pass."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import signal
from collections import defaultdict
from decimal import ROUND_HALF_EVEN, Decimal

import msgspec
import pytest

from scf.bus import codec
from scf.bus import events as ev
from scf.bus.client import Bus
from scf.bus.ids import new_id
from scf.bus.reader import read
from scf.consumers.energy import measurement_event
from scf.consumers.ledger import balances, read_transfers
from tests.conftest import scf, stream_count, wait_for
from tests.mv_support import passing_mv
from tests.test_deploy_helpers import Keys, logs, start_process, stop, utc

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

RATE = "0.37"
MAX_KWH = 400.0


def expected_micro(baseline: float, actual: float) -> int:
    """The model: written independently of consumers.ledger (string decimals, no helpers)."""
    saved = Decimal(str(baseline)) - Decimal(str(actual))
    return int((saved * Decimal(RATE) * 1_000_000).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


async def test_ledger_survives_sigkill_with_duplicates(bus, settings, scf_env, tmp_path):
    rng = random.Random(20261122)
    keys = Keys(settings)
    nodes = [f"node-{i}" for i in range(4)]
    node_keys = {n: keys.node(n) for n in nodes}
    (settings.home_path / "scf.toml").write_text(
        # Small batches, so that a kill falls between batches with work in hand; a short
        # ack_wait, so that what a killed process held is redelivered within the test.
        f"[ledger]\nrate = {RATE}\nmax_saved_kwh = {MAX_KWH}\nbatch = 4\nack_wait = 2.0\n"
    )
    env = dict(scf_env, SCF_LOG="INFO")

    # The measurements: 240 causes, ~12% invalid (negative, implausible, unsigned).
    causes = []
    for i in range(240):
        node = rng.choice(nodes)
        start = utc(2026, 11, 1) + dt.timedelta(hours=i)
        baseline = round(rng.uniform(1, 300), 3)
        kind = rng.random()
        if kind < 0.04:
            actual = baseline + round(rng.uniform(0.1, 5), 3)  # negative saving
        elif kind < 0.08:
            baseline, actual = 5000.0, 1.0  # implausible
        else:
            actual = round(baseline - rng.uniform(0.001, min(baseline, MAX_KWH) * 0.9), 3)
        event = measurement_event(node, period_start=start, period_end=start + dt.timedelta(hours=1),
                                  baseline_kwh=baseline, actual_kwh=actual, method="metered-vs-baseline", source="meter",
                                  **passing_mv(baseline, actual))
        signed = kind >= 0.08 and rng.random() > 0.05
        causes.append((event, signed))

    # What flows: each cause once, plus duplicates: the identical message again (same
    # Nats-Msg-Id), the same measurement re-sent with a new envelope id (beyond any dedup
    # window), shuffled so repeats arrive late.
    flow: list[tuple[ev.EnergyMeasured, bool]] = []
    for event, signed in causes:
        flow.append((event, signed))
        r = rng.random()
        if r < 0.3:
            flow.append((event, signed))
        if r < 0.5 or r > 0.9:
            later = ev.EnergyMeasured.new(event.data, source="meter", id=new_id(), at=event.at + dt.timedelta(days=1))
            flow.append((later, signed))
    head, tail = flow[: len(flow) // 2], flow[len(flow) // 2 :]
    rng.shuffle(tail)
    flow = head + tail

    async def publish(items):
        for event, signed in items:
            raw = codec.sign(event, node_keys[event.data.node]) if signed else codec.encode(event)
            await bus.js.publish(event.subject(), raw, headers=Bus.headers(event))

    proc = start_process(env, "ledger", tmp_path)
    kills = mid_flight = 0
    try:
        batches = [flow[i : i + 50] for i in range(0, len(flow), 50)]
        for n, batch in enumerate(batches):
            before = await stream_count(bus, "LEDGER")
            await publish(batch)
            # Fault injection: every other round the process dies the moment its first new
            # output of the round appears (transfers stored, the rest of its work — the
            # rejections, the acks, the next batches — not done); otherwise at a random
            # moment (during start-up, mid-batch, or idle).
            if n % 2 == 0:
                await _first_progress(bus, before)
            else:
                await asyncio.sleep(rng.uniform(0.0, 1.2))  # a random kill time, not a wait for a condition
            # Freeze the process, look at what it holds (delivered, not acknowledged), kill it.
            proc.send_signal(signal.SIGSTOP)
            info = await bus.js.consumer_info("DEPLOY", "ledger")
            mid_flight += info.num_ack_pending > 0
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            kills += 1
            proc = start_process(env, "ledger", tmp_path)
        await wait_for(lambda: _drained(bus, len(flow)), 90, "the ledger to handle every measurement")
    finally:
        assert stop(proc) in (0, -signal.SIGTERM), logs(tmp_path)
    assert kills >= 5 and mid_flight >= 3, (kills, mid_flight)

    # The model: one credit per valid signed cause, to node:<id>; the issuer pays for all.
    model: dict[str, int] = defaultdict(int)
    minted = 0
    for event, signed in causes:
        m = event.data
        saved = Decimal(str(m.baseline_kwh)) - Decimal(str(m.actual_kwh))
        if not signed or saved <= 0 or saved > Decimal(str(MAX_KWH)):
            continue
        amount = expected_micro(m.baseline_kwh, m.actual_kwh)
        model[f"node:{m.node}"] += amount
        model["issuer:negentropy"] -= amount
        minted += 1

    entries = await read_transfers(bus)
    assert len(entries) == minted
    assert balances(entries) == dict(model)
    # Every invalid cause was reported (at least once; repeats of a rejection may repeat).
    rejected = {msgspec.json.decode(m.data)["data"]["cause_id"] for m in await read(bus, "LEDGER", "ledger.rejected.>")}
    assert len(rejected) == len(causes) - minted
    assert await stream_count(bus, "DLQ") == 0

    out = scf("ledger", "verify", env=scf_env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith(f"ok: {minted} transfers")


async def _first_progress(bus: Bus, before: int, timeout: float = 10.0) -> None:
    """Return as soon as LEDGER grows past `before` (tight polling: the kill should land
    while the rest of the round is still being handled)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while await stream_count(bus, "LEDGER") <= before and loop.time() < end:
        await asyncio.sleep(0.002)  # polling interval of the awaited condition above


async def _drained(bus: Bus, n: int) -> bool:
    try:
        info = await bus.js.consumer_info("DEPLOY", "ledger")
    except Exception:
        return False
    return info.num_pending == 0 and info.num_ack_pending == 0

