"""RandomPatch: the random-noise patch baseline of G2LVAP.

Each image gets its own patch of i.i.d. uniform noise in [0, 1] at a random position; no
optimisation. The fooling rate it reaches is what a patch of that size achieves by merely
occluding part of the image, the floor the learned patches must beat.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from guard.attacks.base import Attack, AttackResult
from guard.attacks.patching import apply_patches, check_patch_size, patch_side, random_positions
from guard.core.validation import check_int

__all__ = ["RandomPatch"]


class RandomPatch(Attack):
    """Uniform-noise patches at random positions (no training).

    Args:
        size: patch side in pixels (int) or area fraction (float in (0, 1)).
        real_classes: outputs from this index on (a reject class) do not count as fooled.
        seed: seeds the noise and the positions.
    """

    targeted_supported = False

    def __init__(self, *, size: int | float = 0.05, real_classes: int | None = None, seed: int = 0) -> None:
        self.size = check_patch_size(size, "RandomPatch")
        self.real_classes = (
            None if real_classes is None else check_int(real_classes, "real_classes", "RandomPatch", low=2)
        )
        self.seed = check_int(seed, "seed", "RandomPatch", low=0)

    def fit(self, model: nn.Module | None = None, data: Any = None) -> RandomPatch:
        """Nothing to learn; present so the three patch attacks share one interface."""
        return self

    def sample(
        self,
        n: int,
        *,
        channels: int = 1,
        image_size: tuple[int, int] = (28, 28),
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``n`` noise patches (n, channels, s, s) for images of ``image_size``."""
        side = patch_side(self.size, image_size, name="size")
        n = check_int(n, "n", "RandomPatch.sample", low=1)
        return torch.rand(n, channels, side, side, generator=generator)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> AttackResult:
        n, c, h, w = x.shape
        gen = torch.Generator().manual_seed(self.seed)
        patches = self.sample(n, channels=c, image_size=(h, w), generator=gen).to(x.device)
        positions = random_positions(n, int(patches.shape[-1]), (h, w), generator=gen, device=x.device)
        x_adv = apply_patches(x, patches, positions)
        return AttackResult(
            x_adv,
            self.is_success(model, x_adv, y, None),
            extras={"patches": patches, "positions": positions, "side": int(patches.shape[-1])},
        )
