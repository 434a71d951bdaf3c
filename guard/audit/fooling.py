"""Audit step ``attacks_fooling``: fooling images (Nguyen et al. 2015) three ways.

Fills ``report["attacks"]`` entries ``fooling_gradient``, ``fooling_direct`` and
``fooling_cppn``. For each: ``success_rate`` = share of classes with at least one image at
>= ``threshold`` (99.99%) confidence; ``median_confidence`` over the archive (one elite per
class; for gradient ascent the best image per class); ``generations`` (evolution) or
``steps`` (gradient ascent); ``seconds``; ``n`` images handed to the detectors (elites plus
extra samples at the threshold, see :class:`guard.attacks.fooling_evolution.FoolingEvolution`);
and ``transfer``: how a second, independently trained model (a narrow DemoNet, seed + 1,
trained for ``transfer_epochs`` on the training split) labels the same images, when the
input is 28x28.

Settings: :class:`guard.audit.settings.FoolingSettings` (keys ``fooling_threshold``,
``fooling_classes``: a model with more classes is attacked on a seeded sample of that many,
:func:`target_classes`, and ``classes_attacked`` says how many; ``success_rate`` is over them;
``fooling_grad_steps``, ``fooling_grad_samples``, ``fooling_population``, ``fooling_generations``:
at most 1500 for both encodings, stopping 100 generations after all classes pass, so that the
reservoir collects extra positives; the CPPN settings ``fooling_cppn_hidden``,
``fooling_cppn_add_node``, ``fooling_refine_every`` / ``fooling_refine_steps``: Lamarckian
refinement of the CPPN elites still short of the threshold, :func:`guard.attacks.cppn_refine.refine_weights`;
``fooling_polish_steps`` / ``fooling_polish_starts``: a last refinement of the classes still short
after the generations, :func:`guard.attacks.cppn_refine.polish_genomes`, the CPPN entry's
``classes_fooled_before_polish`` and ``min_confidence_before_polish`` keep what evolution reached
without it; ``fooling_selection``, ``fooling_transfer``, ``transfer_epochs``). The tuning constants
and the measurements that chose them are in :mod:`guard.audit.settings`.

Gives an :class:`AttackSet` (``x_adv`` the images, ``success`` their confidence >= threshold,
``extras["label"]`` / ``["confidence"]``; artifacts ``attack_NAME``) to the detectors step.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from guard.attacks.base import AttackResult
from guard.attacks.cppn import MutationRates
from guard.attacks.fooling_evolution import CPPNOptions, FoolingEvolution, transfer_check
from guard.attacks.fooling_gradient import FoolingGradient
from guard.audit.step import AttackSet, AttackStep, AuditContext
from guard.core.models import DemoNet
from guard.core.registry import attack_names

__all__ = ["FoolingStep", "second_model"]

NAMES = attack_names(step="attacks_fooling")
GRADIENT, DIRECT, CPPN = NAMES  # gradient ascent, then evolution with the direct and the CPPN encoding

log = logging.getLogger(__name__)


def second_model(ctx: AuditContext, epochs: int) -> nn.Module | None:
    """A narrow DemoNet trained with another seed: the transfer target (None if shapes differ)."""
    from guard.training.classifier import train_classifier

    shape = tuple(ctx.train.x.shape[1:])
    if shape[1:] != (28, 28):
        return None
    num_classes = int(ctx.report.get("model", {}).get("num_classes", int(ctx.train.y.max()) + 1))
    torch.manual_seed(ctx.options.seed + 1)
    model = DemoNet(num_classes, in_channels=shape[0], width=8, hidden=32)
    train_classifier(model, ctx.train.x, ctx.train.y, epochs=epochs, lr=3e-3, seed=ctx.options.seed + 1, progress=False)
    return model.to(ctx.options.device).eval()


def target_classes(num_classes: int, cap: int, seed: int) -> torch.Tensor:
    """The classes the fooling step attacks: all of them up to ``cap``, else a seeded sample of ``cap``, sorted.

    Why a sample: gradient ascent costs ``steps x samples`` forward-backward passes per class,
    so 1,000 ImageNet classes at 224 px would take hours of CPU even in quick mode; the share of
    a uniform sample of classes that can be fooled estimates the share of all of them.
    """
    if num_classes <= cap:
        return torch.arange(num_classes)
    return torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))[:cap].sort().values


def _entry(
    res: AttackResult,
    cls: torch.Tensor,
    threshold: float,
    params: dict[str, Any],
    seconds: float,
    elite_conf: torch.Tensor,
    elite_label: torch.Tensor,
) -> dict[str, Any]:
    fooled = {int(c) for c, v in zip(elite_label.tolist(), elite_conf.tolist()) if v >= threshold}
    return {
        "success_rate": len(fooled) / int(cls.numel()),
        "classes_attacked": int(cls.numel()),
        "classes_fooled": sorted(fooled),
        "median_confidence": float(elite_conf.double().median()) if elite_conf.numel() else 0.0,
        "min_confidence": float(elite_conf.double().min()) if elite_conf.numel() else 0.0,
        "image_success_rate": res.success_rate,
        "n": len(res),
        "seconds": round(seconds, 3),
        "threshold": threshold,
        "params": params,
    }


class FoolingStep(AttackStep):
    """Fooling images by gradient ascent and by MAP-Elites with the direct and CPPN encodings."""

    name = "attacks_fooling"
    attack_names = NAMES

    def run(self, ctx: AuditContext) -> AttackSet:
        return _run(ctx)


def _run(ctx: AuditContext) -> AttackSet:
    opts, s = ctx.options, ctx.settings.fooling
    shape = tuple(int(d) for d in ctx.test.x.shape[1:])
    with torch.no_grad():
        num_classes = int(ctx.model(ctx.test.x[:1].to(opts.device)).shape[1])
    attacks = ctx.report.setdefault("attacks", {})
    results: dict[str, AttackResult] = {}
    cls = target_classes(num_classes, s.classes, opts.seed)

    attacks[GRADIENT], results[GRADIENT] = _gradient_ascent(ctx, shape, cls)
    ctx.save_attack(GRADIENT, results[GRADIENT])
    cppn_options = _cppn_options(s)
    # Both encodings run until every class has an image at the threshold (then 100 generations
    # more for the extra positives), at most 1,500 generations: a fixed 100 CPPN generations left
    # classes unfilled on some seeds (MNIST) and on natural images (2 of 10 on CIFAR-10 with 30 parents).
    for name, encoding in ((DIRECT, "direct"), (CPPN, "cppn")):
        attacks[name], results[name] = _evolution(ctx, encoding, shape, cls, cppn_options)
        ctx.save_attack(name, results[name])

    if s.transfer:
        _transfer(ctx, results, attacks)
    return AttackSet(results)


def _gradient_ascent(
    ctx: AuditContext, shape: tuple[int, ...], cls: torch.Tensor
) -> tuple[dict[str, Any], AttackResult]:
    """Gradient ascent: the best image per class is the "archive"; all samples go to the detectors."""
    opts, s = ctx.options, ctx.settings.fooling
    threshold = s.threshold
    grad = FoolingGradient(
        steps=s.grad_steps,
        lr=s.grad_lr,
        threshold=threshold,
        samples_per_class=s.grad_samples,
        seed=opts.seed,
        batch_size=s.grad_batch_size,
    )  # big models: bounded memory
    t0 = time.perf_counter()
    res = grad(ctx.model, shape=shape, classes=cls)
    sec = time.perf_counter() - t0
    conf = res.extras["confidence"].view(cls.numel(), grad.samples_per_class)
    best = conf.max(1).values.cpu()
    e = _entry(res, cls, threshold, grad.params(), sec, best, cls)
    reached = res.extras["steps"].view(cls.numel(), grad.samples_per_class).cpu()
    first = torch.where(reached >= 0, reached, torch.full_like(reached, grad.steps)).min(1).values
    # steps until every class had one image at the threshold (grad.steps: some class never did)
    e["steps"] = int(first.max()) + 1 if bool((first < grad.steps).all()) else grad.steps
    e["generations"] = e["steps"]
    e["images_at_threshold"] = int(res.success.sum())
    return e, res


def _cppn_options(s: Any) -> CPPNOptions:
    """The CPPN encoding's settings (the direct encoding runs with its defaults)."""
    # refine_steps only with refinement on, so that report.json keeps the default there when refine_every is 0
    refine = {"refine_every": s.refine_every, "refine_steps": s.refine_steps} if s.refine_every else {}
    return CPPNOptions(
        init_hidden=s.cppn_hidden,
        rates=MutationRates(add_node=s.cppn_add_node),
        polish_steps=s.polish_steps,
        polish_starts=s.polish_starts,
        **refine,
    )


def _evolution(
    ctx: AuditContext, encoding: str, shape: tuple[int, ...], cls: torch.Tensor, cppn_options: CPPNOptions
) -> tuple[dict[str, Any], AttackResult]:
    """MAP-Elites with one encoding ("direct" or "cppn"): the report entry and the result."""
    opts, s = ctx.options, ctx.settings.fooling
    threshold = s.threshold
    evo = FoolingEvolution(
        encoding=encoding,
        population=s.population,
        generations=s.generations,
        threshold=threshold,
        stop_when_done=True,
        extra_generations=s.extra_generations,
        parent_selection=s.selection,
        extra_samples=s.extra_samples,
        cppn=cppn_options if encoding == "cppn" else None,
        seed=opts.seed,
    )
    t0 = time.perf_counter()
    res = evo(ctx.model, shape=shape, classes=cls)
    sec = time.perf_counter() - t0
    ex = res.extras
    e = _entry(res, cls, threshold, evo.params(), sec, ex["elite_confidence"], ex["elite_label"])
    e.update(
        {
            "generations": ex["generations"],
            "generation_all_fooled": ex["generation_all_fooled"],
            "evaluations": ex["evaluations"],
            "refine_evaluations": ex["refine_evaluations"],
            "history": ex["history"][-20:],
        }
    )
    if "elite_confidence_before_polish" in ex:
        before = ex["elite_confidence_before_polish"]
        e.update(
            {
                "classes_fooled_before_polish": sorted(
                    int(c) for c, v in zip(ex["elite_label"].tolist(), before.tolist()) if v >= threshold
                ),
                "min_confidence_before_polish": float(before.double().min()) if before.numel() else 0.0,
                "polish_evaluations": ex["polish_evaluations"],
            }
        )
    return e, res


def _transfer(ctx: AuditContext, results: dict[str, AttackResult], attacks: dict[str, Any]) -> None:
    """Do the fooling images fool a second model? Into each attack's ``transfer`` entry."""
    s = ctx.settings.fooling
    t0 = time.perf_counter()
    other = second_model(ctx, s.transfer_epochs)
    if other is not None:
        for name, res in results.items():
            tr = transfer_check(other, res.x_adv, res.extras["label"], threshold=s.threshold)
            tr["second_model"] = "DemoNet(width=8, hidden=32), seed+1"
            attacks[name]["transfer"] = tr
    log.info("fooling transfer check: %.1f s", time.perf_counter() - t0)
