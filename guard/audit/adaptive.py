"""Audit step ``adaptive``: an attacker who knows the guarded model (Carlini & Wagner 2017; Tramer et al. 2020).

Fills ``report["adaptive"]`` (``eps``, ``evasion``, ``misclassified``, ``n``, ``n_correct``,
``steps``, ``restarts``, ``weights``, ``members``, ``eot``, ``fpr``, ``per_eps``):
:func:`guard.adaptive_eval.evaluate_adaptive` on the evaluation half of the held-out images (the
half the detectors step did not calibrate on), at the data's three default budgets (0.1, 0.2,
0.3 on digits; 2, 4, 8 / 255 on natural images). Per budget: misclassification beside evasion
(misclassified and not flagged by the calibrated combined flag) over the images attacked and
over those classified correctly clean, plain PGD's on the same images, each with its 95%
Clopper-Pearson interval; the attacker is :class:`guard.attacks.AdaptiveEnsemble` (weights
swept, restarts, orthogonal / selective PGD, logit matching with guides from the rest of the
evaluation half, EOT where the guarded model is random).

Settings: :class:`guard.audit.settings.AdaptiveSettings` (keys ``adaptive`` (False: skip),
``adaptive_n``, ``adaptive_steps``, ``adaptive_eps`` (a list), ``adaptive_restarts``,
``adaptive_weights`` (a list), ``adaptive_members`` (a list of
:data:`guard.attacks.adaptive_ensemble.MEMBERS`)); quick mode attacks at the headline budget
only (8/255 or 0.3) with one detector weight.
"""

from __future__ import annotations

from guard.adaptive_eval import default_budgets, evaluate_adaptive
from guard.audit.detectors import split_heldout
from guard.audit.step import AuditContext, Step
from guard.core.data import Split
from guard.guarded import GuardedModel

__all__ = ["AdaptiveStep"]


class AdaptiveStep(Step):
    """The adaptive attacker (AdaptiveEnsemble) against the calibrated GuardedModel of the detectors step."""

    name = "adaptive"
    needs = {"guarded": GuardedModel}

    def skip_reason(self, ctx: AuditContext) -> str | None:
        return None if ctx.settings.adaptive.enabled else "adaptive evaluation turned off"

    def run(self, ctx: AuditContext, guarded: GuardedModel | None = None) -> None:
        if guarded is None:
            raise ValueError("the adaptive step needs the detectors step's GuardedModel (it failed or did not run).")
        s = ctx.settings.adaptive
        _, ev = split_heldout(len(ctx.test), ctx.options.seed)
        data = Split(ctx.test.x[ev], ctx.test.y[ev])
        kw: dict = {"restarts": s.restarts}
        if s.weights is not None:
            kw["weights"] = list(s.weights)
        if s.members is not None:
            kw["members"] = list(s.members)
        eps = list(s.eps) if isinstance(s.eps, tuple) else s.eps
        if eps is None and s.headline_only:  # a smoke run: the headline budget only
            eps = [default_budgets(data.x)[1]]
        # each finished budget is kept in the output folder, so that a resumed audit (--resume)
        # interrupted in this step (an hour and more on a full run) redoes only the budget it was in
        checkpoint = ctx.out / "artifacts" / "adaptive_budgets.json"
        ctx.report["adaptive"] = evaluate_adaptive(
            guarded, data, eps=eps, steps=s.steps, n=s.n, seed=ctx.options.seed, checkpoint=checkpoint, **kw
        )
