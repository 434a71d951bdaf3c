"""One flag from several detectors: clean-calibrated tail scores combined by a rule, calibrated to an FPR.

Each detector's score is turned into its empirical p-value among clean held-out calibration
scores, ``p_k = (1 + #{clean_k >= s_k}) / (n + 1)`` (a conformal p-value, Vovk et al.), and
into the tail score ``t_k = -log10(p_k)`` plus, beyond the largest clean score, a linear tail
``(s_k - max clean_k) / scale_k`` (scale = IQR / 1.349) so that far outliers are not tied.
Every detector then speaks on the same scale (its own clean quantiles), whatever its units.
The rule combines the K tail scores into one:

* ``"max"``: ``max_k t_k``, an input is as suspicious as its most suspicious detector finds it
  (the cost: at the same overall FPR each detector works at about FPR / K);
* ``"fisher"``: ``sum_k t_k`` (Fisher's method on the p-values: weak evidence from several
  detectors adds up);
* ``"weighted"``: ``sum_k w_k t_k`` with non-negative weights ``w`` learned by logistic regression
  on clean calibration scores against *proxy* inputs that are not attacks (noise images,
  noise-perturbed and occluded clean images; :func:`guard.guarded` makes them), so no reported
  attack is tuned on; a detector whose weight comes out 0 is dropped.

The combined ``threshold_`` is the ``1 - fpr`` quantile of the combined clean scores
(leave-one-out on the calibration points themselves). Written by hand: a few lines, no library
does it; the logistic regression is scikit-learn's.

``Combined`` is a calibrator, not a detector: it is fitted on clean *scores* of the detectors
it combines, never on images; :func:`tail_scores` and :func:`combine_tails` are the functions
its eager ``combine`` and its export head both run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn

from guard.core.validation import check_probability
from guard.detectors.base import Persistent, quantile_threshold

__all__ = ["Combined", "tail_scores", "combine_tails", "RULES"]

RULES = ("max", "fisher", "weighted")


def tail_scores(
    scores: Sequence[torch.Tensor],
    ref: torch.Tensor,
    counts: torch.Tensor,
    top: torch.Tensor,
    scale: torch.Tensor,
    *,
    leave_one_out: bool = False,
) -> torch.Tensor:
    """(N, K) ``-log10(p_k) + relu(s_k - top_k) / scale_k`` per detector k.

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
    return torch.stack(cols, 1)


def combine_tails(tails: torch.Tensor, rule: str, weights: torch.Tensor) -> torch.Tensor:
    """The combined score (N,) of tail scores (N, K) under ``rule`` (weights used by "weighted")."""
    if rule == "max":
        return tails.amax(1)
    if rule == "fisher":
        return tails.sum(1)
    return (tails * weights[None, :]).sum(1)


class Combined(Persistent):
    """Clean-calibrated tail scores of several detectors, combined by a rule and calibrated to an FPR.

    Args:
        names: the detectors combined, in order (keys of the score dicts).
        rule: "max" (default), "fisher" or "weighted" (see the module docstring).

    Fitted state: ``ref_`` Tensor[K, N] (each detector's sorted finite clean scores, padded
    with +inf), ``counts_`` Tensor[K] (valid entries), ``top_`` Tensor[K] (largest clean
    score), ``loc_`` Tensor[K] (median), ``scale_`` Tensor[K] (IQR / 1.349), ``weights_``
    Tensor[K] (the "weighted" rule's; ones otherwise), ``threshold_``.
    """

    name: ClassVar[str] = "combined"
    _tensor_attrs = ("ref_", "counts_", "top_", "loc_", "scale_", "weights_")
    _meta_attrs = ("names_",)

    def __init__(self, names: Sequence[str] = (), *, rule: str = "max") -> None:
        self.names = list(names)
        self.rule = rule

    def fit_scores(self, clean_scores: Mapping[str, torch.Tensor]) -> Combined:
        """Fit the per-detector references on clean held-out scores {name: Tensor[N]}."""
        if self.rule not in RULES:
            raise ValueError(f"The 'rule' parameter of Combined must be one of {RULES}. Got {self.rule!r}.")
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
        self.weights_ = torch.ones(len(names), dtype=torch.float32)
        self.names_ = list(names)
        self.fitted_ = True
        return self

    def _columns(self, scores: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        self._check_fitted()
        missing = [n for n in self.names_ if n not in scores]
        if missing:
            raise ValueError(f"Combined needs scores for {missing}; got {sorted(scores)}.")
        return [scores[n].detach().float().cpu().reshape(-1) for n in self.names_]

    def tails(self, scores: Mapping[str, torch.Tensor], *, leave_one_out: bool = False) -> torch.Tensor:
        """(N, K) tail scores of per-detector scores {name: Tensor[N]}."""
        return tail_scores(
            self._columns(scores), self.ref_, self.counts_, self.top_, self.scale_, leave_one_out=leave_one_out
        )

    def combine(self, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The combined score Tensor[N] from per-detector scores {name: Tensor[N]}."""
        return combine_tails(self.tails(scores), self.rule, self.weights_)

    def calibrate_scores(
        self,
        clean_scores: Mapping[str, torch.Tensor],
        fpr: float = 0.05,
        *,
        proxy_scores: Mapping[str, torch.Tensor] | None = None,
        weights: torch.Tensor | None = None,
    ) -> float:
        """Fit the references (and, for "weighted", the weights) and set ``threshold_`` on clean held-out scores.

        ``proxy_scores``: the detectors' scores of inputs to learn the "weighted" rule's weights
        against (proxy inputs that are not attacks; see the module docstring). ``weights``: keep
        these weights instead of learning them (recalibrating a fitted rule on other clean data).
        """
        fpr = check_probability(fpr, "fpr", type(self).__name__)
        self.fit_scores(clean_scores)
        # leave-one-out tail scores on the calibration points: with self-inclusion their combined
        # scores would be biased low and the held-out flag rate would exceed fpr
        clean_tails = self.tails(clean_scores, leave_one_out=True)
        if weights is not None:
            if weights.shape != (clean_tails.shape[1],):
                raise ValueError(
                    f"weights must hold one weight per detector ({clean_tails.shape[1]}); got shape {tuple(weights.shape)}."
                )
            self.weights_ = weights.detach().float().clone()
        elif self.rule == "weighted":
            if proxy_scores is None:
                raise ValueError(
                    "Combined(rule='weighted') learns its weights from proxy_scores (scores of non-attack proxy inputs); got None."
                )
            self.weights_ = self._learn_weights(clean_tails, self.tails(proxy_scores))
        self.threshold_ = quantile_threshold(combine_tails(clean_tails, self.rule, self.weights_), fpr)
        self.calibration_fpr_ = fpr
        self.calibration_n_ = int(clean_tails.shape[0])
        return self.threshold_

    @staticmethod
    def _learn_weights(clean: torch.Tensor, proxy: torch.Tensor) -> torch.Tensor:
        """Non-negative logistic-regression weights of the tail scores (clean 0, proxies 1), scaled to sum to K."""
        from sklearn.linear_model import LogisticRegression

        xs = torch.cat([clean, proxy]).double().clamp(max=50.0).numpy()
        ys = torch.cat([torch.zeros(clean.shape[0]), torch.ones(proxy.shape[0])]).numpy()
        lr = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000).fit(xs, ys)
        w = torch.from_numpy(lr.coef_[0]).float().clamp_min(0.0)
        if float(w.sum()) <= 0:
            return torch.ones(clean.shape[1])
        return w * (clean.shape[1] / float(w.sum()))

    def export_head(self) -> nn.Module:
        return _CombinedHead(self)


class _CombinedHead(nn.Module):
    """Combined in the graph: :func:`tail_scores` and :func:`combine_tails` over the graph's detector scores."""

    def __init__(self, comb: Combined) -> None:
        super().__init__()
        comb._check_fitted()
        self.names, self.rule = list(comb.names_), comb.rule
        for name in ("ref_", "counts_", "top_", "scale_", "weights_"):
            self.register_buffer(name.rstrip("_"), getattr(comb, name).detach().clone())

    def forward(self, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
        tails = tail_scores([scores[n] for n in self.names], self.ref, self.counts, self.top, self.scale)
        return combine_tails(tails, self.rule, self.weights)
