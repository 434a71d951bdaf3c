"""The adaptive attacker's whole portfolio, best iterate per image: the evaluation a detection defence owes its users.

Tramer, Carlini, Brendel & Madry, "On Adaptive Attacks to Adversarial Example Defenses"
(NeurIPS 2020) and Carlini et al., "On Evaluating Adversarial Robustness" (2019): report the
strongest of several attacks per image, with restarts and the loss weights swept, never one run
at one setting. :class:`AdaptiveEnsemble` runs, on the same images and budget,

* plain PGD (early-stopped and full-step: the oblivious attacks, so the adaptive figure is
  never below theirs),
* :class:`guard.attacks.AdaptivePGD` (margin + weight * detector terms) for every weight of
  ``weights`` and ``restarts`` random starts each,
* :class:`guard.attacks.OrthogonalPGD`, orthogonal and selective (Bryniarski et al. 2022:
  misclassify first, then lower the detectors), ``restarts`` random starts each,
* :class:`guard.attacks.LogitMatching` (Sabour et al. 2016; Tramer et al. 2020) when guides
  are given, ``restarts`` guides each,

and keeps per image the best result the real guarded model judges: misclassified and not
flagged, else the lowest combined score among misclassified results. EOT is used by every
member when a pass of the guarded model differs from another (``eot="auto"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from guard.attacks.adaptive import AdaptivePGD, BestIterate, check_guarded, judge, resolve_eot
from guard.attacks.base import Attack, AttackResult
from guard.attacks.gradient import LinfPGD
from guard.attacks.logit_matching import LogitMatching
from guard.attacks.orthogonal_pgd import OrthogonalPGD
from guard.core.validation import check_float, check_images, check_int

__all__ = ["AdaptiveEnsemble", "MEMBERS"]

#: the member families :class:`AdaptiveEnsemble` can run
MEMBERS = ("pgd", "weighted", "orthogonal", "selective", "logit_matching")


class AdaptiveEnsemble(Attack):
    """The best of plain PGD, weight-swept AdaptivePGD, orthogonal / selective PGD and logit matching, per image.

    Args:
        guarded: the calibrated ``guard.GuardedModel`` under attack.
        eps: L-inf budget.
        steps: steps of every member run.
        weights: the detector weights AdaptivePGD is run with.
        restarts: random starts per member (guides per image for logit matching).
        members: which families run (:data:`MEMBERS`).
        guides, guide_labels: clean images (and labels) logit matching draws accepted guides
            from; without them it does not run.
        eot: gradient samples per step, or "auto" (8 when the guarded model is random, else 1).
        seed: base seed (restart r of a member uses ``seed + r``).

    ``success`` = evaded by the chosen result. ``extras``: ``misclassified``, ``flagged``,
    ``combined``, ``member`` (the index into ``extras["members"]`` of each image's result),
    ``members`` (names), ``per_member`` ({name: {"evasion", "misclassified", "kept"}}: each run alone over the images, and
    how many images kept its result when it ran),
    ``eot``, ``random_parts``.
    """

    targeted_supported = False

    def __init__(
        self,
        *,
        guarded: Any,
        eps: float,
        steps: int = 50,
        weights: Sequence[float] = (0.1, 1.0, 10.0),
        restarts: int = 2,
        members: Sequence[str] = MEMBERS,
        guides: torch.Tensor | None = None,
        guide_labels: torch.Tensor | None = None,
        eot: int | str = "auto",
        seed: int = 0,
    ) -> None:
        owner = type(self).__name__
        self.guarded = check_guarded(guarded, owner)
        self.eps = check_float(eps, "eps", owner, low=0.0)
        self.steps = check_int(steps, "steps", owner, low=1)
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or not weights:
            raise TypeError(
                f"The 'weights' parameter of {owner} must be a non-empty list of floats >= 0. Got {weights!r}."
            )
        self.weights = [check_float(w, "weights", owner, low=0.0) for w in weights]
        self.restarts = check_int(restarts, "restarts", owner, low=1)
        if isinstance(members, str) or not members or any(m not in MEMBERS for m in members):
            raise ValueError(
                f"The 'members' parameter of {owner} must be a non-empty list from {MEMBERS}. Got {members!r}."
            )
        self.members = list(dict.fromkeys(members))
        self.guides = None if guides is None else check_images(guides, "guides")
        self.guide_labels = guide_labels
        self.eot = eot if eot == "auto" else check_int(eot, "eot", owner, low=1)
        self.seed = check_int(seed, "seed", owner, low=0)

    def params(self) -> dict[str, Any]:
        return {
            "eps": self.eps,
            "steps": self.steps,
            "weights": self.weights,
            "restarts": self.restarts,
            "members": self.members,
            "eot": self.eot,
            "seed": self.seed,
            "guides": None if self.guides is None else int(self.guides.shape[0]),
        }

    def plan(self, eot: int) -> list[tuple[str, Attack]]:
        """(name, attack) of every member run, in the order they run."""
        g, e, s = self.guarded, self.eps, self.steps
        runs: list[tuple[str, Attack]] = []
        if "pgd" in self.members:
            runs += [
                ("pgd", LinfPGD(eps=e, steps=s, seed=self.seed)),
                ("pgd_full", LinfPGD(eps=e, steps=s, early_stop=False, seed=self.seed)),
            ]
        if "weighted" in self.members:
            runs += [
                (f"weighted_{w:g}_r{r}", AdaptivePGD(guarded=g, eps=e, steps=s, weight=w, eot=eot, seed=self.seed + r))
                for w in self.weights
                for r in range(self.restarts)
            ]
        for variant in ("orthogonal", "selective"):
            if variant in self.members:
                runs.append(
                    (
                        variant,
                        OrthogonalPGD(
                            guarded=g, eps=e, steps=s, variant=variant, restarts=self.restarts, eot=eot, seed=self.seed
                        ),
                    )
                )
        if "logit_matching" in self.members and self.guides is not None:
            runs.append(
                (
                    "logit_matching",
                    LogitMatching(
                        guarded=g,
                        guides=self.guides,
                        guide_labels=self.guide_labels,
                        eps=e,
                        steps=s,
                        restarts=self.restarts,
                        eot=eot,
                        seed=self.seed,
                    ),
                )
            )
        return runs

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> AttackResult:
        eot, random_parts = resolve_eot(self.eot, self.guarded, x, type(self).__name__)
        best = BestIterate(x)
        names, per_member = [], {}
        everyone = torch.arange(x.shape[0], device=x.device)
        for i, (name, attack) in enumerate(self.plan(eot)):
            res = attack.run(model, x, y, None)  # already inside the base's checks and eval mode
            x_adv = res.x_adv.detach().clamp(0.0, 1.0)
            x_adv = torch.min(torch.max(x_adv, x - self.eps), x + self.eps)
            mis, flagged, score = judge(self.guarded, x_adv, y)
            taken = best.update(everyone, x_adv, mis, flagged, score, source=i)
            names.append(name)
            per_member[name] = {
                "evasion": float((mis & ~flagged).float().mean()),
                "misclassified": float(mis.float().mean()),
                "kept": int(taken.sum()),
            }
        return AttackResult(
            best.x,
            best.evaded.clone(),
            extras={
                "misclassified": best.misclassified,
                "flagged": best.flagged,
                "combined": best.score,
                "member": best.source,
                "members": names,
                "per_member": per_member,
                "eps": self.eps,
                "eot": eot,
                "random_parts": random_parts,
            },
        )
