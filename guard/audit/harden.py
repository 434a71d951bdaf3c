"""Audit step ``harden`` (only with ``options.harden``): Nguyen et al.'s reject-class rounds.

Fills ``report["harden"]``: per round the clean accuracy on the held-out split, the share of
classes for which freshly evolved fooling images (run against the model after that round)
still reach >= 99% confidence as a class, their median confidence, the patch fooling rate,
and the share of that round's attacks the model now rejects. Gives the hardened
:class:`~guard.training.RejectClassifier` (saved to ``artifacts/hardened_model.safetensors``) to
the export step.

Options (``ctx.options.extra``): ``harden_rounds`` (default 3), ``harden_epochs`` (2),
``harden_attacks`` (list of names), ``harden_reject_share`` (0.12).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from guard.audit.step import AuditContext, Step
from guard.core.data import Split
from guard.training.reject import RejectClassifier

__all__ = ["HardenStep", "harden_section", "HARDEN_DEFAULTS"]

log = logging.getLogger(__name__)

HARDEN_DEFAULTS: dict[str, Any] = {"rounds": 3, "epochs_per_round": 2, "reject_share": 0.12}
_ROUND_KEYS = ("round", "clean_accuracy", "fooling_classes_ge99", "fooling_median_confidence", "patch_fooling_rate",
               "rejected_share_of_round_attacks")


def harden_section(res: Any, *, attacks: list[str], budget: dict[str, Any], seconds: float, settings: dict[str, Any]) -> dict[str, Any]:
    """The report's ``harden`` section from a :class:`training.harden.HardenResult`."""
    rounds = []
    for h in res.history:
        row = {k: h.get(k) for k in _ROUND_KEYS}
        fresh = h.get("fresh", {})
        row.update({"clean_rejected_share": h.get("clean_rejected_share"),
                    "fooling_classes_ge99_count": fresh.get("fooling_classes_ge99_count"),
                    "fresh_rejected_share": fresh.get("rejected_share"),
                    "archive_size": h.get("archive_size"), "seconds_attack": h.get("seconds_attack"),
                    "seconds_train": h.get("seconds_train"), "fresh": fresh})
        rounds.append(row)
    base = res.baseline
    bf = base.get("fresh", {})
    baseline = {"round": 0, "clean_accuracy": base.get("clean_accuracy"),
                "fooling_classes_ge99": bf.get("fooling_classes_ge99"),
                "fooling_classes_ge99_count": bf.get("fooling_classes_ge99_count"),
                "fooling_median_confidence": bf.get("fooling_median_confidence"),
                "patch_fooling_rate": bf.get("patch_fooling_rate"), "fresh": bf}
    last = rounds[-1]
    n_classes = res.model.num_classes
    drop = (base["clean_accuracy"] - last["clean_accuracy"]) * 100.0
    ge99 = last.get("fooling_classes_ge99_count")
    return {
        "rounds": rounds,
        "baseline": baseline,
        "num_classes": n_classes,
        "reject_index": res.model.reject_index,
        "attacks": attacks,
        "budget": budget,
        "settings": settings,
        "archive_size": res.archive_size,
        "clean_accuracy_drop_points": drop,
        "goals": {"clean_accuracy_drop_le_0.5_points": bool(drop <= 0.5),
                  "fooling_classes_ge99_le_1": (bool(ge99 <= 1) if ge99 is not None else None)},
        "timings": res.timings,
        "seconds": round(seconds, 3),
    }


class HardenStep(Step):
    """Nguyen et al.'s reject-class rounds (only with ``options.harden``)."""

    name = "harden"
    gives = RejectClassifier

    def skip_reason(self, ctx: AuditContext) -> str | None:
        return None if ctx.options.harden else "run guard audit with --harden (or guard harden) to harden the model"

    def restore(self, ctx: AuditContext) -> RejectClassifier | None:
        path = ctx.artifact_path("hardened_model")
        return RejectClassifier.load(path, ctx.model) if path.is_file() else None

    def run(self, ctx: AuditContext) -> RejectClassifier:
        return _run(ctx)


def _run(ctx: AuditContext) -> RejectClassifier:
    from guard.demo import shift_augment
    from guard.training.harden import harden
    from guard.training.round_attacks import DEFAULT_ATTACKS, AttackBudget

    opts, extra = ctx.options, ctx.options.extra
    attacks = list(extra.get("harden_attacks", DEFAULT_ATTACKS))
    if opts.quick:
        settings = {"rounds": 1, "epochs_per_round": 1, "reject_share": 0.12}
        budget = AttackBudget.quick()
        train = Split(ctx.train.x[:500], ctx.train.y[:500])
        test = Split(ctx.test.x[:300], ctx.test.y[:300])
    else:
        settings = {"rounds": int(extra.get("harden_rounds", HARDEN_DEFAULTS["rounds"])),
                    "epochs_per_round": int(extra.get("harden_epochs", HARDEN_DEFAULTS["epochs_per_round"])),
                    "reject_share": float(extra.get("harden_reject_share", HARDEN_DEFAULTS["reject_share"]))}
        budget = AttackBudget()
        train, test = ctx.train, ctx.test
    ckpt = ctx.out / "harden"
    # The demo model was trained with 2-pixel shifts; keep them for the clean images.
    augment = shift_augment if tuple(train.x.shape[1:]) == (1, 28, 28) else None
    t0 = time.perf_counter()
    kwargs = dict(test=test, attacks=attacks, budget=budget, seed=opts.seed, augment=augment, checkpoint_dir=ckpt,
                  progress=opts.progress, **settings)
    try:
        res = harden(ctx.model, train, resume=True, **kwargs)
    except ValueError as err:
        if "cannot resume" not in str(err):
            raise
        log.warning("harden: %s; starting over", err)
        res = harden(ctx.model, train, resume=False, **kwargs)
    from dataclasses import asdict

    ctx.report["harden"] = harden_section(res, attacks=attacks, budget=asdict(budget), seconds=time.perf_counter() - t0,
                                          settings={**settings, "quick": opts.quick, "seed": opts.seed, "checkpoint_dir": str(ckpt)})
    path = ctx.artifact_path("hardened_model")
    res.model.save(path)
    ctx.report["harden"]["model_path"] = str(path)
    return res.model
