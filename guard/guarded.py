"""``guard.wrap(model)`` -> a GuardedModel: logits, per-detector scores and a calibrated flag.

One forward pass of the wrapped model collects the logits and the pooled features every
feature detector needs (hooks, :class:`guard.core.features.FeatureExtractor`); each detector
then scores that :class:`~guard.detectors.Batch` (input-level detectors such as saliency add
their own backward pass). The combined flag is a conformal max over the detectors, calibrated
on clean held-out data to a target false-positive rate (:class:`guard.detectors.Combined`).
Fails closed: a detector that raises at serving time gives ``+inf`` scores, so its batch is
flagged, and the error is logged and returned, never passed silently.

By default the detectors see the layers :func:`guard.core.features.default_feature_layers`
reads from the model's forward pass (the head's input and the two deepest spatial stages,
pooled by :func:`guard.core.features.pool_features`), so a user's model works as it comes;
they are chosen at ``fit`` from the first images. A default detector that cannot run on the
model is left out with its reason in ``left_out_``; the rest go on.

Example::

    guarded = guard.wrap(model).fit(train)            # clean training data
    guarded.calibrate(clean_heldout.x, fpr=0.05)      # clean held-out images
    out = guarded(x)          # out.logits, out.scores["knn"], out.flagged
    labels = guarded.predict(x)                       # -1 where flagged
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from guard.core.budget import grad_chunk
from guard.core.cache import atomic_write_text
from guard.core.data import Split, is_stream, load_data, sample_stream, stream_batches
from guard.core.digests import image_digests
from guard.core.features import POOLS, FeatureExtractor, default_feature_layers, get_layer
from guard.core.integrity import check_expected_sha256, check_seal, content_seal, resolve_key, write_digest_file
from guard.core.models import eval_mode, model_device
from guard.core.validation import NotFittedError, call_model, check_images, check_int, check_labels, check_probability
from guard.detectors import DETECTORS, Batch, Combined, Detector
from guard.detectors.combined import RULES

__all__ = ["wrap", "GuardedModel", "GuardedOutput", "DEFAULT_DETECTORS", "proxy_inputs"]

log = logging.getLogger(__name__)

DEFAULT_DETECTORS = ("saliency", "knn", "ppca", "knn_consistency", "squeeze")
FORMAT = "guard.guarded/3"
INDEX = "guarded.json"
_MEMBER_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")


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


def proxy_inputs(x: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """Suspicious-looking inputs that are not attacks, from clean images ``x`` (N of them, N/5 per kind).

    The "weighted" combiner learns its weights from these, so no reported attack is tuned on:
    uniform noise images, blurred noise images, clean images with Gaussian noise (sigma 0.1),
    clean images with a grey square over 5% of the area, and clean images with random-sign
    noise of the data's customary budget (:func:`guard.core.budget.data_defaults`: no gradient).
    """
    from guard.core.budget import data_defaults

    g = torch.Generator().manual_seed(seed)
    n = max(1, x.shape[0] // 5)
    src = x[torch.randperm(x.shape[0], generator=g)[:n]].detach().cpu().float()
    shape = src.shape
    noise = torch.rand(shape, generator=g)
    blurred = torch.nn.functional.avg_pool2d(
        torch.rand(shape, generator=g), 5, stride=1, padding=2, count_include_pad=False
    )
    gauss = (src + 0.1 * torch.randn(shape, generator=g)).clamp(0, 1)
    side = max(1, round((0.05 * shape[-1] * shape[-2]) ** 0.5))
    occluded = src.clone()
    rows = torch.randint(0, shape[-2] - side + 1, (n,), generator=g)
    cols = torch.randint(0, shape[-1] - side + 1, (n,), generator=g)
    for i in range(n):
        occluded[i, :, rows[i] : rows[i] + side, cols[i] : cols[i] + side] = 0.5
    eps = data_defaults(x)["eps"]
    signed = (src + eps * torch.randint(0, 2, shape, generator=g).float().mul(2).sub(1)).clamp(0, 1)
    return torch.cat([noise, blurred, gauss, occluded, signed])


class GuardedModel(nn.Module):
    """A classifier with detectors attached (see :func:`wrap`).

    Attributes:
        model: the wrapped classifier (not modified).
        detectors: name -> detector (the defaults are built at ``fit``).
        combined: the :class:`~guard.detectors.Combined` flagger (after ``calibrate``).
        layers: the feature layers the default detectors were given (None until chosen).
        pool: how spatial maps become the vectors detectors see.
        left_out_: default detector name -> why it could not run on this model.
    """

    def __init__(
        self,
        model: nn.Module,
        detectors: Mapping[str, Detector] | None = None,
        *,
        defaults: Sequence[str] = (),
        layers: Sequence[str] | None = None,
        pool: str = "auto",
        batch_size: int = 512,
        combine: str = "max",
        flag_with: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        if not detectors and not defaults:
            raise ValueError("GuardedModel needs at least one detector; got none.")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}; got {pool!r}.")
        self.model = model
        self.detectors: dict[str, Detector] = dict(detectors or {})
        self.defaults = [d for d in defaults if d not in self.detectors]
        self.layers = None if layers is None else list(layers)
        self.pool = pool
        self.combined: Combined | None = None
        self.batch_size = check_int(batch_size, "batch_size", "GuardedModel", low=1)
        if combine not in RULES:
            raise ValueError(f"combine must be one of {RULES}; got {combine!r}.")
        self.combine = combine
        self.flag_with = None if flag_with is None else _names(flag_with, "flag_with")
        self.left_out_: dict[str, str] = {}
        self.feature_widths_: dict[str, int] = {}
        #: content digests of the calibration images (guard.core.digests), None when unknown
        self.calibration_digests_: frozenset[str] | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def feature_layers(self) -> list[str]:
        return list(dict.fromkeys(layer for det in self.detectors.values() for layer in det.feature_layers))

    def _device(self) -> torch.device:
        return model_device(self.model)

    def _forward(self, x: torch.Tensor, *, input_grad: bool = False) -> Batch:
        """One forward pass: logits and the pooled features of every detector's layers.

        With ``input_grad`` the pass runs with autograd on the images and one backward pass
        gives each image's gradient of its predicted-class logit (``Batch.input_grad``): a
        gradient saliency detector then reads it instead of running the model again (Captum's
        ``Saliency`` would do its own forward pass; the maps are the same, tested in
        tests/test_fused_saliency.py). Only the input's gradient is asked for, so no weight
        gradient is computed.
        """
        x = x.detach().to(self._device(), dtype=torch.float32)
        layers = self.feature_layers

        def run(inp: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            if layers:
                return FeatureExtractor(self.model, layers)(inp, pool=self.pool)
            return call_model(self.model, inp), {}

        if not input_grad:
            with torch.no_grad(), eval_mode(self.model):
                logits, feats = run(x)
            return Batch(x, logits, feats, self.model)
        chunk = grad_chunk(x)
        parts = []
        with torch.inference_mode(False), torch.enable_grad(), eval_mode(self.model):
            for i in range(0, x.shape[0], chunk):
                xg = x[i : i + chunk].clone().requires_grad_(True)
                logits, feats = run(xg)
                (grad,) = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), xg)
                parts.append((logits.detach(), {k: v.detach() for k, v in feats.items()}, grad.detach()))
        if len(parts) == 1:
            return Batch(x, parts[0][0], parts[0][1], self.model, input_grad=parts[0][2])
        feats = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
        return Batch(
            x, torch.cat([p[0] for p in parts]), feats, self.model, input_grad=torch.cat([p[2] for p in parts])
        )

    def _score_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, str]]:
        batch = self._forward(x, input_grad=any(getattr(d, "needs_input_grad", False) for d in self.detectors.values()))
        scores: dict[str, torch.Tensor] = {}
        errors: dict[str, str] = {}
        with eval_mode(self.model):
            for name, det in self.detectors.items():
                try:
                    s = det.score_batch(batch).detach().float().cpu().reshape(-1)
                    if s.shape[0] != x.shape[0]:
                        raise RuntimeError(f"returned {s.shape[0]} scores for {x.shape[0]} inputs")
                except Exception as err:  # fail closed: flag, log, never pass silently
                    log.exception("detector %r failed at serving time; flagging its %d input(s)", name, x.shape[0])
                    errors[name] = f"{type(err).__name__}: {err}"
                    s = torch.full((x.shape[0],), float("inf"))
                scores[name] = s
        return batch.logits, scores, errors

    def score(self, x: Any, *, progress: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, str]]:
        """Logits and per-detector scores (CPU) for all of ``x``, in batches of ``batch_size``.

        ``x``: images (N, C, H, W), or a stream (a Dataset, DataLoader or image folder, read
        batch by batch by :func:`guard.core.data.stream_batches`; its labels are not used).
        """
        stream = is_stream(x)
        if not stream:
            check_images(x, "x")
        if not self.detectors:
            raise NotFittedError("This GuardedModel is not fitted yet. Call 'fit' on clean training data first.")
        from tqdm.auto import tqdm

        if stream:
            batches: Any = (xb for xb, _ in stream_batches(x, self.batch_size, "x"))
        else:
            batches = (x[i : i + self.batch_size] for i in range(0, x.shape[0], self.batch_size))
        logits, scores, errors = [], {n: [] for n in self.detectors}, {}
        for xb in tqdm(batches, desc="guard score", disable=not progress, leave=False):
            lo, sc, er = self._score_batch(xb)
            logits.append(lo.cpu())
            for n, s in sc.items():
                scores[n].append(s)
            errors.update(er)
        return torch.cat(logits), {n: torch.cat(v) for n, v in scores.items()}, errors

    def describe(self) -> dict[str, Any]:
        """Each detector's class, parameters, layers and their feature widths (for report.json)."""
        return {
            name: {
                "class": type(det).__name__,
                "params": det.get_params(),
                "layers": {layer: self.feature_widths_.get(layer) for layer in det.feature_layers},
                "threshold": getattr(det, "threshold_", None),
            }
            for name, det in self.detectors.items()
        }

    # ------------------------------------------------------------------ fit / calibrate
    def _build_defaults(self, example: torch.Tensor) -> None:
        if not self.defaults:
            return
        if self.layers is None:
            self.layers = default_feature_layers(self.model, example)
        for lay in self.layers:
            get_layer(self.model, lay)
        for name in self.defaults:
            self.detectors[name] = DETECTORS[name].default(list(self.layers))
        self.defaults = []

    def fit(self, data: Any, y: torch.Tensor | None = None) -> GuardedModel:
        """Fit every detector on clean training data (a Split, (x, y), a Dataset, a DataLoader, an
        image folder, or images + ``y``).

        Labels are the true labels given (images alone: the model's predictions); the feature
        detectors share one forward pass. A Dataset, DataLoader or image folder is streamed:
        read batch by batch (:func:`guard.core.data.stream_batches`) and given to each
        detector's ``partial_fit_batch``, so memory holds a batch and the detectors' fitted
        state (the kNN bank, PPCA / Mahalanobis running sums), never the data set; tensors are
        fitted in one pass over the whole (the fast path; the same fitted state). A default
        detector that fails to fit is left out (``left_out_``), the others are fitted; a
        detector the caller chose raises.
        """
        if is_stream(data) and y is None:
            return self._fit_stream(data)
        if isinstance(data, torch.Tensor) and y is None:  # images only: the model's predictions are the labels
            check_images(data, "data")
            x, labels = data, None
        else:
            split = load_data((data, y) if isinstance(data, torch.Tensor) else data, "data")
            x, labels = split.x, split.y
        chosen_by_caller = set(self.detectors)
        self._build_defaults(x[:2])
        layers = self.feature_layers
        chunks = [self._forward(x[i : i + self.batch_size]) for i in range(0, x.shape[0], self.batch_size)]
        logits = torch.cat([c.logits for c in chunks])
        self._check_fit_logits(logits, x.shape[0], labels)
        feats = {layer: torch.cat([c.features[layer] for c in chunks]) for layer in layers}
        self.feature_widths_ = {layer: int(f.shape[1]) for layer, f in feats.items()}
        batch = Batch(x.to(self._device()), logits, feats, self.model)
        lab = logits.argmax(1).cpu() if labels is None else labels.cpu()
        for name in list(self.detectors):
            try:
                self.detectors[name].fit_batch(batch, lab)
            except Exception as err:
                self._leave_out(name, err, chosen_by_caller)
        return self._fitted()

    def _check_fit_logits(
        self, logits: torch.Tensor, n: int, labels: torch.Tensor | None, classes: int | None = None
    ) -> None:
        if logits.dim() != 2 or logits.shape[0] != n:
            raise ValueError(f"the model must return logits of shape ({n}, C); got shape {tuple(logits.shape)}.")
        if classes is not None and logits.shape[1] != classes:
            raise ValueError(
                f"the model returned {logits.shape[1]} logits for one batch and {classes} for an earlier one."
            )
        if labels is not None:  # labels the model cannot output would silently skew the label-based detectors
            check_labels(labels, "data labels", num_classes=int(logits.shape[1]))

    def _leave_out(self, name: str, err: Exception, chosen_by_caller: set[str]) -> None:
        if name in chosen_by_caller:
            raise err
        log.warning("guard.wrap: detector %r left out: %s: %s", name, type(err).__name__, err)
        self.left_out_[name] = f"{type(err).__name__}: {err}"
        del self.detectors[name]

    def _fitted(self) -> GuardedModel:
        if not self.detectors:
            raise ValueError(f"no detector could be fitted on this model: {self.left_out_}")
        self.combined = None
        return self

    def _fit_stream(self, data: Any) -> GuardedModel:
        """:meth:`fit` on a Dataset / DataLoader / folder: one forward pass per batch, detectors fitted incrementally."""
        chosen_by_caller = set(self.detectors)
        classes = None
        n = 0
        for xb, yb in stream_batches(data, self.batch_size, "data"):
            if classes is None:
                self._build_defaults(xb[:2])
            batch = self._forward(xb)
            self._check_fit_logits(batch.logits, int(xb.shape[0]), yb, classes)
            classes = int(batch.logits.shape[1])
            if not n:
                self.feature_widths_ = {layer: int(f.shape[1]) for layer, f in batch.features.items()}
            n += int(xb.shape[0])
            for name in list(self.detectors):
                try:
                    self.detectors[name].partial_fit_batch(batch, yb.cpu())
                except Exception as err:
                    self._leave_out(name, err, chosen_by_caller)
        for name in list(self.detectors):
            try:
                self.detectors[name].finish_fit()
            except Exception as err:
                self._leave_out(name, err, chosen_by_caller)
        return self._fitted()

    def calibrate(self, clean_data: Any, fpr: float = 0.05) -> GuardedModel:
        """Set every detector's and the combined ``threshold_`` on clean held-out images.

        Use data the detectors were not fitted on, and not the data you evaluate on.
        ``clean_data``: images, a Split, or a stream (Dataset, DataLoader, image folder) scored
        batch by batch; with ``combine="weighted"`` the proxy inputs are made from a seeded
        sample of 2,000 of a stream's images (:class:`guard.core.sampling.BottomK`).
        """
        fpr = check_probability(fpr, "fpr", "GuardedModel.calibrate")
        x = clean_data.x if isinstance(clean_data, Split) else clean_data
        if not is_stream(x):
            check_images(x, "clean_data")
        _, scores, errors = self.score(x)
        proxy = None
        if self.combine == "weighted":
            base = x if not is_stream(x) else sample_stream(x, 2000, self.batch_size, "clean_data")[0]
            _, proxy, perr = self.score(proxy_inputs(check_images(base, "clean_data")))
            errors = {**errors, **perr}
        return self.calibrate_scores(scores, fpr, errors=errors, proxy_scores=proxy, images=None if is_stream(x) else x)

    def calibrate_scores(
        self,
        scores: Mapping[str, torch.Tensor],
        fpr: float = 0.05,
        *,
        errors: Mapping[str, str] | None = None,
        proxy_scores: Mapping[str, torch.Tensor] | None = None,
        images: torch.Tensor | None = None,
    ) -> GuardedModel:
        """Calibrate from precomputed clean scores {name: Tensor[N]} (as :meth:`score` gives).

        ``proxy_scores``: scores of :func:`proxy_inputs` (the "weighted" rule learns from them).
        ``images``: the calibration images themselves; their content digests are kept in
        ``calibration_digests_`` so that :func:`guard.evaluate` refuses them as evaluation
        negatives (None, as after calibrating on a stream: nothing to check against).
        """
        fpr = check_probability(fpr, "fpr", "GuardedModel.calibrate")
        if errors:
            raise RuntimeError(f"cannot calibrate: detectors failed on clean data: {dict(errors)}")
        if images is not None:
            check_images(images, "images")
            lengths = {int(v.shape[0]) for v in scores.values()}
            if lengths and lengths != {int(images.shape[0])}:
                raise ValueError(
                    f"images must be the {sorted(lengths)} calibration images the scores came from; got {int(images.shape[0])}."
                )
        self.calibration_digests_ = image_digests(images) if images is not None else None
        for name, det in self.detectors.items():
            det.calibrate(scores[name], fpr)
        names = [n for n in self.detectors if self.flag_with is None or n in self.flag_with]
        if not names:
            raise ValueError(f"flag_with={self.flag_with} names none of the detectors {list(self.detectors)}.")
        self.combined = Combined(names, rule=self.combine)
        self.combined.calibrate_scores({n: scores[n] for n in names}, fpr, proxy_scores=proxy_scores)
        return self

    # ------------------------------------------------------------------ serving
    def forward(self, x: torch.Tensor) -> GuardedOutput:  # type: ignore[override]
        """Logits, scores and the combined flag for a batch."""
        if self.combined is None:
            raise NotFittedError(
                "This GuardedModel is not calibrated yet. Call 'fit' on clean training data, then 'calibrate' on clean held-out data."
            )
        check_images(x, "x")
        logits, scores, errors = self._score_batch(x)
        scores["combined"] = self.combined.combine(scores)
        flagged = self.combined.predict_scores(scores["combined"])
        dev = logits.device
        return GuardedOutput(
            logits=logits, scores={k: v.to(dev) for k, v in scores.items()}, flagged=flagged.to(dev), errors=errors
        )

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted labels, -1 for flagged inputs."""
        out = self(x)
        pred = out.logits.argmax(1)
        return torch.where(out.flagged, torch.full_like(pred, -1), pred)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str], *, key: bytes | None = None, key_env: str | None = None) -> str:
        """Write the detectors (one safetensors file each) and ``guarded.json`` into folder ``path``.

        ``guarded.json`` lists every member file with its SHA-256 and is sealed itself
        (:mod:`guard.core.integrity`; an HMAC-SHA256 with ``key``/``key_env``, the members are
        signed with the same key), so editing the index, or swapping a member file for another,
        is caught by :meth:`load`. The model itself is not saved: pass it again to :meth:`load`.

        Returns:
            the SHA-256 of ``guarded.json`` (which pins every member), also written to
            ``guarded.json.sha256``; pass it to ``load(..., expected_sha256=...)``.
        """
        if not self.detectors:
            raise NotFittedError("This GuardedModel is not fitted yet; there is nothing to save.")
        secret = resolve_key(key, key_env)
        for name in self.detectors:
            if not _MEMBER_NAME.fullmatch(name) or name == "combined":
                raise ValueError(
                    f"detector name {name!r} cannot name a file in the saved folder; expected letters, digits, "
                    "'_', '-' or '.' (not starting with '.') and not 'combined'."
                )
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        index: dict[str, Any] = {
            "format": FORMAT,
            "detectors": {},
            "batch_size": self.batch_size,
            "pool": self.pool,
            "layers": self.layers,
            "left_out": self.left_out_,
            "feature_widths": self.feature_widths_,
            "combine": self.combine,
            "flag_with": self.flag_with,
        }
        if self.calibration_digests_ is not None:  # so that guard.evaluate refuses them after a reload too
            index["calibration_digests"] = sorted(self.calibration_digests_)
        for name, det in self.detectors.items():
            fname = f"{name}.safetensors"
            index["detectors"][name] = {"file": fname, "sha256": det._write(folder / fname, secret, False)}
        if self.combined is not None:
            index["combined"] = {
                "file": "combined.safetensors",
                "sha256": self.combined._write(folder / "combined.safetensors", secret, False),
            }
        index = json.loads(json.dumps(index))
        index["integrity"] = content_seal(index, key=secret)
        text = json.dumps(index, indent=2) + "\n"
        atomic_write_text(folder / INDEX, text)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        write_digest_file(folder / INDEX, digest)
        return digest

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        model: nn.Module,
        *,
        key: bytes | None = None,
        key_env: str | None = None,
        expected_sha256: str | None = None,
    ) -> GuardedModel:
        """Load what :meth:`save` wrote around ``model``; ValueError on a damaged, altered or swapped file.

        Args:
            path: the folder.
            model: the classifier the detectors were fitted on.
            key / key_env: the key the folder was signed with (required for a signed folder;
                with a key, an unsigned folder is refused).
            expected_sha256: the digest :meth:`save` returned (of ``guarded.json``, which pins
                every member file).
        """
        folder = Path(path)
        idx_path = folder / INDEX
        if not idx_path.is_file():
            raise ValueError(f"{str(folder)!r} is not a saved GuardedModel folder (no {INDEX}).")
        secret = resolve_key(key, key_env)
        raw = idx_path.read_bytes()
        where = f"GuardedModel index {str(idx_path)!r}"
        check_expected_sha256(expected_sha256, hashlib.sha256(raw).hexdigest(), where)
        try:
            index = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{str(idx_path)!r} is not valid JSON: {err}") from err
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise ValueError(
                f"{str(idx_path)!r} has an unknown format {index.get('format') if isinstance(index, dict) else None!r} "
                f"(expected {FORMAT!r}; a folder written by an older guard: fit and save it again)."
            )
        check_seal(index.pop("integrity", None), index, None, secret, where)

        def member(entry: Any, what: str) -> Any:
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("file"), str)
                or Path(entry["file"]).name != entry["file"]
                or entry["file"].startswith(".")
                or not isinstance(entry.get("sha256"), str)
            ):
                raise ValueError(
                    f"{where}: {what} must be {{'file': a file name in the folder, 'sha256': hex}}; got {entry!r:.100}."
                )
            return (
                Detector.load(folder / entry["file"], key=secret, expected_sha256=entry.get("sha256"))
                if what != "combined"
                else Combined.load(folder / entry["file"], key=secret, expected_sha256=entry.get("sha256"))
            )

        if not isinstance(index.get("detectors"), dict):
            raise ValueError(
                f"{where}: 'detectors' must map names to member files; got {index.get('detectors')!r:.100}."
            )
        dets = {name: member(entry, f"detector {name!r}") for name, entry in index["detectors"].items()}
        guarded = cls(
            model,
            dets,
            layers=index.get("layers"),
            pool=index.get("pool", "auto"),
            batch_size=index.get("batch_size", 512),
            combine=index.get("combine", "max"),
            flag_with=index.get("flag_with"),
        )
        guarded.left_out_ = dict(index.get("left_out", {}))
        guarded.feature_widths_ = dict(index.get("feature_widths", {}))
        digests = index.get("calibration_digests")
        guarded.calibration_digests_ = frozenset(str(d) for d in digests) if isinstance(digests, list) else None
        if "combined" in index:
            guarded.combined = member(index["combined"], "combined")  # type: ignore[assignment]
        return guarded


def _names(value: Any, name: str) -> list[Any]:
    """A list from a list/tuple/set or a single name (a str is one name, not its letters)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, set, frozenset)) or (
        hasattr(value, "__iter__") and not isinstance(value, (bytes, torch.Tensor, Mapping))
    ):
        return list(value)
    raise TypeError(f"{name} must be a list of names (or one name); got {type(value).__name__}.")


def wrap(
    model: nn.Module,
    detectors: Sequence[str | Detector] | Mapping[str, Detector] | None = None,
    layers: Sequence[str] | None = None,
    *,
    pool: str = "auto",
    batch_size: int = 512,
    combine: str = "max",
    flag_with: Sequence[str] | None = None,
) -> GuardedModel:
    """Attach detectors to ``model``.

    Args:
        model: the classifier (images in [0, 1] -> logits); not modified.
        detectors: names from :data:`guard.detectors.DETECTORS` ("saliency", "knn", "ppca",
            "knn_consistency", "squeeze", the anchors "mahalanobis" and "lid", and "masking":
            PatchCleanser's one-mask round, certified against one patch, K forward passes per
            image; "occlusion": SentiNet's test on the saliency map, uncertified, one extra
            forward pass), Detector instances (e.g. ``MaskingDetector(patch_size=5)``), or a dict
            name -> Detector. Default: the first five. Named detectors get their default configuration on the feature
            layers (``DETECTORS[name].default(layers)``: kNN rank and consistency on the last
            two, PPCA on the last); a default detector that cannot run on the model is left
            out at ``fit`` with its reason (``left_out_``).
        layers: feature layers (module paths, or ``"path:input"``) in network order, the last
            being the head's input. Default: read from the model's forward pass at ``fit``
            (:func:`guard.core.features.default_feature_layers`).
        pool: how a spatial map becomes a vector (:func:`guard.core.features.pool_features`).
        batch_size: images per forward pass when scoring many.
        combine: the rule of the combined flag ("max", "fisher", "weighted";
            :class:`guard.detectors.Combined`).
        flag_with: the detectors the combined flag uses (default all); the others are scored
            and calibrated on their own (the audit measures the published anchors this way).

    Returns:
        an unfitted :class:`GuardedModel`; call ``.fit(train)`` then ``.calibrate(heldout)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    if layers is not None:
        layers = _names(layers, "layers")
        if not layers:
            raise ValueError("layers must name at least one layer; got an empty list.")
        for lay in layers:
            get_layer(model, lay)
    if detectors is None:
        detectors = DEFAULT_DETECTORS
    if isinstance(detectors, Mapping):
        dets, names = dict(detectors), []
    else:
        dets, names = {}, []
        for d in _names(detectors, "detectors") if not isinstance(detectors, Detector) else [detectors]:
            if isinstance(d, str):
                if d not in DETECTORS:
                    raise ValueError(
                        f"unknown detector {d!r}; expected one of {sorted(DETECTORS)} or a Detector instance."
                    )
                names.append(d)
            elif isinstance(d, Detector):
                dets[d.name] = d
            else:
                raise TypeError(f"detectors must be names or Detector instances; got {type(d).__name__}.")
    for name, det in dets.items():
        if not isinstance(det, Detector):
            raise TypeError(f"detector {name!r} must be a Detector; got {type(det).__name__}.")
    guarded = GuardedModel(
        model,
        dets,
        defaults=names,
        layers=layers,
        pool=pool,
        batch_size=batch_size,
        combine=combine,
        flag_with=flag_with,
    )
    if names and layers is not None:
        guarded._build_defaults(torch.empty(0))
    return guarded
