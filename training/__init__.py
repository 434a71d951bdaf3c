"""Training: supervised fitting and hardening (:func:`harden`) with a reject class.

``harden(model, data, config=HardenConfig(...))`` is the one entry point; ``guard harden``
(also under ``torchrun``) and ``guard audit --harden`` build their :class:`HardenConfig` from
the same defaults.
"""

from guard.training.classifier import accuracy, train_classifier
from guard.training.consistent import ConsistentRejection, choose_radius
from guard.training.harden import CheckpointMismatch, HardenConfig, HardenResult, harden
from guard.training.reject import REJECT, RejectClassifier, grow_head
from guard.training.round_attacks import DEFAULT_ATTACKS, ROUND_ATTACKS, AttackBudget, round_attack_table

__all__ = [
    "accuracy",
    "train_classifier",
    "harden",
    "HardenConfig",
    "HardenResult",
    "CheckpointMismatch",
    "RejectClassifier",
    "ConsistentRejection",
    "choose_radius",
    "grow_head",
    "REJECT",
    "AttackBudget",
    "ROUND_ATTACKS",
    "DEFAULT_ATTACKS",
    "round_attack_table",
]
