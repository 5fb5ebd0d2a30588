"""Read MATPOWER case files (`.m`, case format version 1 or 2).

Only what a DC model needs is kept: `baseMVA`, and the numeric matrices `bus`, `gen`,
`branch`, `gencost` (other `mpc.*` fields and cell arrays are skipped). Column meanings are
MATPOWER's (`help caseformat`); the constants below name them.

A case file is MATLAB code, and this is not a MATLAB interpreter: it reads matrix and
scalar assignments, in both `mpc.bus = [...]` (version 2) and the bare `bus = [...]` of
version 1 function files, and the few statements MATPOWER's own data folder uses after
them — the unit conversions of its distribution cases (ohms to p.u., kW to MW, a power
factor) and an `if flag ... end` block whose flag is 0. Any other statement that changes
the case is refused with its line number: run such a file in MATPOWER, `savecase` the
result, and pass the saved file.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scf.domains.base import DomainError

# bus columns
BUS_I, BUS_TYPE, PD, QD, GS, BS, BASE_KV = 0, 1, 2, 3, 4, 5, 9
PQ, PV, REF, NONE = 1, 2, 3, 4  # bus types; NONE is an isolated bus
# gen columns
GEN_BUS, PG, QG, GEN_STATUS, PMAX, PMIN, RAMP_30 = 0, 1, 2, 7, 8, 9, 18
# branch columns
F_BUS, T_BUS, BR_R, BR_X, RATE_A, TAP, SHIFT, BR_STATUS, ANGMIN, ANGMAX = 0, 1, 2, 3, 5, 8, 9, 10, 11, 12
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
    gencost: np.ndarray  # (n_gen or 2 n_gen, 4 + n)


_BLOCK = re.compile(r"^[ \t]*(?:mpc\.)?(\w+)[ \t]*=[ \t]*([\[{])", re.M)
_SCALAR = re.compile(r"^(?:mpc\.)?(\w+)=([-+*/^()0-9.eEinfIntaNsqrcoxp]+);?$")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:Inf|inf|NaN|nan)")

# The statements MATPOWER's data folder runs after its matrices (whitespace removed).
_KNOWN_STATEMENTS = {
    "Vbase=mpc.bus(1,BASE_KV)*1e3;": "vbase",
    "Sbase=mpc.baseMVA*1e6;": "sbase",
    "mpc.branch(:,[BR_RBR_X])=mpc.branch(:,[BR_RBR_X])/(Vbase^2/Sbase);": "ohms_to_pu",
    "mpc.bus(:,[PD,QD])=mpc.bus(:,[PD,QD])/1e3;": "kw_to_mw",
    "mpc.bus(:,QD)=mpc.bus(:,PD)*sin(acos(pf));": "qd_from_pf",
    "mpc.bus(:,PD)=mpc.bus(:,PD)*pf;": "pd_from_pf",
}


def _strip_comments(text: str) -> str:
    # MATPOWER data has no '%' inside the strings we keep, so a comment runs to end of line;
    # a '...' continuation joins the next line.
    out: list[str] = []
    for line in text.splitlines():
        line = line.split("%", 1)[0]
        out.append(line.split("...", 1)[0] + " " if "..." in line else line + "\n")
    return "".join(out)


_FUNCTIONS = {"sqrt": math.sqrt, "sin": math.sin, "cos": math.cos, "acos": math.acos, "exp": math.exp}
_OPERATORS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos,
}  # fmt: skip


def _number(text: str) -> float:
    """A matrix entry: a number, or arithmetic on numbers (`135/sqrt(3)`, as some
    MATPOWER files write): + - * / ^ and sqrt, sin, cos, acos, exp, nothing else."""
    try:
        return float(text)
    except ValueError:
        pass

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS and len(node.args) == 1 and not node.keywords:
            return _FUNCTIONS[node.func.id](value(node.args[0]))
        raise ValueError(f"could not read {text!r} as a number")

    if len(text) > 200:
        raise ValueError(f"could not read {text[:40]!r}… as a number")
    try:
        return float(value(ast.parse(text.replace("^", "**"), mode="eval").body))
    except (SyntaxError, ArithmeticError, RecursionError):
        raise ValueError(f"could not read {text!r} as a number") from None


def _matrix(body: str, field: str, path: Path) -> np.ndarray:
    rows = [r for r in re.split(r"[;\n]", body) if r.strip()]
    data = []
    for r in rows:
        values = [v for v in re.split(r"[\s,]+", r.strip()) if v]
        try:
            data.append([_number(v) for v in values])
        except ValueError as exc:
            raise CaseFormatError(f"{path}: mpc.{field} holds a non-numeric entry ({exc}); fix the case file") from None
    widths = {len(r) for r in data}
    if len(widths) > 1:
        raise CaseFormatError(f"{path}: mpc.{field} has rows of different lengths {sorted(widths)}; fix the case file")
    return np.array(data, dtype=float).reshape(len(data), widths.pop() if widths else 0)


def parse_case(text: str, name: str = "case", path: Path | None = None) -> MatpowerCase:
    """Parse the text of a MATPOWER `.m` case file (see the module docstring for what of
    MATLAB is understood)."""
    where = path or Path(name)
    text = _strip_comments(text)
    fields: dict[str, np.ndarray] = {}
    scalars: dict[str, float] = {}
    rest: list[str] = []  # the text outside matrices and cell arrays
    pos = 0
    for m in _BLOCK.finditer(text):
        if m.start() < pos:
            continue  # inside a block already consumed
        field, opener = m.group(1), m.group(2)
        closer = "]" if opener == "[" else "}"
        end = text.find(closer, m.end())
        if end < 0:
            raise CaseFormatError(f"{where}: mpc.{field} opens {opener!r} but never closes it; fix the case file")
        rest.append(text[pos : m.start()])
        if opener == "[":
            fields[field] = _matrix(text[m.end() : end], field, where)
        pos = end + 1
        semi = text.find("\n", pos)
        pos = len(text) if semi < 0 else semi
    rest.append(text[pos:])
    _run_statements("".join(rest), fields, scalars, where)
    if "baseMVA" in scalars:
        base = scalars["baseMVA"]
    else:
        base = math.nan
    missing = [f for f in ("bus", "gen", "branch", "gencost") if f not in fields]
    if math.isnan(base):
        missing.insert(0, "baseMVA")
    if missing:
        raise CaseFormatError(f"{where}: missing mpc.{', mpc.'.join(missing)}; a DC-OPF case needs all of them")
    if not math.isfinite(base):
        raise CaseFormatError(f"{where}: mpc.baseMVA is {base}; it must be a finite number; fix the case file")
    for field in ("bus", "gen", "branch", "gencost"):
        _check_finite(fields[field], field, where)
    return MatpowerCase(
        name=name, base_mva=float(base), bus=fields["bus"], gen=fields["gen"], branch=fields["branch"], gencost=fields["gencost"]
    )


# Columns where MATPOWER writes Inf for "no limit": gen QMAX, QMIN, PMAX, PMIN and the ramp
# rates; branch RATE_A/B/C, ANGMIN, ANGMAX. Anywhere else, and NaN anywhere, is a broken
# file (a NaN load made every DC-OPF row NaN and the solver "certified" a dispatch that
# served none of it; tests/test_attack_optimize.py).
_INF_ALLOWED = {"gen": (3, 4, 8, 9, 16, 17, 18, 19), "branch": (5, 6, 7, 11, 12)}


def _check_finite(m: np.ndarray, field: str, where: Path) -> None:
    bad = ~np.isfinite(m)
    cols = [j for j in _INF_ALLOWED.get(field, ()) if j < m.shape[1]]
    bad[:, cols] &= np.isnan(m[:, cols])
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        raise CaseFormatError(
            f"{where}: mpc.{field} row {r + 1} column {c + 1} is {m[r, c]}; only limits may be Inf and nothing NaN: fix the case file"
        )


def _run_statements(text: str, fields: dict[str, np.ndarray], scalars: dict[str, float], where: Path) -> None:
    """Scalars and the known post-processing statements, in file order; anything else that
    changes the case is refused."""
    skipping = 0  # depth of `if` blocks being skipped
    for raw in text.split("\n"):
        for stmt in (s.strip() for s in re.split(r"(?<=;)", raw)):
            compact = re.sub(r"\s+", "", stmt)
            if not compact or compact == ";":
                continue
            if skipping:
                if re.match(r"^(if|for|while|switch)\b", stmt):
                    skipping += 1
                elif compact in ("end", "end;"):
                    skipping -= 1
                continue
            if stmt.startswith("function") or (compact.startswith("[") and re.search(r"=idx_\w+;?$", compact)):
                continue
            if compact.startswith("mpc.version="):
                continue
            if m := re.match(r"^if\s+(\w+)\s*$", stmt):
                if scalars.get(m.group(1)) == 0:
                    skipping = 1
                    continue
                raise CaseFormatError(
                    f"{where}: 'if {m.group(1)}' runs MATLAB code this reader does not interpret; run the file in MATPOWER, savecase() the result and pass that file"
                )
            if m := _SCALAR.match(compact):
                try:
                    scalars[m.group(1)] = _number(m.group(2))
                    continue
                except ValueError:
                    pass
            action = _KNOWN_STATEMENTS.get(compact if compact.endswith(";") else compact + ";")
            if action is None:
                raise CaseFormatError(
                    f"{where}: the statement {stmt!r} is MATLAB code this reader does not interpret; run the file in MATPOWER, savecase() the result and pass that file"
                )
            _apply(action, fields, scalars, where)


def _apply(action: str, fields: dict[str, np.ndarray], scalars: dict[str, float], where: Path) -> None:
    bus, branch = fields.get("bus"), fields.get("branch")
    try:
        if action == "vbase":
            scalars["Vbase"] = float(bus[0, BASE_KV]) * 1e3
        elif action == "sbase":
            scalars["Sbase"] = scalars["baseMVA"] * 1e6
        elif action == "ohms_to_pu":
            branch[:, [BR_R, BR_X]] /= scalars["Vbase"] ** 2 / scalars["Sbase"]
        elif action == "kw_to_mw":
            bus[:, [PD, QD]] /= 1e3
        elif action == "qd_from_pf":
            bus[:, QD] = bus[:, PD] * math.sin(math.acos(scalars["pf"]))
        elif action == "pd_from_pf":
            bus[:, PD] *= scalars["pf"]
    except (KeyError, TypeError, IndexError) as exc:
        raise CaseFormatError(f"{where}: a unit conversion needs {exc} defined before it; fix the case file") from None


MAX_CASE_BYTES = 64 << 20  # case13659pegase.m, the largest in MATPOWER's data folder, is ~6 MB


def load_case(name_or_path: str | Path) -> MatpowerCase:
    """A case by name ("case14", shipped under domains/data) or by path to a `.m` file."""
    path = Path(name_or_path)
    if path.suffix != ".m":
        path = DATA_DIR / f"{name_or_path}.m"
    if not path.is_file():
        shipped = sorted(p.stem for p in DATA_DIR.glob("*.m"))
        raise CaseFormatError(f"no MATPOWER case at {path}: use one of {', '.join(shipped)} or a path to a .m file")
    try:
        size = path.stat().st_size
        if size > MAX_CASE_BYTES:
            raise CaseFormatError(f"{path}: {size:,} bytes is more than a MATPOWER case may be ({MAX_CASE_BYTES:,}; "
                                  "the largest published cases are under 10 MB): check that this is the right file")
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise CaseFormatError(f"cannot read {path}: {exc.strerror}; check the path and its permissions") from None
    return parse_case(text, name=path.stem, path=path)
