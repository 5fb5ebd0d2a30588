"""The ledger verifies a fetched batch's signatures in threads (`[ledger] verify_threads`):
every outcome is the one the loop would have reached alone — good measurements minted once,
unsigned / untrusted / altered ones rejected with their reasons — in a batch large enough
for the threads. Real nats-server."""

from __future__ import annotations

import asyncio
import dataclasses
import os

import pytest

from scf.bus import codec
from scf.bus.client import Bus
from scf.consumers import ledger as ledger_mod
from scf.consumers.ledger import VERIFY_CHUNK_MIN, LedgerSettings, read_transfers, verify_threads_for
from tests.conftest import stream_count, wait_for
from tests.test_deploy_helpers import Keys
from tests.test_ledger import consumer_done, measurement, publish_signed, rejections, running_ledger

pytestmark = pytest.mark.anyio


async def publish_altered(bus: Bus, event, key) -> None:
    """Signed, then one reading changed in the signed bytes: the signature no longer holds."""
    raw = codec.sign(event, key).replace(b'"actual_kwh":8.0', b'"actual_kwh":7.0')
    assert raw != codec.sign(event, key)
    await bus.js.publish(event.subject(), raw, headers=Bus.headers(event))


@pytest.mark.parametrize("threads", [2, 1])
async def test_a_batch_verified_in_threads_mints_and_rejects_as_one_by_one(bus, settings, threads):
    keys = Keys(settings)
    k1, k2 = keys.node("n1"), keys.node("n2")
    good = 3 * VERIFY_CHUNK_MIN  # enough for the threads (2 chunks of at least VERIFY_CHUNK_MIN)
    for h in range(good):
        await publish_signed(bus, measurement("n1" if h % 2 else "n2", 9.0, 8.0, hour=h), k1 if h % 2 else k2)
    await publish_signed(bus, measurement("n1", 9.0, 8.0, hour=good), None)  # unsigned
    await publish_signed(bus, measurement("n1", 9.0, 8.0, hour=good + 1), keys.operator)  # not a node key
    await publish_altered(bus, measurement("n1", 9.0, 8.0, hour=good + 2), k1)  # altered after signing
    async with running_ledger(bus, keys, LedgerSettings(rate=0.5, verify_threads=threads)) as ledger:
        await wait_for(lambda: consumer_done(bus), 60, "the ledger to drain")
        assert ledger.counts["new"] == good and ledger.counts["rejected"] == 3
    transfers = await read_transfers(bus)
    assert len(transfers) == good and len({e.transfer.cause_id for e in transfers}) == good
    reasons = sorted(r.reason for r in await rejections(bus))
    assert len(reasons) == 3
    assert any("missing signature" in r for r in reasons)
    assert any("lacks the 'node' role" in r for r in reasons)
    assert any("bad signature" in r for r in reasons)
    assert await stream_count(bus, "DLQ") == 0


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_verify_threads_by_the_cpus_the_process_may_use():
    assert [verify_threads_for(LedgerSettings(verify_threads=t)) for t in (1, 2, 3)] == [1, 2, 3]  # as set
    auto = LedgerSettings()
    assert auto.verify_threads == -1
    cpus = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(cpus)})  # one CPU: no second thread could verify beside the loop
        assert verify_threads_for(auto) == 1
    finally:
        os.sched_setaffinity(0, cpus)
    assert verify_threads_for(auto) == (2 if len(cpus) >= 2 else 1)


class Gate:
    """A pause gate (the emergency stop's interface)."""

    def __init__(self) -> None:
        self._clear = asyncio.Event()
        self._clear.set()

    @property
    def engaged(self) -> bool:
        return not self._clear.is_set()

    async def wait_clear(self) -> None:
        await self._clear.wait()


async def publish_measurements(bus: Bus, settings, total: int) -> Keys:
    """`total` signed measurements, one an hour, alternately of nodes n2 and n1: their keys."""
    keys = Keys(settings)
    node_keys = {n: keys.node(n) for n in ("n1", "n2")}
    for h in range(total):
        node = "n1" if h % 2 else "n2"
        await publish_signed(bus, measurement(node, 9.0, 8.0, hour=h), node_keys[node])
    return keys


@pytest.mark.parametrize(("pauses", "ack_wait", "hold_s"), [(1, 3.0, 7.5), (3, 600.0, 0.0)])
async def test_batches_taken_ahead_are_held_through_pauses_and_minted_on_their_first_delivery(
        bus, settings, monkeypatch, pauses, ack_wait, hold_s):
    """With batches of 64 and 4 x 64 measurements waiting, the ledger takes the next batch
    (and verifies it) while it handles one. The emergency stop engages after each of the first
    `pauses` batches, each time with the next batch taken ahead; the consumer allows one
    delivery (max_deliver 1; the server's backstop, one more, is for the DLQ rule). The batches
    taken ahead (the next one, decided while batch k was minted, and the one after it, being
    verified) are held through the pause, not minted, kept alive (in-progress acks) past their
    ack_wait when the pause is long (`hold_s`), and handled on their first delivery. Given back (nak'ed)
    instead, each pause spent one of its deliveries: past max_deliver a measurement is never
    delivered again and never reaches the DLQ (a saving not minted)."""
    # The take-ahead waits 2 ms for what is there already; on a loaded machine the server's
    # answer can come later and no batch is taken ahead: wait for it here (it is there).
    monkeypatch.setattr(ledger_mod, "AHEAD_WAIT_S", 5.0)
    monkeypatch.setattr(ledger_mod, "LEDGER_CONSUMER", dataclasses.replace(ledger_mod.LEDGER_CONSUMER, max_deliver=1))
    total = 4 * 64
    keys = await publish_measurements(bus, settings, total)
    gate, deliveries = Gate(), {}
    cfg = LedgerSettings(rate=0.5, batch=64, verify_threads=2, ack_wait=ack_wait)
    async with running_ledger(bus, keys, cfg, pause=gate) as ledger:
        settle_batch, handled = ledger.settle_batch, asyncio.Event()

        async def then_pause(decided):
            for d in decided:
                deliveries.setdefault(d.msg.metadata.sequence.stream, []).append(d.msg.metadata.num_delivered)
            await settle_batch(decided)
            if ledger.counts["new"] <= pauses * 64:
                gate._clear.clear()  # the emergency stop engages as the batch ends
            handled.set()
        ledger.settle_batch = then_pause  # type: ignore[method-assign]
        for k in range(1, pauses + 1):
            await wait_for(handled.is_set, 60, f"batch {k} and the pause")
            handled.clear()

            taken = min(total, (k + 2) * 64)  # the two batches after batch k (the last has one)

            async def next_taken_ahead_and_held(k=k, taken=taken) -> bool:
                info = await bus.js.consumer_info("DEPLOY", "ledger")
                return info.delivered.stream_seq == taken and info.num_ack_pending == taken - k * 64

            await wait_for(next_taken_ahead_and_held, 60, f"the batches after batch {k} taken ahead and held")
            if hold_s:
                await asyncio.sleep(hold_s)  # ack_wait passes (several times): the batch held must stay held
            assert ledger.counts["new"] == k * 64 and gate.engaged
            info = await bus.js.consumer_info("DEPLOY", "ledger")
            assert info.num_ack_pending == taken - k * 64 and info.num_pending == total - taken  # held, not given back
            gate._clear.set()
        await wait_for(lambda: consumer_done(bus), 60, "the ledger to drain after the pauses")
        assert ledger.counts["new"] == total
    assert sorted(deliveries) == list(range(1, total + 1))  # every measurement handled ...
    assert all(d == [1] for d in deliveries.values()), {s: d for s, d in deliveries.items() if d != [1]}  # ... once, on its first delivery
    transfers = await read_transfers(bus)
    assert len(transfers) == total and len({e.transfer.cause_id for e in transfers}) == total
    assert await stream_count(bus, "DLQ") == 0
