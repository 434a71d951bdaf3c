"""Saliency concentration: a visible patch draws the network's attention into one small square.

G2LVAP (localized visible adversarial patches) observes that a successful patch is the most
salient thing the network sees: the patch alone is classified as the patched images' class.
So the attribution map of a patched image has much of its mass inside one patch-sized window,
while a clean image spreads it over the object. Attributions come from Captum: ``Saliency``
(|d logit / d x|, Simonyan et al. 2014; one batched backward pass), ``InputXGradient``
(|x * d logit / d x|, Shrikumar et al. 2016, the same pass), ``IntegratedGradients``
(Sundararajan et al. 2017); Grad-CAM (Selvaraju et al. 2017, a class activation map at a named
conv layer, upsampled to the input) is :func:`torch_attributions`' own, equal to Captum's
``LayerGradCam`` but safe when several threads score with one model (Captum's layer hook is not).

Score = the largest share of |attribution| mass inside any ``window x window`` square
(average-pool with stride 1, then max, times ``window**2`` over the total), or with
``reduce="topk"`` the share inside the top ``topk`` fraction of pixels. ``window="auto"``
takes the side of a square of ``window_area`` (5%) of the image, read from the data at fit.

The exported graph computes the same attribution with ``torch.autograd.grad`` of the same
target logit (:func:`torch_attributions`, what Captum's methods compute), traced together with
the backward pass into plain ONNX ops, so any model exports (skip connections, BatchNorm,
attention): nothing about the model's layers is assumed.
"""

from __future__ import annotations

import math
import threading
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from guard.core.features import get_layer
from guard.core.models import eval_mode, model_device
from guard.core.validation import call_model, check_float, check_images, check_int, check_labels
from guard.detectors.base import Batch, Detector

__all__ = ["SaliencyConcentration", "SmoothReLU", "window_share", "topk_share", "torch_attributions"]

_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "gradcam")


def window_share(attr: torch.Tensor, window: int) -> torch.Tensor:
    """Largest share of the mass of non-negative maps ``attr`` [N, H, W] in a ``window`` square.

    The window sums are a separable box filter (a w x 1 then a 1 x w average pool): the same
    sums as one w x w pool up to float rounding, in 2w instead of w^2 operations per pixel (15x
    faster for a 50-pixel window on 224-px maps).
    """
    a = attr.clamp_min(0).unsqueeze(1)
    w = min(window, a.shape[-1], a.shape[-2])
    pooled = F.avg_pool2d(F.avg_pool2d(a, (w, 1), stride=1), (1, w), stride=1) * (w * w)
    total = a.flatten(1).sum(1).clamp_min(1e-12)
    return pooled.flatten(1).max(1).values / total


def topk_share(attr: torch.Tensor, frac: float) -> torch.Tensor:
    """Share of the mass of ``attr`` [N, H, W] in its top ``frac`` fraction of pixels."""
    a = attr.clamp_min(0).flatten(1)
    k = max(1, int(round(frac * a.shape[1])))
    return a.topk(k, dim=1).values.sum(1) / a.sum(1).clamp_min(1e-12)


def torch_attributions(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    method: str,
    *,
    layer: str | None = None,
    n_steps: int = 16,
    create_graph: bool = False,
) -> torch.Tensor:
    """Non-negative attribution maps (N, H, W) of class ``target`` with ``torch.autograd.grad``.

    The same quantities as Captum's ``Saliency`` (abs=True), ``InputXGradient`` (abs of
    x * grad), ``IntegratedGradients`` (zero
    baseline, ``method="riemann_right"`` with ``n_steps`` steps, as the detector asks Captum
    for) and ``LayerGradCam`` (ReLU, bilinear upsampling), written with autograd so that the
    exporter can trace them. Channels are summed. ``create_graph``: keep the graph of the
    attribution itself (an adaptive attack differentiates the concentration: double backward).
    """
    if not create_graph:
        x = x.detach()
    if not x.requires_grad:
        x = x.requires_grad_(True)
    if method in ("saliency", "input_x_gradient"):
        logits = model(x)
        (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x, create_graph=create_graph)
        return g.abs().sum(1) if method == "saliency" else (x * g).abs().sum(1)
    if method == "integrated_gradients":
        total = torch.zeros_like(x)
        for i in range(1, n_steps + 1):
            xi = x * (i / n_steps) if create_graph else (x.detach() * (i / n_steps)).requires_grad_(True)
            (g,) = torch.autograd.grad(model(xi).gather(1, target[:, None]).sum(), xi, create_graph=create_graph)
            total = total + g
        return ((x if create_graph else x.detach()) * total / n_steps).abs().sum(1)
    store: list[torch.Tensor] = []
    caller = threading.get_ident()  # the hook sees other threads' forwards through the same model too
    handle = get_layer(model, layer).register_forward_hook(
        lambda _m, _i, out: store.append(out) if threading.get_ident() == caller else None
    )
    try:
        logits = model(x)
    finally:
        handle.remove()
    act = store[0]
    (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), act, create_graph=create_graph)
    cam = F.relu((g.mean(dim=(2, 3), keepdim=True) * act).sum(1, keepdim=True))
    return F.interpolate(cam, tuple(x.shape[-2:]), mode="bilinear", align_corners=False).clamp_min(0).sum(1)


class SmoothReLU(TorchFunctionMode):
    """Within this context every ``relu`` (``nn.ReLU``, ``F.relu``, ``torch.relu``, in place or
    not) computes ``softplus(x, beta)`` instead: a smooth stand-in whose second derivative is not
    zero, for differentiating a saliency map (Dombrowski et al. 2019); ``hardsigmoid`` and
    ``hardswish`` (MobileNet-V3), which aten cannot differentiate twice, get the same smoothing of
    their kinks. The model is not touched;
    the substitution is a torch function mode, undone on exit.
    """

    _RELUS = (F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_)

    def __init__(self, beta: float = 10.0) -> None:
        super().__init__()
        self.beta = float(beta)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in self._RELUS:
            return F.softplus(args[0], beta=self.beta)
        if func is F.hardsigmoid:  # MobileNet-V3's gates: aten has no double backward for hardsigmoid/hardswish
            return self._hardsigmoid(args[0])
        if func is F.hardswish:
            return args[0] * self._hardsigmoid(args[0])
        return func(*args, **(kwargs or {}))

    def _hardsigmoid(self, x: torch.Tensor) -> torch.Tensor:
        """relu6(x + 3) / 6 with its kinks smoothed the same way (softplus), so it differentiates twice."""
        return (F.softplus(x + 3, beta=self.beta) - F.softplus(x - 3, beta=self.beta)) / 6


class SaliencyConcentration(Detector):
    """Concentration of the attribution map of the predicted class.

    Args:
        method: "saliency" (default: one backward pass per batch), "input_x_gradient" (the same
            pass, times the input; compared with saliency on ImageNet patches in BENCHMARKS.md,
            issue 16), "integrated_gradients" or
            "gradcam" (needs ``layer``, a conv layer; the map is upsampled to the input size).
        window: side of the square window in pixels, or "auto": the side of a square covering
            ``window_area`` of the image (set at fit from the data; tune it to the patch size
            you defend against, on patches you then do not report).
        window_area: the area fraction that ``window="auto"`` covers.
        reduce: "window" or "topk".
        topk: the fraction of pixels for ``reduce="topk"``.
        layer: the conv layer for "gradcam".
        n_steps: integration steps for "integrated_gradients".
        batch_size: images per backward pass.

    Fitted state: ``window_`` (the side used).
    """

    name: ClassVar[str] = "saliency"
    _meta_attrs = ("window_",)

    def __init__(
        self,
        method: str = "saliency",
        *,
        window: int | str = "auto",
        window_area: float = 0.05,
        reduce: str = "window",
        topk: float = 0.05,
        layer: str | None = None,
        n_steps: int = 16,
        batch_size: int = 512,
    ) -> None:
        self.method = method
        self.window = window
        self.window_area = window_area
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
        if self.window != "auto":
            check_int(self.window, "window", owner, low=1)
        check_float(self.window_area, "window_area", owner, low=0.0, high=1.0, low_open=True)
        check_float(self.topk, "topk", owner, low=0.0, high=1.0, low_open=True)
        check_int(self.n_steps, "n_steps", owner, low=1)
        check_int(self.batch_size, "batch_size", owner, low=1)
        if self.method == "gradcam":
            if self.layer is None:
                raise ValueError(f"{owner}(method='gradcam') needs layer='<conv layer module path>'. Got None.")
            if model is not None:
                get_layer(model, self.layer)

    def fit(
        self, model: nn.Module, x: torch.Tensor | None = None, y: torch.Tensor | None = None
    ) -> SaliencyConcentration:
        """Check the parameters against ``model`` and, for ``window="auto"``, read the image size from ``x``."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        self._validate(model)
        if x is not None:
            check_images(x, "x")
            hw = tuple(int(s) for s in x.shape[-2:])
        elif self.window == "auto":
            raise ValueError(
                "SaliencyConcentration(window='auto') reads the image size at fit: pass clean images, fit(model, x)."
            )
        else:
            hw = (int(self.window), int(self.window))
        self.window_ = (
            int(self.window) if self.window != "auto" else max(2, round(math.sqrt(self.window_area * hw[0] * hw[1])))
        )
        self.fitted_ = True
        return self

    def fit_batch(self, batch: Batch, labels: torch.Tensor) -> SaliencyConcentration:
        return self.fit(batch.model, batch.x[:8])

    def attributions(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Non-negative attribution maps [N, H, W] for class ``target`` (channels summed), from Captum (gradcam: see below)."""
        from captum.attr import InputXGradient, IntegratedGradients, Saliency

        if self.method == "saliency":
            a = Saliency(model).attribute(x, target=target, abs=True)
        elif self.method == "input_x_gradient":
            a = InputXGradient(model).attribute(x, target=target).abs()
        elif self.method == "integrated_gradients":
            a = (
                IntegratedGradients(model)
                .attribute(x, target=target, n_steps=self.n_steps, method="riemann_right")
                .abs()
            )
        else:
            # Not Captum's LayerGradCam here: its forward hook on the layer also fires for other threads'
            # forwards through the same model (a served model scored from several threads gets their
            # activations). torch_attributions keeps only its own thread's and equals Captum's map
            # (tests/test_export.py::test_saliency_head_equals_captum).
            return torch_attributions(model, x, target, "gradcam", layer=self.layer).detach()
        return a.detach().sum(1)

    def concentration(self, attr: torch.Tensor) -> torch.Tensor:
        """The score of attribution maps (N, H, W): the window share or the top-k share."""
        return window_share(attr, self.window_) if self.reduce == "window" else topk_share(attr, self.topk)

    def score(self, model: nn.Module, x: torch.Tensor, *, target: torch.Tensor | None = None) -> torch.Tensor:
        """Concentration scores Tensor[N] for the predicted class (or ``target``)."""
        self._check_fitted()
        check_images(x, "x")
        if target is not None:
            target = check_labels(target, "target", n=int(x.shape[0]))
        device = model_device(model, x.device)
        out = []
        with eval_mode(model):
            for i in range(0, x.shape[0], self.batch_size):
                xb = x[i : i + self.batch_size].to(device=device, dtype=torch.float32)
                with torch.no_grad():  # the predicted class, or a check that the model takes these images
                    logits = call_model(model, xb if target is None else xb[:1])
                if target is None:
                    tb = logits.argmax(1)
                else:
                    if i == 0:  # a class the model has no output for: IndexError deep in Captum otherwise
                        check_labels(target, "target", num_classes=int(logits.shape[1]))
                    tb = target[i : i + self.batch_size].to(device)
                # gradients w.r.t. the input only; works even when the caller is under
                # torch.no_grad() or torch.inference_mode()
                with torch.inference_mode(False), torch.enable_grad():
                    a = self.attributions(model, xb.detach().clone().requires_grad_(True), tb.clone())
                out.append(self.concentration(a))
        return torch.cat(out).float().cpu()

    @property
    def needs_input_grad(self) -> bool:
        """True for the plain-gradient methods: their map is read from :attr:`Batch.input_grad`."""
        return self.method in ("saliency", "input_x_gradient")

    def score_batch(self, batch: Batch) -> torch.Tensor:
        """The concentration of the batch's map: from the gradient the GuardedModel's own forward
        pass took (``batch.input_grad``, the gradient methods: one forward pass for every
        detector), else from Captum (:meth:`score`)."""
        if batch.input_grad is not None and self.needs_input_grad:
            self._check_fitted()
            g = batch.input_grad.float()
            a = (
                g.abs() if self.method == "saliency" else (batch.x.float() * g).abs()
            )  # Captum's Saliency(abs) / InputXGradient
            return self.concentration(a.sum(1)).float().cpu()
        return self.score(batch.model, batch.x, target=batch.pred)

    def export_head(self) -> nn.Module:
        self._check_fitted()
        return _SaliencyHead(self)


class _SaliencyHead(nn.Module):
    """SaliencyConcentration in the graph: :func:`torch_attributions`, then the same concentration."""

    def __init__(self, det: SaliencyConcentration) -> None:
        super().__init__()
        self.method, self.layer, self.n_steps = det.method, det.layer, det.n_steps
        self.reduce, self.window, self.topk = det.reduce, det.window_, det.topk
        self.surrogate_beta = 10.0

    def forward(self, batch: Batch) -> torch.Tensor:
        with torch.enable_grad():
            attr = torch_attributions(
                batch.model, batch.x, batch.pred, self.method, layer=self.layer, n_steps=self.n_steps
            )
        return window_share(attr, self.window) if self.reduce == "window" else topk_share(attr, self.topk)

    def surrogate(self, batch: Batch) -> torch.Tensor:
        """The same concentration, differentiable in the input (double backward) for adaptive attacks.

        In a ReLU network the input gradient is piecewise constant in the input, so its own
        gradient (the double backward) is zero almost everywhere and an attack along it does
        not move (measured: zero on every image of the demo LeNet). As Dombrowski et al. 2019
        ("Explanations can be manipulated and geometry is to blame", NeurIPS) do to manipulate
        saliency maps, the ReLUs are replaced by softplus with a large ``beta`` while the map is
        differentiated (:class:`SmoothReLU`, nothing on the model changes); the concentration
        of that smoothed map stands in for the real one.
        """
        with SmoothReLU(self.surrogate_beta):
            attr = torch_attributions(
                batch.model, batch.x, batch.pred, self.method, layer=self.layer, n_steps=self.n_steps, create_graph=True
            )
        return window_share(attr, self.window) if self.reduce == "window" else topk_share(attr, self.topk)
