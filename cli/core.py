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

server_app = typer.Typer(help="Run the embedded nats-server (JetStream, store in $SCF_HOME/nats).", no_args_is_help=True)
streams_app = typer.Typer(help="Streams, KV buckets and the object store, as declared in bus/streams.py.", no_args_is_help=True)
events_app = typer.Typer(help="Read and write events on the bus.", no_args_is_help=True)
control_app = typer.Typer(help="Command the system: publishes JSON on control.* (signed when SCF_KEY is set).", no_args_is_help=True)
keys_app = typer.Typer(help="Ed25519 signing keys and the trust list.", no_args_is_help=True)
dlq_app = typer.Typer(help="Dead letters: messages that could not be handled.", no_args_is_help=True)


# --------------------------------------------------------------------------- init
def init() -> None:
    """Create SCF_HOME with the vault layout (fossil_vault, model_zoo, archive, nats, keys …)."""
    from scf.bus.settings import init_home

    s = load_settings()
    created = init_home(s)
    typer.echo(f"SCF_HOME {s.home}: {len(created)} directories created" if created else f"SCF_HOME {s.home} is ready")


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
    from scf.bus.server import EmbeddedServer

    s = load_settings()
    if not s.embedded:
        typer.echo(f"NATS_URL is set: using {s.nats_url} (the embedded server is not used)")
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
    from scf.bus.streams import STREAMS

    from nats.js.errors import NotFoundError

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
        from nats.js import api

        bus = await open_bus(load_settings())
        try:
            info = await bus.js.stream_info(stream)
            if info.state.messages == 0 and not follow:
                return
            kwargs = {"deliver_policy": api.DeliverPolicy.BY_START_TIME} if start else {}
            cfg = api.ConsumerConfig(opt_start_time=start.isoformat().replace("+00:00", "Z")) if start else None
            sub = await bus.js.subscribe(subject, stream=stream, ordered_consumer=True, config=cfg, **kwargs)
            n = 0
            while True:
                try:
                    msg = await sub.next_msg(timeout=None if follow else 1.0)
                except Exception:
                    break
                typer.echo(msg.data.decode(errors="replace"))
                n += 1
                if limit and n >= limit:
                    break
                if not follow and msg.metadata.num_pending == 0:
                    break
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
@keys_app.command("new")
@errors_to_exit
def keys_new(name: str = typer.Argument(..., help="key name, e.g. alice or release")) -> None:
    """Create an Ed25519 key pair in $SCF_HOME/keys (NAME.key, NAME.pub)."""
    from scf.bus.signing import SigningKey

    s = load_settings()
    key = SigningKey.generate(name)
    path = key.save(s.keys_dir)
    typer.echo(f"created {path} (key id {key.kid}); public key: {key.public_b64}")
    typer.echo(f"trust it on the hosts that verify: scf keys trust {key.public_b64} --name {name}")


@keys_app.command("ls")
@errors_to_exit
def keys_ls() -> None:
    """List this host's keys and the trust list."""
    from scf.bus.signing import SigningKey, TrustList

    s = load_settings()
    for path in sorted(s.keys_dir.glob("*.key")):
        k = SigningKey.load(path)
        typer.echo(f"own      {k.kid}  {k.name}")
    for kid, entry in TrustList.load(s.keys_dir / "trusted.json").keys.items():
        typer.echo(f"trusted  {kid}  {entry.name or '-'}  roles={','.join(entry.roles)}")


@keys_app.command("trust")
@errors_to_exit
def keys_trust(
    public: str = typer.Argument(..., help="base64 public key, or a path to a NAME.pub file"),
    name: str = typer.Option("", help="who it belongs to"),
    role: list[str] = typer.Option(["operator"], help="operator | release | node (repeatable)"),
) -> None:
    """Add a public key to the trust list with its roles."""
    from scf.bus.signing import TrustList

    s = load_settings()
    p = Path(public)
    text = p.read_text().strip() if p.exists() else public
    trust = TrustList.load(s.keys_dir / "trusted.json")
    kid = trust.trust(text, name or (p.stem if p.exists() else ""), role)
    trust.save()
    typer.echo(f"trusted {kid} as {','.join(role)}")


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
    from scf.bus.signing import TrustList

    if seq is None and not all_:
        raise fail("give a DLQ sequence number or --all (see `scf dlq ls`)")

    async def main() -> int:
        s = load_settings()
        trust = TrustList.load(s.keys_dir / "trusted.json")
        bus = await open_bus(s)
        refused = 0
        try:
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
