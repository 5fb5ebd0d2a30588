"""DuckDB views over the archive: one `.sql` file per view in projections/views/.

Each file is the SELECT of one view, under a header:

    -- view: intents
    -- key: intent_id
    -- One row per intent …

`key` names the column(s) that identify a row (unique and non-null: a test checks it).
The views read the archive with paths relative to the archive directory (DuckDB resolves
them against `file_search_path`, else the working directory), so the directory can be moved
or copied whole. `write_database` puts the views into `<archive>/scf.duckdb` for analysts;
`connect` gives this process an in-memory connection with the same views.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import hashlib
import os
import re
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from scf.bus.errors import SCFError
from scf.projections.store import SCHEMA_VERSION, ArchiveStore

VIEWS_DIR = Path(__file__).parent / "views"
# Dependency order: a view is created after the views it reads (`unique_events` reads
# `events`; every typed view reads `unique_events`).
VIEW_ORDER = (
    "events", "unique_events", "fossils", "intents", "code", "verdicts", "jobs", "checkpoints",
    "gear_changes", "deployments", "energy", "ledger", "balances", "cfr",
)
FORMATS = ("table", "csv", "json", "parquet")
DATABASE_STORAGE_VERSION = "v1.0.0"  # so a DuckDB CLI from 1.0 on can open the file
_HEADER = re.compile(r"^--\s*(view|key):\s*(.+?)\s*$")


class QueryError(SCFError):
    """A query that DuckDB refused (the message is DuckDB's)."""


@dataclass(frozen=True)
class View:
    name: str
    key: tuple[str, ...]
    description: str
    sql: str

    @property
    def path(self) -> Path:
        return VIEWS_DIR / f"{self.name}.sql"


def load() -> list[View]:
    """The views in creation order."""
    found = {p.stem: p for p in VIEWS_DIR.glob("*.sql")}
    names = [n for n in VIEW_ORDER if n in found] + sorted(set(found) - set(VIEW_ORDER))
    return [_parse(found[n]) for n in names]


def _parse(path: Path) -> View:
    text = path.read_text()
    meta: dict[str, str] = {}
    doc: list[str] = []
    body: list[str] = []
    for line in text.splitlines():
        m = _HEADER.match(line)
        if not body and m:
            meta[m.group(1)] = m.group(2)
        elif not body and line.startswith("--"):
            doc.append(line.removeprefix("--").strip())
        else:
            body.append(line)
    name = meta.get("view", path.stem)
    if name != path.stem:
        raise SCFError(f"{path}: header says view {name!r}: rename the file or fix the header")
    key = tuple(k.strip() for k in meta.get("key", "").split(",") if k.strip())
    return View(name, key, " ".join(doc), "\n".join(body).strip().rstrip(";"))


def views_hash() -> str:
    h = hashlib.sha256(f"schema {SCHEMA_VERSION}\n".encode())
    for v in load():
        h.update(f"{v.name}\n{v.sql}\n".encode())
    return h.hexdigest()


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def install(con, root: str | Path, *, temporary: bool = False, comments: bool = False) -> None:
    """Create every view on `con`, resolving archive paths against `root`."""
    con.execute(f"SET file_search_path = {_sql_string(str(Path(root)))}")
    import duckdb

    kind = "TEMP VIEW" if temporary else "VIEW"
    for v in load():
        try:
            con.execute(f"CREATE OR REPLACE {kind} {v.name} AS\n{v.sql}")
        except duckdb.Error as exc:
            raise QueryError(f"view {v.name} ({v.path}): {_first_line(exc)}") from None
        if comments and not temporary:
            con.execute(f"COMMENT ON VIEW {v.name} IS {_sql_string(v.description)}")


def connect(root: str | Path, *, threads: int | None = None, memory_limit: str | None = None):
    """An in-memory DuckDB connection with the views over the archive at `root`."""
    import duckdb

    store = ArchiveStore(root)
    store.require()
    config: dict[str, Any] = {}
    if threads:
        config["threads"] = threads
    if memory_limit:
        config["memory_limit"] = memory_limit
    con = duckdb.connect(":memory:", config=config)
    con.execute("SET enable_progress_bar = false")  # it would write into the query's output
    install(con, store.root, temporary=True)
    return con


def write_database(root: str | Path) -> Path:
    """Write `<root>/scf.duckdb` with the views (unless it already has these views). The new
    file replaces the old one atomically, so an analyst with the old one open is not disturbed."""
    import duckdb

    store = ArchiveStore(root)
    target = store.database_path
    want = views_hash()
    if target.exists():
        try:
            with duckdb.connect(str(target), read_only=True) as con:
                have = (con.execute("SELECT value FROM scf_meta WHERE key = 'views_sha256'").fetchall() or [None])[0]
            if have and have[0] == want:
                return target
        except duckdb.Error:
            pass  # unreadable, older, or held open read-write by someone: write a new one
    with store.database_lock():
        store.clean_database_temporary()  # what a full disk or a kill left behind
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            _write_database_file(store, tmp, want)
            os.replace(tmp, target)
        except (duckdb.IOException, OSError) as exc:  # a full disk, a file size limit
            from scf.projections.store import ArchiveWriteFailed

            raise ArchiveWriteFailed(target, exc) from None
        finally:
            tmp.unlink(missing_ok=True)
            Path(f"{tmp}.wal").unlink(missing_ok=True)
    return target


def _write_database_file(store: ArchiveStore, tmp: Path, want: str) -> None:
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        con.execute(f"ATTACH {_sql_string(str(tmp))} AS scf (STORAGE_VERSION '{DATABASE_STORAGE_VERSION}')")
        con.execute("USE scf")
        install(con, store.root, comments=True)
        from importlib.metadata import PackageNotFoundError, version

        try:
            scf_version = version("scf")
        except PackageNotFoundError:
            scf_version = "unknown"
        con.execute("CREATE TABLE scf_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
        con.executemany(
            "INSERT INTO scf_meta VALUES (?, ?)",
            [("views_sha256", want), ("archive_schema", str(SCHEMA_VERSION)), ("scf_version", scf_version)],
        )
        con.execute("CREATE TABLE scf_views (name VARCHAR PRIMARY KEY, key VARCHAR, description VARCHAR)")
        con.executemany("INSERT INTO scf_views VALUES (?, ?, ?)", [(v.name, ", ".join(v.key), v.description) for v in load()])
        con.execute("CHECKPOINT scf")
        con.execute("USE memory")
        con.execute("DETACH scf")
    finally:
        con.close()


# --------------------------------------------------------------------------- queries


def query(con, sql: str):
    """A relation for `sql` (several statements: all run, the last one's result is returned)."""
    import duckdb

    try:
        rel = con.sql(sql)
    except duckdb.Error as exc:
        raise QueryError(_first_line(exc)) from None
    if rel is None:
        raise QueryError("the query returned no result (end it with a SELECT)")
    return rel


def iter_rows(rel, batch: int = 10_000):
    """Rows of a relation as dicts, a batch at a time. Goes through Arrow, which converts
    TIMESTAMP WITH TIME ZONE without the optional pytz module DuckDB's own fetch needs."""
    for b in rel.to_arrow_reader(batch):
        yield from b.to_pylist()


def rows(rel) -> list[dict[str, Any]]:
    return list(iter_rows(rel))


def _first_line(exc: Exception) -> str:
    lines = [l for l in str(exc).splitlines() if l.strip()]
    return " ".join(lines[:2]) if lines else type(exc).__name__


def export(rel, fmt: str, out: str | Path | None = None, *, stream: IO[str] | None = None, batch: int = 10_000) -> int:
    """Write a relation as table / csv / json (JSON Lines) / parquet. Returns the row count."""
    import duckdb

    if fmt not in FORMATS:
        raise QueryError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    try:
        if fmt == "parquet":
            if not out:
                raise QueryError("--format parquet needs --out FILE.parquet")
            rel.write_parquet(str(out))
            return int(duckdb.sql(f"SELECT count(*) FROM read_parquet({_sql_string(str(out))})").fetchall()[0][0])
        fh: IO[str]
        close = False
        if out:
            fh, close = open(out, "w", newline=""), True
        else:
            fh = stream or sys.stdout
        try:
            return _write_text(rel, fmt, fh, batch)
        finally:
            if close:
                fh.close()
    except duckdb.Error as exc:
        raise QueryError(_first_line(exc)) from None


def _write_text(rel, fmt: str, fh: IO[str], batch: int) -> int:
    import msgspec

    names = rel.columns
    n = 0
    if fmt == "table":
        got = rows(rel)
        cells = [[_cell(r[h]) for h in names] for r in got]
        widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(names)]
        fh.write("  ".join(h.ljust(w) for h, w in zip(names, widths)).rstrip() + "\n")
        fh.write("  ".join("-" * w for w in widths) + "\n")
        for r in cells:
            fh.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")
        fh.write(f"({len(got)} row{'s' if len(got) != 1 else ''})\n")
        return len(got)
    if fmt == "csv":
        w = csv.writer(fh)
        w.writerow(names)
        for row in iter_rows(rel, batch):
            w.writerow([_csv(row[h]) for h in names])
            n += 1
        return n
    enc = msgspec.json.Encoder(enc_hook=_json_default, decimal_format="number")
    for row in iter_rows(rel, batch):
        fh.write(enc.encode(row).decode() + "\n")
        n += 1
    return n


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    return str(value)


def _csv(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, (list, dict)):
        import msgspec

        return msgspec.json.encode(value, enc_hook=_json_default).decode()
    return value


def _cell(value: Any, width: int = 60) -> str:
    if value is None:
        text = "NULL"
    elif isinstance(value, dt.datetime):
        text = value.isoformat(sep=" ")
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, decimal.Decimal):
        text = str(value)
    else:
        text = str(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "…"
