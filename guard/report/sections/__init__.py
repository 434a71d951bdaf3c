"""The page's sections, in order; each module builds one from its part of report.json.

=============  =====================================  ==============================================
section        module                                 drawn from
=============  =====================================  ==============================================
model          guard.report.sections.model            model, defaults; artifact examples
summary        guard.report.sections.summary          every section's headline numbers
gradient       guard.report.sections.gradient         attacks.fgsm / pgd; attack_fgsm / attack_pgd
patches        guard.report.sections.patches          attacks.patch_gan / universal_patch / random_patch
features       guard.report.sections.features         attacks.feature_adversary
fooling        guard.report.sections.fooling          attacks.fooling_*
detectors      guard.report.sections.detectors        detectors, detectors_info; detector_scores
adaptive       guard.report.sections.adaptive         adaptive (when present)
robust         guard.report.sections.robust           robust (when present)
harden         guard.report.sections.harden           harden
export         guard.report.sections.export           export
=============  =====================================  ==============================================
"""

from __future__ import annotations

from collections.abc import Callable

from guard.report.sections import (
    adaptive,
    detectors,
    export,
    features,
    fooling,
    gradient,
    harden,
    model,
    patches,
    robust,
    summary,
)
from guard.report.sections.common import Section
from guard.report.source import AuditFolder

__all__ = ["SECTIONS", "Section"]

#: (anchor, heading, builder) in page order; the heading is used when the builder itself fails
SECTIONS: tuple[tuple[str, str, Callable[[AuditFolder], Section | None]], ...] = (
    ("model", "Model and data", model.build),
    ("summary", "Summary", summary.build),
    ("gradient", "Gradient attacks (FGSM, PGD)", gradient.build),
    ("patches", "Patches", patches.build),
    ("features", "Feature adversaries", features.build),
    ("fooling", "Fooling images", fooling.build),
    ("detectors", "Detectors", detectors.build),
    ("adaptive", "Adaptive evaluation", adaptive.build),
    ("robust", "Robust accuracy", robust.build),
    ("harden", "Hardening", harden.build),
    ("export", "Export", export.build),
)
