"""PatchCleanser's masking: certified recovery and certified detection of one adversarial patch.

Xiang, Mahloujifar & Mittal, "PatchCleanser: Certifiably Robust Defense against Adversarial
Patches for Any Image Classifier" (USENIX Security 2022). A *mask set* of k x k rectangles is
built so that every position of a patch of the stated size lies inside at least one mask
(:func:`mask_set`: stride ``s = ceil((H - p + 1) / k)``, mask side ``p + s - 1``, the last
mask flush with the border; the construction of the reference code, inspire-group/PatchCleanser
``utils/defense.py``). Masked pixels are set to ``fill`` (grey, 0.5: the reference zeroes the
*normalised* image, which is the data set's mean colour).

* **Recovery** (:func:`double_masking`, the paper's Algorithm 1): if the one-mask predictions
  agree, that label; else, for each mask whose label is not the majority's (in mask order), if
  every two-mask prediction with it agrees with its label, that label; else the majority label.
  An image is **certified for recovery** when *every* two-mask prediction (all pairs, the
  one-mask predictions included) equals its true label (the paper's Theorem 1): then no patch of
  the size, anywhere, with any content, changes the recovered label.
* **Detection** (:class:`MaskingDetector`): an input is flagged when a one-mask prediction
  differs from the model's prediction on the whole input (the ``score``, by default the largest
  margin any mask gives another class over that prediction, is > 0 exactly then: ``score > 0``
  is the certified operating point). An image is **certified for
  detection** when every one-mask prediction equals its true label: a patch lies inside some
  mask, whose prediction the patch cannot change, so a patched input either keeps the true label
  (all masks and the whole input agree) or is flagged. This is the masking form of the
  certified-detection criterion of PatchGuard++ (Xiang & Mittal 2021) and ViP (Li, Zhang & Xie,
  ECCV 2022). It needs one-mask correctness only; the issue's wording, "two-mask predictions
  all agree", is a stronger condition (every recovery-certified image is detection-certified).

All masks of an image run as one batch, in chunks of at most ``batch_size`` masked images.
Written by hand: no library ships PatchCleanser (IBM ART has none); the reference code is a
CUDA-only research script.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from guard.core.mask_scores import MASK_SCORES, mask_score, other_margin
from guard.core.models import eval_mode, model_device
from guard.core.validation import call_model, check_float, check_images, check_int, check_labels
from guard.detectors.base import Batch, Detector

__all__ = [
    "MaskSet",
    "mask_set",
    "patch_pixels",
    "apply_masks",
    "one_mask_predictions",
    "one_mask_logits",
    "other_margin",
    "two_mask_predictions",
    "double_masking",
    "certify",
    "Certificate",
    "MaskingDetector",
    "MASK_SCORES",
    "mask_score",
]


def _pair(value: Any, name: str) -> tuple[int, int]:
    """An int or an (H, W) pair of ints >= 1."""
    vals = (value, value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    if (
        not isinstance(vals, (tuple, list, torch.Size))
        or len(vals) != 2
        or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in vals)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints (height, width); got {value!r}.")
    if min(int(v) for v in vals) < 1:
        raise ValueError(f"{name} must be >= 1 pixel; got {tuple(int(v) for v in vals)}.")
    return int(vals[0]), int(vals[1])


def patch_pixels(size: int | float | Sequence[int], image_size: tuple[int, int]) -> tuple[int, int]:
    """A patch's (height, width) in pixels from an int side, an (h, w) pair, or a float share of
    the image's area in (0, 1) (a square of side ``round(sqrt(share * H * W))``, as guard's patch
    attacks size theirs)."""
    h, w = image_size
    if isinstance(size, float):
        if not (0.0 < size < 1.0) or not math.isfinite(size):
            raise ValueError(f"patch_size as an area share must lie in (0, 1); got {size!r}.")
        side = max(1, int(round(math.sqrt(size * h * w))))
        return side, side
    return _pair(size, "patch_size")


def _positions(length: int, mask: int, stride: int) -> list[int]:
    out = list(range(0, length - mask + 1, stride))
    if (length - mask) % stride:
        out.append(length - mask)  # the last mask flush with the border
    return out


def _uncovered_1d(length: int, patch: int, starts: Sequence[int], mask: int) -> list[int]:
    """Patch offsets along one axis that lie inside no mask interval."""
    return [a for a in range(length - patch + 1) if not any(r <= a and a + patch <= r + mask for r in starts)]


@dataclass(frozen=True)
class MaskSet:
    """A grid of rectangular masks: ``rows`` x ``cols`` top-left corners of ``mask_size`` boxes.

    ``keep()`` gives the masks as bool (K, 1, H, W), False inside the box; mask ``i`` is row
    ``i // len(cols)``, column ``i % len(cols)``.
    """

    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    mask_size: tuple[int, int]
    stride: tuple[int, int]
    rows: tuple[int, ...]
    cols: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        """(top, left, height, width) of every mask, in mask order."""
        return [(r, c, self.mask_size[0], self.mask_size[1]) for r in self.rows for c in self.cols]

    def keep(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool (K, 1, H, W): True where the image is kept, False inside the mask."""
        out = torch.ones(len(self), 1, *self.image_size, dtype=torch.bool, device=device)
        for i, (r, c, mh, mw) in enumerate(self.boxes):
            out[i, :, r : r + mh, c : c + mw] = False
        return out

    def uncovered(self, patch_size: int | Sequence[int]) -> list[tuple[int, int]]:
        """Top-left positions of a patch of ``patch_size`` that no mask contains (empty: covered).

        Exact: a box lies inside a grid mask iff it lies inside the mask's interval on both
        axes, and the grid offers every pair of row and column intervals.
        """
        ph, pw = _pair(patch_size, "patch_size")
        if ph > self.image_size[0] or pw > self.image_size[1]:
            raise ValueError(
                f"patch_size {(ph, pw)} is larger than the {self.image_size[0]}x{self.image_size[1]} image."
            )
        bad_r = _uncovered_1d(self.image_size[0], ph, self.rows, self.mask_size[0])
        bad_c = _uncovered_1d(self.image_size[1], pw, self.cols, self.mask_size[1])
        all_r, all_c = range(self.image_size[0] - ph + 1), range(self.image_size[1] - pw + 1)
        return sorted({(r, c) for r in bad_r for c in all_c} | {(r, c) for r in all_r for c in bad_c})

    def check_covers(self, patch_size: int | Sequence[int]) -> None:
        """ValueError naming a position when some patch position of ``patch_size`` lies inside no mask."""
        bad = self.uncovered(patch_size)
        if bad:
            raise ValueError(
                f"the masks ({self.mask_size[0]}x{self.mask_size[1]}, stride {self.stride}) do not cover every position "
                f"of a {tuple(_pair(patch_size, 'patch_size'))} patch on {self.image_size[0]}x{self.image_size[1]} images: "
                f"{len(bad)} positions uncovered, e.g. top-left {bad[0]}; no certificate holds for that patch size."
            )

    def check_images(self, x: Any, name: str = "x") -> torch.Tensor:
        x = check_images(x, name)
        if tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(
                f"{name} must be images of {self.image_size[0]}x{self.image_size[1]} pixels (the mask set's); "
                f"got shape {tuple(x.shape)}."
            )
        return x


def mask_set(
    image_size: int | Sequence[int],
    patch_size: int | float | Sequence[int],
    k: int = 6,
    *,
    stride: int | Sequence[int] | None = None,
    mask_size: int | Sequence[int] | None = None,
) -> MaskSet:
    """PatchCleanser's mask set: at most ``k`` x ``k`` masks covering every position of the patch.

    Args:
        image_size: H (square) or (H, W).
        patch_size: the largest patch to certify against: a side in pixels, (h, w), or a float
            share of the image area.
        k: masks per axis (the computation budget; the reference's ``num_mask``, default 6).
        stride: override the stride (default ``ceil((H - p + 1) / k)``).
        mask_size: override the mask side (default ``p + stride - 1``, capped at the image).

    Raises:
        ValueError: the patch is larger than the image, or the masks (with an overridden
            ``stride``/``mask_size``) leave some patch position uncovered.
    """
    img = _pair(image_size, "image_size")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k (masks per axis) must be an int >= 1; got {k!r}.")
    patch = patch_pixels(patch_size, img)
    if patch[0] > img[0] or patch[1] > img[1]:
        raise ValueError(f"patch_size {patch} is larger than the {img[0]}x{img[1]} image: no mask set can cover it.")
    s = (
        tuple(math.ceil((n - p + 1) / int(k)) for n, p in zip(img, patch))
        if stride is None
        else _pair(stride, "stride")
    )
    m = (
        tuple(min(p + si - 1, n) for p, si, n in zip(patch, s, img))
        if mask_size is None
        else _pair(mask_size, "mask_size")
    )
    if m[0] > img[0] or m[1] > img[1]:
        raise ValueError(f"mask_size {m} is larger than the {img[0]}x{img[1]} image.")
    out = MaskSet(img, patch, m, s, tuple(_positions(img[0], m[0], s[0])), tuple(_positions(img[1], m[1], s[1])))
    out.check_covers(patch)
    return out


def apply_masks(x: torch.Tensor, keep: torch.Tensor, fill: float) -> torch.Tensor:
    """Every image of ``x`` (N, C, H, W) under every mask of ``keep`` (K, 1, H, W): (N * K, C, H, W),
    image-major; plain torch ops (traced into the ONNX graph as they are)."""
    k = keep.to(x.dtype)
    out = x[:, None] * k[None] + fill * (1.0 - k[None])
    return out.reshape(x.shape[0] * keep.shape[0], *x.shape[1:])


#: two-mask pairs per forward pass in :func:`certify`'s recovery round (it stops at an image's first wrong chunk)
PAIR_CHUNK = 128

#: models that refused channels-last input (e.g. a ``.view`` on a conv output), so they get the default layout
_NO_CHANNELS_LAST: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _outputs(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The model's logits of ``x``, ``batch_size`` images per forward pass.

    The images go in as channels-last (NHWC) tensors: a convolution on the CPU then runs without
    reordering its input, about 1.2x the throughput of the default layout on the demo ResNet-20
    (benchmarks/results/certify_vs_patchcleanser.json). The model is left as it is; one that cannot take that
    layout (a ``.view`` of a conv output raises) is remembered and gets the default layout. The
    values are the same, so the labels are those of the default layout up to float rounding.
    """
    if x.dim() == 4 and x.shape[0] and model not in _NO_CHANNELS_LAST:
        nhwc = x.contiguous(memory_format=torch.channels_last)
        try:
            first = model(nhwc[:batch_size])
        except RuntimeError:
            _NO_CHANNELS_LAST.add(model)
        else:
            rest = [model(nhwc[i : i + batch_size]) for i in range(batch_size, x.shape[0], batch_size)]
            return torch.cat([first, *rest])
    return torch.cat([call_model(model, x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def _labels(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The model's labels of ``x`` (:func:`_outputs`' argmax)."""
    return _outputs(model, x, batch_size).argmax(1)


def _prepare(model: Any, x: Any, masks: MaskSet, batch_size: int) -> torch.Tensor:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    if not isinstance(masks, MaskSet):
        raise TypeError(f"masks must be a MaskSet (from mask_set); got {type(masks).__name__}.")
    check_int(batch_size, "batch_size", "masking", low=1)
    x = masks.check_images(x, "x")
    return x.detach().to(model_device(model, x.device), dtype=torch.float32)


@torch.no_grad()
def one_mask_predictions(
    model: nn.Module, x: torch.Tensor, masks: MaskSet, *, fill: float = 0.5, batch_size: int = 1024
) -> torch.Tensor:
    """Labels (N, K) of every image under every single mask (the first round of masking)."""
    x = _prepare(model, x, masks, batch_size)
    keep = masks.keep(x.device)
    per = max(1, batch_size // len(masks))
    with eval_mode(model):
        out = [
            _labels(model, apply_masks(x[i : i + per], keep, fill), batch_size).view(-1, len(masks))
            for i in range(0, x.shape[0], per)
        ]
    return torch.cat(out).cpu()


@torch.no_grad()
def one_mask_logits(
    model: nn.Module, x: torch.Tensor, masks: MaskSet, *, fill: float = 0.5, batch_size: int = 1024
) -> torch.Tensor:
    """Logits (N, K, classes) of every image under every single mask (the first round, with the
    scores behind its labels: ``one_mask_logits(...).argmax(2)`` is :func:`one_mask_predictions`)."""
    x = _prepare(model, x, masks, batch_size)
    keep = masks.keep(x.device)
    per = max(1, batch_size // len(masks))
    with eval_mode(model):
        out = [
            _outputs(model, apply_masks(x[i : i + per], keep, fill), batch_size).unflatten(0, (-1, len(masks)))
            for i in range(0, x.shape[0], per)
        ]
    return torch.cat(out).float().cpu()


def _pair_labels(
    model: nn.Module,
    img: torch.Tensor,
    keep: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    fill: float,
    batch_size: int,
) -> torch.Tensor:
    """Labels of one image (1, C, H, W) under the mask pairs (first[p], second[p])."""
    pair_keep = keep[first] & keep[second]
    return _labels(model, apply_masks(img, pair_keep, fill), batch_size).cpu()


@torch.no_grad()
def two_mask_predictions(
    model: nn.Module, x: torch.Tensor, masks: MaskSet, *, fill: float = 0.5, batch_size: int = 1024
) -> torch.Tensor:
    """Labels (N, K, K) under every pair of masks (symmetric; the diagonal is the one-mask round).

    The full map PatchCleanser certifies from; :func:`certify` computes it with an early exit.
    """
    x = _prepare(model, x, masks, batch_size)
    keep, n_mask = masks.keep(x.device), len(masks)
    first, second = torch.triu_indices(n_mask, n_mask)
    out = torch.empty(x.shape[0], n_mask, n_mask, dtype=torch.long)
    with eval_mode(model):
        for j in range(x.shape[0]):
            lab = torch.cat(
                [
                    _pair_labels(
                        model,
                        x[j : j + 1],
                        keep,
                        first[i : i + batch_size].to(x.device),
                        second[i : i + batch_size].to(x.device),
                        fill,
                        batch_size,
                    )
                    for i in range(0, first.numel(), batch_size)
                ]
            )
            out[j, first, second] = lab
            out[j, second, first] = lab
    return out


def _majority(labels: torch.Tensor) -> int:
    """The most frequent label (ties: the smallest)."""
    return int(torch.bincount(labels).argmax())


@torch.no_grad()
def double_masking(
    model: nn.Module,
    x: torch.Tensor,
    masks: MaskSet,
    *,
    fill: float = 0.5,
    batch_size: int = 1024,
    one_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """PatchCleanser's recovered labels (N,) (the paper's Algorithm 1; see the module docstring).

    ``one_mask``: the one-mask labels of ``x`` when already computed (:func:`one_mask_predictions`).
    The second round runs only on images whose one-mask labels disagree, a group of disagreeing
    masks (times all K partners) per forward pass, in mask order, stopping at the first whose
    two-mask labels all agree with it.
    """
    x = _prepare(model, x, masks, batch_size)
    one = (
        one_mask_predictions(model, x, masks, fill=fill, batch_size=batch_size) if one_mask is None else one_mask.cpu()
    )
    if one.shape != (x.shape[0], len(masks)):
        raise ValueError(f"one_mask must be labels of shape ({x.shape[0]}, {len(masks)}); got {tuple(one.shape)}.")
    keep, n_mask = masks.keep(x.device), len(masks)
    group = max(1, batch_size // n_mask)
    out = one[:, 0].clone()
    with eval_mode(model):
        for j in range(x.shape[0]):
            labels = one[j]
            if bool((labels == labels[0]).all()):
                continue  # Case I: unanimous
            majority = _majority(labels)
            out[j] = majority  # Case III unless a disagreer survives its second round
            disagreers = [i for i in range(n_mask) if int(labels[i]) != majority]
            for g in range(0, len(disagreers), group):
                chunk = torch.tensor(disagreers[g : g + group], device=x.device)
                first = chunk.repeat_interleave(n_mask)
                second = torch.arange(n_mask, device=x.device).repeat(chunk.numel())
                rows = _pair_labels(model, x[j : j + 1], keep, first, second, fill, batch_size).view(
                    chunk.numel(), n_mask
                )
                hits = [i for i, row in zip(chunk.tolist(), rows) if bool((row == labels[i]).all())]
                if hits:
                    out[j] = labels[hits[0]]  # Case II: the first disagreer whose second round agrees with it
                    break
    return out


@dataclass
class Certificate:
    """Per image: what :func:`certify` found (CPU tensors of length N).

    Attributes:
        patch_size: (h, w) of the patch the certificate holds against.
        masks: the mask set used.
        y: the true labels.
        clean_pred: the bare model's labels.
        one_mask: (N, K) one-mask labels.
        recovered: double-masking labels (the defended model's output).
        recovery_certified: every two-mask label equals ``y``.
        detection_certified: every one-mask label equals ``y``.
        flagged: the detector's certified flag on the clean image (a one-mask label differs
            from ``clean_pred``).
    """

    patch_size: tuple[int, int]
    masks: MaskSet
    y: torch.Tensor
    clean_pred: torch.Tensor
    one_mask: torch.Tensor
    recovered: torch.Tensor
    recovery_certified: torch.Tensor
    detection_certified: torch.Tensor
    flagged: torch.Tensor

    def summary(self) -> dict[str, Any]:
        """Rates over the images (JSON-friendly)."""
        h, w = self.masks.image_size
        mean = lambda t: round(float(t.float().mean()), 4)  # noqa: E731
        return {
            "n": int(self.y.numel()),
            "patch_side": self.patch_size[0] if self.patch_size[0] == self.patch_size[1] else list(self.patch_size),
            "patch_area": round(self.patch_size[0] * self.patch_size[1] / (h * w), 4),
            "masks": len(self.masks),
            "mask_size": list(self.masks.mask_size),
            "mask_stride": list(self.masks.stride),
            "model_accuracy": mean(self.clean_pred == self.y),
            "clean_accuracy": mean(self.recovered == self.y),
            "certified_recovery": mean(self.recovery_certified),
            "certified_detection": mean(self.detection_certified),
            "clean_flagged": mean(self.flagged),
        }


@torch.no_grad()
def certify(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    patch_size: int | float | Sequence[int] | None = None,
    *,
    k: int = 6,
    masks: MaskSet | None = None,
    fill: float = 0.5,
    batch_size: int = 1024,
) -> Certificate:
    """Certified recovery and certified detection, per image, against one patch of ``patch_size``.

    Args:
        model: the classifier (images in [0, 1] -> logits); not modified.
        x: images (N, C, H, W) in [0, 1].
        y: their true labels.
        patch_size: side in pixels, (h, w), or an area share; with ``masks``, checked to be covered.
        k: masks per axis when the mask set is built here.
        masks: a mask set from :func:`mask_set` (default: built from the images and ``patch_size``).
        fill: the masked pixels' value.
        batch_size: masked images per forward pass.

    Returns:
        a :class:`Certificate`. The two-mask round runs only on images whose one-mask labels
        are all right (the others cannot be recovery-certified) and stops at an image's first
        wrong pair.
    """
    x = check_images(x, "x")
    if masks is None:
        if patch_size is None:
            raise ValueError("certify needs patch_size (or a mask set, masks=...); got neither.")
        masks = mask_set(tuple(x.shape[-2:]), patch_size, k)
    elif not isinstance(masks, MaskSet):
        raise TypeError(f"masks must be a MaskSet (from mask_set); got {type(masks).__name__}.")
    patch = masks.patch_size if patch_size is None else patch_pixels(patch_size, masks.image_size)
    masks.check_covers(patch)
    check_float(fill, "fill", "certify", low=0.0, high=1.0)
    x = _prepare(model, x, masks, batch_size)
    with eval_mode(model):
        clean_pred = _labels(model, x, batch_size).cpu()
    y = check_labels(y, "y", n=int(x.shape[0])).cpu()
    one = one_mask_predictions(model, x, masks, fill=fill, batch_size=batch_size)
    detection = (one == y[:, None]).all(1)
    recovery = torch.zeros_like(detection)
    keep, n_mask = masks.keep(x.device), len(masks)
    first, second = torch.triu_indices(n_mask, n_mask, offset=1).to(x.device)
    # pairs in chunks of at most PAIR_CHUNK, so that an image stops at its first chunk with a wrong
    # label (a forward pass of 128 images costs per image what one of 1,024 does on the CPU)
    step = min(batch_size, PAIR_CHUNK)
    with eval_mode(model):
        for j in torch.nonzero(detection).flatten().tolist():
            recovery[j] = all(
                bool(
                    (
                        _pair_labels(
                            model, x[j : j + 1], keep, first[i : i + step], second[i : i + step], fill, batch_size
                        )
                        == y[j]
                    ).all()
                )
                for i in range(0, first.numel(), step)
            )  # all() stops at the first wrong chunk
    recovered = double_masking(model, x, masks, fill=fill, batch_size=batch_size, one_mask=one)
    return Certificate(
        patch, masks, y, clean_pred, one, recovered, recovery, detection, (one != clean_pred[:, None]).any(1)
    )


class MaskingDetector(Detector):
    """PatchCleanser's first round as a detector: how far the one-mask predictions move away from
    the label of the whole input (higher = more suspicious; see the module docstring).

    Two scores (``statistic``), both > 0 exactly when a one-mask label differs from the whole input's label, so
    ``score > 0`` is the certified operating point (``fit`` sets ``threshold_ = 0``: flag any
    disagreement) whichever is chosen:

    - ``"other_margin"`` (default): :func:`other_margin`, the largest margin any mask gives another
      class over the label. At a calibrated 5% false-positive rate on the mask-trained CIFAR-10
      demo it flags 37 of 60 successful universal patches and 22 of 35 PatchGAN patches, where the
      share flags 10 and 8 (benchmarks/results/masking_scores_cifar10.json; chosen on a split of
      its own, reported on another).
    - ``"disagreement"``: the share of masks whose label differs (guard's score before; a file
      saved without a statistic is read as this one).

    ``calibrate`` replaces the threshold by the clean quantile of the chosen false-positive rate,
    which flags fewer clean images and gives up the certificate where the threshold is above 0.
    :meth:`recover` gives PatchCleanser's double-masking labels with the same masks.

    Args:
        patch_size: the patch to cover: a side in pixels, (h, w), or an area share (default
            0.05, guard's patch attacks' default).
        k: masks per axis.
        fill: the masked pixels' value.
        batch_size: masked images per forward pass.
        statistic: the score, ``"other_margin"`` or ``"disagreement"``.

    Fitted state: ``image_size_``, ``patch_pixels_`` (the mask set is rebuilt from them) and
    ``statistic_`` (the score the threshold belongs to).
    """

    name: ClassVar[str] = "masking"
    _meta_attrs = ("image_size_", "patch_pixels_", "statistic_")

    def __init__(
        self,
        patch_size: int | float | Sequence[int] = 0.05,
        *,
        k: int = 6,
        fill: float = 0.5,
        batch_size: int = 1024,
        statistic: str = "other_margin",
    ) -> None:
        self.patch_size = list(patch_size) if isinstance(patch_size, tuple) else patch_size
        self.k = k
        self.fill = fill
        self.batch_size = batch_size
        self.statistic = statistic

    @property
    def masks_(self) -> MaskSet:
        self._check_fitted()
        return mask_set(tuple(self.image_size_), tuple(self.patch_pixels_), self.k)

    def fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> MaskingDetector:
        """Build the mask set for images shaped like ``x`` (nothing is learnt from their content)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        x = check_images(x, "x")
        if y is not None:  # nothing is learnt from the labels, but a caller's bad labels are still an error
            check_labels(y, "y", n=int(x.shape[0]))
        with eval_mode(model), torch.no_grad():  # images the model cannot take are refused here, not at serving time
            call_model(model, x[:1].to(model_device(model)), "x")
        owner = type(self).__name__
        check_int(self.k, "k", owner, low=1)
        check_float(self.fill, "fill", owner, low=0.0, high=1.0)
        check_int(self.batch_size, "batch_size", owner, low=1)
        if self.statistic not in MASK_SCORES:
            raise ValueError(
                f"The 'statistic' parameter of {owner} must be one of {MASK_SCORES}; got {self.statistic!r}."
            )
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        masks = mask_set(hw, tuple(self.patch_size) if isinstance(self.patch_size, list) else self.patch_size, self.k)
        self.image_size_, self.patch_pixels_ = list(hw), list(masks.patch_size)
        self.statistic_ = self.statistic
        self.threshold_ = 0.0
        self.fitted_ = True
        return self

    def fit_batch(self, batch: Batch, labels: torch.Tensor) -> MaskingDetector:
        return self.fit(batch.model, batch.x, labels)

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        meta = {"statistic_": "disagreement", **meta}  # files saved before the statistic was a choice
        if meta["statistic_"] not in MASK_SCORES:
            raise ValueError(f"statistic_ must be one of {MASK_SCORES}; got {meta['statistic_']!r}.")
        super().load_state(tensors, meta)
        self.statistic = self.statistic_

    def score_batch(self, batch: Batch) -> torch.Tensor:
        masks = self.masks_
        z = one_mask_logits(batch.model, batch.x, masks, fill=self.fill, batch_size=self.batch_size)
        return mask_score(z, batch.logits.argmax(1).cpu(), self.statistic_)

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        self.masks_.check_images(x, "x")
        return super().score(model, x)

    def recover(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """PatchCleanser's double-masking labels (N,) of ``x`` with this detector's masks."""
        return double_masking(model, x, self.masks_, fill=self.fill, batch_size=self.batch_size)

    def export_head(self) -> nn.Module:
        masks = self.masks_
        return _MaskingHead(masks.keep().float(), float(self.fill), self.statistic_)


class _MaskingHead(nn.Module):
    """The one-mask round in the graph: every image under every mask in one batch; the score and
    the majority one-mask label (the label the round would serve)."""

    step_outputs = ("majority",)

    def __init__(self, keep: torch.Tensor, fill: float, statistic: str) -> None:
        super().__init__()
        self.register_buffer("keep", keep)
        self.fill = fill
        self.statistic = statistic

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = batch.x
        z = batch.model(apply_masks(x, self.keep, self.fill)).unflatten(0, (x.shape[0], self.keep.shape[0]))
        labels = z.argmax(2)
        classes = torch.arange(batch.logits.shape[1], device=x.device)
        votes = (labels[:, :, None] == classes[None, None]).sum(1)
        return {"score": mask_score(z.float(), batch.logits.argmax(1), self.statistic), "majority": votes.argmax(1)}
