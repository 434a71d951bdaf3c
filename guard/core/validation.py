"""Input checks shared by every package.

Every public function in guard takes images as float NCHW tensors in [0, 1]. These helpers turn
a wrong input into one clear ``ValueError``/``TypeError`` that names the argument, what was
expected and what came, instead of a crash deep inside torch or a silently wrong answer.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

__all__ = [
    "NotFittedError",
    "check_images",
    "check_labels",
    "check_int",
    "check_float",
    "check_probability",
    "call_model",
    "check_model_and_shape",
    "check_device",
    "check_logits",
]


class NotFittedError(ValueError, AttributeError):
    """Raised when a detector or attack is used before ``fit``.

    Subclasses ValueError and AttributeError like scikit-learn's NotFittedError, so callers that
    catch either keep working.
    """


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__}"


def check_images(
    x: Any,
    name: str = "x",
    *,
    channels: int | None = None,
    allow_empty: bool = False,
    check_range: bool = True,
) -> torch.Tensor:
    """Validate a batch of images: a floating tensor, NCHW, finite, in [0, 1], non-empty.

    Args:
        x: the images.
        name: the argument's name, used in the error message.
        channels: if given, the required channel count.
        allow_empty: accept a batch of zero images.
        check_range: check that values lie in [0, 1] (pixel space).

    Returns:
        ``x`` itself (no copy), so the call can be used inline.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of float images NCHW in [0, 1]; got {_describe(x)}.")
    if not x.is_floating_point():
        hint = " (divide uint8 images by 255)" if x.dtype == torch.uint8 else ""
        raise TypeError(f"{name} must be a floating-point tensor in [0, 1]; got dtype {x.dtype}{hint}.")
    if x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor (N, C, H, W); got shape {tuple(x.shape)}.")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} must hold at least one image; got an empty batch of shape {tuple(x.shape)}.")
    if min(x.shape[1:]) == 0:
        raise ValueError(
            f"{name} must have at least one channel, row and column (N, C, H, W); got shape {tuple(x.shape)}."
        )
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channel(s); got {x.shape[1]} (shape {tuple(x.shape)}).")
    if x.is_meta:
        raise ValueError(f"{name} is on the meta device (a tensor without data); expected images on 'cpu' or 'cuda'.")
    if x.numel() == 0:
        return x
    xd = x.detach()
    if not bool(torch.isfinite(xd).all()):
        bad = int((~torch.isfinite(xd)).sum())
        raise ValueError(f"{name} must be finite; got {bad} NaN/inf value(s).")
    if check_range:
        lo, hi = float(xd.min()), float(xd.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"{name} must lie in [0, 1] (pixel space; normalise inside the model); got values in [{lo:.4g}, {hi:.4g}]."
            )
    return x


def check_labels(
    y: Any, name: str = "y", *, n: int | None = None, num_classes: int | None = None, allow_negative: bool = False
) -> torch.Tensor:
    """Validate integer class labels of shape (N,): non-negative (unless ``allow_negative``), below ``num_classes``."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 labels; got {_describe(y)}.")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels; got dtype {y.dtype}.")
    if y.dim() != 1:
        raise ValueError(f"{name} must be 1-D (N,); got shape {tuple(y.shape)}.")
    if n is not None and y.shape[0] != n:
        raise ValueError(f"{name} must have {n} entries (one per image); got {y.shape[0]}.")
    if y.is_meta:
        raise ValueError(f"{name} is on the meta device (a tensor without data); expected labels on 'cpu' or 'cuda'.")
    if y.numel() and not allow_negative and int(y.min()) < 0:
        raise ValueError(f"{name} must hold class indices >= 0; got a minimum of {int(y.min())}.")
    if num_classes is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes - 1}] (the model has {num_classes} outputs); got values in "
            f"[{int(y.min())}, {int(y.max())}]."
        )
    return y.long()


def check_logits(logits: Any, name: str = "the model's output", *, n: int | None = None) -> torch.Tensor:
    """Logits must be a float (N, C) tensor with C >= 1 (N = ``n`` when given) and finite."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"{name} must be a float tensor of logits (N, C); got {_describe(logits)}.")
    if logits.dim() != 2 or logits.shape[1] < 1 or (n is not None and logits.shape[0] != n):
        want = f"({n}, C)" if n is not None else "(N, C)"
        raise ValueError(f"{name} must be logits of shape {want}; got shape {tuple(logits.shape)}.")
    if not bool(torch.isfinite(logits.detach()).all()):
        raise ValueError(
            f"{name} holds NaN/inf logits; the model cannot be attacked or scored meaningfully on these inputs."
        )
    return logits


def check_device(device: Any, name: str = "device") -> torch.device:
    """A torch device that exists here: a parsable name, CUDA only when available, never 'meta'."""
    if isinstance(device, bool) or not isinstance(device, (str, torch.device)):
        raise TypeError(f"{name} must be a device name such as 'cpu' or 'cuda'; got {type(device).__name__}.")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"{name} must be a device name such as 'cpu', 'cuda' or 'cuda:1'; got {device!r}.") from err
    if dev.type == "meta":
        raise ValueError(f"{name} must hold data; got the meta device.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={device!r}: CUDA is not available on this machine; use 'cpu'.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}={device!r}: there are only {torch.cuda.device_count()} CUDA device(s).")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"{name} must be 'cpu' or 'cuda' (or 'mps', 'xpu'); got {device!r}.")
    return dev


def check_int(value: Any, name: str, owner: str, *, low: int | None = None, high: int | None = None) -> int:
    """Check an int parameter with scikit-learn's uniform message."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and low is not None and value < low:
        ok = False
    if ok and high is not None and value > high:
        ok = False
    if not ok:
        bound = " and ".join(
            b for b in (f">= {low}" if low is not None else "", f"<= {high}" if high is not None else "") if b
        )
        raise ValueError(
            f"The '{name}' parameter of {owner} must be an int{(' ' + bound) if bound else ''}. Got {value!r}."
        )
    return int(value)


def check_float(
    value: Any,
    name: str,
    owner: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Check a finite real parameter within bounds ("(" / ")" for open ends)."""
    ok = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and value == value
        and abs(float(value)) != float("inf")
    )
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        rng = f" in {lo}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{hi}"
        raise ValueError(f"The '{name}' parameter of {owner} must be a finite float{rng}. Got {value!r}.")
    return float(value)


def check_probability(value: Any, name: str, owner: str) -> float:
    """A float strictly inside (0, 1)."""
    return check_float(value, name, owner, low=0.0, high=1.0, low_open=True, high_open=True)


def call_model(model: Any, x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """``model(x)``, turning a shape/dtype mismatch inside torch into a clear ValueError.

    A model built for 1-channel 28x28 images fed 3-channel or 32x32 ones fails deep inside a
    conv or linear layer; the message then names the argument and the shape that came.
    """
    try:
        return model(x)
    except RuntimeError as err:
        text = str(err)
        if any(k in text for k in ("shape", "size", "channels", "dimension", "mat1", "expected input")):
            raise ValueError(
                f"the model cannot take {name} of shape {tuple(x.shape)} (check channels and image size): {text.splitlines()[0]}"
            ) from err
        raise


def check_model_and_shape(model: Any, shape: Any) -> tuple[int, int, int]:
    """For generators that need no input image: an nn.Module and an image shape (C, H, W)."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    if (
        not isinstance(shape, (tuple, list))
        or len(shape) != 3
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape)
    ):
        raise ValueError(f"shape must be (C, H, W) of positive ints; got {shape!r}.")
    return (int(shape[0]), int(shape[1]), int(shape[2]))
