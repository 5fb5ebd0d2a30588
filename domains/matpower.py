"""Read MATPOWER case files (`.m`, case format version 2).

Only what a DC model needs is kept: `baseMVA`, and the numeric matrices `bus`, `gen`,
`branch`, `gencost` (other `mpc.*` fields, cell arrays and functions are skipped).
Column meanings are MATPOWER's (`help caseformat`); the constants below name them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scf.domains.base import DomainError

# bus columns
BUS_I, BUS_TYPE, PD, QD, GS, BS = 0, 1, 2, 3, 4, 5
REF = 3  # bus type of the reference (slack) bus
# gen columns
GEN_BUS, PG, GEN_STATUS, PMAX, PMIN, RAMP_30 = 0, 1, 7, 8, 9, 18
# branch columns
F_BUS, T_BUS, BR_R, BR_X, RATE_A, TAP, SHIFT, BR_STATUS = 0, 1, 2, 3, 5, 8, 9, 10
# gencost columns
MODEL, NCOST, COST = 0, 3, 4
POLYNOMIAL, PIECEWISE_LINEAR = 2, 1

DATA_DIR = Path(__file__).parent / "data"


class CaseFormatError(DomainError):
    pass


@dataclass(frozen=True)
class MatpowerCase:
    name: str
    base_mva: float
    bus: np.ndarray  # (n_bus, >=13)
    gen: np.ndarray  # (n_gen, >=10)
    branch: np.ndarray  # (n_branch, >=11)
    gencost: np.ndarray  # (n_gen, 4 + n)


_ASSIGN = re.compile(r"mpc\.(\w+)\s*=\s*", re.M)


def _strip_comments(text: str) -> str:
    # MATPOWER data has no '%' inside strings we keep, so a comment runs to end of line.
    return "\n".join(line.split("%", 1)[0] for line in text.splitlines())


def _matrix(body: str, field: str, path: Path) -> np.ndarray:
    rows = [r for r in re.split(r"[;\n]", body) if r.strip()]
    try:
        data = [[float(v) for v in re.split(r"[\s,]+", r.strip())] for r in rows]
    except ValueError as exc:
        raise CaseFormatError(f"{path}: mpc.{field} holds a non-numeric entry ({exc}); fix the case file") from None
    widths = {len(r) for r in data}
    if len(widths) > 1:
        raise CaseFormatError(f"{path}: mpc.{field} has rows of different lengths {sorted(widths)}; fix the case file")
    return np.array(data, dtype=float)


def parse_case(text: str, name: str = "case", path: Path | None = None) -> MatpowerCase:
    """Parse the text of a MATPOWER `.m` case file."""
    where = path or Path(name)
    text = _strip_comments(text)
    fields: dict[str, object] = {}
    for m in _ASSIGN.finditer(text):
        field, rest = m.group(1), text[m.end() :]
        if rest.startswith("["):
            end = rest.find("]")
            if end < 0:
                raise CaseFormatError(f"{where}: mpc.{field} opens '[' but never closes it; fix the case file")
            fields[field] = _matrix(rest[1:end], field, where)
        elif rest.startswith(("'", "{")):
            continue  # version string, cell arrays (bus names …)
        else:
            value = rest.split(";", 1)[0].strip()
            try:
                fields[field] = float(value)
            except ValueError:
                continue
    missing = [f for f in ("baseMVA", "bus", "gen", "branch", "gencost") if f not in fields]
    if missing:
        raise CaseFormatError(f"{where}: missing mpc.{', mpc.'.join(missing)}; a DC-OPF case needs all of them")
    return MatpowerCase(
        name=name,
        base_mva=float(fields["baseMVA"]),  # type: ignore[arg-type]
        bus=fields["bus"],  # type: ignore[arg-type]
        gen=fields["gen"],  # type: ignore[arg-type]
        branch=fields["branch"],  # type: ignore[arg-type]
        gencost=fields["gencost"],  # type: ignore[arg-type]
    )


def load_case(name_or_path: str | Path) -> MatpowerCase:
    """A case by name ("case14", shipped under domains/data) or by path to a `.m` file."""
    path = Path(name_or_path)
    if path.suffix != ".m":
        path = DATA_DIR / f"{name_or_path}.m"
    if not path.is_file():
        shipped = sorted(p.stem for p in DATA_DIR.glob("*.m"))
        raise CaseFormatError(f"no MATPOWER case at {path}: use one of {', '.join(shipped)} or a path to a .m file")
    return parse_case(path.read_text(), name=path.stem, path=path)
