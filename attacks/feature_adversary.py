"""Feature adversaries: images that look like a source but whose features at a layer match a guide.

Sabour, Cao, Faghri, Fleet. "Adversarial Manipulation of Deep Representations", ICLR 2016.
Given a source ``s``, a guide ``g`` and a layer ``k``, find ``a`` minimising
``||phi_k(a) - phi_k(g)||^2`` subject to ``||a - s||_inf <= delta`` and ``a`` in [0, 1].

As in the paper the problem is solved with L-BFGS-B and box bounds (SciPy's
``minimize(method="L-BFGS-B", jac=True)``), but the gradient is exact (autograd through the
model, not finite differences as in ART's ``FeatureAdversariesNumpy``) and the whole batch is
one objective (the sum over images), so one forward/backward pass serves every image at every
iteration. The bounds are the intersection ``[s - delta, s + delta] ∩ [0, 1]`` per pixel, so
every iterate is feasible and nothing is clipped afterwards.

Variants for comparison (``variant=``):

* ``"lbfgs"`` (the feature adversary itself).
* ``"feature-fgrad"``: one signed-gradient step of size ``delta`` on the feature objective
  (an FGSM-style step towards the guide's features).
* ``"feature-linear"``: the objective with ``phi_k`` linearised at ``s``,
  ``||phi_k(s) + J (a - s) - phi_k(g)||^2``, a convex box-constrained least-squares problem,
  solved with the same L-BFGS-B (Jacobian-vector products by double backward; the Jacobian is
  never formed). The result is then scored on the real network.
* ``"label-opt"``: Szegedy-style box-constrained misclassification: minimise the cross-entropy
  towards the guide's label (plus ``label_c * ||a - s||^2``) in the same box.

Guides are given by the caller (:meth:`FeatureAdversary.generate`) or, through the standard
``attack(model, x, y)`` call, sampled with a seed from the images of the batch whose label
differs from each source's (or equals ``target`` when one is given).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from guard.attacks.base import Attack, AttackResult, model_device
from guard.core.features import FeatureExtractor, get_layer
from guard.core.models import eval_mode
from guard.core.validation import check_float, check_images, check_int, check_labels

__all__ = ["FeatureAdversary", "sample_guides", "feature_objective", "VARIANTS"]

log = logging.getLogger(__name__)

VARIANTS = ("lbfgs", "feature-fgrad", "feature-linear", "label-opt")


def sample_guides(
    y: torch.Tensor,
    pool_y: torch.Tensor,
    *,
    target: torch.Tensor | None = None,
    seed: int = 0,
    exclude_self: bool = False,
) -> torch.Tensor:
    """Pick, for each label in ``y``, the index of a pool image of another class (or of ``target``).

    Args:
        y: (N,) labels of the sources.
        pool_y: (M,) labels of the candidate guides.
        target: optional (N,) required guide labels.
        seed: seed of the choice.
        exclude_self: the pool is the batch itself; never pick index ``i`` for source ``i``.

    Returns:
        (N,) int64 indices into the pool.
    """
    y = check_labels(y, "y").cpu()
    pool_y = check_labels(pool_y, "pool_y").cpu()
    if target is not None:
        target = check_labels(target, "target", n=int(y.shape[0])).cpu()
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.empty(y.shape[0], dtype=torch.long)
    arange = torch.arange(pool_y.shape[0])
    for i in range(y.shape[0]):
        ok = pool_y == target[i] if target is not None else pool_y != y[i]
        if exclude_self and i < pool_y.shape[0]:
            ok = ok & (arange != i)
        cand = arange[ok]
        if cand.numel() == 0:
            want = f"label {int(target[i])}" if target is not None else f"a label other than {int(y[i])}"
            raise ValueError(
                f"no guide candidate with {want} for source {i}; pass guides explicitly or a larger batch."
            )
        idx[i] = cand[torch.randint(cand.numel(), (1,), generator=gen)]
    return idx


def _tap(model: nn.Module, layer: str) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``x -> (logits, the layer's flattened features)``, the one feature extractor without its
    per-call input check (inside L-BFGS-B every iterate is in the box by construction, and the
    check would sync on tensors that require grad)."""
    fx = FeatureExtractor(model, [layer])

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feats = fx(x, flatten=True, check=False)
        return logits, feats[layer]

    return run


def feature_objective(
    model: nn.Module, layer: str, guide_feats: torch.Tensor, shape: tuple[int, ...]
) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
    """The SciPy objective ``z -> (sum_i ||phi(a_i) - phi(g_i)||^2, exact gradient)`` in float64.

    ``z`` is the flattened batch of images; the model runs in its own dtype (float32 usually,
    float64 for gradient checks). Exposed for tests and benchmarks.
    """
    fx = _tap(model, layer)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    device = guide_feats.device

    def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
        a = torch.from_numpy(z).to(device=device, dtype=dtype).view(shape).requires_grad_(True)
        _, f = fx(a)
        loss = (f - guide_feats).pow(2).sum()
        (grad,) = torch.autograd.grad(loss, a)
        return float(loss.detach()), grad.detach().double().cpu().numpy().ravel()

    return fun


class FeatureAdversary(Attack):
    """Feature adversaries (Sabour et al. 2016) and the comparison variants.

    Args:
        layer: module path of the layer whose features are matched ("conv2", "fc1").
        delta: L-inf budget around the source, in (0, 1].
        variant: one of ``"lbfgs"``, ``"feature-fgrad"``, ``"feature-linear"``, ``"label-opt"``.
        max_iter: L-BFGS-B iterations (for the whole batch).
        label_c: weight of ``||a - s||^2`` in ``label-opt``.
        batch_size: images per L-BFGS-B problem; None solves the whole batch as one objective.
        seed: seed for sampling guides in ``attack(model, x, y)``.

    Example::

        attack = FeatureAdversary(layer="fc1", delta=0.2)
        result = attack.generate(model, sources, guides)
        result.extras["distance_ratio"]   # d(a, g) / d(s, g) at the layer, per image
    """

    def __init__(
        self,
        *,
        layer: str,
        delta: float = 0.1,
        variant: str = "lbfgs",
        max_iter: int = 100,
        label_c: float = 0.0,
        batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        owner = type(self).__name__
        if not isinstance(layer, str) or not layer:
            raise ValueError(
                f"The 'layer' parameter of {owner} must be a non-empty module path such as 'fc1'. Got {layer!r}."
            )
        self.layer = layer
        self.delta = check_float(delta, "delta", owner, low=0.0, high=1.0, low_open=True)
        if variant not in VARIANTS:
            raise ValueError(f"The 'variant' parameter of {owner} must be one of {VARIANTS}. Got {variant!r}.")
        self.variant = variant
        self.max_iter = check_int(max_iter, "max_iter", owner, low=1)
        self.label_c = check_float(label_c, "label_c", owner, low=0.0)
        self.batch_size = None if batch_size is None else check_int(batch_size, "batch_size", owner, low=1)
        self.seed = check_int(seed, "seed", owner)

    # -- the standard call: guides sampled from the batch ------------------------------------
    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> AttackResult:
        if x.shape[0] < 2:
            raise ValueError(
                "x must hold at least 2 images to sample guides from the batch; use generate(model, x, guides) instead."
            )
        idx = sample_guides(y, y, target=target, seed=self.seed, exclude_self=True).to(x.device)
        with torch.no_grad():
            glabel = model(x[idx]).argmax(1)
        result = self._solve(model, x, x[idx], glabel)
        result.extras["guide_index"] = idx
        return result

    # -- explicit guides ------------------------------------------------------------------------
    def generate(
        self,
        model: nn.Module,
        x: torch.Tensor,
        guides: torch.Tensor,
        *,
        y: torch.Tensor | None = None,
    ) -> AttackResult:
        """Feature adversaries of sources ``x`` towards ``guides`` (same shape, paired by index).

        ``y`` are the sources' labels (the model's predictions if None); the guides' labels are
        always the model's predictions on them (what "the network sees").
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        check_images(x, "x")
        check_images(guides, "guides")
        if tuple(guides.shape) != tuple(x.shape):
            raise ValueError(
                f"guides must have the same shape as x (one guide per source); got {tuple(guides.shape)} for x of shape {tuple(x.shape)}."
            )
        get_layer(model, self.layer)
        device = model_device(model)
        x = x.to(device=device, dtype=torch.float32)
        guides = guides.to(device=device, dtype=torch.float32)
        with eval_mode(model):
            with torch.no_grad():
                glabel = model(guides).argmax(1)
                y = model(x).argmax(1) if y is None else check_labels(y, "y", n=int(x.shape[0])).to(device)
            result = self._solve(model, x, guides, glabel)
        result.x_adv = result.x_adv.detach().clamp_(0.0, 1.0)
        result.y = y
        return result

    # -- the solvers ----------------------------------------------------------------------------
    def _solve(self, model: nn.Module, x: torch.Tensor, guides: torch.Tensor, glabel: torch.Tensor) -> AttackResult:
        get_layer(model, self.layer)
        n = int(x.shape[0])
        bs = n if self.batch_size is None else self.batch_size
        parts: list[torch.Tensor] = []
        iters: list[int] = []
        for i in range(0, n, bs):
            adv, it = self._solve_batch(model, x[i : i + bs], guides[i : i + bs], glabel[i : i + bs])
            parts.append(adv)
            iters.append(it)
        adv = torch.cat(parts)
        fx = _tap(model, self.layer)
        with torch.no_grad():
            _, fs = fx(x)
            _, fg = fx(guides)
            logits, fa = fx(adv)
        d_sg = (fs - fg).norm(dim=1)
        d_ag = (fa - fg).norm(dim=1)
        pred = logits.argmax(1)
        return AttackResult(
            x_adv=adv,
            success=pred == glabel,
            target=glabel,
            extras={
                "guide": guides,
                "guide_label": glabel,
                "adv_label": pred,
                "distance_ratio": d_ag / d_sg.clamp_min(1e-12),
                "objective_start": (fs - fg).pow(2).sum(1),
                "objective_end": (fa - fg).pow(2).sum(1),
                "iterations": iters,
                "layer": self.layer,
                "delta": self.delta,
                "variant": self.variant,
            },
        )

    def _bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x - self.delta).clamp(0.0, 1.0), (x + self.delta).clamp(0.0, 1.0)

    def _solve_batch(
        self, model: nn.Module, x: torch.Tensor, guides: torch.Tensor, glabel: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        lo, hi = self._bounds(x)
        fx = _tap(model, self.layer)
        with torch.no_grad():
            _, fg = fx(guides)
        if self.variant == "feature-fgrad":
            s = x.clone().requires_grad_(True)
            _, f = fx(s)
            (g,) = torch.autograd.grad((f - fg).pow(2).sum(), s)
            return torch.minimum(torch.maximum(x - self.delta * g.sign(), lo), hi), 1
        shape = tuple(x.shape)
        if self.variant == "lbfgs":
            fun = feature_objective(model, self.layer, fg, shape)
        elif self.variant == "label-opt":
            fun = self._label_objective(model, x, glabel)
        else:
            fun = self._linear_objective(fx, x, fg)
        from scipy.optimize import minimize

        bounds = np.stack([lo.double().cpu().numpy().ravel(), hi.double().cpu().numpy().ravel()], axis=1)
        z0 = x.double().cpu().numpy().ravel()
        res = minimize(
            fun,
            z0,
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": self.max_iter, "maxcor": 10, "ftol": 1e-10, "gtol": 1e-8},
        )
        log.debug("%s %s: %s after %d iterations", type(self).__name__, self.variant, res.message, res.nit)
        adv = torch.from_numpy(res.x).to(device=x.device, dtype=torch.float32).view(shape)
        # float64 -> float32 rounding can step a hair outside the box; project back onto it.
        return torch.minimum(torch.maximum(adv, lo), hi), int(res.nit)

    def _label_objective(
        self, model: nn.Module, x: torch.Tensor, glabel: torch.Tensor
    ) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
        shape, c = tuple(x.shape), self.label_c

        def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
            a = torch.from_numpy(z).to(device=x.device, dtype=torch.float32).view(shape).requires_grad_(True)
            loss = nn.functional.cross_entropy(model(a), glabel, reduction="sum")
            if c > 0:
                loss = loss + c * (a - x).pow(2).sum()
            (grad,) = torch.autograd.grad(loss, a)
            return float(loss.detach()), grad.double().cpu().numpy().ravel()

        return fun

    def _linear_objective(
        self, fx: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor, fg: torch.Tensor
    ) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
        # J v and J^T u at s by double backward: gs(u) = J^T u is linear in u, so d<gs(u), v>/du = J v.
        s = x.clone().requires_grad_(True)
        _, fs = fx(s)
        u = torch.zeros_like(fs, requires_grad=True)
        (jt_u,) = torch.autograd.grad(fs, s, u, create_graph=True)
        r0 = (fs - fg).detach()
        shape = tuple(x.shape)

        def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
            d = torch.from_numpy(z).to(device=x.device, dtype=torch.float32).view(shape) - x
            (jd,) = torch.autograd.grad(jt_u, u, d, retain_graph=True)
            r = r0 + jd
            (grad,) = torch.autograd.grad(fs, s, 2.0 * r, retain_graph=True)
            return float(r.pow(2).sum()), grad.double().cpu().numpy().ravel()

        return fun
