"""Agreement between two rankings or value lists: Kendall's tau-b, Pearson's r, RMSE."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


# ----------------------------------------------------------------------------- metrics
def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties handled as scipy.stats.kendalltau does), O(n^2).

    tau_b = sum_{i<j} sgn(x_i-x_j) sgn(y_i-y_j) / sqrt(n_x * n_y), where n_x (n_y) counts the
    pairs not tied in x (y). NaN when either sequence is constant or has fewer than 2 items.
    """
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"kendall_tau: expected two 1-D sequences of equal length, got {a.shape} and {b.shape}")
    n = a.size
    if n < 2:
        return float("nan")
    iu = np.triu_indices(n, k=1)
    sa = np.sign(a[:, None] - a[None, :])[iu]
    sb = np.sign(b[:, None] - b[None, :])[iu]
    denom = math.sqrt(float(np.count_nonzero(sa)) * float(np.count_nonzero(sb)))
    return float((sa * sb).sum() / denom) if denom > 0 else float("nan")


def rmse(x: Sequence[float], y: Sequence[float]) -> float:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])

__all__ = ["kendall_tau", "pearson", "rmse"]
