"""Exact binomial intervals: one implementation for every rate guard reports (evaluation, robustness, adaptive attacks).

:func:`clopper_pearson` is the checked form (a pair; bad counts raise); :func:`rate_interval` is
the form results files carry (a list, ``None`` for an empty sample).
"""

from __future__ import annotations

import numpy as np

__all__ = ["CONFIDENCE", "clopper_pearson", "rate_interval"]

#: the confidence of every interval guard reports
CONFIDENCE = 0.95


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact (Clopper & Pearson 1934) two-sided interval of a binomial proportion k / n.

    The bounds are Beta quantiles: ``Beta(a/2; k, n-k+1)`` and ``Beta(1-a/2; k+1, n-k)`` with
    a = 1 - confidence, and 0 / 1 at k = 0 / k = n (``scipy.stats.beta``; the same interval as
    ``scipy.stats.binomtest(k, n).proportion_ci(method="exact")``).
    """
    from scipy.stats import beta

    if (
        isinstance(k, bool)
        or isinstance(n, bool)
        or not isinstance(k, (int, np.integer))
        or not isinstance(n, (int, np.integer))
    ):
        raise TypeError(f"k and n must be ints; got {type(k).__name__} and {type(n).__name__}.")
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"clopper_pearson needs 0 <= k <= n and n >= 1; got k={k}, n={n}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1); got {confidence!r}.")
    a = 1.0 - confidence
    lo = 0.0 if k == 0 else float(beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def rate_interval(k: int, n: int, level: float = CONFIDENCE) -> list[float] | None:
    """:func:`clopper_pearson` of ``k`` in ``n`` as ``[lo, hi]``; ``None`` when ``n`` is 0 (no sample, no interval)."""
    if n == 0:
        return None
    return list(clopper_pearson(int(k), int(n), level))
