"""Logit and feature matching: make the network see an accepted clean image of another class.

Sabour, Cao, Faghri & Fleet, "Adversarial Manipulation of Deep Representations" (ICLR 2016):
an image within eps of a source whose internal representation matches a *guide* of another
class is classified as the guide and, at the matched layer, looks like a clean member of the
guide's class. Tramer, Carlini, Brendel & Madry, "On Adaptive Attacks to Adversarial Example
Defenses" (NeurIPS 2020, Sec. 5.2) broke "The Odds are Odd" this way: a detector that asks
whether an input's statistics look like clean ones is fooled by an input whose logits *are*
those of a clean image the detector accepts.

Here the guides are clean images the real guarded model accepts (correctly classified, not
flagged); each source gets the accepted guides of another class nearest to it in the matched
representation, the r-th nearest for the r-th restart. Signed-gradient steps in the eps-ball
minimise ``sum_l |phi_l(x) - phi_l(g)|^2 / |phi_l(g)|^2`` over the logits and the layers the
detectors read (pooled as the guarded model pools them). The real guarded model judges every
iterate; each image keeps its best (:class:`guard.attacks.adaptive.BestIterate`). The L-BFGS-B
version of the same objective is :class:`guard.attacks.FeatureAdversary`; this one is written
by hand because it must take its guides from what the guarded model accepts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from guard.attacks.adaptive import BestIterate, DetectorObjective, check_guarded, eot_gradient, judge, resolve_eot
from guard.attacks.base import Attack, AttackResult
from guard.core.validation import check_float, check_images, check_int, check_labels

__all__ = ["LogitMatching"]


class LogitMatching(Attack):
    """Match the logits and detector-layer features of an accepted clean guide of another class.

    Args:
        guarded: the calibrated ``guard.GuardedModel`` under attack.
        guides: clean images (N, C, H, W) to draw guides from (not the images attacked).
        guide_labels: their labels (default: the model's); a guide must be classified as its
            label and not flagged to be used.
        eps: L-inf budget.
        steps: steps per guide.
        step_size: default 2.5 * eps / steps.
        restarts: guides tried per image (the nearest, the second nearest, ...).
        features: also match the detectors' layers (else the logits alone).
        eot: gradient samples per step (EOT) or "auto".
        seed: unused by the steps (they start at the source); kept for the common interface.

    ``success`` = evaded. ``extras``: ``misclassified``, ``flagged``, ``combined``,
    ``guide_index`` (into ``guides``, -1 when no guide of another class was accepted),
    ``accepted_guides``.
    """

    targeted_supported = False

    def __init__(
        self,
        *,
        guarded: Any,
        guides: torch.Tensor,
        guide_labels: torch.Tensor | None = None,
        eps: float,
        steps: int = 50,
        step_size: float | None = None,
        restarts: int = 1,
        features: bool = True,
        eot: int | str = "auto",
        seed: int = 0,
    ) -> None:
        owner = type(self).__name__
        self.guarded = check_guarded(guarded, owner)
        self.guides = check_images(guides, "guides")
        if self.guides.shape[0] == 0:
            raise ValueError(f"The 'guides' parameter of {owner} must hold at least one image. Got 0.")
        self.guide_labels = (
            None if guide_labels is None else check_labels(guide_labels, "guide_labels", n=int(self.guides.shape[0]))
        )
        self.eps = check_float(eps, "eps", owner, low=0.0)
        self.steps = check_int(steps, "steps", owner, low=1)
        self.step_size = (
            check_float(step_size, "step_size", owner, low=0.0, low_open=True)
            if step_size is not None
            else 2.5 * self.eps / self.steps
        )
        self.restarts = check_int(restarts, "restarts", owner, low=1)
        self.features = bool(features)
        self.eot = eot if eot == "auto" else check_int(eot, "eot", owner, low=1)
        self.seed = check_int(seed, "seed", owner, low=0)
        self._objective = DetectorObjective(guarded)

    def params(self) -> dict[str, Any]:
        return {
            "eps": self.eps,
            "steps": self.steps,
            "step_size": self.step_size,
            "restarts": self.restarts,
            "features": self.features,
            "eot": self.eot,
            "guides": int(self.guides.shape[0]),
        }

    def _layers(self) -> list[str]:
        return self._objective.layers if self.features else []

    def _represent(self, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        logits, feats = self._objective.forward(model, x, self._layers())
        return [logits] + [feats[layer].flatten(1) for layer in self._layers()]

    @torch.no_grad()
    def _accepted(
        self, model: nn.Module, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        g = self.guides.to(device=device, dtype=torch.float32)
        pred = torch.cat([model(g[i : i + 256]).argmax(1) for i in range(0, g.shape[0], 256)])
        labels = pred if self.guide_labels is None else self.guide_labels.to(device)
        ok = torch.zeros(g.shape[0], dtype=torch.bool, device=device)
        for i in range(0, g.shape[0], 256):
            mis, flagged, _ = judge(self.guarded, g[i : i + 256], labels[i : i + 256])
            ok[i : i + 256] = ~mis & ~flagged
        idx = ok.nonzero().squeeze(1)
        reps = (
            [
                torch.cat(parts)
                for parts in zip(*[self._represent(model, g[idx[i : i + 256]]) for i in range(0, idx.numel(), 256)])
            ]
            if idx.numel()
            else []
        )
        return idx, labels[idx], reps

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> AttackResult:
        eot, random_parts = resolve_eot(self.eot, self.guarded, x, type(self).__name__)
        idx, glabels, greps = self._accepted(model, x.device)
        best = BestIterate(x)
        guide_index = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        if idx.numel():
            with torch.no_grad():
                sreps = self._represent(model, x)
            # distance in the matched representation, each part scaled by the guides' typical norm
            norms = [r.norm(dim=1).mean().clamp_min(1e-12) for r in greps]
            dist = sum(torch.cdist(s / nm, g / nm) ** 2 for s, g, nm in zip(sreps, greps, norms))
            dist = dist.masked_fill(glabels[None, :] == y[:, None], float("inf"))
            order = dist.argsort(1)
        for restart in range(self.restarts if idx.numel() else 0):
            rows = torch.arange(x.shape[0], device=x.device)
            col = order[:, min(restart, order.shape[1] - 1)]
            usable = torch.isfinite(dist[rows, col])
            if not bool(usable.any()):
                break
            targets = [r[col] for r in greps]
            x_adv = x.clone()
            for step in range(self.steps + 1):
                live = ((~best.evaded) & usable).nonzero().squeeze(1)
                if live.numel() == 0:
                    break
                last = step == self.steps
                tl, yl = [t[live] for t in targets], y[live]

                def loss(
                    xa: torch.Tensor, tl: list[torch.Tensor] = tl, yl: torch.Tensor = yl
                ) -> tuple[torch.Tensor, torch.Tensor]:
                    reps = self._represent(model, xa)
                    value = sum(
                        (((r - t) ** 2).sum(1) / (t * t).sum(1).clamp_min(1e-12)).sum() for r, t in zip(reps, tl)
                    )
                    return value, (reps[0].argmax(1) != yl).detach()

                grad, mis = eot_gradient(loss, x_adv[live], eot) if not last else (None, None)
                taken = best.offer(self.guarded, live, x_adv[live], yl, source=restart, misclassified=mis)
                guide_index[live[taken]] = idx[col[live[taken]]]
                keep = ~best.evaded[live]
                live = live[keep]
                if last or live.numel() == 0:
                    break
                step_x = x_adv[live] - self.step_size * grad[keep].sign()
                x_adv[live] = torch.min(torch.max(step_x, x[live] - self.eps), x[live] + self.eps).clamp(0, 1)
        return AttackResult(
            best.x,
            best.evaded.clone(),
            extras={
                "misclassified": best.misclassified,
                "flagged": best.flagged,
                "combined": best.score,
                "guide_index": guide_index,
                "eps": self.eps,
                "accepted_guides": int(idx.numel()),
                "eot": eot,
                "random_parts": random_parts,
            },
        )
