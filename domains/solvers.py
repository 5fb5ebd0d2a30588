"""A small HiGHS wrapper: one LP/QP built once, re-solved with new row bounds or costs.

    min  0.5 x'Qx + c'x + c0   s.t.  row_lo <= A x <= row_hi,  lo <= x <= hi,  Q = diag(q)

The row matrix and the Hessian are fixed; contexts only move row bounds (and random-vertex
draws only move the cost), so each solve is a warm-started re-solve.
"""

from __future__ import annotations

import os
import sys
import threading

import highspy
import numpy as np

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
        a = np.atleast_2d(np.asarray(a, dtype=float))
        n_row, n_col = a.shape
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = n_col, n_row
        lp.col_cost_ = np.zeros(n_col) if cost is None else np.asarray(cost, float)
        lp.col_lower_, lp.col_upper_ = np.asarray(lo, float), np.asarray(hi, float)
        lp.row_lower_, lp.row_upper_ = np.full(n_row, -highspy.kHighsInf), np.full(n_row, highspy.kHighsInf)
        rows, cols = np.nonzero(a)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lp.a_matrix_.start_ = np.searchsorted(rows, np.arange(n_row + 1)).astype(np.int32)
        lp.a_matrix_.index_ = cols.astype(np.int32)
        lp.a_matrix_.value_ = a[rows, cols]
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
        self._rows = np.arange(n_row, dtype=np.int32)
        self._cols = np.arange(n_col, dtype=np.int32)
        self._h = quiet_highs()
        self._h.setOptionValue("threads", 1)
        self._h.passModel(model)

    def solve(self, row_lo: np.ndarray, row_hi: np.ndarray, *, cost: np.ndarray | None = None) -> np.ndarray | None:
        """The optimal x for these row bounds (and cost, if given), or None if there is no
        optimum (`self.status` says why)."""
        h = self._h
        if cost is not None:
            h.changeColsCost(self.n_col, self._cols, np.asarray(cost, float))
        row_lo = np.where(np.isfinite(row_lo), row_lo, -highspy.kHighsInf)
        row_hi = np.where(np.isfinite(row_hi), row_hi, highspy.kHighsInf)
        h.changeRowsBounds(self.n_row, self._rows, row_lo.astype(float), row_hi.astype(float))
        h.run()
        status = h.getModelStatus()
        self.status = h.modelStatusToString(status)
        if status != highspy.HighsModelStatus.kOptimal:
            return None
        return np.array(h.getSolution().col_value)

    def objective(self) -> float:
        return float(self._h.getInfo().objective_function_value)
