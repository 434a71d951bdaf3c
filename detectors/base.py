"""The detector contract (scikit-learn style) and safe save/load.

Every detector stores only its parameters in ``__init__``; ``fit`` learns from clean data and
returns ``self``; what it learns ends in ``_``. Scores: higher = more suspicious.
``calibrate(clean, fpr)`` sets ``threshold_`` to the ``1 - fpr`` quantile of clean held-out
scores, and ``predict`` flags ``score > threshold_``.

Two families:

* **feature detectors** (``KNNRank``, ``KNNConsistency``, ``PPCAManifold``) work on named
  layers' flattened features: ``fit_features(feats, labels)`` and
  ``score_features(feats, logits)`` where ``feats`` maps a layer name to ``Tensor[N, D]``, so
  several detectors share one forward pass (as in pytorch-ood). ``fit(model, x, y)`` and
  ``score(model, x)`` run the forward pass for you.
* **input detectors** (``SaliencyConcentration``) need the model itself (gradients):
  ``score(model, x)``.

Fitted state (all plain float32 / int64 torch tensors, for the ONNX exporter):

* ``KNNRank``: ``layer`` (str), ``k`` (int), ``metric`` ("cosine" | "l2"), ``bank_``
  Tensor[M, D] float32 (rows already L2-normalised when metric is "cosine"), ``bank_labels_``
  Tensor[M] int64, ``class_ref_scores_`` Tensor[C, Mmax] float32: per class, the sorted
  leave-one-out mean-kNN-distance of that class's training points, padded with +inf;
  ``class_counts_`` Tensor[C] int64 (valid entries per row); ``class_spread_`` Tensor[C]
  float32. With a list of layers, ``parts_`` is a dict layer -> single-layer KNNRank (saved
  as tensors named "<layer>/bank_", ...) and the score is the max of the parts' scores.
  Distance for "cosine" is ``1 - <q, b>`` on unit vectors, for "l2" the Euclidean
  distance. ``d = mean of the k smallest distances``; with ``score="rank"`` (default) and
  predicted class c: ``rank = #(ref_c <= d) / count_c + relu(d - max ref_c) / spread_c``
  (Sabour's rank, extended linearly beyond the largest training score so that far outliers
  are not tied); with ``score="distance"`` the score is ``d``. ``threshold_`` (float).
* ``KNNConsistency``: ``layers`` (list of str), ``k``, ``banks_`` {layer: Tensor[M, D]} unit
  rows (saved as tensors "bank.<layer>"), ``bank_labels_`` Tensor[M]; score = mean over layers
  of the share of the k neighbours whose label differs from the prediction.
* ``PPCAManifold``: ``layer``, ``means_`` Tensor[C, D], ``precisions_`` Tensor[C, D, D],
  ``logdets_`` Tensor[C] (log-determinant of each class covariance), so the log-likelihood of
  x under class c is ``-0.5 * (D * log(2 pi) + logdets_[c] + (x - m_c)^T P_c (x - m_c))``
  (exactly sklearn ``PCA.score_samples``); score = minus that for the predicted class.
  ``components_`` Tensor[C, q, D] gives the angular score. ``threshold_``.
* ``SaliencyConcentration``: ``method`` ("saliency" | "integrated_gradients" | "gradcam"),
  ``layer`` (conv layer for "gradcam"), ``window`` (int), ``threshold_``. Score = the largest
  share of |attribution| mass inside any ``window x window`` square (average-pool then max,
  times window^2 over the total).
* ``BitDepthSqueeze``: ``bits`` (int), ``threshold_``; score = L1 distance between
  softmax(model(x)) and softmax(model(round(x * (2**bits - 1)) / (2**bits - 1))).
* ``Combined``: ``names`` (list), ``ref_`` Tensor[K, N] (each detector's sorted clean
  calibration scores, +inf padded), ``counts_`` Tensor[K], ``top_`` Tensor[K] (largest clean
  score), ``scale_`` Tensor[K] (IQR / 1.349), ``loc_`` (median, informative only). Score =
  max_k [ -log10((1 + #{ref_k >= s_k}) / (counts_k + 1)) + relu(s_k - top_k) / scale_k ]
  (NaN scores count as +inf: fail closed); ``threshold_``.
* ``GuardedModel``: ``.model``, ``.detectors`` (dict name -> detector), ``.combined``.

Saved files are safetensors plus JSON metadata (guard.core.cache) holding the class name, the
parameters and a SHA-256 of every tensor; ``load`` recomputes it and raises ValueError when the
file was altered.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from guard.core.cache import load_tensors, save_tensors
from guard.core.validation import NotFittedError, check_images, check_probability

__all__ = ["Detector", "FeatureDetector", "tensors_digest", "quantile_threshold", "as_feature_dict"]

FORMAT = "guard.detector/1"


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``tensors`` (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def quantile_threshold(scores: torch.Tensor, fpr: float) -> float:
    """The threshold that flags at most a share ``fpr`` of ``scores`` (``score > threshold``).

    Uses the ``ceil((1 - fpr) * n)``-th order statistic, so on the calibration scores the flag
    rate is ``<= fpr``; infinite scores (a failed detector) are ignored.
    """
    s = scores.detach().double().flatten()
    s = s[torch.isfinite(s)]
    if s.numel() == 0:
        raise ValueError("cannot calibrate: got no finite clean scores.")
    s, _ = torch.sort(s)
    idx = min(s.numel() - 1, max(0, math.ceil((1.0 - fpr) * s.numel()) - 1))
    return float(s[idx])


def as_feature_dict(feats: Any, layers: list[str], owner: str) -> dict[str, torch.Tensor]:
    """Accept ``{layer: Tensor}`` or a bare Tensor (for a single-layer detector)."""
    if isinstance(feats, torch.Tensor):
        if len(layers) != 1:
            raise TypeError(f"{owner} uses layers {layers}; pass features as a dict layer -> Tensor[N, D].")
        feats = {layers[0]: feats}
    if not isinstance(feats, Mapping):
        raise TypeError(f"feats must be a dict layer -> Tensor[N, D] (or a Tensor); got {type(feats).__name__}.")
    out = {}
    for layer in layers:
        if layer not in feats:
            raise ValueError(f"{owner} needs features of layer {layer!r}; got layers {sorted(feats)}.")
        f = feats[layer]
        if not isinstance(f, torch.Tensor) or not f.is_floating_point():
            raise TypeError(f"features of layer {layer!r} must be a float Tensor[N, D]; got {type(f).__name__}.")
        f = f.flatten(1) if f.dim() > 2 else f
        if f.dim() != 2:
            raise ValueError(f"features of layer {layer!r} must be 2-D (N, D); got shape {tuple(f.shape)}.")
        if not bool(torch.isfinite(f).all()):
            raise ValueError(f"features of layer {layer!r} must be finite; got NaN/inf values.")
        out[layer] = f.detach().float()
    return out


class Detector:
    """Base class: parameters in ``__init__``, state in ``*_`` attributes, safe save/load.

    Subclasses set ``name`` and implement ``fit`` and ``score``; they list their fitted tensor
    attributes in ``_tensor_attrs`` and their JSON-able fitted scalars in ``_meta_attrs``.
    """

    name: ClassVar[str] = "detector"
    needs_model: ClassVar[bool] = True  # True: scores need the model (gradients), not just features
    _tensor_attrs: ClassVar[tuple[str, ...]] = ()
    _meta_attrs: ClassVar[tuple[str, ...]] = ()

    threshold_: float

    # ---------------------------------------------------------------- parameters
    def get_params(self) -> dict[str, Any]:
        """The ``__init__`` arguments (JSON-friendly)."""
        import inspect

        sig = inspect.signature(type(self).__init__)
        return {p: getattr(self, p) for p in sig.parameters if p != "self" and hasattr(self, p)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # ---------------------------------------------------------------- state checks
    @property
    def is_fitted(self) -> bool:
        return all(hasattr(self, a) for a in self._tensor_attrs + self._meta_attrs) and hasattr(self, "fitted_")

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with clean data first.")

    def _check_calibrated(self) -> None:
        self._check_fitted()
        if not hasattr(self, "threshold_"):
            raise NotFittedError(f"This {type(self).__name__} instance is not calibrated yet. Call 'calibrate' with clean held-out data first.")

    # ---------------------------------------------------------------- api
    def fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> "Detector":
        raise NotImplementedError

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Suspicion scores Tensor[N] (higher = more suspicious)."""
        raise NotImplementedError

    def calibrate(self, clean: Any, fpr: float = 0.05, *, model: nn.Module | None = None) -> float:
        """Set ``threshold_`` so that a share ``fpr`` of clean held-out inputs is flagged.

        Args:
            clean: clean scores Tensor[N] (1-D), or clean images (N, C, H, W) with ``model``.
            fpr: the target false-positive rate, in (0, 1).
            model: needed when ``clean`` are images.

        Returns:
            the threshold (also stored in ``threshold_``).
        """
        fpr = check_probability(fpr, "fpr", type(self).__name__)
        self._check_fitted()
        scores = self._clean_scores(clean, model)
        self.threshold_ = quantile_threshold(scores, fpr)
        self.calibration_fpr_ = fpr
        self.calibration_n_ = int(scores.numel())
        return self.threshold_

    def _clean_scores(self, clean: Any, model: nn.Module | None) -> torch.Tensor:
        if isinstance(clean, torch.Tensor) and clean.dim() == 1:
            if clean.numel() == 0:
                raise ValueError("clean scores must be non-empty; got an empty tensor.")
            return clean
        if isinstance(clean, torch.Tensor) and clean.dim() == 4:
            if model is None:
                raise ValueError("calibrate(clean images) needs model=...; or pass clean scores (a 1-D tensor).")
            check_images(clean, "clean")
            return self.score(model, clean)
        raise TypeError(f"clean must be a 1-D tensor of clean scores or a 4-D tensor of clean images; got {type(clean).__name__} {tuple(getattr(clean, 'shape', ()))}.")

    def predict_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Flags (bool) for precomputed scores: ``score > threshold_`` (NaN flags too)."""
        self._check_calibrated()
        return ~(scores <= self.threshold_)

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Bool flags Tensor[N]: True = suspicious."""
        return self.predict_scores(self.score(model, x))

    # ---------------------------------------------------------------- persistence
    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        return {a: getattr(self, a) for a in self._tensor_attrs}

    def state_meta(self) -> dict[str, Any]:
        meta = {a: getattr(self, a) for a in self._meta_attrs}
        for a in ("threshold_", "calibration_fpr_", "calibration_n_"):
            if hasattr(self, a):
                meta[a] = getattr(self, a)
        return meta

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the fitted state to ``path`` (safetensors + JSON; no pickle)."""
        tensors = {k: v.detach().cpu().clone() for k, v in self.state_tensors().items()}  # no shared storage
        meta = {
            "format": FORMAT,
            "class": type(self).__name__,
            "params": self.get_params(),
            "state": self.state_meta(),
            "sha256": tensors_digest(tensors),
        }
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Detector":
        """Load what :meth:`save` wrote; ValueError if the file is damaged or was altered."""
        tensors, meta = load_tensors(path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is not a saved guard detector (format {meta.get('format')!r}).")
        klass = _registry().get(meta.get("class", ""))
        if klass is None:
            raise ValueError(f"{os.fspath(path)!r} holds an unknown detector class {meta.get('class')!r}.")
        if cls is not Detector and not issubclass(klass, cls):
            raise ValueError(f"{os.fspath(path)!r} holds a {klass.__name__}, not a {cls.__name__}.")
        if tensors_digest(tensors) != meta.get("sha256"):
            raise ValueError(f"detector file {os.fspath(path)!r} was altered: the SHA-256 of its tensors does not match the one recorded when it was saved.")
        det = klass(**meta.get("params", {}))
        for k, v in tensors.items():
            setattr(det, k, v)
        for k, v in meta.get("state", {}).items():
            setattr(det, k, v)
        det.fitted_ = True
        det._after_load()
        return det

    def _after_load(self) -> None:
        """Rebuild derived objects (e.g. a FAISS index) after :meth:`load`."""


class FeatureDetector(Detector):
    """A detector that scores named layers' features; several share one forward pass."""

    needs_model: ClassVar[bool] = False

    @property
    def feature_layers(self) -> list[str]:
        raise NotImplementedError

    def fit_features(self, feats: Any, labels: torch.Tensor) -> "FeatureDetector":
        raise NotImplementedError

    def score_features(self, feats: Any, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *, batch_size: int = 512) -> "FeatureDetector":
        """Extract the features of clean ``x`` and fit on them (``y``: labels; default the model's)."""
        from guard.core.features import extract_features
        from guard.core.validation import check_labels

        check_images(x, "x")
        logits, feats = extract_features(model, x, self.feature_layers, batch_size=batch_size)
        labels = logits.argmax(1) if y is None else check_labels(y, "y", n=int(x.shape[0])).to(logits.device)
        return self.fit_features(feats, labels)

    def score(self, model: nn.Module, x: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
        from guard.core.features import extract_features

        self._check_fitted()
        check_images(x, "x")
        logits, feats = extract_features(model, x, self.feature_layers, batch_size=batch_size)
        return self.score_features(feats, logits)


def _registry() -> dict[str, type[Detector]]:
    import guard.detectors  # noqa: F401  (registers the subclasses)

    out: dict[str, type[Detector]] = {}
    stack = list(Detector.__subclasses__())
    while stack:
        k = stack.pop()
        out[k.__name__] = k
        stack.extend(k.__subclasses__())
    return out
