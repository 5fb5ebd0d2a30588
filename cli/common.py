"""What every CLI command shares: settings, running a coroutine, turning errors into one line."""

from __future__ import annotations

import asyncio
import functools
import sys
from typing import Any, Awaitable, Callable, TypeVar

import typer

from scf.bus import settings as settings_mod
from scf.bus.client import Bus
from scf.bus.errors import SCFError
from scf.bus.settings import Settings
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


def run(coro: Awaitable[T]) -> T:
    """Run a coroutine; SCF errors become `Error: …` and exit code 1."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except SCFError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


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

    path = Path(settings.key)
    if not path.suffix:
        path = settings.keys_dir / f"{settings.key}.key"
    return SigningKey.load(path)


async def open_bus(settings: Settings, name: str = "scf-cli", *, sign: bool = False) -> Bus:
    return await Bus.connect(settings, name, key=signing_key(settings) if sign else None)


def echo_err(text: str) -> None:
    print(text, file=sys.stderr)
