"""The consumer runner every SCF process uses.

A handler decides; the runner owns the I/O:

    async def handle(event, delivery) -> list[Event] | None

* durable pull consumer, batched fetch, explicit ack;
* the events a handler returns are published (ids derived from the input, so a
  redelivered input republishes the same ids and JetStream's dedup keeps one) and only
  then is the input acked: at-least-once delivery, effectively-once outcomes;
* a failing handler is nak'ed with exponential backoff (the delay travels with the nak:
  the retry policy is the runner's, one place; the consumers' JetStream `backoff` is left
  unset because it governs ack-timeout redeliveries too, where a fixed `ack_wait` lets
  another process take over a dead one's message fast); on its last allowed delivery the
  message is copied to the DLQ stream with the error and original headers, then terminated;
  an undecodable message (or a handler raising `Poison`) goes to the DLQ at once; the one
  DLQ writer is `bus.dlq.dead_letter` (an entry always fits max_payload; a failed write
  leaves the message for redelivery, never an exception);
* a server restart is ridden out: `Pull` turns fetch failures (ServiceUnavailable,
  connection closed or reconnecting, the consumer gone) into backoff and a re-bind, and
  `process` never raises, so a consumer loop never exits on bus errors;
* `batched=True` (the safety gate): a fetched batch is decoded, handled (up to
  `concurrency` handlers at once), its outputs published together in one pipelined
  `publish_many` (one wait for all the server's acks instead of one per message), and only
  then are its inputs acked. Each message keeps its own outcome: a failed handler is
  nak'ed / dead-lettered alone; when the batch's publish is refused, each message's outputs
  are published again alone, so a refusal fails only its own input;
* batched handlers (the ledger) use the same pieces: `Pull`, `Runner.process` for the
  per-message fallback, `Runner.dead_letter`, `race`;
* long handlers are kept alive with `in_progress` acks;
* a concurrency limit (1 keeps order);
* a pause gate (the emergency stop): while engaged nothing new is handled; messages in hand
  are kept alive and wait, nothing is dropped;
* SIGTERM / SIGINT stop fetching, let in-flight handlers finish, nak what was fetched but
  not started (so it is redelivered at once; on the server's last delivery, which a nak
  would lose, dead-lettered instead), then drain the connection. A handler whose wait the
  stop cut (`Stopping`, from `until_stopped`) has its message given back the same way:
  never counted as a failure, never dead-lettered on the runner's last delivery;
* `until_stopped(awaitable, stop)` and `race` are how every loop of every process awaits
  the stop together with each wait on the server (docs/architecture.md "Stopping a process").
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import traceback
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol, Sequence

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import NotFoundError

from scf.bus import codec, dlq
from scf.bus import events as ev
from scf.bus.client import SCF_REDRIVE_FOR, Bus, Throttle, ack_many
from scf.bus.errors import DecodeError, SCFError, SignatureError
from scf.bus.natsfix import rx_parser
from scf.bus.reader import describe
from scf.bus.rx import PullInbox, PullStatus, RxMsg, ack_meta
from scf.bus.stopping import Stopping, race, until_stopped  # noqa: F401 - their home; imported from here by the processes
from scf.bus.streams import ConsumerSpec, ensure_consumer

log = logging.getLogger("scf.runner")
_REDRIVE_B = SCF_REDRIVE_FOR.encode()


class Poison(SCFError):
    """Raised by a handler for a message that can never succeed: straight to the DLQ."""


class PauseGate(Protocol):
    @property
    def engaged(self) -> bool: ...

    async def wait_clear(self) -> None: ...


class Delivery:
    """A message's delivery, as the handler sees it. The stream sequence and the delivery
    count are parsed from the ack subject when first asked for (about 5 µs a message, which
    most handlers never need)."""

    __slots__ = ("msg", "subject", "_headers", "_seq", "_deliveries")

    def __init__(self, msg: Msg, subject: str, stream_seq: int | None = None, deliveries: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.msg, self.subject = msg, subject
        self._headers = headers  # None: the message's, parsed when first read
        self._seq, self._deliveries = stream_seq, deliveries

    @property
    def headers(self) -> dict[str, str]:
        if self._headers is None:
            self._headers = dict(self.msg.headers or {})
        return self._headers

    def _load(self) -> None:
        try:
            self._seq, self._deliveries = ack_meta(self.msg.reply)
        except ValueError:  # not a JetStream ack subject: nats-py says what is wrong
            meta = self.msg.metadata
            self._seq, self._deliveries = meta.sequence.stream, meta.num_delivered

    @property
    def stream_seq(self) -> int:
        if self._seq is None:
            self._load()
        return self._seq  # type: ignore[return-value]

    @property
    def deliveries(self) -> int:
        if self._deliveries is None:
            self._load()
        return self._deliveries  # type: ignore[return-value]

    async def in_progress(self) -> None:
        await self.msg.in_progress()


@dataclass
class RunnerStats:
    handled: int = 0
    published: int = 0
    retried: int = 0
    dead_lettered: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)


Decoder = Callable[[Msg], Any]
Handler = Callable[[Any, Delivery], Awaitable[Sequence[ev.Event] | None]]


def event_decoder(c: codec.Codec = codec.ANY) -> Decoder:
    return lambda msg: c.decode(msg.data)


class Runner:
    def __init__(
        self,
        bus: Bus,
        spec: ConsumerSpec,
        handler: Handler,
        *,
        decode: Decoder | None = None,
        concurrency: int = 1,
        batch: int = 64,
        fetch_timeout: float = 1.0,
        pause: PauseGate | None = None,
        backoff_base: float = 0.25,
        backoff_max: float = 30.0,
        create: bool = True,
        batched: bool = False,
    ) -> None:
        self.bus, self.spec, self.handler = bus, spec, handler
        # create=False: only bind to the durable consumer (a restricted user, e.g. an edge
        # node, may not create consumers); wait until someone with the right creates it.
        self.create = create
        self.decode = decode or event_decoder()
        self.concurrency = max(1, concurrency)
        self.batch = max(1, batch)
        self.batched = batched  # handle a fetched batch together (see the module's doc)
        self.take_ahead = batched  # batched: ask for the next batch before handling this one
        self._settling: asyncio.Task | None = None  # the batched path's settle in flight
        self.fetch_timeout = fetch_timeout
        self.pause = pause
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.stats = RunnerStats()
        self._sem = asyncio.Semaphore(self.concurrency)
        self._tasks: set[asyncio.Task] = set()
        self._throttle = Throttle(1.0)
        self._stop: asyncio.Event | None = None  # run()'s: a message held by a pause is given back on a stop

    # ------------------------------------------------------------------ lifecycle
    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        pull = Pull(self.bus, self.spec, create=self.create)
        # batched: the next batch, asked for before this one is handled, so that the server's
        # answer (and the wait for it) overlaps the handling; kept alive through a pause,
        # given back (nak'ed) on a stop, so nothing taken ahead waits unkept for ack_wait
        ahead: asyncio.Future | None = None
        try:
            while not stop.is_set():
                if self.pause is not None and self.pause.engaged:
                    # a batch taken ahead is held and kept alive through the pause, as the
                    # messages of a batch in hand are: given back, each pause would spend
                    # one of its deliveries (past max_deliver: never delivered again)
                    alive = asyncio.create_task(self._keepalive_ahead(ahead)) if ahead is not None else None
                    try:
                        await race(self.pause.wait_clear(), stop)
                    finally:
                        if alive is not None:
                            alive.cancel()
                    continue
                want = self.batch if self.concurrency == 1 or self.batched else max(1, self.concurrency - len(self._tasks))
                if ahead is not None:
                    msgs, ahead = await ahead, None
                else:
                    msgs = await pull.fetch(want, self.fetch_timeout, stop)
                if self.batched:
                    if stop.is_set():
                        for rest in msgs:
                            await self.give_back(rest)
                        break
                    if msgs:
                        if not self.take_ahead:
                            await self.process_batch(msgs)
                            continue
                        ahead = asyncio.ensure_future(pull.fetch(want, self.fetch_timeout, stop))
                        alive = asyncio.create_task(self._keepalive_ahead(ahead))  # a pause mid-batch can be long
                        try:
                            await self.process_batch(msgs)
                        finally:
                            alive.cancel()
                    continue
                for i, msg in enumerate(msgs):
                    if stop.is_set():
                        for rest in msgs[i:]:
                            await self.give_back(rest)
                        break
                    if self.concurrency == 1:
                        await self.process(msg)
                    else:
                        await self._sem.acquire()
                        task = asyncio.create_task(self.process(msg))
                        self._tasks.add(task)
                        task.add_done_callback(self._done)
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._settling is not None:
                await self._settling  # the last batch's publishes and acks
        finally:
            if ahead is not None:
                await self._give_back_ahead(ahead)
            await pull.close()

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._sem.release()

    # ------------------------------------------------------------------ one message
    async def process(self, msg: Msg) -> None:
        """Decode, handle, publish, ack one message with the runner's rules (retry with
        backoff, the DLQ after max_deliver or on Poison). Never raises: a batched handler
        (the ledger's loop) hands its messages here one by one when a batch fails."""
        try:
            await self._process(msg)
        except Exception as exc:  # noqa: BLE001 - e.g. the ack failed (connection lost): ack_wait redelivers
            self._throttle.warn(log, "process", "%s: %s on %s: left for redelivery",
                                self.spec.durable, describe(exc), msg.subject)

    async def _admit(self, msg: Msg) -> tuple[Delivery, Any] | None:
        """The delivery and its decoded item; None when the message is settled here: a redrive
        meant for another consumer (acked, skipped) or undecodable (dead-lettered)."""
        d = Delivery(msg, msg.subject)
        # a redrive names its consumer in a header: the header block is parsed only when it may
        target = d.headers.get(SCF_REDRIVE_FOR) if not isinstance(msg, RxMsg) or msg.has_header(_REDRIVE_B) else None
        if target and target != self.spec.durable:
            self.stats.skipped += 1
            await msg.ack()
            return None
        try:
            return d, self.decode(msg)
        except (DecodeError, SignatureError) as exc:
            await self.dead_letter(msg, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - a decoder bug is still poison for this message
            await self.dead_letter(msg, f"undecodable: {type(exc).__name__}: {exc}")
        return None

    async def _process(self, msg: Msg) -> None:
        if (admitted := await self._admit(msg)) is None:
            return
        d, item = admitted
        if self.pause is not None and self.pause.engaged and not await self._hold(d):
            await self.give_back(msg)  # stopped while paused: given back, redelivered at once
            return

        keepalive = asyncio.create_task(self._keepalive(d))
        try:
            out = await self.handler(item, d)
            if out:
                await self.bus.publish_many(out)
                self.stats.published += len(out)
        except Poison as exc:
            await self.dead_letter(msg, f"Poison: {exc}")
            return
        except Stopping as exc:
            # the stop came while the handler waited: given back as the runner's own stop
            # path does (nak'ed, not a failure: never dead-lettered for having been stopped)
            log.info("%s: seq %s handed back at the stop: %s", self.spec.durable, d.stream_seq, exc)
            await self.give_back(msg)
            return
        except Exception as exc:  # noqa: BLE001 - any handler failure is retried, then dead-lettered
            await self._failed(msg, d, exc)
            return
        finally:
            keepalive.cancel()
        self.stats.handled += 1
        await msg.ack()

    async def _failed(self, msg: Msg, d: Delivery, exc: BaseException) -> None:
        """A failed handler (or publish): nak with backoff, the DLQ on the last delivery."""
        error = f"{type(exc).__name__}: {exc}"
        log.warning("%s: seq %s delivery %s failed: %s", self.spec.durable, d.stream_seq, d.deliveries, error)
        log.debug("%s", "".join(traceback.format_exception(exc)))
        self.stats.errors.append(error)
        del self.stats.errors[:-100]
        if d.deliveries >= self.spec.max_deliver > 0:
            await self.dead_letter(msg, f"failed after {d.deliveries} deliveries: {error}")
        else:
            self.stats.retried += 1
            await msg.nak(delay=self.backoff(d.deliveries))

    # ------------------------------------------------------------------ a batch
    async def process_batch(self, msgs: Sequence[Msg]) -> None:
        """Decode, handle, publish, ack a fetched batch (`batched=True`), with the same
        per-message rules as `process`: every output of a message is published (acknowledged
        by the server) before that message is acked. Never raises."""
        try:
            await self._process_batch(msgs)
        except Exception as exc:  # noqa: BLE001 - e.g. an ack failed (connection lost): ack_wait redelivers the rest
            self._throttle.warn(log, "process", "%s: %s in a batch of %d: left for redelivery",
                                self.spec.durable, describe(exc), len(msgs))

    async def _process_batch(self, msgs: Sequence[Msg]) -> None:
        todo: list[tuple[Msg, Delivery, Any]] = []
        for msg in msgs:
            if (admitted := await self._admit(msg)) is not None:
                todo.append((msg, *admitted))
        if not todo:
            return
        held = {id(d): d for _, d, _ in todo}  # in hand, not settled: kept alive
        keepalive = asyncio.create_task(self._keepalive_all(held))
        ready: list[tuple[Msg, Delivery, Any]] = []  # handled, not settled yet
        wake = asyncio.Event()
        queue = iter(todo)

        async def worker() -> None:
            try:
                for msg, d, item in queue:  # one iterator shared by the workers: each message once
                    if self.pause is not None and self.pause.engaged and not await self._wait_clear():
                        # stopped while paused: this message and the rest of the batch given back
                        for rest in (msg, *(m for m, _, _ in queue)):
                            await self.give_back(rest)
                        return
                    try:
                        out: Any = await self.handler(item, d)
                    except Exception as exc:  # noqa: BLE001 - settled per message below
                        out = exc
                    ready.append((msg, d, out))
                    wake.set()
            finally:
                wake.set()

        workers: list[asyncio.Task] = []
        try:
            # `concurrency` handlers at once; whatever is handled by the time the loop gets
            # here again is settled together (all of a batch of CPU-only handlers at once;
            # a slow one, a sandbox run, is settled when it is done)
            workers = [asyncio.create_task(worker()) for _ in range(min(self.concurrency, len(todo)))]
            settled = 0
            while settled < len(todo):
                await wake.wait()
                wake.clear()
                wave, ready[:] = ready[:], []
                if not wave and all(w.done() for w in workers):
                    # a worker died of something other than an Exception: re-raised; what
                    # was not settled is left for redelivery (ack_wait)
                    for w in workers:
                        if not w.cancelled() and w.exception() is not None:
                            raise w.exception()  # type: ignore[misc]
                    break
                await self._settle_later(wave)
                settled += len(wave)
                for _, d, _ in wave:
                    held.pop(id(d), None)
        finally:
            keepalive.cancel()
            for w in workers:
                w.cancel()

    async def _settle_later(self, wave: list[tuple[Msg, Delivery, Any]]) -> None:
        """`_settle` in the background, so that the wait for the server's acks of this
        wave's outputs overlaps the handling of what comes next; one settle in flight at a
        time (waited for before the next starts), so acks and publishes keep their order."""
        if self._settling is not None:
            await self._settling
        self._settling = asyncio.create_task(self._settle_quietly(wave))

    async def _settle_quietly(self, wave: list[tuple[Msg, Delivery, Any]]) -> None:
        keepalive = asyncio.create_task(self._keepalive_all({id(d): d for _, d, _ in wave}))  # a slow server
        try:
            await self._settle(wave)
        except Exception as exc:  # noqa: BLE001 - e.g. an ack failed (connection lost): ack_wait redelivers
            self._throttle.warn(log, "settle", "%s: %s settling %d messages: left for redelivery",
                                self.spec.durable, describe(exc), len(wave))
        finally:
            keepalive.cancel()

    async def _settle(self, wave: list[tuple[Msg, Delivery, Any]]) -> None:
        """Handled messages: failures retried or dead-lettered one by one; the outputs of
        the others published together, then those inputs acked."""
        done: list[tuple[Msg, Delivery, Sequence[ev.Event]]] = []
        for msg, d, out in wave:
            if isinstance(out, Poison):
                await self.dead_letter(msg, f"Poison: {out}")
            elif isinstance(out, Stopping):
                await self.give_back(msg)  # handed back at the stop: not a failure
            elif isinstance(out, BaseException):
                await self._failed(msg, d, out)
            else:
                done.append((msg, d, out or ()))
        events = [e for _, _, out in done for e in out]
        if events:
            try:
                await self.bus.publish_many(events)
                self.stats.published += len(events)
            except Exception:  # noqa: BLE001 - refused or timed out: each message's outputs alone
                done = await self._publish_each(done)
        await ack_many(self.bus.nc, [msg for msg, _, _ in done])  # one write for the wave's acks
        self.stats.handled += len(done)

    async def _publish_each(self, done: list[tuple[Msg, Delivery, Sequence[ev.Event]]]) -> list[tuple[Msg, Delivery, Sequence[ev.Event]]]:
        """The batch's publish failed: publish each message's outputs alone (their ids
        dedup what the batch stored already); a message whose outputs fail is retried
        (nak with backoff) or dead-lettered, the others go on to be acked."""
        ok = []
        for msg, d, out in done:
            try:
                if out:
                    await self.bus.publish_many(out)
                    self.stats.published += len(out)
            except Exception as exc:  # noqa: BLE001 - this message's outputs were refused
                await self._failed(msg, d, exc)
                continue
            ok.append((msg, d, out))
        return ok

    async def give_back(self, msg: Msg) -> None:
        """A message taken and not handled (a stop): nak'ed, so it is redelivered at once (to
        the next process) instead of after ack_wait; on the server's last delivery, where a
        nak would lose it, dead-lettered instead (`dlq.give_back`). Never raises."""
        if await dlq.give_back(self.bus, msg, self.spec, "stopped"):
            self.stats.dead_lettered += 1

    async def _give_back_ahead(self, fetching: asyncio.Future) -> None:
        """`give_back` for a batch taken ahead."""
        try:
            msgs = await fetching
        except Exception:  # noqa: BLE001 - Pull.fetch never raises: nothing to give back
            return
        for m in msgs:
            await self.give_back(m)

    async def dead_letter(self, msg: Msg, error: str) -> bool:
        """Copy `msg` to the DLQ and terminate it (bus/dlq.py: always fits, never raises;
        a failed write naks it for a later try)."""
        deliveries = getattr(getattr(msg, "metadata", None), "num_delivered", 1) or 1
        ok = await dlq.dead_letter(self.bus, msg, stream=self.spec.stream, consumer=self.spec.durable, error=error,
                                   retry_delay=self.backoff(deliveries))
        if ok:
            self.stats.dead_lettered += 1
        return ok

    def backoff(self, deliveries: int) -> float:
        return min(self.backoff_max, self.backoff_base * (2 ** max(0, deliveries - 1)))

    async def _keepalive(self, d: Delivery) -> None:
        interval = max(0.5, self.spec.ack_wait / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await d.in_progress()
            except Exception:  # noqa: BLE001 - settled or connection gone: ack_wait takes over
                return

    async def _keepalive_all(self, held: dict[int, Delivery]) -> None:
        """`_keepalive` for a batch: every message in hand (`held`), until cancelled."""
        interval = max(0.5, self.spec.ack_wait / 3)
        while True:
            await asyncio.sleep(interval)
            for d in list(held.values()):
                try:
                    await d.in_progress()
                except Exception:  # noqa: BLE001 - settled or connection gone: ack_wait takes over
                    pass

    async def _keepalive_ahead(self, ahead: asyncio.Future) -> None:
        """`_keepalive` for a batch taken ahead, once it is in, until cancelled."""
        interval = max(0.5, self.spec.ack_wait / 3)
        while True:
            await asyncio.sleep(interval)
            if ahead.done() and not ahead.cancelled() and ahead.exception() is None:
                for m in ahead.result():
                    await _quietly(m.in_progress())

    async def _hold(self, d: Delivery) -> bool:
        """Keep a message in hand alive until the pause gate clears (True) or the run stops (False)."""
        keepalive = asyncio.create_task(self._keepalive(d))
        try:
            return await self._wait_clear()
        finally:
            keepalive.cancel()

    async def _wait_clear(self) -> bool:
        """Await the pause gate's clearing: True; False when run()'s stop comes first."""
        assert self.pause is not None
        if self._stop is None:  # process() called outside run() (the ledger's loop)
            await self.pause.wait_clear()
        else:
            await race(self.pause.wait_clear(), self._stop)
        return not self.pause.engaged

class Pull:
    """A durable pull subscription that rides out a server restart.

    `fetch` returns the messages it got, or none: a timeout is an empty batch, and any
    other failure (ServiceUnavailableError while JetStream recovers, a connection closed or
    reconnecting, a stale connection, no responders, the consumer gone) is logged at most
    once a second, backed off (0.1 s doubling to 5 s, reset by the next success) and
    retried; the subscription is bound again when the consumer is gone or the failures
    persist (a pull subscription may silently stop delivering after a server reboot:
    nats-io/nats.py#504). Used by the runner and by batched loops (the ledger)."""

    BACKOFF_MAX = 5.0
    REBIND_AFTER = 5  # consecutive failures

    def __init__(self, bus: Bus, spec: ConsumerSpec, *, create: bool = True) -> None:
        self.bus, self.spec, self.create = bus, spec, create
        self.psub: Any = None
        self.failures = 0
        self._throttle = Throttle(1.0)

    async def bind(self, stop: asyncio.Event) -> bool:
        """Bind to the durable (creating it when allowed); True once bound, False if stopped first."""
        delay = 0.1
        while not stop.is_set():
            # awaited with the stop: its JetStream requests wait 5 s each for a server that is away
            attempt = asyncio.ensure_future(self._bind_once())
            await race(attempt, stop)
            try:
                if not attempt.done():
                    return False  # stopped (race cancelled the attempt)
                self.psub = attempt.result()
                return True
            except NotFoundError as exc:
                if self.create:
                    self._throttle.warn(log, "bind", "%s: binding to %s/%s failed (%s): retrying",
                                        self.spec.durable, self.spec.stream, self.spec.durable, describe(exc))
                else:
                    self._throttle.warn(log, "missing", "%s: consumer %s/%s does not exist yet and this process may not create it: waiting",
                                        self.spec.durable, self.spec.stream, self.spec.durable)
            except Exception as exc:  # noqa: BLE001 - server away or restarting: keep trying until stopped
                self._throttle.warn(log, "bind", "%s: binding to %s/%s failed (%s): retrying",
                                    self.spec.durable, self.spec.stream, self.spec.durable, describe(exc))
            await race(asyncio.sleep(delay), stop)
            delay = min(delay * 2, 10.0)
        return False

    async def _bind_once(self) -> Any:
        if self.create:
            await ensure_consumer(self.bus.js, self.spec)
        else:
            await self.bus.js.consumer_info(self.spec.stream, self.spec.durable)
        if rx_parser(self.bus.nc) is not None:  # our receive path (bus/rx.py)
            inbox = PullInbox(self.bus.nc, self.spec.stream, self.spec.durable, _api_prefix(self.bus.js))
            await inbox.open()
            return inbox
        # a connection not made by bus.client.connect: nats-py's pull subscription
        return await self.bus.js.pull_subscribe_bind(durable=self.spec.durable, stream=self.spec.stream)

    async def fetch(self, n: int, timeout: float, stop: asyncio.Event) -> list[Msg]:
        """Up to `n` messages, what the server has now, or the first to come within `timeout`
        and what else is there then: through SCF's receive path (`rx.PullInbox.fetch`: one
        request per batch, one wake-up), or on a connection without it nats-py's fetch for the
        first and `_more` for the rest."""
        if self.psub is None and not await self.bind(stop):
            return []
        try:
            if isinstance(self.psub, PullInbox):
                msgs = await self.psub.fetch(n, timeout)
                if self.psub.silent >= self.REBIND_AFTER:  # requests go unanswered: the interest was lost
                    raise PullStatus("000", f"{self.psub.silent} requests unanswered")
            else:
                msgs = await self.psub.fetch(1, timeout=timeout)
                if n > 1 and msgs:
                    msgs += await self._more(n - len(msgs), timeout)
        except (NatsTimeout, asyncio.TimeoutError):
            self.failures = 0
            return []
        except Exception as exc:  # noqa: BLE001 - transient by assumption: a consumer loop must never exit on it
            self.failures += 1
            self._throttle.warn(log, type(exc).__name__, "%s: fetch failed (%s): retrying with backoff",
                                self.spec.durable, describe(exc))
            gone = isinstance(exc, NotFoundError) or (isinstance(exc, PullStatus) and exc.gone)
            if gone or self.failures % self.REBIND_AFTER == 0:
                await self.close()
            await race(asyncio.sleep(min(self.BACKOFF_MAX, 0.1 * 2 ** min(self.failures, 6))), stop)
            return []
        self.failures = 0
        return msgs

    async def _more(self, k: int, timeout: float) -> list[Msg]:
        """Up to `k` more messages, those the server has now: the ones already in the
        subscription's queue, then one no-wait pull request whose replies are drained from the
        queue as they arrive, until `k`, the server's end-of-request status (404 no messages,
        408, any other status) or `timeout`. nats-py's fetch awaits every message of a batch
        with its own task, timer and uuid (about five event-loop turns a message: more CPU
        than the safety gate's whole publish-and-ack); this takes a batch in a few turns.
        Never raises: a failure returns what was taken, and the next fetch reports it."""
        psub = self.psub
        sub = getattr(psub, "_sub", None)
        nms, deliver = getattr(psub, "_nms", None), getattr(psub, "_deliver", None)
        queue = getattr(sub, "_pending_queue", None)
        out: list[Msg] = []
        try:
            if queue is None or not nms or not deliver:  # another nats-py: its own fetch
                return await psub.fetch(k, timeout=timeout)
            while len(out) < k and not queue.empty():  # left over from an earlier request
                msg = queue.get_nowait()
                sub._pending_size -= len(msg.data)
                if not _status(msg):
                    out.append(msg)
            if len(out) == k:
                return out
            await self.bus.nc.publish(nms, json.dumps({"batch": k - len(out), "no_wait": True}).encode(), deliver)
            async with asyncio.timeout(timeout):
                while len(out) < k:
                    msg = queue.get_nowait() if not queue.empty() else await queue.get()
                    sub._pending_size -= len(msg.data)
                    status = _status(msg)
                    if status == "100":  # a heartbeat
                        continue
                    if status:  # the request is over (404 no messages, 408 expired, 409 …)
                        break
                    out.append(msg)
        except (TimeoutError, NatsTimeout):
            pass
        except Exception as exc:  # noqa: BLE001 - what was taken is handled; the next fetch meets the error
            log.debug("%s: fetching the rest of a batch: %s", self.spec.durable, describe(exc))
        return out

    async def close(self) -> None:
        psub, self.psub = self.psub, None
        if psub is not None:
            await _quietly(psub.unsubscribe())


def _api_prefix(js: Any) -> str:
    """The JetStream API prefix of a nats-py JetStreamContext ("$JS.API" unless a domain or prefix is set)."""
    prefix = getattr(js, "_prefix", None) or "$JS.API"
    return prefix[:-1] if prefix.endswith(".") else prefix


def _status(msg: Msg) -> str | None:
    """The status of a JetStream status message (no body, a `Status` header), else None."""
    if msg.data or not msg.headers:
        return None
    return msg.headers.get("Status")


async def _quietly(awaitable: Awaitable[Any]) -> None:
    try:
        await awaitable
    except Exception as exc:  # noqa: BLE001 - best effort (unsubscribe, nak on shutdown): logged at debug
        log.debug("ignored: %s: %s", type(exc).__name__, exc)


# The shutdown contract of every `scf run X` process (docs/architecture.md, "Stopping a
# process"): the first SIGTERM/SIGINT sets `stop`; the loops get DRAIN_S in all (one deadline,
# not one per loop) to finish, then are cancelled; the connection gets CLOSE_S to drain and
# close. Anything left undone -- a loop cancelled or failed while stopping, a connection not
# drained (the server gone) -- ends the run with ShutdownIncomplete (exit 1, one line). A
# second SIGTERM/SIGINT exits at once (128 + the signal), whatever is still running.
DRAIN_S = 20.0  # + CLOSE_S + cli.common.LEFTOVER_S fits the 30 s grace of docker stop and systemd (TimeoutStopSec)
CLOSE_S = 5.0


class ShutdownIncomplete(SCFError):
    """A process stopped without finishing its loops or draining its connection."""


def install_signal_handlers(stop: asyncio.Event, *, force_on_second: bool = False) -> None:
    """SIGTERM/SIGINT set `stop`. With `force_on_second`, a second one exits the process at
    once (exit 128 + signal, nothing more drained): the way out of a shutdown that hangs."""
    loop = asyncio.get_running_loop()
    received: list[int] = []

    def on_signal(sig: int) -> None:
        received.append(sig)
        name = signal.Signals(sig).name
        if force_on_second and len(received) > 1:
            log.error("%s again while stopping: exiting now (exit %d), nothing more drained", name, 128 + sig)
            for h in logging.getLogger().handlers:
                h.flush()
            os._exit(128 + sig)
        if force_on_second:
            log.warning("%s: stopping (%s again exits at once)", name, name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass


async def run_all(bus: Bus, tasks: Sequence[Callable[[asyncio.Event], Awaitable[None]]], stop: asyncio.Event | None = None) -> None:
    """Run runners / loops side by side until SIGTERM/SIGINT (or `stop`, or one of them
    failing), then stop within bounds: DRAIN_S for the loops, CLOSE_S for the connection
    (the contract above). A loop's failure is raised; else ShutdownIncomplete if anything
    was left undone."""
    stop = stop or asyncio.Event()
    install_signal_handlers(stop, force_on_second=True)
    running = [asyncio.create_task(t(stop), name=getattr(t, "__qualname__", repr(t))) for t in tasks]
    stopper = asyncio.create_task(stop.wait())
    error: BaseException | None = None
    try:
        pending = set(running)
        while pending and not stop.is_set():
            done, pending = await asyncio.wait(pending | {stopper}, return_when=asyncio.FIRST_COMPLETED)
            pending.discard(stopper)
            failed = [t for t in done if t is not stopper and not t.cancelled() and t.exception() is not None]
            if failed:
                error = failed[0].exception()
    except BaseException as exc:  # noqa: BLE001 - cancelled (or interrupted): still stopped within bounds, then re-raised
        error = exc
    stop.set()
    stopper.cancel()
    problems = await finish_tasks(running, DRAIN_S, error) + await close_bus(bus, CLOSE_S)
    if error is not None:
        for p in problems:
            log.error("while stopping: %s", p)
        raise error
    if problems:
        raise ShutdownIncomplete("shutdown incomplete: " + "; ".join(problems))


async def finish_tasks(tasks: Sequence[asyncio.Task], deadline: float, error: BaseException | None = None) -> list[str]:
    """Await `tasks` (told to stop) for `deadline` seconds in all, cancel what is left; the
    problems met, one phrase each (a loop cancelled, a loop that failed other than `error`)."""
    problems: list[str] = []
    left = [t for t in tasks if not t.done()]
    if left:
        _, late = await asyncio.wait(left, timeout=deadline)
        if late:
            for t in late:
                t.cancel()
            await asyncio.wait(late, timeout=1.0)  # a moment to unwind; one that ignores it is left to the exit
            problems.append(f"{', '.join(sorted(t.get_name() for t in late))} still running {deadline:g} s after the stop: cancelled")
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None and t.exception() is not error:
            problems.append(f"{t.get_name()} failed while stopping: {describe(t.exception())}")
    return problems


async def close_bus(bus: Bus, timeout: float) -> list[str]:
    """Drain and close the connection within `timeout`; the problems met, one phrase each
    (not connected -- the server gone: what was buffered is lost; a close that failed or
    hung -- nats-py reconnecting to a server that is gone)."""
    problems: list[str] = []
    nc = bus.nc
    if not nc.is_closed and not nc.is_connected:
        problems.append("not connected to nats-server (reconnecting): the connection could not be drained")
    closing = asyncio.ensure_future(bus.close())
    done, _ = await asyncio.wait({closing}, timeout=timeout)
    if not done:
        # not asyncio.wait_for: nats-py's drain swallows the cancel and then flushes (10 s
        # more: a server that does not answer never does), and wait_for waits for that.
        # Closed hard instead (what was buffered is lost); the drain is cancelled.
        problems.append(f"the connection did not close within {timeout:g} s")
        retrieve_gathered(closing)
        closing.cancel()
        closing.add_done_callback(lambda f: f.cancelled() or f.exception())
        asyncio.ensure_future(nc.close()).add_done_callback(lambda f: f.cancelled() or f.exception())
    elif not closing.cancelled() and closing.exception() is not None:
        problems.append(f"closing the connection: {describe(closing.exception())}")  # said once, not a traceback
    return problems


def retrieve_gathered(task: asyncio.Task) -> None:
    """nats-py's drain gathers its subscriptions' drains (`asyncio.gather`); cancelled, the
    gathered future ends holding a CancelledError that nobody retrieves, and asyncio logs
    it when the future is collected ('_GatheringFuture exception was never retrieved', a
    traceback an operator reads as a crash). Each gathered future awaited down `task`'s
    chain of coroutines has its outcome retrieved once it ends; nothing else is touched."""
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None)
        for value in (frame.f_locals.values() if frame is not None else ()):
            if isinstance(value, asyncio.Future) and type(value).__name__ == "_GatheringFuture":
                value.add_done_callback(lambda f: f.cancelled() or f.exception())
        awaited = getattr(awaited, "cr_await", None)
