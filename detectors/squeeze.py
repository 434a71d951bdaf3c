"""Feature squeezing: an input whose prediction moves when its colour depth is reduced is suspicious.

Xu, Evans & Qi, "Feature Squeezing: Detecting Adversarial Examples in Deep Neural Networks"
(NDSS 2018): score = L1 distance between the softmax on ``x`` and on a squeezed copy of ``x``.
The squeezer here is bit-depth reduction, ``round(x * (2**bits - 1)) / (2**bits - 1)``; the
paper's MNIST setting is 1 bit (the default), chosen a priori rather than tuned on an attack.
Small L-infinity perturbations (below half a quantisation step) are removed by the squeeze,
so the prediction snaps back and the score is large; clean digits barely change. Added beyond
the three detectors of the design because neither kNN rank nor PPCA separates FGSM/PGD at
eps = 0.3 on the demo LeNet (they land near other classes' clean features). Written by hand:
two forward passes and a rounding, no library needed.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from guard.detectors.base import Detector
from guard.core.models import eval_mode
from guard.core.validation import check_images, check_int

__all__ = ["BitDepthSqueeze", "squeeze_bits"]


def squeeze_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Reduce [0, 1] images to ``bits`` bits per channel."""
    levels = float(2 ** bits - 1)
    return torch.round(x * levels) / levels


class BitDepthSqueeze(Detector):
    """L1 distance between the softmax of ``x`` and of its bit-depth-reduced copy.

    Args:
        bits: bits per channel after squeezing (1 for MNIST-like data, 4-5 for natural images).
        batch_size: images per forward pass.
    """

    name: ClassVar[str] = "squeeze"
    needs_model: ClassVar[bool] = True
    _tensor_attrs = ()

    def __init__(self, bits: int = 1, *, batch_size: int = 512) -> None:
        self.bits = bits
        self.batch_size = batch_size

    def fit(self, model: nn.Module, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> "BitDepthSqueeze":
        """Check the parameters (the score needs no training data)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        check_int(self.bits, "bits", type(self).__name__, low=1, high=16)
        check_int(self.batch_size, "batch_size", type(self).__name__, low=1)
        self.fitted_ = True
        return self

    @torch.no_grad()
    def score(self, model: nn.Module, x: torch.Tensor, *, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Scores Tensor[N]; pass ``logits`` of ``x`` when already computed (saves a pass)."""
        self._check_fitted()
        check_images(x, "x")
        device = next((p.device for p in model.parameters()), x.device)
        out = []
        with eval_mode(model):
            for i in range(0, x.shape[0], self.batch_size):
                xb = x[i:i + self.batch_size].to(device)
                lb = model(xb) if logits is None else logits[i:i + self.batch_size].to(device)
                sq = model(squeeze_bits(xb, self.bits))
                out.append((lb.softmax(1) - sq.softmax(1)).abs().sum(1))
        return torch.cat(out).float().cpu()
