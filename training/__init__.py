"""Training: supervised fitting and hardening (``harden``) with a reject class."""

from guard.training.classifier import accuracy, train_classifier
from guard.training.harden import HardenResult, harden
from guard.training.reject import REJECT, RejectClassifier, grow_head
from guard.training.round_attacks import DEFAULT_ATTACKS, ROUND_ATTACKS, AttackBudget

__all__ = ["accuracy", "train_classifier", "harden", "HardenResult", "RejectClassifier", "grow_head", "REJECT",
           "AttackBudget", "ROUND_ATTACKS", "DEFAULT_ATTACKS"]
