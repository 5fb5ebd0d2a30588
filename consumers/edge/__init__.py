"""The edge agent: `scf run edge --node ID --dir PATH` on each edge box.

It activates signed releases, health-checks them, rolls back on command or on a failed
check, and reports meter readings. numpy only: nothing here imports torch or `scf.ml`
(an import contract in `.importlinter` keeps it so). One module per concern:

    agent.py      EdgeAgent: the order handler of `edge-<node>` (deploy, rollback, the
                  node registry entry), `EdgeSettings` ([edge] in scf.toml)
    kinds.py      the model kinds a node deploys (`[edge] runs`: optimiser where it
                  controls a plant) and a file's kind from its header (docs/deploy.md)
    release.py    release checks: the signed promotion, the artifact fetch with its digest
    store.py      the version store: versions/, the atomic `current` link, state.json
    probe.py      the health probe run after every activation
    tensors.py    safetensors read with numpy (shared by the probe and any runtime)
    reconcile.py  restart reconciliation: finishing an activation a crash interrupted
    meter.py      meter files → signed energy.measured
    keys.py       the node's signing key
    plant.py      plants behind one interface: the simulated site (in process, or served
                  over MQTT by `scf run plant`) and the MQTT adapter (docs/plants.md)
    control.py    the control loop: the deployed decision + repair, the safety envelope,
                  the runtime monitor (revert on breach), M&V measurements (docs/mv.md)

What runs a deployed model belongs here too, numpy only (a runtime for ternary students
beside `tensors.py`).
"""

from scf.consumers.edge.agent import EdgeAgent, EdgeSettings
from scf.consumers.edge.keys import load_node_key, node_key_path
from scf.consumers.edge.meter import MeterReading
from scf.consumers.edge.probe import health_check
from scf.consumers.edge.release import EdgeError, Refused, verify_release

__all__ = [
    "EdgeAgent",
    "EdgeError",
    "EdgeSettings",
    "MeterReading",
    "Refused",
    "health_check",
    "load_node_key",
    "node_key_path",
    "verify_release",
]
