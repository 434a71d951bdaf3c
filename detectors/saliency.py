"""Saliency concentration: a visible patch draws the network's attention into one small square.

G2LVAP (localized visible adversarial patches) observes that a successful patch is the most
salient thing the network sees: the patch alone is classified as the patched images' class.
So the attribution map of a patched image has most of its mass inside one patch-sized window,
while a clean digit spreads it over its strokes. Attributions come from Captum: ``Saliency``
(|d logit / d x|, Simonyan et al. 2014; one batched backward pass), ``IntegratedGradients``
(Sundararajan et al. 2017) or ``LayerGradCam`` (Selvaraju et al. 2017, a class activation map
at a named conv layer, upsampled to the input).

Score = the largest share of |attribution| mass inside any ``window x window`` square
(average-pool with stride 1, then max, times ``window**2`` over the total), or with
``reduce="topk"`` the share inside the top ``topk`` fraction of pixels.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from guard.detectors.base import Detector
from guard.core.features import get_layer
from guard.core.models import eval_mode
from guard.core.validation import check_float, check_images, check_int

__all__ = ["SaliencyConcentration", "window_share", "topk_share"]

_METHODS = ("saliency", "integrated_gradients", "gradcam")


def window_share(attr: torch.Tensor, window: int) -> torch.Tensor:
    """Largest share of the mass of non-negative maps ``attr`` [N, H, W] in a ``window`` square."""
    a = attr.clamp_min(0).unsqueeze(1)
    w = min(window, a.shape[-1], a.shape[-2])
    pooled = F.avg_pool2d(a, w, stride=1) * (w * w)
    total = a.flatten(1).sum(1).clamp_min(1e-12)
    return pooled.flatten(1).max(1).values / total


def topk_share(attr: torch.Tensor, frac: float) -> torch.Tensor:
    """Share of the mass of ``attr`` [N, H, W] in its top ``frac`` fraction of pixels."""
    a = attr.clamp_min(0).flatten(1)
    k = max(1, int(round(frac * a.shape[1])))
    return a.topk(k, dim=1).values.sum(1) / a.sum(1).clamp_min(1e-12)


class SaliencyConcentration(Detector):
    """Concentration of the attribution map of the predicted class.

    Args:
        method: "saliency" (default: one backward pass per batch), "integrated_gradients" or
            "gradcam" (needs ``layer``, a conv layer; the map is upsampled to the input size).
        window: side of the square window in pixels (tune it to the patch size you defend
            against; the default 8 suits 28x28 inputs and patches of about 5-8 pixels).
        reduce: "window" or "topk".
        topk: the fraction of pixels for ``reduce="topk"``.
        layer: the conv layer for "gradcam".
        n_steps: integration steps for "integrated_gradients".
        batch_size: images per backward pass.
    """

    name: ClassVar[str] = "saliency"
    needs_model: ClassVar[bool] = True
    _tensor_attrs = ()

    def __init__(self, method: str = "saliency", *, window: int = 8, reduce: str = "window", topk: float = 0.05,
                 layer: str | None = None, n_steps: int = 16, batch_size: int = 512) -> None:
        self.method = method
        self.window = window
        self.reduce = reduce
        self.topk = topk
        self.layer = layer
        self.n_steps = n_steps
        self.batch_size = batch_size

    def _validate(self, model: nn.Module | None) -> None:
        owner = type(self).__name__
        if self.method not in _METHODS:
            raise ValueError(f"The 'method' parameter of {owner} must be one of {_METHODS}. Got {self.method!r}.")
        if self.reduce not in ("window", "topk"):
            raise ValueError(f"The 'reduce' parameter of {owner} must be 'window' or 'topk'. Got {self.reduce!r}.")
        check_int(self.window, "window", owner, low=1)
        check_float(self.topk, "topk", owner, low=0.0, high=1.0, low_open=True)
        check_int(self.n_steps, "n_steps", owner, low=1)
        check_int(self.batch_size, "batch_size", owner, low=1)
        if self.method == "gradcam":
            if self.layer is None:
                raise ValueError(f"{owner}(method='gradcam') needs layer='<conv layer module path>'. Got None.")
            if model is not None:
                get_layer(model, self.layer)

    def fit(self, model: nn.Module, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> "SaliencyConcentration":
        """Check the parameters against ``model`` (the score needs no training data)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        self._validate(model)
        if x is not None:
            check_images(x, "x")
        self.fitted_ = True
        return self

    def attributions(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Non-negative attribution maps [N, H, W] for class ``target`` (channels summed)."""
        from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Saliency

        if self.method == "saliency":
            a = Saliency(model).attribute(x, target=target, abs=True)
        elif self.method == "integrated_gradients":
            a = IntegratedGradients(model).attribute(x, target=target, n_steps=self.n_steps).abs()
        else:
            cam = LayerGradCam(model, get_layer(model, self.layer)).attribute(x, target=target, relu_attributions=True)
            a = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear").clamp_min(0)
        return a.detach().sum(1)

    def score(self, model: nn.Module, x: torch.Tensor, *, target: torch.Tensor | None = None) -> torch.Tensor:
        """Concentration scores Tensor[N] for the predicted class (or ``target``)."""
        self._check_fitted()
        check_images(x, "x")
        device = next((p.device for p in model.parameters()), x.device)
        out = []
        with eval_mode(model):
            for i in range(0, x.shape[0], self.batch_size):
                xb = x[i:i + self.batch_size].to(device)
                if target is None:
                    with torch.no_grad():
                        tb = model(xb).argmax(1)
                else:
                    tb = target[i:i + self.batch_size].to(device)
                # gradients w.r.t. the input only; works even when the caller is under
                # torch.no_grad() or torch.inference_mode()
                with torch.inference_mode(False), torch.enable_grad():
                    a = self.attributions(model, xb.detach().clone().requires_grad_(True), tb.clone())
                out.append(window_share(a, self.window) if self.reduce == "window" else topk_share(a, self.topk))
        return torch.cat(out).float().cpu()

    def get_params(self) -> dict[str, Any]:
        return {"method": self.method, "window": self.window, "reduce": self.reduce, "topk": self.topk,
                "layer": self.layer, "n_steps": self.n_steps, "batch_size": self.batch_size}
