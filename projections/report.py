"""The value report: what the loop delivered, from the archive's views.

`build(archive, out, since=, until=)` writes `report.md` and `report.html` (self-contained:
plotly.js is inlined, the page works offline) with:

* energy saved (baseline − actual kWh, from `energy.measured`) by node, by domain, by week;
* the stability score (docs/views.md, "Stability score"), per node and overall:
      stability = 100 × clean_share / (1 + cv)
  where clean_share is the share of deployments that reached an outcome and were activated
  and never rolled back, and cv is the coefficient of variation (stddev / mean) of the
  energy saved per measured period after deployment (0 with fewer than two periods);
* verdict rates (approve / reject / hold) by what was ruled on, and the rollback rate;
* training jobs per week by outcome, and checkpoint metrics over time.

An archive with no events in the period gives a report that says so, not an error.
"""

from __future__ import annotations

import datetime as dt
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scf.projections import views
from scf.projections.store import ArchiveStore


@dataclass
class ValueReport:
    markdown: Path
    html: Path
    empty: bool
    summary: dict[str, Any]

    def lines(self) -> list[str]:
        if self.empty:
            return [f"no data yet: wrote {self.markdown} and {self.html}"]
        s = self.summary
        return [
            f"wrote {self.markdown} and {self.html}",
            f"  energy saved {saved_line(s['saved_by_unit'], bold=False, digits=1)} over {s['measurements']} measurements; "
            f"stability {s['stability']:.1f}; rollback rate {_pct(s['rollback_rate'])}",
        ]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _num(x: Any, digits: int = 1) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}"


def _range_sql(column: str, since: dt.datetime | None, until: dt.datetime | None) -> str:
    parts = []
    if since:
        parts.append(f"{column} >= TIMESTAMPTZ '{since.isoformat()}'")
    if until:
        parts.append(f"{column} < TIMESTAMPTZ '{until.isoformat()}'")
    return " AND ".join(parts) or "true"


def _rows(con, sql: str) -> list[dict[str, Any]]:
    return views.rows(con.sql(sql))


def collect(con, since: dt.datetime | None = None, until: dt.datetime | None = None) -> dict[str, Any]:
    """Every number and series of the report, from an open views connection."""
    ev_range = _range_sql("event_at", since, until)
    d: dict[str, Any] = {}
    d["events"] = con.sql(f"SELECT count(*) FROM events WHERE event_at IS NOT NULL AND {ev_range}").fetchall()[0][0]
    e_range = _range_sql("period_start", since, until)
    d["energy_by_week"] = _rows(con, f"""
        SELECT date_trunc('week', period_start)::DATE AS week, domain, unit, sum(saved_kwh) AS saved_kwh,
               sum(baseline_kwh) AS baseline_kwh, count(*) AS measurements
        FROM energy WHERE {e_range} GROUP BY ALL ORDER BY week, domain""")
    d["energy_by_node"] = _rows(con, f"""
        SELECT node, unit, sum(saved_kwh) AS saved_kwh, sum(baseline_kwh) AS baseline_kwh,
               100 * sum(saved_kwh) / nullif(sum(baseline_kwh), 0) AS saved_pct, count(*) AS measurements
        FROM energy WHERE {e_range} GROUP BY ALL ORDER BY saved_kwh DESC, node""")
    d["energy_by_domain"] = _rows(con, f"""
        SELECT domain, unit, sum(saved_kwh) AS saved_kwh, sum(baseline_kwh) AS baseline_kwh,
               100 * sum(saved_kwh) / nullif(sum(baseline_kwh), 0) AS saved_pct, count(*) AS measurements
        FROM energy WHERE {e_range} GROUP BY ALL ORDER BY saved_kwh DESC, domain""")
    # M&V (docs/mv.md): each measured period with the deployed checkpoint, the saving's
    # stated uncertainty and the baseline's calibration, read from the event's payload
    d["mv"] = _rows(con, f"""
        WITH m AS (
            SELECT event_id, from_json(payload, '{{"uncertainty_kwh": "DOUBLE", "confidence": "DOUBLE",
                "calibration": {{"interval": "VARCHAR", "points": "BIGINT", "cv_rmse": "DOUBLE", "nmbe": "DOUBLE"}}}}') AS j
            FROM unique_events WHERE stream = 'DEPLOY' AND type = 'energy.measured'
        )
        SELECT e.node, coalesce(dp.checkpoint_id, '') AS checkpoint_id, e.period_start, e.saved_kwh, e.baseline_kwh,
               m.j.uncertainty_kwh AS uncertainty_kwh, m.j.confidence AS confidence, m.j.calibration.cv_rmse AS cv_rmse,
               m.j.calibration.nmbe AS nmbe, m.j.calibration.points AS points, e.method
        FROM energy e JOIN m USING (event_id)
        LEFT JOIN (SELECT deployment_id, any_value(checkpoint_id) AS checkpoint_id FROM deployments GROUP BY ALL) dp USING (deployment_id)
        WHERE {e_range} ORDER BY e.node, e.period_start""")
    d_range = _range_sql("requested_at", since, until)
    stability_sql = f"""
        WITH dep AS (
            SELECT * FROM deployments WHERE {d_range}
        ),
        outcomes AS (
            SELECT {{key}} AS key,
                count(*) FILTER (WHERE status <> 'requested') AS decided,
                count(*) FILTER (WHERE status = 'active') AS clean,
                count(*) FILTER (WHERE activated_at IS NOT NULL) AS activated,
                count(*) FILTER (WHERE status = 'rolled_back') AS rolled_back,
                count(*) FILTER (WHERE status = 'failed') AS failed
            FROM dep GROUP BY ALL
        ),
        post AS (
            SELECT {{key_e}} AS key, avg(e.saved_kwh) AS mean_saved, stddev_samp(e.saved_kwh) AS sd_saved, count(*) AS periods
            FROM energy e JOIN dep d USING (deployment_id)
            WHERE e.period_start >= d.activated_at GROUP BY ALL
        )
        SELECT o.key, o.decided, o.clean, o.activated, o.rolled_back, o.failed,
            o.clean / nullif(o.decided, 0) AS clean_share,
            o.rolled_back / nullif(o.activated, 0) AS rollback_rate,
            CASE WHEN p.periods >= 2 AND p.mean_saved > 0 THEN p.sd_saved / p.mean_saved ELSE 0 END AS cv,
            coalesce(p.periods, 0) AS periods,
            100 * (o.clean / nullif(o.decided, 0))
                / (1 + CASE WHEN p.periods >= 2 AND p.mean_saved > 0 THEN p.sd_saved / p.mean_saved ELSE 0 END) AS stability
        FROM outcomes o LEFT JOIN post p USING (key) ORDER BY o.key"""
    d["stability_by_node"] = _rows(con, stability_sql.format(key="node", key_e="d.node"))
    overall = _rows(con, stability_sql.format(key="'all'", key_e="'all'"))
    d["stability"] = overall[0] if overall else None
    v_range = _range_sql("ruled_at", since, until)
    d["verdicts"] = _rows(con, f"""
        SELECT subject_type, count(*) AS verdicts,
            count(*) FILTER (WHERE decision = 'APPROVE') AS approve,
            count(*) FILTER (WHERE decision = 'REJECT') AS reject,
            count(*) FILTER (WHERE decision = 'HOLD') AS hold,
            count(*) FILTER (WHERE decision = 'APPROVE') / count(*) AS approve_rate,
            count(*) FILTER (WHERE decision = 'REJECT') / count(*) AS reject_rate,
            count(*) FILTER (WHERE decision = 'HOLD') / count(*) AS hold_rate
        FROM verdicts WHERE {v_range} GROUP BY ALL ORDER BY subject_type""")
    d["deployments_by_week"] = _rows(con, f"""
        SELECT date_trunc('week', requested_at)::DATE AS week, status, count(*) AS deployments
        FROM deployments WHERE {d_range} GROUP BY ALL ORDER BY week, status""")
    j_range = _range_sql("coalesce(dispatched_at, started_at)", since, until)
    d["jobs_by_week"] = _rows(con, f"""
        SELECT date_trunc('week', coalesce(dispatched_at, started_at))::DATE AS week, status, count(*) AS jobs,
            avg(duration_s) AS mean_duration_s
        FROM jobs WHERE {j_range} GROUP BY ALL ORDER BY week, status""")
    c_range = _range_sql("produced_at", since, until)
    d["checkpoint_metrics"] = _rows(con, f"""
        SELECT produced_at, domain, status, checkpoint_id, key AS metric,
            TRY_CAST(json_extract(metrics, '$."' || key || '"') AS DOUBLE) AS value
        FROM (SELECT *, unnest(json_keys(metrics)) AS key FROM checkpoints
              WHERE produced_at IS NOT NULL AND metrics IS NOT NULL AND {c_range})
        ORDER BY produced_at, checkpoint_id, metric""")
    # What the daemon's verifier measured when it judged each checkpoint (the view's verified_* columns)
    d["checkpoints"] = _rows(con, f"""
        SELECT checkpoint_id, domain, status, alias, version, baseline_checkpoint_id, verified_feasible, verified_gap_median,
            verified_gap_p95, verified_savings_captured, verified_regret, baseline_regret, verified_heldout_dsm, rejection_reasons
        FROM checkpoints WHERE produced_at IS NOT NULL AND {c_range}
        ORDER BY produced_at DESC, checkpoint_id LIMIT {CHECKPOINT_ROWS}""")
    # Credits are the ledger's balances (cumulative, all time): the accounts credited for
    # verified savings, per unit (kWh of electricity, kWh of fuel: separate instruments, never
    # added together; docs/ledger.md "Units"). The issuing account's negative balance is their counterpart.
    d["credits"] = _rows(con, """
        SELECT account, unit, balance_micro, entries FROM balances WHERE balance_micro > 0 ORDER BY unit, account""")
    saved: dict[str, float] = {}  # unit → kWh saved: kWh of fuel and of electricity are not added
    for r in d["energy_by_node"]:
        saved[r["unit"]] = saved.get(r["unit"], 0.0) + float(r["saved_kwh"] or 0)
    st = d["stability"] or {}
    d["summary"] = {
        "events": d["events"],
        "saved_kwh": sum(saved.values()) if len(saved) <= 1 else None,  # one unit only
        "saved_by_unit": saved,
        "measurements": sum(r["measurements"] for r in d["energy_by_node"]),
        "stability": float(st.get("stability") or 0.0),
        "rollback_rate": st.get("rollback_rate"),
        "deployments": st.get("decided", 0),
        "jobs": sum(r["jobs"] for r in d["jobs_by_week"]),
        "verdicts": sum(r["verdicts"] for r in d["verdicts"]),
        "credits_micro": credits_by_unit(d["credits"]),
    }
    return d


UNIT_NAMES = {"kwh-electric": "kWh of electricity", "kwh-fuel": "kWh of fuel"}


def unit_name(unit: str) -> str:
    return UNIT_NAMES.get(unit, "kWh (unit unknown)")


def saved_line(by_unit: dict[str, float], bold: bool = True, digits: int | None = None) -> str:
    """'**6.3 kWh of electricity**; **165757.0 kWh of fuel**': each unit apart."""
    b = "**" if bold else ""
    fmt = (lambda v: f"{v:.{digits}f}") if digits is not None else _num  # noqa: E731
    return "; ".join(f"{b}{fmt(v)} {unit_name(u)}{b}" for u, v in sorted(by_unit.items())) or f"{b}0 kWh{b}"


def credits_by_unit(credits: list[dict[str, Any]]) -> dict[str, int]:
    """Unit → micro-credits credited in it (units are not added together)."""
    out: dict[str, int] = {}
    for r in credits:
        out[r["unit"]] = out.get(r["unit"], 0) + int(r["balance_micro"])
    return out


def _unit(unit: str) -> str:
    return unit or "(unit not recorded)"


def credits_line(by_unit: dict[str, int], bold: bool = True) -> str:
    """'6.35 kwh-electric; 1657.57 kwh-fuel' (each unit apart), '0.00' when nothing was minted."""
    b = "**" if bold else ""
    return "; ".join(f"{b}{v / 1e6:.2f}{b} {_unit(u)}" for u, v in sorted(by_unit.items())) or f"{b}0.00{b}"


CREDIT_HEADERS = ["account", "credits", "unit", "transfers"]


def credit_rows(credits: list[dict[str, Any]]) -> list[list[Any]]:
    return [[r["account"], f"{int(r['balance_micro']) / 1e6:.6f}", _unit(r["unit"]), r["entries"]] for r in credits]


def build(
    archive: str | Path,
    out: str | Path,
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    now: dt.datetime | None = None,
) -> ValueReport:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = now or dt.datetime.now(dt.timezone.utc)
    store = ArchiveStore(archive)
    period = _period(since, until)
    md_path, html_path = out / "report.md", out / "report.html"
    if not store.exists():
        data = None
    else:
        con = views.connect(store.root)
        try:
            data = collect(con, since, until)
        finally:
            con.close()
    if data is None or data["events"] == 0:
        where = f"the archive at {store.root}" if store.exists() else f"{store.root} (no archive yet)"
        msg = (f"No data yet: {where} holds no events{' in ' + period if since or until else ''}. "
               "Start the archive with `scf run archive` (or build it with `scf replay`), then run this report again.")
        md_path.write_text(f"# SCF value report\n\n_{period}; generated {now:%Y-%m-%d %H:%M} UTC_\n\n**{msg}**\n")
        html_path.write_text(_page("SCF value report", f"<p class='meta'>{html.escape(period)}; generated {now:%Y-%m-%d %H:%M} UTC</p>"
                                   f"<p class='empty'><strong>{html.escape(msg)}</strong></p>"))
        return ValueReport(md_path, html_path, True, {})
    md_path.write_text(_markdown(data, period, now))
    html_path.write_text(_html(data, period, now))
    return ValueReport(md_path, html_path, False, data["summary"])


def _period(since: dt.datetime | None, until: dt.datetime | None) -> str:
    if since and until:
        return f"from {since:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M} UTC"
    if since:
        return f"since {since:%Y-%m-%d %H:%M} UTC"
    if until:
        return f"until {until:%Y-%m-%d %H:%M} UTC"
    return "all time"


# --------------------------------------------------------------------------- Markdown


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    if not rows:
        out.append("| (none) |" + " |" * (len(headers) - 1))
    return out + [""]


def _markdown(d: dict[str, Any], period: str, now: dt.datetime) -> str:
    s = d["summary"]
    st = d["stability"] or {}
    lines = [
        "# SCF value report",
        "",
        f"_{period}; generated {now:%Y-%m-%d %H:%M} UTC; charts in report.html_",
        "",
        "## Summary",
        "",
        f"- energy saved: {saved_line(s['saved_by_unit'])} over {s['measurements']} measured periods",
        f"- stability score: **{_num(s['stability'])}** / 100 (clean deployments {_num(st.get('clean'))} of "
        f"{_num(st.get('decided'))}, variability cv {_num(st.get('cv'), 3)})",
        f"- rollback rate: **{_pct(s['rollback_rate'])}** of activated deployments",
        f"- verdicts: {s['verdicts']}; training jobs: {s['jobs']}; events in the period: {s['events']}",
        f"- credits minted (ledger balances, all time): {credits_line(s['credits_micro'])}"
        + (" (separate instruments: kWh of fuel and kWh of electricity are not added)" if len(s["credits_micro"]) > 1 else ""),
        "",
        "## Credits by account (ledger balances, all time)",
        "",
        *_table(CREDIT_HEADERS, credit_rows(d["credits"])),
        "## Energy saved by domain",
        "",
        *_table(["domain", "saved kWh", "baseline kWh", "unit", "saved %", "periods"],
                [[r["domain"] or "-", _num(r["saved_kwh"]), _num(r["baseline_kwh"]), unit_name(r["unit"]), _num(r["saved_pct"], 2),
                  r["measurements"]] for r in d["energy_by_domain"]]),
        "## Energy saved by node",
        "",
        *_table(["node", "saved kWh", "baseline kWh", "unit", "saved %", "periods"],
                [[r["node"], _num(r["saved_kwh"]), _num(r["baseline_kwh"]), unit_name(r["unit"]), _num(r["saved_pct"], 2), r["measurements"]]
                 for r in d["energy_by_node"]]),
        "## Savings by deployment (M&V)",
        "",
        "saved = the calibrated baseline (the status-quo controller simulated over the measured weather) − the metered "
        "energy; ± is ASHRAE Guideline 14's savings uncertainty at the stated confidence; CV(RMSE) and NMBE are the "
        "baseline's calibration to the site's history (Guideline 14: hourly ≤ 30 % and ±10 %). Readings without a "
        "calibration show n/a.",
        "",
        *_table(["node", "checkpoint", "period start", "saved kWh", "± kWh", "saved %", "CV(RMSE) %", "NMBE %", "method"],
                [[r["node"], r["checkpoint_id"] or "-", r["period_start"], _num(r["saved_kwh"], 2), _num(r["uncertainty_kwh"], 2),
                  _num(100 * r["saved_kwh"] / r["baseline_kwh"] if r["baseline_kwh"] else None, 1),
                  _num(100 * r["cv_rmse"] if r["cv_rmse"] is not None else None, 1),
                  _num(100 * r["nmbe"] if r["nmbe"] is not None else None, 1), r["method"]] for r in d["mv"]]),
        "## Energy saved by week",
        "",
        *_table(["week", "domain", "saved kWh", "unit", "periods"],
                [[r["week"], r["domain"] or "-", _num(r["saved_kwh"]), unit_name(r["unit"]), r["measurements"]] for r in d["energy_by_week"]]),
        "## Stability by node",
        "",
        "stability = 100 × clean share / (1 + cv): clean share = deployments activated and never rolled back, over "
        "deployments that reached an outcome; cv = stddev / mean of energy saved per period after activation.",
        "",
        *_table(["node", "stability", "clean / decided", "rolled back", "failed", "cv", "periods"],
                [[r["key"], _num(r["stability"]), f"{r['clean']} / {r['decided']}", r["rolled_back"], r["failed"], _num(r["cv"], 3), r["periods"]]
                 for r in d["stability_by_node"]]),
        "## Verdicts",
        "",
        *_table(["ruled on", "verdicts", "approve", "reject", "hold"],
                [[r["subject_type"], r["verdicts"], _pct(r["approve_rate"]), _pct(r["reject_rate"]), _pct(r["hold_rate"])] for r in d["verdicts"]]),
        "## Training jobs by week",
        "",
        *_table(["week", "status", "jobs", "mean duration s"],
                [[r["week"], r["status"], r["jobs"], _num(r["mean_duration_s"])] for r in d["jobs_by_week"]]),
    ]
    metrics = sorted({r["metric"] for r in d["checkpoint_metrics"]})
    if metrics:
        lines += ["## Checkpoint metrics", "", *_table(
            ["metric", "checkpoints", "first", "last", "best (min)"],
            [[m, len(v := [r["value"] for r in d["checkpoint_metrics"] if r["metric"] == m and r["value"] is not None]),
              _num(v[0], 4) if v else "n/a", _num(v[-1], 4) if v else "n/a", _num(min(v), 4) if v else "n/a"] for m in metrics])]
    decided = decision_rows(d["checkpoint_metrics"])
    if decided:
        lines += ["## Decision quality", "",
                  "Each checkpoint's decisions on held-out contexts, repaired to the domain's own check and measured against "
                  "the exact optimum (docs/optimise.md): feasible share, relative gap to the optimum (median, p95), and the "
                  "share of the achievable savings (observed state → optimum) captured.", "",
                  *_table(["checkpoint", "domain", "status", "feasible", "gap median", "gap p95", "savings captured"], decided)]
    if d["checkpoints"]:
        lines += ["## Checkpoints as verified", "",
                  f"The latest {CHECKPOINT_ROWS} checkpoints, newest first, with what the daemon's verifier measured when it judged "
                  "each one on held-out fossils (the `checkpoints` view's `verified_*` columns): its repaired decisions' feasible "
                  "share, gap to the exact optimum and savings captured, its regret beside the baseline's (production at the time) "
                  "on the same contexts, and held-out DSM for EBDMs.", "",
                  *_table(CHECKPOINT_HEADERS, checkpoint_rows(d["checkpoints"]))]
    return "\n".join(lines) + "\n"


CHECKPOINT_ROWS = 50  # the latest checkpoints listed in the report's checkpoint table
CHECKPOINT_HEADERS = ["checkpoint", "domain", "status", "feasible", "gap median", "gap p95", "savings captured", "regret",
                      "baseline regret", "held-out DSM"]


def checkpoint_rows(checkpoints: list[dict[str, Any]]) -> list[list[str]]:
    """The checkpoint table, newest first: each checkpoint's status (with the alias and
    version it was promoted to) and what the verifier measured on held-out fossils —
    decision quality (percentages to 0.001 %), the baseline's regret on the same contexts,
    held-out DSM; `n/a` where the verifier has no such number (an EBDM judged on DSM, a
    rejected checkpoint: its first reason instead)."""
    pct = lambda x: "n/a" if x is None else f"{100 * x:.3f} %"  # noqa: E731
    out = []
    for r in checkpoints:
        status = r["status"]
        if status == "promoted" and r["alias"]:
            status = f"promoted ({r['alias']} v{r['version']})"
        elif status == "rejected" and r["rejection_reasons"]:
            status = f"rejected: {r['rejection_reasons'][0]}"
        out.append([r["checkpoint_id"], r["domain"] or "-", status, pct(r["verified_feasible"]), pct(r["verified_gap_median"]),
                    pct(r["verified_gap_p95"]), pct(r["verified_savings_captured"]), pct(r["verified_regret"]),
                    pct(r["baseline_regret"]), "n/a" if r["verified_heldout_dsm"] is None else _num(r["verified_heldout_dsm"], 4)])
    return out


def decision_rows(checkpoint_metrics: list[dict[str, Any]]) -> list[list[str]]:
    """One row per checkpoint that carries decision metrics (`decision_*`, ml.optimize /
    ml.ebdm), in production order: id, domain, status, feasible, gap median, gap p95,
    savings captured (percentages to 0.001 %)."""
    by: dict[tuple[str, str, str], dict[str, float]] = {}
    for r in checkpoint_metrics:
        if r["metric"].startswith("decision_") and r["value"] is not None:
            by.setdefault((r["checkpoint_id"], r["domain"], r["status"]), {})[r["metric"]] = r["value"]
    fine = lambda x: "n/a" if x is None else f"{100 * x:.3f} %"  # noqa: E731
    return [[cid, dom or "-", st, fine(m.get("decision_feasible")), fine(m.get("decision_gap_median")),
             fine(m.get("decision_gap_p95")), fine(m.get("decision_savings_captured"))] for (cid, dom, st), m in by.items()]


# --------------------------------------------------------------------------- HTML


_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2rem auto; max-width: 1100px; color: #1d2733; }
h1 { margin-bottom: 0.2rem; } .meta { color: #5b6b7b; } .empty { font-size: 1.2rem; padding: 1rem; background: #f3f6f9; }
.cards { display: flex; gap: 1rem; flex-wrap: wrap; margin: 1rem 0 2rem; }
.card { background: #f3f6f9; border-radius: 8px; padding: 0.8rem 1.2rem; min-width: 12rem; }
.card b { display: block; font-size: 1.6rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; } td, th { padding: 0.25rem 0.8rem; border-bottom: 1px solid #dde3ea; text-align: right; }
td:first-child, th:first-child { text-align: left; }
"""


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def _html_table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body or '<tr><td>(none)</td></tr>'}</table>"


def _html(d: dict[str, Any], period: str, now: dt.datetime) -> str:
    import plotly.graph_objects as go

    s = d["summary"]
    figs: list[tuple[str, Any]] = []
    weeks = sorted({r["week"] for r in d["energy_by_week"]})
    series = sorted({(r["unit"], r["domain"]) for r in d["energy_by_week"]})
    mixed = len({u for u, _ in series}) > 1  # kWh of fuel and of electricity: side by side, never stacked
    if weeks:
        fig = go.Figure([
            go.Bar(name=f"{dom or '-'} ({unit_name(unit)})" if mixed else (dom or "-"), x=[str(w) for w in weeks],
                   y=[sum(r["saved_kwh"] for r in d["energy_by_week"] if r["week"] == w and (r["unit"], r["domain"]) == (unit, dom))
                      for w in weeks])
            for unit, dom in series
        ])
        one = unit_name(series[0][0]) if series and not mixed else "kWh of each domain's unit, not added across units"
        fig.update_layout(barmode="group" if mixed else "stack", title=f"Energy saved per week ({one}), by domain",
                          xaxis_title="week of", yaxis_title="kWh")
        fig.update_xaxes(type="category")  # weeks are categories: one week must not become a millisecond-wide time axis
        figs.append(("Energy saved by week", fig))
    if d["energy_by_node"]:
        fig = go.Figure(go.Bar(x=[f"{r['node']} ({unit_name(r['unit'])})" for r in d["energy_by_node"]],
                               y=[r["saved_kwh"] for r in d["energy_by_node"]]))
        fig.update_layout(title="Energy saved by node (kWh of its unit)", yaxis_title="kWh")
        figs.append(("Energy saved by node", fig))
    if d["stability_by_node"]:
        rows = d["stability_by_node"]
        fig = go.Figure(go.Bar(x=[r["key"] for r in rows], y=[r["stability"] or 0 for r in rows],
                               text=[f"{r['clean']}/{r['decided']} clean, cv {r['cv']:.2f}" for r in rows]))
        fig.update_layout(title="Stability score by node (0–100)", yaxis_range=[0, 100])
        figs.append(("Stability", fig))
    if d["deployments_by_week"]:
        dweeks = sorted({r["week"] for r in d["deployments_by_week"]})
        statuses = sorted({r["status"] for r in d["deployments_by_week"]})
        fig = go.Figure([
            go.Bar(name=st, x=[str(w) for w in dweeks],
                   y=[sum(r["deployments"] for r in d["deployments_by_week"] if r["week"] == w and r["status"] == st) for w in dweeks])
            for st in statuses
        ])
        fig.update_layout(barmode="stack", title="Deployments per week by outcome")
        fig.update_xaxes(type="category")
        figs.append(("Deployments and rollbacks", fig))
    if d["verdicts"]:
        v = d["verdicts"]
        fig = go.Figure([
            go.Bar(name=name, x=[r["subject_type"] for r in v], y=[100 * (r[key] or 0) for r in v])
            for name, key in (("approve", "approve_rate"), ("reject", "reject_rate"), ("hold", "hold_rate"))
        ])
        fig.update_layout(barmode="stack", title="Verdicts by what was ruled on (%)", yaxis_range=[0, 100])
        figs.append(("Verdict rates", fig))
    if d["jobs_by_week"]:
        jweeks = sorted({r["week"] for r in d["jobs_by_week"]})
        statuses = sorted({r["status"] for r in d["jobs_by_week"]})
        fig = go.Figure([
            go.Bar(name=st, x=[str(w) for w in jweeks],
                   y=[sum(r["jobs"] for r in d["jobs_by_week"] if r["week"] == w and r["status"] == st) for w in jweeks])
            for st in statuses
        ])
        fig.update_layout(barmode="stack", title="Training jobs per week by outcome")
        fig.update_xaxes(type="category")
        figs.append(("Training jobs", fig))
    if d["checkpoint_metrics"]:
        fig = go.Figure()
        for metric in sorted({r["metric"] for r in d["checkpoint_metrics"]}):
            pts = [r for r in d["checkpoint_metrics"] if r["metric"] == metric and r["value"] is not None]
            fig.add_trace(go.Scatter(x=[r["produced_at"] for r in pts], y=[r["value"] for r in pts], mode="lines+markers",
                                     name=metric, text=[f"{r['domain']} {r['status']}" for r in pts]))
        fig.update_layout(title="Checkpoint metrics over time", xaxis_title="produced at")
        figs.append(("Checkpoint metrics", fig))

    cards = "".join(f"<div class='card'>{html.escape(k)}<b>{html.escape(v)}</b></div>" for k, v in (
        ("energy saved", saved_line(s["saved_by_unit"], bold=False)),
        ("stability", f"{_num(s['stability'])} / 100"),
        ("rollback rate", _pct(s["rollback_rate"])),
        ("deployments", _num(s["deployments"])),
        ("verdicts", _num(s["verdicts"])),
        ("training jobs", _num(s["jobs"])),
        ("credits minted", credits_line(s["credits_micro"], bold=False)),
    ))
    parts = [f"<p class='meta'>{html.escape(period)}; generated {now:%Y-%m-%d %H:%M} UTC</p>", f"<div class='cards'>{cards}</div>"]
    for i, (title, fig) in enumerate(figs):
        fig.update_layout(template="plotly_white", height=380, margin=dict(l=50, r=20, t=50, b=40))
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0), config={"displaylogo": False}))
    parts.append("<h2>Stability by node</h2>")
    parts.append("<p>stability = 100 × clean share / (1 + cv): clean share = deployments activated and never rolled back, "
                 "over deployments that reached an outcome; cv = stddev / mean of energy saved per period after activation.</p>")
    parts.append(_html_table(["node", "stability", "clean / decided", "rolled back", "failed", "cv", "periods"],
                             [[r["key"], _num(r["stability"]), f"{r['clean']} / {r['decided']}", r["rolled_back"], r["failed"],
                               _num(r["cv"], 3), r["periods"]] for r in d["stability_by_node"]]))
    parts.append("<h2>Energy saved by domain</h2>")
    parts.append(_html_table(["domain", "saved kWh", "baseline kWh", "unit", "saved %", "periods"],
                             [[r["domain"] or "-", _num(r["saved_kwh"]), _num(r["baseline_kwh"]), unit_name(r["unit"]), _num(r["saved_pct"], 2),
                               r["measurements"]] for r in d["energy_by_domain"]]))
    parts.append("<h2>Credits by account (ledger balances, all time)</h2>")
    parts.append(_html_table(CREDIT_HEADERS, credit_rows(d["credits"])))
    if d["checkpoints"]:
        parts.append("<h2>Checkpoints as verified</h2>")
        parts.append(_html_table(CHECKPOINT_HEADERS, checkpoint_rows(d["checkpoints"])))
    parts.append("<h2>Verdicts</h2>")
    parts.append(_html_table(["ruled on", "verdicts", "approve", "reject", "hold"],
                             [[r["subject_type"], r["verdicts"], _pct(r["approve_rate"]), _pct(r["reject_rate"]), _pct(r["hold_rate"])]
                              for r in d["verdicts"]]))
    return _page("SCF value report", "\n".join(parts))
