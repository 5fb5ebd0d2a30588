"""A small HiGHS wrapper: one LP/QP built once, re-solved with new row bounds or costs.

    min  0.5 x'Qx + c'x + c0   s.t.  row_lo <= A x <= row_hi,  lo <= x <= hi,  Q = diag(q)

The row matrix and the Hessian are fixed; contexts only move row bounds (and random-vertex
draws only move the cost), so each solve is a warm-started re-solve. The row matrix may be a
numpy array or a scipy.sparse matrix (passed to HiGHS in CSR without densifying); after a
solve, `row_dual` holds HiGHS's row duals (sign convention: minimisation, a dual > 0 means
the row's lower bound binds, < 0 its upper bound).
"""

from __future__ import annotations

import os
import sys
import threading

import highspy
import numpy as np
from scipy import sparse

_quiet_lock = threading.Lock()
_banner_done = False


def quiet_highs() -> highspy.Highs:
    """A silent `Highs()`. HiGHS >= 1.12 prints its banner on the process's stdout from the
    C++ constructor, before `silent()` can run, once per process; the first construction
    runs with file descriptor 1 pointed at /dev/null so that no `scf` command's output (a
    JSON or CSV a user pipes on) ever carries it, whatever highspy version is installed."""
    global _banner_done
    with _quiet_lock:
        if _banner_done:
            h = highspy.Highs()
        else:
            sys.stdout.flush()
            saved = os.dup(1)
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, 1)
                h = highspy.Highs()
            finally:
                os.dup2(saved, 1)
                os.close(saved)
                os.close(devnull)
            _banner_done = True
    h.silent()
    return h


class HighsProgram:
    def __init__(
        self,
        a: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
        *,
        cost: np.ndarray | None = None,
        quad: np.ndarray | None = None,
        offset: float = 0.0,
    ) -> None:
        if sparse.issparse(a):
            csr = sparse.csr_array(a, dtype=float)
            csr.sum_duplicates()
            csr.eliminate_zeros()
        else:
            csr = sparse.csr_array(np.atleast_2d(np.asarray(a, dtype=float)))
        n_row, n_col = csr.shape
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = n_col, n_row
        lp.col_cost_ = np.zeros(n_col) if cost is None else np.asarray(cost, float)
        lp.col_lower_, lp.col_upper_ = np.asarray(lo, float), np.asarray(hi, float)
        lp.row_lower_, lp.row_upper_ = np.full(n_row, -highspy.kHighsInf), np.full(n_row, highspy.kHighsInf)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lp.a_matrix_.start_ = csr.indptr.astype(np.int32)
        lp.a_matrix_.index_ = csr.indices.astype(np.int32)
        lp.a_matrix_.value_ = csr.data.astype(float)
        lp.offset_ = float(offset)
        model = highspy.HighsModel()
        model.lp_ = lp
        if quad is not None and np.any(quad):
            hess = highspy.HighsHessian()
            hess.dim_ = n_col
            hess.format_ = highspy.HessianFormat.kTriangular
            hess.start_ = np.arange(n_col + 1, dtype=np.int32)
            hess.index_ = np.arange(n_col, dtype=np.int32)
            hess.value_ = np.asarray(quad, float)
            model.hessian_ = hess
        self.n_row, self.n_col = n_row, n_col
        self.status = "not solved"
        self.row_dual: np.ndarray | None = None
        self.row_value: np.ndarray | None = None
        self._rows = np.arange(n_row, dtype=np.int32)
        self._cols = np.arange(n_col, dtype=np.int32)
        self._h = quiet_highs()
        self._h.setOptionValue("threads", 1)
        self._h.passModel(model)

    def add_rows(self, a: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        """Append rows (k, n_col) with bounds; later solves take bounds for all rows."""
        csr = sparse.csr_array(np.atleast_2d(np.asarray(a, dtype=float)))
        csr.eliminate_zeros()
        k = csr.shape[0]
        lo = np.where(np.isfinite(lo), lo, -highspy.kHighsInf).astype(float)
        hi = np.where(np.isfinite(hi), hi, highspy.kHighsInf).astype(float)
        self._h.addRows(k, lo, hi, int(csr.nnz), csr.indptr[:-1].astype(np.int32), csr.indices.astype(np.int32), csr.data.astype(float))
        self.n_row += k
        self._rows = np.arange(self.n_row, dtype=np.int32)

    def solve(
        self, row_lo: np.ndarray, row_hi: np.ndarray, *, cost: np.ndarray | None = None, start: np.ndarray | None = None,
        cold: bool = False,
    ) -> np.ndarray | None:
        """The optimal x for these row bounds (and cost, if given), or None if there is no
        optimum (`self.status` says why). `start`, a full column vector, is handed to
        HiGHS as a starting point (a warm start from a candidate decision). By default the
        solve starts from the previous solve's basis: fast, but the last bits of x (and,
        where the optimum is not unique, which optimum) depend on what was solved before.
        `cold` forgets that basis: x is then a function of this LP alone, whatever the
        process solved earlier."""
        h = self._h
        if cold:
            h.clearSolver()
        if start is not None:
            sol = highspy.HighsSolution()
            sol.col_value = np.asarray(start, float).tolist()
            sol.value_valid = True
            h.setSolution(sol)
        if cost is not None:
            h.changeColsCost(self.n_col, self._cols, np.asarray(cost, float))
        row_lo = np.where(np.isfinite(row_lo), row_lo, -highspy.kHighsInf)
        row_hi = np.where(np.isfinite(row_hi), row_hi, highspy.kHighsInf)
        h.changeRowsBounds(self.n_row, self._rows, row_lo.astype(float), row_hi.astype(float))
        h.run()
        status = h.getModelStatus()
        self.status = h.modelStatusToString(status)
        if status != highspy.HighsModelStatus.kOptimal:
            self.row_dual = self.row_value = None
            return None
        solution = h.getSolution()
        self.row_dual = np.array(solution.row_dual) if solution.dual_valid else None
        self.row_value = np.array(solution.row_value)
        return np.array(solution.col_value)

    def iis(self) -> tuple[list[int], list[int]] | None:
        """After an infeasible solve: (rows, columns) of an irreducible infeasible subset
        (HiGHS's IIS: remove any one and the rest can hold), or None if HiGHS finds none."""
        lp = self._h.getLp()  # the constraints alone (HiGHS finds no IIS for a model with a Hessian)
        lp.col_cost_ = np.zeros(lp.num_col_)
        h = quiet_highs()
        h.setOptionValue("threads", 1)
        h.setOptionValue("iis_strategy", 2)  # from the LP (0, the default, only finds trivial conflicts)
        h.passModel(lp)
        h.run()
        status, iis = h.getIis()
        if status != highspy.HighsStatus.kOk or not iis.valid_ or not (len(iis.row_index_) or len(iis.col_index_)):
            return None
        return list(iis.row_index_), list(iis.col_index_)

    def objective(self) -> float:
        return float(self._h.getInfo().objective_function_value)
