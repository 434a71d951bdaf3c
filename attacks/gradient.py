"""Gradient attacks: FGSM (Goodfellow et al. 2015) and PGD (Madry et al. 2018), L-inf and L2.

FGSM takes one signed gradient step of size eps. PGD takes ``steps`` projected steps from an
optional random start inside the eps-ball, untargeted (raise the loss of the label ``y``) or
targeted (lower the loss of ``target``). With ``early_stop`` an image stops moving as soon as
it is adversarial: it is dropped from the batch, so later steps cost only the images still
being attacked (the success check reuses the forward pass that computes the gradient).

Attack strength (what a detection figure depends on; Carlini & Wagner 2017): an early-stopped
run gives *minimal* examples, just across the decision boundary; ``early_stop=False`` is PGD as
Madry et al. and torchattacks run it (every image takes every step, the last iterate is kept);
``loss="confidence"`` is the objective of CCAT's evaluation (Stutz, Hein & Schiele 2020,
"Confidence-Calibrated Adversarial Training", Sec. 4): maximise the largest softmax probability
of a class other than ``y``, keeping each image's best iterate, which gives high-confidence
examples. Under the sign step (L-inf) and the normalised step (L2) ascending log p and p give
the same step, so log p is used for its numerics. CCAT adds momentum and backtracking to its
PGD; this is plain projected sign ascent on the same objective (written here because no
library ships that objective as an option of PGD).

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

__all__ = [
    "FGSM",
    "LinfPGD",
    "L2PGD",
    "PGD",
    "LOSSES",
    "wrong_confidence",
    "LinfFastGradientAttack",
    "LinfProjectedGradientDescentAttack",
    "L2ProjectedGradientDescentAttack",
]


LOSSES = ("ce", "confidence")


def wrong_confidence(logits: torch.Tensor, labels: torch.Tensor, real_classes: int | None = None) -> torch.Tensor:
    """The largest softmax probability of a (real) class other than ``labels``, per image (CCAT's objective)."""
    k = real_classes if real_classes is not None else logits.shape[1]
    p = F.softmax(logits.detach().float(), 1)[:, :k]
    return p.masked_fill(F.one_hot(labels, k).bool(), float("-inf")).amax(1)


def _objective(
    logits: torch.Tensor, labels: torch.Tensor, targeted: bool, real_classes: int | None, loss: str
) -> torch.Tensor:
    """The per-image ascent objective.

    "ce": +CE(y), or -CE(target); with ``real_classes`` (untargeted) log P(a real class other
    than y), so that the extra outputs (a reject class) are avoided. "confidence": log of the
    largest probability of a (real) class other than y (targeted: log P(target), as "ce").
    """
    if targeted:
        return -F.cross_entropy(logits, labels, reduction="none")
    if loss == "confidence":
        k = real_classes if real_classes is not None else logits.shape[1]
        logp = F.log_softmax(logits, 1)[:, :k]
        return logp.masked_fill(F.one_hot(labels, k).bool(), float("-inf")).amax(1)
    if real_classes is None:
        return F.cross_entropy(logits, labels, reduction="none")
    logp = F.log_softmax(logits, 1)[:, :real_classes]
    return torch.logsumexp(logp.masked_fill(F.one_hot(labels, real_classes).bool(), float("-inf")), 1)


def _input_grad(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    targeted: bool,
    real_classes: int | None = None,
    loss: str = "ce",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient of the ascent objective (:func:`_objective`) w.r.t. x, logits)."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(_objective(logits, labels, targeted, real_classes, loss).sum(), x)
    return grad, logits.detach()


def _check_loss(loss: str, owner: str) -> str:
    if loss not in LOSSES:
        raise ValueError(f"The 'loss' parameter of {owner} must be one of {list(LOSSES)}. Got {loss!r}.")
    return loss


class FGSM(Attack):
    """Fast gradient sign method, L-inf (Goodfellow, Shlens, Szegedy 2015): x + eps * sign(grad).

    Args:
        eps: L-inf budget (>= 0).
        real_classes: outputs from ``real_classes`` on (a reject class) never count as success.
        loss: "ce" (cross-entropy, the paper's) or "confidence" (the largest wrong-class
            probability, CCAT's objective; see the module docstring).
    """

    def __init__(self, *, eps: float = 0.3, real_classes: int | None = None, loss: str = "ce") -> None:
        self.eps = check_float(eps, "eps", "FGSM", low=0.0)
        self.real_classes = None if real_classes is None else check_int(real_classes, "real_classes", "FGSM", low=2)
        self.loss = _check_loss(loss, "FGSM")

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> AttackResult:
        targeted = target is not None
        grad, _ = _input_grad(model, x, target if targeted else y, targeted, self.real_classes, self.loss)
        x_adv = (x + self.eps * grad.sign()).clamp(0.0, 1.0)
        return AttackResult(x_adv, self.is_success(model, x_adv, y, target), extras={"norm": "linf", "eps": self.eps})


class _PGDBase(Attack):
    norm = "linf"

    def __init__(
        self,
        *,
        eps: float,
        steps: int = 40,
        step_size: float | None = None,
        random_start: bool = True,
        early_stop: bool | None = None,
        real_classes: int | None = None,
        seed: int = 0,
        loss: str = "ce",
    ) -> None:
        owner = type(self).__name__
        self.loss = _check_loss(loss, owner)
        if early_stop is None:  # the confidence objective is meant to run past the boundary
            early_stop = loss == "ce"
        if early_stop and loss == "confidence":
            raise ValueError(
                f"The 'early_stop' parameter of {owner} must be False with loss='confidence' (it maximises the "
                "wrong class's confidence past the first misclassified step). Got True."
            )
        self.real_classes = None if real_classes is None else check_int(real_classes, "real_classes", owner, low=2)
        self.eps = check_float(eps, "eps", owner, low=0.0)
        self.steps = check_int(steps, "steps", owner, low=1)
        # Madry et al.'s rule of thumb: 2.5 * eps / steps lets a run cross the ball and come back.
        self.step_size = (
            check_float(step_size, "step_size", owner, low=0.0, low_open=True)
            if step_size is not None
            else 2.5 * self.eps / self.steps
        )
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
            # With the confidence objective each image keeps its best iterate (CCAT).
            best = x_adv.clone() if self.loss == "confidence" else None
            best_obj = torch.full((n,), float("-inf"), device=x.device)
            for _ in range(self.steps):
                grad, logits = _input_grad(model, x_adv, labels, targeted, self.real_classes, self.loss)
                if best is not None:
                    best_obj = self._keep_best(best, best_obj, x_adv, logits, labels, targeted)
                x_adv = (x + self._project(x_adv + self.step_size * self._step(grad) - x)).clamp(0.0, 1.0)
            if best is not None:
                with torch.no_grad():
                    self._keep_best(best, best_obj, x_adv, model(x_adv), labels, targeted)
                x_adv = best
            steps_taken += self.steps
        for _ in range(self.steps if self.early_stop else 0):
            active = (~done).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            xa, x0, lab = x_adv[active], x[active], labels[active]
            grad, logits = _input_grad(model, xa, lab, targeted, self.real_classes, self.loss)
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

    def _keep_best(
        self,
        best: torch.Tensor,
        best_obj: torch.Tensor,
        x_adv: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        targeted: bool,
    ) -> torch.Tensor:
        """Copy into ``best`` the images of ``x_adv`` whose objective beats ``best_obj``; the new best objective."""
        with torch.no_grad():
            obj = _objective(logits.float(), labels, targeted, self.real_classes, self.loss)
            better = obj > best_obj
            best[better] = x_adv[better]
            return torch.where(better, obj, best_obj)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "norm": self.norm}


class LinfPGD(_PGDBase):
    """Projected gradient descent in the L-inf ball (Madry et al. 2018).

    Args:
        eps: L-inf budget (>= 0).
        steps: number of steps.
        step_size: step length; default 2.5 * eps / steps.
        random_start: start from a uniform point of the ball.
        early_stop: stop each image once it is adversarial (minimal examples); False: every
            image takes every step (full strength, as torchattacks runs PGD). Default: True
            for ``loss="ce"``, False for ``loss="confidence"`` (which cannot early-stop).
        real_classes: the model's first ``real_classes`` outputs are its classes and the rest
            (a hardened model's reject class) never count as success: untargeted PGD then
            ascends log P(a real class other than y).
        seed: seed of the random start.
        loss: "ce" (cross-entropy) or "confidence" (CCAT: the largest wrong-class probability,
            best iterate kept; see the module docstring).
    """

    norm = "linf"

    def __init__(
        self,
        *,
        eps: float = 0.3,
        steps: int = 40,
        step_size: float | None = None,
        random_start: bool = True,
        early_stop: bool | None = None,
        real_classes: int | None = None,
        seed: int = 0,
        loss: str = "ce",
    ) -> None:
        super().__init__(
            eps=eps,
            steps=steps,
            step_size=step_size,
            random_start=random_start,
            early_stop=early_stop,
            real_classes=real_classes,
            seed=seed,
            loss=loss,
        )

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
        early_stop: stop each image once it is adversarial (default: True for "ce").
        seed: seed of the random start.
        loss: "ce" or "confidence" (see :class:`LinfPGD`).
    """

    norm = "l2"

    def __init__(
        self,
        *,
        eps: float = 2.0,
        steps: int = 40,
        step_size: float | None = None,
        random_start: bool = True,
        early_stop: bool | None = None,
        real_classes: int | None = None,
        seed: int = 0,
        loss: str = "ce",
    ) -> None:
        super().__init__(
            eps=eps,
            steps=steps,
            step_size=step_size,
            random_start=random_start,
            early_stop=early_stop,
            real_classes=real_classes,
            seed=seed,
            loss=loss,
        )

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
