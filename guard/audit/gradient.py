"""Audit step ``attacks_gradient``: FGSM and L-inf PGD at three strengths on the held-out images.

Detection depends strongly on how far past the decision boundary an attack goes (Carlini &
Wagner 2017; in Aldahdooh et al. 2022 LID catches 94% of PGD but 65% of CW), so every
detection table of the audit has one row per strength (report entry field ``strength``):

=================  ==========  ===============================================================
report entry       strength    attack
=================  ==========  ===============================================================
``fgsm``           full        one signed step of size eps (Goodfellow et al. 2015)
``pgd_minimal``    minimal     PGD, each image stopped at its first misclassified step
``pgd``            full        PGD-40 without early stop, last iterate (Madry et al. 2018; as
                               torchattacks and the detection papers run it)
``pgd_confident``  confident   PGD-40 maximising the largest wrong-class probability, best
                               iterate kept (CCAT's evaluation, Stutz et al. 2020)
=================  ==========  ===============================================================

The minimal-norm rows (CW-L2, DeepFool) come from torchattacks in the held-out step
(:mod:`guard.audit.heldout`). Each entry: success rate over all held-out images attacked (the
model's label on x_adv differs from its label on the clean image) and over the images the
model classifies correctly, L-inf distances, steps taken and the model's largest wrong-class
probability on the successful images (``wrong_confidence``: how confident the examples are).
Gives an :class:`AttackSet` (artifacts ``attack_NAME``) to the detectors step.

Options (``options.extra``): ``eps`` (L-inf budget; default from the data, :func:`guard.core.budget.data_defaults`:
0.3 on near-binary digits, 8/255 on natural images). Quick mode: the first 256 held-out images
on a model as cheap as the demo LeNet, fewer (down to 128) on costlier ones
(:meth:`AuditContext.scaled`); 40 steps all the same: the strength is what the rows are about.
"""

from __future__ import annotations

import time

import torch

from guard.attacks.base import Attack, AttackResult
from guard.attacks.gradient import FGSM, LinfPGD, wrong_confidence
from guard.audit.step import AttackSet, AttackStep, AuditContext
from guard.core.models import eval_mode

__all__ = ["GradientStep", "attack_entry", "STRENGTHS", "model_outputs"]

NAMES = ("fgsm", "pgd_minimal", "pgd", "pgd_confident")
#: strength of each row (report entry field ``strength``)
STRENGTHS = {"fgsm": "full", "pgd_minimal": "minimal", "pgd": "full", "pgd_confident": "confident"}
STEPS = 40


def attack_entry(result: AttackResult, y_true: torch.Tensor, seconds: float, params: dict) -> dict:
    correct = result.y.cpu() == y_true
    succ = result.success.cpu()
    return {
        "success_rate": result.success_rate,
        "n": len(result),
        "success_rate_on_correct": float(succ[correct].float().mean()) if correct.any() else float("nan"),
        "n_correct": int(correct.sum()),
        "success_definition": "model's label on x_adv != its label on the clean image",
        "seconds": round(seconds, 3),
        "params": params,
    }


@torch.no_grad()
def model_outputs(
    model: torch.nn.Module, x_adv: torch.Tensor, y: torch.Tensor, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's label on each image, its largest probability of a class other than ``y``), batch by batch."""
    preds, conf = [], []
    with eval_mode(model):
        for lo in range(0, x_adv.shape[0], 500):
            logits = model(x_adv[lo : lo + 500].to(device)).float()
            preds.append(logits.argmax(1).cpu())
            conf.append(wrong_confidence(logits, y[lo : lo + 500].to(logits.device)).cpu())
    return torch.cat(preds), torch.cat(conf)


def strength_figures(result: AttackResult, x: torch.Tensor, wrong_conf: torch.Tensor) -> dict:
    """Distances and the confidence of the successful examples: what the strength label stands for."""
    ok = result.success.cpu().bool()
    d = (result.x_adv.cpu() - x.cpu()).flatten(1)
    linf, l2 = d.abs().amax(1), d.norm(dim=1)
    out = {"linf_max": float(linf.max()) if linf.numel() else None}
    if ok.any():
        out.update(
            {
                "wrong_confidence_median": float(wrong_conf[ok].median()),
                "wrong_confidence_mean": float(wrong_conf[ok].mean()),
                "linf_median": float(linf[ok].median()),
                "l2_median": float(l2[ok].median()),
            }
        )
    return out


def run_rows(
    ctx: AuditContext,
    attacks: dict[str, Attack],
    x: torch.Tensor,
    y_true: torch.Tensor,
    idx: torch.Tensor,
    info: dict[str, dict],
    batch: int = 500,
) -> AttackSet:
    """Run each attack on ``x`` batch by batch, write ``report["attacks"][NAME]`` (with ``info[NAME]``) and save it."""
    section = ctx.report.setdefault("attacks", {})
    out = AttackSet()
    for name, attack in attacks.items():
        t0 = time.perf_counter()
        xs, succ, ys, steps = [], [], [], []
        for lo in range(0, x.shape[0], batch):
            r = attack(ctx.model, x[lo : lo + batch])
            xs.append(r.x_adv.cpu())
            succ.append(r.success.cpu())
            ys.append(r.y.cpu())
            if "steps_taken" in r.extras:
                steps.append(r.extras["steps_taken"].cpu())
        seconds = time.perf_counter() - t0
        x_adv, y = torch.cat(xs), torch.cat(ys)
        pred, conf = model_outputs(ctx.model, x_adv, y, ctx.options.device)
        # the model's label on each x_adv: report.html captions its examples "clean label -> this"
        result = AttackResult(x_adv, torch.cat(succ), y, None, {"test_index": idx, "pred": pred})
        entry = attack_entry(result, y_true, seconds, attack.params())
        entry.update(info.get(name, {}))
        entry.update(strength_figures(result, x, conf))
        if steps:
            entry["mean_steps_taken"] = float(torch.cat(steps).float().mean())
        section[name] = entry
        out.results[name] = result
        ctx.save_attack(name, result, {"params": attack.params()})
    return out


class GradientStep(AttackStep):
    """FGSM and L-inf PGD (minimal, full, confident) on the held-out images."""

    name = "attacks_gradient"
    attack_names = NAMES

    def run(self, ctx: AuditContext) -> AttackSet:
        n = min(ctx.scaled(256, minimum=128), len(ctx.test)) if ctx.options.quick else len(ctx.test)
        x, y_true = ctx.test.x[:n], ctx.test.y[:n]
        eps = float(ctx.options.extra.get("eps", ctx.defaults.get("eps", 0.3)))
        seed = ctx.options.seed
        attacks: dict[str, Attack] = {
            "fgsm": FGSM(eps=eps),
            "pgd_minimal": LinfPGD(eps=eps, steps=STEPS, random_start=True, early_stop=True, seed=seed),
            "pgd": LinfPGD(eps=eps, steps=STEPS, random_start=True, early_stop=False, seed=seed),
            "pgd_confident": LinfPGD(eps=eps, steps=STEPS, random_start=True, loss="confidence", seed=seed),
        }
        info = {name: {"strength": STRENGTHS[name], "held_out": False} for name in attacks}
        return run_rows(ctx, attacks, x, y_true, torch.arange(n), info)
