"""Audit step ``certified``: PatchCleanser's certificates against one patch (Xiang et al. 2022).

Fills ``report["certified"]`` (``patch_area``: the certified patch's share of the image, which
rounding to whole pixels moves from the requested ``patch_area_requested``; ``n``, ``clean_accuracy``, ``certified_recovery``,
``certified_detection``, ``clean_flagged``, plus ``patch_side``, ``masks``, ``model_accuracy``
and ``seconds``): :func:`guard.detectors.masking.certify` on the evaluation half of the
held-out images (the half the detectors step did not calibrate on). ``clean_accuracy`` is the
defended (double-masking) model's; ``model_accuracy`` the bare model's on the same images. A
model not trained with masks certifies few images: ``guard.training.mask_training`` is the
remedy (``guard.demo_model("cifar10", variant="masked")`` on CIFAR-10).

Options (``options.extra``): ``certified`` (False turns the step off), ``certified_n`` (images;
default 100 on the demo LeNet, scaled with the model's cost, at least 20), ``certified_patch_area``
(default 0.024, the issue's 5x5 patch on 32x32 images), ``certified_k`` (masks per axis, default 6).
"""

from __future__ import annotations

import time

from guard.audit.detectors import split_heldout
from guard.audit.step import AuditContext, Step
from guard.detectors.masking import certify

__all__ = ["CertifiedStep"]


class CertifiedStep(Step):
    """Certified recovery and detection of the audited model against one patch."""

    name = "certified"

    def skip_reason(self, ctx: AuditContext) -> str | None:
        return None if ctx.options.extra.get("certified", True) else "certified patch evaluation turned off"

    def run(self, ctx: AuditContext) -> None:
        extra, quick = ctx.options.extra, ctx.options.quick
        _, ev = split_heldout(len(ctx.test), ctx.options.seed)
        n = min(len(ev), int(extra.get("certified_n", 16 if quick else ctx.scaled(100, 20))))
        area = float(extra.get("certified_patch_area", 0.024))
        k = int(extra.get("certified_k", 3 if quick else 6))
        idx = ev[:n]
        t0 = time.perf_counter()
        cert = certify(ctx.model, ctx.test.x[idx].to(ctx.options.device), ctx.test.y[idx], area, k=k)
        summary = cert.summary()
        ctx.report["certified"] = {
            "patch_area_requested": area,
            **{
                key: summary[key]
                for key in (
                    "patch_area",
                    "n",
                    "clean_accuracy",
                    "certified_recovery",
                    "certified_detection",
                    "clean_flagged",
                    "patch_side",
                    "masks",
                    "mask_size",
                    "model_accuracy",
                )
            },
            "k": k,
            "seconds": round(time.perf_counter() - t0, 2),
        }
