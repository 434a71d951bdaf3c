"""UniversalPatch: one patch optimised directly over many images with random placement.

The baseline G2LVAP compares against: the adversarial patch of Brown et al. 2017 ("Adversarial
Patch") / LaVAN (Karmon, Zoran, Goldberg 2018) without the transformations: a single square
patch in [0, 1], pasted at a random position on every image of every batch, optimised with
Adam (projected back to [0, 1] after every step) to make the model change its label
(untargeted; the same losses as :class:`attacks.patch_gan.PatchGAN`) or predict ``target``
(targeted). Early stopping on the validation fooling rate, like PatchGAN.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from guard.attacks.base import Attack, AttackResult
from guard.attacks.patch_gan import LOSSES, fooling_loss, patch_fit_inputs
from guard.attacks.patching import apply_patches, check_patch_size, random_positions
from guard.core.models import eval_mode, predict_labels
from guard.core.validation import NotFittedError, check_float, check_int

__all__ = ["UniversalPatch"]


class UniversalPatch(Attack):
    """One universal adversarial patch (Brown et al. 2017; LaVAN, Karmon et al. 2018).

    Args:
        size: patch side in pixels (int) or area fraction (float in (0, 1)).
        target: None for untargeted, or a class index for a targeted patch.
        loss: ``"paper"`` (-log(1 - p_y); targeted: cross-entropy to the target) or ``"margin"``.
        kappa: margin of the margin loss.
        lr: Adam learning rate on the patch pixels.
        steps: maximum steps.
        batch_size: images per step.
        val_fraction, eval_every, patience, max_seconds: early stopping as in PatchGAN.
        seed: seeds the initial patch, batches and positions.
        progress: show a tqdm bar.

    Fitted attributes: ``patch_`` (1, C, s, s), ``side_``, ``history_``, ``val_fooling_rate_``.
    """

    targeted_supported = False  # the target is fixed at fit time (one patch for one target)

    def __init__(self, *, size: int | float = 0.05, target: int | None = None, loss: str = "paper", kappa: float = 5.0,
                 lr: float = 0.05, steps: int = 1000, batch_size: int = 64, val_fraction: float = 0.2, eval_every: int = 50,
                 patience: int = 4, max_seconds: float | None = None, seed: int = 0, progress: bool = False) -> None:
        owner = "UniversalPatch"
        self.size = check_patch_size(size, owner)
        self.target = None if target is None else check_int(target, "target", owner, low=0)
        if loss not in LOSSES:
            raise ValueError(f"The 'loss' parameter of {owner} must be one of {LOSSES}. Got {loss!r}.")
        self.loss = loss
        self.kappa = check_float(kappa, "kappa", owner, low=0.0)
        self.lr = check_float(lr, "lr", owner, low=0.0, low_open=True)
        self.steps = check_int(steps, "steps", owner, low=1)
        self.batch_size = check_int(batch_size, "batch_size", owner, low=1)
        self.val_fraction = check_float(val_fraction, "val_fraction", owner, low=0.0, high=1.0, high_open=True)
        self.eval_every = check_int(eval_every, "eval_every", owner, low=1)
        self.patience = check_int(patience, "patience", owner, low=1)
        self.max_seconds = None if max_seconds is None else check_float(max_seconds, "max_seconds", owner, low=0.0, low_open=True)
        self.seed = check_int(seed, "seed", owner, low=0)
        self.progress = bool(progress)

    def _goal(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pred == self.target if self.target is not None else pred != y

    def fit(self, model: nn.Module, data: Any) -> "UniversalPatch":
        """Optimise the patch against ``model`` on the images of ``data`` (labels ignored)."""
        x, side, device = patch_fit_inputs(model, data, self.size)
        n_all, c, h, w = x.shape
        gen = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(n_all, generator=gen)
        n_val = min(int(round(self.val_fraction * n_all)), n_all - 1)
        x_val, x_tr = x[perm[:n_val]].to(device), x[perm[n_val:]].to(device)
        patch = torch.rand(1, c, side, side, generator=gen).to(device).requires_grad_(True)
        opt = torch.optim.Adam([patch], lr=self.lr)
        history: list[dict[str, float]] = []
        t0 = time.perf_counter()
        with eval_mode(model):
            y_tr = predict_labels(model, x_tr)
            y_val = predict_labels(model, x_val)
            num_classes = int(model(x_tr[:1]).shape[1]) if self.target is not None else 0
            if self.target is not None and self.target >= num_classes:
                raise ValueError(f"target must be a class index in [0, {num_classes - 1}]; got {self.target}.")
            vgen = torch.Generator().manual_seed(self.seed + 1)
            pos_val = random_positions(max(n_val, 1), side, (h, w), generator=vgen, device=device)
            best_rate, best_patch, bad, step = -1.0, patch.detach().clone(), 0, 0
            bar = tqdm(total=self.steps, desc=f"UniversalPatch {side}x{side}", disable=not self.progress, leave=False)
            for step in range(1, self.steps + 1):
                b = min(self.batch_size, int(x_tr.shape[0]))
                idx = torch.randint(0, x_tr.shape[0], (b,), generator=gen).to(device)
                pos = random_positions(b, side, (h, w), generator=gen, device=device)
                logits = model(apply_patches(x_tr[idx], patch, pos))
                tgt = None if self.target is None else torch.full((b,), self.target, dtype=torch.long, device=device)
                loss = fooling_loss(logits, y_tr[idx], self.loss, target=tgt, kappa=self.kappa)
                (patch.grad,) = torch.autograd.grad(loss, [patch])
                opt.step()
                with torch.no_grad():
                    patch.clamp_(0.0, 1.0)
                bar.update(1)
                out_of_time = self.max_seconds is not None and time.perf_counter() - t0 > self.max_seconds
                if step % self.eval_every == 0 or step == self.steps or out_of_time:
                    with torch.no_grad():
                        if n_val:
                            pred = torch.cat([model(apply_patches(x_val[i:i + 500], patch, pos_val[i:i + 500])).argmax(1)
                                              for i in range(0, n_val, 500)])
                            rate = float(self._goal(pred, y_val).float().mean())
                        else:
                            rate = float(self._goal(logits.argmax(1), y_tr[idx]).float().mean())
                    history.append({"step": step, "val_fooling_rate": rate, "loss": loss.item()})
                    bar.set_postfix(val=f"{rate:.3f}")
                    if rate > best_rate:
                        best_rate, best_patch, bad = rate, patch.detach().clone(), 0
                    else:
                        bad += 1
                    if bad >= self.patience or rate >= 1.0:
                        break
                if out_of_time:
                    break
            bar.close()
        self.patch_ = best_patch
        self.side_ = side
        self.history_ = history
        self.val_fooling_rate_ = best_rate
        self.steps_ = step
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """The patch repeated ``n`` times (n, C, s, s) (same signature as PatchGAN.sample)."""
        if not hasattr(self, "patch_"):
            raise NotFittedError("This UniversalPatch is not fitted yet; call fit(model, data) first.")
        n = check_int(n, "n", "UniversalPatch.sample", low=1)
        return self.patch_.expand(n, -1, -1, -1).clone()

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> AttackResult:
        if not hasattr(self, "patch_"):
            raise NotFittedError("This UniversalPatch is not fitted yet; call fit(model, data) first.")
        gen = torch.Generator().manual_seed(self.seed + 2)
        positions = random_positions(int(x.shape[0]), self.side_, x.shape[-2:], generator=gen, device=x.device)
        x_adv = apply_patches(x, self.patch_.to(x.device), positions)
        with torch.no_grad():
            pred = model(x_adv).argmax(1)
        return AttackResult(x_adv, self._goal(pred, y), extras={"patch": self.patch_, "positions": positions, "side": self.side_})

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in super().params().items() if not k.endswith("_")}
