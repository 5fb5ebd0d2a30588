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


# --------------------------------------------------------------------------- the receive path
#
# EVERY HOOK INTO nats-py's PRIVATE INTERNALS LIVES IN THIS MODULE (pinned: nats-py 2.16.0).
# tests/test_bus_receive.py fails when one of them changes shape: the names used here
# (`Client._ps`, `Client._process_msg`, `Client._process_headers`, `Client._parse_header_lines`,
# `Client._subs`, `Client.stats`, `Parser.parse`, `Parser.reset`, `Parser.buf`) and the
# equivalence of `parse_headers` with nats-py's own header parsing.
#
# `RxParser` replaces a connection's protocol parser (`use_rx_parser(nc)`, before connecting;
# bus.client.connect does it for every SCF connection). It parses MSG/HMSG with bytes.find
# and split instead of regular expressions and a bytearray consumed piece by piece, and
# hands a message to nats-py's `_process_msg` exactly as nats-py's parser does — unless its
# subscription has a *sink* (bus/rx.py): then the message is appended, raw, to the sink as
# (subject, reply, header block, payload) — no Msg object, no header parsing, no queue —
# and the sink is told once per socket read (`flush`) that messages came. Every other
# protocol line (PING, PONG, INFO, +OK, -ERR) is handed to nats-py's own parser, one line at
# a time, so connecting, authentication, TLS, reconnects, ping/pong and errors stay nats-py's.

from nats.errors import ProtocolError as _ProtocolError  # noqa: E402
from nats.protocol.parser import Parser as _Parser  # noqa: E402

_MSG, _HMSG, _CRLF = b"MSG ", b"HMSG ", b"\r\n"


class RxParser(_Parser):
    """nats-py's parser with a fast MSG/HMSG path and raw delivery to sinks (see above)."""

    def __init__(self, nc=None) -> None:
        self.sinks: dict[int, object] = {}  # sid -> a sink (bus.rx.Sink): raw delivery
        super().__init__(nc)

    def reset(self) -> None:
        super().reset()
        self._rest = b""  # bytes not parsed yet (a message or line cut by the read)
        self._parts: list[bytes] = []  # a large message's chunks, while fewer than _need bytes are here
        self._have = 0
        self._need = 0

    async def parse(self, data: bytes = b"") -> None:
        if self._need:  # a large message arriving: gather its chunks, join once when complete
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return
            buf, self._parts, self._have, self._need = b"".join(self._parts), [], 0, 0
        elif self._rest:
            buf = self._rest + data
        else:
            buf = bytes(data)
        self._rest = b""
        nc, sinks = self.nc, self.sinks
        touched: dict[int, object] = {}
        n, pos, count, nbytes = len(buf), 0, 0, 0
        try:
            while pos < n:
                hmsg = buf.startswith(_HMSG, pos)
                if hmsg or buf.startswith(_MSG, pos):
                    eol = buf.find(_CRLF, pos)
                    if eol < 0:
                        break
                    args = buf[pos:eol].split()
                    try:
                        if hmsg:  # HMSG <subject> <sid> [reply] <header size> <total size>
                            if len(args) == 6:
                                subject, sid, reply, hsize, size = args[1], int(args[2]), args[3], int(args[4]), int(args[5])
                            else:
                                subject, sid, reply, hsize, size = args[1], int(args[2]), b"", int(args[3]), int(args[4])
                        elif len(args) == 5:  # MSG <subject> <sid> [reply] <size>
                            subject, sid, reply, hsize, size = args[1], int(args[2]), args[3], 0, int(args[4])
                        else:
                            subject, sid, reply, hsize, size = args[1], int(args[2]), b"", 0, int(args[3])
                    except (IndexError, ValueError):
                        raise _ProtocolError("nats: malformed MSG") from None
                    start = eol + 2
                    end = start + size
                    if end + 2 > n:  # the payload is not all here yet
                        if end + 2 - pos > 65536:
                            self._parts, self._have, self._need = [buf[pos:]], n - pos, end + 2 - pos
                            pos = n
                        break
                    payload = buf[start + hsize:end] if hsize else buf[start:end]
                    hdr = buf[start:start + hsize] if hsize else None
                    pos = end + 2
                    sink = sinks.get(sid)
                    if sink is None:
                        await nc._process_msg(sid, subject, reply, payload, hdr)
                        continue
                    count += 1
                    nbytes += size - hsize
                    if hsize and size == hsize and hdr[8:9] == b" ":  # type: ignore[index]  # a status message
                        sink.status(subject, reply, hdr)  # type: ignore[attr-defined]
                    else:
                        sink.items.append((subject, reply, hdr, payload))  # type: ignore[attr-defined]
                    touched[sid] = sink
                else:
                    eol = buf.find(_CRLF, pos)
                    if eol < 0:
                        break
                    line, pos = buf[pos:eol + 2], eol + 2
                    await _Parser.parse(self, line)  # PING, PONG, INFO, +OK, -ERR: nats-py's own
        finally:
            if pos < n:
                self._rest = buf[pos:]
            if count:
                nc.stats["in_msgs"] += count
                nc.stats["in_bytes"] += nbytes
            for sink in touched.values():
                try:
                    sink.flush()  # type: ignore[attr-defined]
                except Exception:  # noqa: BLE001 - nothing a sink does may end the read loop
                    log.exception("a receive sink failed")


def use_rx_parser(nc) -> RxParser:
    """Give a connection (`nats.aio.client.Client`, not yet connected) the RxParser."""
    ps = getattr(nc, "_ps", None)
    if not isinstance(ps, RxParser):
        ps = nc._ps = RxParser(nc)
    return ps


def rx_parser(nc) -> RxParser | None:
    ps = getattr(nc, "_ps", None)
    return ps if isinstance(ps, RxParser) else None


def sid_of(sub) -> int:
    """A nats-py subscription's sid (the key of the connection's `_subs`)."""
    return sub._id


def header_lines(raw: bytes) -> dict[str, str]:
    """nats-py's `Client._parse_header_lines` (2.16), the same dict for any input, with the
    per-character whitespace check of a header name done only when a cheap test says a
    name may hold whitespace (an ASCII whitespace is a space or a control character)."""
    out: dict[str, str] = {}
    for line in raw.split(_CRLF):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if (" " in key or not key.isprintable()) and any(c.isspace() for c in key):
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


def parse_headers(hdr: bytes | None) -> dict[str, str] | None:
    """nats-py's `_process_headers` (2.16), synchronous, and with `install()`'s rule for a
    block it cannot parse (one `Scf-Malformed-Headers` header). Called lazily, for the
    messages whose headers are read."""
    if not hdr:
        return None
    try:
        out: dict[str, str] = {}
        raw = hdr[8:]
        if raw[0] == 32:  # NATS/1.0 <status> [description]: an inline status
            line = hdr[9:]
            status = line[:3].strip().decode()
            desc = line[4:len(line) - 4]
            if status.isdigit():
                out["Status"] = status
            raw = raw[raw.find(_CRLF) + 2:]
            if desc:
                i = desc.find(_CRLF)
                if i > 0:
                    out["Description"] = desc[:i].decode()
                    out.update(header_lines(desc[i + 2:]))
                else:
                    out["Description"] = desc.decode()
        if len(raw) <= 2:
            return out
        out.update(header_lines(hdr[10:]))
        return out or None
    except Exception as exc:  # noqa: BLE001 - as install(): delivered with one header naming the problem
        reason = f"{type(exc).__name__}: {exc}"[:200] or type(exc).__name__
        now = time.monotonic()
        if now - _last_warn[0] >= 1.0:
            _last_warn[0] = now
            log.warning("a message with a malformed NATS header block (%d bytes, %s) is delivered without its headers",
                        len(hdr), reason)
        return {MALFORMED: f"{len(hdr)} bytes not parsed ({reason})"}
