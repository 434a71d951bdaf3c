"""PPCA in-manifold score: how unlikely an input's features are under its predicted class's PPCA.

Sabour et al. ("Adversarial Manipulation of Deep Representations", ICLR 2016, Sec. 4.2) test
whether feature adversaries are inliers with a probabilistic PCA (Tipping & Bishop 1999)
likelihood and with angular consistency. Here each class gets a PPCA fitted by scikit-learn
(``PCA(n_components=q).fit``; its ``score_samples`` is exactly the PPCA log-likelihood), kept
in low-rank form: the class mean, its q principal directions W (q, d), their variances
lambda (q,) and the noise variance sigma^2. With r = x - mean, the covariance
``W^T diag(lambda - sigma^2) W + sigma^2 I`` is never formed; by Woodbury

    (x - mu)^T Sigma^-1 (x - mu) = (|r|^2 - sum_i (1 - sigma^2 / lambda_i) (w_i . r)^2) / sigma^2
    log det Sigma = sum_i log lambda_i + (d - q) log sigma^2

so state is O(C d q) and scoring a batch O(B d q) (never a (B, d, d) or (C, d, d) tensor): a
ResNet-18's 25,088-wide map or 1,000 ImageNet classes fit in memory. The same function
(:func:`ppca_log_likelihood`) scores in eager mode and in the exported graph. Score = minus the
log-likelihood under the predicted class (higher = more suspicious). ``angular_features``
gives Sabour's second test: the sine of the angle between ``x - mean`` and the class's
principal subspace (1 = orthogonal to every principal direction).

The paper's *local* construction (a PPCA on 15 of the guide's 20 nearest neighbours, per
query, mean moved to the guide) is an analysis of one adversary against its guide, not a
serving-time detector: :func:`guard.detectors.local_ppca.local_ppca`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from guard.core.validation import check_float, check_int
from guard.detectors.base import Batch, FeatureDetector, as_feature_dict, fitting_inputs, scoring_inputs

__all__ = ["PPCAManifold", "ppca_log_likelihood", "fit_ppca"]


def fit_ppca(x: np.ndarray, q: int, noise_floor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """scikit-learn's PPCA of rows ``x`` (n, d): (mean (d,), components (q', d), variances (q',), noise variance).

    ``q' = min(q, n - 1, d - 1)``; ``noise_floor`` is added to the noise variance (dead units
    have zero variance) and the variances are kept >= the noise variance, as
    ``PCA.get_covariance`` does.
    """
    from sklearn.decomposition import PCA

    q = max(1, min(q, x.shape[0] - 1, x.shape[1] - 1))
    pca = PCA(n_components=q, svd_solver="full").fit(x)
    noise = float(pca.noise_variance_) + noise_floor
    var = np.maximum(pca.explained_variance_, noise)
    return pca.mean_, pca.components_, var, noise


def _column_variance_mean(f: torch.Tensor, chunk: int = 8192) -> float:
    """The mean over columns of the (ddof 0) variance of rows ``f`` (n, d), in float64, two passes
    over chunks of rows (numpy's ``x.var(0).mean()`` without its (n, d) float64 temporaries)."""
    n = f.shape[0]
    mean = sum(f[i : i + chunk].double().sum(0) for i in range(0, n, chunk)) / n
    sq = sum(((f[i : i + chunk].double() - mean) ** 2).sum(0) for i in range(0, n, chunk))
    return float((sq / n).mean())


def ppca_log_likelihood(
    f: torch.Tensor, mean: torch.Tensor, comps: torch.Tensor, var: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Low-rank PPCA log-likelihood (N,) of rows ``f`` (N, d), each under its own Gaussian.

    ``mean`` (N, d), ``comps`` (N, q, d) orthonormal rows, ``var`` (N, q), ``noise`` (N,): the
    parameters of the Gaussian each row is scored under (gathered by class by the caller).
    The Mahalanobis term is computed as ``|r_perp|^2 / sigma^2 + sum_i (w_i . r)^2 / lambda_i``
    (r_perp: the part of r outside the principal subspace), equal to the Woodbury form of the
    module docstring but without its cancellation in float32. Torch ops only.
    """
    d = f.shape[1]
    r = f - mean
    proj = torch.einsum("nqd,nd->nq", comps, r)
    r_perp = r - torch.einsum("nq,nqd->nd", proj, comps)
    maha = (r_perp * r_perp).sum(1) / noise + (proj * proj / var).sum(1)
    logdet = torch.log(var).sum(1) + (d - var.shape[1]) * torch.log(noise)
    return -0.5 * (d * math.log(2 * math.pi) + logdet + maha)


class PPCAManifold(FeatureDetector):
    """Per-class probabilistic PCA negative log-likelihood of a layer's features (low-rank).

    Args:
        layer: the layer whose pooled features are modelled (e.g. "fc1").
        n_components: principal components q per class (clipped to the class size - 1 and D - 1).
        reg: added to each class's noise variance, relative to the mean feature variance.
        min_class_size: classes with fewer clean examples use the PPCA of all the data.
        batch_size: rows scored at once (the gathered components take batch x q x d floats).
        max_scatter_bytes: a streaming fit (:meth:`partial_fit_features`) keeps each class's
            running sum and (d, d) scatter matrix in float64 while ``C * d * d * 8`` bytes stay
            within this, which gives the same PPCA as the one-shot fit; above it, one
            scikit-learn ``IncrementalPCA`` per class (approximate: Ross et al. 2008), with the
            noise variance from exact running sums of squares.

    Fitted state: ``means_`` (C, D), ``components_`` (C, q, D) (zero rows where a class has
    fewer), ``variances_`` (C, q), ``noise_`` (C,).
    """

    name: ClassVar[str] = "ppca"
    _tensor_attrs = ("means_", "components_", "variances_", "noise_")

    def __init__(
        self,
        layer: str = "fc1",
        *,
        n_components: int = 16,
        reg: float = 1e-3,
        min_class_size: int = 10,
        batch_size: int = 256,
        max_scatter_bytes: int = 2**31,
    ) -> None:
        self.layer = layer
        self.n_components = n_components
        self.reg = reg
        self.min_class_size = min_class_size
        self.batch_size = batch_size
        self.max_scatter_bytes = max_scatter_bytes

    @classmethod
    def default(cls, layers: list[str]) -> PPCAManifold:
        """The PPCA of the head's input."""
        return cls(layers[-1])

    @property
    def feature_layers(self) -> list[str]:
        return [self.layer]

    def _check_params(self) -> None:
        owner = type(self).__name__
        check_int(self.n_components, "n_components", owner, low=1)
        check_int(self.min_class_size, "min_class_size", owner, low=2)
        check_int(self.batch_size, "batch_size", owner, low=1)
        check_int(self.max_scatter_bytes, "max_scatter_bytes", owner, low=0)
        check_float(self.reg, "reg", owner, low=0.0, low_open=True)

    def fit_features(self, feats: Any, labels: torch.Tensor) -> PPCAManifold:
        owner = type(self).__name__
        self._check_params()
        fd, labels = fitting_inputs(feats, labels, [self.layer], owner, min_rows=2)  # one row cannot define a PPCA
        f = fd[self.layer].cpu()
        # float64 one class at a time (scikit-learn's PCA converts each class's rows anyway): a
        # float64 copy of the whole (N, d) matrix, and numpy's full-size temporary for its
        # variance, took 4x the bank (a 270k x 2048 bank: 2.2 GB float32, 9 GB more at the peak)
        floor = self.reg * (_column_variance_mean(f) or 1.0)
        q = self.n_components
        pooled = None  # the PPCA of all the data, for classes too small for their own (fitted only if needed)
        n_classes = int(labels.max()) + 1
        order = torch.argsort(labels, stable=True)
        bounds = torch.cumsum(torch.bincount(labels, minlength=n_classes), 0).tolist()

        def per_class(c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
            nonlocal pooled
            rows = order[(bounds[c - 1] if c else 0) : bounds[c]]
            if rows.numel() >= self.min_class_size:
                return fit_ppca(f[rows].double().numpy(), q, floor)
            pooled = pooled if pooled is not None else fit_ppca(f.double().numpy(), q, floor)
            return pooled

        return self._set_state(n_classes, f.shape[1], per_class)

    def _set_state(self, n_classes: int, d: int, per_class: Any) -> PPCAManifold:
        q_all = min(self.n_components, d - 1) if d > 1 else 1
        self.means_ = torch.zeros(n_classes, d)
        self.components_ = torch.zeros(n_classes, q_all, d)
        self.variances_ = torch.ones(n_classes, q_all)
        self.noise_ = torch.ones(n_classes)
        for c in range(n_classes):
            mean, comps, var, noise = per_class(c)
            k = comps.shape[0]
            self.means_[c] = torch.from_numpy(mean).float()
            self.components_[c, :k] = torch.from_numpy(comps).float()
            self.variances_[c] = noise  # unused directions: the noise variance (no contribution)
            self.variances_[c, :k] = torch.from_numpy(var).float()
            self.noise_[c] = noise
        self.fitted_ = True
        return self

    # ---------------------------------------------------------------- streaming fit
    def partial_fit_features(self, feats: Any, labels: torch.Tensor) -> PPCAManifold:
        """Add one batch of clean features (a streaming fit; :meth:`finish_fit` ends it).

        Keeps per class the count, the sum and the (d, d) scatter of the rows less a shift
        (the first batch's mean, against cancellation), in float64; or, above
        ``max_scatter_bytes``, feeds one ``IncrementalPCA`` per class (see the class docstring).
        """
        from guard.detectors.base import FeatureStream

        st = self.__dict__.get("_stream_fit")
        if st is None:
            self._check_params()
            st = self._stream_fit = {
                "check": FeatureStream([self.layer], type(self).__name__),
                "n": {},
                "sum": {},
                "sq": {},
                "scatter": {},
                "ipca": {},
                "buf": {},
                "shift": None,
            }
        fd, labels = st["check"].add(feats, labels)
        f = fd[self.layer].cpu().double()
        if f.shape[0] == 0:
            return self
        if st["shift"] is None:
            st["shift"] = f.mean(0)
            d = f.shape[1]
            st["exact"] = (int(labels.max()) + 1) * d * d * 8 <= self.max_scatter_bytes
        r = f - st["shift"]
        for c in torch.unique(labels).tolist():
            rc = r[labels == c]
            if c not in st["n"]:
                st["n"][c], st["sum"][c], st["sq"][c] = (
                    0,
                    torch.zeros(r.shape[1], dtype=torch.float64),
                    torch.zeros(r.shape[1], dtype=torch.float64),
                )
                if st["exact"]:
                    st["scatter"][c] = torch.zeros(r.shape[1], r.shape[1], dtype=torch.float64)
            st["n"][c] += int(rc.shape[0])
            st["sum"][c] += rc.sum(0)
            st["sq"][c] += (rc * rc).sum(0)
            if st["exact"]:
                st["scatter"][c] += rc.t() @ rc
            else:
                self._ipca_feed(st, c, rc)
                self._ipca_feed(st, -1, rc)  # the pooled PPCA, for classes too small for their own
        return self

    def _ipca_feed(self, st: dict[str, Any], c: int, rows: torch.Tensor, final: bool = False) -> None:
        from sklearn.decomposition import IncrementalPCA

        buf = st["buf"].setdefault(c, [])
        if rows.shape[0]:
            buf.append(rows.numpy())
        held = sum(b.shape[0] for b in buf)
        chunk = max(256, 4 * self.n_components)  # partial_fit needs at least n_components rows per call
        if held >= 2 * chunk or (final and held):
            x = np.concatenate(buf)
            take = x.shape[0] if final else x.shape[0] - chunk  # keep a chunk back, so the last call is never too small
            q = max(1, min(self.n_components, x.shape[1] - 1))
            if c not in st["ipca"]:
                st["ipca"][c] = IncrementalPCA(n_components=q)
            if take >= q or c in st["ipca"] and hasattr(st["ipca"][c], "components_"):
                if take >= q:
                    st["ipca"][c].partial_fit(x[:take])
                st["buf"][c] = [x[take:]] if take < x.shape[0] else []

    def finish_fit(self) -> PPCAManifold:
        st = self.__dict__.pop("_stream_fit", None)
        if st is None:
            raise ValueError(
                f"{type(self).__name__}.finish_fit: no batch was given to partial_fit_features (an empty stream)."
            )
        st["check"].finish(2)
        shift = st["shift"]
        d = int(shift.shape[0])
        n_all = sum(st["n"].values())
        s_all = sum(st["sum"].values())
        sq_all = sum(st["sq"].values())
        mean_all = s_all / n_all
        floor = self.reg * (float((sq_all / n_all - mean_all**2).clamp_min(0).mean()) or 1.0)  # numpy's var: ddof 0
        q = self.n_components
        pooled: list[Any] = []

        def from_scatter(
            n: int, s: torch.Tensor, scatter: torch.Tensor
        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
            m = s / n
            cov = (scatter - n * torch.outer(m, m)) / (n - 1)
            evals, evecs = torch.linalg.eigh(cov)  # ascending; PCA's explained variances are these, descending
            evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
            qq = max(1, min(q, n - 1, d - 1))
            rank = min(n, d)
            noise = float(evals[qq:rank].mean()) if qq < rank else 0.0  # as PCA.noise_variance_
            noise += floor
            var = np.maximum(evals[:qq].numpy(), noise)
            return (m + shift).numpy(), evecs[:, :qq].t().contiguous().numpy(), var, noise

        def from_ipca(c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
            self._ipca_feed(st, c, torch.zeros(0, d, dtype=torch.float64), final=True)
            ipca = st["ipca"][c]
            n = sum(st["n"].values()) if c == -1 else st["n"][c]
            s = s_all if c == -1 else st["sum"][c]
            sq = sq_all if c == -1 else st["sq"][c]
            m = s / n
            total = float(((sq - n * m * m) / (n - 1)).sum())  # the trace of the covariance, exact
            qq = ipca.components_.shape[0]
            rest = min(n, d) - qq
            noise = max(total - float(ipca.explained_variance_.sum()), 0.0) / rest if rest > 0 else 0.0
            noise += floor
            return (m + shift).numpy(), ipca.components_, np.maximum(ipca.explained_variance_, noise), noise

        def per_class(c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
            if st["n"].get(c, 0) >= self.min_class_size:
                return from_scatter(st["n"][c], st["sum"][c], st["scatter"][c]) if st["exact"] else from_ipca(c)
            if not pooled:
                pooled.append(from_scatter(n_all, s_all, sum(st["scatter"].values())) if st["exact"] else from_ipca(-1))
            return pooled[0]

        return self._set_state(max(st["n"]) + 1, d, per_class)

    def _features(self, feats: Any) -> torch.Tensor:
        self._check_fitted()
        f = as_feature_dict(feats, [self.layer], type(self).__name__)[self.layer].cpu()
        d = int(self.means_.shape[1])
        if f.shape[1] != d:
            raise ValueError(
                f"{type(self).__name__}: features of layer {self.layer!r} must have width {d} (as fitted); got {f.shape[1]}."
            )
        return f

    def _loglik(self, f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        c = c.long().clamp(0, self.means_.shape[0] - 1)  # a reject class maps to the last class, as in the graph
        out = []
        for i in range(0, f.shape[0], self.batch_size):
            ci = c[i : i + self.batch_size]
            out.append(
                ppca_log_likelihood(
                    f[i : i + self.batch_size],
                    self.means_[ci],
                    self.components_[ci],
                    self.variances_[ci],
                    self.noise_[ci],
                )
            )
        return torch.cat(out) if out else torch.zeros(0)

    def log_likelihood(self, feats: Any, classes: torch.Tensor | None = None) -> torch.Tensor:
        """PPCA log-likelihood: Tensor[N] under ``classes`` [N], or Tensor[N, C] for every class."""
        f = self._features(feats)
        if classes is not None:
            return self._loglik(f, classes.cpu())
        n = f.shape[0]
        return torch.stack(
            [self._loglik(f, torch.full((n,), c, dtype=torch.long)) for c in range(self.means_.shape[0])], 1
        )

    def score_features(self, feats: Any, logits: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        scoring_inputs(feats, logits, [self.layer], type(self).__name__)
        return -self.log_likelihood(feats, logits.argmax(1))

    def angular_features(self, feats: Any, logits: torch.Tensor) -> torch.Tensor:
        """Sine of the angle between ``x - mean_c`` and class c's principal subspace, c predicted."""
        f = self._features(feats)
        scoring_inputs(feats, logits, [self.layer], type(self).__name__)
        c = logits.argmax(1).long().cpu().clamp(0, self.means_.shape[0] - 1)
        diff = f - self.means_[c]
        proj = torch.einsum("nqd,nd->nq", self.components_[c], diff)
        cos = proj.norm(dim=1) / diff.norm(dim=1).clamp_min(1e-12)
        return (1.0 - cos.clamp(0, 1) ** 2).clamp_min(0).sqrt()

    def sklearn_pca(self, c: int) -> Any:
        """Class ``c``'s PPCA as a fitted ``sklearn.decomposition.PCA`` (its ``score_samples`` is
        the full-covariance reference the low-rank score equals)."""
        from sklearn.decomposition import PCA

        self._check_fitted()
        keep = self.components_[c].abs().sum(1) > 0
        pca = PCA(n_components=int(keep.sum()))
        pca.mean_ = self.means_[c].double().numpy()
        pca.components_ = self.components_[c][keep].double().numpy()
        pca.explained_variance_ = self.variances_[c][keep].double().numpy()
        pca.noise_variance_ = float(self.noise_[c])
        pca.n_components_ = int(keep.sum())
        pca.n_features_in_ = int(self.means_.shape[1])
        pca.whiten = False
        return pca

    def export_head(self) -> nn.Module:
        return _PPCAHead(self)


class _PPCAHead(nn.Module):
    """PPCAManifold in the graph: the same :func:`ppca_log_likelihood` of the predicted class."""

    def __init__(self, det: PPCAManifold) -> None:
        super().__init__()
        det._check_fitted()
        self.layer = det.layer
        for name in ("means_", "components_", "variances_", "noise_"):
            self.register_buffer(name.rstrip("_"), getattr(det, name).detach().float())

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        c = batch.pred.clamp(0, self.means.shape[0] - 1)
        ll = ppca_log_likelihood(
            batch.features[self.layer].float(), self.means[c], self.components[c], self.variances[c], self.noise[c]
        )
        return {"score": -ll, "loglik": ll}
