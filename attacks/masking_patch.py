"""A patch attacker who knows PatchCleanser's masking defence (issue 37, "the attacker's side").

PatchCleanser (Xiang et al., USENIX Security 2022) runs the model under every mask of a set that
covers every position of a patch up to a size. A patch at position p is removed by the masks
that contain it (``covering(p)``) and seen by all the others. So an attacker who wants the
defended output, not only the bare model, must make the model give one wrong label ``t``

* on the patched image (the bare model is fooled),
* under every mask that does *not* contain the patch (the one-mask round agrees on ``t``),

while the masks that contain the patch show the clean image under that mask, which the attacker
cannot change. The attack therefore places the patch where the masks are weakest: where the
covering views already keep the detector's score against some wrong label ``t`` within its
threshold (a winnable position: at the certified threshold 0, every covering mask already gives
``t``; at a calibrated threshold, their margins for another class over ``t`` stay under it), else
where that floor is lowest, the fewest masks cover the patch and their clean labels are the least
sure of the truth (there the flag is certain to fire, and the attack still tries the recovered
label). At each chosen
position it runs signed-gradient steps on the patch's pixels (from random starts) on the summed
cross-entropy towards ``t`` of the patched image and of a random subset of the non-covering
masked images per step (all of them in the final check: Expectation over Transformation,
Athalye et al. 2018), and keeps, per image, the patch that does best against the *defence*:
evading the flag first, then changing the recovered label, then fooling the bare model, then
the lowest score.

On an image whose certificate holds, no patch can succeed against it (that is the proof); the
tests run this attack on certified images to try to break the certificates. Written by hand: no
attack library attacks a masking defence. It takes the defence's masks as a tensor (``keep``,
what :meth:`guard.detectors.masking.MaskSet.keep` returns), so it does not import
``guard.detectors``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from guard.attacks.base import Attack, AttackResult
from guard.attacks.patching import apply_patches
from guard.core.mask_scores import MASK_SCORES, mask_score
from guard.core.validation import check_float, check_int

__all__ = ["MaskingPatch", "covering_masks", "defended_outcome"]


def covering_masks(keep: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every top-left position of a ``side`` x ``side`` patch and, per position, which masks contain it.

    Returns ``(positions (P, 2) int64, covers (P, K) bool)``: mask k covers position p when the
    patch's every pixel is masked (False in ``keep[k]``).
    """
    masked = (~keep[:, 0]).float()  # (K, H, W): 1 inside the mask
    inside = F.avg_pool2d(masked[:, None], side, stride=1)[:, 0]  # (K, H-s+1, W-s+1): share of the patch masked
    k, rows, cols = inside.shape
    covers = (inside > 1 - 1e-6).reshape(k, rows * cols).T
    pos = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    return pos, covers


def _masked(x: torch.Tensor, keep: torch.Tensor, fill: float) -> torch.Tensor:
    """x (1, C, H, W) under masks keep (M, 1, H, W): (M, C, H, W)."""
    k = keep.to(x.dtype)
    return x * k + fill * (1.0 - k)


@torch.no_grad()
def defended_outcome(model: nn.Module, x: torch.Tensor, keep: torch.Tensor, fill: float) -> dict[str, torch.Tensor]:
    """What the masking defence makes of each image of ``x``: the bare label, the one-mask labels,
    the certified flag (a one-mask label differs from the bare one), the detector's two scores
    against the bare label (``other_margin``, ``disagreement``) and the double-masking label.

    A transcription of PatchCleanser's Algorithm 1 kept inside the attack package (the attack must
    judge its iterates by the real defence without importing ``guard.detectors``); the scores are
    the detector's own (:mod:`guard.core.mask_scores`). The tests check it against
    :func:`guard.detectors.masking.double_masking` and :class:`guard.detectors.MaskingDetector`.
    """
    bare = model(x).argmax(1)
    n_mask = keep.shape[0]
    z = torch.stack([model(_masked(x[i : i + 1], keep, fill)) for i in range(x.shape[0])])  # (N, K, classes)
    one = z.argmax(2)
    recovered = one[:, 0].clone()
    for j in range(x.shape[0]):
        labels = one[j]
        if bool((labels == labels[0]).all()):
            continue
        majority = int(torch.bincount(labels).argmax())
        recovered[j] = majority
        for i in [i for i in range(n_mask) if int(labels[i]) != majority]:
            pair = keep[i : i + 1] & keep
            if bool((model(_masked(x[j : j + 1], pair, fill)).argmax(1) == labels[i]).all()):
                recovered[j] = labels[i]
                break
    return {
        "bare": bare,
        "one_mask": one,
        "flagged": (one != bare[:, None]).any(1),
        "other_margin": mask_score(z, bare, "other_margin"),
        "disagreement": mask_score(z, bare, "disagreement"),
        "recovered": recovered,
    }


class MaskingPatch(Attack):
    """A per-image patch placed and trained against PatchCleanser's masks (see the module docstring).

    Args:
        keep: the defence's masks, bool (K, 1, H, W), False inside each mask
            (``mask_set(...).keep()``).
        size: the patch side in pixels (the size the defence certifies against, or any other).
        fill: the masked pixels' value (the defence's).
        positions: positions tried per image (the weakest first).
        steps: signed-gradient steps per position and start.
        step_size: the step on the patch's pixels (images in [0, 1]).
        restarts: random starts per position.
        mask_samples: non-covering masks in each step's loss (all of them: 0).
        statistic: the masking detector's score to evade (``MaskingDetector.statistic_``).
        threshold: the detector's threshold (``threshold_``): 0, the default, is the certified
            operating point (any one-mask label that differs is flagged); pass a calibrated
            detector's threshold to attack it at its operating point.
        seed: seeds the starts and the mask samples.

    ``success`` is the bare model's (the :class:`Attack` contract: a label other than ``y``, or
    ``target``); against the defence, ``extras`` holds per image ``evades_flag`` (the bare label is
    wrong and the detector's score, ``score``, is within ``threshold``: at 0, every one-mask label
    equals the bare one), ``recovered`` (the double-masking label),
    ``recovery_changed`` (it is not ``y``), ``position`` and ``patch``.
    """

    def __init__(
        self,
        *,
        keep: torch.Tensor,
        size: int,
        fill: float = 0.5,
        positions: int = 2,
        steps: int = 20,
        step_size: float = 0.1,
        restarts: int = 1,
        mask_samples: int = 8,
        statistic: str = "other_margin",
        threshold: float = 0.0,
        seed: int = 0,
    ) -> None:
        owner = type(self).__name__
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 4 or keep.shape[1] != 1:
            raise TypeError(
                f"The 'keep' parameter of {owner} must be the defence's masks, a bool tensor (K, 1, H, W); got "
                f"{type(keep).__name__} {tuple(getattr(keep, 'shape', ()))} {getattr(keep, 'dtype', '')}."
            )
        self.keep = keep
        self.size = check_int(size, "size", owner, low=1, high=min(keep.shape[-2:]))
        self.fill = check_float(fill, "fill", owner, low=0.0, high=1.0)
        self.positions = check_int(positions, "positions", owner, low=1)
        self.steps = check_int(steps, "steps", owner, low=0)
        self.step_size = check_float(step_size, "step_size", owner, low=0.0, low_open=True)
        self.restarts = check_int(restarts, "restarts", owner, low=1)
        self.mask_samples = check_int(mask_samples, "mask_samples", owner, low=0)
        if statistic not in MASK_SCORES:
            raise ValueError(
                f"The 'statistic' parameter of {owner} must be one of {MASK_SCORES} (the masking detector's score); "
                f"got {statistic!r}."
            )
        self.statistic = statistic
        self.threshold = check_float(threshold, "threshold", owner)
        self.seed = check_int(seed, "seed", owner)

    def params(self) -> dict[str, Any]:
        p = super().params()
        p["masks"] = int(self.keep.shape[0])
        return p

    def _plan(
        self, model: nn.Module, x: torch.Tensor, y: int, target: int | None, covers: torch.Tensor
    ) -> list[tuple[int, int]]:
        """(position index, target label) of the ``positions`` weakest positions of one image.

        The covering masks hide the patch, so what they show is the clean image, which the
        attacker cannot change: their part of the detector's score against a label ``t`` is a
        floor under any patch at that position (``other_margin``: the largest margin another class
        has over ``t`` among them; ``disagreement``: their share of all masks whose label is not
        ``t``). Untargeted, ``t`` is the label with the lowest floor; a position is *winnable*
        when that floor is within ``threshold``. Weakest first: winnable, then the lowest floor,
        then fewer covering masks, then the covering views least sure of the truth.
        """
        keep = self.keep.to(x.device)
        with torch.no_grad():
            logits = model(_masked(x, keep, self.fill)).float()  # (K, classes): the clean image under each mask
        n_mask, n_cls = logits.shape
        classes = torch.arange(n_cls, device=logits.device)
        sure = logits.log_softmax(1)[:, y]  # how sure each mask's view is of the truth
        if self.statistic == "other_margin":  # per mask and label t: the best other class's margin over t
            top = logits.topk(min(2, n_cls), dim=1)
            runner = top.values[:, -1:] if n_cls > 1 else torch.full_like(top.values, float("-inf"))
            best_other = torch.where(classes[None] == top.indices[:, :1], runner, top.values[:, :1])
            term = best_other - logits  # (K, classes)
        else:  # per mask and label t: its share of the score when its label is not t
            term = (logits.argmax(1)[:, None] != classes[None]).float() / n_mask
        plans = []
        for p in range(covers.shape[0]):
            cov = covers[p].to(logits.device)
            floor = term[cov].amax(0) if self.statistic == "other_margin" else term[cov].sum(0)  # (classes,)
            if target is not None:
                t = target
            else:
                others = floor.clone()
                others[y] = float("inf")
                t = int(others.argmin())
            winnable = float(floor[t]) <= self.threshold and t != y
            plans.append((not winnable, float(floor[t]), int(cov.sum()), float(sure[cov].max()), p, t))
        plans.sort()
        return [(p, t) for *_, p, t in plans[: self.positions]]

    def _train(
        self,
        model: nn.Module,
        x: torch.Tensor,
        pos: torch.Tensor,
        uncovered: torch.Tensor,
        t: int,
        gen: torch.Generator,
    ) -> torch.Tensor:
        """One patch (1, C, s, s) at ``pos`` trained towards label ``t`` through the uncovered masks."""
        c, s = x.shape[1], self.size
        patch = torch.rand(1, c, s, s, generator=gen).to(x.device)
        keep = self.keep.to(x.device)[uncovered]
        target = torch.tensor([t], device=x.device)
        for _ in range(self.steps):
            patch.requires_grad_(True)
            xp = apply_patches(x, patch, pos)
            if self.mask_samples and keep.shape[0] > self.mask_samples:
                pick = torch.randperm(keep.shape[0], generator=gen)[: self.mask_samples].to(x.device)
                views = _masked(xp, keep[pick], self.fill)
            else:
                views = _masked(xp, keep, self.fill)
            batch = torch.cat([xp, views])
            loss = F.cross_entropy(model(batch), target.expand(batch.shape[0]), reduction="sum")
            (g,) = torch.autograd.grad(loss, patch)
            patch = (patch.detach() - self.step_size * g.sign()).clamp(0.0, 1.0)  # down the loss towards t
        return patch.detach()

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> AttackResult:
        if tuple(x.shape[-2:]) != tuple(self.keep.shape[-2:]):
            raise ValueError(
                f"x must be images of the masks' size {tuple(self.keep.shape[-2:])}; got shape {tuple(x.shape)}."
            )
        all_pos, covers = covering_masks(self.keep, self.size)
        keep = self.keep.to(x.device)
        gen = torch.Generator().manual_seed(self.seed)
        out_x, out_pos, out_patch = x.clone(), torch.zeros(x.shape[0], 2, dtype=torch.long), []
        evades = torch.zeros(x.shape[0], dtype=torch.bool)
        recovered = y.detach().cpu().clone()
        scores = torch.zeros(x.shape[0])
        for j in range(x.shape[0]):
            xj, yj = x[j : j + 1], int(y[j])
            best, best_key = None, None
            for p, t in self._plan(model, xj, yj, None if target is None else int(target[j]), covers):
                pos = all_pos[p : p + 1].to(x.device)
                for _ in range(self.restarts):
                    patch = self._train(model, xj, pos, ~covers[p], t, gen)
                    xp = apply_patches(xj, patch, pos)
                    o = defended_outcome(model, xp, keep, self.fill)
                    bare_hit = int(o["bare"][0]) == t if target is not None else int(o["bare"][0]) != yj
                    score = float(o[self.statistic][0])
                    evade = bare_hit and score <= self.threshold
                    changed = int(o["recovered"][0]) != yj
                    key = (evade, changed, bare_hit, -score)
                    if best_key is None or key > best_key:
                        best, best_key = (xp, pos, patch, int(o["recovered"][0])), key
            xp, pos, patch, rec = best
            out_x[j], out_pos[j], evades[j], recovered[j] = xp[0], pos[0].cpu(), best_key[0], rec
            scores[j] = -best_key[3]
            out_patch.append(patch[0].cpu())
        success = self.is_success(model, out_x, y, target)
        extras = {
            "evades_flag": evades,
            "score": scores,
            "recovered": recovered,
            "recovery_changed": recovered != y.cpu(),
            "position": out_pos,
            "patch": torch.stack(out_patch),
        }
        return AttackResult(x_adv=out_x, success=success, extras=extras)
