"""Fooling images by gradient ascent: noise the model labels as a class with >= 99.99% confidence.

Nguyen, Yosinski, Clune. "Deep Neural Networks are Easily Fooled: High Confidence Predictions
for Unrecognizable Images", CVPR 2015, Sec. 3.4 (gradient ascent, after Simonyan et al. 2014).
Starting from uniform noise, Adam ascends each wanted class's log-odds
``z_c - logsumexp_{j != c} z_j = log(p_c / (1 - p_c))`` with respect to the pixels, keeping
them in [0, 1]. The log-odds rather than the log-softmax: the log-softmax gradient shrinks like
``1 - p_c`` near the goal, and with Adam's long second-moment memory the steps shrink with it,
so some classes crawl below 99.99% for hundreds of steps (measured on the demo model: classes 1
and 7 stalled near 99.9% after 300 steps); the log-odds keeps a non-vanishing gradient.
``objective="log_prob"`` gives the plain log-softmax. Optional smoothness priors (Yosinski et al. 2015): a
total-variation penalty and a periodic Gaussian blur. Every class (and ``samples_per_class``
images per class) is optimised in one batch; each image stops changing once it reaches the
threshold, and the best image seen so far is kept.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from guard.attacks.base import AttackResult, Fooler, model_device
from guard.core.models import eval_mode
from guard.core.validation import check_float, check_int

__all__ = ["FoolingGradient", "gaussian_blur", "total_variation"]


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation per image (mean absolute neighbour difference)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1) + (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(
        1
    ).mean(1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (kernel radius ceil(2 sigma))."""
    radius = max(1, int(2 * sigma + 0.999))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class FoolingGradient(Fooler):
    """Gradient-ascent fooling images, one batch for all classes.

    Args:
        steps: maximum Adam steps.
        lr: Adam learning rate (pixels in [0, 1]).
        threshold: confidence that counts as fooled (0.9999 in the paper).
        samples_per_class: images per class.
        tv_weight: weight of the total-variation prior (0 disables it).
        blur_sigma: blur every ``blur_every`` steps with this sigma (None disables it).
        blur_every: steps between blurs.
        objective: ``"log_odds"`` (default) or ``"log_prob"``.
        seed: seed of the starting noise.
        batch_size: images optimised together (None: all classes x samples at once). Each image's
            loss and Adam state are its own, so chunks change nothing but memory; a 1,000-class
            model at 224 px needs chunks (2,000 images at once ran out of 24 GB).

    Call ``fooler(model, classes=None, shape=(1, 28, 28))``: returns an :class:`AttackResult`
    whose ``x_adv`` are the images, ``success`` = confidence >= threshold, ``target`` and
    ``extras["label"]`` the wanted classes, ``extras["confidence"]`` the model's softmax
    probability of that class, ``extras["steps"]`` the step at which each image first reached
    the threshold (-1: never).
    """

    def __init__(
        self,
        *,
        steps: int = 200,
        lr: float = 0.05,
        threshold: float = 0.9999,
        samples_per_class: int = 1,
        tv_weight: float = 0.0,
        blur_sigma: float | None = None,
        blur_every: int = 4,
        objective: str = "log_odds",
        seed: int = 0,
        batch_size: int | None = None,
    ) -> None:
        owner = type(self).__name__
        self.steps = check_int(steps, "steps", owner, low=1)
        self.lr = check_float(lr, "lr", owner, low=0.0, low_open=True)
        self.threshold = check_float(threshold, "threshold", owner, low=0.0, high=1.0, low_open=True)
        self.samples_per_class = check_int(samples_per_class, "samples_per_class", owner, low=1)
        self.tv_weight = check_float(tv_weight, "tv_weight", owner, low=0.0)
        self.blur_sigma = (
            None if blur_sigma is None else check_float(blur_sigma, "blur_sigma", owner, low=0.0, low_open=True)
        )
        self.blur_every = check_int(blur_every, "blur_every", owner, low=1)
        if objective not in ("log_odds", "log_prob"):
            raise ValueError(
                f"The 'objective' parameter of {owner} must be 'log_odds' or 'log_prob'. Got {objective!r}."
            )
        self.objective = objective
        self.batch_size = None if batch_size is None else check_int(batch_size, "batch_size", owner, low=1)
        self.seed = check_int(seed, "seed", owner)

    def __call__(
        self,
        model: nn.Module,
        *,
        classes: Sequence[int] | torch.Tensor | None = None,
        shape: tuple[int, int, int] = (1, 28, 28),
        num_classes: int | None = None,
    ) -> AttackResult:
        shape, cls = self.targets(model, shape, classes, num_classes, distinct=False)
        device = model_device(model)
        t0 = time.perf_counter()
        labels = cls.repeat_interleave(self.samples_per_class).to(device)
        n = labels.numel()
        gen = torch.Generator().manual_seed(self.seed)
        x0 = torch.rand(n, *shape, generator=gen)  # drawn whole: the same start whatever the chunks
        chunk = n if self.batch_size is None else self.batch_size
        parts = [self._optimise(model, x0[i : i + chunk].to(device), labels[i : i + chunk]) for i in range(0, n, chunk)]
        best, conf, reached = (torch.cat(t) for t in zip(*parts))
        seconds = time.perf_counter() - t0
        return AttackResult(
            x_adv=best.detach(),
            success=conf >= self.threshold,
            target=labels,
            extras={
                "label": labels,
                "confidence": conf,
                "steps": reached,
                "seconds": seconds,
                "threshold": self.threshold,
            },
        )

    def _optimise(
        self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Adam ascent of one chunk of images: ``(best images, their confidence, step each reached the threshold)``."""
        n, device = labels.numel(), x.device
        x = x.requires_grad_(True)
        with eval_mode(model):
            # Adam by hand (8 lines): torch.optim's first step imports torch._dynamo (~6 s cold).
            m1 = torch.zeros_like(x)
            m2 = torch.zeros_like(x)
            best = x.detach().clone()
            best_conf = torch.zeros(n, device=device)
            reached = torch.full((n,), -1, dtype=torch.long, device=device)
            for step in range(self.steps):
                z = model(x)
                logp = F.log_softmax(z, 1).gather(1, labels[:, None]).squeeze(1)
                conf = logp.detach().exp()
                if self.objective == "log_odds":
                    others = z.scatter(1, labels[:, None], float("-inf"))
                    logp = z.gather(1, labels[:, None]).squeeze(1) - others.logsumexp(1)
                improved = conf > best_conf
                best[improved] = x.detach()[improved]
                best_conf = torch.where(improved, conf, best_conf)
                newly = (conf >= self.threshold) & (reached < 0)
                reached[newly] = step
                active = (best_conf < self.threshold).float()
                if not bool(active.any()):
                    break
                loss = -(logp * active).sum()
                if self.tv_weight > 0:
                    loss = loss + self.tv_weight * (total_variation(x) * active).sum()
                (grad,) = torch.autograd.grad(loss, x)
                with torch.no_grad():
                    m1.mul_(0.9).add_(grad, alpha=0.1)
                    m2.mul_(0.999).addcmul_(grad, grad, value=0.001)
                    t = step + 1
                    x.sub_(self.lr * (m1 / (1 - 0.9**t)) / ((m2 / (1 - 0.999**t)).sqrt() + 1e-8))
                    if self.blur_sigma is not None and (step + 1) % self.blur_every == 0:
                        x.copy_(torch.where(active.bool().view(-1, 1, 1, 1), gaussian_blur(x, self.blur_sigma), x))
                    x.clamp_(0.0, 1.0)
            with torch.no_grad():
                conf = F.softmax(model(best), 1).gather(1, labels[:, None]).squeeze(1)
        return best.detach(), conf, reached
