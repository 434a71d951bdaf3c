"""Attacks: patch GAN (G2LVAP), universal and random patches, FGSM/PGD, feature adversaries,
fooling images. Every attack returns an :class:`AttackResult`."""

from attacks.base import Attack, AttackResult

__all__ = ["Attack", "AttackResult"]
