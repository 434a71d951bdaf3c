"""ROC curves from saved detector scores, in numpy (the page does not need scikit-learn).

The same convention as :func:`guard.evaluation.detection_metrics`: higher score = more
suspicious, NaN counts as the most suspicious, infinities are clipped beyond the finite range;
ties are one step of the curve, so the trapezoidal area equals scikit-learn's ``roc_auc_score``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["roc_curve", "finite_scores"]


def finite_scores(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both score arrays with NaN -> +inf and +-inf clipped just beyond the finite range."""
    p = np.asarray(pos, dtype=np.float64).ravel()
    n = np.asarray(neg, dtype=np.float64).ravel()
    both = np.concatenate([p, n])
    fin = both[np.isfinite(both)]
    hi = (float(np.abs(fin).max()) + 1.0) * 2.0 if fin.size else 1.0

    def fix(a: np.ndarray) -> np.ndarray:
        a = np.where(np.isnan(a), np.inf, a)
        return np.clip(a, -hi, hi)

    return fix(p), fix(n)


def roc_curve(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(fpr, tpr, auroc) with positives ``pos`` and negatives ``neg``; NaN area when one side is empty."""
    p, n = finite_scores(pos, neg)
    if p.size == 0 or n.size == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0]), float("nan")
    scores = np.concatenate([p, n])
    labels = np.concatenate([np.ones(p.size), np.zeros(n.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]  # the last index of each run of equal scores
    tps = np.cumsum(labels)[last]
    fps = (last + 1) - tps
    tpr = np.r_[0.0, tps / p.size]
    fpr = np.r_[0.0, fps / n.size]
    return fpr, tpr, float(np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr))
