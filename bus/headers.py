"""Message header names, in one place.

NATS's own names come from nats.py (`nats.js.api.Header`; here as their string values, as
the server spells them, so they work as dict keys and on the wire); SCF's own are defined
here. This module imports nothing of SCF, so every module of `bus/` (trust, control, the
client) and every process may use it.
"""

from nats.js.api import Header

# NATS JetStream's
MSG_ID = Header.MSG_ID.value  # "Nats-Msg-Id": dedup within the stream's window
EXPECTED_LAST_SUBJECT_SEQ = Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value  # "0": the entity's first, ever
EXPECTED_LAST_SEQ = Header.EXPECTED_LAST_SEQUENCE.value  # the stream's: a fencing token
EXPECTED_LAST_MSG_ID = Header.EXPECTED_LAST_MSG_ID.value
BATCH_ID = Header.BATCH_ID.value  # atomic batches
BATCH_SEQUENCE = Header.BATCH_SEQUENCE.value
BATCH_COMMIT = Header.BATCH_COMMIT.value

# SCF's
SCF_TYPE = "Scf-Type"  # the event type, so routers and the archive need not parse the body
SCF_SIG = "Scf-Sig"  # signature of a plain-JSON control command (or a trust grant)
SCF_KID = "Scf-Kid"
SCF_REDRIVE_FOR = "Scf-Redrive-For"  # a DLQ redrive meant for one consumer only

__all__ = [
    "Header",
    "MSG_ID",
    "EXPECTED_LAST_SUBJECT_SEQ",
    "EXPECTED_LAST_SEQ",
    "EXPECTED_LAST_MSG_ID",
    "BATCH_ID",
    "BATCH_SEQUENCE",
    "BATCH_COMMIT",
    "SCF_TYPE",
    "SCF_SIG",
    "SCF_KID",
    "SCF_REDRIVE_FOR",
]
