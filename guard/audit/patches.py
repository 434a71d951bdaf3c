"""Audit step ``attacks_patches``: PatchGAN (G2LVAP), UniversalPatch and RandomPatch.

For every area of the curve (default 1%, 2%, 5%, 10% of the image) one PatchGAN and one
UniversalPatch are trained on a slice of the *training* split (their early stopping uses a
validation slice of that slice; the held-out images are never seen in training), under a
wall-clock budget per area. Each attack is then evaluated on the held-out images with
``options.repetitions`` independent draws of patches and random positions (mean and std, the
paper's Figure 4). Report entries ``attacks.patch_gan``, ``attacks.universal_patch``,
``attacks.random_patch``: the headline success rate is the first draw at the largest area on
all held-out images; ``curve`` holds the fooling-rate-vs-area curve; PatchGAN also gets the
class comparison, the pairwise SSIM/PSNR diversity and a latent interpolation.

Settings: :class:`guard.audit.settings.PatchSettings` (keys ``patch_areas``, ``patch_train_images``,
``patch_gan_steps`` / ``patch_gan_seconds``, ``universal_steps`` / ``universal_seconds``,
``patch_loss``, ``patch_gan_kwargs``, ``patch_gan_lr``, ...; PatchGAN's learning-rate and
diversity rules, :func:`~guard.audit.settings.gan_learning_rate` and
:func:`~guard.audit.settings.gan_diversity_weight`, live beside them).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from guard.attacks.patch_analysis import (
    class_comparison,
    fooling_rate_repeated,
    latent_interpolation,
    pairwise_diversity,
    patch_sampler,
)
from guard.attacks.patch_gan import PatchGAN, last_conv_layer
from guard.attacks.random_patch import RandomPatch
from guard.attacks.universal_patch import UniversalPatch
from guard.audit.settings import (
    DEFAULT_AREAS,
    GAN_AUDIT_KWARGS,
    GAN_FAST_BETA,
    GAN_PAPER_LR,
    GAN_REFERENCE_STEPS,
    PatchSettings,
    gan_diversity_weight,
    gan_learning_rate,
)
from guard.audit.step import AttackSet, AttackStep, AuditContext
from guard.core.models import predict_labels
from guard.core.registry import attack_names

__all__ = [
    "PatchStep",
    "DEFAULT_AREAS",
    "GAN_AUDIT_KWARGS",
    "GAN_FAST_BETA",
    "GAN_PAPER_LR",
    "GAN_REFERENCE_STEPS",
    "gan_learning_rate",
    "gan_diversity_weight",
]

NAMES = attack_names(step="attacks_patches")
GAN, UNIVERSAL, RANDOM = NAMES  # the learned generator, one learned patch, random noise (the baseline)

log = logging.getLogger(__name__)


def _settings(ctx: AuditContext) -> PatchSettings:
    """The step's resolved settings (:attr:`AuditContext.settings`)."""
    return ctx.settings.patches


class PatchStep(AttackStep):
    """PatchGAN, UniversalPatch and RandomPatch: the fooling-vs-area curve and the analyses."""

    name = "attacks_patches"
    attack_names = NAMES

    def run(self, ctx: AuditContext) -> AttackSet:
        return _run(ctx)


def _run(ctx: AuditContext) -> AttackSet:
    s = _settings(ctx)
    model = ctx.model
    n_test = len(ctx.test) if s.test_images is None else min(s.test_images, len(ctx.test))
    x_test, y_test = ctx.test.x[:n_test], ctx.test.y[:n_test]
    idx = torch.arange(n_test)
    curves, fitted, fit_seconds = _fit_curves(ctx, s, x_test, y_test)

    section = ctx.report.setdefault("attacks", {})
    out = AttackSet()
    head_area = max(s.areas)
    for name in curves:
        attack = fitted[name][head_area]
        t0 = time.perf_counter()
        result = attack(model, x_test)
        seconds = time.perf_counter() - t0 + fit_seconds[name]
        correct = result.y.cpu() == y_test
        entry: dict[str, Any] = {
            "success_rate": result.success_rate,
            "n": len(result),
            "success_rate_on_correct": float(result.success.cpu()[correct].float().mean())
            if correct.any()
            else float("nan"),
            "n_correct": int(correct.sum()),
            "success_definition": "model's label on the patched image != its label on the clean image",
            "area": head_area,
            "side": _side(attack, x_test),
            "seconds": round(seconds, 3),
            "params": attack.params(),
            "curve": curves[name],
            "curve_repetitions": s.repetitions,
            "curve_training": "one attack trained per area on the training split, with a wall-clock budget per area",
        }
        section[name] = entry
        result.extras["test_index"] = idx
        result.extras["pred"] = predict_labels(model, result.x_adv)  # the label on the patched image (report.html)
        out.results[name] = result
        ctx.save_attack(name, result, {"params": attack.params()})

    _analyses(ctx, s, {name: per[head_area] for name, per in fitted.items()}, x_test, section)
    # Under patch_gan (not a top-level key) so that every entry of report["attacks"] stays an attack.
    section[GAN]["summary"] = _summary(curves)
    gan = fitted[GAN][head_area]
    ctx.save_artifact(
        "patch_gan_generator", dict(gan.generator_.state_dict()), {"config": gan.generator_.config(), "area": head_area}
    )
    return out


def _gan_kwargs(s: PatchSettings, model: Any) -> dict[str, Any]:
    """PatchGAN's extra keyword arguments; without an nn.Conv2d in the model, no feature-diversity term."""
    gan_kwargs = dict(s.gan_kwargs or {})
    try:
        last_conv_layer(model)
    except ValueError:  # e.g. TorchScript models expose no nn.Conv2d: no feature-diversity term
        log.warning("patch_gan: %s exposes no nn.Conv2d, training without L_d (alpha=0)", type(model).__name__)
        gan_kwargs["alpha"] = 0.0
    return gan_kwargs


def _makers(s: PatchSettings, area: float, seed: int, gan_kwargs: dict[str, Any]) -> dict[str, Any]:
    """{attack name: a function that builds that attack, unfitted, for ``area``}."""
    return {
        GAN: lambda: PatchGAN.from_params(
            size=area,
            loss=s.loss,
            steps=s.gan_steps,
            lr=s.gan_lr,
            max_seconds=s.gan_seconds,
            eval_every=s.eval_every,
            batch_size=s.batch_size,
            seed=seed,
            **gan_kwargs,
        ),
        UNIVERSAL: lambda: UniversalPatch.from_params(
            size=area,
            loss=s.loss,
            steps=s.universal_steps,
            max_seconds=s.universal_seconds,
            eval_every=s.eval_every,
            batch_size=s.batch_size,
            seed=seed,
        ),
        RANDOM: lambda: RandomPatch(size=area, seed=seed),
    }


def _fit_curves(
    ctx: AuditContext, s: PatchSettings, x_test: torch.Tensor, y_test: torch.Tensor
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[float, Any]], dict[str, float]]:
    """Fit every attack at every area on the training slice and measure its fooling rate on the held-out images.

    Returns (curves: per attack one point per area, fitted: per attack the attack of each area,
    fit_seconds: per attack the training time over all areas).
    """
    seed, model = ctx.options.seed, ctx.model
    x_train = ctx.train.x[: s.train_images]
    shape = (int(x_test.shape[1]), tuple(x_test.shape[-2:]))
    curves: dict[str, list[dict[str, Any]]] = {name: [] for name in NAMES}
    fitted: dict[str, dict[float, Any]] = {k: {} for k in curves}
    fit_seconds: dict[str, float] = {k: 0.0 for k in curves}
    gan_kwargs = _gan_kwargs(s, model)
    bar = tqdm(total=len(s.areas) * 3, desc="patch attacks", disable=not ctx.options.progress, leave=False)
    for area in s.areas:
        for name, make in _makers(s, area, seed, gan_kwargs).items():
            t0 = time.perf_counter()
            attack = make().fit(model, x_train)
            fit_s = time.perf_counter() - t0
            fit_seconds[name] += fit_s
            stats = fooling_rate_repeated(
                model, x_test, patch_sampler(attack, *shape), repetitions=s.repetitions, seed=seed, y=y_test
            )
            point = {"area": area, "side": _side(attack, x_test), **stats, "fit_seconds": round(fit_s, 3)}
            if hasattr(attack, "steps_"):
                point.update(fit_steps=attack.steps_, val_fooling_rate=attack.val_fooling_rate_)
            curves[name].append(point)
            fitted[name][area] = attack
            bar.update(1)
    bar.close()
    return curves, fitted, fit_seconds


def _analyses(
    ctx: AuditContext, s: PatchSettings, head: dict[str, Any], x_test: torch.Tensor, section: dict[str, Any]
) -> None:
    """Class comparison, diversity and latent interpolation of the largest-area attacks (``head``), into ``section``."""
    model, seed = ctx.model, ctx.options.seed
    shape = (int(x_test.shape[1]), tuple(x_test.shape[-2:]))
    gan = head[GAN]
    x_cc = x_test[: s.comparison_n]
    gen = torch.Generator().manual_seed(seed + 11)
    g_patches = gan.sample(int(x_cc.shape[0]), generator=gen)
    cc = class_comparison(model, x_cc, g_patches)
    cc.pop("grid", None)
    section[GAN]["class_comparison"] = cc
    section[GAN]["diversity"] = pairwise_diversity(gan.sample(s.diversity_n, generator=gen))
    section[GAN]["latent_interpolation"] = latent_interpolation(model, gan, x_cc, points=s.interp_points, seed=seed)
    up = head[UNIVERSAL]
    cc_up = class_comparison(model, x_cc, up.patch_)
    cc_up.pop("grid", None)
    section[UNIVERSAL]["class_comparison"] = cc_up
    rp = head[RANDOM]
    section[RANDOM]["diversity"] = pairwise_diversity(
        rp.sample(s.diversity_n, channels=shape[0], image_size=shape[1], generator=gen)
    )


def _side(attack: Any, x: torch.Tensor) -> int:
    from guard.attacks.patching import patch_side

    return int(getattr(attack, "side_", 0)) or patch_side(attack.size, x.shape[-2:])


def _summary(curves: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Whether PatchGAN beats both baselines at every area, and its best area <= 10%."""
    gan = {p["area"]: p["mean"] for p in curves[GAN]}
    above = {
        str(a): bool(gan[a] > max(p["mean"] for c in (UNIVERSAL, RANDOM) for p in curves[c] if p["area"] == a))
        for a in gan
    }
    small = [p for p in curves[GAN] if p["area"] <= 0.1 + 1e-9]
    return {
        "patch_gan_above_both_baselines": above,
        "patch_gan_above_both_at_every_area": all(above.values()),
        "patch_gan_best_fooling_at_area_le_10pct": max((p["mean"] for p in small), default=float("nan")),
    }
