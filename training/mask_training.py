"""Mask-robust fine-tuning: train on images with random masks from PatchCleanser's mask set.

PatchCleanser (Xiang, Mahloujifar & Mittal, USENIX Security 2022, Section 5) fine-tunes its
classifiers with Cutout (DeVries & Taylor 2017) with two holes about the mask's size, so that
the one- and two-mask predictions its certificate reads stay right. Here the holes are the
mask set's own rectangles (:func:`guard.detectors.masking.mask_set`): each training image gets
``masks_per_image`` masks drawn uniformly from the set (two: the two-mask images recovery is
certified on; a repeated draw gives a one-mask image), filled as at inference. The greedy
worst-mask variant of Saha et al. ("Revisiting Image Classifier Training for Improved Certified
Robust Defense against Adversarial Patches", TMLR 2023) costs K extra forward passes per image
and is not implemented.

:func:`mask_train` is deterministic for a seed (one generator draws the order, the augmentation
and the masks) and checkpoints after every epoch (:mod:`guard.training.checkpoint`: model,
optimizer, generator state, history); given the same ``checkpoint_dir`` it resumes after the
last finished epoch and ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from guard.core.models import model_device
from guard.core.validation import check_float, check_int, check_labels
from guard.detectors.masking import MaskSet, mask_set, one_mask_predictions
from guard.training.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["MaskTrainConfig", "random_masks", "mask_train", "masked_accuracy"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaskTrainConfig:
    """Settings of :func:`mask_train` (compared on resume: a checkpoint of other settings is refused).

    Attributes:
        patch_size: the patch the mask set covers (side in pixels or area share).
        k: masks per axis.
        fill: the masked pixels' value (the same as at inference).
        masks_per_image: masks drawn per training image.
        epochs / lr / batch_size / weight_decay: SGD with Nesterov momentum 0.9 and a cosine
            learning rate from ``lr`` to 0 over all steps.
        seed: the generator's seed.
    """

    patch_size: int | float = 5
    k: int = 6
    fill: float = 0.5
    masks_per_image: int = 2
    epochs: int = 3
    lr: float = 0.01
    batch_size: int = 128
    weight_decay: float = 5e-4
    seed: int = 0

    def check(self) -> MaskTrainConfig:
        owner = "MaskTrainConfig"
        check_int(self.k, "k", owner, low=1)
        check_float(self.fill, "fill", owner, low=0.0, high=1.0)
        check_int(self.masks_per_image, "masks_per_image", owner, low=1)
        check_int(self.epochs, "epochs", owner, low=1)
        check_float(self.lr, "lr", owner, low=0.0, low_open=True)
        check_int(self.batch_size, "batch_size", owner, low=1)
        check_float(self.weight_decay, "weight_decay", owner, low=0.0)
        check_int(self.seed, "seed", owner)
        return self


def random_masks(masks: MaskSet, n: int, per_image: int, generator: torch.Generator) -> torch.Tensor:
    """Bool (n, 1, H, W) keep-maps: each image under ``per_image`` masks drawn from ``masks``."""
    idx = torch.randint(0, len(masks), (n, per_image), generator=generator)
    return masks.keep()[idx].all(1)


def _as_float(xb: torch.Tensor) -> torch.Tensor:
    return xb.float() / 255 if xb.dtype == torch.uint8 else xb.float()


def _epoch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: MaskTrainConfig,
    masks: MaskSet,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    augment: Callable | None,
    epoch: int,
    per_epoch: int,
    steps: int,
    device: torch.device,
) -> tuple[float, int]:
    """One epoch of SGD on masked images; returns (summed loss, images seen)."""
    model.train()
    perm = torch.randperm(x.shape[0], generator=gen)
    total, seen = 0.0, 0
    for j, i in enumerate(range(0, x.shape[0], config.batch_size)):
        for group in opt.param_groups:
            group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * (epoch * per_epoch + j) / steps))
        idx = perm[i : i + config.batch_size]
        xb = _as_float(x[idx])
        if augment is not None:
            xb = augment(xb, gen)
        keep = random_masks(masks, len(idx), config.masks_per_image, gen)
        xb = torch.where(keep, xb, torch.full_like(xb, config.fill)).to(device)
        loss = F.cross_entropy(model(xb), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
        seen += len(idx)
    return total, seen


def mask_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: MaskTrainConfig = MaskTrainConfig(),
    *,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    checkpoint_dir: str | Path | None = None,
    stop_after: int | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Fine-tune ``model`` in place on masked images; returns the per-epoch history.

    Args:
        model: the classifier (images in [0, 1] -> logits); trained in place, left in eval mode.
        x: training images (N, C, H, W), uint8 (0..255) or float in [0, 1].
        y: their labels.
        config: the settings.
        augment: an augmentation ``(images, generator) -> images`` applied before masking
            (e.g. :func:`guard.demo.crop_flip_augment`).
        checkpoint_dir: write a checkpoint after each epoch there, and resume from it.
        stop_after: end after this many finished epochs (of ``config.epochs``; a test's
            interruption); a later call with the same ``checkpoint_dir`` goes on.
        on_epoch_end: called with each epoch's history entry.
    """
    y = _checked_inputs(model, x, y, config)
    masks = mask_set(tuple(x.shape[-2:]), config.patch_size, config.k)
    device = model_device(model)
    opt = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
    )
    gen = torch.Generator().manual_seed(config.seed)
    per_epoch = math.ceil(x.shape[0] / config.batch_size)
    steps = config.epochs * per_epoch
    settings = {**asdict(config), "n": int(x.shape[0]), "augment": getattr(augment, "__name__", None)}
    done, history = _resume(checkpoint_dir, settings, model, opt, gen)
    last = (
        config.epochs
        if stop_after is None
        else min(config.epochs, done + check_int(stop_after, "stop_after", "mask_train", low=0))
    )
    try:
        for epoch in range(done, last):
            t0 = time.perf_counter()
            with torch.random.fork_rng(devices=[]):
                # dropout draws from the global generator: seeded per epoch (and restored after), so
                # that a resumed run draws what an uninterrupted one does and the caller's state is kept
                torch.manual_seed(config.seed * 1_000_003 + epoch)
                total, seen = _epoch(model, x, y, config, masks, opt, gen, augment, epoch, per_epoch, steps, device)
            entry = {
                "epoch": epoch + 1,
                "train_loss": round(total / seen, 4),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            history.append(entry)
            log.info("mask_train epoch %d: loss %.4f", epoch + 1, total / seen)
            if checkpoint_dir is not None:
                Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
                save_checkpoint(
                    checkpoint_dir,
                    model,
                    opt,
                    {"settings": settings, "epochs_done": epoch + 1, "history": history},
                    extra={"gen_state": gen.get_state()},
                )
            if on_epoch_end is not None:
                on_epoch_end(entry)
    finally:
        model.eval()
    return history


def _checked_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: MaskTrainConfig) -> torch.Tensor:
    """Check the settings, the model and the images; the checked labels."""
    config.check()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not (x.dtype == torch.uint8 or x.is_floating_point()):
        raise TypeError(
            f"x must be images (N, C, H, W), uint8 or float; got {type(x).__name__} "
            f"{tuple(getattr(x, 'shape', ()))} {getattr(x, 'dtype', '')}."
        )
    return check_labels(y, "y", n=int(x.shape[0]))


def _resume(
    checkpoint_dir: str | Path | None,
    settings: dict,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
) -> tuple[int, list[dict]]:
    """(epochs done, history) of the checkpoint in ``checkpoint_dir``, whose states are loaded; (0, []) without one.

    A checkpoint of other settings raises ValueError.
    """
    if checkpoint_dir is None or (ck := load_checkpoint(checkpoint_dir)) is None:
        return 0, []
    model_state, opt_state, extra, meta = ck
    if meta.get("settings") != settings:
        raise ValueError(
            f"the checkpoint in {str(checkpoint_dir)!r} is from a run with other settings ({meta.get('settings')}); "
            f"this run has {settings}: use another checkpoint_dir or delete it."
        )
    model.load_state_dict(model_state)
    opt.load_state_dict(opt_state)
    gen.set_state(extra["gen_state"])
    done, history = int(meta["epochs_done"]), list(meta["history"])
    log.info("mask_train: resumed after epoch %d", done)
    return done, history


def masked_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, masks: MaskSet, *, fill: float = 0.5, batch_size: int = 1024
) -> float:
    """The share of (image, mask) pairs whose one-mask label is right (a quick gauge of mask robustness)."""
    one = one_mask_predictions(model, _as_float(x), masks, fill=fill, batch_size=batch_size)
    return float((one == torch.as_tensor(y).cpu()[:, None]).float().mean())
