"""Batched inference helpers: large images get smaller batches, and no autograd graph is kept."""

from __future__ import annotations

import torch
from torch import nn

from guard.core.models import MAX_BATCH_ELEMENTS, inference_batch, predict_labels
from guard.training.reject import RejectClassifier


class Recorder(nn.Module):
    """Logits from channel means; records every batch size and whether autograd was on."""

    def __init__(self, k: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(3, k)
        self.batches: list[int] = []
        self.grad_on: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(int(x.shape[0]))
        self.grad_on.append(torch.is_grad_enabled())
        return self.fc(x.mean((2, 3)))


def test_the_cap_binds_only_for_large_images():
    assert inference_batch(torch.zeros(2, 1, 28, 28), 1000) == 1000  # MNIST and CIFAR keep the default
    assert inference_batch(torch.zeros(2, 3, 32, 32), 1000) == 1000
    assert inference_batch(torch.zeros(2, 3, 224, 224), 1000) == MAX_BATCH_ELEMENTS // (3 * 224 * 224) == 55
    assert inference_batch(torch.zeros(2, 3, 224, 224), 10) == 10
    assert inference_batch(torch.zeros(2, 3, 8000, 8000), 1000) == 1  # never zero


def test_predict_labels_batches_224px_images_and_keeps_no_graph():
    m = Recorder()
    x = torch.rand(120, 3, 224, 224)
    labels = predict_labels(m, x)
    assert m.batches == [55, 55, 10] and m.grad_on == [False] * 3
    with torch.no_grad():
        assert torch.equal(labels, m.fc(x.mean((2, 3))).argmax(1))
    r = RejectClassifier(nn.Sequential(Recorder(k=5)), 4, "0.fc")
    p = r.probabilities(x)
    assert p.shape == (120, 5) and r.model[0].batches == [55, 55, 10]


def test_extract_features_batches_224px_images():
    from guard.core.features import extract_features

    m = Recorder()
    logits, f = extract_features(m, torch.rand(60, 3, 224, 224), ["fc"])
    assert m.batches == [55, 5] and logits.shape == (60, 4) and f["fc"].shape == (60, 4)
