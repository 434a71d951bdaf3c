"""Gradient attacks: FGSM (Goodfellow et al. 2015) and PGD (Madry et al. 2018), L-inf and L2.

FGSM takes one signed gradient step of size eps. PGD takes ``steps`` projected steps from an
optional random start inside the eps-ball, untargeted (raise the loss of the label ``y``) or
targeted (lower the loss of ``target``). With ``early_stop`` an image stops moving as soon as
it is adversarial: it is dropped from the batch, so later steps cost only the images still
being attacked (the success check reuses the forward pass that computes the gradient).

Gradients are taken with ``torch.autograd.grad`` with respect to the input only, so the
caller's model parameters (their ``.grad`` and ``requires_grad``) are left untouched.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from guard.attacks.base import Attack, AttackResult
from guard.core.validation import check_float, check_int

__all__ = ["FGSM", "LinfPGD", "L2PGD", "PGD", "LinfFastGradientAttack", "LinfProjectedGradientDescentAttack",
           "L2ProjectedGradientDescentAttack"]


def _input_grad(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targeted: bool,
                real_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient of the ascent objective w.r.t. x, logits).

    Ascent on +CE(y), or -CE(target); with ``real_classes`` (untargeted) on
    log P(a real class other than y), so that the extra outputs (a reject class) are avoided.
    """
    x = x.detach().requires_grad_(True)
    logits = model(x)
    if targeted:
        loss = -F.cross_entropy(logits, labels, reduction="sum")
    elif real_classes is None:
        loss = F.cross_entropy(logits, labels, reduction="sum")
    else:
        logp = F.log_softmax(logits, 1)[:, :real_classes]
        loss = torch.logsumexp(logp.masked_fill(F.one_hot(labels, real_classes).bool(), float("-inf")), 1).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return grad, logits.detach()


class FGSM(Attack):
    """Fast gradient sign method, L-inf (Goodfellow, Shlens, Szegedy 2015): x + eps * sign(grad).

    Args:
        eps: L-inf budget (>= 0).
    """

    def __init__(self, *, eps: float = 0.3, real_classes: int | None = None) -> None:
        self.eps = check_float(eps, "eps", "FGSM", low=0.0)
        self.real_classes = None if real_classes is None else check_int(real_classes, "real_classes", "FGSM", low=2)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> AttackResult:
        targeted = target is not None
        grad, _ = _input_grad(model, x, target if targeted else y, targeted, self.real_classes)
        x_adv = (x + self.eps * grad.sign()).clamp(0.0, 1.0)
        return AttackResult(x_adv, self.is_success(model, x_adv, y, target), extras={"norm": "linf", "eps": self.eps})


class _PGDBase(Attack):
    norm = "linf"

    def __init__(self, *, eps: float, steps: int = 40, step_size: float | None = None, random_start: bool = True,
                 early_stop: bool = True, real_classes: int | None = None, seed: int = 0) -> None:
        owner = type(self).__name__
        self.real_classes = None if real_classes is None else check_int(real_classes, "real_classes", owner, low=2)
        self.eps = check_float(eps, "eps", owner, low=0.0)
        self.steps = check_int(steps, "steps", owner, low=1)
        # Madry et al.'s rule of thumb: 2.5 * eps / steps lets a run cross the ball and come back.
        self.step_size = check_float(step_size, "step_size", owner, low=0.0, low_open=True) if step_size is not None else 2.5 * self.eps / self.steps
        if not isinstance(random_start, bool):
            raise TypeError(f"The 'random_start' parameter of {owner} must be a bool. Got {random_start!r}.")
        if not isinstance(early_stop, bool):
            raise TypeError(f"The 'early_stop' parameter of {owner} must be a bool. Got {early_stop!r}.")
        self.random_start = random_start
        self.early_stop = early_stop
        self.seed = check_int(seed, "seed", owner, low=0)

    # -- norm-specific pieces -------------------------------------------------------------
    def _random_delta(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def _step(self, grad: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _project(self, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -------------------------------------------------------------------------------------
    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> AttackResult:
        targeted = target is not None
        labels = target if targeted else y
        gen = torch.Generator().manual_seed(self.seed)
        x_adv = x.clone()
        if self.random_start and self.eps > 0:
            x_adv = (x + self._project(self._random_delta(x, gen).to(x.device))).clamp(0.0, 1.0)
        n = int(x.shape[0])
        done = torch.zeros(n, dtype=torch.bool, device=x.device)
        steps_taken = torch.zeros(n, dtype=torch.long, device=x.device)
        if not self.early_stop:
            # Every image takes every step: no index bookkeeping (the same work as torchattacks).
            for _ in range(self.steps):
                grad, _ = _input_grad(model, x_adv, labels, targeted, self.real_classes)
                x_adv = (x + self._project(x_adv + self.step_size * self._step(grad) - x)).clamp(0.0, 1.0)
            steps_taken += self.steps
        for _ in range(self.steps if self.early_stop else 0):
            active = (~done).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            xa, x0, lab = x_adv[active], x[active], labels[active]
            grad, logits = _input_grad(model, xa, lab, targeted, self.real_classes)
            pred = logits.argmax(1)
            hit = pred == lab if targeted else pred != lab
            if not targeted and self.real_classes is not None:
                hit &= pred < self.real_classes
            done[active[hit]] = True
            keep = ~hit
            active, xa, x0, grad = active[keep], xa[keep], x0[keep], grad[keep]
            if active.numel() == 0:
                break
            delta = self._project(xa + self.step_size * self._step(grad) - x0)
            x_adv[active] = (x0 + delta).clamp(0.0, 1.0)
            steps_taken[active] += 1
        success = self.is_success(model, x_adv, y, target)
        return AttackResult(x_adv, success, extras={"norm": self.norm, "eps": self.eps, "steps_taken": steps_taken})

    def params(self) -> dict[str, Any]:
        return {**super().params(), "norm": self.norm}


class LinfPGD(_PGDBase):
    """Projected gradient descent in the L-inf ball (Madry et al. 2018).

    Args:
        eps: L-inf budget (>= 0).
        steps: number of steps.
        step_size: step length; default 2.5 * eps / steps.
        random_start: start from a uniform point of the ball.
        early_stop: stop each image once it is adversarial (the attack's goal is reached).
        real_classes: the model's first ``real_classes`` outputs are its classes and the rest
            (a hardened model's reject class) never count as success: untargeted PGD then
            ascends log P(a real class other than y).
        seed: seed of the random start.
    """

    norm = "linf"

    def __init__(self, *, eps: float = 0.3, steps: int = 40, step_size: float | None = None, random_start: bool = True,
                 early_stop: bool = True, real_classes: int | None = None, seed: int = 0) -> None:
        super().__init__(eps=eps, steps=steps, step_size=step_size, random_start=random_start, early_stop=early_stop,
                         real_classes=real_classes, seed=seed)

    def _random_delta(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return (torch.rand(x.shape, generator=gen) * 2 - 1) * self.eps

    def _step(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.sign()

    def _project(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.clamp(-self.eps, self.eps)


class L2PGD(_PGDBase):
    """Projected gradient descent in the L2 ball (Madry et al. 2018); steps along grad / ||grad||_2.

    Args:
        eps: L2 budget (>= 0).
        steps: number of steps.
        step_size: step length; default 2.5 * eps / steps.
        random_start: start from a uniform point of the ball.
        early_stop: stop each image once it is adversarial.
        seed: seed of the random start.
    """

    norm = "l2"

    def __init__(self, *, eps: float = 2.0, steps: int = 40, step_size: float | None = None, random_start: bool = True,
                 early_stop: bool = True, real_classes: int | None = None, seed: int = 0) -> None:
        super().__init__(eps=eps, steps=steps, step_size=step_size, random_start=random_start, early_stop=early_stop,
                         real_classes=real_classes, seed=seed)

    def _random_delta(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # Uniform in the ball: a Gaussian direction and radius eps * u^(1/d).
        d = x[0].numel()
        g = torch.randn(x.shape, generator=gen)
        g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        r = torch.rand(x.shape[0], generator=gen).pow(1.0 / d).view(-1, 1, 1, 1)
        return g * r * self.eps

    def _step(self, grad: torch.Tensor) -> torch.Tensor:
        return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)

    def _project(self, delta: torch.Tensor) -> torch.Tensor:
        norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return delta * (self.eps / norms.clamp_min(1e-12)).clamp(max=1.0)


# Short aliases (foolbox style).
PGD = LinfPGD
LinfFastGradientAttack = FGSM
LinfProjectedGradientDescentAttack = LinfPGD
L2ProjectedGradientDescentAttack = L2PGD
