"""Every loop's wait, awaited together with the process's stop (docs/architecture.md,
"Stopping a process"): `race` for a wait whose end needs no result, `until_stopped` for one
that gives a result or raises `Stopping`. One home for bus/reader.py (below the runner) and
bus/runner.py, which the processes import them from."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable

from scf.bus.errors import SCFError


async def race(awaitable: Awaitable[Any], stop: asyncio.Event) -> None:
    """Await `awaitable` until it completes or `stop` is set, whichever comes first."""
    waiter = asyncio.ensure_future(awaitable)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (waiter, stopper):
            if not t.done():
                t.cancel()


class Stopping(SCFError):
    """The process's stop came while a loop or a handler waited on something: what it was
    doing is abandoned. Raised by a handler, the message is given back (`Runner.give_back`:
    nak'ed, redelivered at once), never counted as a failure."""


async def until_stopped(awaitable: Awaitable[Any], stop: asyncio.Event | None) -> Any:
    """`awaitable`'s result, awaited together with `stop`: when the stop comes first the
    awaitable is cancelled and `Stopping` raised (its error, if any, is not lost: raised
    when it finished first). Every wait of a loop goes through here or `race` (docs/
    architecture.md "Stopping a process"): a wait on the server (a JetStream request, a
    publish acknowledgement, a KV put, a read while it restarts) is not bounded by its own
    timeout alone, it ends at the stop."""
    if stop is None:
        return await awaitable
    task = asyncio.ensure_future(awaitable)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
            task.add_done_callback(_retrieve)  # cancelled: whatever it raises on the way out is not news
    if not task.done():
        raise Stopping("stopped while waiting")
    return task.result()


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()
