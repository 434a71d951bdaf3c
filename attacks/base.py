"""The attack contract: keyword-only configuration, the model at call time, an AttackResult.

As in foolbox 3, one final ``__call__`` in the base checks inputs, puts the model in eval mode
and restores every module's mode afterwards (try/finally), freezes nothing on the caller's
model, clips the result to [0, 1] and computes success; subclasses write only ``run``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, final

import numpy as np
import torch
from torch import nn

from guard.core.models import eval_mode, model_device
from guard.core.validation import call_model, check_images, check_int, check_labels, check_logits, check_model_and_shape

__all__ = ["Attack", "AttackResult", "Fooler", "model_device"]


@dataclass
class AttackResult:
    """What every attack returns.

    Attributes:
        x_adv: adversarial images, float32 NCHW in [0, 1], on the model's device.
        success: bool[N]: the attack reached its goal for that image (untargeted: the model's
            label differs from ``y``; targeted: equals ``target``; fooling images: confidence
            reached the threshold).
        y: labels the attack started from (true labels or the model's own predictions).
        target: target labels for targeted attacks, else None.
        extras: attack-specific outputs (the patch, positions, guides, confidences, ...).
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    y: torch.Tensor | None = None
    target: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        return float(self.success.float().mean()) if self.success.numel() else 0.0

    def __len__(self) -> int:
        return int(self.x_adv.shape[0])


class Attack:
    """Base for input-conditioned attacks (FGSM, PGD, feature adversaries, patches at sample time).

    Subclasses implement ``run(model, x, y, target) -> AttackResult`` and may assume: ``x`` is
    validated and on the model's device, the model is in eval mode, ``y`` is int64 on the same
    device (the model's own prediction when the caller gave none).
    """

    targeted_supported: bool = True
    #: Input-conditioned: called as ``attack(model, x, y)`` (a :class:`Fooler` makes images from nothing).
    needs_images: bool = True
    #: Outputs ``>= real_classes`` (a hardened model's reject class) never count as success.
    real_classes: int | None = None

    @final
    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        target: torch.Tensor | None = None,
    ) -> AttackResult:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        check_images(x, "x")
        device = model_device(model)
        x = x.detach().to(device=device, dtype=torch.float32)  # the caller's graph is not the attack's
        if target is not None and not self.targeted_supported:
            raise ValueError(f"{type(self).__name__} does not support targeted attacks; got target=...")
        with eval_mode(model):
            with torch.no_grad():  # the model's labels, or a one-image probe: what it returns fixes the valid labels
                probe = check_logits(
                    call_model(model, x if y is None else x[:1]), n=int(x.shape[0]) if y is None else 1
                )
            classes = int(probe.shape[1])
            y = (
                probe.argmax(1)
                if y is None
                else check_labels(y, "y", n=int(x.shape[0]), num_classes=classes).to(device)
            )
            if target is not None:
                target = check_labels(target, "target", n=int(x.shape[0]), num_classes=classes).to(device)
            result = self.run(model, x, y, target)
        result.x_adv = result.x_adv.detach().clamp_(0.0, 1.0)
        if result.y is None:
            result.y = y
        if result.target is None:
            result.target = target
        return result

    def fit(self, model: nn.Module, data: Any) -> Attack:
        """Learn from clean data where the attack needs to (patches); the default learns nothing."""
        return self

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> AttackResult:
        raise NotImplementedError

    @torch.no_grad()
    def is_success(
        self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
    ) -> torch.Tensor:
        """Targeted: the model predicts ``target``; untargeted: a (real) class other than ``y``."""
        pred = model(x_adv).argmax(1)
        if target is not None:
            return pred == target
        hit = pred != y
        return hit & (pred < self.real_classes) if self.real_classes is not None else hit

    def params(self) -> dict[str, Any]:
        """The configuration, JSON-friendly (for report.json)."""
        return {
            k: v
            for k, v in vars(self).items()
            if not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None), list, tuple))
        }


class Fooler:
    """Base for attacks that make images from nothing (fooling images, Nguyen et al. 2015).

    Called ``fooler(model, shape=(C, H, W), classes=None, num_classes=None)``: one or more images
    per wanted class (default every output), returned as an :class:`AttackResult` whose
    ``extras["label"]`` is the class each image aims at and ``extras["confidence"]`` the
    model's softmax probability of it (over every output).
    """

    needs_images: bool = False

    def __call__(
        self, model: nn.Module, *, shape: tuple[int, int, int], classes: Any = None, num_classes: int | None = None
    ) -> AttackResult:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """The configuration, JSON-friendly (for report.json)."""
        return {
            k: v
            for k, v in vars(self).items()
            if not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None), list, tuple))
        }

    def targets(
        self, model: nn.Module, shape: Any, classes: Any, num_classes: Any, *, distinct: bool
    ) -> tuple[tuple[int, int, int], torch.Tensor]:
        """The checked image shape and the wanted classes (int64, CPU) of a call.

        The model is probed once with a blank image of ``shape``, so that a shape it cannot take,
        and ``num_classes`` or ``classes`` beyond its outputs, fail here with their names rather
        than as an IndexError deep in the search (or as a silently truncated class 1.5).
        """
        owner = type(self).__name__
        shape = check_model_and_shape(model, shape)
        with torch.no_grad(), eval_mode(model):
            try:
                probe = call_model(model, torch.zeros(1, *shape, device=model_device(model)), "images")
            except ValueError as err:
                raise ValueError(f"shape={shape}: {err}") from err
        outputs = int(check_logits(probe, n=1).shape[1])
        num_classes = (
            outputs if num_classes is None else check_int(num_classes, "num_classes", owner, low=1, high=outputs)
        )
        if classes is None:
            return shape, torch.arange(num_classes)
        if isinstance(classes, torch.Tensor):
            if (
                classes.is_meta
                or classes.is_floating_point()
                or classes.is_complex()
                or classes.dtype == torch.bool
                or classes.dim() != 1
            ):
                raise TypeError(
                    f"classes must be a 1-D integer tensor of class indices; got {classes.dtype} of shape {tuple(classes.shape)}."
                )
            values = [int(v) for v in classes.tolist()]
        elif isinstance(classes, np.ndarray) or (
            isinstance(classes, Sequence) and not isinstance(classes, (str, bytes))
        ):
            values = (
                list(np.asarray(classes).tolist())
                if isinstance(classes, np.ndarray) and classes.ndim == 1
                else list(classes)
            )
            if (
                isinstance(classes, np.ndarray) and (classes.ndim != 1 or not np.issubdtype(classes.dtype, np.integer))
            ) or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
                raise TypeError(f"classes must be class indices (ints); got {classes!r:.80}.")
            values = [int(v) for v in values]
        else:
            raise TypeError(
                f"classes must be a list of class indices (or None: every class); got {type(classes).__name__} {classes!r:.40}."
            )
        if not values or min(values) < 0 or max(values) >= num_classes:
            raise ValueError(f"classes must be non-empty and lie in [0, {num_classes - 1}]; got {values}.")
        if distinct and len(set(values)) != len(values):
            raise ValueError(f"classes must be distinct (one archive cell each); got {values}.")
        return shape, torch.tensor(values, dtype=torch.long)
