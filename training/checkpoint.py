"""Atomic, pickle-free checkpoints of a hardening run (model, optimizer, reject archive, progress).

One file, ``<dir>/harden_state.safetensors``, rewritten atomically (temp file + ``os.replace``
through :func:`guard.core.cache.save_tensors`) after the attack phase of a round, after every
fine-tuning epoch and at the end of every round. Tensors: the model's state dict under
``model.``, the optimizer's per-parameter state under ``opt.<index>.<key>``, and any extra
tensors (the reject archive, the current round's attack set) under ``extra.``. The JSON
metadata holds the optimizer's param groups and non-tensor state, the round/epoch reached,
the per-round history and the run's configuration (compared on resume).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from guard.core.cache import load_tensors, save_tensors

__all__ = [
    "CheckpointMismatch",
    "CHECKPOINT_NAME",
    "checkpoint_path",
    "save_checkpoint",
    "load_checkpoint",
    "optimizer_to_tensors",
    "optimizer_from_tensors",
]

CHECKPOINT_NAME = "harden_state.safetensors"


class CheckpointMismatch(ValueError):
    """The checkpoint in ``checkpoint_dir`` belongs to another run (settings, model or data differ)."""


def checkpoint_path(directory: str | os.PathLike[str]) -> Path:
    return Path(directory) / CHECKPOINT_NAME


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and JSON-friendly metadata."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Rebuild a state dict for ``optimizer.load_state_dict`` from :func:`optimizer_to_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("opt."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    meta: dict[str, Any],
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the checkpoint atomically and return its path."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    full_meta = dict(meta)
    if optimizer is not None:
        opt_t, opt_meta = optimizer_to_tensors(optimizer)
        tensors.update(opt_t)
        full_meta["optimizer"] = opt_meta
    for k, v in (extra or {}).items():
        tensors[f"extra.{k}"] = v
    path = checkpoint_path(directory)
    save_tensors(path, tensors, full_meta)
    return path


def load_checkpoint(
    directory: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, torch.Tensor], dict[str, Any]] | None:
    """``(model_state, optimizer_state_or_None, extra, meta)``, or None when there is no checkpoint.

    A damaged file raises ValueError (from :func:`guard.core.cache.load_tensors`).
    """
    path = checkpoint_path(directory)
    if not path.is_file():
        return None
    tensors, meta = load_tensors(path)
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
    opt_state = optimizer_from_tensors(tensors, meta["optimizer"]) if "optimizer" in meta else None
    return model_state, opt_state, extra, meta
