"""Audit step ``certified``: PatchCleanser's certificates against one patch (Xiang et al. 2022).

Fills ``report["certified"]`` (``patch_area``: the certified patch's share of the image, which
rounding to whole pixels moves from the requested ``patch_area_requested``; ``n``, ``clean_accuracy``, ``certified_recovery``,
``certified_detection``, ``clean_flagged``, plus ``patch_side``, ``masks``, ``model_accuracy``
and ``seconds``): :func:`guard.detectors.masking.certify` on the evaluation half of the
held-out images (the half the detectors step did not calibrate on). ``clean_accuracy`` is the
defended (double-masking) model's; ``model_accuracy`` the bare model's on the same images. A
model not trained with masks certifies few images: ``guard.training.mask_training`` is the
remedy (``guard.demo_model("cifar10", variant="masked")`` on CIFAR-10).

Settings: :class:`guard.audit.settings.CertifiedSettings` (keys ``certified`` (False turns the step
off), ``certified_n``, ``certified_patch_area`` (default 0.024, the issue's 5x5 patch on 32x32
images), ``certified_k`` (masks per axis)).
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
        return None if ctx.settings.certified.enabled else "certified patch evaluation turned off"

    def run(self, ctx: AuditContext) -> None:
        s = ctx.settings.certified
        _, ev = split_heldout(len(ctx.test), ctx.options.seed)
        n, area, k = min(len(ev), s.n), s.patch_area, s.k
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
