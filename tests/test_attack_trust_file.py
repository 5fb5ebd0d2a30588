"""A host's keys/trusted.json must not decide what a production host trusts.

The tester's attack: whoever can write one host's `keys/trusted.json` (a stale copy, a
careless admin, a process that may write the keys directory) adds a node key of their own
there; every process of that host honoured it next to the signed, shared trust list, so the
ledger minted credits for a key no root ever granted. Now (`[trust] local_file = "auto"`,
the default) a host that pins a root key relies on the root-signed TRUST entries alone and
says once that it ignores the file; a host without a pinned root (development, the demo)
still honours it, and `local_file = true` restores the supplement on purpose. A real
nats-server and a real `scf run ledger`.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import pytest

from scf.bus import trust as tr
from scf.bus.settings import load as load_settings
from scf.bus.signing import SigningKey, TrustList
from tests.conftest import spawn, wait_for
from tests.test_ledger import measurement, publish_signed
from tests.test_trust_live import cli, ledger_consumer_exists, log_has, minted_for, rejected_with, stop

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]


def plant_local_key(keys_dir: Path, name: str) -> SigningKey:
    """The attack: a node key written into this host's trusted.json, never granted by a root."""
    key = SigningKey.generate(name)
    local = TrustList.load(keys_dir / "trusted.json")
    local.trust(key.public_b64, name, ["node"])
    local.save()
    return key


async def test_a_key_only_in_the_hosts_file_is_refused_by_a_running_ledger_on_a_rooted_host(bus, settings, scf_env, tmp_path):
    await cli("keys", "root", "new", "root", env=scf_env)  # a production host: it pins a root
    granted = SigningKey.generate("n1")
    await cli("keys", "trust", base64.b64encode(granted.public_raw).decode(), "--name", "n1", "--role", "node", env=scf_env)
    planted = plant_local_key(settings.keys_dir, "evil")
    log = tmp_path / "ledger.log"
    ledger = spawn([sys.executable, "-m", "scf.cli.main", "run", "ledger"], {**scf_env, "SCF_LOG": "INFO"}, log)
    try:
        await wait_for(lambda: ledger_consumer_exists(bus), 60, "the ledger's consumer")
        assert log_has(log, "trusted.json is ignored: this host pins root keys"), log.read_text()[-2000:]
        await publish_signed(bus, measurement("evil", 10.0, 2.5, hour=0), planted)
        await wait_for(lambda: rejected_with(bus, f"unknown signing key {planted.kid}"), 30, "the planted key's measurement refused")
        # the key a root granted still mints: the shared list is the authority, not nothing
        await publish_signed(bus, measurement("n1", 10.0, 7.5, hour=0), granted)
        await wait_for(lambda: minted_for(bus, "node:n1"), 30, "the granted key's measurement minted")
        assert await minted_for(bus, "node:evil") == 0
        assert ledger.poll() is None, log.read_text()[-2000:]
    finally:
        stop(ledger)


async def test_the_file_is_honoured_where_no_root_is_pinned_or_when_asked(bus, settings):
    """The development and demo path (no root pinned: the file is the whole list), and
    `[trust] local_file = true` on a rooted host (a supplement, on purpose)."""
    planted = plant_local_key(settings.keys_dir, "dev-node")
    sig = planted.sign(b"m")
    view = await tr.SharedTrust.open(bus, settings)
    try:
        assert view.verify(b"m", sig, planted.kid, "node") == "dev-node"
    finally:
        await view.stop()
    tr.pin_root(settings.keys_dir, SigningKey.generate("root").public_b64, "root")
    for toml, honoured in (("", False), ('[trust]\nlocal_file = "auto"\n', False), ("[trust]\nlocal_file = true\n", True),
                           ("[trust]\nlocal_file = false\n", False)):
        (settings.home_path / "scf.toml").write_text(toml)
        view = await tr.SharedTrust.open(bus, load_settings(home=settings.home, env={"NATS_URL": settings.nats_url}))
        try:
            assert (planted.kid in view.keys) is honoured, toml
        finally:
            await view.stop()
