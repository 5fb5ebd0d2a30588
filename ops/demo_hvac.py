"""The demo's HVAC sites (issue 13): the savings minted come from a learned model's decisions.

While the grid part of the demo runs, two learned optimisers (`scf-opt/1`, docs/optimise.md)
are trained here by `scf train-optimiser` on synthetic HVAC fossils (fossils only: a cost
model of the measured energy and a proposal network): a better one on all the fossils and a
deliberately worse one on the first 100 of the same fossils — fewer than its cost model has
features, so its learned cost, and with it every decision, is off. Both are promoted
(signed by the release key) and deployed, the better to site-a and the worse to site-b;
each site's edge agent decides every hour with its model (numpy: consumers/edge/learned.py,
then the domain's repair, the local envelope, the setpoints) on the same simulated weather,
and the saving of its day is measured by IPMVP Option D against its calibrated baseline
and minted. `table` puts the two side by side: model, decision quality on held-out fossils,
saving measured ± uncertainty, kWh minted.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from scf.bus import events as ev
from scf.bus.client import Bus
from scf.bus.errors import SCFError
from scf.bus.settings import Settings

HVAC = "hvac:office3"
FOSSILS = 300  # HVAC fossils synthesised for the better model
FEW = 100  # the worse model's: the first of the same fossils (its cost model has 147 features)
SEED = 11
TRAIN_ARGS = ("--steps", "30", "--hidden", "64", "--depth", "2", "--eval-contexts", "128")
SITES = {"site-a": ("better", FOSSILS), "site-b": ("worse", FEW)}  # site -> (which model, fossils it learns from)
SHOWN = ("decision_feasible", "decision_gap_median", "decision_gap_p95", "decision_savings_captured", "cost_heldout_mae_rel")


class TrainingFailed(SCFError):
    pass


@dataclass
class SiteModel:
    site: str
    label: str  # "better" | "worse"
    fossils: int
    path: Path | None = None
    checkpoint_id: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    saved_kwh: float | None = None
    uncertainty_kwh: float | None = None
    minted_kwh: float = 0.0
    ledger: str = ""  # "minted" or the ledger's rejection reason


async def _run(args: list[str], env: dict[str, str], timeout: float) -> str:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "scf.cli.main", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, env=env)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise TrainingFailed(f"`scf {' '.join(args[:1])}` did not finish within {timeout:.0f}s") from None
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise TrainingFailed(f"`scf {' '.join(args)}` failed ({proc.returncode}): {text.strip()[-600:]}")
    return text


def parse_training(text: str) -> tuple[Path, dict[str, float]]:
    """(checkpoint path, metrics) from `scf train-optimiser`'s output."""
    m = re.search(r"^wrote (\S+\.safetensors) \(", text, re.M)
    if m is None:
        raise TrainingFailed(f"`scf train-optimiser` wrote no checkpoint: {text.strip()[-400:]}")
    metrics = {k: float(v) for k, v in re.findall(r"^  (\w+)\s+(-?[0-9.eE+-]+|nan|inf)$", text, re.M)}
    return Path(m.group(1)), metrics


async def train_models(settings: Settings, timeout: float = 300.0) -> dict[str, SiteModel]:
    """Synthesise the HVAC fossils, then train both models at once (two processes)."""
    env = {**os.environ, "SCF_HOME": str(settings.home), "OMP_NUM_THREADS": "1"}
    root = settings.path("fossil_vault", "hvac-demo")
    every, few = root / "all", root / "first-100"
    await _run(["fossils", "synth", "--domain", HVAC, "--n", str(FOSSILS), "--out", str(every), "--shard-size", str(FOSSILS),
                "--seed", str(SEED)], env, timeout)
    few.mkdir(parents=True, exist_ok=True)
    lines = (every / "fossils-00000.ndjson").read_bytes().splitlines(keepends=True)
    (few / "fossils-00000.ndjson").write_bytes(b"".join(lines[:FEW]))
    models = {site: SiteModel(site, label, n) for site, (label, n) in SITES.items()}

    async def one(m: SiteModel) -> None:
        t0 = time.monotonic()
        data = every if m.fossils == FOSSILS else few
        text = await _run(["train-optimiser", "--data", str(data), "--domain", HVAC, "--out", str(settings.path("model_zoo", "hvac", m.label)),
                           *TRAIN_ARGS], env, timeout)
        m.path, m.metrics = parse_training(text)
        m.checkpoint_id = f"hvac-opt-{m.label}-{m.path.stem.rsplit('-', 2)[-2].lower()}"
        m.seconds = time.monotonic() - t0

    await asyncio.gather(*(one(m) for m in models.values()))
    return models


async def deploy_models(bus: Bus, models: dict[str, SiteModel], follow, echo: Callable[[str], None], timeout: float) -> None:
    """Promote (signed by the demo's release key) and deploy each site's model; wait for both
    activations. The deploy intents name their site (alias `candidate`: the planner makes
    no intent of its own for it)."""
    from scf.consumers.deploy import deploy_intent

    for version, m in enumerate(models.values(), 1):
        assert m.path is not None
        data = m.path.read_bytes()
        promo = ev.CheckpointPromoted.new(
            ev.Promotion(checkpoint_id=m.checkpoint_id, domain=HVAC, alias="candidate", version=version, uri=m.path.resolve().as_uri(),
                         sha256=hashlib.sha256(data).hexdigest(), size=len(data)),
            source=bus.source,
        )
        ack = await bus.publish(promo)
        intent = deploy_intent(promo, ack.seq, target=f"nodes:{m.site}", strategy="all", source=bus.source, gear="HYPER",
                               reason=f"demo: the {m.label} learned optimiser (trained on {m.fossils} HVAC fossils) to {m.site}")
        await bus.publish_once(intent)
        q = m.metrics
        echo(f"   {m.site}: {m.checkpoint_id} ({m.label}; {m.fossils} fossils, trained in {m.seconds:.1f}s; held-out decisions: "
             f"savings captured {100 * q.get('decision_savings_captured', float('nan')):.2f} %, gap p95 {q.get('decision_gap_p95', float('nan')):.3g} %) → deploy intent")
    activated = await follow.wait("hvac deploy", lambda e: isinstance(e, ev.DeployActivated) and e.data.node in models, timeout,
                                  count=len(models), hint="see logs/deploy.log, logs/safety.log and logs/edge-site-*.log")
    for e in activated:
        echo(f"   deploy.activated on {e.data.node}: its control loop decides every hour with {e.data.checkpoint_id} (numpy)")


def table(models: dict[str, SiteModel]) -> list[str]:
    """The two models side by side (Markdown)."""
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    rows = ["| site | model | fossils | held-out savings captured | gap p95 % | cost model error | saved kWh (Option D) | ± kWh (90 %) | kWh minted |",
            "|---|---|---|---|---|---|---|---|---|"]
    for m in models.values():
        q = m.metrics
        rows.append(f"| {m.site} | {m.checkpoint_id} ({m.label}) | {m.fossils} | {num(q.get('decision_savings_captured'), '.2%')} | "
                    f"{num(q.get('decision_gap_p95'), '.3g')} | {num(q.get('cost_heldout_mae_rel'), '.2%')} | {num(m.saved_kwh, '.2f')} | "
                    f"{num(m.uncertainty_kwh, '.2f')} | {m.minted_kwh:.2f}{'' if m.ledger in ('', 'minted') else ' (' + m.ledger + ')'} |")
    return rows


__all__ = ["HVAC", "SITES", "SiteModel", "TrainingFailed", "deploy_models", "parse_training", "table", "train_models"]
