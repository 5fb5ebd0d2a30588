"""The runner's batched mode (`Runner(batched=True)`, what the safety gate runs): a fetched
batch is handled, its outputs published together, then its inputs acked — with every
per-message rule kept. Real nats-server, the runner in this process."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from nats.js.errors import NotFoundError

from scf.bus import events as ev
from scf.bus.codec import Codec
from scf.bus.dlq import list_dead
from scf.bus.runner import Poison, Runner, event_decoder
from scf.bus.streams import ConsumerSpec, ensure_consumer
from tests.conftest import stream_count, wait_for

pytestmark = pytest.mark.anyio


def intent(i: str) -> ev.IntentCreated:
    return ev.IntentCreated.new(ev.Intent(intent_id=i, kind="train", domain="grid:case9"), source="test")


def verdict_for(event: ev.IntentCreated, source: str) -> ev.VerdictIssued:
    v = ev.Verdict(verdict_id="v-" + event.data.intent_id, subject_id=event.data.intent_id, subject_type="intent",
                   decision="APPROVE", gate="test")
    return ev.VerdictIssued.new(v, source=source, cause=event)


def spec(durable: str, max_deliver: int = 3) -> ConsumerSpec:
    return ConsumerSpec("INTENTS", durable, ("intent.created.>",), ack_wait=30.0, max_deliver=max_deliver)


async def consumer_now(bus, durable: str):
    """The consumer's info, None until the runner has created it."""
    try:
        return await bus.js.consumer_info("INTENTS", durable)
    except NotFoundError:
        return None


async def settled(bus, durable: str) -> bool:
    info = await consumer_now(bus, durable)
    return info is not None and info.num_pending == 0 and info.num_ack_pending == 0


async def start(runner: Runner) -> tuple[asyncio.Event, asyncio.Task]:
    stop = asyncio.Event()
    return stop, asyncio.create_task(runner.run(stop))


async def test_batched_runner_publishes_each_effect_once_retries_and_dead_letters_per_message(bus):
    ids = [f"i{k}" for k in range(150)]
    poison, flaky = {"i7", "i90"}, {"i33", "i120"}
    await bus.publish_many([intent(i) for i in ids])
    calls: list[tuple[str, int]] = []

    async def handle(event: ev.IntentCreated, d) -> list[ev.Event]:
        i = event.data.intent_id
        calls.append((i, d.deliveries))
        if i in poison:
            raise Poison("never")
        if i in flaky and d.deliveries == 1:
            raise RuntimeError("first delivery fails on purpose")
        return [verdict_for(event, bus.source)]

    runner = Runner(bus, spec("batched"), handle, decode=event_decoder(Codec([ev.IntentCreated])), batched=True,
                    batch=64, backoff_base=0.05)
    stop, task = await start(runner)
    try:
        await wait_for(lambda: settled(bus, "batched"), 60, "every intent to be settled")
        await wait_for(lambda: runner.stats.handled == len(ids) - len(poison), 30, "the handled count")
    finally:
        stop.set()
        await task
    assert await stream_count(bus, "VERDICTS") == len(ids) - len(poison)  # one effect per input that succeeded
    assert runner.stats.published == len(ids) - len(poison)
    assert runner.stats.retried == len(flaky) and runner.stats.dead_lettered == len(poison)
    assert sorted(d for i, d in calls if i in flaky) == [1, 1, 2, 2]  # failed alone, then handled on redelivery
    dead = {d.event.data.subject: d.event.data for d in await list_dead(bus)}
    assert set(dead) == {f"intent.created.train.{i}" for i in poison}
    assert all(x.error == "Poison: never" for x in dead.values())


async def test_a_refused_output_fails_only_its_own_input_and_is_never_acked_unpublished(bus):
    """One input's output goes to a subject no stream stores: the batch's publish is refused,
    the others' outputs are published alone and acked; that input is nak'ed (never acked
    without its effect) and, after max_deliver, dead-lettered with the reason."""
    await bus.js.delete_stream("LEDGER")
    ids = [f"r{k}" for k in range(40)]
    await bus.publish_many([intent(i) for i in ids])

    async def handle(event: ev.IntentCreated, d) -> list[ev.Event]:
        if event.data.intent_id == "r17":  # LEDGER is gone: no stream stores ledger.rejected.*
            return [ev.LedgerRejected.new(ev.LedgerRejection(cause_id="c", reason="x"), source=bus.source, cause=event)]
        return [verdict_for(event, bus.source)]

    runner = Runner(bus, spec("refused", max_deliver=2), handle, decode=event_decoder(Codec([ev.IntentCreated])),
                    batched=True, batch=64, backoff_base=0.05)
    stop, task = await start(runner)
    try:
        await wait_for(lambda: settled(bus, "refused"), 60, "every intent to be settled")
        await wait_for(lambda: runner.stats.dead_lettered == 1, 30, "the dead letter")
    finally:
        stop.set()
        await task
    assert await stream_count(bus, "VERDICTS") == len(ids) - 1
    assert runner.stats.handled == len(ids) - 1 and runner.stats.retried == 1
    (dead,) = [d.event.data for d in await list_dead(bus)]
    assert dead.subject == "intent.created.train.r17"
    assert dead.error.startswith("failed after 2 deliveries: StreamNotFound")


async def test_a_slow_handler_holds_only_its_own_input(bus):
    """Concurrency 4: while one handler waits (a sandbox run, say), the rest of its batch is
    published and acked; the slow one is settled when it is done."""
    ids = [f"s{k}" for k in range(30)]
    await bus.publish_many([intent(i) for i in ids])
    release, waiting = asyncio.Event(), asyncio.Event()

    async def handle(event: ev.IntentCreated, d) -> list[ev.Event]:
        if event.data.intent_id == "s3":
            waiting.set()
            await release.wait()
        return [verdict_for(event, bus.source)]

    runner = Runner(bus, spec("slow"), handle, decode=event_decoder(Codec([ev.IntentCreated])), batched=True,
                    batch=64, concurrency=4)
    stop, task = await start(runner)
    try:
        await wait_for(waiting.is_set, 30, "the slow handler to start")

        async def others_done() -> bool:
            info = await bus.js.consumer_info("INTENTS", "slow")
            return info.num_pending == 0 and info.num_ack_pending == 1
        await wait_for(others_done, 60, "every other intent to be acked")
        assert await stream_count(bus, "VERDICTS") == len(ids) - 1
        assert runner.stats.handled == len(ids) - 1
        release.set()
        await wait_for(lambda: settled(bus, "slow"), 60, "the slow intent to be acked")
    finally:
        release.set()
        stop.set()
        await task
    assert await stream_count(bus, "VERDICTS") == len(ids)
    assert runner.stats.handled == len(ids)


async def test_pull_fetch_takes_every_message_once_in_order_and_an_empty_consumer_times_out(bus):
    """`Pull.fetch(n)`: the first message through nats-py's fetch, the rest drained from one
    no-wait pull request: every message once, in stream order, batches of at most n."""
    from scf.bus.runner import Pull

    await bus.publish_many([intent(f"p{k}") for k in range(300)])
    pull = Pull(bus, spec("pull"))
    stop = asyncio.Event()
    seqs: list[int] = []
    sizes: list[int] = []
    try:
        while len(seqs) < 300:
            msgs = await pull.fetch(128, 5.0, stop)
            assert msgs, "a fetch with messages pending returned none"
            sizes.append(len(msgs))
            for m in msgs:
                seqs.append(m.metadata.sequence.stream)
                await m.ack()
        assert await pull.fetch(128, 0.3, stop) == []  # nothing left: an empty batch after the timeout
    finally:
        await pull.close()
    assert seqs == list(range(1, 301))
    assert sizes == [128, 128, 44]  # full batches while the stream has them
    assert await settled(bus, "pull")


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

    def engage(self) -> None:
        self._clear.clear()

    def clear(self) -> None:
        self._clear.set()


async def paused_at(bus, ids: list[str], engage_at: str, s: ConsumerSpec, batch: int, deliveries: dict | None = None):
    """A batched runner over intents `ids` whose handler engages the pause gate on `engage_at`:
    (gate, the ids handled so far, (stop, task)); `deliveries`: each id's delivery numbers."""
    await bus.publish_many([intent(i) for i in ids])
    gate, handled = Gate(), []

    async def handle(event: ev.IntentCreated, d) -> list[ev.Event]:
        handled.append(event.data.intent_id)
        if deliveries is not None:
            deliveries.setdefault(event.data.intent_id, []).append(d.deliveries)
        if event.data.intent_id == engage_at:
            gate.engage()
        return [verdict_for(event, bus.source)]

    runner = Runner(bus, s, handle, decode=event_decoder(Codec([ev.IntentCreated])), batched=True, batch=batch, pause=gate)
    return gate, handled, await start(runner)


async def test_a_pause_engaged_mid_batch_holds_the_rest_of_the_batch(bus):
    """The emergency stop engages while a batch is being handled (here: by the 4th handler):
    what was handled is settled, nothing more is handled until the gate clears, the rest of
    the batch stays in hand (kept alive, not dropped)."""
    ids = [f"q{k}" for k in range(20)]
    gate, handled, (stop, task) = await paused_at(bus, ids, "q3", spec("paused"), batch=64)
    try:
        async def four_settled_rest_in_hand() -> bool:
            info = await consumer_now(bus, "paused")
            return info is not None and await stream_count(bus, "VERDICTS") == 4 and info.num_ack_pending == len(ids) - 4
        await wait_for(four_settled_rest_in_hand, 60, "the first four settled, the rest held")
        assert handled == ["q0", "q1", "q2", "q3"]  # the worker waits on the gate: nothing else ran
        gate.clear()
        await wait_for(lambda: settled(bus, "paused"), 60, "every intent to be settled once the gate clears")
    finally:
        gate.clear()
        stop.set()
        await task
    assert handled == ids and await stream_count(bus, "VERDICTS") == len(ids)


async def test_the_batch_taken_ahead_is_kept_alive_through_a_pause(bus):
    """While a batch is handled the next one is asked for (taken ahead). A pause engaged in
    the first batch holds the rest of it; the batch taken ahead is kept alive meanwhile
    (ack_wait 2 s: without keepalives it would be redelivered during the pause); after the
    gate clears every message is handled once and settled."""
    ids = [f"a{k:02d}" for k in range(24)]
    gate, handled, (stop, task) = await paused_at(bus, ids, "a03", dataclasses.replace(spec("ahead"), ack_wait=2.0), batch=12)
    try:
        async def first_four_and_all_in_hand() -> bool:
            info = await consumer_now(bus, "ahead")
            # 4 settled; the first batch's other 8 and the 12 taken ahead delivered and held
            return (info is not None and await stream_count(bus, "VERDICTS") == 4 and info.delivered.stream_seq == 24
                    and info.num_ack_pending == 20)
        await wait_for(first_four_and_all_in_hand, 60, "the first four settled, the next batch taken ahead")
        await asyncio.sleep(5.0)  # two and a half ack_waits: nothing in hand may be redelivered (a sleep: an absence)
        info = await bus.js.consumer_info("INTENTS", "ahead")
        assert info.num_redelivered == 0 and handled == ["a00", "a01", "a02", "a03"]
        gate.clear()
        await wait_for(lambda: settled(bus, "ahead"), 60, "every intent settled once the gate clears")
    finally:
        gate.clear()
        stop.set()
        await task
    assert sorted(handled) == ids and len(handled) == len(ids)
    assert await stream_count(bus, "VERDICTS") == len(ids)


async def test_a_pause_between_batches_keeps_the_batch_taken_ahead_without_a_redelivery(bus):
    """The gate engages as a batch ends (its last handler engages it): the batch taken ahead
    is held and kept alive through the pause, then handled on its first delivery. Given
    back (nak'ed) instead, every pause would spend one of its deliveries: past the server's
    max_deliver a message is never delivered again and never reaches the DLQ."""
    ids, deliveries = [f"b{k}" for k in range(8)], {}
    gate, _, (stop, task) = await paused_at(bus, ids, "b3", spec("between"), batch=4, deliveries=deliveries)  # b3: the first batch's last
    try:
        async def first_batch_settled_next_in_hand() -> bool:
            info = await consumer_now(bus, "between")
            return info is not None and await stream_count(bus, "VERDICTS") == 4 and info.delivered.stream_seq == 8
        await wait_for(first_batch_settled_next_in_hand, 60, "the first batch settled, the next taken ahead")
        info = await bus.js.consumer_info("INTENTS", "between")
        assert info.num_ack_pending == 4 and info.num_pending == 0  # held, not given back
        gate.clear()
        await wait_for(lambda: settled(bus, "between"), 60, "every intent settled once the gate clears")
    finally:
        gate.clear()
        stop.set()
        await task
    assert deliveries == {i: [1] for i in ids}  # each handled once, on its first delivery
    assert await stream_count(bus, "VERDICTS") == len(ids)


@pytest.mark.parametrize("batched", [False, True])
async def test_a_stop_while_paused_dead_letters_the_message_on_its_last_delivery(bus, batched):
    """A stop while the pause holds messages gives them back (nak'ed, redelivered at once) —
    except a message on the last delivery the server allows (max_deliver 1, the server's 2),
    which a nak would lose without a trace: it is dead-lettered with the reason instead.
    l0 and l1 have spent a delivery (a process gone); l0's handler engages the pause, l1 (on
    its last delivery) and l2 (on its first) are held when the runner stops."""
    s = spec(f"last{int(batched)}", max_deliver=1)
    await ensure_consumer(bus.js, s)
    await bus.publish_many([intent("l0"), intent("l1")])
    sub = await bus.js.pull_subscribe("intent.created.>", durable=s.durable, stream="INTENTS")
    try:
        spent = await sub.fetch(2, timeout=10)
        for m in spent:
            await m.nak()
    finally:
        await sub.unsubscribe()
    await bus.publish_many([intent("l2")])
    gate = Gate()

    async def handle(event: ev.IntentCreated, d) -> list[ev.Event]:
        gate.engage()  # the emergency stop engages while l0 is handled
        return [verdict_for(event, bus.source)]

    # no batch taken ahead: its pending fetch would take l2 back at once when it is given back
    runner = Runner(bus, s, handle, decode=event_decoder(Codec([ev.IntentCreated])), batched=batched, batch=4, pause=gate)
    runner.take_ahead = False
    stop, task = await start(runner)
    try:
        async def all_in_hand_paused() -> bool:
            info = await consumer_now(bus, s.durable)
            return gate.engaged and info is not None and info.delivered.consumer_seq == 5
        await wait_for(all_in_hand_paused, 30, "l0 handled, l1 and l2 in the paused runner's hand")
    finally:
        stop.set()
        await task
    [dead] = [e.event.data for e in await list_dead(bus) if e.event is not None]
    assert dead.seq == spent[1].metadata.sequence.stream and dead.deliveries == 2
    assert dead.error == "stopped on its last delivery (2 of 2): dead-lettered instead of given back"
    assert await stream_count(bus, "VERDICTS") == 1 and runner.stats.dead_lettered == 1  # l0's; l1
    sub = await bus.js.pull_subscribe("intent.created.>", durable=s.durable, stream="INTENTS")
    try:
        [back] = await sub.fetch(1, timeout=10)  # l2 given back: redelivered at once
        assert back.metadata.num_delivered == 2 and back.metadata.sequence.stream == spent[1].metadata.sequence.stream + 1
    finally:
        await sub.unsubscribe()
