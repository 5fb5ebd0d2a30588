"""The daemon's fossil view names a domain from a fossil's body, never from its subject token.

A fossil's subject carries its domain as a token (`grid:case9` -> `grid_case9`). The view
used to read the first fossil's body for the real name and, when that read failed (a server
restart while the daemon started: a flake of test_server_restart's long-log start), named
the domain by its token: the daemon then proposed `train-grid_case9-000001` with other
content than the intent of that id in the log ("intent already exists with other content:
adopted"), and its counts were under a name no training knew. Now a domain whose body cannot
be read yet is counted and left unnamed (not trained) until a read succeeds; a message that
names no domain waits for a newer fossil of its token.
"""

from __future__ import annotations

import pytest

from scf.bus.client import Bus
from scf.producers.daemon import FossilView
from tests.conftest import wait_for
from tests.daemon_support import fossil

pytestmark = pytest.mark.anyio

DOMAIN = "grid:case9"


async def view_of(bus: Bus, n: int) -> FossilView:
    view = FossilView(bus)
    await view.start()
    await wait_for(lambda: view.caught_up.is_set() and sum(c.total for c in view.by_token.values()) == n, 20, f"{n} fossils counted")
    return view


async def test_a_domain_whose_fossil_cannot_be_read_is_counted_unnamed_until_it_can(bus, settings, nats_server):
    await bus.publish_many([fossil(DOMAIN, i) for i in range(3)])
    view = await view_of(bus, 3)
    try:
        nats_server.kill()
        await wait_for(lambda: not bus.nc.is_connected, 10, "the connection to drop")
        assert await view.name() is False  # the body could not be read: not named ...
        assert view.counts == {}  # ... and above all not named by its subject token (grid_case9)
        assert view.by_token["grid_case9"].total == 3
        nats_server.start()
        await wait_for(lambda: bus.nc.is_connected, 20, "the connection to come back")
        await wait_for(view.name, 20, "the domain to be named")
        assert {d: c.total for d, c in view.counts.items()} == {DOMAIN: 3}
    finally:
        await view.stop()


async def test_a_message_that_names_no_domain_waits_for_a_fossil_that_does(bus):
    await bus.js.publish("fossil.recorded.grid_case9.not-a-fossil", b'{"hello": "world"}')
    view = await view_of(bus, 1)
    try:
        assert await view.name() is True  # nothing to wait for: that message never names a domain
        assert view.counts == {}  # before: named "grid_case9" after its token
        await bus.publish(fossil(DOMAIN, 0))
        await wait_for(lambda: view.by_token["grid_case9"].total == 2, 20, "the fossil counted")
        assert await view.name() is True
        assert list(view.counts) == [DOMAIN]
    finally:
        await view.stop()
