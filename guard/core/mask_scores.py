"""The masking detector's one-mask scores, shared by the detector (``guard.detectors.masking``) and
the attacker that aims at it (``guard.attacks.masking_patch``), which may not import each other.

All take the logits of every image under every one of K masks, (N, K, classes), and the label of
the whole image; plain torch ops (traced into the ONNX graph as they are).
"""

from __future__ import annotations

import torch

__all__ = ["MASK_SCORES", "view_margins", "other_margin", "mask_score"]

#: the one-mask scores :class:`guard.detectors.MaskingDetector` offers (see :func:`mask_score`)
MASK_SCORES = ("other_margin", "disagreement")


def view_margins(masked_logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Per masked view, the margin of the best other class over ``label``: (N, K)."""
    idx = label.to(masked_logits.device)[:, None, None].expand(-1, masked_logits.shape[1], 1)
    own = masked_logits.gather(2, idx)[..., 0]
    return masked_logits.scatter(2, idx, float("-inf")).amax(2) - own


def other_margin(masked_logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """How far any one mask pushes another class past ``label``: (N,).

    ``max_m [max_{c != label} z_mc - z_m,label]``, the largest log-probability margin of another
    class over the label among the one-mask outputs (a logit difference is a log-softmax
    difference). It is positive exactly when some one-mask label differs from ``label`` (exact
    ties aside), so ``score > 0`` is the certified flag; below that it keeps how *sure* each mask
    is, which the share of disagreeing masks throws away. Chosen over the share, the drop of the
    label's probability and the most confident other label on a split of its own
    (benchmarks/results/masking_scores_cifar10.json).
    """
    return view_margins(masked_logits, label).amax(1)


def mask_score(masked_logits: torch.Tensor, label: torch.Tensor, statistic: str) -> torch.Tensor:
    """A one-mask score (N,): ``"other_margin"`` (:func:`other_margin`) or ``"disagreement"`` (the
    share of masks whose label is not ``label``). Both are > 0 exactly when some one-mask label differs."""
    if statistic == "other_margin":
        return other_margin(masked_logits, label)
    if statistic == "disagreement":
        return (masked_logits.argmax(2) != label.to(masked_logits.device)[:, None]).float().mean(1)
    raise ValueError(f"statistic must be one of {MASK_SCORES}; got {statistic!r}.")
