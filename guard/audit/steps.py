"""The audit, in order: the one list of steps ``guard audit`` runs.

Each step lives in its own module, fills its own section of report.json and declares what it
needs from the steps before it (see :mod:`guard.audit.step`):

=================  =========================  ===========================  ==============
step               module                     report section               gives
=================  =========================  ===========================  ==============
model              guard.audit.model          model                        -
attacks_gradient   guard.audit.gradient       attacks.fgsm, attacks.pgd*   AttackSet
attacks_heldout    guard.audit.heldout        attacks.apgd_ce, cw, ...     AttackSet
attacks_patches    guard.audit.patches        attacks.patch_gan, ...       AttackSet
attacks_features   guard.audit.features       attacks.feature_adversary    AttackSet
attacks_fooling    guard.audit.fooling        attacks.fooling_*            AttackSet
detectors          guard.audit.detectors      detectors, detectors_info    GuardedModel
adaptive           guard.audit.adaptive       adaptive                     -
robust             guard.audit.robust         robust                       -
certified          guard.audit.certified      certified                    -
harden             guard.audit.harden         harden (with --harden)       RejectClassifier
export             guard.audit.export         export                       -
=================  =========================  ===========================  ==============
"""

from __future__ import annotations

from guard.audit.adaptive import AdaptiveStep
from guard.audit.certified import CertifiedStep
from guard.audit.detectors import DetectorStep
from guard.audit.export import ExportStep
from guard.audit.features import FeatureAdversaryStep
from guard.audit.fooling import FoolingStep
from guard.audit.gradient import GradientStep
from guard.audit.harden import HardenStep
from guard.audit.heldout import HeldOutStep
from guard.audit.model import ModelStep
from guard.audit.patches import PatchStep
from guard.audit.robust import RobustStep
from guard.audit.step import Step

__all__ = ["STEPS", "step"]

STEPS: tuple[Step, ...] = (
    ModelStep(),
    GradientStep(),
    HeldOutStep(),
    PatchStep(),
    FeatureAdversaryStep(),
    FoolingStep(),
    DetectorStep(),
    AdaptiveStep(),
    RobustStep(),
    CertifiedStep(),
    HardenStep(),
    ExportStep(),
)


def step(name: str) -> Step:
    """The step called ``name`` (ValueError listing the names otherwise)."""
    for s in STEPS:
        if s.name == name:
            return s
    raise ValueError(f"unknown audit step {name!r}; expected one of {[s.name for s in STEPS]}.")
