"""Pieces every training loop of :mod:`guard.training` shares: seeds, train mode with frozen parts, DDP wrapping."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["mix_seed", "train_mode", "ddp_wrap"]


def mix_seed(*parts: int) -> int:
    """One 40-bit seed from integer parts (seed, round, epoch, ...), the same on every process."""
    s = 0x9E3779B1
    for p in parts:
        s = (s * 1_000_003 + int(p) + 1) % (2**40)
    return s


def train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    """``model.train()`` except the modules in ``frozen``, which stay in eval mode (their BatchNorm statistics keep)."""
    model.train()
    for m in frozen:
        m.training = False  # this module only: eval() would recurse into trainable children


def ddp_wrap(net: nn.Module, size: int, device: torch.device) -> nn.Module:
    """``net`` itself with one process, else a DistributedDataParallel around it."""
    if size == 1:
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
