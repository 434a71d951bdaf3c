"""Defaults derived from the data and the model (the audit's, hardening's) rather than tuned for 28x28 digits.

* :func:`data_defaults`: the L-inf budgets. Near-binary images (most pixels within 0.05 of 0 or
  1, as handwritten digits and documents) keep MNIST's customary eps = delta = 0.3; natural
  images get the customary 8/255 (feature adversaries 8/255, with 4/255 and 16/255 on the curve).
* :func:`work_scale`: how much of the audit's reference work (set on the 28x28 demo LeNet) a
  step can afford on this model, from the model's multiply-accumulates per image counted on one
  forward pass (Conv2d and Linear layers), so the budget is the same on every machine (a
  wall-clock budget would make the figures depend on the machine's load): 1 for the demo net,
  about 0.1 for a CIFAR ResNet-20, 0.004 for an ImageNet EfficientNet-Lite0 (clamped to 0.02).

The chosen values are written to ``report["defaults"]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from guard.core.models import eval_mode, model_device

__all__ = ["data_defaults", "macs_per_image", "work_scale", "grad_chunk", "REFERENCE_MACS", "GRAD_CHUNK_VALUES"]

#: multiply-accumulates per image of the demo DemoNet on 28x28 (the reference the step sizes were set on)
REFERENCE_MACS = 3.87e6
_SATURATED_SHARE = 0.7
#: The fused forward + input-gradient pass, and the exported graph's parity and serving batches
#: (:func:`guard.export.parity.serving_batch`), take at most this many input values (images x C x H x W)
#: at a time (:func:`grad_chunk`).
GRAD_CHUNK_VALUES = 2**21


def data_defaults(x: torch.Tensor) -> dict[str, Any]:
    """eps / delta from the images' dynamic range: ``{"kind", "saturated_share", "eps", "feature_delta", "feature_deltas"}``."""
    xs = x[:2000].detach().float()
    share = float(((xs <= 0.05) | (xs >= 0.95)).float().mean())
    if share >= _SATURATED_SHARE:
        return {
            "kind": "near-binary",
            "saturated_share": round(share, 4),
            "eps": 0.3,
            "feature_delta": 0.3,
            "feature_deltas": [0.05, 0.1, 0.2, 0.3],
        }
    return {
        "kind": "natural",
        "saturated_share": round(share, 4),
        "eps": 8 / 255,
        "feature_delta": 8 / 255,
        "feature_deltas": [4 / 255, 8 / 255, 16 / 255],
    }


@torch.no_grad()
def macs_per_image(model: nn.Module, example: torch.Tensor) -> float:
    """Multiply-accumulates of the model's Conv2d and Linear layers for one image (0 if it has none)."""
    total = [0.0]

    def conv(m: nn.Conv2d, _i: Any, out: torch.Tensor) -> None:
        kh, kw = m.kernel_size
        total[0] += out[0].numel() * (m.in_channels // m.groups) * kh * kw

    def linear(m: nn.Linear, _i: Any, out: torch.Tensor) -> None:
        total[0] += out[0].numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear))
    try:
        with eval_mode(model):
            model(example[:1].to(model_device(model, example.device)))
    finally:
        for h in handles:
            h.remove()
    return total[0]


def work_scale(macs: float) -> float:
    """The share of the reference work a step does on a model of ``macs`` per image, in [0.02, 1]."""
    if macs <= 0:
        return 1.0
    return float(min(1.0, max(0.02, REFERENCE_MACS / macs)))


def grad_chunk(x: Any) -> int:
    """Images per fused forward + backward pass: :data:`GRAD_CHUNK_VALUES` input values (13 images
    at 3 x 224 x 224, 682 at 3 x 32 x 32, 2,674 at 1 x 28 x 28), at least one. ``x``: a batch
    (tensor or array); only its shape is read.

    Why: a backward pass keeps every activation of its chunk, and on the CPU its cost per image
    grows with the chunk (page faults of the multi-GB activation buffers): a ResNet-50 at 224 px
    took 0.32 s per image to differentiate in chunks of 16 and 0.64 s in one chunk of 64
    (``benchmarks/peers/guarded_vs_bare_resnet50.py``, BENCHMARKS.md "Production scale (issue 15)").
    """
    shape = tuple(x.shape)
    per = 1
    for d in shape[1:]:
        per *= int(d)
    return max(1, GRAD_CHUNK_VALUES // max(1, per))
