"""Representation analysis of feature adversaries (Sabour et al. 2016, Sec. 4).

Sabour, Cao, Faghri, Fleet. "Adversarial Manipulation of Deep Representations", ICLR 2016.
Measures how far an adversary ``a`` of source ``s`` towards guide ``g`` looks like ``g`` to the
network at a layer:

* distance ratio ``d(a, g) / d(s, g)`` (Euclidean, layer features);
* guide-label agreement: the model's label of ``a`` equals its label of ``g``;
* 3-NN intersection: how many of ``a``'s k nearest training features of ``g``'s class are also
  ``g``'s k nearest;
* rank difference ``Δr_k(a, g) = r_k(a) - r_k(g)``: ``r_k(z)`` is the percentile of ``z``'s
  distance to its k-th nearest neighbour among the same distance for every training point of
  the class (to its k-th neighbour, itself excluded). Negative: ``a`` sits deeper inside the
  class than the guide does (an inlier by kNN rank);
* sparsity (share of active units, > 0) and intersection-over-union of the active units of
  ``a`` with ``s`` and with ``g``.

Nearest neighbours here are exact ``torch.cdist`` over one class's training features (a few
thousand points at most); the serving-time kNN detector uses FAISS instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from guard.core.features import extract_features
from guard.core.validation import check_images, check_int, check_labels

__all__ = [
    "distance_ratio",
    "label_agreement",
    "knn_rank_analysis",
    "active_units",
    "representation_report",
    "summarize",
]


def distance_ratio(feat_adv: torch.Tensor, feat_source: torch.Tensor, feat_guide: torch.Tensor) -> torch.Tensor:
    """``||phi(a) - phi(g)|| / ||phi(s) - phi(g)||`` per row of flattened features."""
    if not (feat_adv.shape == feat_source.shape == feat_guide.shape):
        raise ValueError(
            f"features must share one shape; got {tuple(feat_adv.shape)}, {tuple(feat_source.shape)}, {tuple(feat_guide.shape)}."
        )
    a, s, g = feat_adv.flatten(1), feat_source.flatten(1), feat_guide.flatten(1)
    return (a - g).norm(dim=1) / (s - g).norm(dim=1).clamp_min(1e-12)


def label_agreement(pred_adv: torch.Tensor, guide_label: torch.Tensor) -> float:
    """Share of adversaries the model labels like their guide."""
    pred_adv = check_labels(pred_adv, "pred_adv", allow_negative=True)  # -1: a hardened model's reject
    guide_label = check_labels(guide_label, "guide_label", n=int(pred_adv.shape[0]))
    return float((pred_adv == guide_label.to(pred_adv.device)).float().mean())


def _kth_distances(
    q: torch.Tensor, ref: torch.Tensor, k: int, *, exclude_self: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.cdist(q, ref)
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    vals, idx = d.topk(k, dim=1, largest=False)
    return vals[:, -1].contiguous(), idx


@torch.no_grad()
def knn_rank_analysis(
    feat_adv: torch.Tensor,
    feat_guide: torch.Tensor,
    guide_label: torch.Tensor,
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    *,
    k: int = 3,
) -> dict[str, torch.Tensor]:
    """k-NN intersection and rank difference of adversaries vs their guides, per image.

    Args:
        feat_adv, feat_guide: (N, D) features of the adversaries and their guides.
        guide_label: (N,) class whose training features are the reference.
        train_feats, train_labels: (M, D) training features and labels.
        k: neighbours (3 in the paper).

    Returns:
        ``nn_intersection`` (N,) in 0..k, ``rank_adv``, ``rank_guide`` (percentiles, 0-100)
        and ``rank_difference`` = rank_adv - rank_guide.
    """
    k = check_int(k, "k", "knn_rank_analysis", low=1)
    guide_label = check_labels(guide_label, "guide_label", n=int(feat_adv.shape[0])).cpu()
    train_labels = check_labels(train_labels, "train_labels", n=int(train_feats.shape[0])).cpu()
    fa, fg, ft = (
        feat_adv.flatten(1).float().cpu(),
        feat_guide.flatten(1).float().cpu(),
        train_feats.flatten(1).float().cpu(),
    )
    n = fa.shape[0]
    inter = torch.zeros(n, dtype=torch.long)
    rank_a = torch.zeros(n)
    rank_g = torch.zeros(n)
    for c in guide_label.unique().tolist():
        rows = (guide_label == c).nonzero().flatten()
        ref = ft[train_labels == c]
        if ref.shape[0] <= k:
            raise ValueError(f"class {c} has {ref.shape[0]} training features; need more than k={k}.")
        d_ref, _ = _kth_distances(ref, ref, k, exclude_self=True)
        d_ref = d_ref.sort().values
        d_a, nn_a = _kth_distances(fa[rows], ref, k, exclude_self=False)
        d_g, nn_g = _kth_distances(fg[rows], ref, k, exclude_self=False)
        inter[rows] = (nn_a.unsqueeze(2) == nn_g.unsqueeze(1)).any(2).sum(1)
        rank_a[rows] = 100.0 * torch.searchsorted(d_ref, d_a).float() / d_ref.numel()
        rank_g[rows] = 100.0 * torch.searchsorted(d_ref, d_g).float() / d_ref.numel()
    return {"nn_intersection": inter, "rank_adv": rank_a, "rank_guide": rank_g, "rank_difference": rank_a - rank_g}


def active_units(feat_a: torch.Tensor, feat_b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sparsity (share of units > 0) of each and IoU of their active sets, per row."""
    if feat_a.shape != feat_b.shape:
        raise ValueError(
            f"feat_a and feat_b must share one shape; got {tuple(feat_a.shape)} and {tuple(feat_b.shape)}."
        )
    a, b = feat_a.flatten(1) > 0, feat_b.flatten(1) > 0
    union = (a | b).sum(1).float()
    iou = torch.where(union > 0, (a & b).sum(1).float() / union.clamp_min(1), torch.ones_like(union))
    return {"sparsity_a": a.float().mean(1), "sparsity_b": b.float().mean(1), "iou": iou}


def summarize(values: torch.Tensor) -> dict[str, float]:
    """Median, 10th and 90th percentile and mean of a 1-D tensor (JSON-friendly); NaN entries (no value) are left out."""
    v = values.detach().float().flatten().cpu()
    v = v[~v.isnan()]
    if v.numel() == 0:
        return {"median": float("nan"), "p10": float("nan"), "p90": float("nan"), "mean": float("nan")}
    return {
        "median": float(v.median()),
        "p10": float(v.quantile(0.1)),
        "p90": float(v.quantile(0.9)),
        "mean": float(v.mean()),
    }


@torch.no_grad()
def representation_report(
    model: nn.Module,
    layer: str,
    source: torch.Tensor,
    adv: torch.Tensor,
    guide: torch.Tensor,
    *,
    train_x: torch.Tensor | None = None,
    train_y: torch.Tensor | None = None,
    k: int = 3,
    batch_size: int = 512,
) -> dict[str, Any]:
    """Every measure above for one batch of (source, adversary, guide) triples at ``layer``.

    The kNN measures need ``train_x``/``train_y`` (the reference features of each guide's class).
    A guide whose class has at most ``k`` training images (a 1,000-class model audited on a few
    hundred) has no reference: its kNN measures are NaN, ``has_reference`` is False for it and
    ``summary["n_without_reference"]`` counts it; the other rows are measured as usual.

    Returns:
        ``per_image``: tensors per image; ``summary``: JSON-friendly medians/percentiles and
        the guide-label agreement.
    """
    for name, t in (("source", source), ("adv", adv), ("guide", guide)):
        check_images(t, name)
    if not (source.shape == adv.shape == guide.shape):
        raise ValueError(
            f"source, adv and guide must share one shape; got {tuple(source.shape)}, {tuple(adv.shape)}, {tuple(guide.shape)}."
        )
    _, fs = extract_features(model, source, [layer], batch_size=batch_size)
    logit_a, fa = extract_features(model, adv, [layer], batch_size=batch_size)
    logit_g, fg = extract_features(model, guide, [layer], batch_size=batch_size)
    fs, fa, fg = fs[layer], fa[layer], fg[layer]
    glabel, alabel = logit_g.argmax(1), logit_a.argmax(1)
    per: dict[str, torch.Tensor] = {
        "distance_ratio": distance_ratio(fa, fs, fg),
        "agrees_with_guide": (alabel == glabel),
    }
    au_s, au_g = active_units(fa, fs), active_units(fa, fg)
    per.update(
        {
            "sparsity_adv": au_s["sparsity_a"],
            "sparsity_source": au_s["sparsity_b"],
            "sparsity_guide": au_g["sparsity_b"],
            "iou_adv_source": au_s["iou"],
            "iou_adv_guide": au_g["iou"],
        }
    )
    if train_x is not None and train_y is not None:
        _, ft = extract_features(model, train_x, [layer], batch_size=batch_size)
        train_y = check_labels(train_y, "train_y", n=int(ft[layer].shape[0])).cpu()
        counts = torch.bincount(train_y, minlength=int(glabel.max()) + 1)
        has_ref = counts[glabel.cpu()] > k
        rows = has_ref.nonzero().flatten()
        knn = {
            key: torch.full((int(source.shape[0]),), float("nan"))
            for key in ("nn_intersection", "rank_adv", "rank_guide", "rank_difference")
        }
        if rows.numel():
            for key, val in knn_rank_analysis(fa[rows], fg[rows], glabel[rows], ft[layer], train_y, k=k).items():
                knn[key][rows] = val.float()
        per.update(knn, has_reference=has_ref)
    summary: dict[str, Any] = {
        "n": int(source.shape[0]),
        "guide_label_agreement": float(per["agrees_with_guide"].float().mean()),
    }
    if "has_reference" in per:
        summary["n_without_reference"] = int((~per["has_reference"]).sum())
    for key, val in per.items():
        if key not in ("agrees_with_guide", "has_reference"):
            summary[key] = summarize(val.float())
    return {"per_image": per, "summary": summary}
