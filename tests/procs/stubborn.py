"""A process run the way every `scf run X` is (scf.cli.common.run + scf.bus.runner.run_all)
with one loop that ignores its stop -- and, with --ignore-cancel, its cancellation too:
for tests/test_shutdown.py, the shutdown contract when a loop hangs.

  --drain S        the loops' deadline (runner.DRAIN_S) for this run
  --ignore-cancel  the stubborn loop swallows its cancellation (left to the exit)

It writes "running" to stderr once its signal handlers are in place.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from scf.bus import runner
from scf.bus.client import Bus
from scf.bus.settings import load
from scf.cli.common import run


async def main(drain: float, ignore_cancel: bool) -> None:
    runner.DRAIN_S = drain
    bus = await Bus.connect(load().with_source("stubborn"), "stubborn")

    async def obliging(stop: asyncio.Event) -> None:
        logging.getLogger("stubborn").warning("running")  # the signal handlers are in place
        await stop.wait()

    async def stubborn(stop: asyncio.Event) -> None:
        while True:
            try:
                await asyncio.Event().wait()  # never set: this loop does not watch `stop`
            except asyncio.CancelledError:
                if not ignore_cancel:
                    raise

    await runner.run_all(bus, [obliging, stubborn])


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--drain", type=float, default=runner.DRAIN_S)
    p.add_argument("--ignore-cancel", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run(main(args.drain, args.ignore_cancel))
