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


def test_unknown_keys_and_sections_are_refused_with_their_names(tmp_path):
    (tmp_path / "scf.toml").write_text("[ledger]\nrat = 2.0\n")
    with pytest.raises(ConfigError, match=r"unknown key 'rat' in \[ledger\] of .*scf.toml: remove it or use one of issuer, rate"):
        load(env={"SCF_HOME": str(tmp_path)}).section("ledger", LedgerSettings)
    (tmp_path / "scf.toml").write_text("prot = 5000\n")
    with pytest.raises(ConfigError, match=r"unknown key 'prot' at the top of .*scf.toml: remove it or use one of .*port"):
        load(env={"SCF_HOME": str(tmp_path)})
    (tmp_path / "scf.toml").write_text("[leger]\nrate = 2.0\n")
    with pytest.raises(ConfigError, match=r"unknown section \[leger\] in .*scf.toml: remove it or use one of .*ledger"):
        load(env={"SCF_HOME": str(tmp_path)})


def test_log_level_and_artifact_backend_go_through_settings(tmp_path):
    assert load(env={}, home=tmp_path).log == "WARNING"
    (tmp_path / "scf.toml").write_text('log = "info"\n')
    assert load(env={"SCF_HOME": str(tmp_path)}).log == "INFO"
    s = load(env={"SCF_HOME": str(tmp_path), "SCF_LOG": "debug", "SCF_ARTIFACTS": "dir"})
    assert s.log == "DEBUG" and s.artifacts_backend == "dir"
    with pytest.raises(ConfigError, match=r"log level 'loud' .* is not one of debug, info"):
        load(env={"SCF_HOME": str(tmp_path), "SCF_LOG": "loud"})


def test_a_process_refuses_a_misspelt_setting_before_it_starts(tmp_path):
    """The ledger's table has a typo: `scf run ledger` stops with the key's name instead of
    running with the default rate."""
    from typer.testing import CliRunner

    from scf.cli.main import app

    (tmp_path / "scf.toml").write_text("[ledger]\nrat = 2.0\n")
    result = CliRunner().invoke(app, ["run", "ledger"], env={"SCF_HOME": str(tmp_path), "NATS_URL": "nats://127.0.0.1:1"})
    assert result.exit_code == 1
    assert "unknown key 'rat' in [ledger]" in result.output


def test_every_section_names_the_struct_its_subsystem_decodes():
    import importlib

    from scf.bus.settings import SECTIONS

    for name, target in SECTIONS.items():
        module, _, struct = target.partition(":")
        cls = getattr(importlib.import_module(module), struct)
        assert issubclass(cls, msgspec.Struct), name
