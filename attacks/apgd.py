"""APGD: auto-PGD in the L-inf ball (Croce & Hein, ICML 2020), with a loss that knows a reject class.

Croce, Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020 (Algorithm 1): PGD with momentum 0.75 whose step size starts
at 2 * eps and is halved, per image, at checkpoints where the loss stopped rising (fewer than
``rho`` of the steps since the last checkpoint raised it, or neither the step size nor the best
loss changed since the checkpoint before); after a halving the iterate restarts from the best
point so far, and the best point is what is returned. Checkpoints are at fractions
p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) of the steps.

Losses (higher = better for the attacker):

* ``"ce"``: cross-entropy of the label over every output (APGD-CE).
* ``"dlr"``: the difference of logits ratio, -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3),
  over the real classes (APGD-DLR).
* ``"dlr-targeted"``: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), run once per target t among
  the ``n_target_classes`` most likely wrong classes of the clean image (APGD-T).
* ``"reject"``: for a model with an (n+1)-th reject output (:class:`guard.training.RejectClassifier`:
  index n = reject), max_{k not in {y, n}} z_k - max(z_y, z_n): the best wrong *real* class is
  pushed over both the true class and the reject class, so that an attack that only moves the
  image into the reject class gains nothing (rejecting an attacked image is safe).

An image counts as broken (``success``) when the model outputs a class other than ``y`` that is
a real class (below ``real_classes`` when given): for APGD-T too, as in AutoAttack, any wrong
real class counts, not only the target. Restarts (and targets) are tried only on the images not
broken yet. With ``early_stop`` an image leaves the batch as soon as it is broken, so an
undefended model costs a few steps per image; its loss curve then ends there (NaN after).

Why it is written by hand: torchattacks' ``APGD`` / ``APGDT`` (the reference that
``tests/test_attacks_apgd.py`` compares APGD-CE against) has no reject-aware loss, seeds the
global RNG, and cannot stop an image once it is broken; this one takes a ``torch.Generator``
per restart and keeps the per-iteration losses for a few images (AutoAttack's sanity plots).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from guard.attacks.base import Attack, AttackResult
from guard.core.validation import check_float, check_int

__all__ = ["APGD", "APGD_LOSSES", "apgd_checkpoints", "apgd_loss"]

#: The losses :class:`APGD` maximises.
APGD_LOSSES: tuple[str, ...] = ("ce", "dlr", "dlr-targeted", "reject")


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations w_j = ceil(p_j * steps) at which APGD may halve its step size (Croce & Hein 2020, eq. 4)."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(q * steps) for q in p[1:] if math.ceil(q * steps) < steps and q < 1.0})


def apgd_loss(
    name: str,
    logits: torch.Tensor,
    y: torch.Tensor,
    *,
    target: torch.Tensor | None = None,
    real_classes: int | None = None,
) -> torch.Tensor:
    """The per-image loss ``name`` of :data:`APGD_LOSSES` (higher = closer to a wrong real class)."""
    if name == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    real = logits if real_classes is None else logits[:, :real_classes]
    rows = torch.arange(real.shape[0], device=real.device)
    z_y = real[rows, y]
    if name == "reject":
        if real_classes is None:
            raise ValueError("the 'reject' loss needs real_classes (the index of the reject output).")
        wrong = real.masked_fill(F.one_hot(y, real.shape[1]).bool(), float("-inf")).amax(1)
        return wrong - torch.maximum(z_y, logits[:, real_classes])
    srt = real.sort(1).values
    if name == "dlr":
        wrong = real.masked_fill(F.one_hot(y, real.shape[1]).bool(), float("-inf")).amax(1)
        return -(z_y - wrong) / (srt[:, -1] - srt[:, -3] + 1e-12)
    if name == "dlr-targeted":
        if target is None:
            raise ValueError("the 'dlr-targeted' loss needs a target.")
        return -(z_y - real[rows, target]) / (srt[:, -1] - 0.5 * (srt[:, -3] + srt[:, -4]) + 1e-12)
    raise ValueError(f"unknown APGD loss {name!r}; expected one of {APGD_LOSSES}.")


class APGD(Attack):
    """Auto-PGD, L-inf (Croce & Hein, ICML 2020), untargeted; ``loss`` picks APGD-CE, -DLR, -T or the reject-aware margin.

    Args:
        eps: L-inf budget in [0, 1].
        steps: iterations per run (AutoAttack: 100).
        restarts: runs from random starts (per target for ``"dlr-targeted"``), each on the images
            not broken yet.
        loss: one of :data:`APGD_LOSSES`.
        n_target_classes: targets tried by ``"dlr-targeted"`` (the most likely wrong classes; AutoAttack: 9).
        rho: the share of rising steps below which the step size is halved at a checkpoint.
        momentum: the weight of the new step against the last (Croce & Hein: 0.75).
        real_classes: the model's first ``real_classes`` outputs are its classes and output
            ``real_classes`` is a reject class: reaching it is not success. Needed by ``"reject"``.
        early_stop: drop each image from the batch once it is broken.
        curves: keep the per-iteration loss of the first ``curves`` images of the first run.
        seed: seeds the random starts (restart r uses ``seed + r``).
    """

    targeted_supported = False

    def __init__(
        self,
        *,
        eps: float = 8 / 255,
        steps: int = 100,
        restarts: int = 1,
        loss: str = "ce",
        n_target_classes: int = 9,
        rho: float = 0.75,
        momentum: float = 0.75,
        real_classes: int | None = None,
        early_stop: bool = True,
        curves: int = 0,
        seed: int = 0,
    ) -> None:
        self.eps = check_float(eps, "eps", "APGD", low=0.0, high=1.0)
        self.steps = check_int(steps, "steps", "APGD", low=1)
        self.restarts = check_int(restarts, "restarts", "APGD", low=1)
        if loss not in APGD_LOSSES:
            raise ValueError(f"The 'loss' parameter of APGD must be one of {APGD_LOSSES}. Got {loss!r}.")
        self.loss = loss
        self.n_target_classes = check_int(n_target_classes, "n_target_classes", "APGD", low=1)
        self.rho = check_float(rho, "rho", "APGD", low=0.0, high=1.0)
        self.momentum = check_float(momentum, "momentum", "APGD", low=0.0, high=1.0)
        self.real_classes = None if real_classes is None else check_int(real_classes, "real_classes", "APGD", low=2)
        if loss == "reject" and self.real_classes is None:
            raise ValueError(
                "The 'real_classes' parameter of APGD is needed by loss='reject' (the index of the reject "
                "output, e.g. RejectClassifier.num_classes). Got None."
            )
        if not isinstance(early_stop, bool):
            raise TypeError(f"The 'early_stop' parameter of APGD must be a bool. Got {early_stop!r}.")
        self.early_stop = early_stop
        self.curves = check_int(curves, "curves", "APGD", low=0)
        self.seed = check_int(seed, "seed", "APGD", low=0)

    # ------------------------------------------------------------------ helpers
    def _broken(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pred = logits.argmax(1)
        hit = pred != y
        return hit & (pred < self.real_classes) if self.real_classes is not None else hit

    def _loss_grad(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-image loss, its input gradient, logits) at ``x``."""
        x = x.detach().requires_grad_(True)
        logits = model(x)
        loss = apgd_loss(self.loss, logits, y, target=target, real_classes=self.real_classes)
        grad = torch.autograd.grad(loss.sum(), x, allow_unused=True)[0] if loss.requires_grad else None
        grad = torch.zeros_like(x) if grad is None else grad  # an output that ignores the input: nothing to follow
        return loss.detach(), grad.detach().contiguous(), logits.detach()

    def _targets(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor | None]:
        if self.loss != "dlr-targeted":
            return [None]
        with torch.no_grad():
            logits = model(x)
        real = logits if self.real_classes is None else logits[:, : self.real_classes]
        if real.shape[1] < 4:
            raise ValueError(f"loss='dlr-targeted' needs at least 4 real classes; the model has {real.shape[1]}.")
        order = real.masked_fill(F.one_hot(y, real.shape[1]).bool(), float("-inf")).argsort(1, descending=True)
        return [order[:, k] for k in range(min(self.n_target_classes, real.shape[1] - 1))]

    # ------------------------------------------------------------------ one run (Algorithm 1)
    def _single_run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_best_or_adversarial, broken, loss per iteration (steps + 1, N)) of one APGD run on ``x``."""
        n, eps, dev = int(x.shape[0]), self.eps, x.device
        t = torch.rand(x.shape, generator=gen).to(dev) * 2 - 1
        t = t / t.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)  # a corner-ward point of the ball
        lo, hi = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
        x_cur = (x + eps * t).clamp(0.0, 1.0)
        curve = torch.full((self.steps + 1, n), float("nan"))
        loss, grad, logits = self._loss_grad(model, x_cur, y, target)
        curve[0] = loss.cpu()
        broken = self._broken(logits, y)
        x_out = x_cur.clone()  # the adversarial point where broken, else the best-loss point
        x_best, loss_best, grad_best = x_cur.clone(), loss.clone(), grad.clone()
        step = torch.full((n, 1, 1, 1), 2.0 * eps, device=dev)
        x_prev = x_cur.clone()
        checkpoints = set(apgd_checkpoints(self.steps))
        rising = torch.zeros(n, device=dev)
        last_loss = loss.clone()
        best_at_check, reduced_at_check = loss_best.clone(), torch.ones(n, dtype=torch.bool, device=dev)
        since = 0
        active = torch.ones(n, dtype=torch.bool, device=dev)
        for i in range(self.steps):
            if self.early_stop:
                active &= ~broken
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xa, ga, sa = x_cur[idx], grad[idx], step[idx]
            a = 1.0 if i == 0 else self.momentum
            z = torch.minimum(torch.maximum(xa + sa * ga.sign(), lo[idx]), hi[idx])
            x_new = xa + a * (z - xa) + (1.0 - a) * (xa - x_prev[idx])
            x_new = torch.minimum(torch.maximum(x_new, lo[idx]), hi[idx])
            x_prev[idx] = xa
            x_cur[idx] = x_new
            l_new, g_new, lg_new = self._loss_grad(model, x_new, y[idx], None if target is None else target[idx])
            grad[idx] = g_new
            curve[i + 1, idx.cpu()] = l_new.cpu()
            hit = self._broken(lg_new, y[idx])
            newly = idx[hit & ~broken[idx]]
            broken[idx[hit]] = True
            x_out[newly] = x_cur[newly]
            rising[idx] += (l_new > last_loss[idx]).float()
            last_loss[idx] = l_new
            better = l_new > loss_best[idx]
            up = idx[better]
            x_best[up], loss_best[up], grad_best[up] = x_cur[up], l_new[better], g_new[better]
            since += 1
            if i + 1 in checkpoints:
                # condition 1: too few rising steps; condition 2: step and best loss both unchanged
                cond1 = rising <= self.rho * since
                cond2 = ~reduced_at_check & (loss_best <= best_at_check)
                halve = (cond1 | cond2) & active
                step[halve] /= 2.0
                x_cur[halve], grad[halve] = x_best[halve], grad_best[halve]
                reduced_at_check, best_at_check = halve, loss_best.clone()
                rising.zero_()
                since = 0
        keep = ~broken
        x_out[keep] = x_best[keep]
        return x_out, broken, curve

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> AttackResult:
        n = int(x.shape[0])
        with torch.no_grad():
            logits = model(x)
        outputs = int(logits.shape[1])
        if self.real_classes is not None and self.real_classes >= outputs:
            raise ValueError(f"real_classes={self.real_classes} must be below the model's {outputs} outputs.")
        if self.loss == "reject" and outputs != self.real_classes + 1:
            raise ValueError(
                f"loss='reject' needs a model with real_classes + 1 = {self.real_classes + 1} outputs "
                f"(the last one the reject class); this one has {outputs}."
            )
        real = outputs if self.real_classes is None else self.real_classes
        if self.loss == "dlr" and real < 3:
            raise ValueError(f"loss='dlr' needs at least 3 real classes; the model has {real}.")
        x_adv = x.clone()
        broken = self._broken(logits, y)  # already wrong on the clean image: nothing to attack
        curves = None
        runs = 0
        for target_y in self._targets(model, x, y):
            for r in range(self.restarts):
                todo = (~broken).nonzero().squeeze(1)
                if todo.numel() == 0:
                    break
                gen = torch.Generator().manual_seed(self.seed + r)
                x_r, hit, curve = self._single_run(
                    model, x[todo], y[todo], None if target_y is None else target_y[todo], gen
                )
                if runs == 0 and self.curves:
                    curves = torch.full((self.steps + 1, min(self.curves, n)), float("nan"))
                    first = todo < curves.shape[1]
                    curves[:, todo[first].cpu()] = curve[:, first.cpu()]
                    curves = curves.T.contiguous()
                x_adv[todo] = x_r if runs == 0 else torch.where(hit.view(-1, 1, 1, 1), x_r, x_adv[todo])
                broken[todo[hit]] = True
                runs += 1
        with torch.no_grad():
            final = model(x_adv)
        extras: dict[str, Any] = {
            "norm": "linf",
            "eps": self.eps,
            "loss": self.loss,
            "runs": runs,
            "pred": final.argmax(1),
        }
        if curves is not None:
            extras["loss_curves"] = curves
        return AttackResult(x_adv, self.is_success(model, x_adv, y, None), extras=extras)
