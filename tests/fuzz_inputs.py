"""Hypothesis strategies for bad input, and the contract they are judged by (shared by test_fuzz).

:func:`images` draws what a caller might pass as images: every dtype, rank, batch size (empty
and one-element included), NaN/inf, huge, tiny and subnormal values, values just outside
[0, 1], non-contiguous, channels-last and stride-0 tensors, the meta device, and things that
are not tensors at all. :func:`valid_images` is the documented contract (README: float NCHW in
[0, 1], finite, non-empty, on a device with data); :func:`attempt` runs an entry point and
checks it: a valid input must give a result, an invalid one a ValueError/TypeError, and any
other exception type, or an invalid input accepted, fails the test. Every outcome is counted
in :data:`FIGURES`.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FIGURES: Counter = Counter()  # (entry point, outcome) -> cases

FLOATS = (torch.float32, torch.float16, torch.float64, torch.bfloat16)
DTYPES = (torch.float32,) * 6 + FLOATS[1:] + (torch.uint8, torch.int64, torch.bool, torch.complex64)
FILLS = ("uniform",) * 6 + (
    "zeros",
    "ones",
    "nan",
    "one_nan",
    "inf",
    "-inf",
    "huge",
    "tiny",
    "subnormal",
    "negzero",
    "above1",
    "below0",
)
LAYOUTS = ("contiguous",) * 3 + ("noncontig", "channels_last", "expanded", "transposed")


def fuzz_settings(n: int) -> settings:
    """``n`` examples, no deadline, no example database (the runs are the same every time)."""
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=True,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def _values(shape: tuple[int, ...], fill: str, gen: torch.Generator) -> torch.Tensor:
    v = torch.rand(shape, generator=gen, dtype=torch.float64)
    special = {
        "zeros": 0.0,
        "ones": 1.0,
        "nan": float("nan"),
        "inf": float("inf"),
        "-inf": float("-inf"),
        "huge": 1e30,
        "tiny": 1e-30,
        "subnormal": 1e-45,
        "negzero": -0.0,
    }
    if fill in special:
        v = torch.full(shape, special[fill], dtype=torch.float64)
    elif fill == "one_nan" and v.numel():
        v.view(-1)[v.numel() // 2] = float("nan")
    elif fill == "above1" and v.numel():
        v.view(-1)[0] = 1.0 + 1e-3
    elif fill == "below0" and v.numel():
        v.view(-1)[-1] = -1e-3
    return v


def _cast(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype in FLOATS or dtype == torch.complex64:
        return v.to(dtype)
    finite = torch.nan_to_num(v, nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
    return (finite > 0.5) if dtype == torch.bool else (finite * 255).to(dtype)


@st.composite
def images(draw: Any, *, n: Any = None, chw: tuple[int, int, int] = (1, 28, 28), tensors_only: bool = False) -> Any:
    """Images a caller might pass (mostly near-valid tensors for a model taking ``chw``)."""
    kind = (
        "tensor"
        if tensors_only
        else draw(st.sampled_from(("tensor",) * 14 + ("numpy", "list", "none", "str", "scalar")))
    )
    if kind == "none":
        return None
    if kind == "str":
        return draw(st.sampled_from(["", "x", "/nonexistent/images"]))
    if kind == "scalar":
        return draw(st.sampled_from([0, 1.0, float("nan"), True]))
    # a third of the tensors are valid, in every harmless variation (dtype, layout, batch of one, edge values),
    # so that the correct-result checks run as often as the refusal checks
    benign = draw(st.sampled_from((True, False, False)))
    batch = (
        draw(st.sampled_from((1, 2, 3, 5) if benign else (1, 2, 3, 5, 0, 1)))
        if n is None
        else draw(n)
        if isinstance(n, st.SearchStrategy)
        else n
    )
    rank = 4 if benign else draw(st.sampled_from((4,) * 8 + (2, 3, 5)))
    c = chw[0] if benign else draw(st.sampled_from((chw[0],) * 8 + (0, 3 if chw[0] != 3 else 1)))
    hw = (
        (chw[1], chw[2])
        if benign
        else draw(st.sampled_from(((chw[1], chw[2]),) * 8 + ((0, chw[2]), (1, 1), (5, 5), (chw[1], chw[2] - 1))))
    )
    shape = {4: (batch, c, *hw), 2: (batch, c * hw[0] * hw[1]), 3: (c, *hw), 5: (batch, c, 1, *hw)}[rank]
    dtype = draw(st.sampled_from(FLOATS if benign else DTYPES))
    fill = draw(
        st.sampled_from(("uniform",) * 4 + ("zeros", "ones", "tiny", "subnormal", "negzero") if benign else FILLS)
    )
    layout = draw(st.sampled_from(LAYOUTS))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if not benign and draw(st.sampled_from((False,) * 11 + (True,))):
        x = torch.empty(shape, dtype=dtype, device="meta")
    elif layout == "noncontig" and len(shape):
        x = _cast(_values((*shape[:-1], shape[-1] * 2), fill, gen), dtype)[..., ::2]
    elif layout == "channels_last" and len(shape) == 4:
        x = _cast(_values(shape, fill, gen), dtype).contiguous(memory_format=torch.channels_last)
    elif layout == "expanded" and len(shape) >= 2 and shape[0] >= 1:
        x = _cast(_values((1, *shape[1:]), fill, gen), dtype).expand(*shape)
    elif layout == "transposed" and len(shape) >= 2:
        x = _cast(_values((*shape[:-2], shape[-1], shape[-2]), fill, gen), dtype).transpose(-1, -2)
    else:
        x = _cast(_values(shape, fill, gen), dtype)
    if x.is_floating_point() and not x.is_meta and draw(st.sampled_from((False,) * 5 + (True,))):
        x = x.detach().requires_grad_(True)
    if kind == "numpy":
        return x.detach().numpy() if not x.is_meta and x.dtype != torch.bfloat16 else x
    if kind == "list":
        return x.detach().tolist() if not x.is_meta else x
    return x


def valid_images(x: Any, chw: tuple[int, int, int] | None = (1, 28, 28)) -> bool:
    """The documented contract: a float tensor NCHW (C, H, W = ``chw`` when given), non-empty, finite, in [0, 1], with data."""
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOATS or x.dim() != 4 or x.shape[0] == 0 or x.is_meta:
        return False
    if min(x.shape[1:]) == 0 or (chw is not None and tuple(x.shape[1:]) != tuple(chw)):
        return False
    v = x.detach().double()
    return bool(torch.isfinite(v).all()) and float(v.min()) >= 0.0 and float(v.max()) <= 1.0


@st.composite
def labels(draw: Any, n: int, classes: int = 10) -> Any:
    """Labels for ``n`` images: None, valid ones, or one of the ways they go wrong."""
    kind = draw(
        st.sampled_from(
            ("none",) * 3
            + ("valid",) * 5
            + ("int32", "high", "negative", "short", "float", "2d", "bool", "meta", "list")
        )
    )
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    y = torch.randint(0, classes, (n,), generator=gen)
    wrong_length = y[:-1] if n else torch.zeros(1, dtype=torch.long)
    return {
        "none": None,
        "valid": y,
        "int32": y.int(),
        "high": y + classes,
        "negative": y - classes,
        "short": wrong_length,
        "float": y.float(),
        "2d": y[:, None],
        "bool": y > 4,
        "meta": torch.empty(n, dtype=torch.long, device="meta"),
        "list": y.tolist(),
    }[kind]


def valid_labels(y: Any, n: int, classes: int | None = 10) -> bool:
    """Labels for ``n`` images: None, or int (N,) in [0, classes) (``classes`` None: any index >= 0)."""
    if y is None:
        return True
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.is_meta:
        return False
    return (
        y.dim() == 1
        and y.shape[0] == n
        and (n == 0 or (int(y.min()) >= 0 and (classes is None or int(y.max()) < classes)))
    )


class Hang(Exception):
    """An entry point ran past its time limit."""


@contextmanager
def time_limit(seconds: float):
    """Fail a case that hangs (SIGALRM; the main thread on POSIX)."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def attempt(entry: str, fn: Callable[[], Any], valid: bool | None, *, seconds: float = 30.0) -> Any:
    """Run ``fn``; ``valid`` True: it must answer; False: it must raise ValueError/TypeError; None: either.

    Returns the result (None when it raised). Other exception types propagate (the test fails).
    """
    try:
        with time_limit(seconds):
            result = fn()
    except (ValueError, TypeError) as err:
        FIGURES[(entry, type(err).__name__)] += 1
        if valid:
            raise AssertionError(f"{entry}: a valid input was refused: {type(err).__name__}: {err}") from err
        return None
    FIGURES[(entry, "ok")] += 1
    if valid is False:
        raise AssertionError(f"{entry}: an invalid input was accepted (it must raise ValueError/TypeError)")
    return result


def as_numpy_input(x: Any) -> Any:
    """The same images as a numpy array where that is possible (onnxruntime's own input type)."""
    if isinstance(x, torch.Tensor) and not x.is_meta and x.dtype != torch.bfloat16:
        return x.detach().numpy()
    return x


def numpy_valid(x: Any, chw: tuple[int, int, int]) -> bool:
    """The serving contract of GuardSession.run: float numpy/torch (N, *chw), finite, in [0, 1]."""
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating) or x.ndim != 4 or x.shape[0] == 0 or tuple(x.shape[1:]) != chw:
            return False
        v = x.astype(np.float64)
        return bool(np.isfinite(v).all()) and float(v.min()) >= 0.0 and float(v.max()) <= 1.0
    return valid_images(x, chw)
