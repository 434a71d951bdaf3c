"""Audit step ``harden`` (only with ``options.harden``): Nguyen et al.'s reject-class rounds.

Fills ``report["harden"]``: per round the clean accuracy on the held-out split, the share of
classes for which freshly evolved fooling images (run against the model after that round)
still reach >= 99% confidence as a class, their median confidence, the patch fooling rate,
and the share of that round's attacks the model now rejects. Gives the hardened
:class:`~guard.training.RejectClassifier` (saved to ``artifacts/hardened_model.safetensors``) to
the export step.

Settings: :class:`~guard.training.HardenConfig`'s defaults (``HardenConfig.quick()`` in quick
mode), the audit's seed, and any field overridden as ``options.extra["harden_<field>"]``
(``harden_rounds``, ``harden_epochs_per_round``, ``harden_reject_share``, ``harden_attacks``, ...).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from guard.audit.step import AuditContext, Step
from guard.core.data import Split
from guard.training.harden import CheckpointMismatch, HardenConfig, HardenResult, harden
from guard.training.reject import RejectClassifier

__all__ = ["HardenStep", "harden_section", "audit_config"]

log = logging.getLogger(__name__)
_ROUND_KEYS = (
    "round",
    "clean_accuracy",
    "fooling_classes_ge99",
    "fooling_median_confidence",
    "patch_fooling_rate",
    "rejected_share_of_round_attacks",
)


def online_section(res: HardenResult, *, seconds: float, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``harden`` section of an online method: one row per epoch (under the fixed key ``rounds``)."""
    keys = ("clean_accuracy", "clean_rejected_share", "monitor")
    rows = [
        {
            "round": h["epoch"],
            "epoch": h["epoch"],
            "train_loss": h.get("train_loss"),
            **{k: h.get(k) for k in keys},
            "train_seconds": h.get("train_seconds"),
        }
        for h in res.history
    ]
    base = {"round": 0, **{k: res.baseline.get(k) for k in keys}}
    drop = (base["clean_accuracy"] - rows[-1]["clean_accuracy"]) * 100.0
    return {
        "method": res.config.method,
        "rounds": rows,
        "baseline": base,
        "num_classes": res.model.num_classes,
        "reject_index": res.model.reject_index,
        "settings": {**res.config.to_dict(), **(settings or {})},
        "archive_size": 0,
        "clean_accuracy_drop_points": drop,
        "timings": res.timings,
        "seconds": round(seconds, 3),
    }


def harden_section(res: HardenResult, *, seconds: float, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report's ``harden`` section from a :class:`~guard.training.HardenResult` (either kind of method)."""
    if res.config is not None and res.config.method != "rounds":
        return online_section(res, seconds=seconds, settings=settings)
    rounds = []
    for h in res.history:
        row = {k: h.get(k) for k in _ROUND_KEYS}
        fresh = h.get("fresh", {})
        row.update(
            {
                "clean_rejected_share": h.get("clean_rejected_share"),
                "fooling_classes_ge99_count": fresh.get("fooling_classes_ge99_count"),
                "fresh_rejected_share": fresh.get("rejected_share"),
                "archive_size": h.get("archive_size"),
                "seconds_attack": h.get("seconds_attack"),
                "seconds_train": h.get("seconds_train"),
                "fresh": fresh,
            }
        )
        rounds.append(row)
    base = res.baseline
    bf = base.get("fresh", {})
    baseline = {
        "round": 0,
        "clean_accuracy": base.get("clean_accuracy"),
        "fooling_classes_ge99": bf.get("fooling_classes_ge99"),
        "fooling_classes_ge99_count": bf.get("fooling_classes_ge99_count"),
        "fooling_median_confidence": bf.get("fooling_median_confidence"),
        "patch_fooling_rate": bf.get("patch_fooling_rate"),
        "fresh": bf,
    }
    last = rounds[-1]
    n_classes = res.model.num_classes
    drop = (base["clean_accuracy"] - last["clean_accuracy"]) * 100.0
    ge99 = last.get("fooling_classes_ge99_count")
    return {
        "rounds": rounds,
        "baseline": baseline,
        "num_classes": n_classes,
        "reject_index": res.model.reject_index,
        "attacks": list(res.config.attacks) if res.config else None,
        "budget": dataclasses.asdict(res.config.budget) if res.config else None,
        "settings": {**(res.config.to_dict() if res.config else {}), **(settings or {})},
        "archive_size": res.archive_size,
        "clean_accuracy_drop_points": drop,
        "goals": {
            "clean_accuracy_drop_le_0.5_points": bool(drop <= 0.5),
            "fooling_classes_ge99_le_1": (bool(ge99 <= 1) if ge99 is not None else None),
        },
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
        pinned = ctx.report.get("harden", {}).get("model_sha256")
        return (
            RejectClassifier.load(path, ctx.model, key_env=ctx.options.key_env, expected_sha256=pinned)
            if path.is_file()
            else None
        )

    def run(self, ctx: AuditContext) -> RejectClassifier:
        return _run(ctx)


def audit_config(ctx: AuditContext) -> HardenConfig:
    """The audit's hardening settings: HardenConfig's defaults (quick ones in quick mode) + overrides."""
    known = {f.name for f in dataclasses.fields(HardenConfig)}
    overrides = {
        k[len("harden_") :]: v
        for k, v in ctx.options.extra.items()
        if k.startswith("harden_") and k[len("harden_") :] in known
    }
    base = HardenConfig.quick() if ctx.options.quick else HardenConfig()
    return dataclasses.replace(base, seed=ctx.options.seed, **overrides)


def _run(ctx: AuditContext) -> RejectClassifier:
    from guard.demo import crop_flip_augment, shift_augment

    config = audit_config(ctx)
    train, test = ctx.train, ctx.test
    if ctx.options.quick:
        train, test = Split(train.x[:500], train.y[:500]), Split(test.x[:300], test.y[:300])
    ckpt = ctx.out / "harden"
    # the clean images keep a standard augmentation for their kind: shifts for digits, crops and flips for natural images
    augment = shift_augment if ctx.defaults.get("kind") == "near-binary" else crop_flip_augment
    t0 = time.perf_counter()
    kwargs = dict(test=test, config=config, augment=augment, checkpoint_dir=ckpt, progress=ctx.options.progress)
    try:
        res = harden(ctx.model, train, resume=True, **kwargs)
    except CheckpointMismatch as err:  # an earlier audit with other settings: its rounds do not count
        log.warning("harden: %s; starting over", err)
        res = harden(ctx.model, train, resume=False, **kwargs)
    ctx.report["harden"] = harden_section(
        res, seconds=time.perf_counter() - t0, settings={"quick": ctx.options.quick, "checkpoint_dir": str(ckpt)}
    )
    path = ctx.artifact_path("hardened_model")
    ctx.report["harden"]["model_sha256"] = res.model.save(path, key_env=ctx.options.key_env)
    ctx.report["harden"]["model_path"] = str(path)
    return res.model
