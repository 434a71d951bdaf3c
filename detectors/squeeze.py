"""Feature squeezing: an input whose prediction moves when its colour depth is reduced is suspicious.

Xu, Evans & Qi, "Feature Squeezing: Detecting Adversarial Examples in Deep Neural Networks"
(NDSS 2018): score = L1 distance between the softmax on ``x`` and on a squeezed copy of ``x``.
The squeezer here is bit-depth reduction, ``round(x * (2**bits - 1)) / (2**bits - 1)``; the
paper's MNIST setting is 1 bit; ``bits="auto"`` reads the depth off the clean data (the
fewest bits that keep clean labels), never off an attack.
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

from guard.core.models import eval_mode, model_device
from guard.core.validation import call_model, check_float, check_images, check_int
from guard.detectors.base import Batch, Detector

__all__ = ["BitDepthSqueeze", "squeeze_bits", "squeeze_distance"]


def squeeze_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Reduce [0, 1] images to ``bits`` bits per channel."""
    levels = float(2**bits - 1)
    return torch.round(x * levels) / levels


def squeeze_distance(logits: torch.Tensor, squeezed_logits: torch.Tensor) -> torch.Tensor:
    """L1 distance (N,) between the softmaxes of the image and of its squeezed copy."""
    return (logits.softmax(1) - squeezed_logits.softmax(1)).abs().sum(1)


class BitDepthSqueeze(Detector):
    """L1 distance between the softmax of ``x`` and of its bit-depth-reduced copy.

    Args:
        bits: bits per channel after squeezing, or "auto": the fewest bits (1 to ``max_bits``)
            at which the model's labels of the clean fit images agree with their squeezed
            copies' on at least ``agreement`` of them (1 bit on near-binary digits, more on
            natural images). Where no depth up to ``max_bits`` agrees, fit raises: the squeeze
            would flag clean images, so leave the detector out for that data.
        max_bits: the deepest squeeze ``"auto"`` tries.
        agreement: the share of clean fit images whose label must survive the squeeze.
        batch_size: images per forward pass.

    Fitted state: ``bits_`` (the depth used) and ``clean_agreement_`` (at that depth).
    """

    name: ClassVar[str] = "squeeze"
    _meta_attrs = ("bits_", "clean_agreement_")

    def __init__(
        self, bits: int | str = "auto", *, max_bits: int = 6, agreement: float = 0.99, batch_size: int = 512
    ) -> None:
        self.bits = bits
        self.max_bits = max_bits
        self.agreement = agreement
        self.batch_size = batch_size

    def fit(self, model: nn.Module, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> BitDepthSqueeze:
        """Check the parameters; with ``bits="auto"``, choose the depth on clean images ``x``."""
        owner = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        if self.bits != "auto":
            check_int(self.bits, "bits", owner, low=1, high=16)
        check_int(self.max_bits, "max_bits", owner, low=1, high=16)
        check_float(self.agreement, "agreement", owner, low=0.0, high=1.0)
        check_int(self.batch_size, "batch_size", owner, low=1)
        if x is None:
            if self.bits == "auto":
                raise ValueError(f"{owner}(bits='auto') chooses the depth on clean images: pass them, fit(model, x).")
            self.bits_, self.clean_agreement_ = int(self.bits), float("nan")
        else:
            check_images(x, "x")
            device = model_device(model, x.device)
            x = x[:1024].to(device=device, dtype=torch.float32)
            with torch.no_grad(), eval_mode(model):
                clean = torch.cat(
                    [
                        call_model(model, x[i : i + self.batch_size]).argmax(1)
                        for i in range(0, x.shape[0], self.batch_size)
                    ]
                )
                tried = range(1, self.max_bits + 1) if self.bits == "auto" else [int(self.bits)]
                for b in tried:
                    sq = torch.cat(
                        [
                            model(squeeze_bits(x[i : i + self.batch_size].to(device), b)).argmax(1)
                            for i in range(0, x.shape[0], self.batch_size)
                        ]
                    )
                    agree = float((sq == clean).float().mean())
                    if agree >= self.agreement or self.bits != "auto":
                        self.bits_, self.clean_agreement_ = b, agree
                        break
                else:
                    raise ValueError(
                        f"{owner}: no squeeze of 1 to {self.max_bits} bits keeps the labels of {self.agreement:.0%} of the clean "
                        f"images (best {agree:.1%} at {self.max_bits} bits); leave the squeeze detector out for this data."
                    )
        self.fitted_ = True
        return self

    def fit_batch(self, batch: Batch, labels: torch.Tensor) -> BitDepthSqueeze:
        return self.fit(batch.model, batch.x)

    @torch.no_grad()
    def score(self, model: nn.Module, x: torch.Tensor, *, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Scores Tensor[N]; pass ``logits`` of ``x`` when already computed (saves a pass)."""
        self._check_fitted()
        check_images(x, "x")
        device = model_device(model, x.device)
        out = []
        with eval_mode(model):
            for i in range(0, x.shape[0], self.batch_size):
                xb = x[i : i + self.batch_size].to(device=device, dtype=torch.float32)
                lb = call_model(model, xb) if logits is None else logits[i : i + self.batch_size].to(device)
                out.append(squeeze_distance(lb, model(squeeze_bits(xb, self.bits_))))
        return torch.cat(out).float().cpu()

    def score_batch(self, batch: Batch) -> torch.Tensor:
        return self.score(batch.model, batch.x, logits=batch.logits)

    def export_head(self) -> nn.Module:
        self._check_fitted()
        return _SqueezeHead(self.bits_)


class _SqueezeHead(nn.Module):
    """BitDepthSqueeze in the graph: a second forward pass on the squeezed images."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = int(bits)

    def forward(self, batch: Batch) -> torch.Tensor:
        return squeeze_distance(batch.logits, batch.model(squeeze_bits(batch.x, self.bits)).float())

    def surrogate(self, batch: Batch) -> torch.Tensor:
        """BPDA (Athalye et al. 2018): the rounding's gradient is taken as the identity."""
        x = batch.x
        squeezed = x + (squeeze_bits(x, self.bits) - x).detach()
        return squeeze_distance(batch.logits, batch.model(squeezed).float())
