"""Tracked data for the streaming tests: a loader and a Dataset that raise once too many batches are alive.

"Materialised" means the whole data set held at once; a streaming reader holds a batch or two.
:class:`HeldBatches` is a ``collate_fn`` (for a DataLoader the test builds); :class:`TrackedImages`
is a Dataset read through any DataLoader, the library's own included: its images are a tensor
subclass whose only extra behaviour is counting the batches ``torch.stack`` / ``torch.cat`` make
of them (a collated batch, a concatenation of items) while those are alive.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.data import Dataset


class HeldBatches:
    """A collate_fn that counts the image batches alive and raises once more than ``limit`` are held."""

    def __init__(self, limit: int) -> None:
        self.limit, self.alive, self.most, self.made = limit, 0, 0, 0

    def _gone(self) -> None:
        self.alive -= 1

    def track(self, x: torch.Tensor) -> None:
        """Count ``x`` as one batch alive until it is freed; raise when ``limit`` are already alive."""
        if self.alive >= self.limit:
            raise RuntimeError(f"{self.alive} batches of images held at once: the data set is being materialised")
        self.alive += 1
        self.made += 1
        self.most = max(self.most, self.alive)
        weakref.finalize(x, self._gone)

    def __call__(self, items):
        x = torch.stack([a for a, _ in items])
        y = torch.tensor([int(b) for _, b in items])
        self.track(x)
        return x, y


class _Image(torch.Tensor):
    """One item's image: a batch stacked or concatenated from such images is reported to ``held``."""

    held: HeldBatches

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        if func in (torch.stack, torch.cat) and isinstance(out, torch.Tensor):
            cls.held.track(out)
        return out


class TrackedImages(Dataset):
    """``(x[i], y[i])`` items whose collated batches count against ``HeldBatches(limit)`` (``self.held``)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, limit: int) -> None:
        self.x, self.y = x, y
        self.held = HeldBatches(limit)
        self._image = type("_Image", (_Image,), {"held": self.held})

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int):
        return self.x[i].clone().as_subclass(self._image), int(self.y[i])
