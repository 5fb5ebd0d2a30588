"""The learned optimiser on the edge, numpy only: `scf-opt/1` checkpoints and their ternary
students (`scf-ternary/1`, model `optimiser`) decide as `ml.optimize.LearnedOptimiser.decide`
does, without torch.

    rt = LearnedRuntime.load(path)            # a float checkpoint or a packed student
    raw, fixed = rt.decide(domain, contexts)  # (B, d) proposals, their repair (RepairResult)

The steps are the model's own (docs/optimise.md):

1. the proposal network π(c): the context normalised by the checkpoint's bounds, the MLP
   (`policy.net.N`: Linear, SiLU, …, Linear; float32 as in torch, or the student's ternary
   layers with 8-bit activations through `ternary.TernaryNet.linear`), scaled to the state
   bounds and clipped to them;
2. the balance layer where the domain has a balance row (the grid's Σ x = demand);
3. the learned cost model's marginal costs (∂E/∂x of ml/cost.py's additive basis, in
   closed form), the merit order of `domains.repair`;
4. `domains.repair.repair_batch` (numpy already);
5. the polish: exact line searches on the learned cost inside the feasible set (domains
   without balance rows), as `LearnedOptimiser.polish`.

The cost model's buffers are float64 in the file and here (as torch holds them), so the
decisions equal the torch model's to float32 round-off of the network (tests/test_edge_learned.py).
Nothing here imports torch or `scf.ml` (.importlinter).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from scf.domains.repair import RepairResult, batch_rows, repair_batch

OPT_FORMAT = "scf-opt/1"
TERNARY_FORMAT = "scf-ternary/1"


class LearnedError(ValueError):
    """A learned-optimiser file the edge cannot run; the message names the problem and the fix."""


def is_learned(metadata: dict[str, str]) -> bool:
    """Whether a safetensors header states a learned optimiser (float or ternary student)."""
    fmt = metadata.get("format")
    return fmt == OPT_FORMAT or (fmt == TERNARY_FORMAT and metadata.get("model") == "optimiser")


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _equality_rows(a: np.ndarray, rlo: np.ndarray, rhi: np.ndarray) -> np.ndarray:
    return np.all(rlo == rhi, axis=0) & np.all(a != 0, axis=1)


class LearnedRuntime:
    """A learned optimiser's decisions with numpy: `propose_raw`, `merit`, `decide`."""

    def __init__(self, path: Path, metadata: dict[str, str], tensors: dict[str, np.ndarray], ternary=None) -> None:
        self.path, self.metadata, self.ternary = Path(path), metadata, ternary
        try:
            self.config = json.loads(metadata.get("config", "{}"))
        except json.JSONDecodeError as exc:
            raise LearnedError(f"{path}: its config metadata does not decode ({exc}): the file is damaged") from None
        self.domain_name = str(self.config.get("domain", ""))
        need = ["state_lo", "state_hi", "state_mid", "state_half", "context_mid", "context_half",
                "cost.state_mid", "cost.state_half", "cost.context_mid", "cost.context_half", "cost.knots",
                "cost.fourier", "cost.pcs", "cost.weights"]
        missing = [k for k in need if k not in tensors]
        if missing:
            raise LearnedError(f"{path} states a learned optimiser but lacks {missing[:4]}: the file is damaged or from another version")
        self.t = tensors
        f32 = {k: np.asarray(tensors[k], np.float32) for k in ("state_lo", "state_hi", "state_mid", "state_half", "context_mid", "context_half")}
        self.state_lo, self.state_hi, self.state_mid, self.state_half = f32["state_lo"], f32["state_hi"], f32["state_mid"], f32["state_half"]
        self.context_mid, self.context_half = f32["context_mid"], f32["context_half"]
        c = {k.removeprefix("cost."): np.asarray(v, np.float64) for k, v in tensors.items() if k.startswith("cost.")}
        self.cost = c
        self.knots = c["knots"]
        self.n_basis = 2 + len(self.knots)
        self.rank = c["pcs"].shape[1]
        self.d, self.m = len(self.state_lo), len(self.context_mid)
        expected = self.d * self.n_basis * (1 + self.rank) + 2 * self.m + 2 * c["fourier"].shape[1] + 1
        if c["weights"].shape != (expected,):
            raise LearnedError(f"{path}: the cost model holds {c['weights'].shape} weights, its shapes need ({expected},): the file is damaged")
        # the network's layers, in order (float: policy.net.N.weight; a student's inner ones packed)
        names = {k.removesuffix(".weight") for k in tensors if k.startswith("policy.net.") and k.endswith(".weight")}
        if ternary is not None:
            names |= {n for n in ternary.m.ternary if n.startswith("policy.net.")}
        self.layers = sorted(names, key=lambda s: int(s.split(".")[2]))
        if not self.layers:
            raise LearnedError(f"{path} holds no proposal network (policy.net.N.weight): the file is damaged")
        polish = self.config.get("polish_sweeps", 2)
        self.polish_sweeps, self.polish_grid = int(polish), int(self.config.get("polish_grid", 5))
        for k, v in tensors.items():
            if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.isfinite(v).all():
                raise LearnedError(f"{path}: tensor {k} holds non-finite values: the model cannot decide")

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | Path) -> LearnedRuntime:
        from scf.consumers.edge.tensors import load_tensors
        from scf.consumers.edge.ternary import TernaryError, TernaryNet, read_metadata

        path = Path(path)
        try:
            meta = read_metadata(path)
        except Exception as exc:  # noqa: BLE001 - any failure to read the header is one line
            raise LearnedError(f"{path} does not load: {type(exc).__name__}: {exc}") from None
        if not is_learned(meta):
            raise LearnedError(f"{path} has format {meta.get('format')!r} (model {meta.get('model')!r}), not a learned optimiser "
                               f"({OPT_FORMAT}, or a {TERNARY_FORMAT} optimiser student): train one with `scf train-optimiser`")
        try:
            raw = load_tensors(path)
            net = None
            if meta["format"] == TERNARY_FORMAT:
                net = TernaryNet.load(path)
                raw = {k: v for k, v in raw.items() if not k.endswith(".packed")}  # float64 cost buffers as stored
        except (TernaryError, OSError, ValueError) as exc:
            raise LearnedError(f"{path} does not load: {exc}") from None
        return cls(path, meta, raw, net)

    # ------------------------------------------------------------------ the network

    def _linear(self, name: str, x: np.ndarray) -> np.ndarray:
        if self.ternary is not None:
            return self.ternary.linear(name, x)
        y = x @ np.asarray(self.t[f"{name}.weight"], np.float32).T
        b = self.t.get(f"{name}.bias")
        return y + np.asarray(b, np.float32) if b is not None else y

    def propose_raw(self, domain, contexts: np.ndarray) -> np.ndarray:
        """The network's proposals (B, d) within the state bounds, balanced where the domain
        has a balance row, before repair (float64 out)."""
        c = np.atleast_2d(np.asarray(contexts, dtype=float))
        if c.shape[1] != self.m:
            raise LearnedError(f"{self.path.name} takes {self.m} context values, got {c.shape[1]}: deploy a model of {domain.name}")
        h = (c.astype(np.float32) - self.context_mid) / self.context_half
        for i, name in enumerate(self.layers):
            h = self._linear(name, h)
            if i < len(self.layers) - 1:
                h = _silu(h)
        x = np.minimum(np.maximum(self.state_mid + self.state_half * h.astype(np.float32), self.state_lo), self.state_hi)
        a, rlo, rhi = batch_rows(domain, c)
        eq = _equality_rows(a, rlo, rhi)
        if eq.any():
            lo, hi = self.state_lo.astype(np.float64), self.state_hi.astype(np.float64)
            xd = x.astype(np.float64)
            gap = rlo[:, eq][:, 0] - xd.sum(-1)
            up, down = hi - xd, xd - lo
            share_up = up / np.maximum(up.sum(-1, keepdims=True), 1e-9)
            share_down = down / np.maximum(down.sum(-1, keepdims=True), 1e-9)
            return xd + np.maximum(gap, 0)[:, None] * share_up + np.minimum(gap, 0)[:, None] * share_down
        return x.astype(np.float64)

    # ------------------------------------------------------------------ the learned cost

    def _z(self, x):
        return (np.asarray(x, np.float64) - self.cost["state_mid"]) / self.cost["state_half"]

    def _basis(self, z):  # (..., d) -> (..., d, F)
        parts = [z[..., None], z[..., None] ** 2]
        if len(self.knots):
            parts.append(np.maximum(z[..., None] - self.knots, 0.0))
        return np.concatenate(parts, axis=-1)

    def device_weights(self, contexts: np.ndarray) -> np.ndarray:
        """w(c) (B, d, F): the per-device curve coefficients (ml/cost.py `device_weights`)."""
        cz = (np.atleast_2d(np.asarray(contexts, np.float64)) - self.cost["context_mid"]) / self.cost["context_half"]
        r, d, f = self.rank, self.d, self.n_basis
        w = self.cost["weights"][: d * f * (1 + r)].reshape(1 + r, d, f)
        return w[0] + np.einsum("br,rdf->bdf", cz @ self.cost["pcs"], w[1:])

    def device_energy(self, x: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Σ_j Σ_k w_jk φ_k(z_j) for states x (B, K, d) -> (B, K): the learned cost less g(c)."""
        return (self._basis(self._z(x)) * weights[:, None]).sum((-1, -2))

    def energy(self, contexts: np.ndarray, states: np.ndarray) -> np.ndarray:
        """The learned cost E(c, x) (B,) in the domain's energy unit."""
        c = np.atleast_2d(np.asarray(contexts, np.float64))
        x = np.atleast_2d(np.asarray(states, np.float64))
        cz = (c - self.cost["context_mid"]) / self.cost["context_half"]
        basis = self._basis(self._z(x)).reshape(len(x), -1)
        mod = [basis] + [basis * p[:, None] for p in (cz @ self.cost["pcs"]).T]
        proj = 2 * math.pi * cz @ self.cost["fourier"]
        feats = np.concatenate([*mod, cz, cz**2, np.cos(proj), np.sin(proj), np.ones((len(cz), 1))], axis=-1)
        return feats @ self.cost["weights"]

    def merit(self, contexts: np.ndarray, states: np.ndarray) -> np.ndarray:
        """dE/dx (B, d): each variable's learned marginal cost (closed form of the basis)."""
        z = self._z(np.atleast_2d(states))
        parts = [np.ones_like(z)[..., None], 2 * z[..., None]]
        if len(self.knots):
            parts.append((z[..., None] - self.knots > 0).astype(np.float64))
        dphi = np.concatenate(parts, axis=-1)  # (B, d, F)
        return (dphi * self.device_weights(contexts)).sum(-1) / self.cost["state_half"]

    # ------------------------------------------------------------------ deciding

    def decide(self, domain, contexts: np.ndarray) -> tuple[np.ndarray, RepairResult]:
        """(raw proposals, their repair, polished) for `contexts` (B, m): the model's decisions."""
        c = np.atleast_2d(np.asarray(contexts, dtype=float))
        raw = self.propose_raw(domain, c)
        fixed = repair_batch(domain, c, raw, merit=self.merit(c, raw))
        if self.polish_sweeps:
            fixed.states = self.polish(domain, c, fixed.states, fixed.feasible)
        return raw, fixed

    def polish(self, domain, contexts: np.ndarray, states: np.ndarray, feasible: np.ndarray) -> np.ndarray:
        """`LearnedOptimiser.polish`: line searches on the learned cost inside the feasible set
        (each variable alone, each row alone); grid domains are returned as they are."""
        a, rlo, rhi = batch_rows(domain, contexts)
        if _equality_rows(a, rlo, rhi).any() or len(a) > 4 * a.shape[1]:
            return states
        x = np.array(states, dtype=float)
        lo, hi = (np.asarray(self.config[k], dtype=float) for k in ("state_lo", "state_hi"))
        mid, half = self.state_mid.astype(np.float64), self.state_half.astype(np.float64)
        knots = mid[:, None] + half[:, None] * self.knots[None, :]  # (d, K)
        dirs = [np.eye(a.shape[1])[j] for j in range(a.shape[1])]
        dirs += [v / max(np.abs(v).max(), 1e-12) for v in np.linalg.pinv(a).T]
        weights = self.device_weights(contexts)
        grid = np.linspace(0.0, 1.0, self.polish_grid)
        for _ in range(self.polish_sweeps):
            for v in dirs:
                x = self._line_search(x, v, a, rlo, rhi, lo, hi, feasible, knots, grid, weights)
        return x

    def _line_search(self, x, v, a, rlo, rhi, lo, hi, feasible, knots, grid, weights):
        n = len(x)
        av, ax = a @ v, x @ a.T
        with np.errstate(divide="ignore", invalid="ignore"):
            r1, r2 = (rlo - ax) / av, (rhi - ax) / av
            b1, b2 = (lo - x) / v, (hi - x) / v
        t_lo = np.maximum(np.where(av > 0, r1, np.where(av < 0, r2, -np.inf)).max(1), np.where(v > 0, b1, np.where(v < 0, b2, -np.inf)).max(1))
        t_hi = np.minimum(np.where(av > 0, r2, np.where(av < 0, r1, np.inf)).min(1), np.where(v > 0, b2, np.where(v < 0, b1, np.inf)).min(1))
        span = t_hi - t_lo
        t_lo, t_hi = t_lo + 1e-6 * span, t_hi - 1e-6 * span
        ok = feasible & np.isfinite(span) & (t_lo <= 0) & (t_hi >= 0)
        if not ok.any():
            return x
        t_lo, t_hi = np.where(ok, t_lo, 0.0), np.where(ok, t_hi, 0.0)
        moving = np.flatnonzero(v != 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            kinks = ((knots[moving][None, :, :] - x[:, moving, None]) / v[moving][None, :, None]).reshape(n, -1)
        cand = np.concatenate([t_lo[:, None] + grid * (t_hi - t_lo)[:, None], kinks, np.zeros((n, 1))], 1)
        cand = np.clip(cand, t_lo[:, None], t_hi[:, None])
        trial = x[:, None, :] + cand[:, :, None] * v
        energy = self.device_energy(trial, weights)
        energy[:, -1] -= 1e-12 * np.abs(energy[:, -1])  # ties keep the state where it is
        best = cand[np.arange(n), energy.argmin(1)]
        return np.where(ok[:, None], x + best[:, None] * v, x)


def probe(path: str | Path) -> str | None:
    """The health probe of a learned optimiser: None when it loads (every part present and
    finite) and its network answers the middle of its context bounds with finite states
    within its bounds; otherwise why not (one line)."""
    try:
        rt = LearnedRuntime.load(path)
        c = rt.context_mid.astype(np.float64)[None, :]
        h = (c.astype(np.float32) - rt.context_mid) / rt.context_half
        for i, name in enumerate(rt.layers):
            h = rt._linear(name, h)
            if i < len(rt.layers) - 1:
                h = _silu(h)
        x = rt.state_mid + rt.state_half * h
    except LearnedError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure to run is the answer
        return f"the learned optimiser does not run: {type(exc).__name__}: {exc}"
    if x.shape != (1, rt.d) or not np.isfinite(x).all():
        return f"the learned optimiser answers the probe with {list(x.shape)} values, not {rt.d} finite ones"
    return None


__all__ = ["LearnedError", "LearnedRuntime", "OPT_FORMAT", "TERNARY_FORMAT", "is_learned", "probe"]
