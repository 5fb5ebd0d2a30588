"""The project's error root and its specific errors.

Every message names the thing that went wrong and how to fix it; only the CLI turns these
into exit codes.
"""

from __future__ import annotations


class SCFError(Exception):
    """Root of every error SCF raises on purpose."""


class ConfigError(SCFError):
    """Settings or files that cannot be used as given."""


def redact_url(url: str) -> str:
    """A NATS URL (or comma-separated list) without its user:password, for messages and logs."""
    import re

    return re.sub(r"//[^@/]*@", "//", url)


class NatsUnavailable(SCFError):
    def __init__(self, url: str, detail: str = "") -> None:
        self.url = redact_url(url)  # the password must not reach a terminal or a log (tests/test_attack_proofs.py)
        msg = (
            f"cannot reach NATS at {self.url}"
            + (f" ({detail})" if detail else "")
            + ": start the embedded server with `scf server start`, or set NATS_URL to a running server"
        )
        super().__init__(msg)


class ServerError(SCFError):
    """An error answered by nats-server; keeps the server's codes."""

    def __init__(self, message: str, code: int | None = None, err_code: int | None = None) -> None:
        self.code = code
        self.err_code = err_code
        super().__init__(f"{message} (code {code}, err_code {err_code})" if code else message)


class PublishConflict(ServerError):
    """A publish refused because the subject already holds a message (expected sequence)."""


class StreamNotFound(ServerError):
    pass


class DecodeError(SCFError):
    """Bytes that do not decode into a declared event or command."""


class UnknownEventType(DecodeError):
    pass


class SignatureError(SCFError):
    """A signature that is missing where required, malformed, from an unknown key, or wrong."""


class EmbeddedServerError(SCFError):
    pass
