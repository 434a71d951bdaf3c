"""The one training loop of the learned patch attacks (PatchGAN and UniversalPatch).

Both attacks optimise something that makes patches (a generator, or the pixels of one patch)
against a frozen classifier, with a random position per image per step, and stop early on the
fooling rate of a held-out slice of the *fit* data. What differs is only how a batch's loss is
computed and what gets optimised, so each attack hands this loop a :class:`PatchSource`; the
split, the optimiser steps, the validation checks, early stopping, the wall-clock budget, the
best-so-far snapshot and the progress bar live here once. How long and how a source trains (the
Adam rate, steps, batches, early stopping, time budget, seed, progress bar) is one
:class:`PatchTraining`, the same type for both attacks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from guard.attacks.patching import apply_patches
from guard.core.models import eval_mode, predict_labels
from guard.core.validation import check_float, check_int

__all__ = ["PatchTraining", "PatchSource", "PatchFit", "fit_patch_source", "split_training"]


@dataclass(frozen=True)
class PatchTraining:
    """How a learned patch attack trains (``PatchGAN(training=...)``, ``UniversalPatch(training=...)``).

    Checked when built: a wrong type or a value out of range raises with the field's name.

    Args:
        lr: Adam learning rate, > 0; None (the default) takes the attack's own default
            (:class:`guard.attacks.patch_gan.PatchGAN`: 1e-3, the paper's;
            :class:`guard.attacks.universal_patch.UniversalPatch`: 0.05).
        steps: maximum training steps (>= 1).
        batch_size: images per step (>= 1; PatchGAN needs >= 2 for its BatchNorm).
        val_fraction: share of the fit data held out for the validation fooling rate, in [0, 1).
        eval_every: steps between validation checks (>= 1).
        patience: stop after this many checks without improvement (>= 1; the best state is kept).
        max_seconds: optional wall-clock budget of ``fit`` (> 0), None for none.
        seed: seeds the initial state, batches, latents and positions (>= 0).
        progress: show a tqdm bar during ``fit``.
    """

    lr: float | None = None
    steps: int = 1000
    batch_size: int = 64
    val_fraction: float = 0.2
    eval_every: int = 50
    patience: int = 4
    max_seconds: float | None = None
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.lr is not None:
            _settle(self, "lr", check_float(self.lr, "lr", owner, low=0.0, low_open=True))
        for name, low in (("steps", 1), ("batch_size", 1), ("eval_every", 1), ("patience", 1), ("seed", 0)):
            _settle(self, name, check_int(getattr(self, name), name, owner, low=low))
        _settle(
            self,
            "val_fraction",
            check_float(self.val_fraction, "val_fraction", owner, low=0.0, high=1.0, high_open=True),
        )
        if self.max_seconds is not None:
            _settle(self, "max_seconds", check_float(self.max_seconds, "max_seconds", owner, low=0.0, low_open=True))
        if not isinstance(self.progress, bool):
            raise TypeError(f"The 'progress' parameter of {owner} must be a bool. Got {type(self.progress).__name__}.")

    def with_lr(self, lr: float) -> PatchTraining:
        """These settings with ``lr`` filled in where it is None (the attack's default rate)."""
        return self if self.lr is not None else dataclasses.replace(self, lr=lr)

    def to_dict(self) -> dict[str, Any]:
        """The fields, flat and JSON-friendly (they go into the attacks' ``params()``)."""
        return dataclasses.asdict(self)


def _settle(options: Any, name: str, value: Any) -> None:
    """Store a checked (normalised: a NumPy int becomes an int) value on a frozen options object."""
    object.__setattr__(options, name, value)


def check_training(training: Any, owner: str, lr: float) -> PatchTraining:
    """``training`` (None: the defaults) checked to be a :class:`PatchTraining`, its lr defaulted to ``lr``."""
    if training is None:
        training = PatchTraining()
    if not isinstance(training, PatchTraining):
        raise TypeError(
            f"The 'training' parameter of {owner} must be a PatchTraining or None. Got {type(training).__name__}."
        )
    return training.with_lr(lr)


def split_training(params: Mapping[str, Any]) -> tuple[dict[str, Any], PatchTraining]:
    """Flat settings (an attack's ``params()``, a saved file's) split into the attack's own keyword
    arguments and the :class:`PatchTraining` built from the training keys among them."""
    names = {f.name for f in dataclasses.fields(PatchTraining)}
    own = {k: v for k, v in params.items() if k not in names}
    return own, PatchTraining(**{k: v for k, v in params.items() if k in names})


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
    training: PatchTraining,
    desc: str,
    val_batch: int = 500,
) -> PatchFit:
    """Train ``source`` against ``model`` on the images ``x`` (already on the model's device).

    Args:
        make_optimizer: builds the optimiser over ``source.parameters()`` (after ``source.init``).
        goal: ``goal(pred, y) -> bool[N]``: the attack's success (untargeted: a label other
            than the clean one; targeted: the target).
        training: steps, batch size, seed, progress bar and early stopping. ``val_fraction`` of
            ``x`` is held out for the validation checks (at least one image stays for
            training); a check every ``eval_every`` steps; stop after ``patience`` checks
            without improvement, at a validation rate of 1 or past ``max_seconds``. The best
            state is kept. ``training.lr`` is ``make_optimizer``'s to use.
        desc: the progress bar's label.
        val_batch: validation images per forward pass.

    Returns:
        :class:`PatchFit`; ``source`` is left in its best state.
    """
    t = training
    steps, eval_every, max_seconds, seed = t.steps, t.eval_every, t.max_seconds, t.seed
    gen = torch.Generator().manual_seed(seed)
    x_val, x_tr = _split(x, t.val_fraction, gen)
    n_val = int(x_val.shape[0])
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
        bar = tqdm(total=steps, desc=desc, disable=not t.progress, leave=False)
        for step in range(1, steps + 1):
            loss, logits, labels, logs = _train_step(model, source, optimizer, params, x_tr, y_tr, t.batch_size, gen)
            bar.update(1)
            out_of_time = max_seconds is not None and time.perf_counter() - t0 > max_seconds
            if step % eval_every == 0 or step == steps or out_of_time:
                with torch.no_grad():
                    if n_val:
                        patches = source.current_patches(draw)
                        rate = _validation_rate(model, patches, positions, x_val, y_val, goal, val_batch)
                    else:  # no validation slice: the training batch's rate
                        rate = float(goal(logits.detach().argmax(1), labels).float().mean())
                fit.history.append({"step": step, "val_fooling_rate": rate, "loss": float(loss.detach()), **logs})
                bar.set_postfix(val=f"{rate:.3f}")
                if rate > fit.best_rate:
                    fit.best_rate, best, bad = rate, source.snapshot(), 0
                else:
                    bad += 1
                if bad >= t.patience or rate >= 1.0:
                    break
            if out_of_time:
                break
        bar.close()
    source.restore(best)
    fit.steps = step
    fit.seconds = time.perf_counter() - t0
    return fit


def _split(x: torch.Tensor, val_fraction: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation images, training images): a random ``val_fraction`` of ``x`` held out, at least
    one image left to train on."""
    n_all = int(x.shape[0])
    perm = torch.randperm(n_all, generator=gen)
    n_val = min(int(round(val_fraction * n_all)), n_all - 1) if n_all > 1 else 0
    return x[perm[:n_val]], x[perm[n_val:]]


def _train_step(
    model: nn.Module,
    source: PatchSource,
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    x_tr: torch.Tensor,
    y_tr: torch.Tensor,
    batch_size: int,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
    """One optimiser step on a random batch of the training images; returns what ``source.batch_loss`` gave."""
    b = min(batch_size, int(x_tr.shape[0]))
    idx = torch.randint(0, x_tr.shape[0], (b,), generator=gen).to(x_tr.device)
    loss, logits, labels, logs = source.batch_loss(model, x_tr[idx], y_tr[idx], gen)
    grads = torch.autograd.grad(loss, params)
    for p, g in zip(params, grads):
        p.grad = g
    optimizer.step()
    source.after_step()
    return loss, logits, labels, logs


def _validation_rate(
    model: nn.Module,
    patches: torch.Tensor,
    positions: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    goal: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    val_batch: int,
) -> float:
    """The share of validation images on which ``patches`` (one per image, or one for all) at
    ``positions`` reach the goal."""
    n_val = int(x_val.shape[0])
    hits = 0
    for i in range(0, n_val, val_batch):
        xa = apply_patches(
            x_val[i : i + val_batch],
            patches[i : i + val_batch] if patches.shape[0] > 1 else patches,
            positions[i : i + val_batch],
        )
        hits += int(goal(model(xa).argmax(1), y_val[i : i + val_batch]).sum())
    return hits / n_val
