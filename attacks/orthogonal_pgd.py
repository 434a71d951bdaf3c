"""Selective and orthogonal PGD: reach misclassification first, then lower the detectors while staying misclassified.

Bryniarski, Hingun, Pachuca, Wang & Carlini, "Evading Adversarial Example Detection Defenses
with Orthogonal Projected Gradient Descent" (ICLR 2022). A single loss ``classifier +
lambda * detector`` lets the two gradients fight (guard's own :class:`AdaptivePGD` with one
weight misclassified 9.5% of the demo digits at eps 0.3, where plain PGD reaches 100%). Here
each step looks at the current iterate: while it is still classified correctly (or within
``kappa`` of it) the step follows the classifier's gradient only, else the detectors' gradient
only ("selective"); the "orthogonal" variant also removes from each gradient its component
along the other (``g_c - <g_c, g_d> g_d / |g_d|^2`` and vice versa, per image), so that a
classifier step does not raise the detectors to first order and a detector step does not undo
the misclassification. Steps are signed (L-inf) and projected onto the eps-ball.

The classifier loss is the Carlini-Wagner margin (true logit less the largest other); the
detector loss is ``sum_k softplus(z_k + slack)``, ``z_k`` each detector's surrogate score
measured from the point where it alone would raise the calibrated combined flag, in clean IQRs
(:class:`guard.attacks.adaptive.DetectorObjective`): smooth, so a detector already below its
limit still pulls a little and one far above pulls hardest. The real guarded model judges every
iterate and each image keeps its best (:class:`guard.attacks.adaptive.BestIterate`); restarts
from fresh random points of the ball add to the same record. Written by hand after the
authors' published algorithm (no attack library has it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from guard.attacks.adaptive import BestIterate, DetectorObjective, check_guarded, margin, resolve_eot
from guard.attacks.base import Attack, AttackResult
from guard.core.validation import check_float, check_int

__all__ = ["OrthogonalPGD", "VARIANTS"]

VARIANTS = ("orthogonal", "selective")


def _remove_component(g: torch.Tensor, along: torch.Tensor) -> torch.Tensor:
    """``g`` less its projection on ``along``, per image (rows of the flattened tensors)."""
    gf, af = g.flatten(1), along.flatten(1)
    coef = (gf * af).sum(1, keepdim=True) / (af * af).sum(1, keepdim=True).clamp_min(1e-30)
    return (gf - coef * af).view_as(g)


class OrthogonalPGD(Attack):
    """Selective / orthogonal PGD against a calibrated GuardedModel (Bryniarski et al. 2022).

    Args:
        guarded: the calibrated ``guard.GuardedModel`` under attack.
        eps: L-inf budget.
        steps: steps per restart.
        step_size: default 2.5 * eps / steps.
        variant: "orthogonal" (each gradient projected orthogonal to the other) or "selective".
        restarts: runs from independent random starts; each image keeps its best iterate of all.
        kappa: an iterate counts as misclassified for the switch when its margin is below
            ``-kappa`` (the authors' code: 0.05 on the true logit).
        slack: how far below its limit (in clean IQRs) the detector loss centres each detector.
        eot: gradient samples per step (EOT) or "auto" (8 when a pass differs from another, else 1).
        seed: seed of the random starts.

    ``success`` = evaded (misclassified and not flagged by the real guarded model).
    ``extras``: ``misclassified``, ``flagged``, ``combined``, ``restart`` (which restart gave
    each image's iterate), ``eot``, ``random_parts``.
    """

    targeted_supported = False

    def __init__(
        self,
        *,
        guarded: Any,
        eps: float,
        steps: int = 50,
        step_size: float | None = None,
        variant: str = "orthogonal",
        restarts: int = 1,
        kappa: float = 0.05,
        slack: float = 1.0,
        eot: int | str = "auto",
        seed: int = 0,
    ) -> None:
        owner = type(self).__name__
        self.guarded = check_guarded(guarded, owner)
        self.eps = check_float(eps, "eps", owner, low=0.0)
        self.steps = check_int(steps, "steps", owner, low=1)
        self.step_size = (
            check_float(step_size, "step_size", owner, low=0.0, low_open=True)
            if step_size is not None
            else 2.5 * self.eps / self.steps
        )
        if variant not in VARIANTS:
            raise ValueError(f"The 'variant' parameter of {owner} must be one of {VARIANTS}. Got {variant!r}.")
        self.variant = variant
        self.restarts = check_int(restarts, "restarts", owner, low=1)
        self.kappa = check_float(kappa, "kappa", owner, low=0.0)
        self.slack = check_float(slack, "slack", owner)
        self.eot = eot if eot == "auto" else check_int(eot, "eot", owner, low=1)
        self.seed = check_int(seed, "seed", owner, low=0)
        self._objective = DetectorObjective(guarded)

    def params(self) -> dict[str, Any]:
        return {
            "eps": self.eps,
            "steps": self.steps,
            "step_size": self.step_size,
            "variant": self.variant,
            "restarts": self.restarts,
            "kappa": self.kappa,
            "slack": self.slack,
            "eot": self.eot,
            "seed": self.seed,
            "detectors": self._objective.names,
        }

    def _gradients(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eot: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(classifier gradient, detector gradient, margin) at ``x``, each averaged over ``eot`` passes."""
        gc, gd, m = torch.zeros_like(x), torch.zeros_like(x), torch.zeros(x.shape[0], device=x.device)
        for _ in range(eot):
            xa = x.detach().requires_grad_(True)
            with torch.enable_grad():
                logits, z = self._objective.terms(model, xa)
                mg = margin(logits, y)
                det = F.softplus(z + self.slack).sum(1)
                (g1,) = torch.autograd.grad(mg.sum(), xa, retain_graph=True)
                (g2,) = torch.autograd.grad(det.sum(), xa) if det.requires_grad else (torch.zeros_like(xa),)
            gc, gd, m = gc + g1, gd + g2, m + mg.detach()
        return gc / eot, gd / eot, m / eot

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> AttackResult:
        eot, random_parts = resolve_eot(self.eot, self.guarded, x, type(self).__name__)
        gen = torch.Generator().manual_seed(self.seed)
        best = BestIterate(x)
        for restart in range(self.restarts):
            x_adv = (x + (torch.rand(x.shape, generator=gen).to(x.device) * 2 - 1) * self.eps).clamp(0, 1)
            for step in range(self.steps + 1):
                live = (~best.evaded).nonzero().squeeze(1)
                if live.numel() == 0:
                    break
                last = step == self.steps
                gc, gd, m = self._gradients(model, x_adv[live], y[live], eot) if not last else (None, None, None)
                best.offer(
                    self.guarded, live, x_adv[live], y[live], source=restart, misclassified=None if last else m < 0
                )
                keep = ~best.evaded[live]
                live = live[keep]
                if last or live.numel() == 0:
                    break
                gc, gd, m = gc[keep], gd[keep], m[keep]
                if self.variant == "orthogonal":
                    gc, gd = _remove_component(gc, gd), _remove_component(gd, gc)
                done = (m < -self.kappa).view(-1, *([1] * (x.dim() - 1)))
                direction = torch.where(done, gd, gc)  # both are descended: the margin and the detector loss
                step_x = x_adv[live] - self.step_size * direction.sign()
                x_adv[live] = torch.min(torch.max(step_x, x[live] - self.eps), x[live] + self.eps).clamp(0, 1)
        return AttackResult(
            best.x,
            best.evaded.clone(),
            extras={
                "misclassified": best.misclassified,
                "flagged": best.flagged,
                "combined": best.score,
                "restart": best.source,
                "eps": self.eps,
                "eot": eot,
                "random_parts": random_parts,
            },
        )
