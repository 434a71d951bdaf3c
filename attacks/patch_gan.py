"""PatchGAN: a generator of localized visible adversarial patches (G2LVAP).

Implements "Generative Localized Visible Adversarial Patches" (the G2LVAP paper: a generator
G maps z ~ U[0, 1]^100 to a small square patch; the attacked classifier f is a frozen
discriminator). One trained generator yields many different patches, each of which fools f
wherever it is placed on (almost) any image.

Loss = L_f + alpha * L_d + beta * L_p, per batch of images x with two latent batches z, z':

* L_f = -log(1 - P_{y(x)}(A(x, G(z))))  (the paper's fooling loss; y(x) = f's own label of
  the clean image, A pastes the patch at a random place). ``loss="margin"`` replaces it with
  the Carlini-Wagner margin max(z_y - max_{j != y} z_j, -kappa), which stops rewarding an
  image once it is fooled by kappa. On the demo model it fooled more at the same budget
  (0.338 vs 0.242 at 10% area; ``benchmarks/peers/patch_gan_vs_art.py``, docs/history/benchmarks-history.md "Attacks I").
* L_d = -mean |phi(A(x, G(z))) - phi(A(x, G(z')))|: pushes apart f's last-conv features of the
  same image carrying two different patches at the same place (diversity in what f sees).
* L_p = -mean ||G(z) - G(z')||_2 / sqrt(d): pushes the patches themselves apart (2-norm,
  divided by sqrt of the patch size so that beta means the same for every patch size).
  ``patch_distance="ssim"`` uses 1 - SSIM instead (structural), and ``cap_d``/``cap_p`` cap
  each pair's distance; the paper's form is the default. The audit uses alpha=1, beta=3,
  1 - SSIM capped at 0.8: the paper's alpha=20 / beta=0.1 gave diverse patches that fooled
  much less on the demo model (docs/history/benchmarks-history.md, "Attacks I").

Training: a patch at a random position per image per step, Adam on the generator only,
validation fooling rate on a held-out slice of the *fit* data every ``eval_every`` steps,
stop after ``patience`` checks without improvement and keep the best generator.

The paper's generator ends in tanh because its Inception-V3 takes [-1, 1]; ours ends in a
sigmoid because every guard model takes [0, 1] pixels. The classifier is never modified:
only the generator's parameters are optimised, gradients are taken with
``torch.autograd.grad`` with respect to them only (the model's ``.grad`` stays untouched)
and the model runs in eval mode with every module's mode restored afterwards.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from guard.attacks.base import Attack, AttackResult, model_device
from guard.attacks.patch_analysis import ssim
from guard.attacks.patch_fit import PatchTraining, check_training, fit_patch_source, split_training
from guard.attacks.patching import apply_patches, check_patch_size, patch_side, random_positions
from guard.core.cache import load_tensors, save_tensors
from guard.core.data import Split
from guard.core.features import FeatureExtractor
from guard.core.models import eval_mode
from guard.core.validation import NotFittedError, check_float, check_images, check_int

__all__ = ["PatchGAN", "PatchGenerator", "fooling_loss", "last_conv_layer", "as_images", "patch_fit_inputs"]

log = logging.getLogger(__name__)

LOSSES = ("paper", "margin")


def fooling_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    kind: str = "paper",
    *,
    target: torch.Tensor | None = None,
    kappa: float = 5.0,
    real_classes: int | None = None,
) -> torch.Tensor:
    """Mean fooling loss of a batch (lower = more fooled).

    Args:
        logits: (N, K) logits of the patched images.
        y: (N,) the model's labels of the clean images.
        kind: ``"paper"``: -log(1 - p_y) (G2LVAP's L_f); ``"margin"``: max(z_y - max_{j!=y} z_j, -kappa).
        target: targeted variant: ``"paper"`` becomes -log p_t (cross-entropy), ``"margin"``
            becomes max(max_{j!=t} z_j - z_t, -kappa).
        kappa: confidence margin of the margin loss.
        real_classes: outputs ``>= real_classes`` (a hardened model's reject class) count as
            *not* fooled: ``"paper"`` becomes -log P(a real class other than y), ``"margin"``
            compares the best other real class with the best of y and the extra outputs.
    """
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}; got {kind!r}.")
    label = target if target is not None else y
    k = logits.shape[1]
    n = k if real_classes is None or target is not None else min(int(real_classes), k)
    keep = F.one_hot(label, k).bool()  # the classes that mean "not fooled"
    if n < k:
        keep[:, n:] = True
    if kind == "paper":
        if target is not None:
            return F.cross_entropy(logits, label)
        log_p = F.log_softmax(logits, 1)
        if n == k:
            log_py = log_p.gather(1, label.view(-1, 1)).squeeze(1)
            # log(1 - p_y) computed stably as log(-expm1(log p_y)).
            return -torch.log(-torch.expm1(log_py.clamp(max=-1e-6))).mean()
        return -torch.logsumexp(log_p.masked_fill(keep, float("-inf")), 1).mean()
    z_keep = logits.masked_fill(~keep, float("-inf")).amax(1)
    other = logits.masked_fill(keep, float("-inf")).amax(1)
    diff = (other - z_keep) if target is not None else (z_keep - other)
    return diff.clamp(min=-kappa).mean()


def last_conv_layer(model: nn.Module) -> str:
    """Module path of the last ``nn.Conv2d`` in ``model`` (G2LVAP's L_d uses its features)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d; pass feature_layer= (a layer name) or alpha=0.")
    return names[-1]


def as_images(data: Any, name: str = "data") -> torch.Tensor:
    """Images from a Split, an (x, y) pair or an image tensor (labels are not needed)."""
    if isinstance(data, Split):
        x = data.x
    elif isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x = data[0]
    elif isinstance(data, torch.Tensor):
        x = data
    else:
        raise TypeError(f"{name} must be a guard Split, an (x, y) pair or an image tensor; got {type(data).__name__}.")
    return check_images(x, name)


def patch_fit_inputs(model: Any, data: Any, size: int | float) -> tuple[torch.Tensor, int, torch.device]:
    """What every patch ``fit`` starts from: the images, the patch side in pixels, the model's device."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    x = as_images(data)
    return x, patch_side(size, tuple(x.shape[-2:]), name="size"), model_device(model)


class PatchGenerator(nn.Module):
    """z (latent_dim) -> Linear -> BatchNorm -> transposed convolutions -> sigmoid patch (C, s, s).

    The architecture scales with the side s: ``n_up = max(1, ceil(log2 s) - 1)`` stride-2
    transposed convolutions (each BatchNorm + ReLU) from a ``ceil(s / 2^n_up)`` seed, widths
    halving from ``width * 2^(n_up - 1)``; the output is centre-cropped to s.
    """

    def __init__(self, side: int, channels: int = 1, latent_dim: int = 100, width: int = 32) -> None:
        super().__init__()
        self.side, self.channels, self.latent_dim, self.width = side, channels, latent_dim, width
        self.n_up = max(1, math.ceil(math.log2(max(side, 2))) - 1)
        self.seed_side = math.ceil(side / 2**self.n_up)
        c0 = width * 2 ** (self.n_up - 1)
        self.fc = nn.Sequential(
            nn.Linear(latent_dim, c0 * self.seed_side**2), nn.BatchNorm1d(c0 * self.seed_side**2), nn.ReLU()
        )
        ups: list[nn.Module] = []
        c = c0
        for _ in range(self.n_up):
            c_out = max(c // 2, 8)
            ups += [nn.ConvTranspose2d(c, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
            c = c_out
        self.up = nn.Sequential(*ups)
        self.out = nn.Conv2d(c, channels, 3, padding=1)
        self._c0 = c0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], self._c0, self.seed_side, self.seed_side)
        h = self.out(self.up(h))
        off = (h.shape[-1] - self.side) // 2
        return torch.sigmoid(h[..., off : off + self.side, off : off + self.side])

    def config(self) -> dict[str, int]:
        return {"side": self.side, "channels": self.channels, "latent_dim": self.latent_dim, "width": self.width}


class PatchGAN(Attack):
    """G2LVAP patch generator: ``fit(model, data)``, then ``sample``/``apply`` or call like any attack.

    Args:
        size: patch side in pixels (int) or fraction of the image area (float in (0, 1)).
        alpha: weight of the feature-diversity loss L_d (paper: 20).
        beta: weight of the patch-distance loss L_p (paper: 0.1).
        loss: ``"paper"`` (-log(1 - p_y)) or ``"margin"`` (CW margin, see module docstring).
        kappa: margin of the margin loss.
        latent_dim: size of z (paper: 100).
        width: generator width (channels of the last transposed convolution times 2).
        feature_layer: layer for L_d; default the model's last ``nn.Conv2d``.
        cap_d: optional cap on each image's feature distance in L_d (None: the paper's
            uncapped form). Capped, the diversity terms stop pulling once two patches differ
            enough, so they no longer trade fooling for ever more diversity.
        cap_p: optional cap on each pair's patch distance in L_p (None: uncapped).
        patch_distance: L_p's distance: ``"l2"`` (the paper's 2-norm, divided by sqrt(d)) or
            ``"ssim"`` (1 - SSIM, structural, the measure the diversity figure reports).
        training: Adam rate (default the paper's 1e-3), steps, batch size (each image carries
            two patches: z and z'; >= 2), early stopping on the validation fooling rate, time
            budget, seed (the generator's initialisation, batches, latents and positions) and
            progress bar: :class:`guard.attacks.patch_fit.PatchTraining`, None for its defaults.

    :meth:`params` reports every setting flat, ``training``'s fields included, and
    :meth:`from_params` builds the attack back from them.

    Fitted attributes: ``generator_`` (eval mode), ``side_``, ``history_`` (validation fooling
    rate per check), ``val_fooling_rate_``, ``steps_``, ``fit_seconds_``.
    """

    targeted_supported = False

    def __init__(
        self,
        *,
        size: int | float = 0.05,
        alpha: float = 20.0,
        beta: float = 0.1,
        loss: str = "paper",
        kappa: float = 5.0,
        latent_dim: int = 100,
        width: int = 32,
        feature_layer: str | None = None,
        cap_d: float | None = None,
        cap_p: float | None = None,
        patch_distance: str = "l2",
        training: PatchTraining | None = None,
    ) -> None:
        owner = "PatchGAN"
        self.size = check_patch_size(size, owner)
        self.alpha = check_float(alpha, "alpha", owner, low=0.0)
        self.beta = check_float(beta, "beta", owner, low=0.0)
        if loss not in LOSSES:
            raise ValueError(f"The 'loss' parameter of {owner} must be one of {LOSSES}. Got {loss!r}.")
        self.loss = loss
        self.kappa = check_float(kappa, "kappa", owner, low=0.0)
        self.latent_dim = check_int(latent_dim, "latent_dim", owner, low=1)
        self.width = check_int(width, "width", owner, low=8)
        self.feature_layer = feature_layer
        self.cap_d = None if cap_d is None else check_float(cap_d, "cap_d", owner, low=0.0, low_open=True)
        self.cap_p = None if cap_p is None else check_float(cap_p, "cap_p", owner, low=0.0, low_open=True)
        if patch_distance not in ("l2", "ssim"):
            raise ValueError(
                f"The 'patch_distance' parameter of {owner} must be 'l2' or 'ssim'. Got {patch_distance!r}."
            )
        self.patch_distance = patch_distance
        self.training = check_training(training, owner, lr=1e-3)
        check_int(self.training.batch_size, "batch_size", owner, low=2)  # BatchNorm needs two samples

    @classmethod
    def from_params(cls, **params: Any) -> PatchGAN:
        """A PatchGAN from the flat settings :meth:`params` reports (report.json's, a saved file's):
        the :class:`guard.attacks.patch_fit.PatchTraining` keys build ``training``; an unknown key raises TypeError."""
        own, training = split_training(params)
        return cls(**own, training=training)

    # ------------------------------------------------------------------ fit
    def fit(self, model: nn.Module, data: Any) -> PatchGAN:
        """Train the generator against the frozen ``model`` on the images of ``data``.

        Args:
            model: the classifier (takes [0, 1] NCHW images); not modified.
            data: training images (a Split, an (x, y) pair or a tensor); labels are ignored
                (the model's own predictions are used). A ``val_fraction`` slice of it is held
                out for early stopping (``training.val_fraction``); never pass the evaluation images here.
        """
        x, side, device = patch_fit_inputs(model, data, self.size)
        _, c, h, w = x.shape
        torch_state = torch.random.get_rng_state()
        t = self.training
        torch.manual_seed(t.seed)  # generator initialisation
        G = PatchGenerator(side, c, self.latent_dim, self.width).to(device)
        torch.random.set_rng_state(torch_state)
        layer = (
            self.feature_layer
            if self.feature_layer is not None
            else (last_conv_layer(model) if self.alpha > 0 else None)
        )
        source = _GeneratorSource(self, G, model, layer, side, (h, w), device)
        fit = fit_patch_source(
            model,
            x.to(device),
            source,
            lambda ps: torch.optim.Adam(ps, lr=t.lr, betas=(0.5, 0.999)),
            goal=lambda pred, y: pred != y,
            training=t,
            desc=f"PatchGAN {side}x{side}",
        )
        G.eval()
        self.generator_ = G
        self.side_ = side
        self.image_size_ = (h, w)
        self.history_ = fit.history
        self.val_fooling_rate_ = fit.best_rate
        self.steps_ = fit.steps
        self.fit_seconds_ = fit.seconds
        self.feature_layer_ = layer
        return self

    # ------------------------------------------------------------------ use
    def _check_fitted(self) -> None:
        if not hasattr(self, "generator_"):
            raise NotFittedError("This PatchGAN is not fitted yet; call fit(model, data) or PatchGAN.load(path) first.")

    @torch.no_grad()
    def sample(
        self, n: int, *, generator: torch.Generator | None = None, z: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``n`` patches (n, C, s, s) in [0, 1] from z ~ U[0, 1]^latent_dim (or the given ``z``)."""
        self._check_fitted()
        G = self.generator_
        dev = next(G.parameters()).device
        if z is None:
            n = check_int(n, "n", "PatchGAN.sample", low=1)
            z = torch.rand(n, G.latent_dim, generator=generator)
        elif z.dim() != 2 or z.shape[1] != G.latent_dim:
            raise ValueError(f"z must have shape (n, {G.latent_dim}); got {tuple(z.shape)}.")
        with eval_mode(G):
            return G(z.to(dev)).clamp(0.0, 1.0)

    def apply(
        self,
        x: torch.Tensor,
        patches: torch.Tensor,
        positions: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Paste ``patches`` on ``x`` at ``positions`` (random positions from ``generator`` if None)."""
        check_images(x, "x")
        if positions is None:
            positions = random_positions(
                int(x.shape[0]), int(patches.shape[-1]), x.shape[-2:], generator=generator, device=x.device
            )
        return apply_patches(x, patches.to(x.device), positions)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> AttackResult:
        self._check_fitted()
        gen = torch.Generator().manual_seed(self.training.seed + 2)
        patches = self.sample(int(x.shape[0]), generator=gen).to(x.device)
        positions = random_positions(int(x.shape[0]), self.side_, x.shape[-2:], generator=gen, device=x.device)
        x_adv = apply_patches(x, patches, positions)
        with torch.no_grad():
            success = self.is_success(model, x_adv, y, None)
        return AttackResult(x_adv, success, extras={"patches": patches, "positions": positions, "side": self.side_})

    def params(self) -> dict[str, Any]:
        """Every setting, flat (``training``'s fields among them, in the order of the keyword
        arguments before they were grouped), and ``side`` once fitted."""
        flat = {**super().params(), **self.training.to_dict()}
        p = {k: flat[k] for k in _INIT_KEYS}
        if hasattr(self, "side_"):
            p["side"] = self.side_
        return p

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Save the generator (safetensors) with its JSON config in the file's metadata."""
        self._check_fitted()
        meta = {
            "format": "guard.PatchGAN",
            "version": 1,
            "generator": self.generator_.config(),
            "params": self.params(),
            "image_size": list(self.image_size_),
            "val_fooling_rate": self.val_fooling_rate_,
        }
        save_tensors(path, self.generator_.state_dict(), meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> PatchGAN:
        """Load what :meth:`save` wrote (no pickle)."""
        tensors, meta = load_tensors(path)
        if meta.get("format") != "guard.PatchGAN":
            raise ValueError(f"{str(path)!r} is not a saved PatchGAN (format {meta.get('format')!r}).")
        cfg = meta["generator"]
        self = cls.from_params(**{k: v for k, v in meta.get("params", {}).items() if k in _INIT_KEYS})
        G = PatchGenerator(int(cfg["side"]), int(cfg["channels"]), int(cfg["latent_dim"]), int(cfg["width"]))
        G.load_state_dict(tensors)
        self.generator_ = G.to(device).eval()
        self.side_ = int(cfg["side"])
        self.image_size_ = tuple(meta.get("image_size", (0, 0)))
        self.val_fooling_rate_ = float(meta.get("val_fooling_rate", float("nan")))
        self.history_ = []
        return self


#: The flat settings :meth:`PatchGAN.params` reports, in its order (a saved file's ``params``).
_INIT_KEYS = (
    "size",
    "alpha",
    "beta",
    "lr",
    "loss",
    "kappa",
    "steps",
    "batch_size",
    "latent_dim",
    "width",
    "feature_layer",
    "val_fraction",
    "eval_every",
    "patience",
    "max_seconds",
    "cap_d",
    "cap_p",
    "patch_distance",
    "seed",
    "progress",
)


class _GeneratorSource:
    """PatchGAN's side of the shared training loop: the G2LVAP loss L_f + alpha L_d + beta L_p."""

    def __init__(
        self,
        attack: PatchGAN,
        G: PatchGenerator,
        model: nn.Module,
        layer: str | None,
        side: int,
        hw: tuple[int, int],
        device: torch.device,
    ) -> None:
        self.a, self.G, self.layer, self.side, self.hw, self.device = attack, G, layer, side, hw, device
        self.fx = FeatureExtractor(model, [layer]) if layer is not None else None

    def init(self, gen: torch.Generator) -> None:
        pass  # G was initialised from torch.manual_seed(seed), as before the loop was shared

    def parameters(self) -> list[torch.Tensor]:
        return list(self.G.parameters())

    def batch_loss(self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, gen: torch.Generator):
        a = self.a
        self.G.train()
        b = int(xb.shape[0])
        z = torch.rand(2 * b, a.latent_dim, generator=gen).to(self.device)
        pos = random_positions(b, self.side, self.hw, generator=gen, device=self.device)
        patches = self.G(z)
        xa = apply_patches(xb.repeat(2, 1, 1, 1), patches, pos.repeat(2, 1))
        if self.fx is not None:
            logits, feats = self.fx(xa)
            f1, f2 = feats[self.layer].flatten(1).chunk(2)
            d_feat = (f1 - f2).abs().mean(1)
            l_d = -(d_feat.clamp(max=a.cap_d) if a.cap_d is not None else d_feat).mean()
        else:
            logits, l_d = model(xa), torch.zeros((), device=self.device)
        labels = yb.repeat(2)
        l_f = fooling_loss(logits, labels, a.loss, kappa=a.kappa)
        p1, p2 = patches.flatten(1).chunk(2)
        if a.patch_distance == "l2":
            d_patch = (p1 - p2).norm(dim=1) / math.sqrt(p1.shape[1])
        else:  # structural: 1 - SSIM, the measure the diversity analysis reports
            q1, q2 = patches.chunk(2)
            d_patch = 1.0 - ssim(q1, q2)
        l_p = -(d_patch.clamp(max=a.cap_p) if a.cap_p is not None else d_patch).mean()
        total = l_f + a.alpha * l_d + a.beta * l_p
        return total, logits, labels, {"l_f": l_f.item(), "l_d": l_d.item(), "l_p": l_p.item()}

    def validation_draw(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.rand(n, self.a.latent_dim, generator=gen).to(self.device)
        return z, random_positions(n, self.side, self.hw, generator=gen, device=self.device)

    def current_patches(self, z: torch.Tensor) -> torch.Tensor:
        self.G.eval()
        return self.G(z)

    def after_step(self) -> None:
        pass

    def snapshot(self) -> dict[str, torch.Tensor]:
        return copy.deepcopy(self.G.state_dict())

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.G.load_state_dict(state)
