"""Analyses of patch attacks from G2LVAP's section on effectiveness.

* :func:`fooling_rate_repeated` / :func:`fooling_vs_area`: fooling rate (the model's label on
  the patched image differs from its label on the clean image) with mean and standard
  deviation over repetitions of random placement (the paper's Figure 4).
* :func:`class_comparison`: each patch alone on a black canvas at a position of a sliding grid
  is classified as some class c; how often does the patched image at the same position take
  class c too (the patch as the most salient thing the network sees)?
* :func:`pairwise_diversity`: pairwise SSIM and PSNR between sampled patches.
* :func:`latent_interpolation`: fooling rate of patches along a line between two latents.

SSIM is written here in torch (Wang et al. 2004, Gaussian window sigma 1.5, C1 = (0.01 L)^2,
C2 = (0.03 L)^2, L = 1) because neither scikit-image nor torchmetrics is a dependency and the
patches are tiny (3 to 9 pixels): the window is shrunk to the patch side (odd) so that SSIM
of a 3x3 patch is still defined.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from guard.attacks.patching import apply_patches, grid_positions, random_positions
from guard.core.models import eval_mode, predict_labels
from guard.core.validation import check_images, check_int

__all__ = [
    "ssim",
    "psnr",
    "pairwise_diversity",
    "class_comparison",
    "latent_interpolation",
    "fooling_rate_repeated",
    "fooling_vs_area",
    "patch_sampler",
]

Sampler = Callable[[int, torch.Generator], torch.Tensor]


def _gaussian_window(size: int, sigma: float, channels: int, device: torch.device) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(
    a: torch.Tensor, b: torch.Tensor, *, window_size: int = 7, sigma: float = 1.5, data_range: float = 1.0
) -> torch.Tensor:
    """Mean SSIM per pair of images (N,) for batches (N, C, H, W) in [0, data_range].

    The Gaussian window is clipped to the largest odd size <= min(H, W).
    """
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"a and b must be 4-D tensors of the same shape; got {tuple(a.shape)} and {tuple(b.shape)}.")
    c = a.shape[1]
    k = min(window_size, a.shape[-1], a.shape[-2])
    k = k if k % 2 == 1 else k - 1
    win = _gaussian_window(k, sigma, c, a.device)
    a, b = a.float(), b.float()
    mu_a, mu_b = F.conv2d(a, win, groups=c), F.conv2d(b, win, groups=c)
    s_aa = F.conv2d(a * a, win, groups=c) - mu_a**2
    s_bb = F.conv2d(b * b, win, groups=c) - mu_b**2
    s_ab = F.conv2d(a * b, win, groups=c) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    smap = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2))
    return smap.flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per pair (N,); identical pairs give +inf."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def pairwise_diversity(patches: torch.Tensor, *, max_pairs: int = 20000, seed: int = 0) -> dict[str, Any]:
    """SSIM and PSNR over all pairs i < j of ``patches`` (a random subset if more than ``max_pairs``).

    Returns:
        ``{"n_patches", "n_pairs", "ssim_median", "ssim_mean", "psnr_median", "psnr_mean",
        "identical_pairs"}`` (PSNR statistics over non-identical pairs).
    """
    n = int(patches.shape[0])
    if n < 2:
        raise ValueError(f"pairwise_diversity needs at least 2 patches; got {n}.")
    i, j = torch.triu_indices(n, n, 1)
    if i.numel() > max_pairs:
        sel = torch.randperm(i.numel(), generator=torch.Generator().manual_seed(seed))[:max_pairs]
        i, j = i[sel], j[sel]
    s, p = [], []
    for lo in range(0, i.numel(), 4096):
        a, b = patches[i[lo : lo + 4096]], patches[j[lo : lo + 4096]]
        s.append(ssim(a, b))
        p.append(psnr(a, b))
    s_all, p_all = torch.cat(s), torch.cat(p)
    finite = torch.isfinite(p_all)
    return {
        "n_patches": n,
        "n_pairs": int(i.numel()),
        "ssim_median": float(s_all.median()),
        "ssim_mean": float(s_all.mean()),
        "psnr_median": float(p_all[finite].median()) if finite.any() else float("inf"),
        "psnr_mean": float(p_all[finite].mean()) if finite.any() else float("inf"),
        "identical_pairs": int((~finite).sum()),
    }


def patch_sampler(attack: Any, channels: int = 1, image_size: tuple[int, int] = (28, 28)) -> Sampler:
    """A ``(n, generator) -> patches`` function for PatchGAN, UniversalPatch or RandomPatch."""
    from guard.attacks.random_patch import RandomPatch

    if isinstance(attack, RandomPatch):
        return lambda n, gen: attack.sample(n, channels=channels, image_size=image_size, generator=gen)
    return lambda n, gen: attack.sample(n, generator=gen)


@torch.no_grad()
def fooling_rate_repeated(
    model: nn.Module,
    x: torch.Tensor,
    sampler: Sampler,
    *,
    repetitions: int = 10,
    seed: int = 0,
    y: torch.Tensor | None = None,
    batch_size: int = 1000,
) -> dict[str, Any]:
    """Fooling rate over ``repetitions`` draws of patches and random positions.

    Args:
        model: the classifier.
        x: images (N, C, H, W).
        sampler: ``(n, generator) -> (n, C, s, s)`` patches (see :func:`patch_sampler`).
        repetitions: independent draws of patches and positions.
        seed: seed of draw r is ``seed + r``.
        y: true labels: also report the rate over the images the model classifies correctly.

    Returns:
        ``{"mean", "std", "rates", "mean_correct", "std_correct", "n", "n_correct"}``: rates count
        images whose label on the patched image differs from the label on the clean image.
    """
    check_images(x, "x")
    repetitions = check_int(repetitions, "repetitions", "fooling_rate_repeated", low=1)
    device = next((p.device for p in model.parameters()), x.device)
    x = x.to(device)
    with eval_mode(model):
        clean = predict_labels(model, x, batch_size=batch_size)
        correct = (clean == y.to(device)) if y is not None else None
        rates, rates_c = [], []
        for r in range(repetitions):
            gen = torch.Generator().manual_seed(seed + r)
            patches = sampler(int(x.shape[0]), gen).to(device)
            pos = random_positions(int(x.shape[0]), int(patches.shape[-1]), x.shape[-2:], generator=gen, device=device)
            fooled = (
                torch.cat(
                    [
                        model(
                            apply_patches(x[i : i + batch_size], patches[i : i + batch_size], pos[i : i + batch_size])
                        ).argmax(1)
                        for i in range(0, x.shape[0], batch_size)
                    ]
                )
                != clean
            )
            rates.append(float(fooled.float().mean()))
            if correct is not None and correct.any():
                rates_c.append(float(fooled[correct].float().mean()))
    t = torch.tensor(rates)
    out: dict[str, Any] = {
        "mean": float(t.mean()),
        "std": float(t.std(unbiased=False)),
        "rates": rates,
        "n": int(x.shape[0]),
    }
    if rates_c:
        tc = torch.tensor(rates_c)
        out.update(
            mean_correct=float(tc.mean()), std_correct=float(tc.std(unbiased=False)), n_correct=int(correct.sum())
        )
    return out


def fooling_vs_area(
    model: nn.Module,
    x: torch.Tensor,
    make_attack: Callable[[float], Any],
    areas: list[float],
    *,
    repetitions: int = 10,
    seed: int = 0,
    y: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """Fooling-rate-vs-area curve: ``make_attack(area)`` returns a fitted patch attack per area."""
    curve = []
    for area in areas:
        attack = make_attack(area)
        stats = fooling_rate_repeated(
            model,
            x,
            patch_sampler(attack, int(x.shape[1]), tuple(x.shape[-2:])),
            repetitions=repetitions,
            seed=seed,
            y=y,
        )
        curve.append({"area": area, "side": int(getattr(attack, "side_", 0)) or None, **stats})
    return curve


@torch.no_grad()
def class_comparison(
    model: nn.Module, x: torch.Tensor, patches: torch.Tensor, *, stride: int | None = None, batch_size: int = 1000
) -> dict[str, Any]:
    """G2LVAP's class comparison over a sliding grid of positions.

    For every image i (with patch i, or one patch for all) and every grid position g: c = the
    model's class of the patch alone on a black canvas at g; p = its class of image i patched
    at g. Reports how often p == c over all (image, position) pairs and over the fooled pairs
    (p differs from the clean label), and the fooling rate per grid position.

    Args:
        stride: grid step in pixels (default: the patch side).
    """
    check_images(x, "x")
    n, c, h, w = x.shape
    side = int(patches.shape[-1])
    stride = side if stride is None else check_int(stride, "stride", "class_comparison", low=1)
    grid = grid_positions(side, (h, w), stride)
    device = next((p.device for p in model.parameters()), x.device)
    x, patches = x.to(device), patches.to(device)
    same, same_fooled, fooled_total, per_pos = 0, 0, 0, []
    with eval_mode(model):
        clean = predict_labels(model, x, batch_size=batch_size)
        canvas = torch.zeros_like(x)
        for g in grid:
            pos = g.view(1, 2).to(device)
            cls_canvas = (
                predict_labels(model, apply_patches(canvas, patches, pos), batch_size=batch_size)
                if patches.shape[0] == n
                else predict_labels(model, apply_patches(canvas[:1], patches, pos), batch_size=batch_size).expand(n)
            )
            pred = predict_labels(model, apply_patches(x, patches, pos), batch_size=batch_size)
            fooled = pred != clean
            match = pred == cls_canvas
            same += int(match.sum())
            same_fooled += int((match & fooled).sum())
            fooled_total += int(fooled.sum())
            per_pos.append(float(fooled.float().mean()))
    total = n * int(grid.shape[0])
    return {
        "positions": int(grid.shape[0]),
        "stride": stride,
        "pairs": total,
        "patched_takes_canvas_class": same / total,
        "fooled_takes_canvas_class": same_fooled / fooled_total if fooled_total else float("nan"),
        "fooling_rate": fooled_total / total,
        "fooling_rate_per_position": per_pos,
        "grid": grid.tolist(),
    }


@torch.no_grad()
def latent_interpolation(
    model: nn.Module, gan: Any, x: torch.Tensor, *, points: int = 9, seed: int = 0, batch_size: int = 1000
) -> dict[str, Any]:
    """Fooling rate of a fitted PatchGAN's patches along z(t) = (1 - t) z0 + t z1, t in [0, 1].

    z0 and z1 are drawn from U[0, 1]^latent_dim with ``seed``; at each t every image gets the
    same patch G(z(t)) at a random position (the same positions for every t).
    """
    check_images(x, "x")
    points = check_int(points, "points", "latent_interpolation", low=2)
    gen = torch.Generator().manual_seed(seed)
    d = gan.generator_.latent_dim
    z0, z1 = torch.rand(1, d, generator=gen), torch.rand(1, d, generator=gen)
    device = next((p.device for p in model.parameters()), x.device)
    x = x.to(device)
    pos = random_positions(int(x.shape[0]), gan.side_, x.shape[-2:], generator=gen, device=device)
    ts = torch.linspace(0, 1, points)
    rates = []
    with eval_mode(model):
        clean = predict_labels(model, x, batch_size=batch_size)
        for t in ts:
            patch = gan.sample(1, z=(1 - t) * z0 + t * z1).to(device)
            pred = predict_labels(model, apply_patches(x, patch, pos), batch_size=batch_size)
            rates.append(float((pred != clean).float().mean()))
    return {
        "t": [round(float(t), 4) for t in ts],
        "fooling_rate": rates,
        "min": min(rates),
        "max": max(rates),
        "mean": sum(rates) / len(rates),
    }
