"""Attacks: patch GAN (G2LVAP), universal and random patches, FGSM/PGD, feature adversaries,
fooling images. Every attack returns an :class:`AttackResult`."""

from guard.attacks.base import Attack, AttackResult
from guard.attacks.cppn import Genome
from guard.attacks.feature_adversary import FeatureAdversary
from guard.attacks.fooling_evolution import FoolingEvolution, transfer_check
from guard.attacks.fooling_gradient import FoolingGradient
from guard.attacks.gradient import FGSM, PGD, L2PGD, LinfPGD
from guard.attacks.patch_gan import PatchGAN
from guard.attacks.random_patch import RandomPatch
from guard.attacks.universal_patch import UniversalPatch

__all__ = ["Attack", "AttackResult", "FGSM", "PGD", "LinfPGD", "L2PGD", "PatchGAN", "UniversalPatch", "RandomPatch",
           "FeatureAdversary", "FoolingGradient", "FoolingEvolution", "Genome", "transfer_check"]
