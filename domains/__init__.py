"""Physical domains: variables, bounds, constraints, cost/energy, a reference solver.

    >>> import domains, numpy as np
    >>> grid = domains.get("grid:case14")
    >>> c = grid.sample_context(np.random.default_rng(0))
    >>> x = grid.reference_solution(c); grid.cost(c, x), grid.violations(c, x)

Domains are built on first use and cached. numpy/scipy/highspy only: torch stays in `ml/`.
"""

from __future__ import annotations

import functools
from typing import Callable

from scf.domains.base import Domain, DomainError, Infeasible, Sample, UnknownDomain, Violation


def _grid(case: str) -> Callable[[], Domain]:
    def build() -> Domain:
        from scf.domains import grid

        return grid.load(case)

    return build


def _hvac(building: str) -> Callable[[], Domain]:
    def build() -> Domain:
        from scf.domains import hvac

        return hvac.load(building)

    return build


_REGISTRY: dict[str, Callable[[], Domain]] = {
    "grid:case9": _grid("case9"),
    "grid:case14": _grid("case14"),
    "grid:case30": _grid("case30"),
    "grid:case118": _grid("case118"),
    # MATPOWER's own files (domains/data/*.m name their sources): more real networks for the code foundry and its
    # students to learn from, and for operators whose plant is one of them.
    "grid:case5": _grid("case5"),
    "grid:case6ww": _grid("case6ww"),
    "grid:case24_ieee_rts": _grid("case24_ieee_rts"),
    "grid:case39": _grid("case39"),
    "grid:case57": _grid("case57"),
    "hvac:office3": _hvac("office3"),
}


def names() -> list[str]:
    return list(_REGISTRY)


@functools.cache
def get(name: str) -> Domain:
    """The domain called `name` (e.g. "grid:case14"); raises `UnknownDomain`."""
    try:
        build = _REGISTRY[name]
    except KeyError:
        raise UnknownDomain(name, names()) from None
    return build()


__all__ = ["Domain", "DomainError", "Infeasible", "Sample", "UnknownDomain", "Violation", "get", "names"]
