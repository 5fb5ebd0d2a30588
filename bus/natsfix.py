"""A message with a malformed header block must not silence a connection.

nats-py (2.16) parses each delivered message's headers inside the connection's read loop. A
header block of 8 bytes or fewer that does not start with `NATS/1.0` (the server stores and
delivers it as published: `HPUB subject 8 9\\r\\nXXXX\\r\\n\\r\\nx`) raises IndexError there; the read
loop ends, and the client stays "connected" but receives nothing again — no fetched message,
no ack reply, no PONG. One such message published by any login that may write a stream (an
`edge` box's `energy.measured.<node>`, an operator's `control.*`) silenced every consumer that
fetched it, again after every restart, as the message came back.

`install()` (called by bus/client.py, so by every SCF process) wraps the client's header
parser: what it cannot parse is delivered with one header, `Scf-Malformed-Headers`, naming
the problem, and the body unchanged; the consumer judges the message as it judges any other
(signature, decode, DLQ) and the connection reads on. docs/security.md, tests/test_attack_headers.py.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("scf.bus")

MALFORMED = "Scf-Malformed-Headers"  # the header a message whose own headers could not be parsed is delivered with
_last_warn = [0.0]


def install() -> None:
    from nats.aio.client import Client

    original = Client._process_headers
    if getattr(original, "scf_safe", False):
        return

    async def _process_headers(self, headers):
        try:
            return await original(self, headers)
        except Exception as exc:  # noqa: BLE001 - nothing a publisher sends may end the read loop
            reason = f"{type(exc).__name__}: {exc}"[:200] or type(exc).__name__
            now = time.monotonic()
            if now - _last_warn[0] >= 1.0:  # at most one line a second under a flood
                _last_warn[0] = now
                log.warning("a message with a malformed NATS header block (%d bytes, %s) is delivered without its headers",
                            len(headers or b""), reason)
            return {MALFORMED: f"{len(headers or b'')} bytes not parsed ({reason})"}

    _process_headers.scf_safe = True  # type: ignore[attr-defined]
    Client._process_headers = _process_headers  # type: ignore[method-assign]
