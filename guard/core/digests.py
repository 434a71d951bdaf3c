"""Content digests of images: which clean images calibrated a threshold, so that evaluation can refuse them.

A figure measured at a calibrated threshold on the images that set it is optimistic by
construction (the threshold is their own quantile). :func:`image_digests` names each image by the
SHA-256 of its float32 bytes (NCHW, [0, 1]), so the same picture is recognised whether it came as
a slice, a copy or another tensor; :func:`overlap` counts how many images of one set are in another.
Exact bytes only: a re-encoded or resized copy is a different image here.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["image_digests", "overlap"]

#: hex characters kept per digest (128 bits: no accidental collision among any realistic data set)
DIGEST_CHARS = 32


def image_digests(x: torch.Tensor) -> frozenset[str]:
    """The set of per-image content digests of a (N, C, H, W) batch (float32 bytes, C-contiguous)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise TypeError(
            f"x must be a (N, C, H, W) image tensor; got {type(x).__name__}"
            f"{' of shape ' + str(tuple(x.shape)) if isinstance(x, torch.Tensor) else ''}."
        )
    flat = x.detach().to("cpu", torch.float32).contiguous().reshape(x.shape[0], -1).numpy()
    return frozenset(hashlib.sha256(row.tobytes()).hexdigest()[:DIGEST_CHARS] for row in flat)


def overlap(x: torch.Tensor, digests: frozenset[str] | set[str]) -> int:
    """How many images of ``x`` have a digest in ``digests``."""
    flat = x.detach().to("cpu", torch.float32).contiguous().reshape(x.shape[0], -1).numpy()
    return sum(hashlib.sha256(row.tobytes()).hexdigest()[:DIGEST_CHARS] in digests for row in flat)
