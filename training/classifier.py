"""Plain supervised training of a classifier on tensors (the demo model, hardening rounds)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from guard.core.models import accuracy, model_device
from guard.core.validation import check_float, check_images, check_int, check_labels

__all__ = ["train_classifier", "accuracy"]

log = logging.getLogger(__name__)


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[int, nn.Module, torch.optim.Optimizer], None] | None = None,
) -> nn.Module:
    """Train ``model`` in place with Adam and cross-entropy; deterministic for a given seed.

    A cosine learning-rate schedule over all steps. ``on_epoch_end(epoch, model, optimizer)``
    is where callers checkpoint.
    """
    check_images(x, "x")
    y = check_labels(y, "y", n=int(x.shape[0]))
    epochs = check_int(epochs, "epochs", "train_classifier", low=1)
    batch_size = check_int(batch_size, "batch_size", "train_classifier", low=1)
    lr = check_float(lr, "lr", "train_classifier", low=0.0, low_open=True)
    gen = torch.Generator().manual_seed(seed)
    device = model_device(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((x.shape[0] + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    was_training = model.training
    model.train()
    try:
        for epoch in tqdm(range(epochs), desc="train", unit="epoch", disable=not progress, leave=False):
            perm = torch.randperm(x.shape[0], generator=gen)
            total, n = 0.0, 0
            for i in range(0, x.shape[0], batch_size):
                idx = perm[i : i + batch_size]
                xb, yb = x[idx], y[idx]
                if augment is not None:
                    xb = augment(xb, gen)
                xb, yb = xb.to(device), yb.to(device)
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                n += len(idx)
            log.debug("epoch %d loss %.4f", epoch, total / n)
            if on_epoch_end is not None:
                on_epoch_end(epoch, model, opt)
    finally:
        model.train(was_training)
    return model
