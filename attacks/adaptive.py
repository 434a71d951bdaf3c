"""An attacker who knows the defence: PGD on the classifier loss plus the guarded model's own detector scores.

Carlini & Wagner 2017 ("Adversarial examples are not easily detected") and Tramer et al. 2020
("On adaptive attacks to adversarial example defenses"): a detector is only worth shipping if
it survives an attacker who differentiates through it. :class:`AdaptivePGD` is given the
``guard.GuardedModel`` it attacks and minimises, under an L-inf budget,

    margin(x) + weight * sum_k log(1 + relu((s~_k(x) - t_k) / scale_k + slack))

where ``margin`` is the Carlini-Wagner margin of the true label (negative once misclassified,
clamped at ``-kappa``), ``s~_k`` is each detector's differentiable stand-in from its own export
head (``head.surrogate``, else its score): a sigmoid-smoothed rank for kNN, soft-weighted votes
for kNN consistency, the PPCA / Mahalanobis / LID scores as they are, the saliency
concentration by double backward, the squeeze with a straight-through rounding (BPDA, Athalye
et al. 2018); ``t_k`` is the score at which detector k alone would raise the calibrated
combined flag (the clean calibration score whose conformal p-value meets the combined
threshold) and ``scale_k`` its clean IQR, so a term is zero once that detector is safely below
its share of the flag, and the log keeps one far-off detector from drowning the margin.
After every step the real guarded model (FAISS, Captum, the calibrated combined flag) judges
the iterate, and the first iterate of each image that is misclassified *and not flagged* is
kept (selection of the evading iterate). ``success`` = evaded.

The attack uses the guarded model only through what it exposes (``model``, ``detectors``,
``combined``, ``pool``), so it does not depend on ``guard.detectors``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from guard.attacks.base import Attack, AttackResult
from guard.core.features import Batch, FeatureExtractor
from guard.core.validation import check_float, check_int

__all__ = ["AdaptivePGD"]


def _surrogate(head: nn.Module, batch: Batch) -> torch.Tensor:
    fn = getattr(head, "surrogate", None)
    out = fn(batch) if fn is not None else head(batch)
    return (out["score"] if isinstance(out, dict) else out).float()


class AdaptivePGD(Attack):
    """L-inf PGD against a calibrated GuardedModel (misclassified and not flagged).

    Args:
        guarded: the calibrated ``guard.GuardedModel`` under attack (its ``model`` is what the
            attack is called with).
        eps: L-inf budget.
        steps: PGD steps.
        step_size: default 2.5 * eps / steps.
        weight: weight of the detector term against the margin.
        kappa: the margin's confidence: misclassification beyond it is not rewarded further.
        slack: how far below ``t_k`` (in clean IQRs) the attack pushes each detector.
        random_start: start from a uniform point of the ball.
        seed: seed of the random start.

    ``extras``: ``flagged`` (the real flag of the returned image), ``misclassified``,
    ``step_evaded`` (first step at which each image evaded, -1 never).
    """

    targeted_supported = False

    def __init__(self, *, guarded: Any, eps: float, steps: int = 50, step_size: float | None = None, weight: float = 1.0,
                 kappa: float = 2.0, slack: float = 0.5, random_start: bool = True, seed: int = 0) -> None:
        owner = type(self).__name__
        if getattr(guarded, "combined", None) is None or not hasattr(guarded, "detectors"):
            raise ValueError(f"{owner} attacks a calibrated GuardedModel; got {type(guarded).__name__} (call fit and calibrate first).")
        self.guarded = guarded
        self.eps = check_float(eps, "eps", owner, low=0.0)
        self.steps = check_int(steps, "steps", owner, low=1)
        self.step_size = check_float(step_size, "step_size", owner, low=0.0, low_open=True) if step_size is not None else 2.5 * self.eps / self.steps
        self.weight = check_float(weight, "weight", owner, low=0.0)
        self.kappa = check_float(kappa, "kappa", owner, low=0.0)
        self.slack = check_float(slack, "slack", owner, low=0.0)
        self.random_start = bool(random_start)
        self.seed = check_int(seed, "seed", owner, low=0)
        comb = guarded.combined
        self._names = list(comb.names_)
        self._heads = {n: guarded.detectors[n].export_head().eval() for n in self._names}
        self._scale = comb.scale_.clone().float().clamp_min(1e-6)
        # the clean score at which each detector alone reaches the combined threshold:
        # -log10(p) >= threshold  <=>  at most n * 10^-threshold clean scores are >= s
        # For "max" each detector may reach the threshold alone. For the summing rules ("fisher",
        # "weighted") the detectors that carry weight share it: detector i is held below
        # threshold / (K * w_i), K the number of weighted detectors, so that their sum stays under
        # the threshold; holding each below the whole threshold (the others silent) let the sum
        # of three moderate scores flag every iterate.
        weights = comb.weights_.float() if comb.rule != "max" else torch.ones(len(self._names))
        share = 1.0 if comb.rule == "max" else float(max(int((weights > 0).sum()), 1))
        tops = []
        for i in range(len(self._names)):
            thr = float(comb.threshold_) / (share * max(float(weights[i]), 1e-6))
            ref = comb.ref_[i][: int(comb.counts_[i])]
            allowed = int(float(comb.counts_[i] + 1) * 10 ** (-thr)) - 1  # clean scores allowed at or above
            tops.append(ref[-allowed - 1] if 0 <= allowed < ref.numel() else ref[-1])
        self._limit = torch.stack(tops).float()
        self._layers = list(dict.fromkeys(lay for n in self._names for lay in guarded.detectors[n].feature_layers))

    def params(self) -> dict[str, Any]:
        return {"eps": self.eps, "steps": self.steps, "step_size": self.step_size, "weight": self.weight, "kappa": self.kappa,
                "slack": self.slack, "random_start": self.random_start, "seed": self.seed, "detectors": self._names}

    def _loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._layers:
            logits, feats = FeatureExtractor(model, self._layers)(x, pool=self.guarded.pool, check=False)
        else:
            logits, feats = model(x), {}
        batch = Batch(x, logits, feats, model)
        z = torch.stack([(_surrogate(self._heads[n], batch).to(x.device) - self._limit[i].to(x.device)) / self._scale[i].to(x.device)
                         for i, n in enumerate(self._names)], 1)
        det = torch.log1p(torch.relu(z + self.slack)).sum(1)
        z_y = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
        margin = (z_y - other).clamp(min=-self.kappa)
        return (margin + self.weight * det).sum()

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> AttackResult:
        gen = torch.Generator().manual_seed(self.seed)
        x_adv = x.clone()
        if self.random_start and self.eps > 0:
            x_adv = (x + (torch.rand(x.shape, generator=gen).to(x.device) * 2 - 1) * self.eps).clamp(0, 1)
        best = x_adv.clone()
        evaded = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        step_evaded = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        for step in range(self.steps + 1):
            live = (~evaded).nonzero().squeeze(1)
            out = self.guarded(x_adv[live])  # the real defence judges every iterate
            hit = (out.logits.argmax(1) != y[live]) & ~out.flagged
            best[live[hit]] = x_adv[live[hit]]
            step_evaded[live[hit]] = step
            evaded[live[hit]] = True
            live = live[~hit]
            if step == self.steps or live.numel() == 0:
                break
            xa = x_adv[live].detach().requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(self._loss(model, xa, y[live]), xa)
            step_x = xa.detach() - self.step_size * grad.sign()
            x_adv[live] = torch.min(torch.max(step_x, x[live] - self.eps), x[live] + self.eps).clamp(0, 1)
        best[~evaded] = x_adv[~evaded]  # never evaded: the last iterate
        final = self.guarded(best)
        return AttackResult(best, evaded.clone(), extras={"flagged": final.flagged, "misclassified": final.logits.argmax(1) != y,
                                                          "step_evaded": step_evaded, "eps": self.eps})
