"""The promoted model of a domain, fetched for use: what `scf strike --method learned|auto`
decides with when no --checkpoint is given (docs/value-loop.md, "Which model decides").

    model = await fetch_promoted(bus, settings, "grid:case14", OPTIMISER, trust=trust)
    model.path, model.label()   # a verified local file; "ckpt-… (production v3, sha256 …)"

Checked as the edge checks a release before anything is parsed:

1. the head of (domain, kind) under the alias (`producers.verify.alias_heads`: one head per
   model kind, so a promoted EBDM never stands in for the optimiser);
2. with `[deploy] verify_release` (default), that promotion's Ed25519 signature must come
   from a trusted key with role `release` — an unsigned or untrusted head is refused, never
   skipped for an older one;
3. the artifact is fetched through the artifact store, its sha256 (and size) checked against
   the signed promotion before the file is kept (a cached copy is re-hashed);
4. its safetensors header must say the kind's format (`scf-opt/1` for an optimiser); the
   weights are read later through safetensors only (no pickle).

Every failure is one `NotPromoted`/`PromotedRefused` line naming the fix.

`decider(bus, settings, trust, domain, method, checkpoint)` is what decides a strike under
`--method exact|learned|auto` (HiGHS, the promoted optimiser, or a given file), shared by
`scf strike` and the regiment (`[regiment] method`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from scf.bus import events as ev
from scf.bus.codec import Codec
from scf.bus.errors import SCFError
from scf.bus.files import sha256_file
from scf.bus.ids import subject_token
from scf.producers.verify import EBDM, OPTIMISER, alias_head_events

log = logging.getLogger("scf.promoted")

FORMATS = {OPTIMISER: "scf-opt/1", EBDM: "scf-ebdm/1"}
HOW_TO_TRAIN = {
    OPTIMISER: "train one with `scf train-optimiser --bus --domain {domain}` (the daemon judges and promotes it), "
               "or pass --checkpoint FILE",
    EBDM: "train one with `scf train --bus --domain {domain}`, or pass --checkpoint FILE",
}


class NotPromoted(SCFError):
    """No model of that kind is promoted for the domain."""


class PromotedRefused(SCFError):
    """The promoted model fails a check (signature, digest, format): not used."""


class MethodError(SCFError):
    """A decision method that does not exist."""


@dataclass(frozen=True)
class PromotedModel:
    path: Path
    promotion: ev.Promotion
    kind: str

    def label(self) -> str:
        p = self.promotion
        return f"{p.checkpoint_id} ({p.alias} v{p.version} of {p.domain}, sha256 {p.sha256.removeprefix('sha256:')})"


async def fetch_promoted(bus, settings, domain: str, kind: str = OPTIMISER, *, alias: str = "production", trust=None,
                         verify_release: bool | None = None) -> PromotedModel:
    """The head of (`domain`, `kind`) under `alias`, verified and fetched into
    model_zoo/promoted/ (see the module docstring). `verify_release` None: `[deploy]
    verify_release`; then `trust` (a TrustList or the live view) is required."""
    if verify_release is None:
        from scf.consumers.deploy import DeploySettings

        verify_release = settings.section("deploy", DeploySettings).verify_release
    what = "learned optimiser" if kind == OPTIMISER else kind
    heads = await alias_head_events(bus, domain, alias)
    found = heads.get(kind)
    if found is None:
        fix = HOW_TO_TRAIN.get(kind, "promote one").format(domain=domain)
        raise NotPromoted(f"no {what} is promoted to {alias} for {domain}: {fix}")
    p, raw = found
    if verify_release:
        if trust is None:
            raise PromotedRefused(f"the {what} {p.checkpoint_id} cannot be checked: no trust list to verify its release signature with")
        try:
            Codec([ev.CheckpointPromoted], trust=trust, require_signature=True, role="release").decode(raw)
        except SCFError as exc:
            raise PromotedRefused(
                f"the promoted {what} {p.checkpoint_id} of {domain} has no trusted release signature ({exc}): not used — "
                "the daemon must sign with a key trusted for the release role, or pass --checkpoint FILE") from None
    return await _fetch(bus, settings, p, kind, what)


async def _fetch(bus, settings, p: ev.Promotion, kind: str, what: str) -> PromotedModel:
    from scf.bus.artifacts import open_store

    want = p.sha256.removeprefix("sha256:").lower()
    directory = Path(settings.path("model_zoo", "promoted"))
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / f"{subject_token(p.checkpoint_id)}-{want[:16]}.safetensors"
    if not dest.is_file() or (await asyncio.to_thread(sha256_file, dest))[0] != want:
        dest.unlink(missing_ok=True)
        try:
            await open_store(bus, settings).get(p.uri, dest, sha256=want, size=p.size or None)  # another size: refused unread
        except SCFError as exc:
            raise PromotedRefused(f"the promoted {what} {p.checkpoint_id}: {exc}") from None
    digest, size = await asyncio.to_thread(sha256_file, dest)
    if digest != want or (p.size and size != p.size):
        dest.unlink(missing_ok=True)
        raise PromotedRefused(f"the promoted {what} {p.checkpoint_id}: the artifact has sha256 {digest} ({size} bytes), "
                              f"the signed promotion says {want} ({p.size} bytes): not used")
    fmt = await asyncio.to_thread(_format, dest)
    if kind in FORMATS and fmt != FORMATS[kind]:
        raise PromotedRefused(f"the promoted {what} {p.checkpoint_id} has format {fmt!r}, not {FORMATS[kind]!r}: not used")
    log.info("promoted %s of %s: %s v%d (%s, sha256 %s)", what, p.domain, p.checkpoint_id, p.version, p.alias, want)
    return PromotedModel(dest, p, kind)


# --------------------------------------------------------------------------- what decides a strike


METHODS = ("exact", "learned", "auto")


@dataclass(frozen=True)
class Decider:
    """What decides a strike: `path` the learned optimiser's file (None: exact, HiGHS),
    `model` as the strike's inputs name it ("" for exact: the production model then),
    `label` what decides in words (printed, logged, in the regiment's progress)."""

    path: Path | None
    model: str
    label: str

    @property
    def method(self) -> str:
        return "exact" if self.path is None else "learned"


async def decider(bus, settings, trust, domain: str, method: str, checkpoint: Path | None = None) -> Decider:
    """What decides a strike of `domain` under `method` (exact | learned | auto), as `scf
    strike` and the regiment choose it: exact solves with HiGHS; learned|auto take
    `checkpoint` when given, else the learned optimiser promoted for `domain`
    (`fetch_promoted`: release signature, sha256, format checked before it is read).
    learned with none promoted raises NotPromoted (a refused one PromotedRefused) in one
    line; auto then solves exactly (also where torch/scf.ml.optimize is missing), and says why."""
    if method not in METHODS:
        raise MethodError(f"method {method!r}: use exact, learned or auto")
    if method == "exact":
        return Decider(None, "", "exact (HiGHS)")
    if method == "auto":
        from scf.producers.optimize import OptimizeError, learned_hook

        try:
            learned_hook()  # torch and scf.ml.optimize: else auto solves exactly, as `scf optimize` does
        except OptimizeError as exc:
            return Decider(None, "", f"exact (HiGHS): {exc}")
    if checkpoint is not None:
        digest = (await asyncio.to_thread(sha256_file, checkpoint))[0]
        log.info("strike of %s: the learned optimiser %s decides (--checkpoint)", domain, checkpoint.name)
        return Decider(checkpoint, f"{checkpoint.name} sha256:{digest}", f"learned optimiser {checkpoint} (--checkpoint, sha256 {digest})")
    try:
        m = await fetch_promoted(bus, settings, domain, OPTIMISER, trust=trust)
    except NotPromoted as exc:
        if method == "auto":
            log.info("strike of %s: %s; solving exactly", domain, exc)
            return Decider(None, "", f"exact (HiGHS): {exc}")
        raise
    p = m.promotion
    log.info("strike of %s: the promoted learned optimiser %s decides", domain, m.label())
    return Decider(m.path, f"{p.checkpoint_id} sha256:{p.sha256.removeprefix('sha256:')}", f"learned optimiser {m.label()}")


def _format(path: Path) -> str | None:
    """The `format` in a safetensors header, read as JSON (no tensor, no torch)."""
    import json
    import struct

    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > 100 * 1024 * 1024:
                return None
            head = json.loads(f.read(n))
        return (head.get("__metadata__") or {}).get("format")
    except (OSError, ValueError, struct.error, AttributeError):
        return None


__all__ = ["fetch_promoted", "PromotedModel", "NotPromoted", "PromotedRefused", "MethodError", "FORMATS", "OPTIMISER", "EBDM",
           "METHODS", "Decider", "decider"]
