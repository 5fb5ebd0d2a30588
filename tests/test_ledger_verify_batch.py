"""The ledger verifies a fetched batch's signatures in threads (`[ledger] verify_threads`):
every outcome is the one the loop would have reached alone — good measurements minted once,
unsigned / untrusted / altered ones rejected with their reasons — in a batch large enough
for the threads. Real nats-server."""

from __future__ import annotations

import pytest

from scf.bus import codec
from scf.bus.client import Bus
from scf.consumers.ledger import VERIFY_CHUNK_MIN, LedgerSettings, read_transfers
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
