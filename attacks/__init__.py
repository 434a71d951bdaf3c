"""Attacks: patch GAN (G2LVAP), universal and random patches, FGSM/PGD, feature adversaries,
fooling images. Every attack returns an :class:`AttackResult`.

Input attacks (:class:`Attack`) are called ``attack(model, x, y)``; patch attacks learn first
(``attack.fit(model, train_x)``). Fooling-image generators (:class:`Fooler`) make images from
nothing: ``fooler(model, shape=(C, H, W))``. :data:`ATTACKS` lists guard's attack classes by a
short name (the contract tests run over it: a new attack is one file plus one line here). The
names report.json uses, which step writes each and which class runs it, are the vocabulary of
:mod:`guard.core.registry` (several report rows run one class: ``pgd_minimal``, ``pgd`` and
``pgd_confident`` are :class:`LinfPGD`; the held-out rows are torchattacks').
"""

from guard.attacks.adaptive import AdaptivePGD
from guard.attacks.adaptive_ensemble import AdaptiveEnsemble
from guard.attacks.apgd import APGD
from guard.attacks.base import Attack, AttackResult, Fooler
from guard.attacks.cppn import Genome, MutationRates
from guard.attacks.feature_adversary import FeatureAdversary
from guard.attacks.fooling_evolution import CPPNOptions, DirectOptions, FoolingEvolution, transfer_check
from guard.attacks.fooling_gradient import FoolingGradient
from guard.attacks.gradient import FGSM, L2PGD, PGD, LinfPGD
from guard.attacks.logit_matching import LogitMatching
from guard.attacks.masking_patch import MaskingPatch
from guard.attacks.orthogonal_pgd import OrthogonalPGD
from guard.attacks.patch_fit import PatchTraining
from guard.attacks.patch_gan import PatchGAN
from guard.attacks.random_patch import RandomPatch
from guard.attacks.universal_patch import UniversalPatch

#: short name -> attack class (the contract tests' list; report.json's names: guard.core.registry).
ATTACKS: dict[str, type] = {
    "fgsm": FGSM,
    "pgd": LinfPGD,
    "pgd_l2": L2PGD,
    "apgd": APGD,
    "patch_gan": PatchGAN,
    "universal_patch": UniversalPatch,
    "random_patch": RandomPatch,
    "feature_adversary": FeatureAdversary,
    "fooling_gradient": FoolingGradient,
    "fooling_evolution": FoolingEvolution,
}

__all__ = [
    "ATTACKS",
    "AdaptiveEnsemble",
    "AdaptivePGD",
    "APGD",
    "LogitMatching",
    "MaskingPatch",
    "OrthogonalPGD",
    "Attack",
    "AttackResult",
    "Fooler",
    "FGSM",
    "PGD",
    "LinfPGD",
    "L2PGD",
    "PatchGAN",
    "PatchTraining",
    "UniversalPatch",
    "RandomPatch",
    "FeatureAdversary",
    "FoolingGradient",
    "FoolingEvolution",
    "CPPNOptions",
    "DirectOptions",
    "Genome",
    "MutationRates",
    "transfer_check",
]
