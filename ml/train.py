"""Train an EBDM on fossils, evaluate it, and write the checkpoint.

    result = train_local("grid:case118", "vault/fossils", "model_zoo", steps=5000)
    result.checkpoint, result.metrics

`train` is what the GPU worker calls (with `progress_cb` publishing job.progress and
`should_stop` watching the emergency stop); `evaluate` is what the daemon calls to compare
a candidate checkpoint with production on the same held-out fossils.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from scf import domains
from scf.bus.events import domain_token
from scf.ml.checkpoint import load_checkpoint, save_checkpoint, sha256_file
from scf.ml.ebdm import EBDM, EBDMConfig, evaluate_model
from scf.ml.loader import FossilLoader, FossilSource, NoFossils, as_source, load_arrays
from scf.ml.physics import penalty_for

ProgressCb = Callable[[int, int, float, float], None]  # (step, total, loss, samples_per_s)


@dataclass
class TrainResult:
    checkpoint: Path
    sha256: str  # hex digest of the checkpoint file
    metrics: dict[str, float]
    steps: int
    samples: int
    duration_s: float
    stopped_early: bool = False
    loader_state: dict = field(default_factory=dict)


@dataclass
class FitStats:
    steps: int = 0
    samples: int = 0
    loss: float = math.nan  # mean loss over the last logging window
    samples_per_s: float = 0.0
    stopped_early: bool = False
    graph: bool = False  # the step ran as a CUDA graph
    graph_error: str | None = None  # why capture failed, if it did
    compiled: bool = False  # the loss ran through torch.compile
    compile_error: str | None = None  # why it did not, when it was asked for


SMALL_STEP = 1 << 24  # batch × hidden²: at or below this a CPU step runs on one thread


def cpu_threads(config: EBDMConfig, device: str | torch.device = "cpu") -> int | None:
    """Intra-op threads for training `config` on `device`: 1 for a small model on the CPU,
    None (leave torch's setting) otherwise. A small step is a few hundred tiny kernels:
    OpenMP's hand-offs cost more than the arithmetic they share, and on a busy machine its
    spinning threads slow the step down 10-30× (benchmarks/RESULTS.md)."""
    if torch.device(device).type != "cpu":
        return None
    return 1 if config.batch_size * config.hidden**2 <= SMALL_STEP else None


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op thread count set to `n` inside the block (None: unchanged)."""
    if not n or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _EMA:
    """Exponential moving average of the weights, with the usual warm-up (1+n)/(10+n): one
    foreach lerp per step, no host sync (torch's AveragedModel reads its step count back).
    `module` is a copy of the model holding the averages (buffers copied: EBDM's are constants)."""

    def __init__(self, model: EBDM, decay: float) -> None:
        self.module = copy.deepcopy(model)
        self.decay, self.count = decay, 0
        self.averaged = [p.detach() for p in self.module.parameters()]
        self.current = [p.detach() for p in model.parameters()]

    def update(self) -> None:
        self.count += 1
        torch._foreach_lerp_(self.averaged, self.current, 1 - min(self.decay, (1 + self.count) / (10 + self.count)))


def lr_factor(cfg: EBDMConfig, step: int) -> float:
    """The learning rate of step `step` (from 0) over cfg.lr: linear warm-up, then cosine to 0."""
    warmup = max(1, min(cfg.warmup, cfg.steps // 10))
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, cfg.steps))))


def loss_given_noise(model: EBDM, penalty, x, c, sigma, eps, bf16: bool) -> torch.Tensor:
    """What torch.compile takes: the DSM loss given the noise, under bf16 autocast if asked.
    A function of the model (not a method of one step): compiled once per process and mode,
    another model of the same shapes reuses the compiled graphs instead of recompiling."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, _ = model.dsm_loss(x, c, sigma, eps, penalty)
    return loss


_COMPILED: dict[str, Callable] = {}


def compile_choice(mode: str, model: EBDM, device: torch.device) -> str:
    """The torch.compile mode a step uses: "auto" is "default" on CUDA with the analytic
    score (2.5-3× the graphed step on an H200, benchmarks/RESULTS.md; compiling costs
    ~10-15 s once per process and shape) and "off" elsewhere (on the CPU the compile costs
    minutes and the demo's jobs are short)."""
    if mode != "auto":
        return mode
    return "default" if torch.device(device).type == "cuda" and model.analytic else "off"


def compiled_loss(mode: str) -> Callable:
    """`loss_given_noise` through torch.compile in `mode` ("default" or a torch.compile mode)."""
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(loss_given_noise, mode=None if mode == "default" else mode, dynamic=False)
    return _COMPILED[mode]


class TrainStep:
    """One optimiser step (DSM loss through the score, its backward, clipping, AdamW). On
    CUDA it is captured once into a CUDA graph and replayed: the step's ~1000 kernel
    launches and its Python cost become one replay, inputs copied into static buffers, the
    learning rate a device tensor filled before each replay; no host sync anywhere in the
    step. A batch of another size than the captured one runs eagerly on the same parameters
    and optimiser. With `compile` (a torch.compile mode; needs the analytic score, whose
    loss is a first-order graph) the loss given the noise (`EBDM.dsm_loss`) and its backward
    run as compiled kernels, compiled in the warm-up steps, then captured in the graph like
    the rest ("reduce-overhead" makes its own CUDA graphs: the step is not captured then).
    The noise is drawn outside the compiled part, so compiled and eager steps see the same
    random numbers. A compile that fails leaves the step eager, the reason in `compile_error`."""

    WARMUP = 3  # eager steps (on a side stream) before capture, as CUDA graphs need

    def __init__(self, model: EBDM, penalty, device: torch.device, bf16: bool, graph: bool | None = None,
                 grad_reduce: Callable[[list[torch.Tensor]], None] | None = None, compile_mode: str | None = None) -> None:
        cfg = self.cfg = model.config
        self.model, self.penalty, self.device, self.grad_reduce = model, penalty, device, grad_reduce
        self.params = list(model.parameters())
        cuda = device.type == "cuda"
        self.graph_wanted = cuda if graph is None else (graph and cuda)
        self.bf16 = bf16
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False) if bf16 else contextlib.nullcontext()
        self.compile_mode = compile_choice(cfg.compile if compile_mode is None else compile_mode, model, device)
        self.compile_error: str | None = None
        self.compiled: Callable | None = None  # the compiled loss, until it fails
        self.compiled_ok = False  # a compiled step has run (forward and backward)
        if self.compile_mode != "off":
            if not model.analytic:
                self.compile_error = "the autograd score's double backward does not compile: use score_impl analytic (or auto)"
            else:
                self.compiled = compiled_loss(self.compile_mode)
                if self.compile_mode == "reduce-overhead":
                    self.graph_wanted = False  # its own CUDA graphs (cudagraph trees) replay the loss
        if cuda:
            self.lr = torch.tensor(cfg.lr, device=device)
            try:
                self.opt = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=cfg.weight_decay, fused=True, capturable=True)
            except (RuntimeError, ValueError, TypeError):
                self.opt = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=cfg.weight_decay, foreach=True, capturable=True)
        else:
            self.lr = None
            self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_error: str | None = None
        self.static: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # x, c, loss

    def _loss_backward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sigma, eps = self.model.draw_noise(x.shape[0], x.shape[1], x.device, torch.promote_types(x.dtype, self.model.state_mid.dtype))
        if self.compiled is not None:
            try:
                loss = self.compiled(self.model, self.penalty, x, c, sigma, eps, self.bf16)
                loss.backward()
                self.compiled_ok = True
                return loss
            except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as exc:  # dynamo, inductor, triton or
                # its C compiler failing (on a machine without one, say): eager from here on
                if self.compiled_ok:
                    raise
                self.compile_error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
                self.compiled = None
                self.opt.zero_grad(set_to_none=True)
        with self.autocast:
            loss, _ = self.model.dsm_loss(x, c, sigma, eps, self.penalty)
        loss.backward()
        return loss

    def _compute(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        loss = self._loss_backward(x, c)
        if self.grad_reduce is not None:
            self.grad_reduce(self.params)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip, foreach=self.device.type == "cuda" or None)
        self.opt.step()
        return loss.detach()

    def _set_lr(self) -> None:
        lr = self.cfg.lr * lr_factor(self.cfg, self.steps)
        if self.lr is not None:
            self.lr.fill_(lr)
        else:
            for group in self.opt.param_groups:
                group["lr"] = lr

    def __call__(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """One step on (x (B, d), c (B, m)) already on the device; the loss (a device scalar)."""
        self._set_lr()
        self.steps += 1
        if self.graph is not None and x.shape == self.static[0].shape:
            self.static[0].copy_(x, non_blocking=True)
            self.static[1].copy_(c, non_blocking=True)
            self.graph.replay()
            return self.static[2].clone()
        if self.graph_wanted and self.graph is None and self.graph_error is None and self.steps > self.WARMUP:
            loss = self._capture(x, c)
            if loss is not None:
                return loss
        if self.graph is not None:  # another batch size: eager, into the graph's gradient buffers
            self.opt.zero_grad(set_to_none=False)
            return self._compute(x, c)
        self.opt.zero_grad(set_to_none=True)
        if self.graph_wanted and self.graph_error is None:  # warm-up before capture: on a side stream
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                loss = self._compute(x, c)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return loss
        return self._compute(x, c)

    def _capture(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor | None:
        """Capture the step on (x, c) and replay it once (this step); None when capture fails
        (the step then runs eagerly from here on, and the reason is kept in `graph_error`)."""
        static_x, static_c = x.clone(), c.clone()
        self.opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(self.device), torch.cuda.graph(graph):  # captures on the step's device
                static_loss = self._compute(static_x, static_c)
        except RuntimeError as exc:
            self.graph_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            torch.cuda.synchronize(self.device)
            self.opt.zero_grad(set_to_none=True)
            return None
        self.graph, self.static = graph, (static_x, static_c, static_loss)
        graph.replay()
        return static_loss.clone()


def fit(
    model: EBDM,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    penalty: torch.nn.Module | None = None,
    device: str | torch.device = "cpu",
    progress_cb: ProgressCb | None = None,
    should_stop: Callable[[], bool] | None = None,
    bf16: bool | None = None,
    graph: bool | None = None,
    threads: int | None = None,
    grad_reduce: Callable[[list[torch.Tensor]], None] | None = None,
    compile_mode: str | None = None,
) -> tuple[EBDM, FitStats]:
    """Run `config.steps` optimiser steps over (state, context) batches; return the EMA
    model (or the model itself with ema=0) and what happened. `bf16` autocast defaults to
    on for CUDA, off elsewhere; `graph` (CUDA graph replay of the step, see `TrainStep`)
    to on for CUDA. Batches on the host are moved with non-blocking copies (pinned memory
    and a side stream: `device_batches`). `threads`: torch's CPU threads meanwhile (None:
    `cpu_threads`). `grad_reduce(params)` runs after each backward (data parallel: the
    gradients' all-reduce, `ml.ddp`); the step is not captured as a graph then.
    `compile_mode`: torch.compile of the loss (None: `config.compile`; see `TrainStep`)."""
    device = torch.device(device)
    graph = False if grad_reduce is not None else graph
    with torch_threads(threads or cpu_threads(model.config, device)):
        return _fit(model, batches, penalty, device, progress_cb, should_stop, bf16, graph, grad_reduce, compile_mode)


def _fit(model, batches, penalty, device, progress_cb, should_stop, bf16, graph, grad_reduce,
         compile_mode=None) -> tuple[EBDM, FitStats]:
    cfg = model.config
    model.to(device).train()
    penalty = penalty.to(device) if penalty is not None else None
    bf16 = device.type == "cuda" if bf16 is None else bf16
    step = TrainStep(model, penalty, device, bf16, graph, grad_reduce, compile_mode)
    ema = _EMA(model, cfg.ema) if cfg.ema > 0 else None
    stats = FitStats()
    window_loss, window_n, window_samples, t0 = torch.zeros((), device=device), 0, 0, time.perf_counter()
    for x, c in device_batches(batches, device):
        loss = step(x, c)
        if ema is not None:
            ema.update()
        stats.steps += 1
        stats.samples += x.shape[0]
        window_loss += loss
        window_n += 1
        window_samples += x.shape[0]
        last = stats.steps >= cfg.steps
        if stats.steps % cfg.log_every == 0 or last:
            now = time.perf_counter()
            stats.loss = float(window_loss) / window_n  # one device sync per window
            stats.samples_per_s = window_samples / max(now - t0, 1e-9)
            window_loss.zero_()
            window_n, window_samples, t0 = 0, 0, now
            if progress_cb is not None:
                progress_cb(stats.steps, cfg.steps, stats.loss, stats.samples_per_s)
        if last:
            break
        if should_stop is not None and should_stop():
            stats.stopped_early = True
            if window_n:
                stats.loss = float(window_loss) / window_n
            break
    stats.graph = step.graph is not None
    stats.graph_error = step.graph_error
    stats.compiled, stats.compile_error = step.compiled is not None and step.compiled_ok, step.compile_error
    trained = ema.module if ema is not None else model
    return trained.eval(), stats


def device_batches(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device, depth: int = 2):
    """(x, c) batches on `device`. For CUDA, up to `depth` batches ahead: host tensors pinned
    (unless the DataLoader pinned them), copied with non-blocking copies on a side stream
    that the consuming stream waits on, so copies overlap the steps."""
    if device.type != "cuda":
        for x, c in batches:
            yield x.to(device), c.to(device)
        return
    side = torch.cuda.Stream(device)
    ahead: list = []
    it = iter(batches)

    def stage() -> bool:
        try:
            x, c = next(it)
        except StopIteration:
            return False
        if x.device.type == "cpu":
            x = x if x.is_pinned() else x.pin_memory()
            c = c if c.is_pinned() else c.pin_memory()
        with torch.cuda.stream(side):  # device memory it frees is guarded by record_stream below
            xd, cd = x.to(device, non_blocking=True), c.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        ahead.append((xd, cd, done))
        return True

    while len(ahead) < depth and stage():
        pass
    while ahead:
        xd, cd, done = ahead.pop(0)
        current = torch.cuda.current_stream(device)
        current.wait_event(done)
        xd.record_stream(current)
        cd.record_stream(current)
        stage()
        yield xd, cd


def _penalty(config: EBDMConfig):
    return penalty_for(domains.get(config.domain)) if config.domain else None


def train(
    config: EBDMConfig,
    data_source: FossilSource | str | os.PathLike,
    *,
    out_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    progress_cb: ProgressCb | None = None,
    should_stop: Callable[[], bool] | None = None,
    num_workers: int = 0,
    loader_state: dict | None = None,
    lineage: dict | None = None,
    threads: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    grad_reduce: Callable[[list[torch.Tensor]], None] | None = None,
    device_data_mb: float | None = None,
) -> TrainResult | None:
    """Train on the "train" split of `data_source` (fossils of `config.domain`), evaluate
    on its "heldout" split (1 in 16 fossils by id), and write a safetensors checkpoint
    under `out_dir` (a fresh temporary directory if None). `lineage` adds to what the
    source reports (e.g. the stream sequence range a worker read); `loader_state` starts
    the data where a previous loader stopped. Metrics are finite floats (one that cannot
    be computed, e.g. a correlation over constant values, is left out). `threads`: torch's
    CPU threads for this call (None: `cpu_threads`, one for a small model). Data parallel
    (`ml.ddp`): this process is `rank` of `world_size`, reads its share of the data and
    calls `grad_reduce` after each backward; only rank 0 evaluates and writes the
    checkpoint (the others return None). On CUDA the training records are kept on the GPU
    when they take at most `device_data_mb` MB there (None: a quarter of its free memory;
    0: never) and batches are gathered there; else they are cut into pinned host memory
    (`ml.loader.FossilLoader`'s `device`); an epoch's short last batch is passed over there
    (`drop_last`), since the step is captured and compiled for one batch size."""
    cfg = config.resolved()
    with torch_threads(threads or cpu_threads(cfg, device)):
        return _train(cfg, data_source, out_dir, device, progress_cb, should_stop, num_workers, loader_state, lineage,
                      rank, world_size, grad_reduce, device_data_mb)


def _train(cfg, data_source, out_dir, device, progress_cb, should_stop, num_workers, loader_state, lineage,
           rank=0, world_size=1, grad_reduce=None, device_data_mb=None) -> TrainResult | None:
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    source = as_source(data_source)
    cuda = torch.device(device).type == "cuda"
    loader = FossilLoader(
        source, domain=cfg.domain, batch_size=cfg.batch_size, seed=cfg.seed, split="train", epochs=None,
        num_workers=num_workers, state=loader_state, rank=rank, world_size=world_size,
        device=device if cuda else None,  # on CUDA: the records on the GPU when they fit, else pinned host batches
        drop_last=cuda,  # all batches of the size the step was captured and compiled for (another would run eagerly, compiled anew)
        device_budget=None if device_data_mb is None else int(device_data_mb * 2**20),
    )
    penalty = _penalty(cfg)
    model = EBDM(cfg)
    batches = ((b.state, b.context) for b in loader)
    try:
        trained, stats = fit(model, batches, penalty=penalty, device=device, progress_cb=progress_cb, should_stop=should_stop,
                             threads=torch.get_num_threads(), grad_reduce=grad_reduce)  # threads as train() set them
    finally:
        batches.close()  # stops the DataLoader's workers now, not at garbage collection
    if rank != 0:
        return None
    metrics = {"steps": float(stats.steps), "samples_per_s": stats.samples_per_s}
    if math.isfinite(stats.loss):
        metrics["train_loss"] = stats.loss
    metrics.update(_evaluate(trained, source, penalty, cfg, device))
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="scf-train-"))
    name = f"ebdm-{domain_token(cfg.domain or 'vector')}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-s{stats.steps}.safetensors"
    full_lineage = {
        "domain": cfg.domain,
        "source": source.lineage(),
        "split": "train: fossil_id last hex digit != 0; heldout: == 0",
        "loader_state": loader.state_dict(),
        "samples": stats.samples,
        **(lineage or {}),
    }
    path = save_checkpoint(out / name, trained, lineage=full_lineage, metrics=metrics)
    return TrainResult(
        checkpoint=path, sha256=sha256_file(path), metrics=metrics, steps=stats.steps, samples=stats.samples,
        duration_s=time.perf_counter() - started, stopped_early=stats.stopped_early, loader_state=loader.state_dict(),
    )


def _evaluate(model: EBDM, heldout, penalty, cfg: EBDMConfig, device, seed: int = 0) -> dict[str, float]:
    if isinstance(heldout, tuple):
        x, c, cost = heldout
    else:
        try:
            x, c, cost = load_arrays(as_source(heldout), domain=cfg.domain, split="heldout", limit=cfg.eval_records)
        except NoFossils:  # too little data to hold any out: say so in the metrics
            return {"heldout_records": 0.0}
    domain = domains.get(cfg.domain) if cfg.domain else None
    metrics = evaluate_model(model.to(device), x, c, cost, penalty, domain=domain, seed=seed)
    return {k: v for k, v in metrics.items() if math.isfinite(v)}  # events carry finite floats only


def evaluate(
    checkpoint: str | os.PathLike,
    heldout: FossilSource | str | os.PathLike | tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    device: str = "cpu",
    seed: int = 0,
    limit: int | None = None,
) -> dict[str, float]:
    """Metrics of a checkpoint on held-out fossils: a source (its "heldout" split, up to
    `limit` or the config's eval_records) or arrays (state, context, cost). Deterministic
    for a seed, so a candidate and production evaluated alike are comparable."""
    model, meta = load_checkpoint(checkpoint, device)
    cfg = model.config
    if limit is not None:
        cfg = dataclasses.replace(cfg, eval_records=limit)
    with torch_threads(cpu_threads(cfg, device)):
        return _evaluate(model, heldout, _penalty(cfg), cfg, device, seed=seed)


def compare(candidate: dict[str, float], baseline: dict[str, float], *, margin: float = 0.02, violation_slack: float = 0.01) -> tuple[bool, list[str]]:
    """Whether a candidate beats the baseline: held-out DSM lower by `margin` (relative),
    and sample violation rate not higher by more than `violation_slack`. Reasons either way."""
    reasons, better = [], True
    c, b = candidate.get("heldout_dsm", math.inf), baseline.get("heldout_dsm", math.inf)
    if not c < b * (1 - margin):
        better = False
        reasons.append(f"heldout_dsm {c:.4g} is not {margin:.0%} below the baseline's {b:.4g}")
    else:
        reasons.append(f"heldout_dsm {c:.4g} < {b:.4g} by more than {margin:.0%}")
    if "violation_rate" in candidate and "violation_rate" in baseline:
        cv, bv = candidate["violation_rate"], baseline["violation_rate"]
        if cv > bv + violation_slack:
            better = False
            reasons.append(f"violation_rate {cv:.3f} exceeds the baseline's {bv:.3f} by more than {violation_slack}")
    return better, reasons


def train_local(
    domain: str,
    shards_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    steps: int = 2000,
    batch_size: int = 256,
    device: str = "cpu",
    seed: int = 0,
    progress_cb: ProgressCb | None = None,
    **config: object,
) -> TrainResult:
    """`scf train`: train an EBDM for `domain` on the shards in `shards_dir`, checkpoint
    into `out_dir`. Extra keyword arguments are EBDMConfig fields."""
    cfg = EBDMConfig.from_params({"domain": domain, "steps": steps, "batch_size": batch_size, "seed": seed, **config})
    domains.get(domain)  # UnknownDomain before any work
    return train(cfg, shards_dir, out_dir=out_dir, device=device, progress_cb=progress_cb)
