"""``guard.evaluate``: how well each detector separates adversarial from clean inputs.

Per detector (and "combined") and per attack, first the **operating point** the product runs at:
the calibrated threshold applied to clean held-out images that did not set it (the realised
false-positive rate) and to the adversarial images (the realised true-positive rate), each as
k of n with its exact 95% Clopper–Pearson interval (Clopper & Pearson 1934, from
``scipy.stats.beta``). Beside it the ROC figures, read off the evaluation negatives themselves:
AUROC and TPR at 1% and 5% FPR from scikit-learn's ``roc_auc_score`` / ``roc_curve`` (a
threshold chosen on the evaluation negatives, which no deployed flag has). Positives are the
*successful* adversarial examples (the keys of report.json, see docs/reference/report-json.md) and, under
``"all"``, every adversarial example the attack produced.

Clean evaluation images that are also calibration images are refused (ValueError): the
threshold is their own quantile, so their flag rate would be the target FPR by construction.
Images are recognised by content (:mod:`guard.core.digests`), against the digests
``GuardedModel.calibrate`` keeps and against ``calibration=`` when given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from guard.adaptive_eval import evaluate_adaptive
from guard.core.data import Split
from guard.core.intervals import clopper_pearson
from guard.core.validation import check_images

__all__ = [
    "evaluate",
    "evaluate_adaptive",
    "detection_metrics",
    "tpr_at_fpr",
    "all_scores",
    "clopper_pearson",
    "operating_point",
    "check_disjoint",
]


def _finite(a: np.ndarray, fill_hi: float) -> np.ndarray:
    a = np.where(np.isnan(a), np.inf, a)
    return np.where(np.isposinf(a), fill_hi, np.where(np.isneginf(a), -fill_hi, a))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The largest TPR on the ROC curve whose FPR does not exceed ``target``."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def _rate(flags: np.ndarray) -> dict[str, Any] | None:
    """{"rate", "k", "n", "ci95"} of a bool array (None when empty)."""
    n = int(flags.size)
    if n == 0:
        return None
    k = int(flags.sum())
    return {"rate": k / n, "k": k, "n": n, "ci95": list(clopper_pearson(k, n))}


def operating_point(pos: torch.Tensor, neg: torch.Tensor, threshold: float) -> dict[str, Any]:
    """The calibrated flag (``score > threshold``; NaN flags, as the detectors do) on positives and negatives.

    Returns ``{"threshold", "tpr": {"rate", "k", "n", "ci95"}, "fpr": {...}}``; a side with no
    images is None.
    """
    p = pos.detach().double().cpu().numpy().ravel()
    n = neg.detach().double().cpu().numpy().ravel()
    return {"threshold": float(threshold), "tpr": _rate(~(p <= threshold)), "fpr": _rate(~(n <= threshold))}


def detection_metrics(pos: torch.Tensor, neg: torch.Tensor, threshold: float | None = None) -> dict[str, Any]:
    """The operating point at ``threshold`` (when given), AUROC, TPR at 1% / 5% FPR, counts."""
    from sklearn.metrics import roc_auc_score, roc_curve

    p = pos.detach().double().cpu().numpy().ravel()
    n = neg.detach().double().cpu().numpy().ravel()
    out: dict[str, Any] = {}
    if threshold is not None and math.isfinite(threshold):
        out["operating_point"] = operating_point(pos, neg, threshold)
    out.update({"auroc": None, "tpr_at_1fpr": None, "tpr_at_5fpr": None, "n_pos": int(p.size), "n_neg": int(n.size)})
    if threshold is not None and math.isfinite(threshold):
        out["tpr_at_threshold"] = float(np.mean(~(p <= threshold))) if p.size else None
        out["fpr_at_threshold"] = float(np.mean(~(n <= threshold))) if n.size else None
    if p.size == 0 or n.size == 0:
        return out
    both = np.concatenate([p, n])
    fin = both[np.isfinite(both)]
    hi = (float(np.abs(fin).max()) + 1.0) * 2.0 if fin.size else 1.0
    scores = _finite(both, hi)
    labels = np.concatenate([np.ones(p.size), np.zeros(n.size)])
    out["auroc"] = float(roc_auc_score(labels, scores))
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    out["tpr_at_1fpr"] = tpr_at_fpr(fpr, tpr, 0.01)
    out["tpr_at_5fpr"] = tpr_at_fpr(fpr, tpr, 0.05)
    return out


def _adv(item: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_adv, success) from an AttackResult, a (x_adv, success) pair, a dict or bare images."""
    if hasattr(item, "x_adv") and hasattr(item, "success"):
        x, ok = item.x_adv, item.success
    elif isinstance(item, Mapping) and "x_adv" in item:
        x, ok = item["x_adv"], item.get("success")
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        x, ok = item
    elif isinstance(item, torch.Tensor):
        x, ok = item, None
    else:
        raise TypeError(
            f"attacks[{name!r}] must be an AttackResult, (x_adv, success), a dict with 'x_adv', or images; got {type(item).__name__}."
        )
    check_images(x, f"attacks[{name!r}].x_adv", allow_empty=True)
    if ok is not None:
        if not isinstance(ok, torch.Tensor):
            raise TypeError(f"attacks[{name!r}]: success must be a bool Tensor[N]; got {type(ok).__name__}.")
        if (
            ok.is_floating_point()
            or ok.is_complex()
            or ok.is_meta
            or (ok.dtype != torch.bool and ok.numel() and not bool(((ok == 0) | (ok == 1)).all()))
        ):
            raise TypeError(
                f"attacks[{name!r}]: success must be a bool Tensor[N] (or 0/1 integers); got dtype {ok.dtype}"
                f"{' with values other than 0/1' if not ok.is_floating_point() else ''}."
            )
    ok = torch.ones(x.shape[0], dtype=torch.bool) if ok is None else ok.detach().bool().cpu().reshape(-1)
    if ok.shape[0] != x.shape[0]:
        raise ValueError(f"attacks[{name!r}]: success must have one entry per image ({x.shape[0]}); got {ok.shape[0]}.")
    return x, ok


def check_disjoint(
    clean: torch.Tensor, guarded: Any = None, calibration: torch.Tensor | None = None, name: str = "clean"
) -> bool | None:
    """ValueError when an image of ``clean`` is a calibration image (by content digest).

    Checked against ``guarded.calibration_digests_`` (kept by ``GuardedModel.calibrate``) and
    against ``calibration`` images when given. Returns True when checked and disjoint, None when
    there was nothing to check against.
    """
    from guard.core.digests import image_digests, overlap

    sets = []
    known = getattr(guarded, "calibration_digests_", None)
    if known:
        sets.append(("the images the GuardedModel was calibrated on", known))
    if calibration is not None:
        cal = calibration.x if isinstance(calibration, Split) else calibration
        check_images(cal, "calibration")
        sets.append(("calibration", image_digests(cal)))
    for what, digests in sets:
        k = overlap(clean, digests)
        if k:
            raise ValueError(
                f"{name} must be clean images not used for calibration; got {k} of {int(clean.shape[0])} that are also "
                f"{what} (the threshold is their own quantile, so their flag rate says nothing). "
                "Split the held-out images into a calibration part and an evaluation part."
            )
    return True if sets else None


def all_scores(guarded: Any, x: torch.Tensor, progress: bool = False) -> dict[str, torch.Tensor]:
    """Every detector's score of ``x`` and the combined score (empty tensors for an empty batch)."""
    if isinstance(x, torch.Tensor) and x.shape[0] == 0:
        return {n: torch.empty(0) for n in list(guarded.detectors) + ["combined"]}
    _, scores, _ = guarded.score(x, progress=progress)
    if guarded.combined is not None:
        scores["combined"] = guarded.combined.combine(scores)
    return scores


def evaluate(
    guarded: Any,
    clean: Any,
    attacks: Mapping[str, Any],
    *,
    progress: bool = False,
    clean_scores: Mapping[str, torch.Tensor] | None = None,
    attack_scores: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    adaptive: bool = False,
    calibration: Any = None,
    **adaptive_kw: Any,
) -> dict[str, Any]:
    """Detection quality of a calibrated GuardedModel, per detector and attack.

    Args:
        guarded: a fitted (and, for "combined", calibrated) :class:`guard.GuardedModel`.
        clean: clean held-out images (the negatives): a Tensor, a Split, or a Dataset /
            DataLoader / image folder (scored batch by batch). Not the data the detectors were
            fitted or calibrated on: images the GuardedModel was calibrated on (or that are in
            ``calibration``) raise ValueError (checked by content for Tensors and Splits; a
            stream is not checked).
        attacks: name -> AttackResult (or (x_adv, success), or images: all counted successful).
        progress: show a progress bar while scoring.
        clean_scores: precomputed scores of ``clean`` (as ``guarded.score`` gives), to reuse.
        attack_scores: precomputed scores of each attack's images (:func:`all_scores` of every
            ``x_adv``, successful or not), by attack name, to reuse; attacks left out are scored.
        calibration: the calibration images, when the GuardedModel does not know them
            (calibrated from scores, or loaded from an older folder): checked as above.
        adaptive: also attack the guarded model with an attacker who knows it
            (:func:`guard.adaptive_eval.evaluate_adaptive` on ``clean``; ``adaptive_kw`` go there) and add its
            section under the key ``"adaptive"``.

    Returns:
        ``{detector: {attack: {"operating_point": {"threshold", "target_fpr", "n_calibration",
        "clean_disjoint_from_calibration", "tpr": {"rate", "k", "n", "ci95"}, "fpr": {...}},
        "auroc", "tpr_at_1fpr", "tpr_at_5fpr", "n_pos", "n_neg", "tpr_at_threshold",
        "fpr_at_threshold", "all": {same, every adversarial}}}}``; the successful-only
        figures are ``None`` when no adversarial succeeded. With
        ``adaptive=True``, plus ``"adaptive"``: the section :func:`evaluate_adaptive` returns.
    """
    x_clean, disjoint = _checked_clean(guarded, clean, calibration)
    if not isinstance(attacks, Mapping):
        raise TypeError(f"attacks must be a dict name -> AttackResult; got {type(attacks).__name__}.")
    neg = dict(clean_scores) if clean_scores is not None else all_scores(guarded, x_clean, progress)
    if "combined" not in neg and guarded.combined is not None:
        neg["combined"] = guarded.combined.combine(neg)
    names = [n for n in list(guarded.detectors) + ["combined"] if n in neg]
    thresholds, flaggers = _flag_settings(guarded)
    report: dict[str, Any] = {n: {} for n in names}
    for attack, item in attacks.items():
        pos, ok = _attack_scores(guarded, attack, item, names, attack_scores, progress)
        for n in names:
            report[n][attack] = _entry(pos[n], ok, neg[n], thresholds.get(n), flaggers.get(n), disjoint)
    if adaptive:
        report["adaptive"] = evaluate_adaptive(guarded, clean, **adaptive_kw)
    return report


def _checked_clean(guarded: Any, clean: Any, calibration: Any) -> tuple[Any, bool | None]:
    """(the clean images, a Split's ``x``; whether they are checked disjoint from calibration) after
    checking that ``guarded`` is a GuardedModel and that the images are valid and none a calibration
    image (a stream is scored batch by batch and not checked: None)."""
    if not (hasattr(guarded, "detectors") and hasattr(guarded, "score") and hasattr(guarded, "combined")):
        raise TypeError(
            f"guarded must be a GuardedModel (guard.wrap(model).fit(...).calibrate(...)); got {type(guarded).__name__}."
        )
    from guard.core.data import is_stream

    x_clean = clean.x if isinstance(clean, Split) else clean
    disjoint = None
    if not is_stream(x_clean):  # a Dataset / DataLoader / folder is scored batch by batch
        check_images(x_clean, "clean")
        disjoint = check_disjoint(x_clean, guarded, calibration)
    return x_clean, disjoint


def _flag_settings(guarded: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(name -> calibrated threshold, name -> what flags: the detector or the combiner), "combined"
    included when there is one."""
    thresholds = {n: getattr(guarded.detectors[n], "threshold_", None) for n in guarded.detectors}
    flaggers = dict(guarded.detectors)
    if guarded.combined is not None:
        thresholds["combined"] = getattr(guarded.combined, "threshold_", None)
        flaggers["combined"] = guarded.combined
    return thresholds, flaggers


def _attack_scores(
    guarded: Any,
    attack: str,
    item: Any,
    names: list[str],
    attack_scores: Mapping[str, Mapping[str, torch.Tensor]] | None,
    progress: bool,
) -> tuple[Mapping[str, torch.Tensor], torch.Tensor]:
    """(every score of one attack's images: given in ``attack_scores`` or computed; which succeeded),
    checked to hold one score per image for each of ``names``."""
    x_adv, ok = _adv(item, attack)
    pos = (
        attack_scores[attack]
        if attack_scores is not None and attack in attack_scores
        else all_scores(guarded, x_adv, progress)
    )
    if any(n not in pos or pos[n].shape[0] != ok.shape[0] for n in names):
        raise ValueError(
            f"attack_scores[{attack!r}] must hold one score per image ({ok.shape[0]}) for each of {names}; "
            f"got { ({n: int(v.shape[0]) for n, v in pos.items()}) }."
        )
    return pos, ok


def _entry(
    pos: torch.Tensor, ok: torch.Tensor, neg: torch.Tensor, threshold: float | None, flagger: Any, disjoint: bool | None
) -> dict[str, Any]:
    """One detector's figures for one attack: on the successful images, and on every image under "all";
    each operating point says what it was calibrated for and whether the negatives are disjoint from that."""
    entry = detection_metrics(pos[ok], neg, threshold)
    entry["all"] = detection_metrics(pos, neg, threshold)
    for e in (entry, entry["all"]):
        if "operating_point" in e:
            e["operating_point"].update(
                {
                    "target_fpr": getattr(flagger, "calibration_fpr_", None),
                    "n_calibration": getattr(flagger, "calibration_n_", None),
                    "clean_disjoint_from_calibration": disjoint,
                }
            )
    return entry
