"""Decision quality: how good are proposed states, measured against the domain itself.

    q = decision_quality(domain, contexts, states, status_quo=observed_states)
    q.metrics()   # {"feasible": 1.0, "gap_median": 0.0012, "gap_p95": …, "savings_captured": 0.98, …}

* **feasible** — the share of states with no `Domain.violations` (the domain's own check,
  1 kW / 1e-3 K absolute);
* **gap** — (cost(state) − cost(optimum)) / max(|cost(optimum)|, floor), the optimum from
  the domain's exact solver (`reference_solution`), per context; `floor` is
  `GAP_FLOOR` of the domain's energy span (`Domain.energy_range`), so a context whose
  optimum costs nothing (an HVAC hour the building floats through) does not divide by 0;
  an infeasible state counts with gap +inf;
* **savings_captured** — Σ (cost(status quo) − cost(state)) / Σ (cost(status quo) −
  cost(optimum)) over the contexts: the share of the achievable savings, from the state
  observed in that context (the status quo) to the optimum, that the decision captures;
  **regret** is 1 − savings_captured, the share missed (what promotion compares).

Also `best_in_data`, the baseline a learned optimiser must beat: for a new context, the
lowest-energy observed state among its nearest observed contexts, repaired.
All numpy (the domain's solver is HiGHS); no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scf.domains.base import Domain, Infeasible
from scf.domains.repair import repair_batch

GAP_FLOOR = 1e-3  # of the energy span: the smallest denominator of a relative gap


@dataclass
class DecisionQuality:
    feasible: np.ndarray  # (B,) bool
    cost: np.ndarray  # (B,) cost of each state
    optimum: np.ndarray  # (B,) cost of the exact optimum (nan where the context is infeasible)
    gap: np.ndarray  # (B,) relative gap (inf for an infeasible state)
    status_quo: np.ndarray | None = None  # (B,) cost of the observed state

    def savings_captured(self) -> float:
        if self.status_quo is None:
            return float("nan")
        ok = np.isfinite(self.optimum)
        achievable = float(np.sum(self.status_quo[ok] - self.optimum[ok]))
        if achievable <= 0:
            return float("nan")
        got = np.where(self.feasible[ok], self.status_quo[ok] - self.cost[ok], 0.0)  # an infeasible decision saves nothing
        return float(np.sum(got) / achievable)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        ok = np.isfinite(self.optimum)
        gap = self.gap[ok]
        out = {
            f"{prefix}feasible": float(self.feasible.mean()) if len(self.feasible) else float("nan"),
            f"{prefix}gap_median": float(np.median(gap)) if len(gap) else float("nan"),
            f"{prefix}gap_p95": float(np.percentile(gap, 95)) if len(gap) else float("nan"),
            f"{prefix}gap_mean": float(np.mean(gap)) if len(gap) else float("nan"),
            f"{prefix}contexts": float(len(self.feasible)),
        }
        if self.status_quo is not None:
            captured = self.savings_captured()
            out[f"{prefix}savings_captured"] = captured
            out[f"{prefix}regret"] = 1.0 - captured  # the share of achievable savings missed (lower is better)
        return out


def optimum_costs(domain: Domain, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(optimal states (B, d), their costs (B,)) from the domain's exact solver; rows of an
    infeasible context are nan."""
    states = np.full((len(contexts), domain.state_dim), np.nan)
    costs = np.full(len(contexts), np.nan)
    for i, c in enumerate(np.asarray(contexts, dtype=float)):
        try:
            states[i] = domain.reference_solution(c)
        except Infeasible:
            continue
        costs[i] = domain.cost(c, states[i])
    return states, costs


def decision_quality(
    domain: Domain,
    contexts: np.ndarray,
    states: np.ndarray,
    *,
    status_quo: np.ndarray | None = None,
    optimum: np.ndarray | None = None,
) -> DecisionQuality:
    """Measure `states` (B, d) in `contexts` (B, m) against the exact optimum (`optimum`:
    its costs (B,), computed when not given) and, with `status_quo` (B, d), the savings."""
    c = np.asarray(contexts, dtype=float)
    x = np.asarray(states, dtype=float)
    if optimum is None:
        optimum = optimum_costs(domain, c)[1]
    lo, hi = domain.energy_range()
    floor = GAP_FLOOR * max(hi - lo, 1e-12)
    feasible = np.array([np.all(np.isfinite(xi)) and not domain.violations(ci, xi) for ci, xi in zip(c, x)], dtype=bool)
    cost = np.array([domain.cost(ci, xi) if np.all(np.isfinite(xi)) else np.inf for ci, xi in zip(c, x)])
    with np.errstate(invalid="ignore"):
        gap = np.where(feasible, (cost - optimum) / np.maximum(np.abs(optimum), floor), np.inf)
    sq = None
    if status_quo is not None:
        sq = np.array([domain.cost(ci, si) for ci, si in zip(c, np.asarray(status_quo, dtype=float))])
    return DecisionQuality(feasible=feasible, cost=cost, optimum=np.asarray(optimum, dtype=float), gap=gap, status_quo=sq)


def best_in_data(
    domain: Domain,
    data_contexts: np.ndarray,
    data_states: np.ndarray,
    data_energy: np.ndarray,
    contexts: np.ndarray,
    *,
    neighbours: int = 16,
) -> np.ndarray:
    """The best-in-data baseline (B, d): for each context, the observed state with the
    lowest energy among the `neighbours` observations whose contexts are nearest (in
    half-ranges of the context bounds), repaired for the new context."""
    clo, chi = (np.asarray(b, dtype=float) for b in domain.context_bounds)
    half = np.maximum((chi - clo) / 2, 1e-9)
    data = np.asarray(data_contexts, dtype=float) / half
    query = np.asarray(contexts, dtype=float) / half
    k = min(neighbours, len(data))
    out = np.empty((len(query), domain.state_dim))
    energy = np.asarray(data_energy, dtype=float)
    for start in range(0, len(query), 256):  # distances in blocks: memory stays small
        q = query[start : start + 256]
        dist = (q**2).sum(1)[:, None] - 2 * q @ data.T + (data**2).sum(1)[None, :]
        near = np.argpartition(dist, k - 1, axis=1)[:, :k]  # (b, k)
        best = np.take_along_axis(near, np.argmin(energy[near], axis=1)[:, None], 1)[:, 0]
        out[start : start + len(q)] = np.asarray(data_states, dtype=float)[best]
    return repair_batch(domain, contexts, out).states


__all__ = ["GAP_FLOOR", "DecisionQuality", "best_in_data", "decision_quality", "optimum_costs"]
