"""Audit step ``attacks_features``: feature adversaries (Sabour et al. 2016) and their curves.

Fills ``report["attacks"]["feature_adversary"]``:

* the main run: L-BFGS-B feature adversaries of ``n`` test images (seeded choice) at one layer
  and delta, guides drawn (seeded) from the *test* split among the images not used as sources
  and of another true class; ``success_rate`` is the guide-label agreement (the model labels
  the adversary as it labels the guide); the representation analysis of
  :mod:`attacks.representation` (kNN references: the training split's features);
* ``curves[layer][variant][delta]``: guide-label agreement and distance-ratio median / p10 /
  p90 for the variants ``lbfgs``, ``feature-fgrad``, ``feature-linear``, ``label-opt``.

Options (``ctx.options.extra``): ``feature_layer`` (main layer; default the head's input),
``feature_delta`` (default from the data: 0.3 on near-binary digits, 8/255 on natural images),
``feature_n`` (200 on the demo LeNet, scaled with the model's cost, at least 100), ``feature_max_iter`` (50), ``feature_curve_layers`` (default the deepest
spatial stage and the head's input), ``feature_curve_deltas`` (0.05 to 0.3, or 4/255 to 16/255),
``feature_curve_n`` (24, scaled, at least 16), ``feature_curve_max_iter`` (25),
``feature_full`` (True: curves on ``feature_n`` images with ``feature_max_iter`` iterations).
Quick mode shrinks everything to a smoke run.

Gives an :class:`AttackSet` with ``feature_adversary`` (artifact ``attack_feature_adversary``)
to the detectors step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from guard.attacks.feature_adversary import VARIANTS, FeatureAdversary, sample_guides
from guard.attacks.representation import representation_report, summarize
from guard.audit.step import AttackSet, AttackStep, AuditContext
from guard.core.data import Split
from guard.core.features import default_feature_layers

__all__ = ["FeatureAdversaryStep", "feature_curves", "default_layers"]

log = logging.getLogger(__name__)

NAME = "feature_adversary"


def default_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The deepest spatial stage and the head's input (:func:`guard.core.features.default_feature_layers`):
    ``conv2`` and ``fc2:input`` on the demo net, ``layer3`` and ``linear:input`` on a CIFAR ResNet."""
    return default_feature_layers(model, example)[-2:]


def _pick(test: Split, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded source indices and guide indices (test split, another true class, disjoint)."""
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))
    n = min(n, len(test) // 2)
    src, pool = perm[:n], perm[n:]
    gi = sample_guides(test.y[src], test.y[pool], seed=seed + 1)
    return src, pool[gi]


def feature_curves(
    model: nn.Module,
    test: Split,
    *,
    layers: Sequence[str],
    deltas: Sequence[float] = (0.05, 0.1, 0.2, 0.3),
    variants: Sequence[str] = VARIANTS,
    n: int = 24,
    max_iter: int = 25,
    seed: int = 0,
) -> dict[str, Any]:
    """Guide-label agreement and distance-ratio percentiles over layers x variants x deltas."""
    src, gid = _pick(test, n, seed)
    x, g = test.x[src], test.x[gid]
    curves: dict[str, Any] = {}
    for layer in layers:
        for variant in variants:
            for delta in deltas:
                t0 = time.perf_counter()
                res = FeatureAdversary(layer=layer, delta=float(delta), variant=variant, max_iter=max_iter).generate(
                    model, x, g, y=test.y[src]
                )
                curves.setdefault(layer, {}).setdefault(variant, {})[str(delta)] = {
                    "guide_label_agreement": res.success_rate,
                    "distance_ratio": summarize(res.extras["distance_ratio"]),
                    "objective_decrease": summarize(
                        1 - res.extras["objective_end"] / res.extras["objective_start"].clamp_min(1e-12)
                    ),
                    "iterations": res.extras["iterations"],
                    "seconds": round(time.perf_counter() - t0, 3),
                }
    return {
        "n": int(src.numel()),
        "max_iter": max_iter,
        "guides": "test split, another true class, seeded",
        "by_layer": curves,
    }


class FeatureAdversaryStep(AttackStep):
    """Feature adversaries (Sabour et al. 2016) at one layer and delta, plus the curves."""

    name = "attacks_features"
    attack_names = (NAME,)

    def run(self, ctx: AuditContext) -> AttackSet:
        return _run(ctx)


def _run(ctx: AuditContext) -> AttackSet:
    opts, extra = ctx.options, ctx.options.extra
    quick = opts.quick
    layers = list(extra.get("feature_curve_layers") or default_layers(ctx.model, ctx.test.x[:2]))
    layer = str(extra.get("feature_layer") or layers[-1])
    delta = float(extra.get("feature_delta", ctx.defaults.get("feature_delta", 0.3)))
    n = int(extra.get("feature_n", 16 if quick else ctx.scaled(200, 100)))
    max_iter = int(extra.get("feature_max_iter", 8 if quick else 50))
    full = bool(extra.get("feature_full", False))
    t0 = time.perf_counter()
    src, gid = _pick(ctx.test, n, opts.seed)
    device = torch.device(opts.device)
    x, g, y = ctx.test.x[src].to(device), ctx.test.x[gid].to(device), ctx.test.y[src].to(device)
    attack = FeatureAdversary(layer=layer, delta=delta, max_iter=max_iter)
    res = attack.generate(ctx.model, x, g, y=y)
    seconds = time.perf_counter() - t0
    res.extras["test_index"] = src
    res.extras["guide_index"] = gid
    res.extras["source"] = x  # the clean sources, saved with the adversaries (report.html shows them side by side)
    train = ctx.train if not quick else Split(ctx.train.x[:1000], ctx.train.y[:1000])
    rep = representation_report(ctx.model, layer, x, res.x_adv, g, train_x=train.x.to(device), train_y=train.y)
    ctx.save_attack(NAME, res, {"layer": layer, "delta": delta})
    t1 = time.perf_counter()
    if quick:
        curves = feature_curves(
            ctx.model,
            ctx.test,
            layers=[layer],
            deltas=(delta,),
            variants=("lbfgs", "feature-fgrad"),
            n=8,
            max_iter=5,
            seed=opts.seed,
        )
    else:
        curves = feature_curves(
            ctx.model,
            ctx.test,
            layers=layers,
            deltas=tuple(extra.get("feature_curve_deltas", ctx.defaults.get("feature_deltas", (0.05, 0.1, 0.2, 0.3)))),
            n=n if full else int(extra.get("feature_curve_n", ctx.scaled(24, 16))),
            max_iter=max_iter if full else int(extra.get("feature_curve_max_iter", 25)),
            seed=opts.seed,
        )
    ctx.report.setdefault("attacks", {})[NAME] = {
        "success_rate": res.success_rate,
        "n": len(res),
        "seconds": round(seconds, 3),
        "params": attack.params(),
        "layer": layer,
        "delta": delta,
        "guides": "test split: images not used as sources, of another true class (seeded)",
        "guide_label_agreement": res.success_rate,
        "distance_ratio": summarize(res.extras["distance_ratio"]),
        "linf_max": float((res.x_adv - x).abs().max()),
        "representation": rep["summary"],
        "curves": curves,
        "curves_seconds": round(time.perf_counter() - t1, 3),
    }
    log.info(
        "feature adversary: agreement %.3f, median distance ratio %.3f",
        res.success_rate,
        float(res.extras["distance_ratio"].median()),
    )
    return AttackSet({NAME: res})
