"""Continual-learning metrics over a score matrix, as in the HFT paper (Hui et al., 2025).

``S[j][i]`` is the score on task ``i`` after learning task ``j`` (0-based). The matrix is square
(one row per task learned, one column per task); only the lower triangle (``i <= j``) is read, so
entries above the diagonal may be ``None`` (not measured). Every metric is computed at a row ``t``
(after learning task ``t``), the last row by default:

- ``op(S, t)``: overall performance, the mean of ``S[t][0..t]``.
- ``bwt(S, t)``: backward transfer, the mean over ``i < t`` of ``S[t][i] - S[i][i]``; negative
  means forgetting. Needs ``t >= 1``.
- ``plasticity(S, t)``: the mean of the diagonal ``S[i][i]`` for ``i <= t``: how well each task
  was learned when it was learned. Retention or BWT alone reward a method that learns less;
  read them against plasticity.

    >>> S = [[0.9, None, None],
    ...      [0.7, 0.8, None],
    ...      [0.6, 0.5, 0.9]]
    >>> round(op(S), 4), round(bwt(S), 4), round(plasticity(S), 4)
    (0.6667, -0.3, 0.8667)
    >>> round(op(S, t=1), 4), round(bwt(S, t=1), 4)
    (0.75, -0.2)
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from .errors import HFTError

__all__ = ["MetricError", "op", "bwt", "plasticity", "check_matrix"]


class MetricError(HFTError, ValueError):
    """A score matrix or row index that the continual-learning metrics cannot read."""


def check_matrix(S: Any) -> list[list[float | None]]:
    """Validate ``S`` and return it as a list of lists of floats (``None`` above the diagonal).

    Accepts nested sequences, numpy arrays and torch tensors. Raises :class:`MetricError` naming
    the first problem: not a matrix, empty, not square, a missing or non-finite entry on or below
    the diagonal.
    """
    if hasattr(S, "tolist") and not isinstance(S, (list, tuple)):
        S = S.tolist()
    if isinstance(S, (str, bytes)) or not isinstance(S, Sequence):
        raise MetricError(f"The score matrix must be a list of rows S[j][i]; got {type(S).__name__}.")
    n = len(S)
    if n == 0:
        raise MetricError("The score matrix is empty; it needs one row per task learned.")
    rows: list[list[float | None]] = []
    for j, row in enumerate(S):
        if hasattr(row, "tolist") and not isinstance(row, (list, tuple)):
            row = row.tolist()
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise MetricError(f"Row {j} of the score matrix is {type(row).__name__}, not a sequence of scores.")
        if len(row) != n:
            raise MetricError(
                f"The score matrix must be square (one row per task learned, one column per task): "
                f"row {j} has {len(row)} entries, expected {n}."
            )
        clean: list[float | None] = []
        for i, value in enumerate(row):
            if i > j:
                if value is not None and not _is_number(value):
                    raise MetricError(f"S[{j}][{i}] = {value!r} is not a number or None.")
                clean.append(None if value is None else float(value))
                continue
            if value is None:
                raise MetricError(f"S[{j}][{i}] is missing: every entry on and below the diagonal (i <= j) is needed.")
            if not _is_number(value) or not math.isfinite(float(value)):
                raise MetricError(f"S[{j}][{i}] = {value!r} is not a finite number.")
            clean.append(float(value))
        rows.append(clean)
    return rows


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _row(S: list[list[float | None]], t: int | None) -> int:
    n = len(S)
    if t is None:
        return n - 1
    if isinstance(t, bool) or not isinstance(t, int):
        raise MetricError(f"t={t!r} is not a row index; pass an int in 0..{n - 1} (or None for the last row).")
    if not 0 <= t < n:
        raise MetricError(f"t={t} is outside the score matrix's rows 0..{n - 1}.")
    return t


def op(S: Any, t: int | None = None) -> float:
    """Overall performance after learning task ``t``: the mean of ``S[t][0..t]``."""
    S = check_matrix(S)
    t = _row(S, t)
    return sum(S[t][i] for i in range(t + 1)) / (t + 1)  # type: ignore[misc]


def bwt(S: Any, t: int | None = None) -> float:
    """Backward transfer after learning task ``t``: the mean of ``S[t][i] - S[i][i]`` over ``i < t``."""
    S = check_matrix(S)
    t = _row(S, t)
    if t == 0:
        raise MetricError("Backward transfer needs at least two tasks learned (t >= 1): after the first task nothing can be forgotten yet.")
    return sum(S[t][i] - S[i][i] for i in range(t)) / t  # type: ignore[operator]


def plasticity(S: Any, t: int | None = None) -> float:
    """How well tasks were learned when they were learned: the mean of ``S[i][i]`` for ``i <= t``."""
    S = check_matrix(S)
    t = _row(S, t)
    return sum(S[i][i] for i in range(t + 1)) / (t + 1)  # type: ignore[misc]
