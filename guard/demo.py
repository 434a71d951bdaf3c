"""The embedded defaults: their names, data sources, augmentations and demo models.

* ``mnist``: DemoNet (a LeNet-style CNN) trained on the embedded MNIST 8,000 on first use and cached.
* ``cifar10``: a CIFAR ResNet-20 fine-tuned from akamaster's pretrained weights on the 50,000
  JPEG training images (``tools/train_cifar10_resnet20.py``), shipped in ``guard/_data/cifar10``
  with its SHA-256, which loading checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from guard.core.cache import cache_dir, load_tensors, save_tensors
from guard.core.data import DEMO_DATA, DEMO_SEED, DEMO_TEST, DEMO_TRAIN, demo_data, demo_data_digest
from guard.core.models import CifarResNet, DemoNet, accuracy
from guard.training.classifier import train_classifier

__all__ = [
    "DEMOS",
    "cifar10_model",
    "crop_flip_augment",
    "demo_model",
    "demo_model_key",
    "demo_source",
    "demo_augment",
    "shift_augment",
]

#: The embedded defaults, by name.
DEMOS: tuple[str, ...] = ("mnist", "cifar10")


def _check_demo(name: str) -> str:
    if not isinstance(name, str) or name not in DEMOS:
        raise ValueError(f"unknown demo {name!r}; expected one of {', '.join(DEMOS)}.")
    return name


def demo_source(name: str = "mnist") -> str:
    """Where the embedded data of demo ``name`` comes from (for report.json)."""
    return f"{DEMO_DATA[_check_demo(name)]['source']}, seed-{DEMO_SEED} split {DEMO_TRAIN}/{DEMO_TEST}"


log = logging.getLogger(__name__)

_TRAIN = {"epochs": 12, "batch_size": 64, "lr": 3e-3, "augment": "shift2"}


def shift_augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (zero padding), per image."""
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = dy.view(n, 1) + torch.arange(h).view(1, h)  # (n, h)
    cols = dx.view(n, 1) + torch.arange(w).view(1, w)  # (n, w)
    idx_n = torch.arange(n).view(n, 1, 1)
    return pad[idx_n, :, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2).contiguous()


def crop_flip_augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """A random crop of the ``pad``-pixel zero-padded image and a random horizontal flip, per image
    (the CIFAR-10 training augmentation of He et al. 2016)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad,) * 4)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = dy[:, None] + torch.arange(h)[None]
    cols = dx[:, None] + torch.arange(w)[None]
    out = padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out.contiguous()


def demo_augment(name: str | None) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None:
    """The augmentation the demo model of ``name`` was trained with (None for a user's data)."""
    return {"mnist": shift_augment, "cifar10": crop_flip_augment}.get(name or "")


def demo_model_key(seed: int = DEMO_SEED) -> str:
    """Hash of architecture + data + seed + training settings: the cache key."""
    arch = repr(DemoNet())
    blob = json.dumps(
        {
            "arch": arch,
            "data": demo_data_digest(),
            "seed": seed,
            "train": _TRAIN,
            "torch": torch.__version__.split("+")[0],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def demo_model(
    name: str = "mnist",
    *,
    variant: str | None = "standard",
    seed: int = DEMO_SEED,
    cache: bool = True,
    train_if_missing: bool = True,
    progress: bool = True,
) -> nn.Module:
    """The demo classifier of an embedded default, loaded from the cache or trained.

    ``"mnist"``: DemoNet, trained on first use (about half a minute on 2 cores) and cached.
    ``"cifar10"``: the shipped ResNet-20 (:func:`cifar10_model`; ``seed``, ``cache`` and
    ``train_if_missing`` do not apply).

    Args:
        name: the embedded default (:data:`DEMOS`).
        variant: ``"standard"``; for ``"cifar10"`` also ``"robust"`` (the ResNet-20 adversarially
            fine-tuned, a :class:`~guard.training.RejectClassifier` with 11 outputs, index 10 =
            reject) or ``"masked"`` (the ResNet-20 fine-tuned with PatchCleanser's masks,
            :data:`CIFAR10_MASKED`), each file checked against its recorded SHA-256
            (:data:`DEMO_VARIANTS`).
        seed: training seed (part of the cache key).
        cache: read and write ``cache_dir()/demo/demonet-<key>.safetensors``.
        train_if_missing: train when not cached; otherwise raise ValueError.
        progress: show a progress bar while training.

    Returns:
        A DemoNet in eval mode; ``model.guard_meta`` holds the cache path and whether it was
        a cache hit.
    """
    if _check_demo(name) == "cifar10":
        return cifar10_model(variant=variant)
    if variant not in (None, "standard"):
        raise ValueError(
            f"The 'variant' parameter of demo_model must be one of {list(DEMO_VARIANTS[name])} for {name!r}. "
            f"Got {variant!r}."
        )
    key = demo_model_key(seed)
    path = cache_dir() / "demo" / f"demonet-{key}.safetensors"
    model = DemoNet()
    if cache and path.is_file():
        try:
            tensors, meta = load_tensors(path)
            model.load_state_dict(tensors)
        except (ValueError, RuntimeError) as err:  # damaged or foreign file: retrain over it
            warnings.warn(
                f"demo model cache {str(path)!r} is unreadable ({err}); retraining.", RuntimeWarning, stacklevel=2
            )
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
    train_classifier(
        model,
        train.x,
        train.y,
        epochs=_TRAIN["epochs"],
        batch_size=_TRAIN["batch_size"],
        lr=_TRAIN["lr"],
        seed=seed,
        augment=shift_augment,
        progress=progress,
    )
    model.eval()
    meta = {"key": key, "seed": seed, "test_accuracy": accuracy(model, test.x, test.y), **_TRAIN}
    if cache:
        save_tensors(path, model.state_dict(), meta)
    model.guard_meta = {"cache_path": str(path), "cache_hit": False, **meta}  # type: ignore[attr-defined]
    return model


#: The shipped variants of each demo model, by the stem of their files in ``guard/_data/NAME``.
DEMO_VARIANTS: dict[str, dict[str, str]] = {
    "mnist": {"standard": ""},
    "cifar10": {"standard": "resnet20", "robust": "resnet20-robust", "masked": "resnet20_masked"},
}

#: The mask-trained variant's file stem (``tools/train_cifar10_masked.py``; PatchCleanser's Cutout-style training).
CIFAR10_MASKED = DEMO_VARIANTS["cifar10"]["masked"]


def cifar10_model(folder: str | Path | None = None, *, variant: str | None = "standard") -> nn.Module:
    """The shipped CIFAR-10 ResNet-20 (or a variant of it), its file checked against the SHA-256 recorded when it was trained.

    Args:
        folder: where ``resnet20.safetensors`` and ``resnet20.json`` are (default: the package's data).
        variant: ``"standard"`` (a :class:`CifarResNet`), ``"masked"`` (``resnet20_masked.*``, fine-tuned
            with PatchCleanser's masks for certified patch defence, a :class:`CifarResNet`; its record:
            benchmarks/results/cifar10-resnet20-masked-3ep) or ``"robust"`` (a
            :class:`~guard.training.RejectClassifier` around the standard one, ``resnet20-robust.*``).

    Raises:
        ValueError: an unknown variant, the weights file is missing, or its hash does not match its record.
    """
    from importlib import resources

    variant = "standard" if variant is None else variant
    stems = DEMO_VARIANTS["cifar10"]
    if variant not in stems:
        raise ValueError(
            f"The 'variant' parameter of demo_model must be one of {list(stems)} for 'cifar10'. Got {variant!r}."
        )
    folder = Path(folder) if folder is not None else Path(str(resources.files("guard") / "_data" / "cifar10"))
    if variant == "robust":
        return _cifar10_variant(folder, stems[variant])
    stem = stems[variant]
    record_path, path = folder / f"{stem}.json", folder / f"{stem}.safetensors"
    if not record_path.is_file() or not path.is_file():
        raise ValueError(
            f"the CIFAR-10 demo weights are missing from {str(folder)!r} ({stem}.safetensors and {stem}.json); "
            f"reinstall guard or train them with tools/{'train_cifar10_masked' if variant == 'masked' else 'train_cifar10_resnet20'}.py."
        )
    record = json.loads(record_path.read_text())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != record.get("sha256"):
        raise ValueError(
            f"{str(path)!r} does not match its recorded SHA-256 ({record.get('sha256')}, file {digest}): "
            "the weights are damaged or were replaced."
        )
    tensors, _ = load_tensors(path)
    model = CifarResNet(20)
    model.load_state_dict(tensors)
    model.eval()
    model.guard_meta = {
        "cache_path": str(path),
        "cache_hit": True,
        "sha256": digest,  # type: ignore[attr-defined]
        "test_accuracy": record.get("test_accuracy"),
        "command": record.get("command"),
    }
    return model


def _cifar10_variant(folder: Path, stem: str) -> nn.Module:
    """A RejectClassifier variant of the CIFAR-10 ResNet-20 (``STEM.safetensors`` + ``STEM.json``), hash checked."""
    from guard.training import RejectClassifier

    record_path, path = folder / f"{stem}.json", folder / f"{stem}.safetensors"
    if not record_path.is_file() or not path.is_file():
        raise ValueError(
            f"the CIFAR-10 variant weights {stem}.safetensors / {stem}.json are missing from {str(folder)!r}; "
            "train them with tools/train_cifar10_robust.py (see its docstring)."
        )
    record = json.loads(record_path.read_text())
    model = RejectClassifier.load(path, cifar10_model(folder), expected_sha256=record.get("sha256"))
    model.guard_meta = {
        "cache_path": str(path),
        "sha256": record.get("sha256"),  # type: ignore[attr-defined]
        "test_accuracy": record.get("test_accuracy"),
        "command": record.get("command"),
    }
    return model
