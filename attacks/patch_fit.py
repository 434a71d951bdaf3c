"""The one training loop of the learned patch attacks (PatchGAN and UniversalPatch).

Both attacks optimise something that makes patches (a generator, or the pixels of one patch)
against a frozen classifier, with a random position per image per step, and stop early on the
fooling rate of a held-out slice of the *fit* data. What differs is only how a batch's loss is
computed and what gets optimised, so each attack hands this loop a :class:`PatchSource`; the
split, the optimiser steps, the validation checks, early stopping, the wall-clock budget, the
best-so-far snapshot and the progress bar live here once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from guard.attacks.patching import apply_patches
from guard.core.models import eval_mode, predict_labels

__all__ = ["PatchSource", "PatchFit", "fit_patch_source"]


class PatchSource(Protocol):
    """What the loop needs from the thing being trained."""

    def init(self, gen: torch.Generator) -> None:
        """Draw the initial state (if it is random) from the loop's generator, after the split."""

    def parameters(self) -> list[torch.Tensor]:
        """The tensors the optimiser updates."""

    def batch_loss(
        self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        """(loss to minimise, logits of the patched batch, the labels those logits answer, scalars to log)."""

    def validation_draw(self, n: int, gen: torch.Generator) -> tuple[Any, torch.Tensor]:
        """(whatever the patches are made from, e.g. latents; positions) for ``n`` validation
        images; drawn once, then kept fixed so that the checks are comparable."""

    def current_patches(self, draw: Any) -> torch.Tensor:
        """The patches of the current state for the fixed validation draw (no gradient)."""

    def after_step(self) -> None:
        """Called after every optimiser step (e.g. project a patch back to [0, 1])."""

    def snapshot(self) -> Any:
        """A copy of the current state (kept when it is the best so far)."""

    def restore(self, state: Any) -> None:
        """Go back to a snapshot."""


@dataclass
class PatchFit:
    """What the loop did: the best validation goal rate, the checks, the steps taken, seconds."""

    best_rate: float
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def fit_patch_source(
    model: nn.Module,
    x: torch.Tensor,
    source: PatchSource,
    make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    *,
    goal: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
    batch_size: int,
    val_fraction: float,
    eval_every: int,
    patience: int,
    max_seconds: float | None,
    seed: int,
    progress: bool,
    desc: str,
    val_batch: int = 500,
) -> PatchFit:
    """Train ``source`` against ``model`` on the images ``x`` (already on the model's device).

    Args:
        make_optimizer: builds the optimiser over ``source.parameters()`` (after ``source.init``).
        goal: ``goal(pred, y) -> bool[N]``: the attack's success (untargeted: a label other
            than the clean one; targeted: the target).
        val_fraction: share of ``x`` held out for the validation checks (at least one image
            stays for training).
        eval_every / patience: a check every ``eval_every`` steps; stop after ``patience``
            checks without improvement, or at a validation rate of 1. The best state is kept.
        max_seconds: optional wall-clock budget.

    Returns:
        :class:`PatchFit`; ``source`` is left in its best state.
    """
    gen = torch.Generator().manual_seed(seed)
    n_all = int(x.shape[0])
    perm = torch.randperm(n_all, generator=gen)
    n_val = min(int(round(val_fraction * n_all)), n_all - 1) if n_all > 1 else 0
    x_val, x_tr = x[perm[:n_val]], x[perm[n_val:]]
    source.init(gen)
    params = source.parameters()
    optimizer = make_optimizer(params)
    fit = PatchFit(best_rate=-1.0)
    t0 = time.perf_counter()
    with eval_mode(model):
        y_tr = predict_labels(model, x_tr)
        y_val = predict_labels(model, x_val) if n_val else None
        draw, positions = source.validation_draw(max(n_val, 1), torch.Generator().manual_seed(seed + 1))
        best, bad, step = source.snapshot(), 0, 0
        bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
        for step in range(1, steps + 1):
            b = min(batch_size, int(x_tr.shape[0]))
            idx = torch.randint(0, x_tr.shape[0], (b,), generator=gen).to(x.device)
            loss, logits, labels, logs = source.batch_loss(model, x_tr[idx], y_tr[idx], gen)
            grads = torch.autograd.grad(loss, params)
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
            source.after_step()
            bar.update(1)
            out_of_time = max_seconds is not None and time.perf_counter() - t0 > max_seconds
            if step % eval_every == 0 or step == steps or out_of_time:
                with torch.no_grad():
                    if n_val:
                        patches = source.current_patches(draw)
                        hits = 0
                        for i in range(0, n_val, val_batch):
                            xa = apply_patches(
                                x_val[i : i + val_batch],
                                patches[i : i + val_batch] if patches.shape[0] > 1 else patches,
                                positions[i : i + val_batch],
                            )
                            hits += int(goal(model(xa).argmax(1), y_val[i : i + val_batch]).sum())
                        rate = hits / n_val
                    else:  # no validation slice: the training batch's rate
                        rate = float(goal(logits.detach().argmax(1), labels).float().mean())
                fit.history.append({"step": step, "val_fooling_rate": rate, "loss": float(loss.detach()), **logs})
                bar.set_postfix(val=f"{rate:.3f}")
                if rate > fit.best_rate:
                    fit.best_rate, best, bad = rate, source.snapshot(), 0
                else:
                    bad += 1
                if bad >= patience or rate >= 1.0:
                    break
            if out_of_time:
                break
        bar.close()
    source.restore(best)
    fit.steps = step
    fit.seconds = time.perf_counter() - t0
    return fit
