"""Audit step ``robust``: robust accuracy under AutoAttack's components (Croce & Hein, ICML 2020).

Fills ``report["robust"]`` (``eps``, ``n``, ``clean_accuracy``, ``clean_rejected``,
``robust_accuracy``, ``robust_accuracy_with_rejection``, ``attacks``, and the rest of what
:func:`guard.evaluate_robust` returns: intervals, per-attack figures, AutoAttack's flags, loss
curves) on the evaluation half of the held-out images (the half the detectors step did not
calibrate on), at the data's customary budget; ``report["robust"]["sweep"]``: a cheaper
:func:`guard.robust_sweep` (quick budget, APGD only) at a quarter, half and once that budget and
at 0.5, for its checks (robust accuracy falls with eps and reaches 0). A model with a reject
output (a :class:`guard.training.RejectClassifier`) is scored with rejection.

Options (``options.extra``): ``robust`` (False: skip), ``robust_eps`` (default the data's eps),
``robust_n`` (images; 16 in quick mode, else 200 on the demo LeNet scaled with the model's cost,
at least 32), ``robust_budget`` (``"quick"``, ``"audit"`` or ``"standard"``; default ``"quick"`` in
quick mode, else ``"audit"``: AutoAttack's 100 steps but 3 targets and 1,000 Square queries, so
that a robust model's evaluation stays within the audit's time; ``"standard"`` is AutoAttack's),
``robust_restarts``, ``robust_sweep`` (False: no sweep).
"""

from __future__ import annotations

from typing import Any

from guard.audit.detectors import split_heldout
from guard.audit.step import AuditContext, Step
from guard.core.data import Split
from guard.robust import RobustBudget, evaluate_robust, robust_sweep

__all__ = ["RobustStep", "AUDIT_BUDGET"]

#: The audit's default: AutoAttack's steps, fewer targets and Square queries (a CPU-sized budget).
AUDIT_BUDGET = RobustBudget(steps=100, restarts=1, n_target_classes=3, fab_steps=100, n_queries=1000, curves=4)

#: The sweep's attacks: the white-box ones that know every output (cheap; the checks need no more).
SWEEP_ATTACKS = ("apgd-ce", "guard-apgd-ce", "guard-apgd-reject")


def _budget(name: Any) -> RobustBudget:
    if name == "audit":
        return AUDIT_BUDGET
    return RobustBudget.resolve(name)


class RobustStep(Step):
    """:func:`guard.evaluate_robust` on the evaluation half of the held-out images."""

    name = "robust"

    def skip_reason(self, ctx: AuditContext) -> str | None:
        return None if ctx.options.extra.get("robust", True) else "robust evaluation turned off"

    def run(self, ctx: AuditContext) -> None:
        extra, quick = ctx.options.extra, ctx.options.quick
        _, ev = split_heldout(len(ctx.test), ctx.options.seed)
        data = Split(ctx.test.x[ev], ctx.test.y[ev])
        eps = float(extra.get("robust_eps", extra.get("eps", ctx.defaults.get("eps", 0.3))))
        n = min(len(data), int(extra.get("robust_n", 16 if quick else ctx.scaled(200, 32))))
        budget = _budget(extra.get("robust_budget", "quick" if quick else "audit"))
        restarts = extra.get("robust_restarts")
        section: dict[str, Any] = evaluate_robust(
            ctx.model,
            data,
            eps=eps,
            n=n,
            seed=ctx.options.seed,
            budget=budget,
            restarts=None if restarts is None else int(restarts),
        )
        if extra.get("robust_sweep", True):
            attacks = [a for a in SWEEP_ATTACKS if a != "guard-apgd-reject" or section["reject_model"]]
            budgets = sorted({eps / 4, eps / 2, eps, max(0.5, eps)})
            sweep = robust_sweep(
                ctx.model, data, budgets, n=min(n, 32), attacks=attacks, seed=ctx.options.seed, budget="quick"
            )
            section["sweep"] = {k: v for k, v in sweep.items() if k != "results"}
        ctx.report["robust"] = section
