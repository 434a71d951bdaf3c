"""Training: supervised fitting and hardening (``harden``) with a reject class."""

from training.classifier import accuracy, train_classifier

__all__ = ["accuracy", "train_classifier"]
