"""Audit step ``attacks_heldout``: peer attacks guard never tuned on, from torchattacks (the ``[bench]`` extra).

A detector tuned on its own attacks can miss attacks built differently; these rows are the
check (Tramèr et al. 2020: evaluate against attacks the defence was not designed around). Each
is run as torchattacks runs it, on the first held-out images (the same images as the gradient
rows), against the model's own labels, and its report entry says ``"held_out": true`` and its
strength:

==============  ============  ================================================================
report entry    strength      torchattacks attack
==============  ============  ================================================================
``apgd_ce``     full          APGD-CE, L-inf (Croce & Hein 2020, AutoAttack)
``apgd_t``      full          APGD-T: targeted DLR loss over every other class (ibid.)
``square``      minimal       Square, L-inf, score-based: no gradient; an image stops once it
                              is misclassified (Andriushchenko et al. 2020)
``cw``          minimal-norm  Carlini-Wagner L2 (2017): the smallest L2 change that flips the
                              label, kappa 0; no eps
``deepfool``    minimal-norm  DeepFool (Moosavi-Dezfooli et al. 2016): the nearest boundary, 2%
                              overshoot; no eps
==============  ============  ================================================================

The step is skipped (and says so) when torchattacks cannot be imported. torchattacks calls
``backward`` on the model (CW), so the model's parameters are frozen for the run and restored
afterwards (``requires_grad`` and ``.grad`` as they were).

CPU budget (:func:`settings`; each entry's ``params`` and ``budget`` say what ran): quick runs
64 images (DeepFool 32) with APGD 10 steps, APGD-T 10 steps per target class, Square 300
queries, CW 50 steps, DeepFool 50 steps; the full audit 500 images (DeepFool 200) with
100 / 100 / 5,000 / 100 / 50; ``options.extra["heldout_n"]`` caps the image count. CW runs with
Adam's rate 0.1, not torchattacks' default 0.01: at 0.01 and 50 steps it changed the label of 9%
of the demo MNIST model's images (0.1: 83%). torchattacks' DeepFool clips to [0, 1] after
every step, which stalls it on near-binary digits; its success rate says how often it got there.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from guard.attacks.base import Attack, AttackResult
from guard.audit.gradient import run_rows
from guard.audit.step import AttackSet, AttackStep, AuditContext
from guard.core.models import eval_mode

__all__ = ["HeldOutStep", "NAMES", "STRENGTHS", "settings"]

NAMES = ("apgd_ce", "apgd_t", "square", "cw", "deepfool")
STRENGTHS = {"apgd_ce": "full", "apgd_t": "full", "square": "minimal", "cw": "minimal-norm", "deepfool": "minimal-norm"}


def settings(quick: bool) -> dict[str, Any]:
    """The budget of each attack: images (``n``; DeepFool, which torchattacks runs one image at a
    time with one backward pass per class, gets fewer) and steps / queries."""
    if quick:
        return {
            "n": 64,
            "apgd_ce": {"steps": 10},
            "apgd_t": {"steps": 10},
            "square": {"n_queries": 300},
            "cw": {"steps": 50, "c": 1.0, "kappa": 0.0, "lr": 0.1},
            "deepfool": {"steps": 50, "overshoot": 0.02, "n": 32},
        }
    return {
        "n": 500,
        "apgd_ce": {"steps": 100},
        "apgd_t": {"steps": 100},
        "square": {"n_queries": 5000},
        "cw": {"steps": 100, "c": 1.0, "kappa": 0.0, "lr": 0.1},
        "deepfool": {"steps": 50, "overshoot": 0.02, "n": 200},
    }


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No parameter gradient during the run (torchattacks' CW calls backward); everything restored."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f, g in zip(params, flags, grads):
            p.requires_grad_(f)
            p.grad = g


class TorchAttack(Attack):
    """A torchattacks attack behind guard's attack contract (the model at call time, an AttackResult).

    Written here only as an adapter: the attack itself is torchattacks' (``name`` is its class name).
    """

    def __init__(self, *, name: str, **kwargs: Any) -> None:
        self.name = name
        self.kwargs = dict(kwargs)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> AttackResult:
        import torchattacks

        with _frozen(model), eval_mode(model):
            atk = getattr(torchattacks, self.name)(model, **self.kwargs)
            x_adv = atk(x, y).detach().to(x.device)
        return AttackResult(x_adv, self.is_success(model, x_adv, y, target))

    def params(self) -> dict[str, Any]:
        return {
            "torchattacks": self.name,
            **{k: v for k, v in self.kwargs.items() if isinstance(v, (int, float, str, bool))},
        }


def make_attacks(eps: float, num_classes: int, quick: bool, seed: int) -> dict[str, Attack]:
    s = settings(quick)
    return {
        "apgd_ce": TorchAttack(name="APGD", norm="Linf", eps=eps, loss="ce", n_restarts=1, seed=seed, **s["apgd_ce"]),
        "apgd_t": TorchAttack(
            name="APGDT", norm="Linf", eps=eps, n_restarts=1, seed=seed, n_classes=num_classes, **s["apgd_t"]
        ),
        "square": TorchAttack(name="Square", norm="Linf", eps=eps, n_restarts=1, seed=seed, **s["square"]),
        "cw": TorchAttack(name="CW", **s["cw"]),
        "deepfool": TorchAttack(name="DeepFool", steps=s["deepfool"]["steps"], overshoot=s["deepfool"]["overshoot"]),
    }


class HeldOutStep(AttackStep):
    """torchattacks' APGD-CE, APGD-T, Square, CW and DeepFool on the first held-out images."""

    name = "attacks_heldout"
    attack_names = NAMES

    def skip_reason(self, ctx: AuditContext) -> str | None:
        if importlib.util.find_spec("torchattacks") is None:
            return "torchattacks is not installed (pip install 'guard[bench]' adds the held-out peer attacks)"
        return None

    def run(self, ctx: AuditContext) -> AttackSet:
        quick = ctx.options.quick
        n = min(int(ctx.options.extra.get("heldout_n", settings(quick)["n"])), len(ctx.test))
        x, y_true = ctx.test.x[:n], ctx.test.y[:n]
        eps = float(ctx.options.extra.get("eps", ctx.defaults.get("eps", 0.3)))
        num_classes = int(ctx.report.get("model", {}).get("num_classes") or 0)
        if num_classes < 2:
            with torch.no_grad(), eval_mode(ctx.model):
                num_classes = int(ctx.model(x[:1].to(ctx.options.device)).shape[1])
        s = settings(quick)
        out = AttackSet()
        for name, attack in make_attacks(eps, num_classes, quick, ctx.options.seed).items():
            m = min(n, int(s[name].get("n", n)))
            info = {
                name: {
                    "strength": STRENGTHS[name],
                    "held_out": True,
                    "budget": f"{'quick' if quick else 'full'} mode: {m} images, "
                    + ", ".join(f"{k} {v}" for k, v in s[name].items() if k != "n"),
                }
            }
            out = out.merged(
                run_rows(ctx, {name: attack}, x[:m], y_true[:m], torch.arange(m), info, batch=64 if quick else 100)
            )
        return out
