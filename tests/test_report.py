"""The value report from real Parquet through DuckDB: numbers that match the views, a
self-contained HTML page with plotly charts, a clear "no data yet" on an empty archive."""

from __future__ import annotations

import datetime as dt
import os
import re

import pytest

from scf.projections import report, sample, views
from scf.projections.store import ArchiveStore
from tests.conftest import cli


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    store = ArchiveStore(tmp_path_factory.mktemp("report") / "archive")
    sample.write_archive(store, sample.history(cycles=200, seed=17))
    return store.root


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ, SCF_HOME=str(tmp_path / "home"))
    e.pop("NATS_URL", None)
    return e


def test_empty_archive_gives_a_clear_no_data_report(tmp_path, env):
    r = cli("report", "value", "--out", str(tmp_path / "out"), env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("no data yet: wrote ")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "**No data yet:" in md and "`scf run archive`" in md
    html = (tmp_path / "out" / "report.html").read_text()
    assert "No data yet:" in html and "<html" in html
    # an archive that exists but holds nothing says the same
    store = ArchiveStore(tmp_path / "home" / "archive")
    store.ensure()
    r = cli("report", "value", "--out", str(tmp_path / "out2"), env=env)
    assert r.returncode == 0 and "No data yet: the archive at" in (tmp_path / "out2" / "report.md").read_text()


def test_report_numbers_match_the_views(archive, tmp_path):
    r = report.build(archive, tmp_path / "out", now=dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc))
    assert not r.empty
    con = views.connect(archive)
    saved, n = con.sql("SELECT sum(saved_kwh), count(*) FROM energy").fetchall()[0]
    assert r.summary["saved_kwh"] == pytest.approx(saved)
    assert r.summary["measurements"] == n
    activated, rolled = con.sql(
        "SELECT count(*) FILTER (WHERE activated_at IS NOT NULL), count(*) FILTER (WHERE status = 'rolled_back') FROM deployments"
    ).fetchall()[0]
    assert r.summary["rollback_rate"] == pytest.approx(rolled / activated)
    clean, decided = con.sql(
        "SELECT count(*) FILTER (WHERE status = 'active'), count(*) FILTER (WHERE status <> 'requested') FROM deployments"
    ).fetchall()[0]
    assert 0 < r.summary["stability"] <= 100 * clean / decided
    md = r.markdown.read_text()
    for section in ("## Energy saved by domain", "## Energy saved by node", "## Energy saved by week", "## Stability by node",
                    "## Verdicts", "## Training jobs by week", "## Checkpoint metrics"):
        assert section in md
    assert f"{saved:,.1f} kWh" in md


def test_html_is_self_contained_with_plotly_charts(archive, tmp_path):
    r = report.build(archive, tmp_path / "out")
    html = r.html.read_text()
    assert html.count('class="plotly-graph-div"') >= 6
    assert "Plotly.newPlot" in html
    # plotly.js itself is inlined once; nothing is fetched from the network
    assert len(re.findall(r"plotly\.js v\d", html)) == 1 or html.count("window.PlotlyConfig") == 1
    assert not re.search(r"<script[^>]+src=", html)
    assert not re.search(r"<link[^>]+href=", html)
    # weeks are categories on the axis (a single week on a time axis was ticked in fractions of a millisecond)
    assert html.count('"type":"category"') >= 3


def test_since_until_filter_the_period(archive, tmp_path, env):
    r = cli("report", "value", "--archive", str(archive), "--out", str(tmp_path / "a"), "--since", "2026-10-01", "--until", "2026-10-15", env=env)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "a" / "report.md").read_text()
    weeks = re.findall(r"^\| (2026-\d\d-\d\d) \|", md, re.M)
    assert weeks and all("2026-09-28" <= w <= "2026-10-12" for w in weeks)
    assert "from 2026-10-01 00:00 to 2026-10-15 00:00 UTC" in md
    r = cli("report", "value", "--archive", str(archive), "--out", str(tmp_path / "b"), "--since", "2030-01-01", env=env)
    assert r.returncode == 0 and r.stdout.startswith("no data yet")
    r = cli("report", "value", "--archive", str(archive), "--out", str(tmp_path / "c"), "--since", "2026-10-15", "--until", "2026-10-01", env=env)
    assert r.returncode == 1 and r.stderr.strip() == "Error: --until 2026-10-01 is not after --since 2026-10-15"
