"""SentiNet's occlusion test on the saliency map: cover the most salient square and see whether the label holds.

Chou, Tramèr & Pellegrino, "SentiNet: Detecting Localized Universal Attacks Against Deep Learning
Systems" (IEEE S&P Workshops 2020): a localized universal attack (a patch) works by being the
most salient region of the image, so covering that region takes its effect away. Here the
region is the ``window`` x ``window`` square holding the most |gradient| mass of the predicted
class's logit (channels summed: the map of ``SaliencyConcentration(method="saliency")``), found
with the separable box filter of :func:`~guard.detectors.saliency.window_share` and an argmax
(ties: the first position, row-major). The square is set to ``fill`` and the model runs once on
the covered images; the score is the best other class's logit minus the logit of the uncovered
image's label, on the covered image. ``score > 0``: covering the most salient square changed
the label.

Why: on CIFAR-10 with 5x5 patches (``benchmarks/results/saliency_patches_cifar10.json``, written
by ``benchmarks/studies/saliency_patches.py``; the patches guide shows it), the concentration score
ranks successful patched images near chance against clean ones and this test well above it; the
:class:`~guard.detectors.masking.MaskingDetector` ranks them higher still and, at a 5% false-positive
threshold, catches about three times as many, for 36 times the forward passes.

An empirical detector: it carries no certificate. An attacker who knows it can make a patch
that is not the most salient square (or that survives being covered elsewhere);
:class:`~guard.detectors.masking.MaskingDetector` is the certified one.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from guard.core.mask_scores import other_margin
from guard.core.models import eval_mode, model_device
from guard.core.validation import call_model, check_float, check_images, check_int, check_labels
from guard.detectors.base import Batch, Detector
from guard.detectors.saliency import torch_attributions

__all__ = ["SalientOcclusion", "salient_window", "cover_window", "occlusion_margin"]


def salient_window(attr: torch.Tensor, window: int) -> torch.Tensor:
    """Top-left corners (N, 2) of the ``window`` square holding the most of each map ``attr`` (N, H, W).

    The window sums are :func:`~guard.detectors.saliency.window_share`'s separable box filter; the
    first position of the largest (row-major) wins ties. A window larger than the map is clamped to it.
    """
    a = attr.clamp_min(0).unsqueeze(1)
    w = min(window, a.shape[-1], a.shape[-2])
    pooled = F.avg_pool2d(F.avg_pool2d(a, (w, 1), stride=1), (1, w), stride=1)
    idx = pooled.flatten(1).argmax(1)
    width = a.shape[-1] - w + 1
    return torch.stack([torch.div(idx, width, rounding_mode="floor"), idx % width], 1)


def cover_window(x: torch.Tensor, corner: torch.Tensor, window: int, fill: float) -> torch.Tensor:
    """``x`` (N, C, H, W) with each image's ``window`` square at ``corner`` (N, 2) set to ``fill``.

    The mask comes from index grids compared with the corners (no loop over images), so the
    same ops trace into the ONNX graph.
    """
    w = min(window, x.shape[-1], x.shape[-2])
    rows = torch.arange(x.shape[-2], device=x.device)[None]
    cols = torch.arange(x.shape[-1], device=x.device)[None]
    top, left = corner[:, :1].to(x.device), corner[:, 1:].to(x.device)
    in_rows = (rows >= top) & (rows < top + w)
    in_cols = (cols >= left) & (cols < left + w)
    inside = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return x.masked_fill(inside, fill)


def occlusion_margin(covered_logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Best other class's logit minus ``label``'s (N,), on the covered images' logits (N, classes)."""
    return other_margin(covered_logits[:, None], label)


def _occlusion_score(
    model: nn.Module, x: torch.Tensor, grad: torch.Tensor, label: torch.Tensor, window: int, fill: float
) -> torch.Tensor:
    """The score of images ``x`` from their input gradient ``grad`` and uncovered label (one forward pass)."""
    corner = salient_window(grad.abs().sum(1), window)
    return occlusion_margin(model(cover_window(x, corner, window, fill)), label)


class SalientOcclusion(Detector):
    """SentiNet's test on the saliency map: the label's margin once the most salient square is covered.

    Score = best other class's logit - the uncovered label's logit, on the image with its most
    salient ``window`` square set to ``fill`` (higher = more suspicious; > 0: the label changed).
    One backward pass and one extra forward pass per image. Not a certificate (see the module
    docstring); :class:`~guard.detectors.masking.MaskingDetector` is the certified detector.

    Args:
        window: side of the covered square in pixels, or "auto": the side of a square of
            ``window_area`` of the image, read from the images at fit. Set it to the side of
            the patch you defend against.
        window_area: the area share ``window="auto"`` covers (0.025: 5 px on 32-px images).
        fill: the covered pixels' value (grey, as the masking detector).
        batch_size: images per backward pass and per covered forward pass.

    Fitted state: ``window_`` (the side used).
    """

    name: ClassVar[str] = "occlusion"
    _meta_attrs = ("window_",)
    #: the map is read from :attr:`Batch.input_grad` when the GuardedModel's forward pass took it
    needs_input_grad: ClassVar[bool] = True

    def __init__(
        self,
        window: int | str = "auto",
        *,
        window_area: float = 0.025,
        fill: float = 0.5,
        batch_size: int = 512,
    ) -> None:
        self.window = window
        self.window_area = window_area
        self.fill = fill
        self.batch_size = batch_size

    def _validate(self) -> None:
        owner = type(self).__name__
        if isinstance(self.window, str):
            if self.window != "auto":
                raise ValueError(
                    f"The 'window' parameter of {owner} must be an int >= 1 or 'auto'. Got {self.window!r}."
                )
        else:
            check_int(self.window, "window", owner, low=1)
        check_float(self.window_area, "window_area", owner, low=0.0, high=1.0, low_open=True)
        check_float(self.fill, "fill", owner, low=0.0, high=1.0)
        check_int(self.batch_size, "batch_size", owner, low=1)

    def fit(self, model: nn.Module, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> SalientOcclusion:
        """Check the parameters and that ``model`` takes images like ``x``; ``window="auto"`` reads their size."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        self._validate()
        if x is None:
            if self.window == "auto":
                raise ValueError(
                    "SalientOcclusion(window='auto') reads the image size at fit: pass clean images, fit(model, x)."
                )
            self.window_ = int(self.window)
        else:
            x = check_images(x, "x")
            if y is not None:  # nothing is learnt from the labels, but bad labels are still an error
                check_labels(y, "y", n=int(x.shape[0]))
            with eval_mode(model), torch.no_grad():  # images the model cannot take are refused here
                call_model(model, x[:1].to(model_device(model, x.device), dtype=torch.float32), "x")
            h, w = int(x.shape[-2]), int(x.shape[-1])
            auto = max(1, round(math.sqrt(self.window_area * h * w)))
            self.window_ = auto if self.window == "auto" else int(self.window)
        self.fitted_ = True
        return self

    def fit_batch(self, batch: Batch, labels: torch.Tensor) -> SalientOcclusion:
        return self.fit(batch.model, batch.x[:8])

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Occlusion scores Tensor[N] (CPU), each image's own gradient taken here (works under no_grad)."""
        self._check_fitted()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        check_images(x, "x")
        device = model_device(model, x.device)
        out = []
        with eval_mode(model):
            for i in range(0, x.shape[0], self.batch_size):
                xb = x[i : i + self.batch_size].to(device=device, dtype=torch.float32)
                # gradients w.r.t. the input only, even when the caller is under no_grad or inference_mode
                with torch.inference_mode(False), torch.enable_grad():
                    xg = xb.detach().clone().requires_grad_(True)
                    logits = call_model(model, xg)
                    if logits.dim() != 2 or logits.shape[0] != xg.shape[0]:
                        raise ValueError(
                            f"the model must return logits of shape ({xg.shape[0]}, C); got shape {tuple(logits.shape)}."
                        )
                    label = logits.argmax(1)
                    (g,) = torch.autograd.grad(logits.gather(1, label[:, None]).sum(), xg)
                with torch.no_grad():
                    out.append(_occlusion_score(model, xg.detach(), g, label, self.window_, float(self.fill)))
        return torch.cat(out).float().cpu()

    def score_batch(self, batch: Batch) -> torch.Tensor:
        """The score from the gradient the GuardedModel's forward pass took (``batch.input_grad``),
        else from a gradient taken here (:meth:`score`)."""
        if batch.input_grad is None:
            return self.score(batch.model, batch.x)
        self._check_fitted()
        label, out = batch.pred, []
        with eval_mode(batch.model), torch.no_grad():
            for i in range(0, batch.x.shape[0], self.batch_size):
                s = slice(i, i + self.batch_size)
                xb, g = batch.x[s].float(), batch.input_grad[s].float().to(batch.x.device)
                out.append(_occlusion_score(batch.model, xb, g, label[s], self.window_, float(self.fill)))
        return torch.cat(out).float().cpu()

    def export_head(self) -> nn.Module:
        self._check_fitted()
        return _OcclusionHead(self.window_, float(self.fill))


class _OcclusionHead(nn.Module):
    """SalientOcclusion in the graph: the saliency map by ``torch.autograd.grad``
    (:func:`~guard.detectors.saliency.torch_attributions`, traced into plain ops), then the same
    window, cover and margin.

    It is its own differentiable stand-in for adaptive attacks, as the masking head is: the
    covered image's margin is differentiable in the pixels outside the square, and the square's
    position (an argmax) is held fixed by the step.
    """

    def __init__(self, window: int, fill: float) -> None:
        super().__init__()
        self.window, self.fill = window, fill

    def forward(self, batch: Batch) -> torch.Tensor:
        with torch.enable_grad():
            attr = torch_attributions(batch.model, batch.x, batch.pred, "saliency")
        corner = salient_window(attr, self.window)
        return occlusion_margin(batch.model(cover_window(batch.x, corner, self.window, self.fill)), batch.pred)
