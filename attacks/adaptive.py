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
concentration of a softplus-smoothed map by double backward, the squeeze with a straight-through
rounding (BPDA, Athalye et al. 2018); ``t_k`` is the score at which detector k alone would raise
the calibrated combined flag (the clean calibration score whose conformal p-value meets the
combined threshold) and ``scale_k`` its clean IQR (:class:`DetectorObjective`).
After every step the real guarded model (FAISS, Captum, the calibrated combined flag) judges
the iterate, and each image keeps its best iterate (:class:`BestIterate`: misclassified and not
flagged, else the lowest combined score among the misclassified ones). ``success`` = evaded.

One fixed weight trades the margin against the detectors; :class:`guard.attacks.AdaptiveEnsemble`
sweeps it, with restarts, beside the attacks that reach misclassification first
(:class:`guard.attacks.OrthogonalPGD`, Bryniarski et al. 2022) and the logit-matching attack
(:class:`guard.attacks.LogitMatching`, Sabour et al. 2016; Tramer et al. 2020).

The attacks use the guarded model only through what it exposes (``model``, ``detectors``,
``combined``, ``pool``, its forward pass), so they do not depend on ``guard.detectors``.
Written by hand: no attack library differentiates through these detectors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from guard.attacks.base import Attack, AttackResult
from guard.core.features import Batch, FeatureExtractor
from guard.core.validation import check_float, check_int

__all__ = [
    "AdaptivePGD",
    "BestIterate",
    "DetectorObjective",
    "judge",
    "margin",
    "stochastic_parts",
    "check_guarded",
    "eot_gradient",
    "resolve_eot",
]


def check_guarded(guarded: Any, owner: str) -> Any:
    """``guarded`` if it is a calibrated GuardedModel, else a ValueError naming ``owner``."""
    if getattr(guarded, "combined", None) is None or not hasattr(guarded, "detectors"):
        raise ValueError(
            f"{owner} attacks a calibrated GuardedModel; got {type(guarded).__name__} (call fit and calibrate first)."
        )
    return guarded


def _surrogate(head: nn.Module, batch: Batch) -> torch.Tensor:
    fn = getattr(head, "surrogate", None)
    out = fn(batch) if fn is not None else head(batch)
    return (out["score"] if isinstance(out, dict) else out).float()


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The Carlini-Wagner margin (N,): true logit less the largest other (negative = misclassified)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return z_y - other


class DetectorObjective:
    """Differentiable stand-ins for a calibrated GuardedModel's detectors, on one scale.

    ``terms(model, x)`` gives the logits and ``z`` (N, K): ``(s~_k - t_k) / scale_k`` for each
    detector k of the combined flag, ``s~_k`` its export head's ``surrogate`` (else its score),
    ``t_k`` the score at which detector k alone reaches the combined threshold (for the summing
    rules each weighted detector gets an equal share of it) and ``scale_k`` its clean IQR. A
    detector without an export head (Mahalanobis with input preprocessing) is left out, named
    in ``missing``.
    """

    def __init__(self, guarded: Any) -> None:
        comb = guarded.combined
        self.guarded = guarded
        self.heads: dict[str, nn.Module] = {}
        self.missing: dict[str, str] = {}
        for n in comb.names_:
            try:
                self.heads[n] = guarded.detectors[n].export_head().eval()
            except (ValueError, NotImplementedError) as err:
                self.missing[n] = f"{type(err).__name__}: {err}"
        if self.missing:
            warnings.warn(
                f"the adaptive attack cannot differentiate {sorted(self.missing)} (no export head); it ignores them",
                stacklevel=2,
            )
        idx = [i for i, n in enumerate(comb.names_) if n in self.heads]
        self.names = [comb.names_[i] for i in idx]
        self.scale = comb.scale_.float().clamp_min(1e-6)[idx]
        # -log10(p) >= threshold  <=>  at most (n + 1) * 10^-threshold - 1 clean scores are >= s.
        # For "max" each detector may reach the threshold alone; for the summing rules ("fisher",
        # "weighted") detector i is held below threshold / (K * w_i), K the weighted detectors,
        # so that their sum stays under the threshold.
        weights = comb.weights_.float() if comb.rule != "max" else torch.ones(len(comb.names_))
        share = 1.0 if comb.rule == "max" else float(max(int((weights > 0).sum()), 1))
        tops = []
        for i in idx:
            thr = float(comb.threshold_) / (share * max(float(weights[i]), 1e-6))
            ref = comb.ref_[i][: int(comb.counts_[i])]
            allowed = int(float(comb.counts_[i] + 1) * 10 ** (-thr)) - 1
            tops.append(ref[-allowed - 1] if 0 <= allowed < ref.numel() else ref[-1])
        self.limit = torch.stack(tops).float() if tops else torch.zeros(0)
        self.layers = list(dict.fromkeys(lay for n in self.names for lay in guarded.detectors[n].feature_layers))

    def forward(
        self, model: nn.Module, x: torch.Tensor, layers: list[str] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and the pooled features of ``layers`` (default: the detectors'), differentiable."""
        layers = self.layers if layers is None else layers
        if layers:
            return FeatureExtractor(model, layers)(x, pool=self.guarded.pool, check=False)
        return model(x), {}

    def terms(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, C), z (N, K)); K may be 0 when no detector is differentiable."""
        logits, feats = self.forward(model, x)
        if not self.names:
            return logits, logits.new_zeros(x.shape[0], 0)
        batch = Batch(x, logits, feats, model)
        dev = x.device
        z = torch.stack(
            [
                (_surrogate(self.heads[n], batch).to(dev) - self.limit[i].to(dev)) / self.scale[i].to(dev)
                for i, n in enumerate(self.names)
            ],
            1,
        )
        return logits, z


@torch.no_grad()
def judge(guarded: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The real guarded model's verdict on ``x``: (misclassified, flagged, combined score), each (N,)."""
    if x.shape[0] == 0:
        e = torch.zeros(0, dtype=torch.bool, device=x.device)
        return e, e, torch.zeros(0, device=x.device)
    out = guarded(x)
    dev = x.device
    return (out.logits.argmax(1).to(dev) != y), out.flagged.to(dev).bool(), out.scores["combined"].to(dev).float()


class BestIterate:
    """Per image, the best candidate seen: evaded (misclassified and not flagged) first, then
    misclassified, and among equals the lowest combined score."""

    def __init__(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        self.x = x.detach().clone()
        self.evaded = torch.zeros(n, dtype=torch.bool, device=x.device)
        self.misclassified = torch.zeros(n, dtype=torch.bool, device=x.device)
        self.flagged = torch.ones(n, dtype=torch.bool, device=x.device)
        self.score = torch.full((n,), float("inf"), device=x.device)
        self.seen = torch.zeros(n, dtype=torch.bool, device=x.device)
        self.source = torch.full((n,), -1, dtype=torch.long, device=x.device)

    def update(
        self,
        idx: torch.Tensor,
        x: torch.Tensor,
        mis: torch.Tensor,
        flagged: torch.Tensor,
        score: torch.Tensor,
        source: int = 0,
    ) -> torch.Tensor:
        """Offer candidates ``x`` for images ``idx``; returns which were taken."""
        ev = mis & ~flagged
        score = torch.where(torch.isnan(score), torch.full_like(score, float("inf")), score)
        b_ev, b_mis, b_score = self.evaded[idx], self.misclassified[idx], self.score[idx]
        better = (ev & ~b_ev) | ((ev == b_ev) & ((mis & ~b_mis) | ((mis == b_mis) & (score < b_score))))
        better |= ~self.seen[idx]
        take = idx[better]
        self.x[take] = x[better].detach()
        self.evaded[take], self.misclassified[take] = ev[better], mis[better]
        self.flagged[take], self.score[take] = flagged[better], score[better]
        self.seen[take] = True
        self.source[take] = source
        return better

    def offer(
        self,
        guarded: Any,
        idx: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        source: int = 0,
        misclassified: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Judge ``x`` (images ``idx``, labels ``y``) with the real guarded model and offer them.

        ``misclassified``: the model's verdict on ``x`` when the caller already has it (from the
        attack's own forward pass); only those images are then judged by the guarded model (a
        correctly classified image cannot evade, and it ranks below every misclassified one).
        """
        if misclassified is None:
            mis, flagged, score = judge(guarded, x, y)
            return self.update(idx, x, mis, flagged, score, source)
        mis = misclassified.clone()
        flagged = torch.ones_like(mis)
        score = torch.full(mis.shape, float("inf"), device=x.device)
        sel = mis.nonzero().squeeze(1)
        if sel.numel():
            mis[sel], flagged[sel], score[sel] = judge(guarded, x[sel], y[sel])
        return self.update(idx, x, mis, flagged, score, source)


@torch.no_grad()
def stochastic_parts(guarded: Any, x: torch.Tensor, tries: int = 2) -> list[str]:
    """Which of the model's logits and the detectors' scores differ between two passes on the same images.

    EOT (Athalye et al. 2018, "Synthesizing robust adversarial examples") is needed only for a
    random defence: the adaptive attacks average their gradient over several passes when this
    is not empty. Returns the names ("logits" and detector names) that changed.
    """
    first = guarded(x)
    changed: set[str] = set()
    for _ in range(tries - 1):
        again = guarded(x)
        if not torch.equal(first.logits, again.logits):
            changed.add("logits")
        changed |= {n for n, s in first.scores.items() if n != "combined" and not torch.equal(s, again.scores[n])}
    return sorted(changed)


def eot_gradient(loss_fn: Callable[[torch.Tensor], Any], x: torch.Tensor, samples: int) -> tuple[torch.Tensor, Any]:
    """Gradient of ``loss_fn`` at ``x`` averaged over ``samples`` passes (EOT), and what the last
    pass returned beside the loss (``loss_fn`` returns a scalar, or (scalar, aux))."""
    total, aux = torch.zeros_like(x), None
    for _ in range(samples):
        xa = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = loss_fn(xa)
            loss, aux = out if isinstance(out, tuple) else (out, None)
            (g,) = torch.autograd.grad(loss, xa)
        total += g
    return total / samples, aux


def resolve_eot(eot: int | str, guarded: Any, x: torch.Tensor, owner: str) -> tuple[int, list[str]]:
    """The EOT sample count: ``eot`` itself, or for "auto" 8 when :func:`stochastic_parts` finds randomness, else 1."""
    if eot == "auto":
        parts = stochastic_parts(guarded, x[:16])
        return (8 if parts else 1), parts
    return check_int(eot, "eot", owner, low=1), []


class AdaptivePGD(Attack):
    """L-inf PGD on margin + weight * detector terms against a calibrated GuardedModel.

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
        eot: gradient samples per step (EOT), or "auto": 8 when a pass differs from another.
        seed: seed of the random start.

    ``extras``: ``flagged`` (the real flag of the returned image), ``misclassified``,
    ``combined`` (its combined score), ``step_evaded`` (first step at which each image evaded,
    -1 never), ``eot``, ``random_parts``.
    """

    targeted_supported = False

    def __init__(
        self,
        *,
        guarded: Any,
        eps: float,
        steps: int = 50,
        step_size: float | None = None,
        weight: float = 1.0,
        kappa: float = 2.0,
        slack: float = 0.5,
        random_start: bool = True,
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
        self.weight = check_float(weight, "weight", owner, low=0.0)
        self.kappa = check_float(kappa, "kappa", owner, low=0.0)
        self.slack = check_float(slack, "slack", owner, low=0.0)
        self.random_start = bool(random_start)
        self.eot = eot if eot == "auto" else check_int(eot, "eot", owner, low=1)
        self.seed = check_int(seed, "seed", owner, low=0)
        self._objective = DetectorObjective(guarded)
        self._names = self._objective.names

    def params(self) -> dict[str, Any]:
        return {
            "eps": self.eps,
            "steps": self.steps,
            "step_size": self.step_size,
            "weight": self.weight,
            "kappa": self.kappa,
            "slack": self.slack,
            "random_start": self.random_start,
            "eot": self.eot,
            "seed": self.seed,
            "detectors": self._names,
        }

    def _loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss, the misclassified mask of ``x``)."""
        logits, z = self._objective.terms(model, x)
        det = torch.log1p(torch.relu(z + self.slack)).sum(1)
        m = margin(logits, y)
        return (m.clamp(min=-self.kappa) + self.weight * det).sum(), (m < 0).detach()

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> AttackResult:
        eot, random_parts = resolve_eot(self.eot, self.guarded, x, type(self).__name__)
        gen = torch.Generator().manual_seed(self.seed)
        x_adv = x.clone()
        if self.random_start and self.eps > 0:
            x_adv = (x + (torch.rand(x.shape, generator=gen).to(x.device) * 2 - 1) * self.eps).clamp(0, 1)
        best = BestIterate(x_adv)
        step_evaded = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        for step in range(self.steps + 1):
            live = (~best.evaded).nonzero().squeeze(1)
            if live.numel() == 0:
                break
            yl = y[live]
            grad, mis = (
                eot_gradient(lambda xa: self._loss(model, xa, yl), x_adv[live], eot)
                if step < self.steps
                else (None, None)
            )
            best.offer(
                self.guarded, live, x_adv[live], yl, misclassified=mis
            )  # the real defence judges every misclassified iterate
            step_evaded[live[best.evaded[live]]] = step
            keep = ~best.evaded[live]
            live = live[keep]
            if step == self.steps or live.numel() == 0:
                break
            step_x = x_adv[live] - self.step_size * grad[keep].sign()
            x_adv[live] = torch.min(torch.max(step_x, x[live] - self.eps), x[live] + self.eps).clamp(0, 1)
        return AttackResult(
            best.x,
            best.evaded.clone(),
            extras={
                "flagged": best.flagged,
                "misclassified": best.misclassified,
                "combined": best.score,
                "step_evaded": step_evaded,
                "eps": self.eps,
                "eot": eot,
                "random_parts": random_parts,
            },
        )
