"""Patch placement shared by the patch attacks (PatchGAN, UniversalPatch, RandomPatch).

A patch is a square (C, s, s) tensor in [0, 1] pasted over an image (it replaces the pixels, as
in LaVAN, Karmon et al. 2018, and G2LVAP). Its size is given either in pixels (an int side) or
as a fraction of the image area (a float in (0, 1); side = round(sqrt(area * H * W))).
Positions are the (row, col) of the patch's top-left corner, one per image, drawn with a
``torch.Generator``. :func:`apply_patches` is batched with advanced indexing (no Python loop
over images) and differentiable with respect to both the images and the patches.
"""

from __future__ import annotations

import math
import numbers

import torch

from guard.core.validation import check_float, check_images, check_int

__all__ = ["check_patch_size", "patch_side", "random_positions", "grid_positions", "apply_patches", "patch_mask"]


def check_patch_size(size: int | float, owner: str) -> int | float:
    """Validate a patch size parameter: an int side in pixels or a float area fraction in (0, 1)."""
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise TypeError(f"The 'size' parameter of {owner} must be an int side or a float area fraction. Got {size!r}.")
    if isinstance(size, float):
        return check_float(size, "size", owner, low=0.0, high=1.0, low_open=True, high_open=True)
    return check_int(size, "size", owner, low=1)


def patch_side(size: int | float, image_size: tuple[int, int] | torch.Size, *, name: str = "size") -> int:
    """The side in pixels of a square patch.

    Args:
        size: an int side in pixels (1 <= size <= min(H, W)), or a float fraction of the image
            area strictly inside (0, 1).
        image_size: (H, W) of the images.
        name: the argument's name for error messages.

    Returns:
        The side s (>= 1) with s <= min(H, W).
    """
    h, w = int(image_size[-2]), int(image_size[-1])
    if isinstance(size, bool) or not isinstance(size, numbers.Real):
        raise TypeError(
            f"{name} must be an int side in pixels or a float area fraction in (0, 1); got {type(size).__name__}."
        )
    if isinstance(size, numbers.Integral):
        side = int(size)
        if side < 1 or side > min(h, w):
            raise ValueError(
                f"{name} must be a patch side between 1 and {min(h, w)} pixels for {h}x{w} images; got {side} "
                "(a patch larger than the image)."
            )
        return side
    area = float(size)
    if not (0.0 < area < 1.0) or not math.isfinite(area):
        raise ValueError(f"{name} as an area fraction must lie in (0, 1); got {size!r}.")
    side = max(1, int(round(math.sqrt(area * h * w))))
    if side > min(h, w):
        raise ValueError(f"{name}={area} gives a {side}-pixel patch, larger than the {h}x{w} image.")
    return side


def random_positions(
    n: int,
    side: int,
    image_size: tuple[int, int] | torch.Size,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``n`` uniformly random top-left corners (row, col), int64 (n, 2), patch fully inside."""
    h, w = int(image_size[-2]), int(image_size[-1])
    if side < 1 or side > min(h, w):
        raise ValueError(f"side must be between 1 and {min(h, w)} for {h}x{w} images; got {side}.")
    rows = torch.randint(0, h - side + 1, (n,), generator=generator)
    cols = torch.randint(0, w - side + 1, (n,), generator=generator)
    return torch.stack([rows, cols], 1).to(device if device is not None else "cpu")


def grid_positions(side: int, image_size: tuple[int, int] | torch.Size, stride: int) -> torch.Tensor:
    """Top-left corners of a sliding grid (row-major), int64 (G, 2), every patch inside the image."""
    h, w = int(image_size[-2]), int(image_size[-1])
    if stride < 1:
        raise ValueError(f"stride must be an int >= 1; got {stride}.")
    rows = list(range(0, h - side + 1, stride))
    cols = list(range(0, w - side + 1, stride))
    return torch.tensor([[r, c] for r in rows for c in cols], dtype=torch.long)


def _check_positions(positions: torch.Tensor, n: int, side: int, h: int, w: int) -> torch.Tensor:
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be an int64 tensor of shape (N, 2); got {type(positions).__name__}.")
    if positions.is_floating_point() or positions.dim() != 2 or positions.shape[1] != 2:
        raise ValueError(
            f"positions must be an integer tensor of shape ({n}, 2) (row, col); got shape {tuple(positions.shape)} "
            f"and dtype {positions.dtype}."
        )
    if positions.shape[0] not in (1, n):
        raise ValueError(f"positions must have 1 or {n} rows (one per image); got {positions.shape[0]}.")
    if positions.numel():
        lo = int(positions.min())
        r_hi, c_hi = int(positions[:, 0].max()), int(positions[:, 1].max())
        if lo < 0 or r_hi > h - side or c_hi > w - side:
            raise ValueError(
                f"positions must keep the {side}x{side} patch inside the {h}x{w} image (rows in [0, {h - side}], "
                f"cols in [0, {w - side}]); got rows up to {r_hi}, cols up to {c_hi}, min {lo}."
            )
    return positions.long()


def apply_patches(x: torch.Tensor, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Paste one square patch on each image.

    Args:
        x: images (N, C, H, W) in [0, 1].
        patches: (N, C', s, s) or (1, C', s, s) (one patch for all), C' = C or 1.
        positions: int64 (N, 2) or (1, 2) top-left (row, col) of each patch.

    Returns:
        A new tensor (N, C, H, W): ``x`` with the patch region replaced; gradients flow to
        ``x`` (outside the patch) and to ``patches``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        check_images(x, "x")
    if not isinstance(patches, torch.Tensor):
        raise TypeError(f"patches must be a tensor (N, C, s, s); got {type(patches).__name__}.")
    n, c, h, w = x.shape
    if patches.dim() != 4 or patches.shape[-1] != patches.shape[-2]:
        raise ValueError(f"patches must be square, shape (N, C, s, s); got {tuple(patches.shape)}.")
    if patches.shape[0] not in (1, n):
        raise ValueError(f"patches must hold 1 or {n} patches (one per image); got {patches.shape[0]}.")
    if patches.shape[1] not in (1, c):
        raise ValueError(f"patches must have {c} (or 1) channel(s) like x; got {patches.shape[1]}.")
    s = int(patches.shape[-1])
    if s > min(h, w):
        raise ValueError(f"patches of side {s} are larger than the {h}x{w} images.")
    positions = _check_positions(positions, n, s, h, w).to(x.device)
    positions = positions.expand(n, 2)
    ar = torch.arange(s, device=x.device)
    rows = positions[:, :1] + ar  # (n, s)
    cols = positions[:, 1:] + ar  # (n, s)
    idx_n = torch.arange(n, device=x.device).view(n, 1, 1)
    values = patches.to(dtype=x.dtype, device=x.device).expand(n, c, s, s).permute(0, 2, 3, 1)  # (n, s, s, c)
    out = x.clone()
    # Advanced indices separated by a slice put the indexed dims first: (n, s, s, C).
    out[idx_n, :, rows.view(n, s, 1), cols.view(n, 1, s)] = values
    return out


def patch_mask(positions: torch.Tensor, side: int, image_size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Boolean (N, 1, H, W) mask of the patch regions (True inside the patch)."""
    h, w = int(image_size[-2]), int(image_size[-1])
    n = int(positions.shape[0])
    m = torch.zeros(n, 1, h, w, dtype=torch.bool, device=positions.device)
    return apply_patches(m.float(), torch.ones(1, 1, side, side, device=positions.device), positions).bool()
