"""Restart reconciliation: at start, finish what a crash interrupted.

An activation (a deployment or a rollback) is saved as `pending` before `current` is
switched. Found at start: if the switch happened, what runs is health-checked and reported
(`deploy.activated`, or `deploy.rolled_back` for a rollback; a failing check switches
back and reports the failure); if it did not, the pending record is dropped and the
redelivered order carries it out. The reports take the ids the redelivered order's
would, so JetStream keeps one of each.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from scf.bus import events as ev
from scf.bus.events import DeployRequested

if TYPE_CHECKING:
    from scf.consumers.edge.agent import EdgeAgent

log = logging.getLogger("scf.edge")


async def reconcile(agent: EdgeAgent) -> list[ev.Event]:
    """The reports for what a crash interrupted (the caller publishes them)."""
    store = agent.store
    p, cur = store.state.pending, store.current()
    if p is None:
        if cur is not None:
            done = store.outcome(cur.deployment_id)
            log.info("%s: runs %s v%d (%s), deployment %s%s", agent.node, cur.domain, cur.version, cur.checkpoint_id,
                     cur.deployment_id, " (deploy.activated)" if done is not None and done.status == "activated" else "")
        return []
    what = "deployment" if isinstance(p.order, DeployRequested) else "rollback"
    target = p.order.data.artifact.checkpoint_id if isinstance(p.order, DeployRequested) else p.target
    if cur is not None and cur.checkpoint_id == target:
        log.warning("%s: restarted after switching current to v%d (%s) for %s %s: checking what runs",
                    agent.node, cur.version, cur.checkpoint_id, what, p.key)
        if isinstance(p.order, DeployRequested):
            return await agent.confirm_running(p.order, cur, level=logging.WARNING)
        return await agent.finish_rollback(p.order, cur, store.find(p.previous), level=logging.WARNING)
    log.warning(
        "%s: restarted before switching to %s for %s %s: %s runs; the redelivered order carries it out",
        agent.node, target, what, p.key, f"v{cur.version} ({cur.checkpoint_id})" if cur else "nothing",
    )
    store.state.pending = None
    store.save()
    return []
