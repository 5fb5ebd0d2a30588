"""Settings: environment over scf.toml over defaults, decoded once; sections per subsystem."""

from __future__ import annotations

import msgspec
import pytest

from scf.bus.errors import ConfigError
from scf.bus.settings import DEFAULT_PORT, init_home, load


class LedgerSettings(msgspec.Struct, frozen=True):
    rate: float = 1.0
    issuer: str = "issuer:negentropy"


def test_defaults(tmp_path):
    s = load(env={}, home=tmp_path)
    assert s.port == DEFAULT_PORT and s.embedded and s.url == f"nats://127.0.0.1:{DEFAULT_PORT}"
    assert s.emergency_lock == tmp_path / "EMERGENCY_LOCK"
    assert s.section("ledger", LedgerSettings) == LedgerSettings()


def test_toml_then_environment(tmp_path):
    (tmp_path / "scf.toml").write_text('port = 5000\nsandbox = true\n[ledger]\nrate = 0.25\n')
    s = load(env={"SCF_HOME": str(tmp_path)})
    assert s.port == 5000 and s.sandbox and s.section("ledger", LedgerSettings).rate == 0.25
    s = load(env={"SCF_HOME": str(tmp_path), "SCF_NATS_PORT": "6000", "SCF_SANDBOX": "0", "NATS_URL": "nats://h:1"})
    assert s.port == 6000 and not s.sandbox and not s.embedded and s.url == "nats://h:1"


def test_bad_input_is_one_clear_line(tmp_path):
    (tmp_path / "scf.toml").write_text("port = [\n")
    with pytest.raises(ConfigError, match=r"scf.toml is not valid TOML .*: fix or remove it"):
        load(env={"SCF_HOME": str(tmp_path)})
    (tmp_path / "scf.toml").write_text('[ledger]\nrate = "high"\n')
    with pytest.raises(ConfigError, match=r"\[ledger\] in .*scf.toml: Expected `float`, got `str` - at `\$.rate`"):
        load(env={"SCF_HOME": str(tmp_path)}).section("ledger", LedgerSettings)
    with pytest.raises(ConfigError, match="SCF_NATS_PORT='x' is not a port number"):
        load(env={"SCF_HOME": str(tmp_path), "SCF_NATS_PORT": "x"})


def test_init_creates_the_vault_layout(tmp_path):
    s = load(env={}, home=tmp_path / "h")
    created = init_home(s)
    for d in ("fossil_vault", "energy_atlas", "model_zoo", "release_history", "proofs", "system_cache", "nats", "archive"):
        assert (tmp_path / "h" / d).is_dir()
    assert len(created) > 8 and init_home(s) == []
