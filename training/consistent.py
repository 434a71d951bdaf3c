"""Consistent-prediction rejection (CPR): reject an input whose label a small perturbation can change.

Chen, Raghuram, Goodge, Jha, "Stratified adversarial robustness with rejection", ICML 2023. On
top of an adversarially trained classifier (``guard.harden(..., method="pgd")``), an input ``x``
predicted as ``c`` is *rejected* when a small L-inf attack of radius ``radius`` around ``x``
(here PGD from ``x`` itself, zero start, ``steps`` sign steps) finds a point the model labels
otherwise. An attack of radius eps that only just crosses a decision boundary (what APGD,
FAB and Square return) lands where the label is not stable, and is rejected; to be accepted
with a wrong label, the attacker must reach a point whose whole ``radius``-ball is labelled
wrongly, which for a robust model takes more than eps. The rejector needs no training: the
robustness it leans on is the adversarial training's.

:class:`ConsistentRejection` outputs ``n + 1`` logits like a
:class:`guard.training.RejectClassifier` (the last one is the reject class), so
:func:`guard.evaluate_robust` scores it with rejection unchanged: AutoAttack's components attack
the classifier's own logits (as CPR's authors run them), and ``"guard-apgd-consistent"`` is the
attack that knows the rejector (:class:`InnerPointView`). :func:`choose_radius` sets the radius
on clean held-out images, as the paper does on a validation split.

Why it is written here and not taken from a library: no maintained package ships CPR (the
authors' code is a research script on top of their own PGD); torchattacks and ART have no
rejection option. The inner attack is plain sign-gradient PGD, deterministic, so that the
rejector gives the same answer for the same input (AutoAttack's randomisation check).

It cannot be exported to ONNX: its forward runs a gradient attack, and an ONNX graph has no
autograd.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from guard.core.models import eval_mode
from guard.core.validation import check_float, check_images, check_int

__all__ = ["ConsistentRejection", "InnerPointView", "choose_radius"]


class ConsistentRejection(nn.Module):
    """A classifier of ``num_classes`` classes plus a reject output: reject when a ``radius``-attack changes the label.

    Args:
        model: the classifier (logits of ``num_classes`` classes), ideally adversarially trained.
            Used in eval mode; never modified.
        radius: L-inf radius of the consistency check, in (0, 1] (CPR: 0.0055 on CIFAR-10, 0.1 on
            MNIST; :func:`choose_radius` picks it on held-out images).
        steps: PGD steps of the check (CPR: 10 on CIFAR-10, 20 on MNIST).
        step_size: per-step size; default ``2.5 * radius / steps`` (Madry et al.'s rule).

    ``forward(x)`` returns ``(N, num_classes + 1)``: the model's logits at ``x`` (differentiable)
    and a reject logit, above every real one when the check changed the label and below every
    real one otherwise (a constant for the gradient: the decision is not differentiable).
    """

    def __init__(self, model: nn.Module, *, radius: float, steps: int = 10, step_size: float | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        self.model = model
        self.radius = check_float(radius, "radius", "ConsistentRejection", low=0.0, high=1.0, low_open=True)
        self.steps = check_int(steps, "steps", "ConsistentRejection", low=1)
        default = 2.5 * self.radius / self.steps
        self.step_size = (
            default
            if step_size is None
            else check_float(step_size, "step_size", "ConsistentRejection", low=0.0, high=1.0, low_open=True)
        )
        self._classes: int | None = None

    @property
    def num_classes(self) -> int:
        """The model's classes (its output width), read on first use."""
        if self._classes is None:
            raise RuntimeError("num_classes is known after the first forward pass (or set it with .bind(x)).")
        return self._classes

    @property
    def reject_index(self) -> int:
        return self.num_classes

    def bind(self, x: torch.Tensor) -> ConsistentRejection:
        """Read the number of classes from one forward pass of the model on ``x[:1]``."""
        with torch.no_grad(), eval_mode(self.model):
            self._classes = int(self.model(x[:1]).shape[1])
        return self

    def params(self) -> dict[str, Any]:
        return {"method": "cpr", "radius": self.radius, "steps": self.steps, "step_size": self.step_size}

    def neighbour(
        self, x: torch.Tensor, c: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(label ``c`` of each image, the point of its ``radius``-ball where the margin of ``c`` was lowest, that margin).

        The check: PGD from ``x`` (zero start) that raises the cross-entropy of ``c``, keeping, per
        image, the iterate whose margin ``z_c - max_{j != c} z_j`` is lowest. The label changed
        somewhere on the path exactly when that margin is negative. ``c`` defaults to the model's
        label of ``x``, read off the first step's forward pass (no pass of its own).
        """
        x = x.detach()
        lo, hi = (x - self.radius).clamp(0.0, 1.0), (x + self.radius).clamp(0.0, 1.0)
        best = x.clone()
        best_margin = torch.full((x.shape[0],), float("inf"), device=x.device)
        cur = x.clone()
        with torch.enable_grad():
            for _ in range(self.steps):
                cur.requires_grad_(True)
                z = self.model(cur)
                if c is None:  # the first step is at x itself
                    c = z.detach().argmax(1)
                _keep_lowest(best, best_margin, cur.detach(), _margin(z.detach(), c))
                (g,) = torch.autograd.grad(F.cross_entropy(z, c, reduction="sum"), cur)
                cur = torch.minimum(torch.maximum(cur.detach() + self.step_size * g.sign(), lo), hi)
        with torch.no_grad():
            _keep_lowest(best, best_margin, cur, _margin(self.model(cur), c))
        return c, best, best_margin

    def consistent(self, x: torch.Tensor) -> torch.Tensor:
        """Per image, True when no point the check reached changes the label (the image is accepted)."""
        check_images(x, "x")
        with eval_mode(self.model):
            return self.neighbour(x)[2] >= 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = self.model.training
        z = self.model(x)
        self._classes = int(z.shape[1])
        with eval_mode(self.model):
            # the label is the eval-mode one: reused from z unless z came from train mode
            c = None if training else z.detach().argmax(1)
            changed = self.neighbour(x, c)[2] < 0
        return _with_reject(z, changed)


def _keep_lowest(best: torch.Tensor, best_margin: torch.Tensor, point: torch.Tensor, margin: torch.Tensor) -> None:
    """Where ``margin`` is below ``best_margin``, take ``point`` and its margin (in place)."""
    lower = margin < best_margin
    best[lower], best_margin[lower] = point[lower], margin[lower]


def _margin(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    z_c = z.gather(1, c[:, None]).squeeze(1)
    return z_c - z.scatter(1, c[:, None], float("-inf")).amax(1)


def _with_reject(z: torch.Tensor, reject: torch.Tensor) -> torch.Tensor:
    """``z`` with one more column: above its maximum where ``reject``, below its minimum elsewhere (no gradient)."""
    zd = z.detach()
    col = torch.where(reject, zd.amax(1) + 1.0, zd.amin(1) - 1.0)
    return torch.cat([z, col[:, None]], dim=1)


class InnerPointView(nn.Module):
    """What an attacker who knows :class:`ConsistentRejection` attacks: the model at the check's worst point.

    ``forward(x)`` runs the defence's own check at ``x`` (label ``c``, worst point ``x + d``) and
    returns the model's logits at ``x + d``, with ``d`` held constant (Danskin's theorem: the
    gradient of a max over the ball at its maximiser), and the defence's reject decision as the
    last column. Its argmax is the defence's output exactly: ``c`` when the check kept the label,
    the reject class otherwise. Maximising a targeted loss on it (``"guard-apgd-consistent"`` in
    :func:`guard.evaluate_robust`: APGD-T) looks for a point whose whole ``radius``-ball is labelled
    as the target, which is what the defence accepts.
    """

    def __init__(self, defence: ConsistentRejection) -> None:
        super().__init__()
        if not isinstance(defence, ConsistentRejection):
            raise TypeError(f"defence must be a ConsistentRejection; got {type(defence).__name__}.")
        self.defence = defence
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.defence
        with eval_mode(d.model):
            c, nb, _ = d.neighbour(x)
            z = d.model(x + (nb - x).detach())
        changed = _margin(z.detach(), c) < 0  # the defence's own rule, at the same point
        return _with_reject(z, changed)


@torch.no_grad()
def choose_radius(
    model: nn.Module,
    x: torch.Tensor,
    *,
    rate: float = 0.05,
    radii: Sequence[float],
    steps: int = 10,
    batch_size: int = 250,
) -> dict[str, Any]:
    """The largest radius of ``radii`` that rejects at most a share ``rate`` of the clean images ``x``.

    ``x`` must be held out from what is reported (CPR's validation split). Returns
    ``{"radius": chosen or None, "rate": rate, "rejected": {radius: share}, "n": len(x)}``; None
    when even the smallest radius rejects more than ``rate``.
    """
    rate = check_float(rate, "rate", "choose_radius", low=0.0, high=1.0, high_open=True)
    check_images(x, "x")
    if not radii:
        raise ValueError("radii must be a non-empty list of radii in (0, 1]; got an empty one.")
    shares = {}
    for r in sorted(float(v) for v in radii):
        defence = ConsistentRejection(model, radius=r, steps=steps)
        kept = torch.cat([defence.consistent(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
        shares[r] = int((~kept).sum()) / int(kept.numel())
    ok = [r for r, s in shares.items() if s <= rate]
    return {"radius": max(ok) if ok else None, "rate": rate, "rejected": shares, "n": int(x.shape[0]), "steps": steps}
