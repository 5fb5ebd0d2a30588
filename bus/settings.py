"""Settings, decoded once from the environment and an optional `$SCF_HOME/scf.toml`.

Precedence: environment > scf.toml > defaults. Each subsystem keeps its own table in the
TOML file (`[ledger]`, `[safety]`, …) and decodes it into its own frozen struct with
`Settings.section(name, Type)`, so adding a setting never touches this module.

    SCF_HOME        where everything lives (default ./.scf)
    NATS_URL        use this server; never start the embedded one
    SCF_NATS_PORT   port of the embedded server (default 4333, so a system server on 4222
                    does not collide)
    SCF_SOURCE      this process's identity in event envelopes (default NAME@HOST)
    SCF_KEY         name or path of the signing key for commands and releases
    SCF_SANDBOX     1 when this deployment is a sandbox (allows the SINGULARITY gear)
    SCF_REQUIRE_SIGNED_CONTROL  1 to refuse unsigned control commands
    SCF_LOG         log level of SCF processes (default WARNING; `log = "info"` in scf.toml)
    SCF_ARTIFACTS   artifact store backend, overriding `[artifacts] backend`

Unknown keys are refused, at the top level when the file is read and in a section when its
subsystem decodes it, with the key, the section and the keys that exist: a typo such as
`[ledger] rat = 2.0` must never be silently ignored. A new subsystem adds its table name
to SECTIONS.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from scf.bus.errors import ConfigError

T = TypeVar("T")

DEFAULT_PORT = 4333
# The `[name]` tables of scf.toml: each is decoded by its subsystem with `Settings.section`
# into the struct named here (as data: bus imports no other package). The CLI checks every
# table present in the file against its struct when a command starts (scf.cli.common).
SECTIONS: dict[str, str] = {
    "archive": "scf.projections.archive:ArchiveSettings",
    "artifacts": "scf.bus.artifacts:ArtifactSettings",
    "daemon": "scf.producers.daemon:DaemonSettings",
    "deploy": "scf.consumers.deploy:DeploySettings",
    "dispatch": "scf.consumers.dispatch:DispatchSettings",
    "edge": "scf.consumers.edge:EdgeSettings",
    "genn": "scf.producers.genn:GennSettings",
    "ingest": "scf.producers.ingest:IngestSettings",
    "ledger": "scf.consumers.ledger:LedgerSettings",
    "safety": "scf.consumers.safety:SafetySettings",
    "regiment": "scf.producers.regiment:RegimentSettings",
    "trust": "scf.bus.trust:TrustSettings",
    "worker": "scf.consumers.worker:WorkerSettings",
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
VAULT_DIRS = (
    "fossil_vault",
    "fossil_vault/quarantine",
    "energy_atlas",
    "model_zoo",
    "release_history",
    "proofs",
    "system_cache",
    "nats",
    "archive",
    "keys",
    "edge",
)


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    home: str
    nats_url: str | None = None
    port: int = DEFAULT_PORT
    host: str = "127.0.0.1"
    source: str = ""
    key: str | None = None
    sandbox: bool = False
    require_signed_control: bool = False
    log: str = "WARNING"
    artifacts_backend: str | None = None  # SCF_ARTIFACTS; None = `[artifacts] backend`
    raw: dict[str, Any] = {}

    # ------------------------------------------------------------------ derived paths
    @property
    def home_path(self) -> Path:
        return Path(self.home)

    @property
    def url(self) -> str:
        return self.nats_url or f"nats://{self.host}:{self.port}"

    @property
    def embedded(self) -> bool:
        return self.nats_url is None

    @property
    def emergency_lock(self) -> Path:
        return self.home_path / "EMERGENCY_LOCK"

    @property
    def keys_dir(self) -> Path:
        return self.home_path / "keys"

    @property
    def archive_dir(self) -> Path:
        return self.home_path / "archive"

    def path(self, *parts: str) -> Path:
        return self.home_path.joinpath(*parts)

    def section(self, name: str, type: type[T]) -> T:
        """Decode the `[name]` table of scf.toml into `type` (defaults when absent); a key
        that `type` does not have is refused with its name."""
        table = self.raw.get(name, {})
        known = {f.encode_name for f in msgspec.structs.fields(type)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigError(
                f"unknown key {unknown[0]!r} in [{name}] of {self.home_path / 'scf.toml'}: "
                f"remove it or use one of {', '.join(sorted(known)) or '(none)'}"
            )
        try:
            return msgspec.convert(table, type)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"[{name}] in {self.home_path / 'scf.toml'}: {exc}") from None

    def with_source(self, process: str) -> "Settings":
        if self.source:
            return self
        return msgspec.structs.replace(self, source=f"{process}@{socket.gethostname()}")


class _File(msgspec.Struct, kw_only=True):
    nats_url: str | None = None
    port: int | None = None
    host: str | None = None
    source: str | None = None
    key: str | None = None
    sandbox: bool | None = None
    require_signed_control: bool | None = None
    log: str | None = None


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def load(env: dict[str, str] | None = None, home: str | Path | None = None) -> Settings:
    env = dict(os.environ if env is None else env)
    home_path = Path(home or env.get("SCF_HOME") or "./.scf").expanduser().absolute()
    raw: dict[str, Any] = {}
    toml_path = home_path / "scf.toml"
    if toml_path.exists():
        try:
            raw = msgspec.toml.decode(toml_path.read_bytes())
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{toml_path} is not valid TOML ({exc}): fix or remove it") from None
    top = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    for name, value in raw.items():
        if isinstance(value, dict) and name not in SECTIONS:
            raise ConfigError(f"unknown section [{name}] in {toml_path}: remove it or use one of {', '.join(SECTIONS)}")
    known = {f.encode_name for f in msgspec.structs.fields(_File)}
    for key in top:
        if key not in known:
            raise ConfigError(f"unknown key {key!r} at the top of {toml_path}: remove it or use one of {', '.join(sorted(known))}")
    try:
        f = msgspec.convert(top, _File)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{toml_path}: {exc}") from None
    log_level = (env.get("SCF_LOG") or f.log or "WARNING").upper()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"log level {log_level.lower()!r} (SCF_LOG or `log` in {toml_path}) is not one of {', '.join(x.lower() for x in LOG_LEVELS)}")

    port_text = env.get("SCF_NATS_PORT")
    try:
        port = int(port_text) if port_text else (f.port or DEFAULT_PORT)
    except ValueError:
        raise ConfigError(f"SCF_NATS_PORT={port_text!r} is not a port number: set it to e.g. {DEFAULT_PORT}") from None
    return Settings(
        home=str(home_path),
        nats_url=env.get("NATS_URL") or f.nats_url,
        port=port,
        host=f.host or "127.0.0.1",
        source=env.get("SCF_SOURCE") or f.source or "",
        key=env.get("SCF_KEY") or f.key,
        sandbox=_flag(env["SCF_SANDBOX"]) if "SCF_SANDBOX" in env else bool(f.sandbox),
        require_signed_control=(
            _flag(env["SCF_REQUIRE_SIGNED_CONTROL"])
            if "SCF_REQUIRE_SIGNED_CONTROL" in env
            else bool(f.require_signed_control)
        ),
        log=log_level,
        artifacts_backend=env.get("SCF_ARTIFACTS") or None,
        raw=raw,
    )


def init_home(settings: Settings) -> list[Path]:
    """Create SCF_HOME with the vault layout; returns the directories created."""
    created = []
    for d in VAULT_DIRS:
        p = settings.path(d)
        if not p.exists():
            p.mkdir(parents=True, exist_ok=True)
            created.append(p)
    # the deployment's secret for effect ids (bus/ids.py keyed_id): created once, mode 0600;
    # every service host needs the same file (docs/control.md)
    from scf.bus.ids import ensure_id_key

    ensure_id_key(settings.keys_dir)
    return created
