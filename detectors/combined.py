"""One flag from several detectors: the max of clean-calibrated tail scores, calibrated to an FPR.

Each detector's score is turned into its empirical p-value among clean held-out calibration
scores, ``p_k = (1 + #{clean_k >= s_k}) / (n + 1)`` (a conformal p-value, Vovk et al.), and
the combined score is ``max_k -log10(p_k)`` plus, beyond the largest clean score, a linear
tail ``(s_k - max clean_k) / scale_k`` (scale = IQR / 1.349) so that far outliers are not tied.
Every detector then speaks on the same scale (its own clean quantiles), whatever its units:
a max of raw z-scores would let the detector with the heaviest clean tail set the threshold
and mute a detector, such as the bounded kNN rank, that separates perfectly. The combined
``threshold_`` is the ``1 - fpr`` quantile of the combined clean scores (leave-one-out on the
calibration points themselves). Written by hand: a few lines, no library does it.

``Combined`` is a calibrator, not a detector: it is fitted on clean *scores* of the detectors
it combines, never on images; :func:`conformal_score` is the one function its eager
``combine`` and its export head both run.
"""

from __future__ import annotations

from typing import ClassVar, Mapping, Sequence

import torch
from torch import nn

from guard.core.validation import check_probability
from guard.detectors.base import Persistent, quantile_threshold

__all__ = ["Combined", "conformal_score"]


def conformal_score(scores: Sequence[torch.Tensor], ref: torch.Tensor, counts: torch.Tensor, top: torch.Tensor,
                    scale: torch.Tensor, *, leave_one_out: bool = False) -> torch.Tensor:
    """Max over detectors k of ``-log10(p_k) + relu(s_k - top_k) / scale_k`` (N,).

    ``ref`` (K, M): each detector's sorted clean scores padded with +inf; ``counts`` (K,) the
    valid entries; NaN scores count as +inf (a failed detector flags: fail closed).
    ``leave_one_out``: the inputs are the calibration points themselves.
    """
    cols = []
    for i, s in enumerate(scores):
        s = s.float()
        s = torch.where(torch.isnan(s), torch.full_like(s, float("inf")), s)
        pad = ref.shape[1] - counts[i].to(s.dtype)  # the +inf padding is >= every s: discount it
        ge = (ref[i][None, :] >= s[:, None]).to(s.dtype).sum(1) - pad
        n = counts[i].to(s.dtype)
        if leave_one_out:  # do not count each calibration point in its own p-value
            ge, n = (ge - 1.0).clamp_min(0.0), n - 1.0
        p = (1.0 + ge) / (n + 1.0)
        cols.append(-torch.log10(p) + (s - top[i]).clamp_min(0.0) / scale[i])
    return torch.stack(cols, 1).amax(1)


class Combined(Persistent):
    """Max over detectors of -log10 of the clean-calibrated p-value (with a linear outer tail).

    Args:
        names: the detectors combined, in order (keys of the score dicts).

    Fitted state: ``ref_`` Tensor[K, N] (each detector's sorted finite clean scores, padded
    with +inf), ``counts_`` Tensor[K] (valid entries), ``top_`` Tensor[K] (largest clean
    score), ``loc_`` Tensor[K] (median), ``scale_`` Tensor[K] (IQR / 1.349), ``threshold_``.
    """

    name: ClassVar[str] = "combined"
    _tensor_attrs = ("ref_", "counts_", "top_", "loc_", "scale_")
    _meta_attrs = ("names_",)

    def __init__(self, names: Sequence[str] = ()) -> None:
        self.names = list(names)

    def fit_scores(self, clean_scores: Mapping[str, torch.Tensor]) -> "Combined":
        """Fit the per-detector references on clean held-out scores {name: Tensor[N]}."""
        names = self.names or list(clean_scores)
        missing = [n for n in names if n not in clean_scores]
        if missing:
            raise ValueError(f"Combined needs clean scores for {missing}; got {sorted(clean_scores)}.")
        locs, scales, refs, tops = [], [], [], []
        for n in names:
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
        self.names_ = list(names)
        self.fitted_ = True
        return self

    def _columns(self, scores: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        self._check_fitted()
        missing = [n for n in self.names_ if n not in scores]
        if missing:
            raise ValueError(f"Combined needs scores for {missing}; got {sorted(scores)}.")
        return [scores[n].detach().float().cpu().reshape(-1) for n in self.names_]

    def combine(self, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The combined score Tensor[N] from per-detector scores {name: Tensor[N]}."""
        return conformal_score(self._columns(scores), self.ref_, self.counts_, self.top_, self.scale_)

    def calibrate_scores(self, clean_scores: Mapping[str, torch.Tensor], fpr: float = 0.05) -> float:
        """Fit the references and set ``threshold_`` on clean held-out scores."""
        fpr = check_probability(fpr, "fpr", type(self).__name__)
        self.fit_scores(clean_scores)
        # leave-one-out p-values on the calibration points: with self-inclusion their combined
        # scores would be biased low and the held-out flag rate would exceed fpr
        loo = conformal_score(self._columns(clean_scores), self.ref_, self.counts_, self.top_, self.scale_, leave_one_out=True)
        self.threshold_ = quantile_threshold(loo, fpr)
        self.calibration_fpr_ = fpr
        self.calibration_n_ = int(loo.numel())
        return self.threshold_

    def export_head(self) -> nn.Module:
        return _CombinedHead(self)


class _CombinedHead(nn.Module):
    """Combined in the graph: :func:`conformal_score` over the graph's detector scores."""

    def __init__(self, comb: Combined) -> None:
        super().__init__()
        comb._check_fitted()
        self.names = list(comb.names_)
        for name in ("ref_", "counts_", "top_", "scale_"):
            self.register_buffer(name.rstrip("_"), getattr(comb, name).detach().clone())

    def forward(self, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return conformal_score([scores[n] for n in self.names], self.ref, self.counts, self.top, self.scale)
