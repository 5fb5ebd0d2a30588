"""Service files for running SCF processes permanently: systemd units (Linux, the cloud
GPU worker) and launchd agents (the Mac). Each runs `scf run NAME` with SCF_HOME and
NATS_URL fixed, restarts on failure, and stops with SIGTERM (the process drains)."""

from __future__ import annotations

import plistlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from scf.bus.settings import Settings
from scf.ops.supervisor import ProcessSpec


@dataclass(frozen=True)
class ServiceFile:
    path: Path
    text: str


def scf_executable() -> str:
    here = Path(sys.executable).parent / "scf"
    return str(here) if here.exists() else (shutil.which("scf") or "scf")


def systemd_unit(spec: ProcessSpec, settings: Settings, directory: Path) -> ServiceFile:
    args = " ".join([scf_executable(), "run", spec.kind, *spec.args])
    text = f"""[Unit]
Description=SCF {spec.name} ({spec.kind})
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={args}
Environment=SCF_HOME={settings.home}
Environment=NATS_URL={settings.url}
Environment=PYTHONUNBUFFERED=1
Restart=on-failure
RestartSec=2
# SIGTERM: stop fetching, finish in-flight handlers, drain the connection
KillSignal=SIGTERM
TimeoutStopSec=30

[Install]
WantedBy=default.target
"""
    return ServiceFile(directory / f"scf-{spec.name}.service", text)


def launchd_plist(spec: ProcessSpec, settings: Settings, directory: Path) -> ServiceFile:
    label = f"io.scf.{spec.name}"
    logs = settings.path("logs")
    data = {
        "Label": label,
        "ProgramArguments": [scf_executable(), "run", spec.kind, *spec.args],
        "EnvironmentVariables": {"SCF_HOME": settings.home, "NATS_URL": settings.url, "PYTHONUNBUFFERED": "1"},
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 5,
        "ExitTimeOut": 30,
        "StandardOutPath": str(logs / f"{spec.name}.log"),
        "StandardErrorPath": str(logs / f"{spec.name}.log"),
    }
    return ServiceFile(directory / f"{label}.plist", plistlib.dumps(data).decode())


def default_dir(flavour: str) -> Path:
    if flavour == "launchd":
        return Path.home() / "Library" / "LaunchAgents"
    return Path.home() / ".config" / "systemd" / "user"


def render(procs: list[ProcessSpec], settings: Settings, flavour: str, directory: Path | None = None) -> list[ServiceFile]:
    directory = directory or default_dir(flavour)
    make = launchd_plist if flavour == "launchd" else systemd_unit
    return [make(p, settings, directory) for p in procs]


def install(files: list[ServiceFile]) -> list[Path]:
    written = []
    for f in files:
        f.path.parent.mkdir(parents=True, exist_ok=True)
        f.path.write_text(f.text)
        written.append(f.path)
    return written


def next_steps(flavour: str, files: list[ServiceFile]) -> list[str]:
    if flavour == "launchd":
        return [f"launchctl load -w {f.path}" for f in files]
    names = " ".join(f.path.name for f in files)
    return ["systemctl --user daemon-reload", f"systemctl --user enable --now {names}"]
