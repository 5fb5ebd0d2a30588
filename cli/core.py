"""Core commands: init, server, streams, events, control, keys, dlq, status."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Optional

import msgspec
import typer

from scf.cli.common import errors_to_exit, fail, load_settings, open_bus, run

server_app = typer.Typer(rich_markup_mode="markdown", help="Run the embedded nats-server (JetStream, store in $SCF_HOME/nats).", no_args_is_help=True)
streams_app = typer.Typer(rich_markup_mode="markdown", help="Streams, KV buckets and the object store, as declared in bus/streams.py.", no_args_is_help=True)
events_app = typer.Typer(rich_markup_mode="markdown", help="Read and write events on the bus.", no_args_is_help=True)
control_app = typer.Typer(rich_markup_mode="markdown", help="Command the system: publishes JSON on control.* (signed when SCF_KEY is set).", no_args_is_help=True)
keys_app = typer.Typer(rich_markup_mode="markdown", help="Ed25519 signing keys and the trust list.", no_args_is_help=True)
dlq_app = typer.Typer(rich_markup_mode="markdown", help="Dead letters: messages that could not be handled.", no_args_is_help=True)


# --------------------------------------------------------------------------- init
def init(
    root: Optional[str] = typer.Option(None, "--root", help="also create a root key NAME here and pin it (the deployment's first host)"),
) -> None:
    """Create SCF_HOME with the vault layout (fossil_vault, model_zoo, archive, nats, keys …)."""
    from scf.bus.settings import init_home

    s = load_settings()
    created = init_home(s)
    typer.echo(f"SCF_HOME {s.home}: {len(created)} directories created" if created else f"SCF_HOME {s.home} is ready")
    if root:
        keys_root_new(root)
    _init_trust(s)


def _init_trust(s) -> None:
    """Migration: move keys/trusted.json into the shared trust list when this host can sign
    it (a pinned root key is held here) and the bus answers; otherwise say how."""
    from scf.bus import trust as tr
    from scf.bus.errors import SCFError

    if not (s.keys_dir / "trusted.json").exists():
        return
    try:
        root = tr.find_root_key(s.keys_dir)
    except SCFError:
        root = None
    if root is None:
        typer.echo("keys/trusted.json is this host's own trust list: move it into the shared one with `scf keys trust --import` where a root key is held")
        return
    try:
        _import_local(s, None)
    except typer.Exit:
        typer.echo("keys/trusted.json not imported (see above): run `scf keys trust --import` once the bus is up")


# --------------------------------------------------------------------------- server
@server_app.command("start")
@errors_to_exit
def server_start() -> None:
    """Start the embedded nats-server in the background and wait until it is ready."""
    from scf.bus.server import EmbeddedServer
    from scf.bus.settings import init_home

    s = load_settings()
    init_home(s)
    typer.echo(EmbeddedServer(s).start().line())


@server_app.command("stop")
@errors_to_exit
def server_stop() -> None:
    """Stop the embedded nats-server (SIGTERM, then wait)."""
    from scf.bus.server import EmbeddedServer

    s = load_settings()
    typer.echo("stopped" if EmbeddedServer(s).stop() else "nats-server was not running")


@server_app.command("status")
@errors_to_exit
def server_status() -> None:
    """Say whether the embedded server runs, its pid, URL and store."""
    from scf.bus.errors import redact_url
    from scf.bus.server import EmbeddedServer

    s = load_settings()
    if not s.embedded:
        typer.echo(f"NATS_URL is set: using {redact_url(s.nats_url)} (the embedded server is not used)")
        return
    typer.echo(EmbeddedServer(s).status().line())


# --------------------------------------------------------------------------- streams
@streams_app.command("ensure")
def streams_ensure(replicas: Optional[int] = typer.Option(None, help="replicas per stream (3 on a cluster)")) -> None:
    """Create or update every declared stream and bucket; report drift."""
    from scf.bus.streams import ensure

    async def main() -> None:
        bus = await open_bus(load_settings())
        try:
            report = await ensure(bus.js, replicas=replicas)
        finally:
            await bus.close()
        for line in report.lines():
            typer.echo(line)

    run(main())


@streams_app.command("ls")
def streams_ls() -> None:
    """List streams with message counts, bytes and sequence ranges."""

    async def main() -> None:
        bus = await open_bus(load_settings())
        try:
            async for line in _stream_lines(bus):
                typer.echo(line)
        finally:
            await bus.close()

    run(main())


async def _stream_lines(bus):
    from nats.js.errors import NotFoundError

    from scf.bus.streams import STREAMS

    for spec in STREAMS:
        try:
            info = await bus.js.stream_info(spec.name)
        except NotFoundError:
            yield f"{spec.name:<12} missing: run `scf streams ensure`"
            continue
        st = info.state
        yield f"{spec.name:<12} {st.messages:>10} msgs {st.bytes:>12} bytes  seq {st.first_seq}..{st.last_seq}  {', '.join(spec.subjects)}"


# --------------------------------------------------------------------------- events
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_since(text: str) -> dt.datetime:
    m = _DURATION.match(text.strip())
    if m:
        secs = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=secs)
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise fail(f"--since {text!r} is neither a duration (30s, 10m, 2h, 1d) nor an ISO time") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


@events_app.command("tail")
def events_tail(
    subject: str = typer.Argument("fossil.>", help="subject filter, e.g. 'gear.>' or 'verdict.intent.*'"),
    since: Optional[str] = typer.Option(None, help="start from this long ago (10m, 2h) or an ISO time"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new events"),
    limit: int = typer.Option(0, help="stop after N events (0: no limit)"),
) -> None:
    """Print the events on SUBJECT, one JSON line each."""
    from scf.bus.streams import stream_for_subject

    start = parse_since(since) if since else None
    try:
        stream = stream_for_subject(subject.replace("*", "x").replace(">", "x"))
    except KeyError:
        raise fail(f"no stream stores subject {subject!r}: see `scf streams ls` for the subject space") from None

    async def main() -> None:
        import asyncio

        from scf.bus.reader import StreamMsg, StreamReader

        bus = await open_bus(load_settings())
        enough = asyncio.Event()
        shown = 0

        def show(m: StreamMsg) -> None:
            nonlocal shown
            if enough.is_set():
                return
            typer.echo(m.data.decode(errors="replace"))
            shown += 1
            if limit and shown >= limit:
                enough.set()

        try:
            reader = StreamReader(bus.nc, bus.js, stream, subject, start_time=start)
            await (reader.follow(show, enough) if follow else reader.scan(show, enough))
        finally:
            await bus.close()

    run(main())


@events_app.command("publish")
def events_publish(
    type_: str = typer.Argument(..., metavar="TYPE", help="event type, e.g. intent.created"),
    data: str = typer.Argument(..., metavar="JSON", help="the payload (the event's data) as JSON"),
) -> None:
    """Validate a payload against the catalog and publish it as an event."""
    from scf.bus import events as ev

    cls = ev.EVENT_TYPES.get(type_)
    if cls is None:
        raise fail(f"unknown event type {type_!r}: use one of {', '.join(sorted(ev.EVENT_TYPES))}")
    payload_type = msgspec.structs.fields(cls)[-1].type
    try:
        payload = msgspec.json.decode(data.encode(), type=payload_type)
    except msgspec.ValidationError as exc:
        raise fail(f"invalid {type_} payload: {exc}") from None
    except msgspec.DecodeError as exc:
        raise fail(f"malformed JSON: {exc}") from None

    async def main() -> None:
        s = load_settings()
        bus = await open_bus(s, sign=True)
        try:
            event = cls.new(payload, source=bus.source)
            ack = await bus.publish(event)
        finally:
            await bus.close()
        typer.echo(f"published {type_} {event.id} to {ack.stream} seq {ack.seq}{' (duplicate)' if ack.duplicate else ''}")

    run(main())


# --------------------------------------------------------------------------- control
def _send(command) -> None:
    from scf.bus import control

    async def main() -> None:
        s = load_settings()
        bus = await open_bus(s, sign=True)
        try:
            subject, body, headers = control.encode(command, bus.key)
            ack = await bus.js.publish(subject, body, headers=headers or None)
        finally:
            await bus.close()
        signed = " (signed)" if headers else ""
        typer.echo(f"sent {subject} {body.decode()}{signed}: CONTROL seq {ack.seq}")

    run(main())


@control_app.command("shift-gear")
def control_shift_gear(
    level: str = typer.Argument(..., help="STANDARD | ACCELERATED | HYPER | SINGULARITY"),
    reason: str = typer.Option("", help="why"),
) -> None:
    """Shift the daemon's gear (heartbeat, approvals, parallel hypotheses)."""
    from scf.bus import control
    from scf.bus.events import GEARS

    if level.upper() not in GEARS:
        raise fail(f"unknown gear {level!r}: use one of {', '.join(GEARS)}")
    _send(control.ShiftGear(level=level.upper(), reason=reason, by=_me()))


@control_app.command("stop")
def control_stop(reason: str = typer.Option("", help="why")) -> None:
    """Stop the daemon's loop (no new intents; consumers keep draining)."""
    from scf.bus import control

    _send(control.Stop(reason=reason, by=_me()))


@control_app.command("resume")
def control_resume(reason: str = typer.Option("", help="why")) -> None:
    """Resume the daemon's loop."""
    from scf.bus import control

    _send(control.Resume(reason=reason, by=_me()))


@control_app.command("emergency-stop")
def control_emergency_stop(reason: str = typer.Option("", help="why")) -> None:
    """Engage the emergency stop: nothing is dispatched, deployed or minted until released."""
    from scf.bus import control

    _send(control.EmergencyStop(reason=reason, by=_me()))


@control_app.command("release-emergency")
def control_release_emergency(reason: str = typer.Option("", help="why")) -> None:
    """Release the emergency stop (needs an operator signature where configured)."""
    from scf.bus import control

    _send(control.ReleaseEmergency(reason=reason, by=_me()))


@control_app.command("approve")
def control_approve(subject_id: str = typer.Argument(..., help="the id of the held intent / proposal"), reason: str = typer.Option("")) -> None:
    """Approve something the safety gate held for a human."""
    from scf.bus import control

    _send(control.Approve(subject_id=subject_id, reason=reason, by=_me()))


@control_app.command("reject")
def control_reject(subject_id: str = typer.Argument(..., help="the id of the held intent / proposal"), reason: str = typer.Option("")) -> None:
    """Reject something the safety gate held for a human."""
    from scf.bus import control

    _send(control.Reject(subject_id=subject_id, reason=reason, by=_me()))


@control_app.command("rollback")
def control_rollback(
    node: str = typer.Argument(..., help="edge node id"),
    to: Optional[str] = typer.Option(None, help="checkpoint id to return to (default: the previous one)"),
    reason: str = typer.Option(""),
) -> None:
    """Roll an edge node back to its previous (or a named) artifact."""
    from scf.bus import control

    _send(control.RollbackCommand(node=node, to=to, reason=reason, by=_me()))


def _me() -> str:
    import getpass
    import socket

    return f"{getpass.getuser()}@{socket.gethostname()}"


# --------------------------------------------------------------------------- keys
# The shared trust list (bus/trust.py): `trust` / `revoke` write root-signed entries on the
# TRUST stream, which every running verifier follows live; `log` is its audit trail.
# `--local` (or a host without a pinned root key) writes this host's keys/trusted.json.
root_app = typer.Typer(rich_markup_mode="markdown", help="Root keys: the operator keys every host pins (keys/roots.json) to accept trust entries.", no_args_is_help=True)
keys_app.add_typer(root_app, name="root")


@keys_app.command("new")
@errors_to_exit
def keys_new(name: str = typer.Argument(..., help="key name, e.g. alice or release")) -> None:
    """Create an Ed25519 key pair in $SCF_HOME/keys (NAME.key, NAME.pub)."""
    from scf.bus.signing import SigningKey

    s = load_settings()
    key = SigningKey.generate(name)
    path = key.save(s.keys_dir)
    typer.echo(f"created {path} (key id {key.kid}); public key: {key.public_b64}")
    typer.echo(f"trust it (where a root key is held): scf keys trust {key.public_b64} --name {name} --role ROLE")


def _public_text(public: str) -> tuple[str, str]:
    """(base64 public key, default name) from a base64 text or a NAME.pub path."""
    p = Path(public)
    if p.suffix == ".pub" or p.exists():
        try:
            return p.read_text().strip(), p.stem
        except OSError as exc:
            raise fail(f"cannot read public key {p} ({exc.strerror}): pass the base64 text or a readable NAME.pub")
    return public.strip(), ""


async def _open_shared(s):
    from scf.bus.errors import ConfigError
    from scf.bus.trust import STREAM, SharedTrust, load_roots

    bus = await open_bus(s, "scf-keys")
    view = SharedTrust(bus.js, load_roots(s.keys_dir), None)
    await view.start(30.0)  # a command that writes the list must read it first: give a loaded server time
    if not view.following:
        await view.stop()
        await bus.close()
        raise ConfigError(f"cannot read stream {STREAM} (the shared trust list): run `scf streams ensure`, and check this login may read it")
    return bus, view


async def _write_shared(s, root, items) -> list[int]:
    """Publish root-signed entries `(kid, make(prev) -> TrustEntry)`; the TRUST seq of each."""
    from scf.bus import trust as tr

    bus, view = await _open_shared(s)
    try:
        return [(await tr.publish_entry(bus.js, view, root, kid, make))[0] for kid, make in items]
    finally:
        await view.stop()
        await bus.close()


def _grant(kid: str, public: str, name: str, roles: list[str]):
    from scf.bus import trust as tr

    by = _me()
    return kid, lambda prev: tr.TrustEntry(action="trust", kid=kid, public=public, name=name, roles=list(roles), by=by, at=tr.utcnow(), prev=prev)


@keys_app.command("ls")
@errors_to_exit
def keys_ls() -> None:
    """List this host's keys, pinned roots, the shared trust list (live) and this host's trusted.json."""
    import asyncio

    from scf.bus.errors import SCFError
    from scf.bus.signing import SigningKey, TrustList
    from scf.bus.trust import load_roots

    s = load_settings()
    for path in sorted(s.keys_dir.glob("*.key")):
        try:
            k = SigningKey.load(path)
        except SCFError:
            continue  # not a signing key (ids.key is the deployment's id secret)
        typer.echo(f"own      {k.kid}  {k.name}")
    for kid, entry in load_roots(s.keys_dir).keys.items():
        typer.echo(f"root     {kid}  {entry.name or '-'}  (pinned in keys/roots.json)")

    async def shared():
        bus, view = await _open_shared(s)
        await view.stop()
        await bus.close()
        return view

    try:
        view = asyncio.run(shared())
    except SCFError as exc:
        view = None
        typer.echo(f"shared trust list not read: {exc}")
    if view is not None:
        for kid, entry in view.state.keys.items():
            typer.echo(f"trusted  {kid}  {entry.name or '-'}  roles={','.join(entry.roles)}  [shared]")
        for kid, r in view.state.revoked.items():
            typer.echo(f"revoked  {kid}  {r.name or '-'}  by {r.by} at {r.at:%Y-%m-%dT%H:%M:%SZ}  [shared]")
    for kid, entry in TrustList.load(s.keys_dir / "trusted.json").keys.items():
        note = "  (revoked in the shared list: not honoured)" if view is not None and kid in view.state.revoked else ""
        typer.echo(f"trusted  {kid}  {entry.name or '-'}  roles={','.join(entry.roles)}  [local: keys/trusted.json]{note}")


@keys_app.command("trust")
@errors_to_exit
def keys_trust(
    public: Optional[str] = typer.Argument(None, help="base64 public key, or a path to a NAME.pub file"),
    name: str = typer.Option("", help="who it belongs to (a node key: the node id)"),
    role: list[str] = typer.Option(["operator"], help="operator | release | node (repeatable)"),
    local: bool = typer.Option(False, "--local", help="this host only: write keys/trusted.json, not the shared list"),
    by: Optional[str] = typer.Option(None, "--by", help="the root key that signs the entry (name or path; default: the pinned root held here)"),
    import_: bool = typer.Option(False, "--import", help="move every key of keys/trusted.json into the shared list"),
) -> None:
    """Trust a public key with its roles, in the shared root-signed trust list (live on every host)."""
    from scf.bus import trust as tr
    from scf.bus.signing import TrustList

    s = load_settings()
    if import_:
        return _import_local(s, by)
    if public is None:
        raise fail("give a public key (base64 text or a NAME.pub path), or --import to move keys/trusted.json into the shared list")
    text, stem = _public_text(public)
    scratch = TrustList()
    kid = scratch.trust(text, name or stem, role)  # validates the key and the roles
    entry = scratch.keys[kid]
    root = None if local else tr.find_root_key(s.keys_dir, by)
    if root is None:
        t = TrustList.load(s.keys_dir / "trusted.json")
        t.trust(text, entry.name, entry.roles)
        t.save()
        why = "" if local else (
            ": no pinned root key is held here to sign a shared entry (`scf keys root new`, or --by KEY); "
            "other hosts and running processes elsewhere do not see it"
        )
        typer.echo(f"trusted {kid} as {','.join(entry.roles)} on this host only ({t.path}){why}")
        return
    (seq,) = run(_write_shared(s, root, [_grant(kid, entry.public, entry.name, entry.roles)]))
    typer.echo(f"trusted {kid} as {','.join(entry.roles)} in the shared trust list (TRUST seq {seq}, signed by root {root.name} {root.kid})")


def _import_local(s, by: Optional[str]) -> None:
    from scf.bus import trust as tr
    from scf.bus.signing import TrustList

    path = s.keys_dir / "trusted.json"
    local = TrustList.load(path)
    if not path.exists():
        typer.echo(f"nothing to import: {path} does not exist")
        return
    root = tr.find_root_key(s.keys_dir, by)
    if root is None:
        raise fail("no pinned root key is held here to sign the imported entries: create one with `scf keys root new`, or pass --by KEY")

    async def main() -> tuple[list[int], int, list[str]]:
        bus, view = await _open_shared(s)
        try:
            revoked = [kid for kid in local.keys if kid in view.state.revoked]  # a revocation wins over a local file
            todo = [_grant(kid, e.public, e.name, e.roles or ["operator"]) for kid, e in local.keys.items()
                    if kid not in view.state.revoked
                    and view.state.keys.get(kid) != tr.TrustedKey(public=e.public, name=e.name, roles=list(e.roles or ["operator"]))]
            seqs = [(await tr.publish_entry(bus.js, view, root, kid, make))[0] for kid, make in todo]
            return seqs, len(local.keys) - len(todo) - len(revoked), revoked
        finally:
            await view.stop()
            await bus.close()

    seqs, same, revoked = run(main())
    moved = path.with_name("trusted.json.imported")
    path.replace(moved)
    skipped = f"; not imported, revoked in the shared list: {', '.join(revoked)}" if revoked else ""
    typer.echo(f"imported {len(seqs)} key(s) into the shared trust list ({same} already there), signed by root {root.name}; {path} moved to {moved}{skipped}")


@keys_app.command("revoke")
@errors_to_exit
def keys_revoke(
    key: str = typer.Argument(..., help="key id, name in the trust list, base64 public key or NAME.pub path"),
    reason: str = typer.Option("", help="why (kept in the audit trail)"),
    local: bool = typer.Option(False, "--local", help="this host only: remove it from keys/trusted.json"),
    by: Optional[str] = typer.Option(None, "--by", help="the root key that signs the revocation (default: the pinned root held here)"),
) -> None:
    """Revoke a key in the shared trust list: every running verifier refuses it within seconds."""
    from scf.bus import trust as tr
    from scf.bus.signing import TrustList

    s = load_settings()
    path = s.keys_dir / "trusted.json"
    local_list = TrustList.load(path)
    root = None if local else tr.find_root_key(s.keys_dir, by)
    if not local and root is None:
        raise fail("no pinned root key is held here to sign the revocation: run it where the root key is (or --by KEY), or --local to drop it from this host's keys/trusted.json")

    async def resolve_and_revoke() -> tuple[str, int | None]:
        bus = view = None
        if root is not None:
            bus, view = await _open_shared(s)
        try:
            kid = _resolve_kid(key, local_list, view)
            if view is None:
                return kid, None
            name = (view.state.keys.get(kid) or local_list.keys.get(kid) or tr.TrustedKey(public="")).name
            by_me = _me()
            make = lambda prev: tr.TrustEntry(action="revoke", kid=kid, name=name, by=by_me, at=tr.utcnow(), prev=prev, reason=reason)  # noqa: E731
            seq, _ = await tr.publish_entry(bus.js, view, root, kid, make)
            return kid, seq
        finally:
            if view is not None:
                await view.stop()
                await bus.close()

    kid, seq = run(resolve_and_revoke())
    dropped = local_list.keys.pop(kid, None) is not None
    if dropped:
        local_list.save()
    if seq is None:
        if not dropped:
            raise fail(f"key {kid} is not in {path}: nothing to remove")
        typer.echo(f"removed {kid} from {path} (this host only)")
        return
    typer.echo(f"revoked {kid} in the shared trust list (TRUST seq {seq}, signed by root {root.name}){'; removed from ' + str(path) if dropped else ''}")


def _resolve_kid(key: str, local_list, view) -> str:
    import base64

    from scf.bus.signing import key_id

    if re.fullmatch(r"[0-9a-f]{16}", key):
        return key
    p = Path(key)
    if p.suffix == ".pub" or p.exists():
        key = p.read_text().strip()
    try:
        raw = base64.b64decode(key, validate=True)
    except ValueError:
        raw = b""
    if len(raw) == 32:
        return key_id(raw)
    known = dict(local_list.keys)
    if view is not None:
        known.update(view.state.keys)
    hits = [kid for kid, e in known.items() if e.name == key]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise fail(f"{len(hits)} keys are named {key!r} ({', '.join(hits)}): give the key id")
    raise fail(f"no key id, public key or trusted name {key!r}: see `scf keys ls`")


@keys_app.command("log")
@errors_to_exit
def keys_log() -> None:
    """The trust list's audit trail: every grant and revocation, who signed it, when; ignored entries and why."""
    from scf.bus import trust as tr

    s = load_settings()

    async def main():
        bus = await open_bus(s, "scf-keys")
        try:
            return await tr.read_log(bus.js, tr.load_roots(s.keys_dir))
        finally:
            await bus.close()

    outcomes = run(main())
    if not outcomes:
        typer.echo("the shared trust list is empty")
    for o in outcomes:
        e = o.entry
        when = f"{o.time:%Y-%m-%dT%H:%M:%SZ}" if o.time else "-"
        what = f"{e.action:<6}  {e.kid}  {e.name or '-'}" + (f"  roles={','.join(e.roles)}" if e.action == "trust" else "") + f"  by {e.by}" if e else f"?       {o.subject}"
        if e is not None and e.reason:
            what += f"  ({e.reason})"
        status = f"signed by root {o.signer}" if o.applied else f"IGNORED: {o.reason}"
        typer.echo(f"{o.seq:>6}  {when}  {what}  {status}")


@root_app.command("new")
@errors_to_exit
def keys_root_new(name: str = typer.Argument("root", help="key name (keep NAME.key offline or on the operator's machine)")) -> None:
    """Create a root key here and pin it (keys/roots.json); pin its public key on every other host."""
    from scf.bus.signing import SigningKey
    from scf.bus.trust import pin_root

    s = load_settings()
    key = SigningKey.generate(name)
    path = key.save(s.keys_dir)
    pin_root(s.keys_dir, key.public_b64, name)
    typer.echo(f"created root key {path} (key id {key.kid}) and pinned it in {s.keys_dir / 'roots.json'}")
    typer.echo(f"pin it on every other host: scf keys root pin {key.public_b64} --name {name}")


@root_app.command("pin")
@errors_to_exit
def keys_root_pin(
    public: str = typer.Argument(..., help="base64 public key of the root, or its NAME.pub path"),
    name: str = typer.Option("", help="whose root key it is"),
) -> None:
    """Pin a root key on this host: trust entries signed by it are applied here."""
    from scf.bus.trust import pin_root

    s = load_settings()
    text, stem = _public_text(public)
    kid = pin_root(s.keys_dir, text, name or stem)
    typer.echo(f"pinned root {kid} in {s.keys_dir / 'roots.json'}")


# --------------------------------------------------------------------------- dlq
@dlq_app.command("ls")
def dlq_ls() -> None:
    """List dead letters: DLQ seq, consumer, original stream#seq and subject, deliveries, error."""
    from scf.bus import dlq

    async def main() -> None:
        bus = await open_bus(load_settings())
        try:
            entries = await dlq.list_dead(bus)
        finally:
            await bus.close()
        if not entries:
            typer.echo("the DLQ is empty")
        for e in entries:
            typer.echo(e.line())

    run(main())


@dlq_app.command("show")
def dlq_show(seq: int = typer.Argument(..., help="the DLQ sequence number")) -> None:
    """Show one dead letter with its error, headers and original payload."""
    from scf.bus import dlq

    async def main() -> None:
        bus = await open_bus(load_settings())
        try:
            e = await dlq.get_dead(bus, seq)
        finally:
            await bus.close()
        if e.event is None:
            typer.echo(json.dumps({
                "dlq_seq": e.seq, "undecodable": e.problem, "dlq_subject": e.subject, "size": e.size,
                "raw": e.raw[:4096].decode(errors="replace"),
            }, indent=2))
            return
        d = e.event.data
        typer.echo(json.dumps({
            "dlq_seq": e.seq, "consumer": d.consumer, "stream": d.stream, "seq": d.seq, "subject": d.subject,
            "deliveries": d.deliveries, "error": d.error, "headers": d.headers,
            "digest": d.digest, "size": d.size, "truncated": d.truncated,
            "payload": d.payload.decode(errors="replace"),
        }, indent=2))

    run(main())


@dlq_app.command("drop")
def dlq_drop(seq: int = typer.Argument(..., help="the DLQ sequence number")) -> None:
    """Remove one dead letter without redriving it (e.g. an undecodable entry)."""
    from scf.bus import dlq

    async def main() -> None:
        bus = await open_bus(load_settings())
        try:
            typer.echo(await dlq.drop(bus, seq))
        finally:
            await bus.close()

    run(main())


@dlq_app.command("retry")
def dlq_retry(
    seq: Optional[int] = typer.Argument(None, help="DLQ sequence number (or --all)"),
    all_: bool = typer.Option(False, "--all", help="redrive every dead letter"),
) -> None:
    """Redrive dead letters to the consumer that failed them (only genuine copies of a
    message on its stream; a refused entry is named with the reason)."""
    from scf.bus import dlq
    from scf.bus.trust import SharedTrust

    if seq is None and not all_:
        raise fail("give a DLQ sequence number or --all (see `scf dlq ls`)")

    async def main() -> int:
        s = load_settings()
        bus = await open_bus(s)
        refused = 0
        trust = None
        try:
            # the deployment's trust list (shared, live), for entries whose original is gone
            trust = await SharedTrust.open(bus, s)
            seqs = [seq] if seq is not None else [e.seq for e in await dlq.list_dead(bus)]
            for n in seqs:
                try:
                    typer.echo(await dlq.retry(bus, n, trust))
                except dlq.RedriveRefused as exc:
                    if seq is not None:
                        raise
                    refused += 1
                    typer.echo(f"Error: {exc}", err=True)
        finally:
            if trust is not None:
                await trust.stop()
            await bus.close()
        return refused

    if run(main()):
        raise typer.Exit(1)


# --------------------------------------------------------------------------- status
def status(
    watch: bool = typer.Option(False, "--watch", "-w", help="a live view: gear, processes, jobs, checkpoints, nodes, ledger"),
    interval: float = typer.Option(1.0, help="refresh interval for --watch, seconds"),
) -> None:
    """Streams with message counts, consumers with pending / ack-pending, DLQ size, archive lag."""
    from scf.bus.status import collect

    async def main() -> None:
        bus = await open_bus(load_settings())
        try:
            if watch:
                from scf.ops.status_view import watch as live

                await live(bus, interval)
                return
            for line in await collect(bus):
                typer.echo(line)
            from scf.projections.archive import lag_lines

            lines = await lag_lines(bus, bus.settings)
            if lines:
                typer.echo("archive lag:")
                for line in lines:
                    typer.echo(f"  {line}")
        finally:
            await bus.close()

    run(main())
