"""Helpers for the plant and M&V tests: a real Mosquitto broker per test, deployable
decision files, and an in-process control run over the simulated site."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from scf.bus.server import free_port
from scf.consumers.edge.control import ControlLoop, ControlSettings
from scf.consumers.edge.plant import PlantEnded, SimPlant
from scf.consumers.edge.store import Installed

# A decision for office3 (kW per zone, one row per hour of the day): off, but preheat at
# 6-8 h so the zones reach the occupied band when people arrive; the repair step adds what
# the comfort band needs on top. `wasteful` adds a constant 1 kW; `no_preheat` is all zeros.
PREHEAT = [10.0, 5.0, 7.0]


def decision(kind: str = "good") -> np.ndarray:
    d = np.zeros((24, 3), dtype=np.float32)
    if kind in ("good", "wasteful"):
        d[6:8] = PREHEAT
    if kind == "wasteful":
        d[d == 0] = 1.0
    if kind == "hot":
        d[:] = 6.0
    return d


def write_decision(path: Path, kind: str = "good", envelope: dict | None = None) -> Path:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"decision": decision(kind)}, str(path), metadata={"scf.envelope": json.dumps(envelope)} if envelope else None)
    return path


def installed(directory: Path, checkpoint_id: str, kind: str = "good", version: int = 1, envelope: dict | None = None) -> Installed:
    """A decision file placed as the edge store would place it (versions/<dir>/model.safetensors)."""
    dirname = f"{checkpoint_id}-v{version}"
    write_decision(directory / "versions" / dirname / "model.safetensors", kind, envelope)
    return Installed(checkpoint_id=checkpoint_id, domain="hvac:office3", version=version, uri="", sha256="", size=0,
                     dirname=dirname, deployment_id=f"dep-{checkpoint_id}", plan_id="plan")


async def control_run(directory: Path, schedule: dict[int, Installed | None], settings: ControlSettings, node: str = "n1",
                      previous=lambda item: None) -> ControlLoop:
    """Run the loop in process over the simulated site to its end; `schedule` maps a
    telemetry seq to what is installed from then on."""
    plant = SimPlant(settings.site())
    state: dict[str, Installed | None] = {"cur": None}
    loop = ControlLoop(plant, node, directory, settings, current=lambda: state["cur"], previous=previous)
    while True:
        try:
            tel = await plant.telemetry(loop.last_seq)
        except PlantEnded:
            return loop
        loop.last_seq = tel.seq
        if tel.seq in schedule:
            state["cur"] = schedule[tel.seq]
        await plant.write(await loop.step(tel))


class Mosquitto:
    def __init__(self, directory: Path, users: dict[str, str] | None = None) -> None:
        binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if binary is None:
            pytest.skip("mosquitto is not installed: apt-get install mosquitto (.ci/run does)")
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        conf = directory / "mosquitto.conf"
        text = f"listener {self.port} 127.0.0.1\npersistence false\nset_tcp_nodelay true\n"
        if os.geteuid() == 0:  # as root, mosquitto would drop to the `mosquitto` user and lose this test's files
            text += "user root\n"
        if users:  # logins required: a password file written with mosquitto_passwd
            pw = directory / "passwords"
            pw.write_text("")
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), user, password], check=True, capture_output=True)
            text += f"allow_anonymous false\npassword_file {pw}\n"
        else:
            text += "allow_anonymous true\n"
        conf.write_text(text)
        self.log = directory / "mosquitto.log"
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto did not start: {self.log.read_text()[-500:]}") from None
                time.sleep(0.05)  # polling interval of the awaited condition above (the broker accepting connections)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
