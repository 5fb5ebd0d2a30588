"""The gears: one table of what each gear means, and the gear's KV mirror.

The source of truth for the current gear is the last `gear.changed` event in CONTROL; the
daemon mirrors it into `scf_state/gear` (a cache every process can read and watch without
replaying the log). Readers that find no entry, or an unreadable one, assume STANDARD: the
strictest gear, the one that asks a human most.

| gear        | heartbeat | human approval for   | hypotheses | train after N new fossils |
|-------------|-----------|----------------------|------------|---------------------------|
| STANDARD    | 5 s       | train, deploy        | 1          | 1000                      |
| ACCELERATED | 1 s       | deploy               | 4          | 500                       |
| HYPER       | 0.1 s     | -                    | 16         | 200                       |
| SINGULARITY | 0.05 s    | -                    | 64         | 100                       |

SINGULARITY is refused unless the deployment is a sandbox (`settings.sandbox`); no gear
lifts the emergency stop or a hard physical limit (those checks never consult the gear).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import msgspec
from nats.js.errors import KeyNotFoundError

from scf.bus.events import GEARS
from scf.bus.streams import KEY_GEAR


@dataclass(frozen=True)
class GearSpec:
    name: str
    level: int  # 1..4, as the seed numbers them
    heartbeat_s: float  # the daemon's pulse period
    human_approval: frozenset[str]  # intent kinds that wait for a human (HOLD) in this gear
    hypotheses: int  # parallel training hypotheses a train intent asks for
    train_threshold: int  # new fossils of a domain that trigger a train intent
    sampling_temperature: float  # mutation / sampling temperature handed to training
    sandbox_only: bool = False


GEAR_TABLE: dict[str, GearSpec] = {
    g.name: g
    for g in (
        GearSpec("STANDARD", 1, 5.0, frozenset({"train", "deploy"}), 1, 1000, 1.0),
        GearSpec("ACCELERATED", 2, 1.0, frozenset({"deploy"}), 4, 500, 1.0),
        GearSpec("HYPER", 3, 0.1, frozenset(), 16, 200, 1.5),
        GearSpec("SINGULARITY", 4, 0.05, frozenset(), 64, 100, 2.0, sandbox_only=True),
    )
}
assert tuple(GEAR_TABLE) == GEARS, "the gear table must list bus.events.GEARS in order"

DEFAULT_GEAR = "STANDARD"

# The params of a daemon train intent: bookkeeping and dispatch hints, not model config.
# Dispatch keeps them out of the job's `config` (EBDMConfig refuses unknown keys).
TRAIN_INTENT_PARAMS = ("generation", "fossils", "new_fossils", "fossil_seq", "threshold", "hypotheses", "sampling_temperature")


class UnknownGear(ValueError):
    pass


def normalise(level: str) -> str:
    """'accelerated' -> 'ACCELERATED'; a level number '2' works too. Raises UnknownGear."""
    text = (level or "").strip().upper()
    if text.isdigit() and 1 <= int(text) <= len(GEARS):
        return GEARS[int(text) - 1]
    if text not in GEAR_TABLE:
        raise UnknownGear(f"unknown gear {level!r}: use one of {', '.join(GEARS)}")
    return text


def spec(gear: str) -> GearSpec:
    return GEAR_TABLE.get(gear) or GEAR_TABLE[DEFAULT_GEAR]


def needs_human(gear: str, kind: str) -> bool:
    """Whether an intent of `kind` waits for a human in `gear`."""
    return kind in spec(gear).human_approval


# --------------------------------------------------------------------------- KV mirror


class GearState(msgspec.Struct, frozen=True, kw_only=True):
    """The value of `scf_state/gear` (JSON)."""

    gear: str = DEFAULT_GEAR
    since: dt.datetime | None = None
    by: str = ""
    event_id: str | None = None  # the gear.changed event this mirrors


def encode_state(state: GearState) -> bytes:
    return msgspec.json.encode(state)


def decode_state(value: bytes | None) -> GearState:
    """A KV value to a GearState; empty or unreadable values read as STANDARD."""
    if not value:
        return GearState()
    try:
        state = msgspec.json.decode(value, type=GearState)
    except msgspec.DecodeError:
        try:  # a bare gear name written by hand (`nats kv put scf_state gear HYPER`)
            return GearState(gear=normalise(value.decode()))
        except (UnknownGear, UnicodeDecodeError):
            return GearState()
    if state.gear not in GEAR_TABLE:
        return GearState()
    return state


async def write_gear(bus, state: GearState) -> None:
    kv = await bus.kv("scf_state")
    await kv.put(KEY_GEAR, encode_state(state))


async def read_gear(bus) -> GearState:
    kv = await bus.kv("scf_state")
    try:
        entry = await kv.get(KEY_GEAR)
    except KeyNotFoundError:  # no gear written yet (deleted and purged keys included)
        return GearState()
    return decode_state(entry.value if entry else None)
