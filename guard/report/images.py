"""Images for the page: NCHW float arrays in [0, 1] to small inline PNGs.

Every image becomes a ``data:image/png;base64,...`` URI (Pillow), downscaled so its longer side
is at most :data:`MAX_SIDE` pixels (a user's 224 px images keep the page small); small images
(MNIST's 28 px) stay at their own resolution and are enlarged by the browser with
``image-rendering: pixelated`` (:func:`display_size`), so no pixel is invented.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

__all__ = ["MAX_SIDE", "png_uri", "display_size", "perturbation", "to_uint8"]

MAX_SIDE = 128
#: small images are shown at least this many pixels on their longer side
MIN_DISPLAY = 72


def to_uint8(chw: np.ndarray) -> np.ndarray:
    """A (C, H, W) or (H, W) float image in [0, 1] as uint8 (H, W) or (H, W, 3); NaN shows black."""
    a = np.asarray(chw, dtype=np.float64)
    if a.ndim == 3:
        if a.shape[0] == 1:
            a = a[0]
        elif a.shape[0] == 3:
            a = a.transpose(1, 2, 0)
        else:  # other channel counts: the first three (or the mean) as something one can look at
            a = a[:3].transpose(1, 2, 0) if a.shape[0] > 3 else a.mean(0)
    if a.ndim not in (2, 3):
        raise ValueError(f"image must be (C, H, W) or (H, W); got shape {tuple(np.shape(chw))}.")
    a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0)
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def png_uri(chw: np.ndarray, max_side: int = MAX_SIDE) -> str:
    """A PNG data URI of the image, its longer side at most ``max_side`` pixels."""
    im = Image.fromarray(to_uint8(chw))
    w, h = im.size
    if max(w, h) > max_side:
        scale = max_side / max(w, h)
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def display_size(h: int, w: int, minimum: int = MIN_DISPLAY, maximum: int = MAX_SIDE) -> tuple[int, int]:
    """(width, height) in CSS pixels: an integer enlargement up to ``minimum``, at most ``maximum``."""
    side = max(h, w, 1)
    if side >= minimum:
        scale = min(1.0, maximum / side)
    else:
        scale = float(max(1, -(-minimum // side)))  # whole-number factor: crisp pixels
    return max(1, round(w * scale)), max(1, round(h * scale))


def perturbation(adv: np.ndarray, clean: np.ndarray) -> tuple[np.ndarray, float]:
    """``adv - clean`` shown around grey (0.5), magnified so its largest change reaches black or white.

    Returns the image and the magnification factor (1 when nothing changed).
    """
    d = np.nan_to_num(np.asarray(adv, dtype=np.float64) - np.asarray(clean, dtype=np.float64))
    peak = float(np.abs(d).max()) if d.size else 0.0
    scale = 0.5 / peak if peak > 0 else 1.0
    return 0.5 + d * scale, scale
