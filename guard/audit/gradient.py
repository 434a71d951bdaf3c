"""Audit step ``attacks_gradient``: FGSM and L-inf PGD on the held-out images.

Report entries ``attacks.fgsm`` and ``attacks.pgd``: success rate over all held-out images
(the model's label on x_adv differs from its label on the clean image) and over the images
the model classifies correctly, plus L-inf distances. Gives an :class:`AttackSet` (saved as
artifacts ``attack_fgsm`` / ``attack_pgd``) to the detectors step.

Options (``options.extra``): ``eps`` (L-inf budget; default from the data, :func:`guard.core.budget.data_defaults`:
0.3 on near-binary digits, 8/255 on natural images).
"""

from __future__ import annotations

import time

import torch

from guard.attacks.base import AttackResult
from guard.attacks.gradient import FGSM, LinfPGD
from guard.audit.step import AttackSet, AttackStep, AuditContext
from guard.core.models import predict_labels

__all__ = ["GradientStep", "attack_entry"]

NAMES = ("fgsm", "pgd")


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


class GradientStep(AttackStep):
    """FGSM and L-inf PGD on the held-out images."""

    name = "attacks_gradient"
    attack_names = NAMES

    def run(self, ctx: AuditContext) -> AttackSet:
        quick = ctx.options.quick
        n = 256 if quick else len(ctx.test)
        idx = torch.arange(n)
        x, y_true = ctx.test.x[:n], ctx.test.y[:n]
        eps = float(ctx.options.extra.get("eps", ctx.defaults.get("eps", 0.3)))
        attacks = {
            "fgsm": FGSM(eps=eps),
            "pgd": LinfPGD(eps=eps, steps=10 if quick else 40, random_start=True, early_stop=True, seed=ctx.options.seed),
        }
        section = ctx.report.setdefault("attacks", {})
        out = AttackSet()
        for name, attack in attacks.items():
            t0 = time.perf_counter()
            xs, succ, ys, steps = [], [], [], []
            for lo in range(0, n, 500):
                r = attack(ctx.model, x[lo:lo + 500])
                xs.append(r.x_adv.cpu())
                succ.append(r.success.cpu())
                ys.append(r.y.cpu())
                if "steps_taken" in r.extras:
                    steps.append(r.extras["steps_taken"].cpu())
            seconds = time.perf_counter() - t0
            x_adv = torch.cat(xs)
            # the model's label on each x_adv: report.html captions its examples "clean label -> this"
            result = AttackResult(x_adv, torch.cat(succ), torch.cat(ys), None,
                                  {"test_index": idx, "pred": predict_labels(ctx.model, x_adv.to(ctx.options.device)).cpu()})
            entry = attack_entry(result, y_true, seconds, attack.params())
            entry["linf_max"] = float((result.x_adv - x).abs().amax())
            if steps:
                entry["mean_steps_taken"] = float(torch.cat(steps).float().mean())
            section[name] = entry
            out.results[name] = result
            ctx.save_attack(name, result, {"params": attack.params()})
        return out
