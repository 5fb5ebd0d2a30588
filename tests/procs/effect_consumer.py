"""A real consumer process for the runner's fault tests.

It consumes `intent.created.>` and, for each intent, publishes one `verdict.issued` whose
id is derived from the intent event (the effect). The intent's params steer it:

  block: "DIR"       publish the effect, write DIR/started-<id>, then hang (unless that
                     file already exists: the redelivery after a kill goes through)
  fail: true         always raise
  fail_until: "F"    raise while file F does not exist
  poison: true       raise Poison (straight to the DLQ)
  work_ms: N         take N ms

Every handler call is appended to --log as "<intent_id> <delivery>".
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from scf.bus import events as ev
from scf.bus.client import Bus
from scf.bus.codec import Codec
from scf.bus.runner import Poison, Runner, event_decoder, run_all
from scf.bus.settings import load
from scf.bus.streams import ConsumerSpec


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--durable", default="effect")
    p.add_argument("--log", required=True)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--max-deliver", type=int, default=3)
    p.add_argument("--ack-wait", type=float, default=30.0)
    args = p.parse_args()

    settings = load().with_source("effect-consumer")
    bus = await Bus.connect(settings, "effect-consumer")
    log = open(args.log, "a", buffering=1)

    async def handle(event: ev.IntentCreated, d) -> list[ev.Event]:
        params = event.data.params
        log.write(f"{event.data.intent_id} {d.deliveries}\n")
        effect = ev.VerdictIssued.new(
            ev.Verdict(verdict_id="v-" + event.data.intent_id, subject_id=event.data.intent_id, subject_type="intent", decision="APPROVE", gate="test"),
            source=bus.source,
            cause=event,
        )
        if params.get("poison"):
            raise Poison("this intent can never be handled")
        if params.get("fail"):
            raise RuntimeError("handler failed on purpose")
        if params.get("fail_until") and not Path(str(params["fail_until"])).exists():
            raise RuntimeError("not yet")
        if params.get("work_ms"):
            await asyncio.sleep(float(params["work_ms"]) / 1000)  # simulated work, not a test wait
        if params.get("block"):
            marker = Path(str(params["block"])) / f"started-{event.data.intent_id}"
            if not marker.exists():
                await bus.publish(effect)  # the effect happens …
                marker.write_text(str(os.getpid()))
                await asyncio.Event().wait()  # … and the process dies before the ack
        return [effect]

    spec = ConsumerSpec("INTENTS", args.durable, ("intent.created.>",), ack_wait=args.ack_wait, max_deliver=args.max_deliver)
    runner = Runner(bus, spec, handle, decode=event_decoder(Codec([ev.IntentCreated])), concurrency=args.concurrency, backoff_base=0.05)
    await run_all(bus, [runner.run])
    log.write(f"exit handled={runner.stats.handled} dlq={runner.stats.dead_lettered}\n")


if __name__ == "__main__":
    asyncio.run(main())
