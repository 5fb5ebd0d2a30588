"""A contract's value report: `scf report value --contract ID` (docs/value-loop.md).

Built from the contract's strike proofs (each checked against the release keys before it
is read: a proof that does not verify is listed as such and counts for nothing) and the
log's deployment history of its nodes. Writes `<out>/<contract>.md`, `.html` (light:
static SVG charts drawn by matplotlib, inline; no script) and `.pdf` (fpdf2, the same
charts as images) with:

* energy saved: the sum over the measured M&V periods (IPMVP Option D: the calibrated
  baseline simulated over the period's measured conditions, minus the metered energy),
  with its uncertainty at the stated confidence (root sum of squares of the periods');
* the stability score from the simulator's metrics of the capsules' runs: 100 / (1 + the
  mean comfort deviation in K over occupied steps), with the worst deviation beside it;
* every strike (status, capsule, model, certified cost and gap, saved kWh), the verdicts
  its proof names, and the nodes' rollbacks and failures from the log;
* charts: saved kWh per M&V period with its uncertainty, and baseline against metered
  energy per period (periods are categories on the axis).
"""

from __future__ import annotations

import datetime as dt
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ContractReport:
    markdown: Path
    html: Path
    pdf: Path
    summary: dict[str, Any]
    invalid: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        s = self.summary
        unc = "n/a" if s["uncertainty_kwh"] is None else f"{s['uncertainty_kwh']:.1f}"
        out = [f"wrote {self.markdown}, {self.html} and {self.pdf}",
               f"  {s['strikes']} strikes; energy saved {s['saved_kwh']:.1f} ± {unc} kWh over {s['periods']} periods; "
               f"stability {_fmt(s['stability'])}; {s['rollbacks']} rollbacks"]
        out += [f"  not counted: {x}" for x in self.invalid]
        return out


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def load_proofs(directory: Path, contract_id: str, trust) -> tuple[list[dict], list[str]]:
    """The verified proofs of `contract_id` under `directory` (oldest first), and a line for
    each proof of it that does not verify."""
    from scf.producers.strike import ProofInvalid, verify_proof

    good, bad = [], []
    for path in sorted(Path(directory).glob("*/proof.json")):
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            bad.append(f"{path}: not JSON")
            continue
        if not isinstance(raw, dict) or raw.get("contract_id") != contract_id:
            continue
        try:
            body = verify_proof(raw, trust)
        except ProofInvalid as exc:
            bad.append(f"{path}: {exc}")
            continue
        body["_mtime"] = path.stat().st_mtime
        good.append(body)
    good.sort(key=lambda b: b["_mtime"])
    return good, bad


def summarise(proofs: list[dict], history: list[dict]) -> dict[str, Any]:
    periods = [p for b in proofs for p in (b.get("mv") or {}).get("periods", [])]
    saved = sum(p["saved_kwh"] for p in periods)
    uncs = [p["uncertainty_kwh"] for p in periods if p.get("uncertainty_kwh") is not None]
    stab = [(b.get("mv") or {}).get("stability") for b in proofs]
    stab = [s for s in stab if s]
    mean_dev = sum(s["comfort_mean_dev_k"] for s in stab) / len(stab) if stab else None
    return {
        "strikes": len(proofs),
        "statuses": {s: sum(1 for b in proofs if b["status"] == s) for s in sorted({b["status"] for b in proofs})},
        "periods": len(periods),
        "saved_kwh": float(saved),
        "uncertainty_kwh": math.sqrt(sum(u * u for u in uncs)) if uncs and len(uncs) == len(periods) else None,
        "confidence": periods[0].get("confidence") if periods else None,
        "stability": None if mean_dev is None else 100.0 / (1.0 + mean_dev),
        "comfort_mean_dev_k": mean_dev,
        "comfort_max_dev_k": max((s["comfort_max_dev_k"] for s in stab), default=None),
        "reverts": sum(len((b.get("mv") or {}).get("reverts", [])) for b in proofs),
        "rollbacks": sum(1 for h in history if h["type"] == "deploy.rolled_back"),
        "period_rows": periods,
    }


# --------------------------------------------------------------------------- charts


def charts(periods: list[dict]) -> list[tuple[str, bytes, bytes]]:
    """(title, SVG, PNG) per chart; none without measured periods."""
    if not periods:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{p['period_start'][:10]}\n{p['period_start'][11:16]}–{p['period_end'][11:16]}" for p in periods]
    x = list(range(len(periods)))
    out = []
    fig, ax = plt.subplots(figsize=(7, 3.2))
    err = [p["uncertainty_kwh"] or 0.0 for p in periods]
    ax.bar(x, [p["saved_kwh"] for p in periods], yerr=err, capsize=4, color="#2a9d8f")
    ax.axhline(0, color="#444", linewidth=0.8)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("kWh saved")
    ax.set_title("Energy saved per M&V period (error bars: uncertainty at the stated confidence)", fontsize=9)
    out.append(("Energy saved per period", *_render(fig)))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    w = 0.4
    ax.bar([i - w / 2 for i in x], [p["baseline_kwh"] for p in periods], w, label="baseline (calibrated)", color="#adb5bd")
    ax.bar([i + w / 2 for i in x], [p["actual_kwh"] for p in periods], w, label="metered", color="#264653")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("kWh")
    ax.legend(fontsize=7)
    ax.set_title("Baseline against metered energy per period", fontsize=9)
    out.append(("Baseline and metered energy", *_render(fig)))
    return out


def _render(fig) -> tuple[bytes, bytes]:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    svg, png = io.BytesIO(), io.BytesIO()
    fig.savefig(svg, format="svg", metadata={"Date": None})
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return svg.getvalue(), png.getvalue()


# --------------------------------------------------------------------------- documents


def _strike_rows(proofs: list[dict]) -> list[list[str]]:
    rows = []
    for b in proofs:
        periods = (b.get("mv") or {}).get("periods", [])
        cap = b.get("capsule") or {}
        d = b["decision"]
        rows.append([b["activity_id"][:8], b["status"], f"v{cap.get('version', '-')}", b["inputs"].get("model") or "-",
                     _fmt(d["cost"], 2), f"{d['rel_gap']:.1e}", _fmt(sum(p["saved_kwh"] for p in periods), 2) if periods else "-",
                     "; ".join((b.get("mv") or {}).get("reverts", [])) or "-"])
    return rows


STRIKE_HEADERS = ["activity", "status", "capsule", "model", "cost", "certified gap", "saved kWh", "reverted because"]


def _verdict_rows(proofs: list[dict], history: list[dict]) -> list[list[str]]:
    rows = []
    for b in proofs:
        n = sum(1 for e in b["events"] if e["role"] == "verdict")
        rows.append([b["activity_id"][:8], f"{n} verdicts named in the proof", b["status"], b["detail"][:120]])
    for h in history:
        rows.append([h.get("node", ""), h["type"], h.get("at", ""), h.get("reason", "")[:120]])
    return rows


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return ["(none)"]
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]


def build(contract, proofs: list[dict], history: list[dict], out: Path, invalid: list[str] | None = None,
          now: dt.datetime | None = None) -> ContractReport:
    """Write the three documents of `contract` (a ContractSpec) under `out`."""
    now = now or dt.datetime.now(dt.timezone.utc)
    out.mkdir(parents=True, exist_ok=True)
    s = summarise(proofs, history)
    figs = charts(s["period_rows"])
    unc = "n/a" if s["uncertainty_kwh"] is None else f"{s['uncertainty_kwh']:.2f}"
    conf = "" if s["confidence"] is None else f" at {100 * s['confidence']:.0f} % confidence"
    head = [
        f"Contract {contract.contract_id} for {contract.client}: {contract.domain} on {', '.join(contract.nodes) or 'no nodes'}",
        f"Generated {now.isoformat(timespec='seconds')} from {s['strikes']} verified strike proofs and the deployment log.",
    ]
    facts = [
        ["energy saved", f"{s['saved_kwh']:.2f} ± {unc} kWh{conf} over {s['periods']} measured periods (IPMVP Option D)"],
        ["stability score", f"{_fmt(s['stability'])} (mean comfort deviation {_fmt(s['comfort_mean_dev_k'], 2)} K, "
                            f"worst {_fmt(s['comfort_max_dev_k'], 2)} K)"],
        ["strikes", ", ".join(f"{k}: {v}" for k, v in s["statuses"].items()) or "none"],
        ["monitor reverts / rollbacks", f"{s['reverts']} / {s['rollbacks']}"],
    ]
    md = [f"# Value report: {contract.contract_id}", "", *head, "", *_md_table(["measure", "value"], facts), "",
          "## Strikes", "", *_md_table(STRIKE_HEADERS, _strike_rows(proofs)), "",
          "## Verdicts and rollbacks", "", *_md_table(["what", "event", "status / when", "detail"], _verdict_rows(proofs, history)), ""]
    if invalid:
        md += ["## Proofs not counted", "", *[f"- {x}" for x in invalid], ""]
    md += ["Charts: see the HTML or PDF report."] if figs else ["No measured period yet: no charts."]
    md_path = out / f"{contract.contract_id}.md"
    md_path.write_text("\n".join(md) + "\n")

    def table(headers, rows):
        if not rows:
            return "<p>(none)</p>"
        th = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><tr>{th}</tr>{trs}</table>"

    body = [f"<h1>Value report: {html.escape(contract.contract_id)}</h1>", *[f"<p>{html.escape(h)}</p>" for h in head],
            table(["measure", "value"], facts)]
    for title, svg, _ in figs:
        body.append(f"<h2>{html.escape(title)}</h2>" + svg.decode().split("?>", 1)[-1])
    body += ["<h2>Strikes</h2>", table(STRIKE_HEADERS, _strike_rows(proofs)),
             "<h2>Verdicts and rollbacks</h2>", table(["what", "event", "status / when", "detail"], _verdict_rows(proofs, history))]
    if invalid:
        body += ["<h2>Proofs not counted</h2><ul>", *[f"<li>{html.escape(x)}</li>" for x in invalid], "</ul>"]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>Value report " + html.escape(contract.contract_id) +
            "</title><style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:3px 6px;font-size:90%}</style></head><body>" + "\n".join(body) + "</body></html>\n")
    html_path = out / f"{contract.contract_id}.html"
    html_path.write_text(page)
    pdf_path = out / f"{contract.contract_id}.pdf"
    _pdf(pdf_path, contract, head, facts, figs, proofs, history, invalid or [])
    return ContractReport(md_path, html_path, pdf_path, {k: v for k, v in s.items() if k != "period_rows"}, invalid or [])


def _latin(text: str) -> str:
    """fpdf2's core fonts are Latin-1: other characters are spelt out."""
    return str(text).replace("±", "+/-").replace("–", "-").replace("→", "->").replace("°", " deg ").encode("latin-1", "replace").decode("latin-1")


def _pdf(path: Path, contract, head, facts, figs, proofs, history, invalid) -> None:
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(True, margin=15)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 16)
    pdf.multi_cell(0, 9, _latin(f"Value report: {contract.contract_id}"), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", size=10)
    for h in head:
        pdf.multi_cell(0, 5, _latin(h), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)

    def table(headers, rows, widths=None):
        if not rows:
            pdf.multi_cell(0, 5, "(none)", new_x="LMARGIN", new_y="NEXT")
            return
        pdf.set_font("Helvetica", size=7)
        with pdf.table(col_widths=widths, text_align="LEFT") as t:
            r = t.row()
            for h in headers:
                r.cell(_latin(h))
            for row in rows:
                r = t.row()
                for c in row:
                    r.cell(_latin(c))
        pdf.set_font("Helvetica", size=10)

    table(["measure", "value"], facts, widths=(1, 4))
    for title, _, png in figs:
        pdf.set_font("Helvetica", "B", 11)
        pdf.multi_cell(0, 7, _latin(title), new_x="LMARGIN", new_y="NEXT")
        pdf.image(io.BytesIO(png), w=180)
    pdf.set_font("Helvetica", "B", 11)
    pdf.multi_cell(0, 7, "Strikes", new_x="LMARGIN", new_y="NEXT")
    table(STRIKE_HEADERS, _strike_rows(proofs))
    pdf.set_font("Helvetica", "B", 11)
    pdf.multi_cell(0, 7, "Verdicts and rollbacks", new_x="LMARGIN", new_y="NEXT")
    table(["what", "event", "status / when", "detail"], _verdict_rows(proofs, history))
    for x in invalid:
        pdf.multi_cell(0, 5, _latin(f"not counted: {x}"), new_x="LMARGIN", new_y="NEXT")
    pdf.output(str(path))


async def deploy_history(bus, nodes: list[str]) -> list[dict]:
    """The nodes' rollbacks and failed deployments, from DEPLOY."""
    from scf.bus import events as ev
    from scf.bus.codec import Codec
    from scf.bus.ids import subject_token
    from scf.bus.reader import read

    if not nodes:
        return []
    subjects = [f"deploy.{k}.{subject_token(n)}" for n in nodes for k in ("rolled_back", "failed")]
    codec = Codec([ev.DeployRolledBack, ev.DeployFailed])
    out = []
    for m in await read(bus, "DEPLOY", subjects):
        try:
            e = codec.decode(m.data)
        except Exception:  # noqa: BLE001 - an entry we cannot read is not history we can show
            continue
        out.append({"type": e.type_name(), "node": e.data.node, "at": e.at.isoformat(timespec="seconds"), "reason": e.data.reason})
    return out
