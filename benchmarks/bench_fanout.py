"""Fan-out benchmark: one deployment to N simulated edge agents.

    python benchmarks/bench_fanout.py [--nodes 100] [--strategy all|canary] [--size-mb 1]

N `EdgeAgent`s (tasks in this process, each with its own directory, durable consumer and
runner; registered in the node registry with one label) and the deploy planner (its
runners, in this process) run against one nats-server. A signed promotion is published,
the planner turns it into a deploy intent, and the clock starts when the final APPROVE
verdict is published. Each agent then does the real work: verify the release signature,
fetch the artifact (`file://`, through bus.artifacts), check its sha256, switch `current`,
run the numpy health probe, report `deploy.activated`. Reported: the time until all N have
activated, and per node (approval → its deploy.activated arriving at an observer) p50 / p99;
and, per node, approval → its order reaching its agent (the control plane's share).

All N agents share this process's CPUs: their activation work (copy + sha256 + switch +
probe, in the default thread pool) runs interleaved, so per-node activation times bunch
near the total — on real edge nodes each has its own CPU and activation time is the
order latency plus one node's work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from scf.bus import codec  # noqa: E402
from scf.bus import events as ev  # noqa: E402
from scf.bus.client import Bus  # noqa: E402
from scf.bus.server import ServerProcess, free_port  # noqa: E402
from scf.bus.settings import Settings, init_home  # noqa: E402
from scf.bus.signing import SigningKey, TrustList  # noqa: E402
from scf.bus.streams import ensure  # noqa: E402
from scf.consumers.deploy import DeployPlanner, DeploySettings, intent_id_for  # noqa: E402
from scf.consumers.edge import EdgeAgent  # noqa: E402

RECEIVED: dict[str, float] = {}


class TimedAgent(EdgeAgent):
    """An EdgeAgent that notes when its order reached it (the control plane's share)."""

    async def deploy(self, event, delivery=None):
        RECEIVED.setdefault(self.node, time.perf_counter())
        return await super().deploy(event, delivery)


def model(path: Path, size_mb: float) -> None:
    rng = np.random.default_rng(0)
    rows = max(1, int(size_mb * 1024 * 1024 / (256 * 4)))
    save_file(
        {
            "emb.weight": rng.standard_normal((rows, 256)).astype(np.float32),
            "net.0.weight": rng.standard_normal((64, 256)).astype(np.float32),
            "net.0.bias": np.zeros(64, dtype=np.float32),
        },
        str(path),
    )


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


async def bench(url: str, tmp: Path, n: int, strategy: str, size_mb: float) -> dict:
    settings = Settings(home=str(tmp / "home"), nats_url=url, source="bench")
    init_home(settings)
    release = SigningKey.generate("release")
    trust = TrustList()
    trust.trust(release.public_b64, "release", ["release"])

    # One connection per 25 agents (an edge box has its own; a few keep this process light).
    conns = [await Bus.connect(settings, f"bench-{i}") for i in range((n + 24) // 25)]
    bus = conns[0]
    await ensure(bus.js)
    planner_bus = await Bus.connect(settings, "bench-planner")
    observer = await Bus.connect(settings, "bench-observer")

    agents = []
    for i in range(n):
        node = f"edge-{i:03d}"
        agent = await TimedAgent(conns[i // 25], node, tmp / "nodes" / node, trust, labels={"domain": "grid:bench"}).start()
        agents.append(agent)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(a.runner(fetch_timeout=1.0).run(stop)) for a in agents]
    planner = DeployPlanner(planner_bus, trust, DeploySettings(strategy=strategy))  # type: ignore[arg-type]
    tasks += [asyncio.create_task(r.run(stop)) for r in planner.runners()]

    arrived: dict[str, float] = {}
    all_in = asyncio.Event()

    async def on_activated(msg) -> None:
        e = codec.decode(msg.data)
        arrived.setdefault(e.data.node, time.perf_counter())
        if len(arrived) >= n:
            all_in.set()

    await observer.nc.subscribe("deploy.activated.>", cb=on_activated)

    path = tmp / "artifact.safetensors"
    model(path, size_mb)
    import hashlib

    data = path.read_bytes()
    promo = ev.CheckpointPromoted.new(
        ev.Promotion(checkpoint_id="ck-bench", domain="grid:bench", alias="production", version=1,
                     uri=path.as_uri(), sha256=hashlib.sha256(data).hexdigest(), size=len(data)),
        source="bench",
    )
    await bus.js.publish(promo.subject(), codec.sign(promo, release), headers=Bus.headers(promo))
    iid = intent_id_for("ck-bench", "production")
    deadline = time.monotonic() + 60
    while await bus.last(f"intent.created.deploy.{iid}") is None:
        if time.monotonic() > deadline:
            raise TimeoutError("no deploy intent")
        await asyncio.sleep(0.01)
    verdict = ev.VerdictIssued.new(
        ev.Verdict(verdict_id="v", subject_id=iid, subject_type="intent", decision="APPROVE", gate="human", kind="deploy"),
        source="bench",
    )
    t0 = time.perf_counter()
    await bus.publish(verdict)
    await asyncio.wait_for(all_in.wait(), 600)
    total = time.perf_counter() - t0
    lat = [t - t0 for t in arrived.values()]
    recv = [t - t0 for t in RECEIVED.values()]
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    for b in conns + [planner_bus, observer]:
        await b.close()
    ok = sum(1 for a in agents if a.current() is not None and a.current().checkpoint_id == "ck-bench")
    return {
        "nodes": n,
        "strategy": strategy,
        "artifact_mb": round(len(data) / 2**20, 2),
        "activated": ok,
        "all_activated_s": round(total, 3),
        "per_node_p50_s": round(statistics.median(lat), 3),
        "per_node_p99_s": round(pct(lat, 99), 3),
        "per_node_min_s": round(min(lat), 3),
        "order_received_p50_s": round(statistics.median(recv), 3),
        "order_received_p99_s": round(pct(recv, 99), 3),
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--strategy", choices=["all", "canary", "both"], default="both")
    ap.add_argument("--size-mb", type=float, default=1.0)
    a = ap.parse_args()
    for strategy in (["all", "canary"] if a.strategy == "both" else [a.strategy]):
        RECEIVED.clear()
        with tempfile.TemporaryDirectory() as tmp:
            server = ServerProcess(Path(tmp) / "nats", free_port()).start()
            try:
                result = await bench(server.url, Path(tmp), a.nodes, strategy, a.size_mb)
            finally:
                server.stop()
        result["machine"] = f"{platform.machine()} {platform.system()} {os.cpu_count()} cpus, python {platform.python_version()}"
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
