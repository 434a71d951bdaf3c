"""Attacks: patch GAN (G2LVAP), universal and random patches, FGSM/PGD, feature adversaries,
fooling images. Every attack returns an :class:`AttackResult`."""

from attacks.base import Attack, AttackResult
from attacks.cppn import Genome
from attacks.feature_adversary import FeatureAdversary
from attacks.fooling_evolution import FoolingEvolution, transfer_check
from attacks.fooling_gradient import FoolingGradient
from attacks.gradient import FGSM, PGD, L2PGD, LinfPGD
from attacks.patch_gan import PatchGAN
from attacks.random_patch import RandomPatch
from attacks.universal_patch import UniversalPatch

__all__ = ["Attack", "AttackResult", "FGSM", "PGD", "LinfPGD", "L2PGD", "PatchGAN", "UniversalPatch", "RandomPatch",
           "FeatureAdversary", "FoolingGradient", "FoolingEvolution", "Genome", "transfer_check"]
