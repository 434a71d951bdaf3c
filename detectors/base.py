"""The detector contract (scikit-learn style), the serving batch, and safe save/load.

Every detector stores only its parameters in ``__init__``; ``fit`` learns from clean data and
returns ``self``; what it learns ends in ``_``. Scores: higher = more suspicious.
``calibrate(clean, fpr)`` sets ``threshold_`` to the ``1 - fpr`` quantile of clean held-out
scores, and ``predict`` flags ``score > threshold_``.

Each detector owns three things, so that ``guard.GuardedModel`` and the exported ONNX graph
just loop over detectors (adding a detector touches one file):

* ``score_batch(batch)``: its serving score from one :class:`Batch` (the images, the logits,
  the named pooled features and the model of one forward pass);
* ``fit_batch(batch, labels)``: its fit from the same kind of batch, over clean training data;
* ``export_head()``: an ``nn.Module`` whose ``forward(batch)`` computes the same score with
  plain torch ops (the helpers it shares with ``score_batch``), traced into the ONNX graph.

Feature detectors (``FeatureDetector``: kNN, PPCA) also take features directly,
``fit_features(feats, labels)`` / ``score_features(feats, logits)`` with
``feats = {layer: Tensor[N, D]}`` (as pytorch-ood), so several share one forward pass.
``fit(model, x, y)`` and ``score(model, x)`` run the forward pass for you.

Fitted state is plain float32 / int64 tensors (listed in each class's ``_tensor_attrs``) and
JSON scalars (``_meta_attrs``), saved as safetensors plus JSON (:class:`Persistent`): no pickle.
The file's seal (:mod:`guard.core.integrity`) covers all of it: the tensors, the parameters,
the threshold, the class and the format; with ``key=`` it is an HMAC-SHA256.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from guard.core.features import Batch, extract_features
from guard.core.integrity import load_sealed, resolve_key, save_sealed, tensors_digest
from guard.core.models import eval_mode, model_device
from guard.core.validation import (
    NotFittedError,
    call_model,
    check_images,
    check_labels,
    check_logits,
    check_probability,
)

__all__ = [
    "Batch",
    "Persistent",
    "Detector",
    "FeatureDetector",
    "MultiLayerDetector",
    "tensors_digest",
    "quantile_threshold",
    "as_feature_dict",
    "scoring_inputs",
    "fitting_inputs",
    "FeatureStream",
    "STREAM_HEAD_IMAGES",
    "robust_scale",
    "registry",
]

FORMAT = "guard.detector/2"
#: What an input detector (saliency, squeeze) keeps of a streaming fit: the first images.
STREAM_HEAD_IMAGES = 1024
LEGACY_FORMATS = ("guard.detector/1",)  # sealed its tensors only; loads only with expected_sha256


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


def robust_scale(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of ``values`` (N, L): the median and IQR / 1.349 (a robust sigma; >= 1e-6), float32.

    How multi-layer detectors put their layers on one scale from clean data alone.
    """
    v = values.detach().double()
    q = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), dim=0)
    return q[1].float(), ((q[2] - q[0]) / 1.349).clamp_min(1e-6).float()


_F32_MAX = 3.4e38


def as_feature_dict(feats: Any, layers: list[str], owner: str) -> dict[str, torch.Tensor]:
    """Accept ``{layer: Tensor}`` or a bare Tensor (for a single-layer detector); checked, (N, D) float.

    Every layer must hold the same N rows, with data (not the meta device), finite and small
    enough that squared distances stay finite in float32 (else every distance is inf and the
    detector would score blindly).
    """
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
            raise TypeError(
                f"features of layer {layer!r} must be a float Tensor[N, D]; got {type(f).__name__}"
                f"{' of dtype ' + str(f.dtype) if isinstance(f, torch.Tensor) else ''}."
            )
        if f.is_meta:
            raise ValueError(
                f"features of layer {layer!r} are on the meta device (a tensor without data); expected 'cpu' or 'cuda'."
            )
        f = f.flatten(1) if f.dim() > 2 else f
        if f.dim() != 2:
            raise ValueError(f"features of layer {layer!r} must be 2-D (N, D); got shape {tuple(f.shape)}.")
        if not bool(torch.isfinite(f).all()):
            raise ValueError(f"features of layer {layer!r} must be finite; got NaN/inf values.")
        if f.numel() and float(f.detach().abs().max().double()) ** 2 * f.shape[1] > _F32_MAX:
            raise ValueError(
                f"features of layer {layer!r} are too large (|value| up to {float(f.detach().abs().max()):.3g}): their "
                "squared distances overflow float32; scale the features or choose another layer."
            )
        out[layer] = f.detach().float()
    rows = {layer: int(f.shape[0]) for layer, f in out.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"{owner}: every layer must hold the same number of rows; got {rows}.")
    return out


def scoring_inputs(feats: Any, logits: Any, layers: list[str], owner: str) -> dict[str, torch.Tensor]:
    """The checked features of :meth:`FeatureDetector.score_features` and their logits (N, C), finite."""
    fd = as_feature_dict(feats, layers, owner)
    if isinstance(logits, torch.Tensor) and logits.is_meta:
        raise ValueError("logits are on the meta device (a tensor without data); expected 'cpu' or 'cuda'.")
    check_logits(logits, "logits", n=int(next(iter(fd.values())).shape[0]))
    return fd


def fitting_inputs(
    feats: Any, labels: Any, layers: list[str], owner: str, *, min_rows: int = 1
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The checked clean features of :meth:`FeatureDetector.fit_features` and their labels.

    Refuses a bank of fewer than ``min_rows`` rows and features that are the same for every
    clean example (a detector fitted on them scores every input alike: silently blind).
    """
    stream = FeatureStream(layers, owner)
    fd, labels = stream.add(feats, labels)
    stream.finish(min_rows)
    return fd, labels


class FeatureStream:
    """The checks of :func:`fitting_inputs`, made batch by batch over a streaming fit.

    ``add`` checks one batch (as :func:`as_feature_dict` and ``check_labels``; every batch must
    keep the widths of the first) and tracks whether any row differs from the first one;
    ``finish`` refuses too few rows and features that never varied.
    """

    def __init__(self, layers: list[str], owner: str) -> None:
        self.layers, self.owner = list(layers), owner
        self.n = 0
        self._first: dict[str, torch.Tensor] = {}
        self._varies: dict[str, bool] = {}

    def add(self, feats: Any, labels: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        fd = as_feature_dict(feats, self.layers, self.owner)
        n = int(next(iter(fd.values())).shape[0])
        labels = check_labels(labels, "labels", n=n).cpu()
        for layer, f in fd.items():
            if layer not in self._first:
                if n == 0:
                    continue
                self._first[layer] = f[:1].clone()
                self._varies[layer] = False
            elif f.shape[1] != self._first[layer].shape[1]:
                raise ValueError(
                    f"{self.owner}: features of layer {layer!r} must keep the width of the first batch "
                    f"({self._first[layer].shape[1]}); got {f.shape[1]}."
                )
            if not self._varies[layer] and n:
                self._varies[layer] = not bool((f == self._first[layer].to(f.device)).all())
        self.n += n
        return fd, labels

    def finish(self, min_rows: int = 1) -> None:
        if self.n < min_rows:
            raise ValueError(
                f"{self.owner}: fit needs at least {min_rows} clean example(s); got {'an empty feature bank' if self.n == 0 else self.n}."
            )
        for layer, varies in self._varies.items():
            if self.n > 1 and not varies:
                raise ValueError(
                    f"{self.owner}: the features of layer {layer!r} do not vary over the clean data (every row is the same); "
                    "fit on varied clean images or choose another layer."
                )


def registry() -> dict[str, type[Persistent]]:
    """Class name -> class of everything ``Persistent.load`` can rebuild (detectors and combiners)."""
    import guard.detectors  # noqa: F401  (imports every subclass)

    out: dict[str, type[Persistent]] = {}
    stack = list(Persistent.__subclasses__())
    while stack:
        k = stack.pop()
        out[k.__name__] = k
        stack.extend(k.__subclasses__())
    return out


class Persistent:
    """Parameters from ``__init__``'s signature, fitted state in ``*_`` attributes, safe save/load.

    Subclasses list their fitted tensor attributes in ``_tensor_attrs`` and their JSON-able
    fitted scalars in ``_meta_attrs``; ``get_params`` reads ``__init__``'s signature (every
    parameter is stored under its own name), as in scikit-learn.
    """

    _tensor_attrs: ClassVar[tuple[str, ...]] = ()
    _meta_attrs: ClassVar[tuple[str, ...]] = ()
    _calibration_attrs: ClassVar[tuple[str, ...]] = ("threshold_", "calibration_fpr_", "calibration_n_")

    def get_params(self) -> dict[str, Any]:
        """The ``__init__`` arguments (JSON-friendly)."""
        sig = inspect.signature(type(self).__init__)
        return {p: getattr(self, p) for p in sig.parameters if p != "self" and hasattr(self, p)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "fitted_") and all(hasattr(self, a) for a in self._tensor_attrs + self._meta_attrs)

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with clean data first."
            )

    def _check_calibrated(self) -> None:
        self._check_fitted()
        if not hasattr(self, "threshold_"):
            raise NotFittedError(
                f"This {type(self).__name__} instance is not calibrated yet. Call 'calibrate' with clean held-out data first."
            )

    def predict_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Flags (bool) for precomputed scores: ``score > threshold_`` (NaN flags too)."""
        self._check_calibrated()
        return ~(scores <= self.threshold_)

    # ---------------------------------------------------------------- persistence
    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        return {a: getattr(self, a) for a in self._tensor_attrs}

    def state_meta(self) -> dict[str, Any]:
        meta = {a: getattr(self, a) for a in self._meta_attrs}
        for a in self._calibration_attrs:
            if hasattr(self, a):
                meta[a] = getattr(self, a)
        return meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Set the fitted state read from a file (subclasses rebuild derived objects here)."""
        for k, v in tensors.items():
            setattr(self, k, v)
        for k, v in meta.items():
            setattr(self, k, v)
        self.fitted_ = True

    def _write(self, path: str | os.PathLike[str], key: bytes | None, digest_file: bool) -> str:
        tensors = {k: v.detach().cpu().clone() for k, v in self.state_tensors().items()}  # no shared storage
        meta = {"format": FORMAT, "class": type(self).__name__, "params": self.get_params(), "state": self.state_meta()}
        return save_sealed(path, tensors, meta, key=key, digest_file=digest_file)

    def save(self, path: str | os.PathLike[str], *, key: bytes | None = None, key_env: str | None = None) -> str:
        """Write the fitted state to ``path`` (safetensors + JSON; no pickle), sealed.

        Args:
            path: the file to write (atomically).
            key: sign with HMAC-SHA256 under this secret (bytes, at least 16); :meth:`load`
                then needs the same key.
            key_env: read the key from this environment variable instead.

        Returns:
            the SHA-256 of the written file, also written to ``PATH.sha256``: keep it where a
            writer of ``path`` cannot reach and pass it to ``load(..., expected_sha256=...)``.
        """
        return self._write(path, resolve_key(key, key_env), True)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        key: bytes | None = None,
        key_env: str | None = None,
        expected_sha256: str | None = None,
    ) -> Persistent:
        """Load what :meth:`save` wrote; ValueError if the file is damaged, altered or of another class.

        Args:
            path: the file.
            key / key_env: the key it was signed with; a signed file without it, or with
                another, raises, and so does an unsigned file when a key is given.
            expected_sha256: the digest :meth:`save` returned; the file must match it.
        """
        tensors, meta = load_sealed(
            path,
            key=resolve_key(key, key_env),
            expected_sha256=expected_sha256,
            what="detector file",
            legacy_formats=LEGACY_FORMATS,
        )
        if (
            meta.get("format") != FORMAT and meta.get("format") not in LEGACY_FORMATS
        ):  # legacy: pinned by expected_sha256
            raise ValueError(
                f"{os.fspath(path)!r} is not a saved guard detector (format {meta.get('format')!r}; expected {FORMAT!r})."
            )
        klass = registry().get(meta.get("class", ""))
        if klass is None:
            raise ValueError(f"{os.fspath(path)!r} holds an unknown detector class {meta.get('class')!r}.")
        if cls is not Persistent and not issubclass(klass, cls):
            raise ValueError(f"{os.fspath(path)!r} holds a {klass.__name__}, not a {cls.__name__}.")
        try:
            obj = klass(**meta.get("params", {}))
            obj.load_state(tensors, meta.get("state", {}))
        except (TypeError, ValueError, KeyError, RuntimeError) as err:
            raise ValueError(
                f"{os.fspath(path)!r}: cannot rebuild the {klass.__name__} it holds: {type(err).__name__}: {err}"
            ) from err
        return obj


class Detector(Persistent):
    """Base class of every detector (see the module docstring for the contract)."""

    name: ClassVar[str] = "detector"

    threshold_: float

    @property
    def feature_layers(self) -> list[str]:
        """The layers whose features :meth:`score_batch` reads (none for input detectors)."""
        return []

    @classmethod
    def default(cls, layers: list[str]) -> Detector:
        """This detector as ``guard.wrap`` configures it, given the model's feature layers in
        network order (the last is the head's input)."""
        return cls()

    # ---------------------------------------------------------------- what subclasses write
    def fit_batch(self, batch: Batch, labels: torch.Tensor) -> Detector:
        """Fit on clean training data given as one batch (features of every image, a few images)."""
        raise NotImplementedError

    def score_batch(self, batch: Batch) -> torch.Tensor:
        """Suspicion scores Tensor[N] for one serving batch (higher = more suspicious)."""
        raise NotImplementedError

    def partial_fit_batch(self, batch: Batch, labels: torch.Tensor) -> Detector:
        """One batch of a streaming fit (``GuardedModel.fit`` on a Dataset); :meth:`finish_fit` ends it.

        The default, for input detectors (saliency, squeeze: they read only a few clean
        images), keeps the first :data:`STREAM_HEAD_IMAGES` images, their logits and labels,
        and :meth:`finish_fit` calls :meth:`fit_batch` on them. Feature detectors accumulate
        their state batch by batch instead (:meth:`FeatureDetector.partial_fit_features`).
        """
        st = self.__dict__.setdefault(
            "_stream_fit", {"x": [], "logits": [], "labels": [], "n": 0, "model": batch.model}
        )
        need = STREAM_HEAD_IMAGES - st["n"]
        if need > 0:
            st["x"].append(batch.x[:need].detach())
            st["logits"].append(batch.logits[:need].detach())
            st["labels"].append(labels[:need].detach())
            st["n"] += int(st["x"][-1].shape[0])
        return self

    def finish_fit(self) -> Detector:
        """End a streaming fit begun by :meth:`partial_fit_batch`; returns self, fitted."""
        st = self.__dict__.pop("_stream_fit", None)
        if st is None or not st["n"]:
            raise ValueError(
                f"{type(self).__name__}.finish_fit: no batch was given to partial_fit_batch (an empty stream)."
            )
        return self.fit_batch(
            Batch(torch.cat(st["x"]), torch.cat(st["logits"]), {}, st["model"]), torch.cat(st["labels"])
        )

    def export_head(self) -> nn.Module:
        """An ``nn.Module`` with ``forward(batch) -> Tensor[N]`` (or a dict whose ``"score"`` is
        the score and whose other entries are extra graph outputs), in plain torch ops."""
        raise NotImplementedError(f"{type(self).__name__} has no ONNX head.")

    # ---------------------------------------------------------------- conveniences
    def _batch(self, model: nn.Module, x: torch.Tensor, *, pool: str = "auto") -> Batch:
        device = model_device(model, x.device)
        x = x.detach().to(device=device, dtype=torch.float32)  # float16/float64 images: the model's own dtype
        layers = self.feature_layers
        if layers:
            logits, feats = extract_features(model, x, layers, pool=pool)
        else:
            with torch.no_grad(), eval_mode(model):
                logits, feats = torch.cat([call_model(model, x[i : i + 512]) for i in range(0, x.shape[0], 512)]), {}
        if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(
                f"the model must return logits of shape ({x.shape[0]}, C); got shape {tuple(logits.shape)}."
            )
        return Batch(x, logits, feats, model)

    def fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> Detector:
        """Fit on clean images ``x`` (``y``: their labels; default the model's predictions)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        check_images(x, "x")
        batch = self._batch(model, x)
        labels = (
            batch.pred.cpu()
            if y is None
            else check_labels(y, "y", n=int(x.shape[0]), num_classes=int(batch.logits.shape[1])).cpu()
        )
        return self.fit_batch(batch, labels)

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Scores Tensor[N] (CPU) of images ``x``, scored in batches of 512."""
        self._check_fitted()
        check_images(x, "x")
        return torch.cat(
            [
                self.score_batch(self._batch(model, x[i : i + 512])).detach().float().cpu()
                for i in range(0, x.shape[0], 512)
            ]
        )

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
        if isinstance(clean, torch.Tensor) and clean.dim() == 1:
            if clean.numel() == 0:
                raise ValueError("clean scores must be non-empty; got an empty tensor.")
            if clean.dtype == torch.bool or clean.is_complex() or clean.is_meta:
                raise TypeError(
                    f"clean scores must be real numbers (a float tensor on cpu or cuda); got dtype {clean.dtype} on {clean.device}"
                    " (flags are not scores)."
                )
            scores = clean
        elif isinstance(clean, torch.Tensor) and clean.dim() == 4:
            if model is None:
                raise ValueError("calibrate(clean images) needs model=...; or pass clean scores (a 1-D tensor).")
            scores = self.score(model, check_images(clean, "clean"))
        else:
            raise TypeError(
                f"clean must be a 1-D tensor of clean scores or a 4-D tensor of clean images; got "
                f"{type(clean).__name__} {tuple(getattr(clean, 'shape', ()))}."
            )
        self.threshold_ = quantile_threshold(scores, fpr)
        self.calibration_fpr_ = fpr
        self.calibration_n_ = int(scores.numel())
        return self.threshold_

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Bool flags Tensor[N]: True = suspicious."""
        return self.predict_scores(self.score(model, x))


class FeatureDetector(Detector):
    """A detector that scores named layers' pooled features; several share one forward pass."""

    def fit_features(self, feats: Any, labels: torch.Tensor) -> FeatureDetector:
        raise NotImplementedError

    def score_features(self, feats: Any, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fit_batch(self, batch: Batch, labels: torch.Tensor) -> FeatureDetector:
        return self.fit_features(batch.features, labels)

    def partial_fit_features(self, feats: Any, labels: torch.Tensor) -> FeatureDetector:
        """One batch of features of a streaming fit; :meth:`finish_fit` ends it.

        The default keeps every batch's features (not the images: O(N d) floats) and fits on
        them at the end; detectors that can fit from running sums or an incremental bank
        (kNN, PPCA, Mahalanobis, LID) override it so that nothing but their fitted state grows.
        """
        fd = as_feature_dict(feats, self.feature_layers, type(self).__name__)
        st = self.__dict__.setdefault("_stream_fit", {"feats": {layer: [] for layer in fd}, "labels": []})
        for layer, f in fd.items():
            st["feats"][layer].append(f.cpu())
        st["labels"].append(torch.as_tensor(labels).cpu())
        return self

    def partial_fit_batch(self, batch: Batch, labels: torch.Tensor) -> FeatureDetector:
        return self.partial_fit_features(batch.features, labels)

    def finish_fit(self) -> FeatureDetector:
        st = self.__dict__.pop("_stream_fit", None)
        if st is None:
            raise ValueError(
                f"{type(self).__name__}.finish_fit: no batch was given to partial_fit_features (an empty stream)."
            )
        return self.fit_features({layer: torch.cat(v) for layer, v in st["feats"].items()}, torch.cat(st["labels"]))

    def score_batch(self, batch: Batch) -> torch.Tensor:
        return self.score_features(batch.features, batch.logits)


class MultiLayerDetector(FeatureDetector):
    """A feature detector over a list of layers (``self.layers``) that ``guard.wrap`` puts on every
    feature layer by default (the spatial stages and the head's input), as the anchors' papers do."""

    layers: list[str]

    def _set_layers(self, layers: Sequence[str] | str) -> None:
        self.layers = [layers] if isinstance(layers, str) else list(layers)

    @classmethod
    def default(cls, layers: list[str]) -> MultiLayerDetector:
        return cls(list(layers))

    @property
    def feature_layers(self) -> list[str]:
        return list(self.layers)
