"""Fossil shards: write synthetic ones, and validate one NDJSON line at the ingest boundary.

A shard is `fossils-00000.ndjson`: one `bus.events.Fossil` per line, msgspec JSON, with
`fossil_id = fossil_content_id(content)`. `synth_shards` is deterministic: the same
(domain, n, shard_size, seed, start) writes byte-identical shards, so ingesting them
twice adds nothing.
"""

from __future__ import annotations

import datetime as dt
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Mapping

import msgspec
import numpy as np

from scf import domains
from scf.bus.events import Fossil, FossilContent, Provenance, fossil_content_id
from scf.domains.base import Domain, DomainError, Sample, UnknownDomain

DEFAULT_START = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
SHARD_PATTERN = "fossils-{:05d}.ndjson"

_decoder = msgspec.json.Decoder(Fossil)
_encoder = msgspec.json.Encoder()


class _StrictProvenance(Provenance, frozen=True, forbid_unknown_fields=True):
    pass


class _StrictFossil(Fossil, frozen=True, forbid_unknown_fields=True):
    provenance: _StrictProvenance


_strict_decoder = msgspec.json.Decoder(_StrictFossil)  # a check only: finds fields a Fossil drops
_keys_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_FOSSIL_FIELDS = frozenset(f.encode_name for f in msgspec.structs.fields(Fossil))
_PROVENANCE_FIELDS = frozenset(f.encode_name for f in msgspec.structs.fields(Provenance))


class FossilInvalid(DomainError, ValueError):
    """A line that is not an acceptable fossil. `reason` is one of REASONS; the message
    says what is wrong and how to fix it."""

    REASONS = (
        "malformed_json",
        "schema",
        "missing_provenance",
        "unknown_domain",
        "content_id_mismatch",
        "verifier_failed",
        "shape_mismatch",
        "out_of_bounds",
        "recheck_failed",
        "unknown_field",
    )

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in self.REASONS, reason
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def _schema_error(err: msgspec.ValidationError) -> FossilInvalid:
    msg = str(err)
    provenance_gone = msg == "Object missing required field `provenance`" or (
        "`$.provenance`" in msg and ("missing required field" in msg or "got `null`" in msg)
    )
    if provenance_gone:
        return FossilInvalid("missing_provenance", f"{msg}; every fossil needs provenance (source, verifier, verified)")
    return FossilInvalid("schema", f"{msg}; a line must match bus.events.Fossil")


def unknown_fields(line: bytes | str) -> tuple[str, ...]:
    """Names of the fields of a (schema-valid) fossil line that a Fossil does not have and
    decoding drops: `colour`, `provenance.operator` …, in line order."""
    top = _keys_decoder.decode(line)
    out = [k for k in top if k not in _FOSSIL_FIELDS]
    prov = top.get("provenance")
    if prov is not None:
        try:
            out += [f"provenance.{k}" for k in _keys_decoder.decode(prov) if k not in _PROVENANCE_FIELDS]
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass
    return tuple(out)


def validate_line(
    line: bytes | str,
    *,
    recheck: bool = False,
    strict: bool = False,
    energy_bounds: Mapping[str, tuple[float, float]] | None = None,
) -> Fossil:
    """Decode and check one NDJSON line; raise `FossilInvalid` naming the first problem.
    See `check_line`."""
    return check_line(line, recheck=recheck, strict=strict, energy_bounds=energy_bounds)[0]


def check_line(
    line: bytes | str,
    *,
    recheck: bool = False,
    strict: bool = False,
    energy_bounds: Mapping[str, tuple[float, float]] | None = None,
) -> tuple[Fossil, tuple[str, ...]]:
    """Decode and check one NDJSON line: (the fossil, the unknown fields it dropped), or
    `FossilInvalid` naming the first problem.

    Checks, in order: JSON, schema (msgspec path in the message), unknown fields (refused
    with `strict`, else reported), provenance present and non-empty, known domain, content
    id, verifier passed, vector sizes, values within the domain's bounds, energy within the
    domain's plausible range (`Domain.plausible_energy`, or `energy_bounds[domain]`); with
    `recheck`, the domain's own check is run again on the values."""
    try:
        fossil = _decoder.decode(line)
    except msgspec.ValidationError as err:
        raise _schema_error(err) from None
    except msgspec.DecodeError as err:
        raise FossilInvalid("malformed_json", f"{err}; write one JSON object per line") from None
    except UnicodeDecodeError as err:
        raise FossilInvalid("malformed_json", f"not UTF-8 ({err.reason} at byte {err.start} of a string); write UTF-8 JSON") from None
    unknown: tuple[str, ...] = ()
    try:
        _strict_decoder.decode(line)
    except msgspec.ValidationError:  # the only error left once the lenient decode passed
        unknown = unknown_fields(line)
        if strict and unknown:
            raise FossilInvalid(
                "unknown_field",
                f"field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} {'are' if len(unknown) > 1 else 'is'} not part of a "
                "fossil (bus.events.Fossil); remove them, or ingest without --strict to drop them",
            ) from None
    prov = fossil.provenance
    if not prov.source.strip() or not prov.verifier.strip():
        empty = "source" if not prov.source.strip() else "verifier"
        raise FossilInvalid("missing_provenance", f"provenance.{empty} is empty; say where the fossil came from and which check ran")
    try:
        domain = domains.get(fossil.domain)
    except UnknownDomain as err:
        raise FossilInvalid("unknown_domain", str(err)) from None
    expected = fossil_content_id(fossil)
    if fossil.fossil_id != expected:
        raise FossilInvalid(
            "content_id_mismatch",
            f"fossil_id {fossil.fossil_id} is not the content id {expected} of the line; "
            "recompute it with bus.events.fossil_content_id",
        )
    if not prov.verified:
        raise FossilInvalid("verifier_failed", f"verifier {prov.verifier} rejected it ({prov.detail or 'no detail'}); only verified fossils are ingested")
    if len(fossil.state) != domain.state_dim or len(fossil.context) != domain.context_dim:
        raise FossilInvalid(
            "shape_mismatch",
            f"{fossil.domain} takes {domain.state_dim} state and {domain.context_dim} context values, "
            f"the line has {len(fossil.state)} and {len(fossil.context)}",
        )
    reason = domain.in_bounds(fossil.context, fossil.state)
    if reason:
        raise FossilInvalid("out_of_bounds", f"{fossil.domain}: {reason}")
    reason = domain.energy_implausible(fossil.energy, (energy_bounds or {}).get(fossil.domain))
    if reason:
        raise FossilInvalid("out_of_bounds", reason)
    if recheck:
        ok, detail = domain.verify(fossil.context, fossil.state, fossil.energy)
        if not ok:
            raise FossilInvalid("recheck_failed", f"{domain.verifier}: {detail}")
    return fossil, unknown


def to_fossil(domain: Domain, sample: Sample, observed_at: dt.datetime, source: str) -> Fossil:
    content = FossilContent(
        domain=domain.name,
        context=[float(v) for v in sample.context],
        state=[float(v) for v in sample.state],
        energy=float(sample.energy),
        observed_at=observed_at,
        provenance=Provenance(source=source, verifier=domain.verifier, verified=bool(sample.verified), detail=sample.detail),
    )
    return Fossil(**msgspec.structs.asdict(content), fossil_id=fossil_content_id(content))


def _write_shard(domain_name: str, shard: int, first: int, count: int, path: Path, seed: int,
                 start: dt.datetime, source: str, infeasible_fraction: float) -> Path:
    domain = domains.get(domain_name)
    rng = np.random.default_rng([seed, shard])
    samples = domain.synthesize(rng, count, first_index=first, infeasible_fraction=infeasible_fraction)
    buf = bytearray()
    for i, sample in enumerate(samples):
        fossil = to_fossil(domain, sample, start + (first + i) * domain.sample_interval, source)
        _encoder.encode_into(fossil, buf, -1)
        buf += b"\n"
    tmp = path.with_suffix(".ndjson.tmp")
    tmp.write_bytes(buf)
    os.replace(tmp, path)
    return path


def synth_shards(
    domain_name: str,
    n: int,
    out_dir: str | os.PathLike,
    *,
    shard_size: int = 10_000,
    seed: int = 0,
    infeasible_fraction: float = 0.0,
    start: dt.datetime = DEFAULT_START,
    source: str | None = None,
    processes: int = 1,
) -> list[Path]:
    """Write `n` synthetic fossils of `domain_name` as shards of `shard_size` lines under
    `out_dir`; return the shard paths. Observation i is at `start + i * interval`.
    `infeasible_fraction` of them break a constraint and carry verified=False (ingest
    rejects them). Shards are independent (seeded by (seed, shard)); `processes` > 1
    writes them in parallel."""
    domain = domains.get(domain_name)  # raises UnknownDomain early
    if n < 0 or shard_size < 1:
        raise DomainError(f"n must be >= 0 and shard_size >= 1 (got n={n}, shard_size={shard_size})")
    if start.tzinfo is None:
        raise DomainError("start must be timezone-aware (UTC); pass datetime(..., tzinfo=timezone.utc)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        (domain.name, k, first, min(shard_size, n - first), out / SHARD_PATTERN.format(k), seed,
         start.astimezone(dt.timezone.utc), source or f"synth:{domain.name}", infeasible_fraction)
        for k, first in enumerate(range(0, n, shard_size))
    ]
    if processes > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(processes) as pool:
            return list(pool.map(_write_shard, *zip(*jobs)))
    return [_write_shard(*job) for job in jobs]
