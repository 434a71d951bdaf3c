"""The embedded defaults: their names, data sources, augmentations and demo models.

``mnist``: DemoNet (a LeNet-style CNN) trained on the embedded MNIST 8,000 on first use and cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from guard.core.cache import cache_dir, load_tensors, save_tensors
from guard.core.data import DEMO_SEED, demo_data, demo_data_digest
from guard.core.models import DemoNet, accuracy
from guard.training.classifier import train_classifier

__all__ = ["DEMOS", "demo_model", "demo_model_key", "demo_source", "demo_augment", "shift_augment"]

#: The embedded defaults, by name.
DEMOS: tuple[str, ...] = ("mnist",)

_SOURCES = {"mnist": "embedded MNIST test split (LeCun, Cortes, Burges; CC BY-SA 3.0), seed-0 split 8000/2000"}


def _check_demo(name: str) -> str:
    if not isinstance(name, str) or name not in DEMOS:
        raise ValueError(f"unknown demo {name!r}; expected one of {', '.join(DEMOS)}.")
    return name


def demo_source(name: str = "mnist") -> str:
    """Where the embedded data of demo ``name`` comes from (for report.json)."""
    return _SOURCES[_check_demo(name)]

log = logging.getLogger(__name__)

_TRAIN = {"epochs": 12, "batch_size": 64, "lr": 3e-3, "augment": "shift2"}


def shift_augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (zero padding), per image."""
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # (n, h)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # (n, w)
    idx_n = torch.arange(n).view(n, 1, 1)
    return pad[idx_n, :, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2).contiguous()


def demo_augment(name: str | None) -> "Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None":
    """The augmentation the demo model of ``name`` was trained with (None for a user's data)."""
    return shift_augment if name == "mnist" else None


def demo_model_key(seed: int = DEMO_SEED) -> str:
    """Hash of architecture + data + seed + training settings: the cache key."""
    arch = repr(DemoNet())
    blob = json.dumps({"arch": arch, "data": demo_data_digest(), "seed": seed, "train": _TRAIN, "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def demo_model(name: str = "mnist", *, seed: int = DEMO_SEED, cache: bool = True, train_if_missing: bool = True,
               progress: bool = True) -> DemoNet:
    """The demo classifier of an embedded default, loaded from the cache or trained.

    ``"mnist"``: DemoNet, trained on first use (about half a minute on 2 cores) and cached.

    Args:
        name: the embedded default (:data:`DEMOS`).
        seed: training seed (part of the cache key).
        cache: read and write ``cache_dir()/demo/demonet-<key>.safetensors``.
        train_if_missing: train when not cached; otherwise raise ValueError.
        progress: show a progress bar while training.

    Returns:
        A DemoNet in eval mode; ``model.guard_meta`` holds the cache path and whether it was
        a cache hit.
    """
    _check_demo(name)
    key = demo_model_key(seed)
    path = cache_dir() / "demo" / f"demonet-{key}.safetensors"
    model = DemoNet()
    if cache and path.is_file():
        try:
            tensors, meta = load_tensors(path)
            model.load_state_dict(tensors)
        except (ValueError, RuntimeError) as err:  # damaged or foreign file: retrain over it
            warnings.warn(f"demo model cache {str(path)!r} is unreadable ({err}); retraining.", RuntimeWarning, stacklevel=2)
        else:
            model.eval()
            model.guard_meta = {"cache_path": str(path), "cache_hit": True, **meta}  # type: ignore[attr-defined]
            return model
    if not train_if_missing:
        raise ValueError(f"demo model not cached at {str(path)!r} and train_if_missing=False.")
    train, test = demo_data()
    torch.manual_seed(seed)
    model = DemoNet()
    log.info("training the demo model (cache miss: %s)", path)
    train_classifier(model, train.x, train.y, epochs=_TRAIN["epochs"], batch_size=_TRAIN["batch_size"],
                     lr=_TRAIN["lr"], seed=seed, augment=shift_augment, progress=progress)
    model.eval()
    meta = {"key": key, "seed": seed, "test_accuracy": accuracy(model, test.x, test.y), **_TRAIN}
    if cache:
        save_tensors(path, model.state_dict(), meta)
    model.guard_meta = {"cache_path": str(path), "cache_hit": False, **meta}  # type: ignore[attr-defined]
    return model
