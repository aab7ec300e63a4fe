"""Statistics of the reports: mean ± std over seeds, the paired test of two models over seeds, and rank
correlation."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def paired_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p of the paired t-test of a against b over seeds (1.0 when every difference is 0)."""
    from scipy import stats

    d = np.asarray(a) - np.asarray(b)
    if len(d) < 2 or not np.any(d):
        return 1.0
    if np.all(d == d[0]):
        return 0.0
    return float(stats.ttest_rel(a, b).pvalue)


def mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs))


def std(xs: Sequence[float]) -> float:
    """The sample standard deviation over seeds (0 for one value)."""
    return float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def fmt(xs: Sequence[float]) -> str:
    """``mean ± std`` over seeds, the mean alone for one value.

    >>> fmt([0.1, 0.2, 0.3]), fmt([0.25])
    ('0.2000 ± 0.1000', '0.2500')
    """
    return f"{mean(xs):.4f} ± {std(xs):.4f}" if len(xs) > 1 else f"{mean(xs):.4f}"


def ranks(x: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank.

    >>> ranks([0.3, 0.1, 0.3, 0.2]).tolist()
    [3.5, 1.0, 3.5, 2.0]
    """
    a = np.asarray(x, dtype=float)
    order = np.argsort(a, kind="stable")
    r = np.empty(len(a))
    r[order] = np.arange(1, len(a) + 1)
    for v in np.unique(a):
        r[a == v] = r[a == v].mean()
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's on the ranks, ties averaged); NaN under 3 points.

    >>> round(spearman([1, 2, 3, 4], [10, 20, 40, 30]), 4)
    0.8
    """
    if len(x) < 3:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])
