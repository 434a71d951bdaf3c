"""Shared fixtures: seeds fixed, threads capped, the embedded data, a tiny and the demo model."""

from __future__ import annotations

import os

import pytest
import torch

import guard
from guard.models import DemoNet
from training.classifier import train_classifier

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def demo_split() -> tuple[guard.Split, guard.Split]:
    """The embedded MNIST default: (8,000 train, 2,000 test)."""
    return guard.demo_data()


@pytest.fixture(scope="session")
def small_split(demo_split):
    """512 training and 256 held-out images of the embedded default."""
    train, test = demo_split
    return guard.Split(train.x[:512], train.y[:512]), guard.Split(test.x[:256], test.y[:256])


@pytest.fixture(scope="session")
def tiny_model(demo_split) -> DemoNet:
    """A narrow DemoNet trained for two epochs on 2,000 images (~2 s; ~90% accurate)."""
    train, _ = demo_split
    torch.manual_seed(0)
    model = DemoNet(width=8, hidden=32)
    train_classifier(model, train.x[:2000], train.y[:2000], epochs=2, lr=3e-3, seed=0, progress=False)
    return model.eval()


@pytest.fixture(scope="session")
def demo_net() -> DemoNet:
    """The real demo model (cached in the user cache; trained once, ~25 s, if missing)."""
    return guard.demo_model(progress=False)
