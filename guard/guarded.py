"""``guard.wrap(model)`` -> a GuardedModel: logits, per-detector scores and a calibrated flag.

One forward pass of the wrapped model collects the logits and the features every feature
detector needs (hooks, :class:`guard.core.features.FeatureExtractor`); input-level detectors
(saliency) add one backward pass. The combined flag is the max of robustly standardised
scores, calibrated on clean held-out data to a target false-positive rate
(:class:`detectors.Combined`). Fails closed: a detector that raises at serving time gives
``+inf`` scores, so the whole batch is flagged, and the error is logged — never passed silently.

Example::

    guarded = guard.wrap(model).fit(train)            # clean training data
    guarded.calibrate(clean_heldout.x, fpr=0.05)      # clean held-out images
    out = guarded(x)          # out.logits, out.scores["knn"], out.flagged
    labels = guarded.predict(x)                       # -1 where flagged
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from guard.detectors import BitDepthSqueeze, Combined, Detector, FeatureDetector, KNNConsistency, KNNRank, PPCAManifold, SaliencyConcentration
from guard.core.cache import atomic_write_text
from guard.core.data import Split, load_data
from guard.core.features import FeatureExtractor
from guard.core.models import eval_mode
from guard.core.features import find_head
from guard.core.validation import NotFittedError, check_images, check_int, check_probability

__all__ = ["wrap", "GuardedModel", "GuardedOutput", "default_layers"]

log = logging.getLogger(__name__)

DEFAULT_DETECTORS = ("saliency", "knn", "ppca", "knn_consistency", "squeeze")
_SKIP = (nn.Dropout, nn.Flatten, nn.Identity, nn.ReLU)


@dataclass
class GuardedOutput:
    """What a GuardedModel returns.

    Attributes:
        logits: the wrapped model's logits [B, C] (unchanged).
        scores: detector name -> Tensor[B] (higher = more suspicious), plus "combined".
        flagged: bool Tensor[B]: the combined flag (True = reject).
        errors: detector name -> error message for detectors that raised (their inputs flagged).
    """

    logits: torch.Tensor
    scores: dict[str, torch.Tensor]
    flagged: torch.Tensor
    errors: dict[str, str] = field(default_factory=dict)


def default_layers(model: nn.Module) -> list[str]:
    """Layers before the classifier head, in order (Dropout/Flatten/activations skipped).

    For the demo net: ``["conv1", "conv2", "fc1"]``. :func:`wrap` gives the last two to
    KNNRank and KNNConsistency and the last one (the head's input) to PPCAManifold.
    """
    from guard.core.models import Normalize

    head, _ = find_head(model)
    parent_name, _, head_leaf = head.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    out = []
    for name, child in parent.named_children():
        if name == head_leaf:
            break
        if isinstance(child, _SKIP + (Normalize,)) or not any(True for _ in child.parameters()):
            continue
        out.append(f"{parent_name}.{name}" if parent_name else name)
    if not out:
        raise ValueError(f"could not find feature layers before the head {head!r} of {type(model).__name__}; pass layers=[...].")
    return out


def _make(name: str, layers: list[str]) -> Detector:
    if name == "knn":
        return KNNRank(layers[-2:] if len(layers) >= 2 else layers[-1])
    if name == "ppca":
        return PPCAManifold(layers[-1])
    if name == "knn_consistency":
        return KNNConsistency(layers[-2:] if len(layers) >= 2 else layers)
    if name == "saliency":
        return SaliencyConcentration(window=6)
    if name == "squeeze":
        return BitDepthSqueeze(bits=1)
    raise ValueError(f"unknown detector {name!r}; expected one of {DEFAULT_DETECTORS} or a Detector instance.")


class GuardedModel(nn.Module):
    """A classifier with detectors attached (see :func:`wrap`).

    Attributes:
        model: the wrapped classifier (not modified).
        detectors: name -> fitted detector.
        combined: the :class:`detectors.Combined` flagger (after ``calibrate``).
    """

    def __init__(self, model: nn.Module, detectors: Mapping[str, Detector], *, batch_size: int = 512) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        if not detectors:
            raise ValueError("GuardedModel needs at least one detector; got none.")
        self.model = model
        self.detectors: dict[str, Detector] = dict(detectors)
        self.combined: Combined | None = None
        self.batch_size = check_int(batch_size, "batch_size", "GuardedModel", low=1)

    # ------------------------------------------------------------------ helpers
    @property
    def feature_layers(self) -> list[str]:
        layers: list[str] = []
        for det in self.detectors.values():
            if isinstance(det, FeatureDetector):
                layers += [lay for lay in det.feature_layers if lay not in layers]
        return layers

    def _device(self) -> torch.device:
        return next((p.device for p in self.model.parameters()), torch.device("cpu"))

    @torch.no_grad()
    def _forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        layers = self.feature_layers
        if not layers:
            return self.model(x), {}
        logits, feats = FeatureExtractor(self.model, layers)(x, flatten=True)
        return logits, feats

    def _score_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, str]]:
        x = x.to(self._device(), dtype=torch.float32)
        with eval_mode(self.model):
            logits, feats = self._forward_features(x)
            scores: dict[str, torch.Tensor] = {}
            errors: dict[str, str] = {}
            for name, det in self.detectors.items():
                try:
                    if isinstance(det, FeatureDetector):
                        s = det.score_features(feats, logits)
                    elif isinstance(det, SaliencyConcentration):
                        s = det.score(self.model, x, target=logits.argmax(1))
                    elif isinstance(det, BitDepthSqueeze):
                        s = det.score(self.model, x, logits=logits)
                    else:
                        s = det.score(self.model, x)
                    s = s.detach().float().cpu().reshape(-1)
                    if s.shape[0] != x.shape[0]:
                        raise RuntimeError(f"returned {s.shape[0]} scores for {x.shape[0]} inputs")
                except Exception as err:  # fail closed: flag, log, never pass silently
                    log.exception("detector %r failed at serving time; flagging its %d input(s)", name, x.shape[0])
                    errors[name] = f"{type(err).__name__}: {err}"
                    s = torch.full((x.shape[0],), float("inf"))
                scores[name] = s
        return logits, scores, errors

    def score(self, x: torch.Tensor, *, progress: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, str]]:
        """Logits and per-detector scores (CPU) for all of ``x``, in batches of ``batch_size``."""
        check_images(x, "x")
        from tqdm.auto import tqdm

        logits, scores, errors = [], {n: [] for n in self.detectors}, {}
        starts = range(0, x.shape[0], self.batch_size)
        for i in tqdm(starts, desc="guard score", disable=not progress, leave=False):
            lo, sc, er = self._score_batch(x[i:i + self.batch_size])
            logits.append(lo)
            for n, s in sc.items():
                scores[n].append(s)
            errors.update(er)
        return torch.cat(logits), {n: torch.cat(v) for n, v in scores.items()}, errors

    # ------------------------------------------------------------------ fit / calibrate
    def fit(self, data: Any, y: torch.Tensor | None = None) -> "GuardedModel":
        """Fit every detector on clean training data (a Split, (x, y), a Dataset, or images + ``y``).

        Labels are the true labels given; feature detectors share one forward pass.
        """
        if isinstance(data, torch.Tensor) and y is None:  # images only: the model's predictions are the labels
            check_images(data, "data")
            x, labels = data, None
        else:
            split = load_data((data, y) if isinstance(data, torch.Tensor) else data, "data")
            x, labels = split.x, split.y
        from guard.core.features import extract_features

        layers = self.feature_layers
        if layers:
            logits, feats = extract_features(self.model, x, layers, batch_size=self.batch_size)
            lab = logits.argmax(1).cpu() if labels is None else labels
            for det in self.detectors.values():
                if isinstance(det, FeatureDetector):
                    det.fit_features(feats, lab)
        for det in self.detectors.values():
            if not isinstance(det, FeatureDetector):
                det.fit(self.model, x[: min(len(x), 64)])
        self.combined = None
        return self

    def calibrate(self, clean_data: Any, fpr: float = 0.05) -> "GuardedModel":
        """Set every detector's and the combined ``threshold_`` on clean held-out images.

        Use data the detectors were not fitted on, and not the data you evaluate on.
        """
        fpr = check_probability(fpr, "fpr", "GuardedModel.calibrate")
        x = clean_data.x if isinstance(clean_data, Split) else clean_data
        _, scores, errors = self.score(x)
        return self.calibrate_scores(scores, fpr, errors=errors)

    def calibrate_scores(self, scores: Mapping[str, torch.Tensor], fpr: float = 0.05, *, errors: Mapping[str, str] | None = None) -> "GuardedModel":
        """Calibrate from precomputed clean scores {name: Tensor[N]} (as :meth:`score` gives)."""
        fpr = check_probability(fpr, "fpr", "GuardedModel.calibrate")
        if errors:
            raise RuntimeError(f"cannot calibrate: detectors failed on clean data: {dict(errors)}")
        for name, det in self.detectors.items():
            det.calibrate(scores[name], fpr)
        self.combined = Combined(list(self.detectors))
        self.combined.calibrate_scores({n: scores[n] for n in self.detectors}, fpr)
        return self

    # ------------------------------------------------------------------ serving
    def forward(self, x: torch.Tensor) -> GuardedOutput:  # type: ignore[override]
        """Logits, scores and the combined flag for a batch."""
        if self.combined is None:
            raise NotFittedError("This GuardedModel is not calibrated yet. Call 'fit' on clean training data, then 'calibrate' on clean held-out data.")
        check_images(x, "x")
        logits, scores, errors = self._score_batch(x)
        scores["combined"] = self.combined.combine(scores)
        flagged = self.combined.predict_scores(scores["combined"])
        dev = logits.device
        return GuardedOutput(logits=logits, scores={k: v.to(dev) for k, v in scores.items()}, flagged=flagged.to(dev), errors=errors)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted labels, -1 for flagged inputs."""
        out = self(x)
        pred = out.logits.argmax(1)
        return torch.where(out.flagged, torch.full_like(pred, -1), pred)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the detectors (one safetensors file each) and ``guarded.json`` into folder ``path``.

        The model itself is not saved: pass it again to :meth:`load`.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        index = {"format": "guard.guarded/1", "detectors": {}, "batch_size": self.batch_size}
        for name, det in self.detectors.items():
            det.save(folder / f"{name}.safetensors")
            index["detectors"][name] = f"{name}.safetensors"
        if self.combined is not None:
            self.combined.save(folder / "combined.safetensors")
            index["combined"] = "combined.safetensors"
        atomic_write_text(folder / "guarded.json", json.dumps(index, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: nn.Module) -> "GuardedModel":
        """Load what :meth:`save` wrote around ``model``; ValueError on a damaged or altered file."""
        folder = Path(path)
        idx_path = folder / "guarded.json"
        if not idx_path.is_file():
            raise ValueError(f"{str(folder)!r} is not a saved GuardedModel folder (no guarded.json).")
        try:
            index = json.loads(idx_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(idx_path)!r} is not valid JSON: {err}") from err
        if index.get("format") != "guard.guarded/1":
            raise ValueError(f"{str(idx_path)!r} has an unknown format {index.get('format')!r}.")
        dets = {name: Detector.load(folder / fname) for name, fname in index["detectors"].items()}
        guarded = cls(model, dets, batch_size=index.get("batch_size", 512))
        if "combined" in index:
            comb = Detector.load(folder / index["combined"])
            if not isinstance(comb, Combined):
                raise ValueError(f"{str(folder)!r}: combined.safetensors holds a {type(comb).__name__}.")
            guarded.combined = comb
        return guarded


def wrap(model: nn.Module, detectors: Sequence[str | Detector] | Mapping[str, Detector] | None = None,
         layers: Sequence[str] | None = None, *, batch_size: int = 512) -> GuardedModel:
    """Attach detectors to ``model``.

    Args:
        model: the classifier (images in [0, 1] -> logits); not modified.
        detectors: names from ("saliency", "knn", "ppca", "knn_consistency", "squeeze"),
            Detector instances, or a dict name -> Detector. Default: all five. "squeeze" is
            1-bit feature squeezing (the MNIST setting of Xu et al.); for natural images pass
            ``BitDepthSqueeze(bits=5)`` or leave it out.
        layers: feature layers (module paths) in network order; the last two feed KNNRank
            (max of per-layer ranks) and KNNConsistency, the last PPCAManifold. Default:
            :func:`default_layers`. Saliency uses a 6x6 window (the side of a 5%-area patch
            on 28x28 inputs; pass your own SaliencyConcentration for other sizes).
        batch_size: images per forward pass when scoring many.

    Returns:
        an unfitted :class:`GuardedModel`; call ``.fit(train)`` then ``.calibrate(heldout)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    if layers is None:
        layers = default_layers(model)
    else:
        layers = [layers] if isinstance(layers, str) else list(layers)
        if not layers:
            raise ValueError("layers must name at least one layer; got an empty list.")
        from guard.core.features import get_layer

        for lay in layers:
            get_layer(model, lay)
    if detectors is None:
        detectors = DEFAULT_DETECTORS
    if isinstance(detectors, Mapping):
        dets = dict(detectors)
    else:
        dets = {}
        for d in detectors:
            det = _make(d, list(layers)) if isinstance(d, str) else d
            if not isinstance(det, Detector):
                raise TypeError(f"detectors must be names or Detector instances; got {type(d).__name__}.")
            dets[det.name if not isinstance(d, str) else d] = det
    for name, det in dets.items():
        if not isinstance(det, Detector):
            raise TypeError(f"detector {name!r} must be a Detector; got {type(det).__name__}.")
    return GuardedModel(model, dets, batch_size=batch_size)
