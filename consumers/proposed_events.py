"""PROPOSED for bus/events.py — event changes the deploy / edge / ledger processes need.

Nothing here changes the catalog: each class extends a catalog class with new fields that
have defaults (so every existing reader — `bus.codec.ANY`, the archive — still decodes
these events as the catalog types, ignoring the new fields), or declares one new event type.
When the lead merges them into bus/events.py, this module shrinks to re-exports:

1. `DeployRequest.release: bytes = b""` — the signed `checkpoint.promoted` event, as raw
   bytes, that the order deploys. The edge agent verifies the release signature on these
   bytes (role `release`) before it activates anything (docs/deploy.md, "Why the order
   carries the release").
2. New event `deploy.rollback_requested` (subject `deploy.rollback_requested.<node>`,
   stream DEPLOY): the deploy planner's translation of a verified `control.rollback`
   command, delivered to the node through the same durable consumer as its deployments
   (so they apply in the order sent; edge users may read only `deploy.>`).
3. `Transfer.cause_digest: str = ""` — sha256 over the measurement's content, so a repeat
   of a cause with *different* content is told apart from a true repeat, even when both
   would mint the same amount.
"""

from __future__ import annotations

import msgspec

from bus import events as ev
from bus.ids import subject_token


# --------------------------------------------------------------------------- 1. deploy.requested + release


class DeployOrder(ev.DeployRequest, frozen=True, kw_only=True):
    """PROPOSED: `DeployRequest` + `release` (the signed promotion's raw bytes)."""

    release: bytes = b""


class DeployOrdered(ev.DeployRequested, tag="deploy.requested", frozen=True, kw_only=True):
    """PROPOSED: `deploy.requested` whose data carries `release`."""

    data: DeployOrder


# --------------------------------------------------------------------------- 2. deploy.rollback_requested


class RollbackRequest(ev.Payload, frozen=True):
    """PROPOSED: a verified rollback command for one node."""

    request_id: str  # derived from the control command (its CONTROL sequence)
    node: str
    to: str | None = None  # checkpoint id or version number; None: the previous artifact
    reason: str = ""
    by: str = ""
    signer: str | None = None  # the trusted operator key that signed the command, if any
    command_seq: int = 0


class DeployRollbackRequested(ev.Event, tag="deploy.rollback_requested", frozen=True, kw_only=True):
    """PROPOSED new event type: deploy.rollback_requested.<node> on DEPLOY."""

    data: RollbackRequest

    def subject(self) -> str:
        return f"deploy.rollback_requested.{subject_token(self.data.node)}"


# --------------------------------------------------------------------------- 3. ledger.transfer + cause_digest


class TransferV(ev.Transfer, frozen=True, kw_only=True):
    """PROPOSED: `Transfer` + `cause_digest`."""

    cause_digest: str = ""


class LedgerTransferV(ev.LedgerTransfer, tag="ledger.transfer", frozen=True, kw_only=True):
    data: TransferV


def payload_bytes(payload: ev.Payload) -> bytes:
    return msgspec.json.encode(payload)


__all__ = [
    "DeployOrder",
    "DeployOrdered",
    "RollbackRequest",
    "DeployRollbackRequested",
    "TransferV",
    "LedgerTransferV",
]
