"""Detectors planted in tests: their right answer is known, so an attack that knows them can be checked."""

from __future__ import annotations

from torch import nn

from guard.attacks.fooling_gradient import total_variation
from guard.detectors import Detector


class TotalVariation(Detector):
    """A planted differentiable detector: PGD's noise raises an image's total variation."""

    name = "tv"

    def fit_batch(self, batch, labels):
        self.fitted_ = True
        return self

    def score_batch(self, batch):
        return total_variation(batch.x)

    def export_head(self):
        return _TVHead()


class _TVHead(nn.Module):
    def forward(self, batch):
        return total_variation(batch.x)
