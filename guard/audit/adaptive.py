"""Audit step ``adaptive``: an attacker who knows the guarded model (Carlini & Wagner 2017; Tramer et al. 2020).

Fills ``report["adaptive"]`` (``eps``, ``evasion``, ``n``, ``steps``, ``fpr``, ``per_eps``):
:func:`guard.evaluation.evaluate_adaptive` on the evaluation half of the held-out images (the
half the detectors step did not calibrate on), at half, once and twice the data's customary
budget. Evasion = misclassified and not flagged by the calibrated combined flag; the plain
PGD evasion at the same budget is beside it.

Options (``options.extra``): ``adaptive_n`` (images attacked; default 200 on the demo LeNet,
scaled with the model's cost), ``adaptive_steps`` (50 on the demo LeNet, scaled, at least 20), ``adaptive_eps`` (a list).
"""

from __future__ import annotations

from guard.audit.detectors import split_heldout
from guard.audit.step import AuditContext, Step
from guard.core.data import Split
from guard.evaluation import evaluate_adaptive
from guard.guarded import GuardedModel

__all__ = ["AdaptiveStep"]


class AdaptiveStep(Step):
    """AdaptivePGD against the calibrated GuardedModel of the detectors step."""

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
        n = int(extra.get("adaptive_n", 32 if quick else ctx.scaled(200, 64)))
        steps = int(extra.get("adaptive_steps", 10 if quick else ctx.scaled(50, 20)))
        ctx.report["adaptive"] = evaluate_adaptive(guarded, data, eps=extra.get("adaptive_eps"), steps=steps, n=n,
                                                   seed=ctx.options.seed)
