"""The CFR dataset: Context → Intent → Code → Review tuples, for training code generators.

From the `cfr` view (one row per code proposal with its intent and its ruling):

* approved code that is no worse than the status quo → supervised examples in the
  conversational prompt/completion format (`prompt`: the system and user messages,
  `completion`: the assistant message), so a trainer puts the loss on the code only (TRL's
  `SFTTrainer` does for this format). "No worse": the sandbox's `relative_cost` (the verdict's
  scores) below 1, or no sandbox run (a static approval). Approved code that costs more than
  the status quo (relative cost >= 1) is not copied: it is a negative like rejected code
  (`approved_worse` in the card), so the model learns to beat the status quo, not to pass;
* rejected code → negatives: unpaired examples (`prompt`, `completion`, `label` false, the
  format of KTO-style trainers, approved ones with `label` true), and preference pairs
  (`prompt`, `chosen`, `rejected`) for every intent that has both (at most
  `max_pairs_per_intent`, chosen deterministically); prompts are message lists and
  completions one assistant message, TRL's conversational formats.

The prompt is rendered by `scf.projections.cfr_prompt`, the function GenN serves it with:
the examples are byte-identical to what the generator was asked.
* held or unruled proposals are left out (and counted in the card).

Splits are by a hash of the intent id, so every example of an intent lands in the same split.
Everything is sorted and written without timestamps: building twice from the same archive
gives byte-identical files. Layout of DIR:

    README.md                    the dataset card: counts, schema, lineage
    dataset.json                 the card's numbers, machine-readable
    sft/{train,validation}.jsonl         {"prompt": [system, user], "completion": [assistant]}
    preference/{train,validation}.jsonl  {"prompt": [...], "chosen": [assistant], "rejected": [assistant]}
    unpaired/{train,validation}.jsonl    {"prompt": [...], "completion": [assistant], "label"}
    sft.parquet, preference.parquet, unpaired.parquet   the same rows with ids and split
    tuples.parquet               every reviewed tuple with its full context
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from scf.bus.errors import SCFError
from scf.projections import views
from scf.projections.cfr_prompt import SYSTEM_PROMPT, messages, render_row  # noqa: F401 (SYSTEM_PROMPT: re-exported)
from scf.projections.store import ArchiveStore

SOURCE_STREAMS = ("INTENTS", "VERDICTS")
SPLITS = ("train", "validation")


class DatasetError(SCFError):
    pass


@dataclass
class CfrDataset:
    out: Path
    counts: dict[str, Any]
    lineage: dict[str, Any]
    files: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        c = self.counts
        return [
            f"CFR dataset in {self.out}",
            f"  tuples reviewed: {c['tuples']} ({c['approved']} approved, {c['approved_worse']} of them costlier than the status quo; "
            f"{c['rejected']} rejected; {c['pending']} held or unruled left out) from {c['intents']} intents",
            f"  supervised: {c['sft']['train']} train / {c['sft']['validation']} validation",
            f"  preference pairs: {c['preference']['train']} train / {c['preference']['validation']} validation",
            f"  unpaired: {c['unpaired']['train']} train / {c['unpaired']['validation']} validation",
            "  as of " + ", ".join(f"{s} seq {r['to_seq']}" for s, r in self.lineage["streams"].items()),
        ]


def split_of(intent_id: str, validation_pct: float) -> str:
    """'validation' for about `validation_pct` % of intents, by a hash of the intent id."""
    bucket = int(hashlib.sha256(intent_id.encode()).hexdigest()[:8], 16) % 10_000
    return "validation" if bucket < validation_pct * 100 else "train"


def render_prompt(row: dict[str, Any]) -> str:
    """The user turn: the context and the intent, then the task (`cfr_prompt.render_row`)."""
    return render_row(row)


def parse_as_of(values: list[str] | None) -> dict[str, int] | int | None:
    """`--as-of-seq` values: `N` (every stream) or `STREAM=N`, repeatable / comma-separated."""
    if not values:
        return None
    out: dict[str, int] = {}
    bare: int | None = None
    for v in itertools.chain.from_iterable(x.split(",") for x in values):
        v = v.strip()
        if not v:
            continue
        name, sep, num = v.partition("=")
        try:
            if sep:
                out[name.strip().upper()] = int(num)
            else:
                bare = int(name)
        except ValueError:
            raise DatasetError(f"--as-of-seq {v!r}: expected N or STREAM=N (e.g. INTENTS=5000)") from None
    if bare is not None and out:
        raise DatasetError("--as-of-seq: give either one N for every stream or STREAM=N pairs, not both")
    return bare if bare is not None else out


def build(
    archive: str | Path,
    out: str | Path,
    *,
    as_of: dict[str, int] | int | None = None,
    validation_pct: float = 10.0,
    max_pairs_per_intent: int = 16,
    threads: int | None = None,
    memory_limit: str | None = None,
) -> CfrDataset:
    store = ArchiveStore(archive)
    store.require()
    out = Path(out)
    positions = {s: store.position(s) for s in SOURCE_STREAMS}
    if isinstance(as_of, int):
        limits = {s: min(as_of, positions[s]) for s in SOURCE_STREAMS}
    else:
        limits = {s: min((as_of or {}).get(s, positions[s]), positions[s]) for s in SOURCE_STREAMS}
        unknown = set(as_of or {}) - set(SOURCE_STREAMS)
        if unknown:
            raise DatasetError(f"--as-of-seq names {', '.join(sorted(unknown))}: the CFR dataset reads only {', '.join(SOURCE_STREAMS)}")

    # Lineage first (it reads the archive files), then the rows: the two never sit in memory together.
    read_files = [f for s in SOURCE_STREAMS for f in store.files(s) if f.first <= limits[s]]
    files_sha256 = store.files_hash(read_files)
    rows_sha256 = store.content_hash(SOURCE_STREAMS, max_seq=limits)

    out.mkdir(parents=True, exist_ok=True)
    sink = _Sink(out)
    counts: dict[str, Any] = {"tuples": 0, "approved": 0, "approved_worse": 0, "rejected": 0, "pending": 0, "intents": 0}
    con = views.connect(store.root, threads=threads, memory_limit=memory_limit)
    try:
        _limit_events(con, limits)
        # Rows arrive sorted by intent, so an intent's proposals are consecutive: the dataset
        # is written as it streams by, one intent in memory at a time.
        rel = con.sql("SELECT * FROM cfr ORDER BY intent_id, proposal_id")
        reviewed = _reviewed(views.iter_rows(rel, 5_000), counts, validation_pct)
        for intent_id, group in itertools.groupby(reviewed, key=lambda r: r["intent_id"]):
            _emit(sink, intent_id, list(group), counts, max_pairs_per_intent)
        ranges = {
            s: [int(x) if x is not None else 0 for x in r]
            for s, *r in con.sql(
                "SELECT stream, min(seq), max(seq), count(*) FROM events WHERE stream IN ('INTENTS', 'VERDICTS') GROUP BY stream"
            ).fetchall()
        }
    except BaseException:
        sink.abort()
        raise
    finally:
        con.close()
    written = sink.close()
    counts.update({name: {split: sink.counts[(name, split)] for split in SPLITS} for name in ("sft", "preference", "unpaired")})

    lineage = {
        "streams": {
            s: {"from_seq": ranges.get(s, [0, 0, 0])[0], "to_seq": limits[s], "messages": ranges.get(s, [0, 0, 0])[2]}
            for s in SOURCE_STREAMS
        },
        "archive_files": len(read_files),
        "archive_files_sha256": files_sha256,
        "archive_rows_sha256": rows_sha256,
        "views_sha256": views.views_hash(),
        "scf_version": _version(),
        "validation_pct": validation_pct,
        "max_pairs_per_intent": max_pairs_per_intent,
        "rebuild": "scf dataset cfr --out DIR " + " ".join(f"--as-of-seq {s}={limits[s]}" for s in SOURCE_STREAMS)
        + (f" --validation-pct {validation_pct:g}" if validation_pct != 10.0 else "")
        + (f" --max-pairs-per-intent {max_pairs_per_intent}" if max_pairs_per_intent != 16 else ""),
    }
    ds = CfrDataset(out, counts, lineage)
    card = {"name": "scf-cfr", "counts": counts, "lineage": lineage, "files": sorted(written)}
    _write_bytes(out / "dataset.json", (json.dumps(card, indent=2, sort_keys=True) + "\n").encode())
    _write_bytes(out / "README.md", _card(ds, sorted(written)).encode())
    ds.files = sorted(written) + ["README.md", "dataset.json"]
    return ds


def _reviewed(rows, counts: dict[str, Any], validation_pct: float):
    """Tuples with a final APPROVE / REJECT, with their split and rendered prompt."""
    for r in rows:
        if r["decision"] not in ("APPROVE", "REJECT") or not r["final"]:
            counts["pending"] += 1
            continue
        r["split"] = split_of(r["intent_id"], validation_pct)
        r["prompt_text"] = render_prompt(r)
        yield r


def _good(r: dict[str, Any]) -> bool:
    """Approved and not worse than the status quo (relative cost < 1, or no sandbox score)."""
    rel = r.get("relative_cost")
    return r["decision"] == "APPROVE" and (rel is None or rel < 1.0)


def _emit(sink: "_Sink", intent_id: str, group: list[dict[str, Any]], counts: dict[str, Any], max_pairs: int) -> None:
    """Every example of one intent."""
    counts["intents"] += 1
    for r in group:
        approved, good = r["decision"] == "APPROVE", _good(r)
        counts["tuples"] += 1
        counts["approved" if approved else "rejected"] += 1
        counts["approved_worse"] += approved and not good
        split, prompt = r["split"], messages(r["prompt_text"])
        completion = _answer(r["code"])
        if good:
            ex = {"prompt": prompt, "completion": completion}
            sink.add("sft", split, ex, {"split": split, "intent_id": intent_id, "proposal_id": r["proposal_id"], **ex})
        un = {"prompt": prompt, "completion": completion, "label": good}
        sink.add("unpaired", split, un, {
            "split": split, "intent_id": intent_id, "proposal_id": r["proposal_id"], "reasons": list(r["reasons"] or []), **un,
        })
        sink.add_tuple(_tuple_row(r))
    good = [r for r in group if _good(r)]
    bad = [r for r in group if not _good(r)]
    for g, b in itertools.islice(itertools.product(good, bad), max_pairs):
        p = {"prompt": messages(g["prompt_text"]), "chosen": _answer(g["code"]), "rejected": _answer(b["code"])}
        sink.add("preference", g["split"], p, {
            "split": g["split"], "intent_id": intent_id, "chosen_proposal_id": g["proposal_id"],
            "rejected_proposal_id": b["proposal_id"], "rejected_reasons": list(b["reasons"] or []), **p,
        })


def _answer(code: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": code}]


class _Sink:
    """The dataset's files, written as rows stream by: JSONL per (format, split), Parquet per
    format (row groups of a fixed size, so the bytes depend only on the rows). Files are
    written under temporary names and renamed into place on close."""

    ROWS_PER_GROUP = 10_000

    def __init__(self, out: Path) -> None:
        self.out = out
        self.counts: dict[tuple[str, str], int] = {}
        self._jsonl: dict[tuple[str, str], Any] = {}
        self._tmp: list[tuple[Path, Path]] = []
        for name in ("sft", "preference", "unpaired"):
            for split in SPLITS:
                path = out / name / f"{split}.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.parent / f".{path.name}.tmp"
                self._jsonl[(name, split)] = open(tmp, "wb")
                self._tmp.append((tmp, path))
                self.counts[(name, split)] = 0
        self._schemas = {"sft": _SFT_SCHEMA, "preference": _PAIR_SCHEMA, "unpaired": _UNPAIRED_SCHEMA, "tuples": _TUPLE_SCHEMA}
        self._rows: dict[str, list[dict]] = {k: [] for k in self._schemas}
        self._writers: dict[str, pq.ParquetWriter] = {}
        for name, schema in self._schemas.items():
            path = out / f"{name}.parquet"
            tmp = out / f".{name}.parquet.tmp"
            self._writers[name] = pq.ParquetWriter(tmp, schema, compression="zstd")
            self._tmp.append((tmp, path))

    def add(self, name: str, split: str, line: dict, row: dict) -> None:
        self._jsonl[(name, split)].write(_enc.encode(line) + b"\n")
        self.counts[(name, split)] += 1
        self._row(name, row)

    def add_tuple(self, row: dict) -> None:
        self._row("tuples", row)

    def _row(self, name: str, row: dict) -> None:
        rows = self._rows[name]
        rows.append(row)
        if len(rows) >= self.ROWS_PER_GROUP:
            self._writers[name].write_table(pa.Table.from_pylist(rows, schema=self._schemas[name]))
            rows.clear()

    def close(self) -> list[str]:
        for name, rows in self._rows.items():
            if rows:
                self._writers[name].write_table(pa.Table.from_pylist(rows, schema=self._schemas[name]))
            self._writers[name].close()
        for fh in self._jsonl.values():
            fh.close()
        for tmp, path in self._tmp:
            os.replace(tmp, path)
        return sorted(path.relative_to(self.out).as_posix() for _, path in self._tmp)

    def abort(self) -> None:
        for w in self._writers.values():
            try:
                w.close()
            except Exception:  # noqa: BLE001 - aborting: the temporary files are removed below either way
                pass
        for fh in self._jsonl.values():
            fh.close()
        for tmp, _ in self._tmp:
            tmp.unlink(missing_ok=True)


def _limit_events(con, limits: dict[str, int]) -> None:
    """Make `events` (and so every view) stop at the given sequence of each stream."""
    events = next(v for v in views.load() if v.name == "events")
    cases = " ".join(f"WHEN '{s}' THEN {int(n)}" for s, n in sorted(limits.items()))
    con.execute(
        f"CREATE OR REPLACE TEMP VIEW events AS SELECT * FROM ({events.sql}) "
        f"WHERE seq <= CASE stream {cases} ELSE 9223372036854775807 END"
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scf")
    except PackageNotFoundError:
        return "unknown"


_enc = msgspec.json.Encoder()


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)


_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
_SFT_SCHEMA = pa.schema([
    ("split", pa.string()), ("intent_id", pa.string()), ("proposal_id", pa.string()), ("prompt", _MESSAGES), ("completion", _MESSAGES),
])
_PAIR_SCHEMA = pa.schema([
    ("split", pa.string()), ("intent_id", pa.string()), ("chosen_proposal_id", pa.string()),
    ("rejected_proposal_id", pa.string()), ("rejected_reasons", pa.list_(pa.string())),
    ("prompt", _MESSAGES), ("chosen", _MESSAGES), ("rejected", _MESSAGES),
])
_UNPAIRED_SCHEMA = pa.schema([
    ("split", pa.string()), ("intent_id", pa.string()), ("proposal_id", pa.string()), ("reasons", pa.list_(pa.string())),
    ("prompt", _MESSAGES), ("completion", _MESSAGES), ("label", pa.bool_()),
])
_TUPLE_COLUMNS = [
    ("proposal_id", pa.string()), ("intent_id", pa.string()), ("split", pa.string()),
    ("kind", pa.string()), ("domain", pa.string()), ("params", pa.string()), ("gear", pa.string()),
    ("hypothesis", pa.int64()), ("intent_reason", pa.string()), ("prompt", pa.string()), ("prompt_text", pa.string()),
    ("code", pa.string()), ("language", pa.string()), ("generator", pa.string()),
    ("decision", pa.string()), ("gate", pa.string()), ("reasons", pa.list_(pa.string())), ("ruled_by", pa.string()),
    ("verdict_id", pa.string()), ("relative_cost", pa.float64()), ("intent_at", pa.timestamp("us", tz="UTC")), ("proposed_at", pa.timestamp("us", tz="UTC")),
    ("ruled_at", pa.timestamp("us", tz="UTC")), ("intent_seq", pa.int64()), ("code_seq", pa.int64()), ("verdict_seq", pa.int64()),
]
_TUPLE_SCHEMA = pa.schema(_TUPLE_COLUMNS)


def _tuple_row(r: dict[str, Any]) -> dict[str, Any]:
    return {name: r.get(name) for name, _ in _TUPLE_COLUMNS}


def _schema_lines(schema: pa.Schema) -> list[str]:
    return [f"| `{f.name}` | `{f.type}` |" for f in schema]


def _card(ds: CfrDataset, files: list[str]) -> str:
    c, l = ds.counts, ds.lineage
    streams = "\n".join(
        f"| {s} | {r['from_seq']} | {r['to_seq']} | {r['messages']} |" for s, r in l["streams"].items()
    )
    out = [
        "# SCF CFR dataset",
        "",
        "Context → Intent → Code → Review tuples from the SCF event log: code that a generator",
        "proposed for an intent, in the intent's context (domain, parameters, gear), and how the",
        "safety gate or a human ruled on it. Approved code no worse than the status quo (the sandbox's relative",
        "cost below 1, or no sandbox run) gives supervised examples; rejected code and approved code that costs",
        "more than the status quo give negatives, and preference pairs where an intent has both.",
        "",
        "## Counts",
        "",
        "| | train | validation |",
        "|---|---:|---:|",
        f"| supervised (`sft/`) | {c['sft']['train']} | {c['sft']['validation']} |",
        f"| preference pairs (`preference/`) | {c['preference']['train']} | {c['preference']['validation']} |",
        f"| unpaired, approved + rejected (`unpaired/`) | {c['unpaired']['train']} | {c['unpaired']['validation']} |",
        "",
        f"{c['tuples']} reviewed proposals ({c['approved']} approved — {c['approved_worse']} of them costlier than the status quo —, "
        f"{c['rejected']} rejected) for {c['intents']} intents; "
        f"{c['pending']} proposals held for a human or not yet ruled on are left out.",
        "",
        f"Split: by intent, `sha256(intent_id)` → validation for {l['validation_pct']:g} % of intents, so no intent "
        "appears in both splits. Preference pairs: every good × (rejected or costlier) proposal of an intent, at most "
        f"{l['max_pairs_per_intent']} per intent, in proposal-id order.",
        "",
        "## Files and formats",
        "",
        "- `sft/*.jsonl`: `{\"prompt\": [system, user], \"completion\": [assistant]}`, each message "
        "`{\"role\", \"content\"}`: TRL's conversational prompt-completion format, so `SFTTrainer` puts the loss "
        "on the completion (the code) only.",
        "- `preference/*.jsonl`: `{\"prompt\": [system, user], \"chosen\": [assistant], \"rejected\": [assistant]}` "
        "(TRL `DPOTrainer` / ORPO / CPO, conversational).",
        "- `unpaired/*.jsonl`: `{\"prompt\": [system, user], \"completion\": [assistant], \"label\"}` (TRL `KTOTrainer`): "
        "label true = approved and no worse than the status quo.",
        "- `*.parquet`: the same rows with their split and ids; `tuples.parquet`: every reviewed tuple with its context.",
        "",
        "### Schemas",
        "",
    ]
    for title, schema in (("sft.parquet", _SFT_SCHEMA), ("preference.parquet", _PAIR_SCHEMA),
                          ("unpaired.parquet", _UNPAIRED_SCHEMA), ("tuples.parquet", _TUPLE_SCHEMA)):
        out += [f"`{title}`", "", "| column | type |", "|---|---|", *_schema_lines(schema), ""]
    out += [
        "## Lineage",
        "",
        "| stream | from seq | to seq (as of) | messages read |",
        "|---|---:|---:|---:|",
        streams,
        "",
        f"- archive files read: {l['archive_files']}, sha256 over (path, sha256 of bytes): `{l['archive_files_sha256']}`",
        f"- archive rows read, sha256 (independent of compaction): `{l['archive_rows_sha256']}`",
        f"- views sha256: `{l['views_sha256']}`",
        f"- scf version: {l['scf_version']}",
        f"- rebuild: `{l['rebuild']}` (byte-identical output from the same archive)",
        "",
        "## Files",
        "",
        *[f"- `{f}`" for f in files],
        "",
    ]
    return "\n".join(out)
