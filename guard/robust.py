"""``guard.evaluate_robust``: robust accuracy under AutoAttack's components, with rejection for a reject model.

AutoAttack (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020), as RobustBench runs it: APGD-CE, APGD-T (targeted
DLR), FAB-T (Croce & Hein, ICML 2020, "Minimally distorted adversarial examples with a fast
adaptive boundary attack") and Square (Andriushchenko et al., ECCV 2020), run one after the other
on the images that survived the attacks before (an image broken once stays broken). The four are
torchattacks' implementations (the ``[bench]`` extra); guard's own :class:`guard.attacks.APGD`
adds restarts of APGD-CE and, for a model with a reject output, the reject-aware margin
(max over wrong real classes minus max(true, reject)), which torchattacks has no loss for.

For a reject model (:class:`guard.training.RejectClassifier`, or ``real_classes`` given: outputs
``>= real_classes`` reject) torchattacks attacks a view of the model restricted to the real
classes, and every attacked image is judged on the whole model:

* **robust accuracy with rejection** (Stutz et al., CCAT, ICML 2020; "Stratified adversarial
  robustness with rejection", ICML 2023): the clean image is classified correctly and not
  rejected, *and* no attack makes the model output a wrong real class (rejecting an attacked
  image is safe);
* **robust accuracy** (without counting rejections): the same, but an attacked image that is
  rejected counts as an error. For a plain model the two coincide.

The sanity checks are AutoAttack's flags (its ``checks.py``): Square (black-box) should break no
image the white-box attacks left, the input gradient should not be zero, the model should be
deterministic and output logits, not probabilities; and, from Carlini et al. 2019 ("On evaluating
adversarial robustness"), robust accuracy should fall as eps grows and reach 0 at a large eps
(:func:`robust_sweep`). The per-iteration losses of guard's APGD are kept for a few images.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from guard.attacks.apgd import APGD
from guard.core.data import Split, load_data
from guard.core.intervals import rate_interval as clopper_pearson  # the name this module has always exported
from guard.core.models import eval_mode, model_device
from guard.core.validation import check_float, check_int
from guard.training.consistent import ConsistentRejection, InnerPointView
from guard.training.reject import RejectClassifier

__all__ = [
    "ROBUST_ATTACKS",
    "RobustBudget",
    "RealClassView",
    "default_attacks",
    "evaluate_robust",
    "robust_sweep",
    "clopper_pearson",
]

#: Every attack evaluate_robust can run, in the order it runs them. guard's APGD-CE goes first: it
#: drops each image as soon as it is broken, so an undefended model costs a few steps per image
#: instead of AutoAttack's 100 for every one (the final figures do not depend on the order: an image
#: is robust only if every attack fails on it). Square goes last, as in AutoAttack, so that it only
#: sees what the white-box attacks left (its flag).
ROBUST_ATTACKS: tuple[str, ...] = (
    "guard-apgd-ce",
    "apgd-ce",
    "apgd-t",
    "fab-t",
    "guard-apgd-reject",
    "guard-apgd-consistent",
    "square",
)
_WHITE_BOX = ("apgd-ce", "apgd-t", "fab-t", "guard-apgd-ce", "guard-apgd-reject", "guard-apgd-consistent")


@dataclass(frozen=True)
class RobustBudget:
    """How hard the attacks try. The default is AutoAttack's standard version; :meth:`quick` fits a CPU smoke run.

    Attributes:
        steps: iterations of APGD-CE, APGD-T and guard's APGD (AutoAttack: 100).
        restarts: random restarts of guard's APGD (AutoAttack's own components run once).
        n_target_classes: target classes of APGD-T and FAB-T (AutoAttack: 9).
        fab_steps: iterations of FAB-T per target (AutoAttack: 100).
        n_queries: queries of Square per image (AutoAttack: 5000).
        curves: images whose per-iteration APGD losses are kept.
    """

    steps: int = 100
    restarts: int = 3
    n_target_classes: int = 9
    fab_steps: int = 100
    n_queries: int = 5000
    curves: int = 4

    def __post_init__(self) -> None:
        for f in fields(self):
            check_int(getattr(self, f.name), f.name, "RobustBudget", low=0 if f.name == "curves" else 1)

    @classmethod
    def quick(cls) -> RobustBudget:
        """A budget for tests and CPU smoke runs (a fifth of the steps, 3 targets, 300 queries)."""
        return cls(steps=20, restarts=1, n_target_classes=3, fab_steps=20, n_queries=300, curves=4)

    @classmethod
    def cpu(cls) -> RobustBudget:
        """What two CPU cores finish in a session on a few hundred CIFAR-10 images: half AutoAttack's
        steps, two restarts of guard's APGD, 3 target classes, 30 FAB steps, 1,000 Square queries."""
        return cls(steps=50, restarts=2, n_target_classes=3, fab_steps=30, n_queries=1000, curves=4)

    @classmethod
    def resolve(cls, budget: RobustBudget | str) -> RobustBudget:
        if isinstance(budget, RobustBudget):
            return budget
        if budget == "standard":
            return cls()
        if budget == "quick":
            return cls.quick()
        if budget == "cpu":
            return cls.cpu()
        raise ValueError(f"budget must be a RobustBudget, 'standard', 'cpu' or 'quick'; got {budget!r}.")


class RealClassView(nn.Module):
    """The model's first ``real_classes`` logits: what an attack that knows nothing of a reject class sees.

    torchattacks' attacks take a model of n class logits; a reject model's (n+1)-th output would
    otherwise be one more class to them. The view is built in eval mode, so that torchattacks
    (which puts a model in train mode again after an attack when it found it there) never
    changes the wrapped model's mode.
    """

    def __init__(self, model: nn.Module, real_classes: int) -> None:
        super().__init__()
        self.model = model
        self.real_classes = real_classes
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, : self.real_classes]


def _has_torchattacks() -> bool:
    try:
        import torchattacks  # noqa: F401
    except ImportError:
        return False
    return True


def default_attacks(reject: bool, real_classes: int = 10, *, consistent: bool = False) -> tuple[str, ...]:
    """AutoAttack's four, guard's APGD-CE with restarts, and the attack that knows the rejection: the
    reject-aware APGD for a reject class, the inner-point APGD-T for a :class:`ConsistentRejection`
    (``consistent``). The targeted DLR loss needs at least 4 classes: APGD-T is left out below that."""
    knowing = "guard-apgd-consistent" if consistent else ("guard-apgd-reject" if reject else None)
    return tuple(
        a
        for a in ROBUST_ATTACKS
        if (a not in ("guard-apgd-reject", "guard-apgd-consistent") or a == knowing)
        and (real_classes >= 4 or a not in ("apgd-t", "guard-apgd-consistent"))
    )


def _check_attacks(
    attacks: Sequence[str] | None, reject: bool, real_classes: int, consistent: bool = False
) -> tuple[str, ...]:
    if attacks is None:
        return default_attacks(reject, real_classes, consistent=consistent)
    if isinstance(attacks, str) or not isinstance(attacks, Sequence) or not attacks:
        raise ValueError(f"attacks must be a non-empty list of names from {list(ROBUST_ATTACKS)}; got {attacks!r}.")
    unknown = [a for a in attacks if a not in ROBUST_ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack name(s) {unknown}; expected names from {list(ROBUST_ATTACKS)}.")
    if "guard-apgd-reject" in attacks and not reject:
        raise ValueError(
            "attack 'guard-apgd-reject' needs a model with a reject output (a RejectClassifier, or "
            "real_classes below the model's outputs); this model has none."
        )
    if "guard-apgd-consistent" in attacks and not consistent:
        raise ValueError(
            "attack 'guard-apgd-consistent' needs a guard.training.ConsistentRejection (it attacks the "
            "defence's consistency check); this model is not one."
        )
    for name in ("apgd-t", "guard-apgd-consistent"):
        if name in attacks and real_classes < 4:
            raise ValueError(
                f"attack {name!r} (targeted DLR loss) needs at least 4 classes; the model has {real_classes}."
            )
    return tuple(a for a in ROBUST_ATTACKS if a in attacks)  # the evaluation's order, each once


def _torchattack(name: str, view: RealClassView, eps: float, budget: RobustBudget, seed: int) -> Any:
    """torchattacks' attack ``name`` on the real-class view, configured from ``budget``."""
    import torchattacks

    n = view.real_classes
    with contextlib.redirect_stdout(io.StringIO()):  # it prints when a model has no parameters
        if name == "apgd-ce":
            atk = torchattacks.APGD(view, norm="Linf", eps=eps, steps=budget.steps, n_restarts=1, seed=seed, loss="ce")
        elif name == "apgd-t":
            atk = torchattacks.APGDT(
                view, norm="Linf", eps=eps, steps=budget.steps, n_restarts=1, seed=seed, n_classes=n
            )
            atk.n_target_classes = min(budget.n_target_classes, n - 1)
        elif name == "fab-t":
            atk = torchattacks.FAB(
                view,
                norm="Linf",
                eps=eps,
                steps=budget.fab_steps,
                n_restarts=1,
                seed=seed,
                multi_targeted=True,
                n_classes=n,
            )
            atk.n_target_classes = min(budget.n_target_classes, n - 1)
        else:
            atk = torchattacks.Square(view, norm="Linf", eps=eps, n_queries=budget.n_queries, n_restarts=1, seed=seed)
    atk.set_device(model_device(view))
    return atk


class _Runner:
    """One attack of the evaluation, called on a batch: ``runner(x, y) -> x_adv``."""

    def __init__(
        self, name: str, model: nn.Module, real: int, reject: bool, eps: float, budget: RobustBudget, seed: int
    ) -> None:
        if isinstance(model, ConsistentRejection):
            # the attacker who knows the consistency check runs APGD-T at the check's worst point;
            # the others attack the classifier's own logits, as CPR's authors run AutoAttack (their
            # results are judged on the whole defence all the same)
            model = InnerPointView(model) if name == "guard-apgd-consistent" else model.model
        self.name, self.model = name, model
        fallback = name in ("apgd-ce", "apgd-t") and not _has_torchattacks()
        self.impl = "guard" if name.startswith("guard-") or fallback else "torchattacks"
        self.params: dict[str, Any] = {"impl": self.impl}
        if self.impl == "torchattacks":
            self.attack = _torchattack(name, RealClassView(model, real), eps, budget, seed)
            self.params.update(
                {
                    k: getattr(self.attack, k)
                    for k in ("steps", "n_queries", "n_target_classes", "n_restarts")
                    if hasattr(self.attack, k)
                }
            )
        else:
            loss = {
                "apgd-ce": "ce",
                "apgd-t": "dlr-targeted",
                "guard-apgd-ce": "ce",
                "guard-apgd-reject": "reject",
                "guard-apgd-consistent": "dlr-targeted",
            }[name]
            restarts = 1 if name in ("apgd-ce", "apgd-t") else budget.restarts
            # guard's APGD-CE on a reject model: CE over every output, and reaching the reject class
            # counts as success (it serves the figure that counts rejections as errors); the
            # reject-aware loss serves robust accuracy with rejection
            self.attack = APGD(
                eps=eps,
                steps=budget.steps,
                restarts=restarts,
                loss=loss,
                seed=seed,
                n_target_classes=budget.n_target_classes,
                real_classes=real if loss == "reject" or name == "guard-apgd-consistent" else None,
            )
            self.params.update(self.attack.params())

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.impl == "torchattacks":
            devices = [x.device] if x.device.type == "cuda" else []
            # torchattacks seeds the global RNG (forked: the caller's stays as it was) and calls
            # backward() on the model (FAB, Square), which would add to the parameters' .grad:
            # they are frozen for the call and given back as they were
            params = [(p, p.requires_grad, p.grad) for p in self.model.parameters()]
            try:
                for p, _, _ in params:
                    p.requires_grad_(False)
                with torch.random.fork_rng(devices=devices):
                    return self.attack(x, y).detach()
            finally:
                for p, flag, grad in params:
                    p.requires_grad_(flag)
                    p.grad = grad
        return self.attack(self.model, x, y).x_adv


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, x.shape[0], batch_size)]
        )


def _model_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """AutoAttack's checks on a few images: a deterministic model, logits (not probabilities), non-zero input gradients."""
    xs, ys = x[:32].to(device), y[:32].to(device)
    with torch.no_grad():
        a, b = model(xs), model(xs)
    probabilities = bool(
        ((a >= 0) & (a <= 1)).all() and torch.allclose(a.sum(1), torch.ones(len(a), device=device), atol=1e-4)
    )
    xg = xs.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(xg), ys, reduction="sum")
    if loss.requires_grad:
        (g,) = torch.autograd.grad(loss, xg, allow_unused=True)
        zero = 1.0 if g is None else float((g.flatten(1).abs().amax(1) == 0).float().mean())
    else:  # the output does not depend on the input at all
        zero = 1.0
    return {"randomized": not torch.equal(a, b), "outputs_probabilities": probabilities, "zero_gradient_share": zero}


def _prepare(
    model: nn.Module, data: Any, n: int | None, real_classes: int | None, device: torch.device
) -> tuple[Split, int, int]:
    """(the first n images, the model's outputs, its real classes)."""
    split = load_data(data, "data")
    if n is not None:
        n = check_int(n, "n", "evaluate_robust", low=1)
        if n > len(split):
            raise ValueError(
                f"The 'n' parameter of evaluate_robust must be at most the number of images ({len(split)}). Got {n}."
            )
        split = Split(split.x[:n], split.y[:n])
    with torch.no_grad():
        outputs = int(model(split.x[:1].to(device)).shape[1])
    if real_classes is None:
        real_classes = model.num_classes if isinstance(model, (RejectClassifier, ConsistentRejection)) else outputs
    real_classes = check_int(real_classes, "real_classes", "evaluate_robust", low=2, high=outputs)
    if int(split.y.max()) >= real_classes:
        raise ValueError(
            f"data labels must lie in [0, {real_classes - 1}] (the model's real classes); got a maximum of {int(split.y.max())}."
        )
    return split, outputs, real_classes


def _as_list(curves: torch.Tensor) -> list[list[float | None]]:
    return [[None if math.isnan(v) else round(float(v), 6) for v in row] for row in curves.tolist()]


class _State:
    """Per-image bookkeeping of one evaluation (CPU bool tensors)."""

    def __init__(self, correct: torch.Tensor) -> None:
        self.correct = correct
        self.broken = torch.zeros_like(correct)  # some attack made the model output a wrong real class
        self.rejected = torch.zeros_like(correct)  # some attack's image was rejected

    @property
    def robust_with_rejection(self) -> torch.Tensor:
        return self.correct & ~self.broken

    @property
    def robust(self) -> torch.Tensor:
        return self.correct & ~self.broken & ~self.rejected


def _run_one(
    runner: _Runner,
    model: nn.Module,
    split: Split,
    state: _State,
    eps: float,
    real: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """Attack the images still robust (with rejection), judge every result on the whole model, update ``state``."""
    todo = state.robust_with_rejection.nonzero().squeeze(1)
    t0 = time.perf_counter()
    newly = rejected = 0
    for lo in range(0, int(todo.numel()), batch_size):
        idx = todo[lo : lo + batch_size]
        xb, yb = split.x[idx].to(device), split.y[idx].to(device)
        x_adv = runner(xb, yb)
        # every attack is judged inside the ball, whatever it returned (FAB divides by zero gradients: NaN -> clean)
        x_adv = x_adv.to(device)
        x_adv = torch.where(torch.isfinite(x_adv), x_adv, xb)
        x_adv = torch.minimum(torch.maximum(x_adv, xb - eps), xb + eps).clamp(0.0, 1.0)
        pred = _predict(model, x_adv, batch_size, device)
        hit = (pred != split.y[idx]) & (pred < real)
        newly += int((hit & ~state.broken[idx]).sum())
        state.broken[idx[hit]] = True
        rejected += int((pred >= real).sum())
        state.rejected[idx[pred >= real]] = True
    n = int(state.correct.numel())
    return {
        "attacked": int(todo.numel()),
        "broken": newly,
        "rejected": rejected,
        "robust_accuracy_with_rejection": float(state.robust_with_rejection.sum()) / n,
        "robust_accuracy": float(state.robust.sum()) / n,
        "seconds": round(time.perf_counter() - t0, 3),
        "params": runner.params,
    }


def _loss_curves(
    model: nn.Module,
    split: Split,
    correct: torch.Tensor,
    eps: float,
    real: int,
    reject: bool,
    budget: RobustBudget,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """Per-iteration APGD losses of the first ``budget.curves`` correctly classified images (AutoAttack's
    sanity plots): one full run each (no early stop), apart from the evaluation, whose cascade may leave
    guard's APGD nothing to attack."""
    idx = correct.nonzero().squeeze(1)[: budget.curves]
    if idx.numel() == 0 or eps == 0.0:
        return {}
    xb, yb = split.x[idx].to(device), split.y[idx].to(device)
    out = {}
    if isinstance(model, ConsistentRejection):
        runs = [("guard-apgd-ce", "ce", model.model), ("guard-apgd-consistent", "dlr-targeted", InnerPointView(model))]
    else:
        runs = [("guard-apgd-ce", "ce", model)] + ([("guard-apgd-reject", "reject", model)] if reject else [])
    for name, loss, target_model in runs:
        res = APGD(
            eps=eps,
            steps=budget.steps,
            loss=loss,
            early_stop=False,
            curves=int(idx.numel()),
            seed=seed,
            n_target_classes=1,
            real_classes=real if loss == "reject" or name == "guard-apgd-consistent" else None,
        )(target_model, xb, yb)
        out[name] = {"images": idx.tolist(), "loss": _as_list(res.extras["loss_curves"]), "loss_name": loss}
    return out


def _flags(checks: dict[str, Any], per_attack: dict[str, dict[str, Any]]) -> list[str]:
    """AutoAttack's warnings, as sentences (also raised as RuntimeWarning)."""
    out = []
    if checks["randomized"]:
        out.append(
            "the model gives different outputs for the same input (randomised defence): use EOT (AutoAttack's 'rand' version)."
        )
    if checks["outputs_probabilities"]:
        out.append(
            "the model's outputs look like probabilities, not logits: the CE and DLR losses are then flat; return logits."
        )
    if checks["zero_gradient_share"] > 0:
        out.append(
            f"{checks['zero_gradient_share']:.0%} of the checked images have a zero input gradient: gradient masking "
            "makes the white-box attacks fail without the model being robust."
        )
    if checks.get("square_beat_white_box"):
        out.append(
            f"Square (black-box) broke {per_attack['square']['broken']} image(s) that every white-box attack left: "
            "a sign of gradient masking; the white-box figures are not reliable."
        )
    return out


def evaluate_robust(
    model: nn.Module,
    data: Any,
    *,
    eps: float,
    attacks: Sequence[str] | None = None,
    n: int | None = None,
    seed: int = 0,
    restarts: int | None = None,
    batch_size: int = 128,
    budget: RobustBudget | str = "standard",
    real_classes: int | None = None,
) -> dict[str, Any]:
    """Robust accuracy of ``model`` on ``data`` in the L-inf ball of radius ``eps``, as AutoAttack measures it.

    Args:
        model: a classifier of float NCHW images in [0, 1] returning logits; a
            :class:`guard.training.RejectClassifier` (or any model with ``real_classes`` given)
            is evaluated with rejection. Never modified; its modes are restored.
        data: labelled images: ``(x, y)``, a :class:`guard.Split`, a Dataset or a DataLoader.
        eps: L-inf budget in [0, 1] (8/255 for CIFAR-10, 0.3 for MNIST).
        attacks: names from :data:`ROBUST_ATTACKS` (default :func:`default_attacks`); they run in
            that order, each on the images the ones before did not break.
        n: evaluate the first ``n`` images (default all).
        seed: seeds every attack (attack k of the list gets ``seed + k``).
        restarts: random restarts of guard's APGD (overrides ``budget.restarts``).
        batch_size: images per attack call.
        budget: a :class:`RobustBudget`, ``"standard"`` (AutoAttack's) or ``"quick"``.
        real_classes: the model's first ``real_classes`` outputs are classes, the rest reject.

    Returns:
        A JSON-friendly dict: ``eps``, ``n``, ``clean_accuracy``, ``clean_rejected``,
        ``robust_accuracy`` (an attacked image that is rejected is an error),
        ``robust_accuracy_with_rejection`` (it is safe), ``attacks`` (the names run),
        ``intervals`` (95% Clopper-Pearson of each rate), ``per_attack`` (images attacked,
        broken and rejected by each, the cumulative figures after it, seconds, parameters),
        ``checks`` and ``warnings`` (AutoAttack's flags), ``loss_curves`` (guard's APGD, a few
        images), ``budget``, ``unavailable`` (attacks skipped because torchattacks is missing).
    """
    eps, seed, batch_size, budget = _check_arguments(model, eps, seed, batch_size, budget, restarts)
    device = model_device(model)
    t0 = time.perf_counter()
    with eval_mode(model):
        split, outputs, real = _prepare(model, data, n, real_classes, device)
        reject = real < outputs
        names = _check_attacks(attacks, reject, real, consistent=isinstance(model, ConsistentRejection))
        pred = _predict(model, split.x, batch_size, device)
        state = _State(pred == split.y)
        checks = _model_checks(model, split.x, split.y, device)
        per_attack: dict[str, dict[str, Any]] = {}
        unavailable = [a for a in names if a in ("fab-t", "square") and not _has_torchattacks()]
        for k, name in enumerate(names):
            if name in unavailable or eps == 0.0:  # nothing moves in a ball of radius 0
                continue
            runner = _Runner(name, model, real, reject, eps, budget, seed + k)
            per_attack[name] = _run_one(runner, model, split, state, eps, real, batch_size, device)
        curves = (
            _loss_curves(model, split, state.correct, eps, real, reject, budget, seed, device) if budget.curves else {}
        )
    flags = _warn(unavailable, checks, per_attack)
    rates, counts, intervals = _figures(state, pred, real, len(split))
    return {
        "eps": eps,
        "n": len(split),
        **rates,
        "attacks": list(per_attack),
        "reject_model": reject,
        "real_classes": real,
        "counts": counts,
        "intervals": intervals,
        "per_attack": per_attack,
        "checks": checks,
        "warnings": flags,
        "loss_curves": curves,
        "budget": asdict(budget),
        "seed": seed,
        "unavailable": unavailable,
        "seconds": round(time.perf_counter() - t0, 3),
        "rule": _RULE,
    }


_RULE = (
    "robust with rejection: clean prediction correct and no attack makes the model output a wrong real "
    "class (a rejected attacked image is safe); robust: the same and no attacked image is rejected"
)


def _check_arguments(
    model: Any, eps: Any, seed: Any, batch_size: Any, budget: RobustBudget | str, restarts: int | None
) -> tuple[float, int, int, RobustBudget]:
    """``evaluate_robust``'s arguments checked, in order: (eps, seed, batch_size, the budget with its restarts)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    eps = check_float(eps, "eps", "evaluate_robust", low=0.0, high=1.0)
    seed = check_int(seed, "seed", "evaluate_robust", low=0)
    batch_size = check_int(batch_size, "batch_size", "evaluate_robust", low=1)
    budget = RobustBudget.resolve(budget)
    if restarts is not None:
        budget = replace(budget, restarts=check_int(restarts, "restarts", "evaluate_robust", low=1))
    return eps, seed, batch_size, budget


def _warn(unavailable: list[str], checks: dict[str, Any], per_attack: dict[str, dict[str, Any]]) -> list[str]:
    """Warn (RuntimeWarning, at ``evaluate_robust``'s caller) of missing attacks and of AutoAttack's flags; the flags.

    Also sets ``checks["square_beat_white_box"]``.
    """
    if unavailable:
        warnings.warn(
            f"torchattacks is not installed (pip install 'guard[bench]'): {unavailable} did not run, so the "
            "evaluation is weaker than AutoAttack's.",
            RuntimeWarning,
            stacklevel=3,
        )
    white = [a for a in per_attack if a in _WHITE_BOX]
    checks["square_beat_white_box"] = (per_attack["square"]["broken"] > 0) if "square" in per_attack and white else None
    flags = _flags(checks, per_attack)
    for msg in flags:
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return flags


def _figures(
    state: _State, pred: torch.Tensor, real: int, count: int
) -> tuple[dict[str, float], dict[str, int], dict[str, Any]]:
    """(the four rates, their counts, their 95% Clopper-Pearson intervals) over ``count`` images."""
    k_clean, k_rej = int(state.correct.sum()), int((pred >= real).sum())
    k_rob, k_robr = int(state.robust.sum()), int(state.robust_with_rejection.sum())
    rates = {
        "clean_accuracy": k_clean / count,
        "clean_rejected": k_rej / count,
        "robust_accuracy": k_rob / count,
        "robust_accuracy_with_rejection": k_robr / count,
    }
    counts = {"clean_correct": k_clean, "clean_rejected": k_rej, "robust": k_rob, "robust_with_rejection": k_robr}
    intervals = {
        "level": 0.95,
        "method": "clopper-pearson",
        "clean_accuracy": clopper_pearson(k_clean, count),
        "clean_rejected": clopper_pearson(k_rej, count),
        "robust_accuracy": clopper_pearson(k_rob, count),
        "robust_accuracy_with_rejection": clopper_pearson(k_robr, count),
    }
    return rates, counts, intervals


def robust_sweep(model: nn.Module, data: Any, eps: Sequence[float], **kwargs: Any) -> dict[str, Any]:
    """:func:`evaluate_robust` at each budget of ``eps`` (sorted), with the sweep's sanity checks.

    Carlini et al. 2019 ("On evaluating adversarial robustness", section 5): robust accuracy must
    not rise as the budget grows, and an unbounded attack must reach 0. Include a large budget
    (0.5 and above lets an attack turn any image into a grey one) for the second check.

    Returns:
        ``{"eps": [...], "clean_accuracy", "robust_accuracy": [...], "robust_accuracy_with_rejection": [...],
        "checks": {"monotone", "zero_at_largest", "largest_eps"}, "warnings": [...], "results": [...]}``.
    """
    if isinstance(eps, (str, bytes)) or not isinstance(eps, Sequence) or not eps:
        raise ValueError(f"eps must be a non-empty list of budgets in [0, 1]; got {eps!r}.")
    budgets = sorted(check_float(e, "eps", "robust_sweep", low=0.0, high=1.0) for e in eps)
    results = [evaluate_robust(model, data, eps=e, **kwargs) for e in budgets]
    rob = [r["robust_accuracy"] for r in results]
    robr = [r["robust_accuracy_with_rejection"] for r in results]
    monotone = all(a >= b for a, b in zip(robr, robr[1:])) and all(a >= b for a, b in zip(rob, rob[1:]))
    checks = {"monotone": monotone, "zero_at_largest": robr[-1] == 0.0, "largest_eps": budgets[-1]}
    msgs = []
    if not monotone:
        msgs.append(
            f"robust accuracy rises with eps somewhere in {robr} at eps {budgets}: the attacks are not converging."
        )
    if robr[-1] != 0.0:
        msgs.append(
            f"robust accuracy is {robr[-1]:.1%}, not 0, at the largest eps {budgets[-1]:.4g}: at a large enough eps "
            "every image can be changed, so the attacks are too weak (or the model masks gradients)."
        )
    for msg in msgs:
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return {
        "eps": budgets,
        "clean_accuracy": results[0]["clean_accuracy"],
        "robust_accuracy": rob,
        "robust_accuracy_with_rejection": robr,
        "checks": checks,
        "warnings": msgs,
        "results": results,
    }
