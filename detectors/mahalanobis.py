"""Mahalanobis distance to the closest class, over several layers (Lee et al. 2018, an anchor).

Lee, Lee, Lee, Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
Adversarial Attacks", NeurIPS 2018: at each layer, class-conditional Gaussians with one tied
covariance (fitted by scikit-learn's ``EmpiricalCovariance`` on the class-centred features, as
the paper's code does); the layer's score is the Mahalanobis distance of an input's features
to the closest class mean, ``min_c (f - mu_c)^T Sigma^-1 (f - mu_c)``. The paper combines the
layers with a logistic regression trained on adversarial examples of the attack it then
reports, and sharpens inputs with a gradient step whose size it tunes the same way; neither is
done here (both would tune on the reported attack): the layers are combined by the mean of
their scores standardised on the clean training data (median and IQR), and the input
preprocessing is off by default (``noise`` > 0 turns it on: ``x - noise * sign(grad of the
closest-class distance)``; tune it on attacks you do not report).

Memory: one (d, d) precision per layer, on the pooled features (d <= 1,024 for spatial maps,
:func:`guard.core.features.pool_features`); layers wider than ``max_width`` are refused with a
clear error, so ``guard.wrap`` leaves the detector out of such a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from guard.core.validation import check_float, check_int
from guard.detectors.base import Batch, MultiLayerDetector, as_feature_dict, robust_scale, scoring_inputs

__all__ = ["MahalanobisDetector", "closest_class_distance"]


def closest_class_distance(f: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """``min_c (f - mu_c)^T P (f - mu_c)`` (N,) for rows ``f`` (N, d), class means (C, d), precision (d, d).

    Expanded as ``f P f - 2 f P mu_c + mu_c P mu_c``: O(N d^2 + N C d), no (N, C, d) tensor.
    """
    fp = f @ precision
    quad = (fp * f).sum(1, keepdim=True)
    cross = fp @ means.t()
    mm = ((means @ precision) * means).sum(1)
    return (quad - 2.0 * cross + mm[None, :]).clamp_min(0.0).amin(1)


class MahalanobisDetector(MultiLayerDetector):
    """Closest-class Mahalanobis distance with a tied covariance per layer, layers averaged.

    Args:
        layers: the layers (pooled features) modelled; Lee et al. use every stage's output.
        noise: input-preprocessing step (0: off, the default).
        max_width: refuse layers with more features than this (their precision is d x d).
        scale_sample: the clean rows whose distances set ``loc_`` / ``scale_`` (a seeded uniform
            sample, :class:`guard.core.sampling.BottomK`; all of them up to this many).
        seed: seeds that sample.

    The fit streams (:meth:`partial_fit_features`): per layer the class sums and one (d, d)
    scatter of all rows, in float64, give the class means and the tied covariance
    ``(S - sum_c n_c mu_c mu_c^T) / N`` that ``EmpiricalCovariance(assume_centered=True)`` fits
    on the class-centred rows; its precision is ``scipy.linalg.pinvh``, as scikit-learn's.

    Fitted state per layer i: ``means{i}_`` (C, d), ``precision{i}_`` (d, d); ``loc_`` / ``scale_``
    (L,) the clean median and IQR / 1.349 of each layer's distance.
    """

    name: ClassVar[str] = "mahalanobis"

    def __init__(
        self,
        layers: Sequence[str] = ("fc1",),
        *,
        noise: float = 0.0,
        max_width: int = 4096,
        scale_sample: int = 20_000,
        seed: int = 0,
    ) -> None:
        self._set_layers(layers)
        self.noise = noise
        self.max_width = max_width
        self.scale_sample = scale_sample
        self.seed = seed

    @property
    def _tensor_attrs(self) -> tuple[str, ...]:  # type: ignore[override]
        return (
            *(f"means{i}_" for i in range(len(self.layers))),
            *(f"precision{i}_" for i in range(len(self.layers))),
            "loc_",
            "scale_",
        )

    def fit_features(self, feats: Any, labels: torch.Tensor) -> MahalanobisDetector:
        self.__dict__.pop("_stream_fit", None)
        return self.partial_fit_features(feats, labels).finish_fit()

    def partial_fit_features(self, feats: Any, labels: torch.Tensor) -> MahalanobisDetector:
        """Add one batch of clean features to the running sums (a streaming fit; :meth:`finish_fit` ends it)."""
        from guard.core.sampling import BottomK
        from guard.detectors.base import FeatureStream

        owner = type(self).__name__
        st = self.__dict__.get("_stream_fit")
        if st is None:
            if not self.layers:
                raise ValueError(f"The 'layers' parameter of {owner} must name at least one layer. Got [].")
            check_float(self.noise, "noise", owner, low=0.0)
            check_int(self.max_width, "max_width", owner, low=1)
            check_int(self.scale_sample, "scale_sample", owner, low=2)
            check_int(self.seed, "seed", owner, low=0)
            st = self._stream_fit = {
                "check": FeatureStream(self.layers, owner),
                "sample": BottomK(self.scale_sample, seed=self.seed),
                "counts": torch.zeros(0, dtype=torch.float64),
                "layers": {},
            }
        fd, labels = st["check"].add(feats, labels)
        if labels.numel() == 0:
            return self
        classes = max(int(labels.max()) + 1, st["counts"].shape[0])
        st["counts"] = torch.cat([st["counts"], torch.zeros(classes - st["counts"].shape[0], dtype=torch.float64)])
        st["counts"] += torch.bincount(labels, minlength=classes).double()
        for layer, f in fd.items():
            if f.shape[1] > self.max_width:
                raise ValueError(
                    f"{owner}: layer {layer!r} has {f.shape[1]} features, more than max_width={self.max_width} "
                    "(its precision would be d x d); choose a narrower or pooled layer."
                )
            f = f.cpu().double()
            acc = st["layers"].setdefault(
                layer,
                {
                    "shift": f.mean(0),
                    "sums": torch.zeros(0, f.shape[1], dtype=torch.float64),
                    "scatter": torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64),
                },
            )
            r = f - acc["shift"]
            sums = torch.cat(
                [acc["sums"], torch.zeros(classes - acc["sums"].shape[0], f.shape[1], dtype=torch.float64)]
            )
            acc["sums"] = sums.index_add_(0, labels, r)
            acc["scatter"] += r.t() @ r
        st["sample"].add({layer: f.cpu() for layer, f in fd.items()}, labels)
        return self

    def finish_fit(self) -> MahalanobisDetector:
        from scipy.linalg import pinvh

        owner = type(self).__name__
        st = self.__dict__.pop("_stream_fit", None)
        if st is None:
            raise ValueError(f"{owner}.finish_fit: no batch was given to partial_fit_features (an empty stream).")
        st["check"].finish()
        counts = st["counts"]
        n = float(counts.sum())
        sample, _, _ = st["sample"].result()
        dists = []
        for i, layer in enumerate(self.layers):
            acc = st["layers"][layer]
            present = counts > 0
            centred = acc["sums"] / counts.clamp_min(1)[:, None]  # class means less the shift
            overall = acc["sums"].sum(0) / n
            centred[~present] = overall  # a class without rows: the overall mean (as the one-shot fit always did)
            cov = (acc["scatter"] - (counts[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0)) / n
            if float(torch.trace(cov)) <= 1e-12:  # its (pseudo-)precision would be 0: every input scored 0, blind
                raise ValueError(
                    f"{owner}: the features of layer {layer!r} do not vary over the clean data (zero covariance); "
                    "fit on varied clean images or choose another layer."
                )
            prec = torch.from_numpy(np.asarray(pinvh(cov.numpy(), check_finite=False)))
            means = (centred + acc["shift"]).float()
            setattr(self, f"means{i}_", means)
            setattr(self, f"precision{i}_", prec.float())
            dists.append(closest_class_distance(sample[layer].float(), means, prec.float()))
        self.loc_, self.scale_ = robust_scale(torch.stack(dists, 1))
        self.fitted_ = True
        return self

    def layer_distances(self, feats: Any) -> torch.Tensor:
        """(N, L) closest-class Mahalanobis distance per layer."""
        self._check_fitted()
        fd = as_feature_dict(feats, self.layers, type(self).__name__)
        cols = []
        for i, layer in enumerate(self.layers):
            means, prec = getattr(self, f"means{i}_"), getattr(self, f"precision{i}_")
            f = fd[layer].cpu()
            if f.shape[1] != means.shape[1]:
                raise ValueError(
                    f"{type(self).__name__}: features of layer {layer!r} must have width {means.shape[1]} (as fitted); got {f.shape[1]}."
                )
            cols.append(closest_class_distance(f, means, prec))
        return torch.stack(cols, 1)

    def score_features(self, feats: Any, logits: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        scoring_inputs(feats, logits, self.layers, type(self).__name__)
        return ((self.layer_distances(feats) - self.loc_) / self.scale_).mean(1)

    def score_batch(self, batch: Batch) -> torch.Tensor:
        if self.noise <= 0 or batch.model is None:
            return self.score_features(batch.features, batch.logits)
        return self._preprocessed_score(batch)

    def _preprocessed_score(self, batch: Batch) -> torch.Tensor:
        """Lee et al.'s input preprocessing: one signed step that lowers the distance, then the score."""
        from guard.core.features import FeatureExtractor

        fx = FeatureExtractor(batch.model, self.layers)
        with torch.enable_grad():
            x = batch.x.detach().clone().requires_grad_(True)
            _, feats = fx(x, pool="auto", check=False)
            dist = sum(
                closest_class_distance(
                    feats[layer].float(),
                    getattr(self, f"means{i}_").to(x.device),
                    getattr(self, f"precision{i}_").to(x.device),
                ).sum()
                for i, layer in enumerate(self.layers)
            )
            (g,) = torch.autograd.grad(dist, x)
        with torch.no_grad():
            _, feats = fx((x - self.noise * g.sign()).clamp(0, 1).detach(), pool="auto", check=False)
        return self.score_features(feats, batch.logits)

    def export_head(self) -> nn.Module:
        self._check_fitted()
        if self.noise > 0:
            raise ValueError(
                "MahalanobisDetector with input preprocessing (noise > 0) has no ONNX head; export with noise=0."
            )
        return _MahalanobisHead(self)


class _MahalanobisHead(nn.Module):
    """MahalanobisDetector in the graph: the same :func:`closest_class_distance` per layer, standardised, averaged."""

    def __init__(self, det: MahalanobisDetector) -> None:
        super().__init__()
        self.layers = list(det.layers)
        for i in range(len(self.layers)):
            self.register_buffer(f"means{i}", getattr(det, f"means{i}_").detach().float())
            self.register_buffer(f"precision{i}", getattr(det, f"precision{i}_").detach().float())
        self.register_buffer("loc", det.loc_.detach().float())
        self.register_buffer("scale", det.scale_.detach().float())

    def forward(self, batch: Batch) -> torch.Tensor:
        cols = [
            closest_class_distance(
                batch.features[layer].float(), getattr(self, f"means{i}"), getattr(self, f"precision{i}")
            )
            for i, layer in enumerate(self.layers)
        ]
        return ((torch.stack(cols, 1) - self.loc) / self.scale).mean(1)
