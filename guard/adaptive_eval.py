"""``guard.evaluate(..., adaptive=True)``: misclassification and evasion under an attacker who knows the detectors.

Tramer et al. 2020 ("On adaptive attacks to adversarial example defenses") and Carlini et al.
2019 ("On evaluating adversarial robustness"): a detection defence is measured by the share of
attacked images that end misclassified *and* not flagged, under the strongest attack that knows
it, with the misclassification it reached beside it (an attack that stops misclassifying
"evades" nothing) and the oblivious attack on the same images. :func:`evaluate_adaptive` runs
:class:`guard.attacks.AdaptiveEnsemble` (plain PGD, weight-swept AdaptivePGD, orthogonal and
selective PGD, logit matching; restarts; EOT where the defence is random) on the first ``n``
images at each budget and reports, per budget, each rate with its 95% Clopper-Pearson interval
(:func:`clopper_pearson`, SciPy's beta quantiles) and its n.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from guard.core.cache import atomic_write_text
from guard.core.data import Split
from guard.core.integrity import tensors_digest
from guard.core.intervals import rate_interval as clopper_pearson  # the name this module has always exported
from guard.core.validation import check_images, check_int

__all__ = ["evaluate_adaptive", "clopper_pearson", "default_budgets"]

_RULE = (
    "attacked: the first n held-out images; evasion: misclassified and not flagged by the calibrated combined flag; "
    "adaptive: per image the best of plain PGD, margin + weight * detector surrogates (weights swept, restarts), orthogonal "
    "and selective PGD (Bryniarski et al. 2022) and logit matching (Sabour et al. 2016), judged by the real guarded model"
)


def _rate(mask: torch.Tensor) -> dict[str, Any]:
    k, n = int(mask.sum()), int(mask.numel())
    return {"rate": (k / n) if n else None, "k": k, "n": n, "ci95": clopper_pearson(k, n)}


def default_budgets(x: torch.Tensor) -> tuple[list[float], float]:
    """(budgets, headline) from the data (:func:`guard.core.budget.data_defaults`): 0.1, 0.2, 0.3
    for near-binary digits, 2/255, 4/255, 8/255 for natural images; the customary budget heads."""
    from guard.core.budget import data_defaults

    d = data_defaults(x)
    base = float(d["eps"])
    return ([base / 3, 2 * base / 3, base] if d["kind"] == "near-binary" else [base / 4, base / 2, base]), base


def _budgets(eps: Sequence[float] | float | None, x: torch.Tensor) -> tuple[list[float], float]:
    if eps is None:
        return default_budgets(x)
    if isinstance(eps, bool) or not (
        isinstance(eps, (int, float)) or (isinstance(eps, Sequence) and not isinstance(eps, str))
    ):
        raise TypeError(f"eps must be a float or a list of floats; got {type(eps).__name__}.")
    values = [float(eps)] if isinstance(eps, (int, float)) else [float(e) for e in eps]
    if not values or any(not (e >= 0.0) for e in values):
        raise ValueError(f"eps must hold budgets >= 0; got {list(values)}.")
    return values, values[-1]


def _judged(guarded: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = guarded(x)
    mis = out.logits.argmax(1).cpu() != y.cpu()
    return mis, out.flagged.cpu().bool()


def evaluate_adaptive(
    guarded: Any,
    data: Any,
    *,
    eps: Sequence[float] | float | None = None,
    steps: int = 50,
    n: int = 200,
    seed: int = 0,
    weights: Sequence[float] = (0.1, 1.0, 10.0),
    restarts: int = 2,
    members: Sequence[str] | None = None,
    eot: int | str = "auto",
    guides: Any = None,
    progress: bool = False,
    checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """Misclassification and evasion of the adaptive attacker (:class:`guard.attacks.AdaptiveEnsemble`), per budget.

    Args:
        guarded: a calibrated GuardedModel.
        data: clean held-out images (a Split with labels, or a Tensor: the model's labels are
            used), not the images the detectors were calibrated on. The first ``n`` are attacked.
        eps: L-inf budgets; default from the data: 0.1, 0.2, 0.3 on near-binary digits and
            2/255, 4/255, 8/255 on natural images (:func:`default_budgets`). The last is the headline.
        steps: steps of every attack run.
        n: images attacked.
        seed: base seed of the random starts.
        weights: the detector weights the weighted attack sweeps.
        restarts: random starts per attack (guides per image for logit matching).
        members: the attack families (default all, :data:`guard.attacks.adaptive_ensemble.MEMBERS`).
        eot: gradient samples per step, or "auto" (8 where a guarded pass is random, else 1).
        guides: clean images (a Split or Tensor) logit matching takes accepted guides from;
            default the images of ``data`` after the first ``n`` (at most 1,000), else ``data``.
        progress: print nothing; kept for the common signature.
        checkpoint: a JSON file each finished budget's entry is written to (atomically). A later
            call with the same settings, images and guarded model reads it back and attacks only
            the budgets not in it; a budget is the unit, so an interrupted run loses at most the
            budget it was in, and its figures equal an uninterrupted run's (every budget's attacks
            are seeded alone). A file written with other settings raises ``ValueError``.

    Returns:
        ``{"eps", "evasion", "misclassified", "n", "n_correct", "steps", "restarts", "weights",
        "members", "eot", "random_parts", "fpr", "rule", "per_eps": [...]}``; each ``per_eps``
        entry holds ``evasion`` (misclassified and not flagged, over the images attacked),
        ``evasion_correct`` (the same over the images the model classified correctly clean),
        ``misclassified``, ``flagged``, ``oblivious_evasion`` / ``oblivious_misclassified``
        (plain early-stopped PGD on the same images) and ``oblivious_full_evasion`` (PGD
        without early stop), each beside its ``*_ci95`` Clopper-Pearson interval, the counts,
        ``per_member`` (each attack alone) and ``seconds``.
    """
    x = _check_inputs(guarded, data)
    n = check_int(n, "n", "evaluate_adaptive", low=1)
    steps = check_int(steps, "steps", "evaluate_adaptive", low=1)
    budgets, headline = _budgets(eps, x)
    xs, ys, correct, device = _attacked_images(guarded.model, data, x, n)
    attack_kw = _ensemble_settings(
        guarded,
        data,
        x,
        n,
        steps=steps,
        weights=weights,
        restarts=restarts,
        members=members,
        guides=guides,
        eot=eot,
        seed=seed,
    )
    store = _BudgetStore(checkpoint, guarded, xs, ys, attack_kw, eps=budgets)
    per_eps, eot_used, random_parts = _per_budget(guarded, budgets, xs.to(device), ys, correct, attack_kw, store)
    head = next(p for p in per_eps if p["eps"] == headline)
    return {
        "eps": headline,
        "evasion": head["evasion"],
        "misclassified": head["misclassified"],
        "n": int(xs.shape[0]),
        "n_correct": int(correct.sum()),
        "steps": steps,
        "restarts": restarts,
        "weights": [float(w) for w in weights],
        "members": attack_kw["members"],
        "eot": eot_used,
        "random_parts": random_parts,
        "fpr": float(getattr(guarded.combined, "calibration_fpr_", float("nan"))),
        "per_eps": per_eps,
        "rule": _RULE,
    }


def _attacked_images(
    model: Any, data: Any, x: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.device]:
    """The first ``n`` images, their labels (the data's, else the model's), which of them the model
    classifies correctly clean, and the model's device."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    xs = x[:n]
    with torch.no_grad():
        pred = torch.cat([model(xs[i : i + 500].to(device)).argmax(1).cpu() for i in range(0, xs.shape[0], 500)])
    ys = data.y[:n].cpu().long() if isinstance(data, Split) else pred
    return xs, ys, pred == ys, device


def _check_inputs(guarded: Any, data: Any) -> torch.Tensor:
    """The images of ``data``, after checking that ``guarded`` is a calibrated GuardedModel."""
    if not (hasattr(guarded, "detectors") and hasattr(guarded, "combined")):
        raise TypeError(
            f"guarded must be a GuardedModel (guard.wrap(model).fit(...).calibrate(...)); got {type(guarded).__name__}."
        )
    if guarded.combined is None:
        raise ValueError("evaluate_adaptive needs a calibrated GuardedModel (call calibrate first).")
    if not isinstance(data, (Split, torch.Tensor)):
        raise TypeError(f"data must be a Split or a Tensor of images (N, C, H, W); got {type(data).__name__}.")
    return check_images(data.x if isinstance(data, Split) else data, "data")


def _per_budget(
    guarded: Any,
    budgets: list[float],
    xs: torch.Tensor,
    ys: torch.Tensor,
    correct: torch.Tensor,
    attack_kw: dict[str, Any],
    store: _BudgetStore,
) -> tuple[list[dict[str, Any]], Any, Any]:
    """Attack ``xs`` at every budget not in ``store``: (per-budget entries, the EOT samples used, the random parts found)."""
    from guard.attacks import AdaptiveEnsemble

    model, steps, seed = guarded.model, attack_kw["steps"], attack_kw["seed"]
    per_eps, eot_used, random_parts = [], None, []
    for e in budgets:
        done = store.get(e)
        if done is not None:
            per_eps.append(done["entry"])
            eot_used, random_parts = done["eot"], done["random_parts"]
            continue
        t0 = time.perf_counter()
        res = AdaptiveEnsemble(eps=e, **attack_kw)(model, xs, ys.to(xs.device))
        eot_used, random_parts = res.extras["eot"], res.extras["random_parts"]
        mis, flagged = _judged(guarded, res.x_adv, ys)
        obl = _oblivious(guarded, model, xs, ys, e, steps, seed)
        entry = _budget_entry(e, correct, mis, flagged, obl)
        entry["per_member"] = res.extras["per_member"]
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        per_eps.append(entry)
        store.put(e, {"entry": entry, "eot": eot_used, "random_parts": random_parts})
    return per_eps, eot_used, random_parts


class _BudgetStore:
    """The finished budgets of one evaluation, in a JSON file keyed by what the figures depend on (or nowhere)."""

    def __init__(
        self,
        path: str | Path | None,
        guarded: Any,
        xs: torch.Tensor,
        ys: torch.Tensor,
        attack_kw: dict[str, Any],
        eps: list[float],
    ) -> None:
        self.path = None if path is None else Path(path)
        self.done: dict[str, Any] = {}
        if self.path is None:
            return
        state = {f"model.{k}": v for k, v in guarded.model.state_dict().items()}
        self.key = {
            "images": tensors_digest({"x": xs.cpu(), "y": ys.cpu()}),
            "model": tensors_digest(state),
            "threshold": float(getattr(guarded.combined, "threshold_", float("nan"))),
            "detectors": sorted(guarded.detectors),
            **{k: attack_kw[k] for k in ("steps", "restarts", "members", "eot", "seed")},
            "weights": [float(w) for w in attack_kw["weights"]],
            "guides": tensors_digest({"x": attack_kw["guides"].cpu()}),
        }
        if self.path.is_file():
            try:
                old = json.loads(self.path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"checkpoint {str(self.path)!r} is not valid JSON: {err}") from err
            if old.get("key") != json.loads(json.dumps(self.key)):
                raise ValueError(
                    f"checkpoint {str(self.path)!r} was written for other settings, images or model; "
                    "remove it or pass another path."
                )
            self.done = old.get("budgets", {})

    def get(self, e: float) -> dict[str, Any] | None:
        return self.done.get(repr(float(e)))

    def put(self, e: float, value: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.done[repr(float(e))] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({"key": self.key, "budgets": self.done}, indent=1))


def _ensemble_settings(
    guarded: Any,
    data: Any,
    x: torch.Tensor,
    n: int,
    *,
    steps: int,
    weights: Sequence[float],
    restarts: int,
    members: Sequence[str] | None,
    guides: Any,
    eot: int | str,
    seed: int,
) -> dict[str, Any]:
    """The AdaptiveEnsemble keyword arguments every budget shares (all but ``eps``)."""
    from guard.attacks.adaptive_ensemble import MEMBERS

    gx, gy = _guide_images(data, x, n, guides)
    return {
        "guarded": guarded,
        "steps": steps,
        "weights": weights,
        "restarts": restarts,
        "members": list(MEMBERS if members is None else members),
        "guides": gx,
        "guide_labels": gy,
        "eot": eot,
        "seed": seed,
    }


def _guide_images(data: Any, x: torch.Tensor, n: int, guides: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The images (and labels, where known) logit matching takes its guides from."""
    if guides is None:
        return (
            (x[n : n + 1000], data.y[n : n + 1000] if isinstance(data, Split) else None)
            if x.shape[0] > n
            else (x, data.y if isinstance(data, Split) else None)
        )
    return (guides.x, guides.y) if isinstance(guides, Split) else (check_images(guides, "guides"), None)


def _oblivious(
    guarded: Any, model: Any, xs: torch.Tensor, ys: torch.Tensor, e: float, steps: int, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"oblivious": early-stopped PGD, "oblivious_full": PGD without early stop}: (misclassified, evaded)."""
    from guard.attacks import LinfPGD

    obl = {}
    for key, early in (("oblivious", True), ("oblivious_full", False)):
        o_mis, o_flag = _judged(
            guarded,
            LinfPGD(eps=e, steps=steps, early_stop=early, seed=seed)(model, xs, ys.to(xs.device)).x_adv,
            ys,
        )
        obl[key] = (o_mis, o_mis & ~o_flag)
    return obl


def _budget_entry(
    e: float,
    correct: torch.Tensor,
    mis: torch.Tensor,
    flagged: torch.Tensor,
    obl: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, Any]:
    """One budget's rates, each with its 95% interval and count."""
    evaded = mis & ~flagged
    entry: dict[str, Any] = {"eps": e, "n": int(mis.shape[0]), "n_correct": int(correct.sum())}
    for key, mask in (
        ("evasion", evaded),
        ("evasion_correct", evaded[correct]),
        ("misclassified", mis),
        ("flagged", flagged),
        ("oblivious_evasion", obl["oblivious"][1]),
        ("oblivious_evasion_correct", obl["oblivious"][1][correct]),
        ("oblivious_misclassified", obl["oblivious"][0]),
        ("oblivious_full_evasion", obl["oblivious_full"][1]),
        ("oblivious_full_misclassified", obl["oblivious_full"][0]),
    ):
        r = _rate(mask)
        entry[key], entry[f"{key}_ci95"], entry[f"{key}_k"] = r["rate"], r["ci95"], r["k"]
    return entry
