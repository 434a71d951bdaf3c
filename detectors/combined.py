"""One flag from several detectors: the max of clean-calibrated tail scores, calibrated to an FPR.

Each detector's score is turned into its empirical p-value among clean held-out calibration
scores, ``p_k = (1 + #{clean_k >= s_k}) / (n + 1)`` (a conformal p-value, Vovk et al.), and
the combined score is ``max_k -log10(p_k)`` plus, beyond the largest clean score, a linear
tail ``(s_k - max clean_k) / scale_k`` (scale = IQR / 1.349) so that far outliers are not tied.
Every detector then speaks on the same scale (its own clean quantiles), whatever its units:
a max of raw z-scores would let the detector with the heaviest clean tail set the threshold
and mute a detector, such as the bounded kNN rank, that separates perfectly. The combined
``threshold_`` is the ``1 - fpr`` quantile of the combined clean scores. Written by hand: a
few lines, no library does it.
"""

from __future__ import annotations

from typing import ClassVar, Mapping

import torch

from guard.detectors.base import Detector, quantile_threshold
from guard.core.validation import check_probability

__all__ = ["Combined"]


class Combined(Detector):
    """Max over detectors of -log10 of the clean-calibrated p-value (with a linear outer tail).

    Fitted state: ``ref_`` Tensor[K, N] (each detector's sorted finite clean scores, padded
    with +inf), ``counts_`` Tensor[K] (valid entries), ``top_`` Tensor[K] (largest clean
    score), ``loc_`` Tensor[K] (median), ``scale_`` Tensor[K] (IQR / 1.349), ``threshold_``.

    Args:
        names: the detectors combined, in order (keys of the score dicts).
    """

    name: ClassVar[str] = "combined"
    _tensor_attrs = ("ref_", "counts_", "top_", "loc_", "scale_")

    def __init__(self, names: list[str] | tuple[str, ...] = ()) -> None:
        self.names = list(names)

    def fit_scores(self, clean_scores: Mapping[str, torch.Tensor]) -> "Combined":
        """Fit ``loc_`` / ``scale_`` on clean held-out scores {name: Tensor[N]}."""
        if not self.names:
            self.names = list(clean_scores)
        missing = [n for n in self.names if n not in clean_scores]
        if missing:
            raise ValueError(f"Combined needs clean scores for {missing}; got {sorted(clean_scores)}.")
        locs, scales, refs, tops = [], [], [], []
        for n in self.names:
            s = clean_scores[n].detach().double().flatten()
            s = s[torch.isfinite(s)]
            if s.numel() < 2:
                raise ValueError(f"Combined: detector {n!r} needs at least 2 finite clean scores; got {s.numel()}.")
            q = torch.quantile(s, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
            scale = float(q[2] - q[0]) / 1.349
            if scale <= 1e-12:
                scale = float(s.std()) if float(s.std()) > 1e-12 else 1.0
            locs.append(float(q[1]))
            scales.append(scale)
            refs.append(torch.sort(s.float()).values)
            tops.append(float(s.max()))
        width = max(r.numel() for r in refs)
        self.ref_ = torch.full((len(refs), width), float("inf"))
        for i, r in enumerate(refs):
            self.ref_[i, : r.numel()] = r
        self.counts_ = torch.tensor([r.numel() for r in refs], dtype=torch.int64)
        self.top_ = torch.tensor(tops, dtype=torch.float32)
        self.loc_ = torch.tensor(locs, dtype=torch.float32)
        self.scale_ = torch.tensor(scales, dtype=torch.float32)
        self.fitted_ = True
        return self

    def combine(self, scores: Mapping[str, torch.Tensor], *, _leave_one_out: bool = False) -> torch.Tensor:
        """The combined score Tensor[N] from per-detector scores {name: Tensor[N]}."""
        self._check_fitted()
        missing = [n for n in self.names if n not in scores]
        if missing:
            raise ValueError(f"Combined needs scores for {missing}; got {sorted(scores)}.")
        cols = []
        for i, n in enumerate(self.names):
            s = scores[n].detach().float().cpu().reshape(-1)
            s = torch.where(torch.isnan(s), torch.full_like(s, float("inf")), s)  # fail closed
            pad = float(self.ref_.shape[1] - self.counts_[i])  # +inf padding is >= every s: discount it
            ge = (self.ref_[i][None, :] >= s[:, None]).sum(1).float() - pad
            n = float(self.counts_[i])
            if _leave_one_out:  # the calibration points themselves: do not count each point in its own p-value
                ge, n = (ge - 1.0).clamp_min(0.0), n - 1.0
            p = (1.0 + ge) / (n + 1.0)
            tail = (s - self.top_[i]).clamp_min(0.0) / self.scale_[i]
            cols.append(-torch.log10(p) + tail)
        return torch.stack(cols, 1).max(1).values

    def calibrate_scores(self, clean_scores: Mapping[str, torch.Tensor], fpr: float = 0.05) -> float:
        """Fit the standardisation and set ``threshold_`` on clean held-out scores."""
        fpr = check_probability(fpr, "fpr", type(self).__name__)
        self.fit_scores(clean_scores)
        # leave-one-out p-values on the calibration points: with self-inclusion their combined
        # scores would be biased low and the held-out flag rate would exceed fpr
        self.threshold_ = quantile_threshold(self.combine(clean_scores, _leave_one_out=True), fpr)
        self.calibration_fpr_ = fpr
        return self.threshold_

    def state_meta(self) -> dict:
        meta = super().state_meta()
        meta["names"] = self.names
        return meta
