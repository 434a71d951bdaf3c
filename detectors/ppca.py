"""PPCA in-manifold score: how unlikely an input's features are under its predicted class's PPCA.

Sabour et al. ("Adversarial Manipulation of Deep Representations", ICLR 2016, Sec. 4.2) test
whether feature adversaries are inliers with a probabilistic PCA (Tipping & Bishop 1999)
likelihood and with angular consistency. Here each class gets a PPCA fitted by scikit-learn
(``PCA(n_components=q).fit``; its ``score_samples`` is exactly the PPCA log-likelihood); its
Gaussian (mean, precision, log-determinant) is kept as plain tensors so that scoring, and the
ONNX export, are matmuls. Score = negative log-likelihood under the predicted class (higher =
more suspicious). ``angular_features`` gives the second score: the sine of the angle between
``x - mean`` and the class's principal subspace (1 = orthogonal to every principal direction).

The paper's *local* construction (a PPCA on 15 of the guide's 20 nearest neighbours) is not
implemented: with 15 points in 128 dimensions the PPCA needs a hand-set noise floor, and one
model per query does not export; per-class PPCA keeps the same likelihood test with a stable fit.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch

from guard.detectors.base import FeatureDetector, as_feature_dict
from guard.core.validation import check_float, check_int, check_labels

__all__ = ["PPCAManifold"]


class PPCAManifold(FeatureDetector):
    """Per-class probabilistic PCA negative log-likelihood of a layer's features.

    Args:
        layer: the layer whose flattened features are modelled (e.g. "fc1").
        n_components: principal components q per class (clipped to the class size - 1 and D - 1).
        reg: added to the noise variance for numerical stability (relative to the mean
            feature variance).
        min_class_size: classes with fewer clean examples fall back to the pooled PPCA.
    """

    name: ClassVar[str] = "ppca"
    _tensor_attrs = ("means_", "precisions_", "logdets_", "components_")

    def __init__(self, layer: str = "fc1", *, n_components: int = 16, reg: float = 1e-3, min_class_size: int = 10) -> None:
        self.layer = layer
        self.n_components = n_components
        self.reg = reg
        self.min_class_size = min_class_size

    @property
    def feature_layers(self) -> list[str]:
        return [self.layer]

    @staticmethod
    def _fit_one(f: np.ndarray, q: int, reg: float) -> tuple[Any, np.ndarray, np.ndarray, float, np.ndarray]:
        from sklearn.decomposition import PCA

        q = max(1, min(q, f.shape[0] - 1, f.shape[1] - 1))
        pca = PCA(n_components=q, svd_solver="full").fit(f)
        pca.noise_variance_ = pca.noise_variance_ + reg  # floor: dead ReLU units have zero variance
        cov = pca.get_covariance()
        prec = pca.get_precision()
        sign, logdet = np.linalg.slogdet(cov)
        if sign <= 0:
            raise ValueError("PPCAManifold: a class covariance is not positive definite; raise 'reg'.")
        comps = np.zeros((q, f.shape[1]), dtype=np.float64)
        comps[:q] = pca.components_
        return pca, pca.mean_, prec, float(logdet), comps

    def fit_features(self, feats: Any, labels: torch.Tensor) -> "PPCAManifold":
        owner = type(self).__name__
        check_int(self.n_components, "n_components", owner, low=1)
        check_int(self.min_class_size, "min_class_size", owner, low=2)
        check_float(self.reg, "reg", owner, low=0.0, low_open=True)
        f = as_feature_dict(feats, [self.layer], owner)[self.layer].cpu()
        if f.shape[0] < 2:
            raise ValueError(f"{owner}: fit needs at least 2 clean examples (an empty or one-row bank cannot define a PPCA); got {f.shape[0]}.")
        labels = check_labels(labels, "labels", n=int(f.shape[0])).cpu()
        x = f.double().numpy()
        scale = float(x.var(0).mean()) or 1.0
        reg = self.reg * scale
        q = self.n_components
        pooled = self._fit_one(x, q, reg)
        n_classes = int(labels.max()) + 1
        means, precs, logdets, comps = [], [], [], []
        self.pcas_ = []
        for c in range(n_classes):
            xc = x[(labels == c).numpy()]
            fit = self._fit_one(xc, q, reg) if xc.shape[0] >= self.min_class_size else pooled
            self.pcas_.append(fit[0])
            means.append(fit[1])
            precs.append(fit[2])
            logdets.append(fit[3])
            cp = np.zeros((q, x.shape[1]))
            cp[: fit[4].shape[0]] = fit[4]
            comps.append(cp)
        self.means_ = torch.from_numpy(np.stack(means)).float()
        self.precisions_ = torch.from_numpy(np.stack(precs)).float()
        self.logdets_ = torch.tensor(logdets, dtype=torch.float32)
        self.components_ = torch.from_numpy(np.stack(comps)).float()
        self.fitted_ = True
        return self

    def _features(self, feats: Any) -> torch.Tensor:
        self._check_fitted()
        f = as_feature_dict(feats, [self.layer], type(self).__name__)[self.layer].cpu()
        d = int(self.means_.shape[1])
        if f.shape[1] != d:
            raise ValueError(f"{type(self).__name__}: features of layer {self.layer!r} must have width {d} (as fitted); got {f.shape[1]}.")
        return f

    def log_likelihood(self, feats: Any, classes: torch.Tensor | None = None) -> torch.Tensor:
        """PPCA log-likelihood: Tensor[N] under ``classes`` [N], or Tensor[N, C] for every class."""
        f = self._features(feats).double()
        d = f.shape[1]
        means, precs, logdets = self.means_.double(), self.precisions_.double(), self.logdets_.double()
        const = d * math.log(2 * math.pi)
        if classes is not None:
            c = classes.long().cpu().clamp(0, means.shape[0] - 1)
            diff = f - means[c]
            maha = torch.einsum("nd,nde,ne->n", diff, precs[c], diff)
            return (-0.5 * (const + logdets[c] + maha)).float()
        diff = f[:, None, :] - means[None]  # [N, C, D]
        maha = torch.einsum("ncd,cde,nce->nc", diff, precs, diff)
        return (-0.5 * (const + logdets[None] + maha)).float()

    def score_features(self, feats: Any, logits: torch.Tensor) -> torch.Tensor:
        return -self.log_likelihood(feats, logits.argmax(1))

    def angular_features(self, feats: Any, logits: torch.Tensor) -> torch.Tensor:
        """Sine of the angle between ``x - mean_c`` and class c's principal subspace, c predicted."""
        f = self._features(feats)
        c = logits.argmax(1).long().cpu().clamp(0, self.means_.shape[0] - 1)
        diff = f - self.means_[c]
        proj = torch.einsum("nqd,nd->nq", self.components_[c], diff)
        cos = proj.norm(dim=1) / diff.norm(dim=1).clamp_min(1e-12)
        return (1.0 - cos.clamp(0, 1) ** 2).clamp_min(0).sqrt()
