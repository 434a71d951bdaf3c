"""Audit step ``harden`` (only with ``options.harden``): Nguyen et al.'s reject-class rounds.

Fills ``report["harden"]``: per round the clean accuracy on the held-out split, the share of
classes for which freshly evolved fooling images (run against the model after that round)
still reach >= 99% confidence as a class, their median confidence, the patch fooling rate,
and the share of that round's attacks the model now rejects. Gives the hardened
:class:`~guard.training.RejectClassifier` (saved to ``artifacts/hardened_model.safetensors``) to
the export step.

Settings: :class:`guard.audit.settings.HardenSettings`: :class:`~guard.training.HardenConfig`'s
defaults (``HardenConfig.quick()`` in quick mode), the audit's seed, and any field overridden as
``options.extra["harden_<field>"]`` (``harden_rounds``, ``harden_epochs_per_round``,
``harden_reject_share``, ``harden_attacks``, ...); quick mode hardens on 500 training and 300
held-out images (``harden_train_images``, ``harden_test_images``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from guard.audit.step import AuditContext, Step
from guard.core.data import Split
from guard.training.harden import CheckpointMismatch, HardenConfig, HardenResult, harden
from guard.training.reject import RejectClassifier

__all__ = ["HardenStep", "harden_section", "audit_config", "run_harden_job", "load_reject_images", "summary_lines"]

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
    return ctx.settings.harden.config


def _run(ctx: AuditContext) -> RejectClassifier:
    from guard.demo import crop_flip_augment, shift_augment

    s = ctx.settings.harden
    config = s.config
    train, test = ctx.train, ctx.test
    if s.train_images is not None:
        train = Split(train.x[: s.train_images], train.y[: s.train_images])
    if s.test_images is not None:
        test = Split(test.x[: s.test_images], test.y[: s.test_images])
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


def run_harden_job(
    model: torch.nn.Module,
    train: Any,
    test: Any,
    config: HardenConfig,
    out: str | Path,
    *,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    resume: bool = False,
    progress: bool = True,
    reject_images: str | Path | None = None,
    checkpoint_every: int = 0,
    key_env: str | None = None,
    device: str = "cpu",
) -> dict[str, Any] | None:
    """``guard harden``'s job: :func:`~guard.training.harden` into ``out``, alone or under torchrun.

    ``reject_images``: a safetensors file of known-bad images (:func:`load_reject_images`),
    labelled reject from round 1 on. Checkpoints go to ``out/checkpoints`` (``resume`` continues
    from them). Under torchrun (WORLD_SIZE > 1) the process group is set up here and torn down
    after, every rank trains, and rank 0 alone writes
    ``out/hardened_model.safetensors`` (sealed; an HMAC with ``key_env``) and ``out/harden.json``
    (``{"harden": section, "world_size": n}``, the section as :func:`harden_section` builds it).

    Returns:
        the ``harden`` section on rank 0 (with ``model_sha256`` and ``model_path``); None on the other ranks.
    """
    from guard.core.cache import atomic_write_text
    from guard.training.distributed import init_from_env, world

    out = Path(out)
    known_bad = None if reject_images is None else load_reject_images(reject_images)
    created = init_from_env(device)  # under torchrun: every rank runs harden, rank 0 writes
    rank, size = world()
    t0 = time.perf_counter()
    try:
        res = harden(
            model.to(device),
            train,
            test=test,
            config=config,
            augment=augment,
            checkpoint_dir=out / "checkpoints",
            resume=resume,
            progress=progress and rank == 0,
            reject_images=known_bad,
            checkpoint_every=checkpoint_every,
        )
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank != 0:
        return None
    given = None if known_bad is None else {"path": str(reject_images), "n": int(known_bad.shape[0])}
    section = harden_section(
        res,
        seconds=time.perf_counter() - t0,
        settings={"checkpoint_dir": str(out / "checkpoints"), "world_size": size, "reject_images": given},
    )
    path = out / "hardened_model.safetensors"
    section["model_sha256"] = res.model.save(path, key_env=key_env)
    section["model_path"] = str(path)
    atomic_write_text(out / "harden.json", json.dumps({"harden": section, "world_size": size}, indent=2) + "\n")
    return section


def load_reject_images(path: str | Path) -> torch.Tensor:
    """``guard harden --reject-images FILE``: its tensor ``x`` (or its only tensor); a clear error otherwise."""
    from guard.core.cache import load_tensors

    tensors, _ = load_tensors(path)
    if "x" in tensors:
        return tensors["x"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise ValueError(
        f"--reject-images {str(path)!r} must hold a tensor named 'x' (or exactly one tensor); got {sorted(tensors)}."
    )


def summary_lines(section: dict[str, Any]) -> list[str]:
    """One line per epoch (online methods) or round (``rounds``) of a ``harden`` section, then where it was written."""

    def f(v: Any, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    rows = [section["baseline"], *section["rounds"]]
    wrote = f"wrote {Path(section['model_path']).parent}/harden.json and {section['model_path']}"
    if section.get("method", "rounds") != "rounds":
        lines = [
            f"epoch {r['round']}: clean {f(r['clean_accuracy'], '.4f')}  clean rejected "
            f"{f(r.get('clean_rejected_share'), '.4f')}  monitor (10-step PGD, robust with rejection) "
            f"{f((r.get('monitor') or {}).get('robust_with_rejection'), '.4f')}"
            for r in rows
        ]
        return [*lines, wrote]
    lines = [
        f"round {r['round']}: clean {f(r['clean_accuracy'], '.4f')}  classes fooled >=99% "
        f"{f(r['fooling_classes_ge99_count'], 'd')}/{section['num_classes']}  median fooling conf "
        f"{f(r['fooling_median_confidence'], '.4f')}  patch fooling {f(r['patch_fooling_rate'], '.3f')}  "
        f"rejects {f(r.get('rejected_share_of_round_attacks'), '.3f')} of its round's attacks"
        for r in rows
    ]
    return [*lines, f"clean accuracy drop {section['clean_accuracy_drop_points']:.2f} points; {wrote}"]
