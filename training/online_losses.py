"""The training-time attack and loss of each online hardening method.

Each method attacks the batch against the model as it is at that step, then returns the loss
to minimise:

- ``pgd`` (Madry et al., ICLR 2018): L-inf PGD from a uniform random start on the
  cross-entropy; train on the adversarial images' cross-entropy.
- ``fgsm_rs`` (Wong, Rice, Kolter, ICLR 2020, "Fast is better than free"): one signed step of
  1.25 eps from a uniform random start in the ball; train on its cross-entropy.
- ``trades`` (Zhang et al., ICML 2019): PGD on KL(p(x) || p(x')) from x + 0.001 N(0, 1);
  loss CE(x, y) + beta * KL(p(x) || p(x')).
- ``reject``: adversarial training with an abstain option, the loss of Laidlaw & Feizi
  (NeurIPS 2019, "Playing it safe: adversarial robustness with an abstain option", CARL),
  the formulation closest to the metric guard reports (robust accuracy with rejection; Stutz et
  al.'s CCAT, ICML 2020, and CPR, ICML 2023, are the other references). The attack maximises
  the probability mass of the wrong *real* classes over the true class and the reject class
  together (``logsumexp_{k not in {y, n}} z_k - logsumexp_{k in {y, n}} z_k``, what an attacker of
  a reject model wants); the loss is ``CE(x, y) + w * (-log(p_y(x') + p_n(x')))``: the clean image
  must be classified (not rejected), and anything the attack finds in the ball must be either
  right or rejected, so the reject class absorbs what the attack finds, batch after batch.

Written here rather than with :mod:`guard.attacks` because each training step needs the
method's own objective (the KL of TRADES, the wrong-real-mass of ``reject``) and a per-batch
``torch.Generator`` for the random start, so that a resumed run is bit-identical; the attacks
are a few lines of standard PGD each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ONLINE_METHODS", "attack_batch", "method_loss", "wrong_real_margin", "default_step_size"]

ONLINE_METHODS: tuple[str, ...] = ("pgd", "fgsm_rs", "trades", "reject")


def wrong_real_margin(logits: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    """Per image ``logsumexp`` of the wrong real classes minus ``logsumexp`` of {true, reject}.

    ``logits`` has n + 1 columns (index n = reject); > 0 roughly where a wrong real class wins.
    """
    z = logits.float()
    keep = torch.zeros_like(z, dtype=torch.bool)
    keep[torch.arange(len(y)), y] = True
    keep[:, n] = True
    neg_inf = torch.finfo(z.dtype).min
    wrong = torch.logsumexp(z.masked_fill(keep, neg_inf), dim=1)
    safe = torch.logsumexp(z.masked_fill(~keep, neg_inf), dim=1)
    return wrong - safe


def default_step_size(method: str, eps: float, steps: int) -> float:
    """1.25 eps for FGSM with random start (Wong et al.); 2.5 eps / steps for the PGD methods (Madry et al.)."""
    return 1.25 * eps if method == "fgsm_rs" else 2.5 * eps / max(1, steps)


def _objective(
    method: str, logits: torch.Tensor, y: torch.Tensor, n: int, p_clean: torch.Tensor | None
) -> torch.Tensor:
    """What the attack of ``method`` maximises (summed over the batch)."""
    if method == "trades":
        return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")
    if method == "reject":
        return wrong_real_margin(logits, y, n).sum()
    return F.cross_entropy(logits, y, reduction="sum")


def attack_batch(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    method: str,
    eps: float,
    steps: int,
    step_size: float,
    n: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """The adversarial images ``method`` trains on: in the L-inf ball of radius ``eps`` around ``x`` and in [0, 1].

    ``net`` is used as it is (the caller sets eval mode); no parameter gradient is kept.
    """
    p_clean = None
    if method == "trades":
        with torch.no_grad():
            p_clean = F.softmax(net(x), dim=1)
        noise = torch.randn(x.shape, generator=gen).to(x.device) * 1e-3
    else:
        noise = (torch.rand(x.shape, generator=gen).to(x.device) * 2 - 1) * eps
    x_adv = (x + noise).clamp(0.0, 1.0).detach()
    n_steps = 1 if method == "fgsm_rs" else steps
    for _ in range(n_steps):
        x_adv.requires_grad_(True)
        obj = _objective(method, net(x_adv), y, n, p_clean)
        (grad,) = torch.autograd.grad(obj, x_adv)
        with torch.no_grad():
            x_adv = x_adv + step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
        x_adv = x_adv.detach()
    return x_adv


def method_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    x_adv: torch.Tensor,
    *,
    method: str,
    n: int,
    beta: float,
    reject_weight: float,
) -> torch.Tensor:
    """The loss a step of ``method`` minimises (mean over the batch), through ``model`` in train mode."""
    if method in ("pgd", "fgsm_rs"):
        return F.cross_entropy(model(x_adv), y)
    both = model(torch.cat([x, x_adv]))  # one pass: BatchNorm sees clean and adversarial images together
    clean, adv = both[: len(x)], both[len(x) :]
    ce = F.cross_entropy(clean, y)
    if method == "trades":
        kl = F.kl_div(F.log_softmax(adv, dim=1), F.softmax(clean, dim=1), reduction="batchmean")
        return ce + beta * kl
    log_p = F.log_softmax(adv.float(), dim=1)
    safe = torch.logsumexp(torch.stack([log_p.gather(1, y[:, None])[:, 0], log_p[:, n]], dim=1), dim=1)
    return ce + reject_weight * (-safe).mean()
