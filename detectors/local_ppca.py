"""Sabour et al.'s *local* PPCA inlier test: is an adversary as likely as its guide's neighbours?

Sabour, Cao, Faghri, Fleet. "Adversarial Manipulation of Deep Representations", ICLR 2016,
Sec. 4.2. For each adversary ``a`` of guide ``g`` at a layer: take g's ``n_neighbors`` (20)
nearest reference features, draw ``n_ref`` (15) of them at random (seeded), fit a probabilistic
PCA (Tipping & Bishop 1999) to them, move its mean to ``g``, and compare the log-likelihood of
``a`` with ``g``'s. ``a`` counts as an *inlier* when it is at least as likely as the least
likely of g's other ``n_neighbors - n_ref`` neighbours (the ones not used in the fit), i.e. it
lies inside the envelope of g's real neighbourhood. Also returned: the sine of the angle between
``a - g`` and the local principal subspace (the paper's angular consistency; 1 = orthogonal),
and the same for the held-out neighbours.

The principal directions come from scikit-learn's ``PCA`` (SVD). The noise variance is *not*
sklearn's ``noise_variance_``: with 15 points in d = 1,280 (or 21,952) dimensions sklearn
averages the left-over eigenvalues over ``min(n, d) - q`` directions, not the ``d - q`` the
maximum-likelihood estimate of Tipping & Bishop divides by; here it is
``sigma^2 = (trace - sum_{i<=q} lambda_i) / (d - q) + noise_floor * v`` with ``v`` the mean
per-unit variance of g's ``n_neighbors`` neighbours (the stated floor, local and scale-free:
with ``q = n_ref - 1`` the residual is exactly zero and the floor alone sets sigma^2). Scoring is the low-rank
:func:`guard.detectors.ppca.ppca_log_likelihood` (never a d x d matrix). Nearest neighbours are
exact ``torch.cdist`` (a few thousand reference rows); the serving kNN detector uses FAISS.

This is an analysis of (adversary, guide) pairs, not a serving-time detector; the class-level
PPCA detector is :class:`guard.detectors.PPCAManifold`.
"""

from __future__ import annotations

import numpy as np
import torch

from guard.core.validation import check_float, check_int
from guard.detectors.ppca import ppca_log_likelihood

__all__ = ["local_ppca", "fit_local_ppca"]

_OWNER = "local_ppca"


def fit_local_ppca(points: np.ndarray, n_components: int, floor: float) -> tuple[np.ndarray, np.ndarray, float]:
    """PPCA of ``points`` (n, d) without its mean (the caller moves it to g): (components (q, d),
    variances (q,), sigma^2).

    ``q = min(n_components, n - 1)``; sigma^2 is the Tipping-Bishop residual over ``d - q``
    directions plus ``floor`` (absolute), and every variance is kept >= sigma^2.
    """
    from sklearn.decomposition import PCA

    n, d = points.shape
    q = max(1, min(int(n_components), n - 1, d - 1))
    pca = PCA(n_components=q, svd_solver="full").fit(points)
    total = float(points.var(0, ddof=1).sum())
    resid = max(total - float(pca.explained_variance_.sum()), 0.0) / (d - q)
    noise = resid + float(floor)
    var = np.maximum(pca.explained_variance_, noise)
    return pca.components_, var, noise


def _sine_to_subspace(r: torch.Tensor, comps: torch.Tensor) -> torch.Tensor:
    proj = comps @ r.T  # (q, m)
    cos2 = proj.pow(2).sum(0) / r.pow(2).sum(1).clamp_min(1e-30)
    return (1.0 - cos2.clamp(0, 1)).clamp_min(0).sqrt()


@torch.no_grad()
def local_ppca(
    feat_adv: torch.Tensor,
    feat_guide: torch.Tensor,
    ref_feats: torch.Tensor,
    *,
    n_neighbors: int = 20,
    n_ref: int = 15,
    n_components: int | None = None,
    noise_floor: float = 1e-3,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The local PPCA test for each (adversary, guide) row.

    Args:
        feat_adv, feat_guide: (N, d) flattened features of the adversaries and their guides.
        ref_feats: (M, d) reference features (clean images; the guides' neighbours are found
            among them, so they should not contain the guides themselves).
        n_neighbors: g's nearest neighbours considered (20 in the paper).
        n_ref: of them, the ones the PPCA is fitted to, drawn at random (15 in the paper);
            the other ``n_neighbors - n_ref`` are the held-out reference of the inlier test.
        n_components: principal directions (default ``n_ref - 1``, all the fit supports).
        noise_floor: added to sigma^2, relative to the mean per-unit variance of g's neighbours.
        seed: seeds the choice of the ``n_ref`` points.

    Returns:
        Per row: ``loglik_adv``, ``loglik_guide`` (the maximum: g is the mean),
        ``relative_loglik`` = loglik_adv - loglik_guide, ``heldout_min`` and
        ``heldout_median`` (log-likelihoods of the held-out neighbours), ``inlier``
        (loglik_adv >= heldout_min), ``sine_adv`` and ``sine_heldout_median`` (angle of
        ``a - g`` / ``n - g`` to the local subspace).
    """
    n_neighbors = check_int(n_neighbors, "n_neighbors", _OWNER, low=2)
    n_ref = check_int(n_ref, "n_ref", _OWNER, low=2)
    if n_ref >= n_neighbors:
        raise ValueError(
            f"The 'n_ref' parameter of {_OWNER} must be < n_neighbors={n_neighbors} (the rest are the held-out "
            f"reference of the test). Got {n_ref}."
        )
    q = n_ref - 1 if n_components is None else check_int(n_components, "n_components", _OWNER, low=1)
    noise_floor = check_float(noise_floor, "noise_floor", _OWNER, low=0.0, low_open=True)
    seed = check_int(seed, "seed", _OWNER)
    for name, t in (("feat_adv", feat_adv), ("feat_guide", feat_guide), ("ref_feats", ref_feats)):
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or not t.is_floating_point():
            got = f"{type(t).__name__} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating tensor of shape (N, d); got {got}.")
    fa, fg, fr = (t.flatten(1).double().cpu() for t in (feat_adv, feat_guide, ref_feats))
    if fa.shape != fg.shape or fr.shape[1] != fa.shape[1]:
        raise ValueError(
            f"feat_adv and feat_guide must share one shape (N, d) and ref_feats be (M, d); got {tuple(fa.shape)}, "
            f"{tuple(fg.shape)} and {tuple(fr.shape)}."
        )
    if fr.shape[0] < n_neighbors:
        raise ValueError(f"ref_feats must hold at least n_neighbors={n_neighbors} rows; got {fr.shape[0]}.")
    nn_idx = torch.cdist(fg, fr).topk(n_neighbors, dim=1, largest=False).indices
    rng = np.random.default_rng(seed)
    keys = ("loglik_adv", "loglik_guide", "heldout_min", "heldout_median", "sine_adv", "sine_heldout_median")
    out = {k: torch.zeros(fa.shape[0], dtype=torch.float64) for k in keys}
    for i in range(fa.shape[0]):
        perm = rng.permutation(n_neighbors)
        fit_rows, held_rows = nn_idx[i, perm[:n_ref]], nn_idx[i, perm[n_ref:]]
        g = fg[i]
        floor = noise_floor * (float(fr[nn_idx[i]].var(0).mean()) or 1.0)
        comps, var, noise = fit_local_ppca(fr[fit_rows].numpy(), q, floor)
        w, lam = torch.from_numpy(comps), torch.from_numpy(var)
        pts = torch.cat([fa[i : i + 1], g[None], fr[held_rows]])
        m = pts.shape[0]
        ll = ppca_log_likelihood(
            pts, g.expand(m, -1), w.expand(m, -1, -1), lam.expand(m, -1), torch.full((m,), noise, dtype=torch.float64)
        )
        sine = _sine_to_subspace(pts - g, w)
        out["loglik_adv"][i], out["loglik_guide"][i] = ll[0], ll[1]
        out["heldout_min"][i], out["heldout_median"][i] = ll[2:].min(), ll[2:].median()
        out["sine_adv"][i], out["sine_heldout_median"][i] = sine[0], sine[2:].median()
    out["relative_loglik"] = out["loglik_adv"] - out["loglik_guide"]
    out["inlier"] = out["loglik_adv"] >= out["heldout_min"]
    return out
