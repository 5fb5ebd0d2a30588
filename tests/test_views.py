"""The DuckDB views over real Parquet: keys unique and non-null in every view, the docs true
to the views, empty archives, upcasting in SQL, the books balance, `scf query` formats."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from scf.bus.headers import MSG_ID, SCF_REDRIVE_FOR
from scf.projections import sample, views
from scf.projections.store import ArchiveStore, RawMessage, messages_table
from tests.conftest import ROOT, cli

DOCS = ROOT / "docs" / "views.md"
EXPECTED = ("events", "unique_events", "fossils", "intents", "code", "verdicts", "jobs", "checkpoints",
            "gear_changes", "deployments", "energy", "ledger", "balances", "cfr")


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """A generated history with every event type, plus a redriven copy and plain commands."""
    store = ArchiveStore(tmp_path_factory.mktemp("views") / "archive")
    items = list(sample.history(cycles=240, seed=21))
    seqs = sample.write_archive(store, items)
    # A DLQ redrive stores an event a second time (same envelope, new Nats-Msg-Id): typed
    # views must count it once.
    first_transfer = next(i for i in items if not isinstance(i, sample.Plain) and i.type_name() == "ledger.transfer")
    copy = RawMessage(seqs["LEDGER"] + 1, 1_795_400_000_000_000_000, first_transfer.subject(), sample.body_of(first_transfer),
                      {MSG_ID: f"{first_transfer.id}:redrive:1", SCF_REDRIVE_FOR: "ledger"})
    store.append("LEDGER", messages_table([copy]))
    views.write_database(store.root)
    return store.root


@pytest.fixture(scope="module")
def con(archive):
    c = views.connect(archive)
    yield c
    c.close()


def test_the_views_are_the_documented_list():
    assert tuple(v.name for v in views.load()) == EXPECTED
    for v in views.load():
        assert v.key, f"{v.name}.sql has no '-- key:' header"
        assert v.description, f"{v.name}.sql has no description"


@pytest.mark.parametrize("name", EXPECTED)
def test_keys_are_unique_and_non_null(con, name):
    view = next(v for v in views.load() if v.name == name)
    key = ", ".join(view.key)
    total = con.sql(f"SELECT count(*) FROM {name}").fetchall()[0][0]
    assert total > 0, f"{name} is empty on the sample history"
    nulls = con.sql(f"SELECT count(*) FROM {name} WHERE " + " OR ".join(f"{k} IS NULL" for k in view.key)).fetchall()[0][0]
    dupes = con.sql(f"SELECT count(*) FROM (SELECT {key} FROM {name} GROUP BY ALL HAVING count(*) > 1)").fetchall()[0][0]
    assert (nulls, dupes) == (0, 0), f"{name}: {nulls} null keys, {dupes} duplicated keys"


def _documented() -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in DOCS.read_text().splitlines():
        m = re.match(r"^## `(\w+)`\s*$", line)
        if m:
            current = m.group(1)
            out[current] = []
            continue
        m = re.match(r"^\| `(\w+)` \| ([A-Z][A-Z0-9 \[\]]*) \|", line)
        if m and current:
            out[current].append((m.group(1), m.group(2).strip()))
    return out


def test_docs_describe_every_column_of_every_view(con):
    documented = _documented()
    assert list(documented) == list(EXPECTED)
    for name in EXPECTED:
        actual = [(r[0], r[1]) for r in con.sql(f"DESCRIBE {name}").fetchall()]
        assert documented[name] == actual, f"docs/views.md is out of date for {name}"


def test_views_work_on_an_empty_archive(tmp_path):
    store = ArchiveStore(tmp_path / "archive")
    store.ensure()
    c = views.connect(store.root)
    for name in EXPECTED:
        assert c.sql(f"SELECT count(*) FROM {name}").fetchall()[0][0] == 0


def test_events_hold_every_message_and_the_redrive_copy(con):
    n = con.sql("SELECT count(*) FROM events WHERE stream = 'LEDGER'").fetchall()[0][0]
    transfers = con.sql("SELECT count(*) FROM ledger").fetchall()[0][0]
    assert n == transfers + 1  # the copy is in the log, counted once in the view
    once = con.sql("SELECT count(*) FROM unique_events WHERE stream = 'LEDGER'").fetchall()[0][0]
    assert once == transfers  # the one home of "stored twice counts once"
    plain = con.sql("SELECT count(*) FROM events WHERE event_id IS NULL").fetchall()[0][0]
    assert plain > 0 and con.sql("SELECT count(*) FROM unique_events").fetchall()[0][0] == (
        con.sql("SELECT count(DISTINCT (stream, event_id)) FROM events WHERE event_id IS NOT NULL").fetchall()[0][0]
    )


def test_gear_changes_upcast_v1_in_sql(con):
    rows = views.rows(con.sql("SELECT v, from_gear, to_gear, changed_by FROM gear_changes ORDER BY seq LIMIT 2"))
    assert rows[0] == {"v": 1, "from_gear": None, "to_gear": "STANDARD", "changed_by": "bootstrap"}
    assert rows[1]["v"] == 2 and rows[1]["from_gear"] == "STANDARD"


def test_books_balance(con):
    total, accounts = con.sql("SELECT sum(balance_micro), count(*) FROM balances").fetchall()[0]
    assert total == 0 and accounts == 4
    # balances agree with the ledger view, leg by leg
    issued = con.sql("SELECT sum(micro_credits) FROM ledger").fetchall()[0][0]
    issuance = con.sql("SELECT balance_micro FROM balances WHERE account = 'issuance:negentropy'").fetchall()[0][0]
    assert issuance == -issued


def test_cfr_joins_intent_code_and_ruling(con):
    rows = views.rows(con.sql("SELECT c.*, i.kind AS ikind FROM cfr c JOIN intents i USING (intent_id) LIMIT 50"))
    assert rows and all(r["kind"] == r["ikind"] == "codegen" for r in rows)
    decisions = {r[0] for r in con.sql("SELECT DISTINCT decision FROM cfr").fetchall()}
    assert decisions == {"APPROVE", "REJECT"}
    rejected = views.rows(con.sql("SELECT reasons, gate FROM cfr WHERE decision = 'REJECT' LIMIT 1"))[0]
    assert rejected == {"reasons": ["network call: os.system"], "gate": "ethics"}


def test_statuses_of_the_lifecycle_views(con):
    assert {r[0] for r in con.sql("SELECT DISTINCT status FROM deployments").fetchall()} == {"active", "failed", "rolled_back"}
    assert {r[0] for r in con.sql("SELECT DISTINCT status FROM jobs").fetchall()} == {"completed", "failed"}
    assert {r[0] for r in con.sql("SELECT DISTINCT status FROM checkpoints").fetchall()} == {"promoted", "rejected"}
    # every rolled-back deployment had been activated, and points back to a checkpoint
    bad = con.sql("SELECT count(*) FROM deployments WHERE status = 'rolled_back' AND (activated_at IS NULL OR rolled_back_to IS NULL)").fetchall()
    assert bad[0][0] == 0


def test_the_duckdb_file_carries_the_views_and_their_descriptions(archive):
    import duckdb

    with duckdb.connect(str(archive / "scf.duckdb"), read_only=True, config={"file_search_path": str(archive)}) as c:
        names = [r[0] for r in c.execute("SELECT name FROM scf_views ORDER BY name").fetchall()]
        assert names == sorted(EXPECTED)
        comments = dict(c.execute("SELECT view_name, comment FROM duckdb_views() WHERE NOT internal").fetchall())
        assert comments["balances"].startswith("One row per ledger account")
        assert c.execute("SELECT count(*) FROM events").fetchall()[0][0] > 3000


def test_scf_query_formats(archive, tmp_path):
    env = dict(os.environ, SCF_HOME=str(tmp_path / "home"))
    sql = "SELECT account, balance_micro FROM balances ORDER BY account"
    table = cli("query", "--archive", str(archive), sql, env=env)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["account", "balance_micro"] and lines[-1] == "(4 rows)"
    out = cli("query", "--archive", str(archive), sql, "--format", "csv", env=env)
    rows = list(csv.reader(io.StringIO(out.stdout)))
    assert rows[0] == ["account", "balance_micro"] and len(rows) == 5
    out = cli("query", "--archive", str(archive), "SELECT intent_id, params, created_at FROM intents ORDER BY seq LIMIT 2", "--format", "json", env=env)
    first = json.loads(out.stdout.splitlines()[0])
    assert set(first) == {"intent_id", "params", "created_at"} and json.loads(first["params"])["objective"] == "energy"
    sqlfile = tmp_path / "q.sql"
    sqlfile.write_text("-- the ruled code\nSELECT proposal_id, decision FROM cfr;\n")
    target = tmp_path / "cfr.parquet"
    out = cli("query", "--archive", str(archive), "--file", str(sqlfile), "--format", "parquet", "--out", str(target), env=env)
    assert out.returncode == 0, out.stderr
    assert pq.read_table(target).column_names == ["proposal_id", "decision"]
    assert out.stderr.strip().startswith("wrote ") and out.stderr.strip().endswith(f"rows to {target}")
    bad = cli("query", "--archive", str(archive), sql, "--format", "parquet", env=env)
    assert bad.returncode == 1 and bad.stderr.strip() == "Error: --format parquet needs --out FILE.parquet"
    both = cli("query", "--archive", str(archive), sql, "--file", str(sqlfile), env=env)
    assert both.stderr.strip() == "Error: give the SQL as an argument or with --file F.sql (one of the two)"
