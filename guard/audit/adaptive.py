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

Options (``options.extra``): ``adaptive_n`` (images attacked; default 200 on the demo LeNet,
scaled with the model's cost; 16 quick), ``adaptive_steps`` (50 on the demo LeNet, scaled, at
least 20; 10 quick), ``adaptive_eps`` (a list), ``adaptive_restarts`` (2; 1 quick),
``adaptive_weights`` (a list; [0.1, 1, 10]; [1] quick), quick mode attacks at the headline budget
only (8/255 or 0.3), ``adaptive_members`` (a list of
:data:`guard.attacks.adaptive_ensemble.MEMBERS`).
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
        return None if ctx.options.extra.get("adaptive", True) else "adaptive evaluation turned off"

    def run(self, ctx: AuditContext, guarded: GuardedModel | None = None) -> None:
        if guarded is None:
            raise ValueError("the adaptive step needs the detectors step's GuardedModel (it failed or did not run).")
        extra, quick = ctx.options.extra, ctx.options.quick
        _, ev = split_heldout(len(ctx.test), ctx.options.seed)
        data = Split(ctx.test.x[ev], ctx.test.y[ev])
        n = int(extra.get("adaptive_n", 16 if quick else ctx.scaled(200, 64)))
        steps = int(extra.get("adaptive_steps", 10 if quick else ctx.scaled(50, 20)))
        kw = {"restarts": int(extra.get("adaptive_restarts", 1 if quick else 2))}
        for key in ("weights", "members"):
            if extra.get(f"adaptive_{key}") is not None:
                kw[key] = list(extra[f"adaptive_{key}"])
        eps = extra.get("adaptive_eps")
        if quick:  # a smoke run: the headline budget only, one detector weight (the full audit sweeps)
            eps = eps if eps is not None else [default_budgets(data.x)[1]]
            kw.setdefault("weights", [1.0])
        ctx.report["adaptive"] = evaluate_adaptive(
            guarded, data, eps=eps, steps=steps, n=n, seed=ctx.options.seed, **kw
        )
