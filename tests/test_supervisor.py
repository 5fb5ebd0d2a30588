"""`scf up`'s supervisor: real child processes, a SIGKILL, a visible restart, work completes."""

from __future__ import annotations

import asyncio
import os
import plistlib
import signal
import sys

import msgspec
import pytest

from scf.bus import events as ev
from scf.ops import services
from scf.ops.supervisor import ProcessSpec, Supervisor, default_processes, select
from tests.conftest import stream_count, wait_for

pytestmark = pytest.mark.anyio


async def test_a_killed_process_is_restarted_and_the_work_completes(bus, settings, tmp_path, monkeypatch):
    log = tmp_path / "handled.log"
    argv = (sys.executable, "-m", "tests.procs.effect_consumer", "--log", str(log), "--ack-wait", "2")
    procs = [ProcessSpec("effect", "effect", argv=argv), ProcessSpec("effect-2", "effect", argv=argv + ("--durable", "second"))]
    lines: list[str] = []
    sup = Supervisor(settings, procs, echo=lines.append, backoff_base=0.2)
    task = asyncio.create_task(sup.run())
    try:
        await wait_for(lambda: all(c.proc is not None for c in sup.children), 20, "both children started")
        await bus.publish_many([ev.IntentCreated.new(ev.Intent(intent_id=f"a{i}", kind="train", domain="d"), source="t") for i in range(20)])
        await wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 40, 30, "first batch handled by both")
        victim = sup.children[0].proc
        os.kill(victim.pid, signal.SIGKILL)
        await wait_for(lambda: any(l.startswith("restarted effect (restart #1") for l in lines), 20, "the restart")
        assert any(l.startswith("effect exited with code -9") for l in lines)
        kv = await bus.kv("scf_state")
        state = msgspec.json.decode((await kv.get("proc.effect")).value)
        assert state["restarts"] == 1 and state["last_exit"] == -9 and state["pid"] != victim.pid
        await bus.publish_many([ev.IntentCreated.new(ev.Intent(intent_id=f"b{i}", kind="train", domain="d"), source="t") for i in range(20)])

        async def all_done() -> bool:
            a = await bus.js.consumer_info("INTENTS", "effect")
            b = await bus.js.consumer_info("INTENTS", "second")
            return a.num_pending == a.num_ack_pending == b.num_pending == b.num_ack_pending == 0
        await wait_for(all_done, 30, "every intent handled after the restart")
    finally:
        sup.stop_event.set()
        await asyncio.wait_for(task, 40)
    assert await stream_count(bus, "VERDICTS") == 40  # each effect once, whatever the kill
    assert lines[-1] == "stopped 2 processes"
    assert all(c.proc.poll() is not None for c in sup.children)


def test_only_and_except_pick_processes(settings):
    procs = default_processes(settings, edges=2)
    assert [p.name for p in select(procs, ["daemon", "safety"], None)] == ["daemon", "safety"]
    assert "worker" not in [p.name for p in select(procs, None, ["worker", "edge"])]
    assert not any(p.kind == "edge" for p in select(procs, None, ["edge"]))
    from scf.bus.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown process 'wrker': use one of"):
        select(procs, ["wrker"], None)


def test_service_files_run_each_process(settings, tmp_path):
    procs = select(default_processes(settings, edges=1), ["worker", "edge"], None)
    units = services.render(procs, settings, "systemd", tmp_path)
    assert [u.path.name for u in units] == ["scf-worker.service", "scf-edge-node-a.service"]
    assert "run worker --pool local" in units[0].text and f"Environment=SCF_HOME={settings.home}" in units[0].text
    plists = services.render(procs, settings, "launchd", tmp_path)
    data = plistlib.loads(plists[1].text.encode())
    assert data["Label"] == "io.scf.edge-node-a"
    assert data["ProgramArguments"][1:4] == ["run", "edge", "--node"]
    assert data["EnvironmentVariables"]["NATS_URL"] == settings.url
    written = services.install(units)
    assert all(p.exists() for p in written)
