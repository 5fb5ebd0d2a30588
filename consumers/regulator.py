"""The contextual regulator: which intent kinds are allowed, denied or held in which context.

Rules are data (TOML), context facts live in the `scf_context` KV bucket
(`nats kv put scf_context grid.state blackout`). A rule matches an intent when its kind,
its domain and every condition on facts and on the intent's params hold:

    [[rule]]
    name = "no-grid-optimisation-in-blackout"
    decision = "deny"                      # allow | deny | hold
    kinds = ["optimise", "deploy"]         # default ["*"]
    domains = ["grid:*"]                   # shell globs, default ["*"]
    when = { "grid.state" = "blackout" }   # every fact condition must hold
    params = { hypotheses = { gt = 16 } }  # conditions on the intent's params
    reason = "the grid is in blackout: no optimisation until it is restored"

A condition is a scalar (equal), a list (any of), or a table of operators
(eq, ne, in, not_in, lt, le, gt, ge, exists, prefix). A fact that is missing satisfies
only `exists = false`. Fact names may say `{domain_token}` or `{kind}` to name per-domain
facts (`"grid.{domain_token}.state"`; KV keys cannot hold ':').

Deny overrides hold, hold overrides allow, whatever the order in the file; an intent no rule
matches is denied (default deny — not configurable).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import msgspec

from scf.bus.errors import ConfigError
from scf.bus.ids import subject_token

DEFAULT_RULES = Path(__file__).resolve().parent / "rules" / "default.toml"

Decision = Literal["allow", "deny", "hold"]
_STRENGTH = {"allow": 0, "hold": 1, "deny": 2}
_OPS = ("eq", "ne", "in", "not_in", "lt", "le", "gt", "ge", "exists", "prefix")
_MISSING = object()


class Rule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    decision: Decision
    kinds: list[str] = msgspec.field(default_factory=lambda: ["*"])
    domains: list[str] = msgspec.field(default_factory=lambda: ["*"])
    when: dict[str, Any] = {}
    params: dict[str, Any] = {}
    reason: str = ""


class RuleFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    version: int = 1
    rule: list[Rule] = []


@dataclass(frozen=True)
class Ruling:
    decision: Decision
    rules: tuple[str, ...]  # names of the rules that decided (all of the winning strength)
    reasons: tuple[str, ...]


Predicate = Callable[[Any], bool]


@dataclass(frozen=True)
class _Compiled:
    rule: Rule
    facts: tuple[tuple[str, Predicate], ...]
    params: tuple[tuple[str, Predicate], ...]

    def matches(self, kind: str, domain: str, params: Mapping[str, Any], facts: Mapping[str, Any]) -> bool:
        r = self.rule
        if not any(fnmatch.fnmatchcase(kind, k) for k in r.kinds):
            return False
        if not any(fnmatch.fnmatchcase(domain, d) for d in r.domains):
            return False
        token = subject_token(domain)
        for key, pred in self.facts:
            name = key.replace("{domain_token}", token).replace("{kind}", kind)
            if not pred(facts.get(name, _MISSING)):
                return False
        for key, pred in self.params:
            if not pred(params.get(key, _MISSING)):
                return False
        return True


class RuleSet:
    """A compiled rule file."""

    def __init__(self, rules: list[Rule], source: str = "<rules>") -> None:
        self.source = source
        self.rules = rules
        names = [r.name for r in rules]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"{source}: rule names must be unique, repeated: {', '.join(dup)}")
        self._compiled = [
            _Compiled(
                r,
                tuple((k, _predicate(v, f"{source}: rule {r.name!r} when.{k}")) for k, v in r.when.items()),
                tuple((k, _predicate(v, f"{source}: rule {r.name!r} params.{k}")) for k, v in r.params.items()),
            )
            for r in rules
        ]

    @classmethod
    def load(cls, path: str | Path | None = None) -> "RuleSet":
        p = Path(path) if path else DEFAULT_RULES
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"rules file {p} does not exist: set [safety] rules in scf.toml to an existing file") from None
        return cls.parse(raw, str(p))

    @classmethod
    def parse(cls, text: bytes | str, source: str = "<rules>") -> "RuleSet":
        data = text.encode() if isinstance(text, str) else text
        try:
            f = msgspec.toml.decode(data, type=RuleFile)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{source} is not valid TOML ({exc}): fix it") from None
        if f.version != 1:
            raise ConfigError(f"{source}: rule file version {f.version} is not supported by this build (1)")
        return cls(f.rule, source)

    def rule(self, kind: str, domain: str, params: Mapping[str, Any], facts: Mapping[str, Any]) -> Ruling:
        """Deny overrides hold overrides allow; nothing matching means deny."""
        matched = [c.rule for c in self._compiled if c.matches(kind, domain, params, facts)]
        if not matched:
            return Ruling(
                "deny",
                (),
                (f"no rule covers intent kind {kind!r} in domain {domain!r}: default deny (add a rule to {Path(self.source).name})",),
            )
        top = max(_STRENGTH[r.decision] for r in matched)
        winners = [r for r in matched if _STRENGTH[r.decision] == top]
        return Ruling(
            winners[0].decision,
            tuple(r.name for r in winners),
            tuple(f"rule {r.name}: {r.reason or r.decision}" for r in winners),
        )


def _predicate(spec: Any, where: str) -> Predicate:
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(_OPS))
        if unknown:
            raise ConfigError(f"{where}: unknown operator {', '.join(unknown)}: use {', '.join(_OPS)}")
        parts = [_op(op, arg, where) for op, arg in spec.items()]
        return lambda v: all(p(v) for p in parts)
    if isinstance(spec, list):
        return _op("in", spec, where)
    return _op("eq", spec, where)


def _op(op: str, arg: Any, where: str) -> Predicate:
    if op == "exists":
        if not isinstance(arg, bool):
            raise ConfigError(f"{where}: exists takes true or false")
        return lambda v: (v is not _MISSING) == arg
    if op in ("in", "not_in"):
        if not isinstance(arg, list):
            raise ConfigError(f"{where}: {op} takes a list")
        vals = [_norm(a) for a in arg]
        return (lambda v: v is not _MISSING and _norm(v) in vals) if op == "in" else (lambda v: v is not _MISSING and _norm(v) not in vals)
    if op in ("eq", "ne"):
        want = _norm(arg)
        return (lambda v: v is not _MISSING and _norm(v) == want) if op == "eq" else (lambda v: v is not _MISSING and _norm(v) != want)
    if op == "prefix":
        return lambda v: v is not _MISSING and str(v).startswith(str(arg))
    if not isinstance(arg, (int, float)) or isinstance(arg, bool):
        raise ConfigError(f"{where}: {op} takes a number")
    cmp = {"lt": float.__lt__, "le": float.__le__, "gt": float.__gt__, "ge": float.__ge__}[op]

    def numeric(v: Any) -> bool:
        try:
            return v is not _MISSING and cmp(float(v), float(arg))
        except (TypeError, ValueError):
            return False

    return numeric


def _norm(v: Any) -> Any:
    """Facts arrive as text from the KV bucket: compare case-insensitively as text, numbers as numbers."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        t = v.strip()
        try:
            return float(t)
        except ValueError:
            return t.lower()
    return v


def parse_fact(value: bytes | None) -> Any:
    """A KV value as a fact: JSON scalars (numbers, true/false, "quoted") or plain text."""
    if value is None:
        return _MISSING
    text = value.decode("utf-8", "replace").strip()
    try:
        v = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return text
    return v if isinstance(v, (str, int, float, bool)) else text


__all__ = ["RuleSet", "Rule", "Ruling", "parse_fact", "DEFAULT_RULES"]
