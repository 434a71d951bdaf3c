"""UniversalPatch: one patch optimised directly over many images with random placement.

The baseline G2LVAP compares against: the adversarial patch of Brown et al. 2017 ("Adversarial
Patch") / LaVAN (Karmon, Zoran, Goldberg 2018) without the transformations: a single square
patch in [0, 1], pasted at a random position on every image of every batch, optimised with
Adam (projected back to [0, 1] after every step) to make the model change its label
(untargeted; the same losses as :class:`guard.attacks.patch_gan.PatchGAN`) or predict ``target``
(targeted). Early stopping on the validation fooling rate, like PatchGAN.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from guard.attacks.base import Attack, AttackResult
from guard.attacks.patch_fit import PatchTraining, check_training, fit_patch_source, split_training
from guard.attacks.patch_gan import LOSSES, fooling_loss, patch_fit_inputs
from guard.attacks.patching import apply_patches, check_patch_size, random_positions
from guard.core.cache import load_tensors, save_tensors
from guard.core.models import eval_mode
from guard.core.validation import NotFittedError, check_float, check_int

__all__ = ["UniversalPatch"]


class UniversalPatch(Attack):
    """One universal adversarial patch (Brown et al. 2017; LaVAN, Karmon et al. 2018).

    Args:
        size: patch side in pixels (int) or area fraction (float in (0, 1)).
        target: None for untargeted, or a class index for a targeted patch.
        loss: ``"paper"`` (-log(1 - p_y); targeted: cross-entropy to the target) or ``"margin"``.
        kappa: margin of the margin loss.
        real_classes: for a model with extra outputs after its real classes (the reject class of
            a hardened model): success means another *real* class, and the loss counts the
            extra outputs as not fooled.
        training: Adam rate on the patch pixels (default 0.05), steps, batch size, early
            stopping as in PatchGAN, time budget, seed (the initial patch, batches and
            positions) and progress bar: :class:`guard.attacks.patch_fit.PatchTraining`, None
            for its defaults.

    :meth:`params` reports every setting flat, ``training``'s fields included, and
    :meth:`from_params` builds the attack back from them.

    Fitted attributes: ``patch_`` (1, C, s, s), ``side_``, ``history_``, ``val_fooling_rate_``.
    """

    targeted_supported = False  # the target is fixed at fit time (one patch for one target)

    def __init__(
        self,
        *,
        size: int | float = 0.05,
        target: int | None = None,
        loss: str = "paper",
        kappa: float = 5.0,
        real_classes: int | None = None,
        training: PatchTraining | None = None,
    ) -> None:
        owner = "UniversalPatch"
        self.size = check_patch_size(size, owner)
        self.target = None if target is None else check_int(target, "target", owner, low=0)
        if loss not in LOSSES:
            raise ValueError(f"The 'loss' parameter of {owner} must be one of {LOSSES}. Got {loss!r}.")
        self.loss = loss
        self.kappa = check_float(kappa, "kappa", owner, low=0.0)
        self.real_classes = None if real_classes is None else check_int(real_classes, "real_classes", owner, low=2)
        self.training = check_training(training, owner, lr=0.05)

    @classmethod
    def from_params(cls, **params: Any) -> UniversalPatch:
        """A UniversalPatch from the flat settings :meth:`params` reports (report.json's, a saved file's):
        the :class:`guard.attacks.patch_fit.PatchTraining` keys build ``training``; an unknown key raises TypeError."""
        own, training = split_training(params)
        return cls(**own, training=training)

    def _goal(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.target is not None:
            return pred == self.target
        return (pred != y) & (pred < self.real_classes) if self.real_classes is not None else pred != y

    def fit(self, model: nn.Module, data: Any) -> UniversalPatch:
        """Optimise the patch against ``model`` on the images of ``data`` (labels ignored)."""
        x, side, device = patch_fit_inputs(model, data, self.size)
        _, c, h, w = x.shape
        if self.target is not None:
            with torch.no_grad(), eval_mode(model):
                num_classes = int(model(x[:1].to(device)).shape[1])
            if self.target >= num_classes:
                raise ValueError(f"target must be a class index in [0, {num_classes - 1}]; got {self.target}.")
        source = _PixelSource(self, c, side, (h, w), device)
        fit = fit_patch_source(
            model,
            x.to(device),
            source,
            lambda ps: torch.optim.Adam(ps, lr=self.training.lr),
            goal=self._goal,
            training=self.training,
            desc=f"UniversalPatch {side}x{side}",
        )
        self.patch_ = source.patch.detach().clone()
        self.side_ = side
        self.history_ = fit.history
        self.val_fooling_rate_ = fit.best_rate
        self.steps_ = fit.steps
        self.fit_seconds_ = fit.seconds
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
        gen = torch.Generator().manual_seed(self.training.seed + 2)
        positions = random_positions(int(x.shape[0]), self.side_, x.shape[-2:], generator=gen, device=x.device)
        x_adv = apply_patches(x, self.patch_.to(x.device), positions)
        with torch.no_grad():
            pred = model(x_adv).argmax(1)
        return AttackResult(
            x_adv, self._goal(pred, y), extras={"patch": self.patch_, "positions": positions, "side": self.side_}
        )

    def params(self) -> dict[str, Any]:
        """Every setting, flat (``training``'s fields among them, in the order of the keyword
        arguments before they were grouped)."""
        flat = {**super().params(), **self.training.to_dict()}
        return {k: flat[k] for k in _INIT_KEYS}

    def save(self, path: str | Path) -> Path:
        """Save the patch (safetensors) with the parameters and fit figures as JSON metadata (no pickle)."""
        if not hasattr(self, "patch_"):
            raise NotFittedError("This UniversalPatch is not fitted yet; call fit(model, data) first.")
        meta = {
            "format": "guard.UniversalPatch",
            "version": 1,
            "params": self.params(),
            "side": self.side_,
            "val_fooling_rate": self.val_fooling_rate_,
            "steps": self.steps_,
            "fit_seconds": self.fit_seconds_,
        }
        save_tensors(path, {"patch": self.patch_}, meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> UniversalPatch:
        """Load what :meth:`save` wrote."""
        tensors, meta = load_tensors(path)
        if meta.get("format") != "guard.UniversalPatch" or "patch" not in tensors:
            raise ValueError(f"{str(path)!r} is not a saved UniversalPatch (format {meta.get('format')!r}).")
        self = cls.from_params(**{k: v for k, v in meta.get("params", {}).items() if k in _INIT_KEYS})
        patch = tensors["patch"]
        if (
            patch.dim() != 4
            or patch.shape[0] != 1
            or patch.shape[-1] != patch.shape[-2]
            or patch.shape[-1] != int(meta.get("side", -1))
        ):
            raise ValueError(
                f"{str(path)!r}: the patch has shape {tuple(patch.shape)}, expected (1, C, side, side) with side {meta.get('side')}."
            )
        self.patch_ = patch.to(device)
        self.side_ = int(meta["side"])
        self.val_fooling_rate_ = float(meta.get("val_fooling_rate", float("nan")))
        self.steps_ = int(meta.get("steps", 0))
        self.fit_seconds_ = float(meta.get("fit_seconds", float("nan")))
        self.history_ = []
        return self


#: The flat settings :meth:`UniversalPatch.params` reports, in its order (a saved file's ``params``).
_INIT_KEYS = (
    "size",
    "target",
    "loss",
    "kappa",
    "lr",
    "steps",
    "batch_size",
    "val_fraction",
    "eval_every",
    "patience",
    "max_seconds",
    "real_classes",
    "seed",
    "progress",
)


class _PixelSource:
    """UniversalPatch's side of the shared training loop: the pixels of one patch, kept in [0, 1]."""

    def __init__(
        self, attack: UniversalPatch, channels: int, side: int, hw: tuple[int, int], device: torch.device
    ) -> None:
        self.a, self.channels, self.side, self.hw, self.device = attack, channels, side, hw, device

    def init(self, gen: torch.Generator) -> None:
        self.patch = (
            torch.rand(1, self.channels, self.side, self.side, generator=gen).to(self.device).requires_grad_(True)
        )

    def parameters(self) -> list[torch.Tensor]:
        return [self.patch]

    def batch_loss(self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, gen: torch.Generator):
        a = self.a
        b = int(xb.shape[0])
        pos = random_positions(b, self.side, self.hw, generator=gen, device=self.device)
        logits = model(apply_patches(xb, self.patch, pos))
        tgt = None if a.target is None else torch.full((b,), a.target, dtype=torch.long, device=self.device)
        return fooling_loss(logits, yb, a.loss, target=tgt, kappa=a.kappa, real_classes=a.real_classes), logits, yb, {}

    def validation_draw(self, n: int, gen: torch.Generator) -> tuple[None, torch.Tensor]:
        return None, random_positions(n, self.side, self.hw, generator=gen, device=self.device)

    def current_patches(self, _draw: None) -> torch.Tensor:
        return self.patch.detach()

    def after_step(self) -> None:
        with torch.no_grad():
            self.patch.clamp_(0.0, 1.0)

    def snapshot(self) -> torch.Tensor:
        return self.patch.detach().clone()

    def restore(self, state: torch.Tensor) -> None:
        with torch.no_grad():
            self.patch.copy_(state)
