"""Fresh attacks for each hardening round: a table of configured ``guard.attacks`` instances.

Nguyen et al. (2015), section 3.3: each round evolves new fooling images against the model of
that round. The round schedule is :func:`round_attack_table`: one configured instance of the
library's own attack classes per name, sized by an :class:`AttackBudget`, so a fix or a
speed-up in ``guard.attacks`` reaches ``harden`` too:

- ``fooling_gradient``: :class:`~guard.attacks.FoolingGradient` (gradient ascent on the log-odds);
- ``fooling_direct`` / ``fooling_cppn``: :class:`~guard.attacks.FoolingEvolution` (MAP-Elites with
  the direct and the CPPN encoding, one archive cell per real class);
- ``universal_patch``: :class:`~guard.attacks.UniversalPatch` fitted on the round's clean images;
- ``random_patch``: :class:`~guard.attacks.RandomPatch`;
- ``pgd``: :class:`~guard.attacks.LinfPGD`.

Confidences are the softmax over every output of the model (the n real classes, plus the
reject class once the head has grown), and "fooled" always means a *real* class wins: the
fooling generators only get cells for the real classes, and the input attacks take
``real_classes=n`` (their loss and success never count the reject class).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from guard.attacks import FoolingEvolution, FoolingGradient, LinfPGD, RandomPatch, UniversalPatch
from guard.core.budget import data_defaults
from guard.core.models import eval_mode, inference_batch, model_device
from guard.core.registry import attack_names
from guard.core.validation import check_int

__all__ = [
    "ROUND_ATTACKS",
    "DEFAULT_ATTACKS",
    "FOOLING_ATTACKS",
    "PATCH_ATTACKS",
    "AttackBudget",
    "RoundAttackSet",
    "check_attacks",
    "round_attack_table",
    "generate_round_attacks",
    "score_attack_set",
]

# The names are the audit's (guard.core.registry: each is one report.json attack name; the
# registry's round_attack flag marks the ones this table runs).
FOOLING_ATTACKS = attack_names(kind="fooling", round_attack=True)
PATCH_ATTACKS = attack_names(kind="patch", round_attack=True)
ROUND_ATTACKS = FOOLING_ATTACKS + PATCH_ATTACKS + attack_names(kind="gradient", round_attack=True)
#: what a round runs unless told otherwise: every fooling generator and the universal patch
DEFAULT_ATTACKS = FOOLING_ATTACKS + ("universal_patch",)


@dataclass(frozen=True)
class AttackBudget:
    """How much each attack does per round.

    Attributes:
        per_class: fooling images per class: gradient-ascent samples per class; the evolution
            population is ``per_class`` children per class per generation.
        gradient_steps: Adam steps of ``fooling_gradient``.
        generations: MAP-Elites generations of ``fooling_direct`` and ``fooling_cppn``.
        patch_images: clean images patched by ``universal_patch`` / ``random_patch`` / ``pgd``.
        patch_steps: optimisation steps of ``universal_patch`` (PGD takes a quarter of them).
        patch_area: patch size as a fraction of the image area (0.08: 8x8 on 28x28).
        evolved_extra: besides the elites, up to this many evolved children that reached
            P(real class) >= ``extra_threshold`` on the way (a seeded sample), per evolution attack.
        extra_threshold: the confidence those extra children need.
        pgd_eps: L-inf budget of ``pgd``; None: from the data (0.3 on near-binary digits, 8/255
            on natural images, :func:`guard.core.budget.data_defaults`).
        population: children per generation of ``fooling_direct`` / ``fooling_cppn``; None
            (default): ``per_class`` times the number of classes (1,000 classes at 224 px would
            make that 1,000 forward passes per generation).
    """

    per_class: int = 4
    gradient_steps: int = 60
    generations: int = 150
    patch_images: int = 200
    patch_steps: int = 60
    patch_area: float = 0.08
    evolved_extra: int = 200
    extra_threshold: float = 0.9
    pgd_eps: float | None = None
    population: int | None = None

    @classmethod
    def quick(cls) -> AttackBudget:
        return cls(per_class=1, gradient_steps=10, generations=10, patch_images=32, patch_steps=8, evolved_extra=10)

    def scaled(self, factor: float) -> AttackBudget:
        return replace(
            self,
            gradient_steps=max(1, int(self.gradient_steps * factor)),
            generations=max(1, int(self.generations * factor)),
            patch_steps=max(1, int(self.patch_steps * factor)),
        )


@dataclass
class RoundAttackSet:
    """Images one round's attacks produced.

    Attributes:
        x: (N, C, H, W) in [0, 1], on the CPU.
        kind: int64 (N,), index into ``names``.
        target: int64 (N,), the class a fooling image aimed at (-1 for patches / PGD).
        source: int64 (N,), the true label of the clean image a patch / PGD started from (-1
            for fooling images).
        names: the attack names, in ``kind`` order.
        seconds: generation time per attack.
    """

    x: torch.Tensor
    kind: torch.Tensor
    target: torch.Tensor
    source: torch.Tensor
    names: list[str]
    seconds: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def mask(self, names: Sequence[str]) -> torch.Tensor:
        ids = [i for i, n in enumerate(self.names) if n in names]
        return torch.isin(self.kind, torch.tensor(ids, dtype=torch.long))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"x": self.x, "kind": self.kind, "target": self.target, "source": self.source}

    @classmethod
    def from_tensors(
        cls, t: dict[str, torch.Tensor], names: list[str], seconds: dict[str, float] | None = None
    ) -> RoundAttackSet:
        return cls(t["x"], t["kind"].long(), t["target"].long(), t["source"].long(), list(names), dict(seconds or {}))


def check_attacks(attacks: Sequence[str] | str) -> tuple[str, ...]:
    """Validate the attack list: non-empty, known names, no duplicates."""
    if isinstance(attacks, str):
        attacks = [a for a in attacks.split(",") if a.strip()] if attacks.strip() else []
    try:
        names = tuple(str(a).strip() for a in attacks)
    except TypeError as err:
        raise TypeError(f"attacks must be a sequence of attack names; got {type(attacks).__name__}.") from err
    if not names:
        raise ValueError(
            f"attacks must name at least one round attack; got an empty list. Choose from {', '.join(ROUND_ATTACKS)}."
        )
    unknown = [a for a in names if a not in ROUND_ATTACKS]
    if unknown:
        raise ValueError(f"unknown round attack(s) {unknown}; expected names from {', '.join(ROUND_ATTACKS)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"attacks lists a name twice: {list(names)}.")
    return names


def round_attack_table(
    budget: AttackBudget, *, num_classes: int, seed: int, eps: float | None = None
) -> dict[str, Any]:
    """The round schedule: attack name -> a configured instance of a ``guard.attacks`` class.

    The fooling generators are called ``attack(model, shape=..., classes=range(n))``; the input
    attacks are fitted on and applied to the round's clean images. ``eps``: PGD's budget when
    ``budget.pgd_eps`` is None (default 0.3).
    """
    n = num_classes
    pgd_eps = budget.pgd_eps if budget.pgd_eps is not None else (eps if eps is not None else 0.3)
    if budget.population is not None:
        check_int(budget.population, "population", "AttackBudget", low=1)
    evolution = dict(
        population=budget.population or budget.per_class * n,
        generations=budget.generations,
        threshold=0.99,
        stop_when_done=False,
        extra_samples=budget.evolved_extra,
        extra_threshold=budget.extra_threshold,
    )
    return {
        "fooling_gradient": FoolingGradient(
            steps=budget.gradient_steps, lr=0.1, threshold=0.99, samples_per_class=budget.per_class, seed=seed
        ),
        "fooling_direct": FoolingEvolution(encoding="direct", seed=seed + 1, **evolution),
        "fooling_cppn": FoolingEvolution(encoding="cppn", seed=seed + 2, **evolution),
        "universal_patch": UniversalPatch.from_params(
            size=budget.patch_area,
            loss="paper",
            lr=0.1,
            steps=budget.patch_steps,
            val_fraction=0.0,
            eval_every=max(1, budget.patch_steps),
            real_classes=n,
            seed=seed + 3,
        ),
        "random_patch": RandomPatch(size=budget.patch_area, real_classes=n, seed=seed + 4),
        "pgd": LinfPGD(
            eps=pgd_eps, steps=max(1, budget.patch_steps // 4), early_stop=False, real_classes=n, seed=seed + 5
        ),
    }


def generate_round_attacks(
    model: nn.Module,
    attacks: Sequence[str],
    *,
    num_classes: int,
    image_shape: tuple[int, ...],
    pool: tuple[torch.Tensor, torch.Tensor],
    budget: AttackBudget,
    seed: int,
    progress: bool = False,
) -> RoundAttackSet:
    """Run each named attack of :func:`round_attack_table` against ``model`` (weights untouched).

    Args:
        model: the current model (n or n+1 outputs).
        attacks: names from :data:`ROUND_ATTACKS` (checked).
        num_classes: n, the number of real classes.
        image_shape: (C, H, W).
        pool: clean ``(x, y)`` that the input attacks start from (``budget.patch_images`` drawn).
        budget: sizes and steps.
        seed: seeds the draw from the pool and every attack.
    """
    from tqdm.auto import tqdm

    names = list(check_attacks(attacks))
    seed = int(seed) % (2**31 - 16)
    px, py = pool
    table = round_attack_table(budget, num_classes=num_classes, seed=seed, eps=data_defaults(px)["eps"])
    device = model_device(model)
    xs, kinds, targets, sources, seconds = [], [], [], [], {}
    with eval_mode(model):
        for i, name in enumerate(tqdm(names, desc="attacks", unit="attack", disable=not progress, leave=False)):
            attack = table[name]
            t0 = time.perf_counter()
            if attack.needs_images:
                idx = torch.randperm(px.shape[0], generator=torch.Generator().manual_seed(seed + 17 * i))[
                    : budget.patch_images
                ]
                xb, yb = px[idx].to(device), py[idx].to(device)
                res = attack.fit(model, xb)(model, xb, yb)
                x, source = res.x_adv, yb.cpu()
                target = torch.full_like(source, -1)
            else:
                res = attack(model, shape=tuple(image_shape), classes=range(num_classes))
                x, target = res.x_adv, res.extras["label"].cpu().long()
                source = torch.full_like(target, -1)
            seconds[name] = time.perf_counter() - t0
            xs.append(x.detach().float().clamp(0, 1).cpu())
            kinds.append(torch.full((x.shape[0],), i, dtype=torch.long))
            targets.append(target)
            sources.append(source.long())
    return RoundAttackSet(torch.cat(xs), torch.cat(kinds), torch.cat(targets), torch.cat(sources), names, seconds)


def _class_probs(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    device = model_device(model)
    batch = inference_batch(x, batch)
    with torch.no_grad(), eval_mode(model):
        return torch.cat([model(x[i : i + batch].to(device)).softmax(1).cpu() for i in range(0, x.shape[0], batch)])


def score_attack_set(
    model: nn.Module, s: RoundAttackSet, num_classes: int, *, threshold: float = 0.99
) -> dict[str, float | int | None]:
    """How well ``s`` fools ``model`` (n or n+1 outputs; index n = reject when present).

    Returns ``fooling_classes_ge99`` (share of the n classes for which some fooling image in
    ``s`` gets P(class) >= threshold), ``fooling_median_confidence`` (median over classes of
    the best fooling image's P(class), as Nguyen et al. report it), ``patch_fooling_rate``
    (share of patched images predicted as a real class other than their true label), and
    ``rejected_share`` (share of all images predicted as reject); per-attack breakdowns too.
    """
    n = num_classes
    probs = _class_probs(model, s.x)
    pred = probs.argmax(1)
    out: dict[str, float | int | None] = {"n": len(s)}
    fool = s.mask(FOOLING_ATTACKS)
    if bool(fool.any()):
        best = probs[fool][:, :n].max(0).values  # per class: the best any fooling image reaches
        out["fooling_classes_ge99"] = float((best >= threshold).float().mean())
        out["fooling_classes_ge99_count"] = int((best >= threshold).sum())
        out["fooling_median_confidence"] = float(best.median())
        out["fooling_top_confidence_median"] = float(probs[fool][:, :n].max(1).values.median())
        for i, name in enumerate(s.names):
            m = s.kind == i
            if name in FOOLING_ATTACKS and bool(m.any()):
                out[f"fooling_classes_ge99_count_{name}"] = int((probs[m][:, :n].max(0).values >= threshold).sum())
    else:
        out.update(fooling_classes_ge99=None, fooling_classes_ge99_count=None, fooling_median_confidence=None)
    patch = s.mask(PATCH_ATTACKS)
    if bool(patch.any()):
        pp, src = pred[patch], s.source[patch]
        out["patch_fooling_rate"] = float(((pp != src) & (pp < n)).float().mean())
    else:
        out["patch_fooling_rate"] = None
    out["rejected_share"] = float((pred == n).float().mean()) if probs.shape[1] > n else 0.0
    for i, name in enumerate(s.names):
        m = s.kind == i
        if bool(m.any()):
            out[f"rejected_share_{name}"] = float((pred[m] == n).float().mean()) if probs.shape[1] > n else 0.0
    return out
