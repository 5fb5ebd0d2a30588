"""What every CLI command shares: settings, running a coroutine, turning errors into one line."""

from __future__ import annotations

import asyncio
import functools
import sys
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

import typer

from scf.bus import settings as settings_mod
from scf.bus.errors import SCFError
from scf.bus.settings import Settings

if TYPE_CHECKING:  # imported where used: a command that stops before connecting skips nats-py and cryptography
    from scf.bus.client import Bus
    from scf.bus.signing import SigningKey

T = TypeVar("T")


def fail(message: str) -> "typer.Exit":
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(1)


def load_settings(process: str = "cli") -> Settings:
    """Settings for a command, with every `[section]` of scf.toml checked against the
    struct its subsystem decodes, so a misspelt key stops the command before it starts."""
    try:
        settings = settings_mod.load().with_source(process)
        check_sections(settings)
        return settings
    except SCFError as exc:
        raise fail(str(exc)) from None


def check_sections(settings: Settings) -> None:
    import importlib

    for name in settings.raw:
        target = settings_mod.SECTIONS.get(name)
        if target is not None:
            module, _, struct = target.partition(":")
            settings.section(name, getattr(importlib.import_module(module), struct))


# what asyncio.run would wait for without bound after the command's coroutine: the tasks it
# left (nats-py's reconnection among them, when the server is gone), cancelled
LEFTOVER_S = 2.0


def run(coro: Awaitable[T]) -> T:
    """Run a coroutine; SCF errors become `Error: …` and exit code 1. Like asyncio.run, but
    the tasks left behind get LEFTOVER_S in all to end once cancelled, so a process that
    has finished does exit (the shutdown contract of `scf run X`: docs/architecture.md)."""
    try:
        return _run_bounded(coro)
    except SCFError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _run_bounded(coro: Awaitable[T]) -> T:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(coro)
    finally:
        try:
            left = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in left:
                t.cancel()
            if left:
                loop.run_until_complete(asyncio.wait(left, timeout=LEFTOVER_S))
            loop.run_until_complete(asyncio.wait([loop.create_task(loop.shutdown_asyncgens())], timeout=LEFTOVER_S))
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def errors_to_exit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for sync commands: SCF errors become `Error: …`, exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SCFError as exc:
            raise fail(str(exc)) from None

    return wrapper


def signing_key(settings: Settings) -> SigningKey | None:
    if not settings.key:
        return None
    from pathlib import Path

    from scf.bus.signing import SigningKey

    path = Path(settings.key)
    if not path.suffix:
        path = settings.keys_dir / f"{settings.key}.key"
    return SigningKey.load(path)


async def open_bus(settings: Settings, name: str = "scf-cli", *, sign: bool = False) -> Bus:
    from scf.bus.client import Bus

    return await Bus.connect(settings, name, key=signing_key(settings) if sign else None)


def echo_err(text: str) -> None:
    print(text, file=sys.stderr)
