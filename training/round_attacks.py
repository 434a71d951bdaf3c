"""Fresh attacks for each hardening round, run against the CURRENT model.

Nguyen et al. (2015), section 3.3: each round evolves new fooling images against the model of
that round. The generators here are deliberately small and batched so that a round costs
seconds on a CPU:

- ``fooling_gradient``: gradient ascent on a sigmoid-parameterised image to maximise the
  softmax probability of a target class (Nguyen et al. 2015 sec. 3.6; Simonyan et al. 2014).
- ``fooling_direct``: MAP-Elites with the direct encoding (per-pixel mutation; one elite per
  class and archive, a child replaces the elite of every class it beats).
- ``fooling_cppn``: MAP-Elites with a compositional pattern-producing network encoding
  (fixed two-hidden-layer CPPN over (x, y, r, bias) with sine / sigmoid / Gaussian / linear
  nodes; weights and node functions mutate; topology growth of NEAT is left out).
- ``universal_patch``: a square patch optimised by gradient at random positions over clean
  images so that they go to another real class (LaVAN / G2LVAP-style localized patch).
- ``random_patch``: uniform-noise patches at random positions (the papers' baseline).
- ``pgd``: L-inf PGD (Madry et al. 2018) towards any other real class.

All confidences are the softmax over every output of the model (n real classes, plus the
reject class once the head has grown), and "fooled" means a *real* class wins, never reject.
The team's full attack classes (``attacks/``) are heavier; these generators are written here
(by hand, no library does MAP-Elites over a torch model batched like this) so that hardening
has a fixed, cheap budget per round. The attack list is a parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from guard.attacks.patching import apply_patches, random_positions
from guard.core.models import eval_mode

__all__ = ["ENGINES", "ROUND_ATTACKS", "DEFAULT_ATTACKS", "FOOLING_ATTACKS", "PATCH_ATTACKS", "AttackBudget", "RoundAttackSet",
           "check_attacks", "generate_round_attacks", "score_attack_set"]

FOOLING_ATTACKS = ("fooling_gradient", "fooling_direct", "fooling_cppn")
PATCH_ATTACKS = ("universal_patch", "random_patch")
ROUND_ATTACKS = FOOLING_ATTACKS + PATCH_ATTACKS + ("pgd",)
DEFAULT_ATTACKS = ("fooling_gradient", "fooling_direct", "fooling_cppn", "universal_patch")
ENGINES = ("builtin", "attacks")


@dataclass(frozen=True)
class AttackBudget:
    """How much each generator does per round.

    Attributes:
        per_class: fooling images per class (independent archives / restarts).
        gradient_steps: Adam steps of ``fooling_gradient``.
        generations: MAP-Elites generations of ``fooling_direct`` and ``fooling_cppn``.
        patch_images: clean images patched by ``universal_patch`` / ``random_patch`` / ``pgd``.
        patch_steps: optimisation steps of ``universal_patch`` (and PGD steps / 4).
        patch_side: patch side in pixels (8 on 28x28: 8% of the area).
        evolved_extra: besides the elites, up to this many evolved children that reached
            P(real class) >= 0.9 on the way (a seeded sample), per evolution attack.
    """

    per_class: int = 4
    gradient_steps: int = 60
    generations: int = 150
    patch_images: int = 200
    patch_steps: int = 60
    patch_side: int = 8
    evolved_extra: int = 200

    @classmethod
    def quick(cls) -> "AttackBudget":
        return cls(per_class=1, gradient_steps=10, generations=10, patch_images=32, patch_steps=8, evolved_extra=10)

    def scaled(self, factor: float) -> "AttackBudget":
        return replace(self, gradient_steps=max(1, int(self.gradient_steps * factor)),
                       generations=max(1, int(self.generations * factor)), patch_steps=max(1, int(self.patch_steps * factor)))


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
    def from_tensors(cls, t: dict[str, torch.Tensor], names: list[str], seconds: dict[str, float] | None = None) -> "RoundAttackSet":
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
        raise ValueError(f"attacks must name at least one round attack; got an empty list. Choose from {', '.join(ROUND_ATTACKS)}.")
    unknown = [a for a in names if a not in ROUND_ATTACKS]
    if unknown:
        raise ValueError(f"unknown round attack(s) {unknown}; expected names from {', '.join(ROUND_ATTACKS)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"attacks lists a name twice: {list(names)}.")
    return names


def _class_probs(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]).softmax(1) for i in range(0, x.shape[0], batch)])


# ---------------------------------------------------------------- fooling images

def _fooling_gradient(model: nn.Module, n: int, shape: tuple[int, ...], gen: torch.Generator, b: AttackBudget, device) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.arange(n).repeat_interleave(b.per_class)
    w = (torch.randn((len(target), *shape), generator=gen) * 0.5).to(device).requires_grad_(True)
    t = target.to(device)
    opt = torch.optim.Adam([w], lr=0.1)
    for _ in range(b.gradient_steps):
        logp = model(torch.sigmoid(w)).log_softmax(1)
        loss = -logp.gather(1, t[:, None]).sum()
        (grad,) = torch.autograd.grad(loss, [w])
        opt.zero_grad(set_to_none=True)
        w.grad = grad
        opt.step()
    return torch.sigmoid(w.detach()).cpu(), target


def _map_elites(model: nn.Module, n: int, genomes: torch.Tensor, render: Callable[[torch.Tensor], torch.Tensor],
                mutate: Callable[[torch.Tensor, torch.Generator], torch.Tensor], gen: torch.Generator, b: AttackBudget,
                device) -> tuple[torch.Tensor, torch.Tensor]:
    """MAP-Elites over ``per_class`` independent archives of one elite per class.

    ``genomes``: (k, n, G) initial genomes (CPU). Each generation every archive makes n
    children from uniformly chosen elites; an archive's elite of class c is replaced by the
    child with the highest P(c) when that beats the elite (Nguyen et al. 2015, sec. 2.3).
    """
    k = genomes.shape[0]
    elites = genomes.clone()
    fit = _class_probs(model, render(elites.view(k * n, -1)).to(device))[:, :n].cpu().view(k, n, -1)
    fit = fit[:, torch.arange(n), torch.arange(n)]  # (k, n): P(c) of archive j's elite of class c
    ar = torch.arange(k)[:, None]
    extra_g: list[torch.Tensor] = []
    extra_c: list[torch.Tensor] = []
    for _ in range(b.generations):
        parents = torch.randint(0, n, (k, n), generator=gen)
        children = mutate(elites[ar, parents], gen)  # (k, n, G)
        p = _class_probs(model, render(children.view(k * n, -1)).to(device))[:, :n].cpu().view(k, n, n)  # (k, child, class)
        if b.evolved_extra > 0:  # children that already fool the model well: more reject examples
            top, cls = p.reshape(k * n, n).max(1)
            hit = top >= 0.9
            if bool(hit.any()):
                extra_g.append(children.reshape(k * n, -1)[hit])
                extra_c.append(cls[hit])
        best, who = p.max(1)  # (k, class)
        better = best > fit
        if bool(better.any()):
            fit = torch.where(better, best, fit)
            elites = torch.where(better[..., None], children[ar, who], elites)
    genomes_out, target = elites.view(k * n, -1), torch.arange(n).repeat(k)
    if extra_g:
        eg, ec = torch.cat(extra_g), torch.cat(extra_c)
        pick = torch.randperm(eg.shape[0], generator=gen)[:b.evolved_extra]
        genomes_out, target = torch.cat([genomes_out, eg[pick]]), torch.cat([target, ec[pick]])
    return render(genomes_out).cpu(), target


def _fooling_direct(model, n, shape, gen, b, device):
    numel = math.prod(shape)

    def render(g: torch.Tensor) -> torch.Tensor:
        return g.view(-1, *shape)

    def mutate(g: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # Nguyen et al.: each pixel mutates with probability 0.1 (rate halving every 1000 gens omitted).
        hit = torch.rand(g.shape, generator=gen) < 0.1
        return (g + hit * torch.randn(g.shape, generator=gen) * 0.3).clamp_(0.0, 1.0)

    init = torch.rand((b.per_class, n, numel), generator=gen)
    x, target = _map_elites(model, n, init, render, mutate, gen, b, device)
    return x, target


_CPPN_IN, _CPPN_H = 4, 8
_CPPN_W = _CPPN_IN * _CPPN_H + _CPPN_H * _CPPN_H + _CPPN_H  # weights; then 2*_CPPN_H node-function ids
_CPPN_G = _CPPN_W + 2 * _CPPN_H


def _cppn_act(h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    # ids (B, H) in {0: sine, 1: sigmoid, 2: Gaussian, 3: linear (clipped)}
    acts = torch.stack([torch.sin(h), torch.sigmoid(h), torch.exp(-h * h), h.clamp(-3, 3)], -1)
    return acts.gather(-1, ids[:, None, :, None].expand(-1, h.shape[1], -1, 1)).squeeze(-1)


def _fooling_cppn(model, n, shape, gen, b, device):
    c, hh, ww = shape
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, hh), torch.linspace(-1, 1, ww), indexing="ij")
    coords = torch.stack([xs, ys, torch.sqrt(xs * xs + ys * ys), torch.ones_like(xs)], -1).view(1, hh * ww, _CPPN_IN)

    def render(g: torch.Tensor) -> torch.Tensor:
        bsz = g.shape[0]
        i = 0
        w1 = g[:, i:i + _CPPN_IN * _CPPN_H].view(bsz, _CPPN_IN, _CPPN_H); i += _CPPN_IN * _CPPN_H
        w2 = g[:, i:i + _CPPN_H * _CPPN_H].view(bsz, _CPPN_H, _CPPN_H); i += _CPPN_H * _CPPN_H
        w3 = g[:, i:i + _CPPN_H].view(bsz, _CPPN_H, 1); i += _CPPN_H
        ids = g[:, i:].round().long().clamp(0, 3)
        h1 = _cppn_act(coords.expand(bsz, -1, -1) @ w1, ids[:, :_CPPN_H])
        h2 = _cppn_act(h1 @ w2, ids[:, _CPPN_H:])
        out = torch.sigmoid(h2 @ w3 * 2.0).view(bsz, 1, hh, ww)
        return out.expand(-1, c, -1, -1).contiguous()

    def mutate(g: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        g = g.clone()
        w = g[..., :_CPPN_W]
        hit = torch.rand(w.shape, generator=gen) < 0.2
        g[..., :_CPPN_W] = w + hit * torch.randn(w.shape, generator=gen) * 0.5
        ids = g[..., _CPPN_W:]
        swap = torch.rand(ids.shape, generator=gen) < 0.05
        g[..., _CPPN_W:] = torch.where(swap, torch.randint(0, 4, ids.shape, generator=gen).float(), ids)
        return g

    k = b.per_class
    init = torch.cat([torch.randn((k, n, _CPPN_W), generator=gen) * 1.5,
                      torch.randint(0, 4, (k, n, 2 * _CPPN_H), generator=gen).float()], -1)
    return _map_elites(model, n, init, render, mutate, gen, b, device)


# ---------------------------------------------------------------- the team's attack classes (engine="attacks")

def _gen_seed(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=gen))


def _team_fooling_gradient(model, n, shape, gen, b, device):
    from guard.attacks.fooling_gradient import FoolingGradient

    res = FoolingGradient(steps=b.gradient_steps, samples_per_class=b.per_class, seed=_gen_seed(gen))(
        model, classes=list(range(n)), shape=tuple(shape))
    return res.x_adv.cpu(), res.extras["label"].cpu().long()


def _team_evolution(encoding: str):
    def run(model, n, shape, gen, b, device):
        from guard.attacks.fooling_evolution import FoolingEvolution

        with torch.no_grad():
            outputs = int(model(torch.zeros(1, *shape, device=device)).shape[1])
        # The archive covers every output (the reject class too, once the head has grown);
        # only elites of real classes are fooling images.
        res = FoolingEvolution(encoding=encoding, population=b.per_class * n, generations=b.generations, threshold=0.99,
                               stop_when_done=False, extra_samples=0, seed=_gen_seed(gen))(model, shape=tuple(shape), num_classes=outputs)
        label = res.extras["label"].cpu().long()
        keep = label < n
        return res.x_adv.cpu()[keep], label[keep]
    return run


# ---------------------------------------------------------------- patches and PGD

def _other_class_loss(logits: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    """-log P(some real class other than y): minimising it fools into a real class, not reject."""
    logp = logits.log_softmax(1)[:, :n]
    mask = F.one_hot(y, n).bool()
    return -torch.logsumexp(logp.masked_fill(mask, float("-inf")), 1)


def _universal_patch(model, n, x, y, gen, b, device):
    side = min(b.patch_side, x.shape[-1], x.shape[-2])
    w = (torch.randn((1, x.shape[1], side, side), generator=gen) * 0.5).to(device).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=0.2)
    xd, yd = x.to(device), y.to(device)
    for _ in range(b.patch_steps):
        idx = torch.randint(0, x.shape[0], (min(64, x.shape[0]),), generator=gen).to(device)
        pos = random_positions(len(idx), side, x.shape, generator=gen, device=device)
        loss = _other_class_loss(model(apply_patches(xd[idx], torch.sigmoid(w), pos)), yd[idx], n).mean()
        (grad,) = torch.autograd.grad(loss, [w])
        opt.zero_grad(set_to_none=True)
        w.grad = grad
        opt.step()
    pos = random_positions(x.shape[0], side, x.shape, generator=gen, device=device)
    return apply_patches(xd, torch.sigmoid(w.detach()), pos).cpu()


def _random_patch(model, n, x, y, gen, b, device):
    side = min(b.patch_side, x.shape[-1], x.shape[-2])
    patches = torch.rand((x.shape[0], x.shape[1], side, side), generator=gen)
    pos = random_positions(x.shape[0], side, x.shape, generator=gen)
    return apply_patches(x, patches, pos)


def _pgd(model, n, x, y, gen, b, device, eps: float = 0.3):
    xd, yd = x.to(device), y.to(device)
    adv = (xd + (torch.rand(x.shape, generator=gen).to(device) * 2 - 1) * eps).clamp(0, 1)
    step = 2.5 * eps / max(1, b.patch_steps // 4)
    for _ in range(max(1, b.patch_steps // 4)):
        adv.requires_grad_(True)
        loss = _other_class_loss(model(adv), yd, n).sum()
        (grad,) = torch.autograd.grad(loss, [adv])
        adv = torch.min(torch.max(adv.detach() - step * grad.sign(), xd - eps), xd + eps).clamp(0, 1)
    return adv.cpu()


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
    engine: str = "builtin",
) -> RoundAttackSet:
    """Run each named generator against ``model`` (eval mode, restored; weights untouched).

    Args:
        model: the current model (n or n+1 outputs).
        attacks: names from :data:`ROUND_ATTACKS` (checked).
        num_classes: n, the number of real classes.
        image_shape: (C, H, W).
        pool: clean ``(x, y)`` that patches and PGD start from (``budget.patch_images`` drawn).
        budget: sizes and steps.
        seed: every random choice comes from ``torch.Generator().manual_seed(seed + i)``.
        engine: ``"builtin"`` (the small batched generators of this module) or ``"attacks"``:
            the fooling images come from the team's classes ``attacks.fooling_gradient.FoolingGradient``
            and ``attacks.fooling_evolution.FoolingEvolution`` (pyribs MAP-Elites, NEAT-style
            CPPNs), sized by the same budget; patches and PGD stay built in (their losses here
            aim at a *real* class, never at the reject class).
    """
    import time

    from tqdm.auto import tqdm

    names = list(check_attacks(attacks))
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}; got {engine!r}.")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    xs, kinds, targets, sources, seconds = [], [], [], [], {}
    px, py = pool
    with eval_mode(model):
        for i, name in enumerate(tqdm(names, desc="attacks", unit="attack", disable=not progress, leave=False)):
            gen = torch.Generator().manual_seed((int(seed) * 7919 + i) % (2**63 - 1))
            t0 = time.perf_counter()
            if name in FOOLING_ATTACKS:
                if engine == "attacks":
                    fn = {"fooling_gradient": _team_fooling_gradient, "fooling_direct": _team_evolution("direct"),
                          "fooling_cppn": _team_evolution("cppn")}[name]
                else:
                    fn = {"fooling_gradient": _fooling_gradient, "fooling_direct": _fooling_direct, "fooling_cppn": _fooling_cppn}[name]
                x, target = fn(model, num_classes, tuple(image_shape), gen, budget, device)
                source = torch.full_like(target, -1)
            else:
                idx = torch.randperm(px.shape[0], generator=gen)[:budget.patch_images]
                fn2 = {"universal_patch": _universal_patch, "random_patch": _random_patch, "pgd": _pgd}[name]
                x = fn2(model, num_classes, px[idx], py[idx], gen, budget, device)
                source = py[idx].clone()
                target = torch.full_like(source, -1)
            seconds[name] = time.perf_counter() - t0
            xs.append(x.detach().float().clamp(0, 1).cpu())
            kinds.append(torch.full((x.shape[0],), i, dtype=torch.long))
            targets.append(target.long())
            sources.append(source.long())
    return RoundAttackSet(torch.cat(xs), torch.cat(kinds), torch.cat(targets), torch.cat(sources), names, seconds)


def score_attack_set(model: nn.Module, s: RoundAttackSet, num_classes: int, *, threshold: float = 0.99) -> dict[str, float | int | None]:
    """How well ``s`` fools ``model`` (n or n+1 outputs; index n = reject when present).

    Returns ``fooling_classes_ge99`` (share of the n classes for which some fooling image in
    ``s`` gets P(class) >= threshold), ``fooling_median_confidence`` (median over classes of
    the best fooling image's P(class), as Nguyen et al. report it), ``patch_fooling_rate``
    (share of patched images predicted as a real class other than their true label), and
    ``rejected_share`` (share of all images predicted as reject); per-attack breakdowns too.
    """
    n = num_classes
    with eval_mode(model):
        probs = _class_probs(model, s.x.to(next((p.device for p in model.parameters()), torch.device("cpu")))).cpu()
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
    patch = s.mask(("universal_patch", "random_patch"))
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
