"""Audit step ``detectors``: fit, calibrate and evaluate every detector against every attack.

* Fit on ``ctx.train`` (clean only; the demo's 8,000 training images, true labels).
* Calibrate on a clean held-out part that is not the evaluation negatives: ``ctx.test`` is
  split with ``options.seed`` into a calibration half and an evaluation half (1,000 / 1,000 on
  the demo). Thresholds (per detector and combined) are set for ``FPR = 0.05`` on the
  calibration half.
* Evaluate on the evaluation half (negatives) against every attack of the :class:`AttackSet`
  the attack steps gave; positives are the successful adversarial examples (and, under
  "all", every one). The halves are checked disjoint by index here and by image content in
  :func:`guard.evaluate` (ValueError otherwise).
* Each entry leads with the operating point (:func:`guard.evaluation.operating_point`): the
  realised TPR on the attack and FPR on the evaluation half at the calibrated threshold, each
  k / n with its exact 95% Clopper-Pearson interval; then the ROC figures. Every attack row of
  every strength (``report["attacks"][NAME]["strength"]``) and the held-out peer attacks get
  their row in every detector's table.

Writes ``report["detectors"][DETECTOR][ATTACK]`` (the report.json keys of the README) for saliency, knn, ppca,
knn_consistency, squeeze, the anchors mahalanobis and lid, and combined (rule :data:`COMBINE` over all of them), and ``report["detectors_info"]``: the split, the clean flag rate
on the evaluation half, the wrapped model's clean accuracy, per-layer kNN AUROCs (the
multi-layer view) and timings. Gives the fitted GuardedModel (saved under ``OUT/guarded``) to
the export step.

Saves the artifact ``detector_scores`` (float32; what report.html draws its ROC curves and
histograms from): ``clean/DETECTOR`` the evaluation half's scores and ``ATTACK/DETECTOR`` the
scores of the attack's successful adversarial images (the positives of the table), for every
detector and "combined"; at most :data:`MAX_SAVED_SCORES` values each (evenly spaced when
there are more).

Settings: :class:`guard.audit.settings.DetectorSettings` (``combine``, ``flag_with``; quick mode:
1,000 training images, 256 calibration and 256 evaluation images, no per-layer kNN view).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from guard.audit.settings import DetectorSettings
from guard.audit.step import AttackSet, AuditContext, Step
from guard.core.data import Split
from guard.core.features import extract_features
from guard.core.registry import COMBINED, detector_names
from guard.evaluation import all_scores, clopper_pearson, detection_metrics, evaluate
from guard.guarded import DEFAULT_DETECTORS, GuardedModel, proxy_inputs, wrap

__all__ = ["DetectorStep", "ANCHORS", "COMBINE", "FPR", "MAX_SAVED_SCORES", "split_heldout", "score_tensors"]

log = logging.getLogger(__name__)

#: the published detectors guard is measured against (:mod:`guard.core.registry`, role "anchor")
ANCHORS = detector_names(role="anchor", in_audit=True)
#: The combined flag's rule (:class:`guard.audit.settings.DetectorSettings` says why).
COMBINE = DetectorSettings.__dataclass_fields__["combine"].default
FPR = 0.05
MAX_SAVED_SCORES = 4096


def split_heldout(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the calibration and evaluation halves of a held-out set of size ``n``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 5))
    half = n // 2
    return perm[:half], perm[half:]


def _per_layer_knn(guarded: GuardedModel, clean: torch.Tensor, attacks: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """AUROC (successful adversarials) of each layer's kNN rank alone: the multi-layer view."""
    knn = guarded.detectors.get("knn")
    if knn is None or not hasattr(knn, "layer_scores"):
        return {}
    layers = knn.feature_layers
    lo, fe = extract_features(guarded.model, clean, layers, pool=guarded.pool)
    neg = knn.layer_scores(fe, lo)
    out: dict[str, dict[str, Any]] = {layer: {} for layer in layers}
    for name, res in attacks.items():
        if res.x_adv.shape[0] == 0:
            continue
        la, fa = extract_features(guarded.model, res.x_adv, layers, pool=guarded.pool)
        pos = knn.layer_scores(fa, la)
        ok = res.success.bool().cpu()
        for layer in layers:
            m = detection_metrics(pos[layer][ok], neg[layer])
            out[layer][name] = {"auroc": m["auroc"], "tpr_at_1fpr": m["tpr_at_1fpr"], "n_pos": m["n_pos"]}
    return out


def _capped(v: torch.Tensor) -> torch.Tensor:
    v = v.detach().float().cpu().reshape(-1)
    if v.numel() <= MAX_SAVED_SCORES:
        return v
    return v[torch.linspace(0, v.numel() - 1, MAX_SAVED_SCORES).round().long()]


def score_tensors(
    clean: dict[str, torch.Tensor], attacks: dict[str, Any], scores: dict[str, dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The ``detector_scores`` artifact: ``clean/DET`` and ``ATTACK/DET`` (successful adversarials only), capped."""
    out = {f"clean/{det}": _capped(v) for det, v in clean.items()}
    for name, per_det in scores.items():
        ok = attacks[name].success.detach().bool().cpu().reshape(-1)
        for det, v in per_det.items():
            out[f"{name}/{det}"] = _capped(v.detach().cpu().reshape(-1)[ok])
    return out


def _swapped_flag_rate(
    guarded: GuardedModel, cal: dict[str, torch.Tensor], ev: dict[str, torch.Tensor]
) -> dict[str, float]:
    import copy

    from guard.detectors import Combined

    out = {}
    for n, det in guarded.detectors.items():
        d2 = copy.copy(det)
        d2.calibrate(ev[n], FPR)
        out[n] = float(d2.predict_scores(cal[n]).float().mean())
    if guarded.combined is not None:
        # references and threshold from the other half; the learned weights (fitted on proxies) are kept
        comb = Combined(guarded.combined.names_, rule=guarded.combined.rule)
        comb.calibrate_scores(ev, FPR, weights=guarded.combined.weights_)
        out[COMBINED] = float(comb.predict_scores(comb.combine(cal)).float().mean())
    return out


class DetectorStep(Step):
    """Fit, calibrate and evaluate every detector against every attack result."""

    name = "detectors"
    needs = {"attacks": AttackSet}
    gives = GuardedModel

    def restore(self, ctx: AuditContext) -> GuardedModel | None:
        folder = ctx.out / "guarded"
        pinned = ctx.report.get("detectors_info", {}).get(
            "sha256"
        )  # what this audit wrote: a swapped folder is refused
        return (
            GuardedModel.load(folder, ctx.model, key_env=ctx.options.key_env, expected_sha256=pinned)
            if (folder / "guarded.json").is_file()
            else None
        )

    def run(self, ctx: AuditContext, attacks: AttackSet | None = None) -> GuardedModel:
        return _run(ctx, dict(attacks.results) if attacks is not None else {})


def _run(ctx: AuditContext, attacks: dict[str, Any]) -> GuardedModel:
    t0 = time.perf_counter()
    opts, s = ctx.options, ctx.settings.detectors
    guarded, train = _fit(ctx, s)
    t_fit = time.perf_counter() - t0

    cal_idx, ev_idx = _heldout_halves(len(ctx.test), opts.seed, s.calibration_images)
    x_all = ctx.test.x
    logits, scores = _calibrate(guarded, x_all, cal_idx, ev_idx, opts)
    ncal = cal_idx.numel()
    ev_scores = {k: v[ncal:] for k, v in scores.items()}
    ev_scores[COMBINED] = guarded.combined.combine(ev_scores)
    t_cal = time.perf_counter() - t0 - t_fit

    if not attacks:
        log.warning("detectors: no attack results found (run the attack steps first); only clean figures are reported")
    x_ev = x_all[ev_idx]
    adv_scores = {name: all_scores(guarded, res.x_adv, opts.progress) for name, res in attacks.items()}
    report = evaluate(guarded, x_ev, attacks, progress=opts.progress, clean_scores=ev_scores, attack_scores=adv_scores)
    t_eval = time.perf_counter() - t0 - t_fit - t_cal

    accuracy = _clean_accuracy(ctx, x_ev, ctx.test.y[ev_idx], logits[ncal:].argmax(1).cpu())
    flag_rate, clean_fpr = _clean_flags(guarded, ev_scores)
    per_layer = _per_layer_knn(guarded, x_ev, attacks) if attacks and s.per_layer_knn else {}
    # the same with the halves swapped (calibrate on the evaluation half, flag the calibration
    # half): one split's flag rate moves by about +-1.5 points on 1,000 images by chance alone
    swapped = _swapped_flag_rate(
        guarded, {k: v[:ncal] for k, v in scores.items()}, {k: v[ncal:] for k, v in scores.items()}
    )

    ctx.report["detectors"] = report
    ctx.report["detectors_info"] = {
        **_describe(guarded),
        "fit": {"n_train": len(train), "labels": "true labels of the clean training split"},
        "calibration": {
            "target_fpr": FPR,
            "n_calibration": int(ncal),
            "n_evaluation": int(ev_idx.numel()),
            "split": f"ctx.test permuted with seed {opts.seed} + 5: first half calibrates, second half evaluates",
        },
        "clean_flag_rate": flag_rate,
        "operating_point": {
            "target_fpr": FPR,
            "clean_fpr": clean_fpr,
            "rule": "flagged = score > the threshold set on the calibration half; realised on the evaluation half "
            "(disjoint, checked by index and by image content); 95% Clopper-Pearson intervals",
        },
        "clean_flag_rate_swapped_halves": swapped,
        "clean_flag_rate_mean_of_both": {n: (flag_rate[n] + swapped[n]) / 2 for n in swapped},
        **accuracy,
        "knn_per_layer": per_layer,
        "attacks_evaluated": sorted(attacks),
        "seconds": {
            "fit": round(t_fit, 3),
            "calibrate": round(t_cal, 3),
            "evaluate": round(t_eval, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
    }
    _save(ctx, guarded, ev_scores, attacks, adv_scores)
    return guarded


def _fit(ctx: AuditContext, s: DetectorSettings) -> tuple[GuardedModel, Split]:
    """Every detector fitted on the clean training images (a seeded subset when ``s.train_images`` caps them)."""
    train = ctx.train
    if s.train_images is not None and len(train) > s.train_images:
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(ctx.options.seed))[: s.train_images]
        train = Split(train.x[idx], train.y[idx])
    # Every detector, the published anchors included, feeds the combined flag; each is also
    # reported alone. The setting flag_with="own" keeps the anchors out of the flag.
    flag_with = DEFAULT_DETECTORS if s.flag_with == "own" else None
    guarded = wrap(ctx.model, [*DEFAULT_DETECTORS, *ANCHORS], combine=s.combine, flag_with=flag_with)
    guarded.fit(train)
    return guarded, train


def _heldout_halves(n: int, seed: int, calibration_images: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`split_heldout`'s halves, each cut to ``calibration_images``; checked disjoint."""
    cal_idx, ev_idx = split_heldout(n, seed)
    if calibration_images is not None:
        cal_idx, ev_idx = cal_idx[:calibration_images], ev_idx[:calibration_images]
    shared = set(cal_idx.tolist()) & set(ev_idx.tolist())
    if shared:
        raise ValueError(
            f"the calibration and evaluation halves of the held-out images must be disjoint; got {len(shared)} shared indices."
        )
    return cal_idx, ev_idx


def _calibrate(
    guarded: GuardedModel, x_all: torch.Tensor, cal_idx: torch.Tensor, ev_idx: torch.Tensor, opts: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Score both halves and calibrate the thresholds on the first: (logits, scores) of both halves, calibration first."""
    logits, scores, errors = guarded.score(x_all[torch.cat([cal_idx, ev_idx])], progress=opts.progress)
    ncal = cal_idx.numel()
    proxy = None
    if guarded.combine == "weighted":  # the weights are learned on proxies of the calibration half, never on attacks
        _, proxy, perr = guarded.score(proxy_inputs(x_all[cal_idx], seed=opts.seed), progress=opts.progress)
        errors = {**errors, **perr}
    guarded.calibrate_scores(
        {k: v[:ncal] for k, v in scores.items()}, FPR, errors=errors, proxy_scores=proxy, images=x_all[cal_idx]
    )
    return logits, scores


def _clean_accuracy(
    ctx: AuditContext, x_ev: torch.Tensor, y_ev: torch.Tensor, pred_wrapped: torch.Tensor
) -> dict[str, Any]:
    """Clean accuracy of the bare and the wrapped model on the evaluation half, and whether they predict alike."""
    with torch.no_grad():
        from guard.core.models import eval_mode

        with eval_mode(ctx.model):
            pred_bare = torch.cat(
                [ctx.model(x_ev[i : i + 512].to(ctx.options.device)).argmax(1).cpu() for i in range(0, len(x_ev), 512)]
            )
    return {
        "clean_accuracy_bare": float((pred_bare == y_ev).float().mean()),
        "clean_accuracy_wrapped": float((pred_wrapped == y_ev).float().mean()),
        "predictions_identical": bool((pred_bare == pred_wrapped).all()),
    }


def _clean_flags(
    guarded: GuardedModel, ev_scores: dict[str, torch.Tensor]
) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Per detector (and combined): the flag rate on the evaluation half, and the same as k / n with its 95% interval."""
    flags = {
        n: guarded.combined.predict_scores(v) if n == COMBINED else guarded.detectors[n].predict_scores(v)
        for n, v in ev_scores.items()
    }
    flag_rate = {n: float(f.float().mean()) for n, f in flags.items()}
    clean_fpr = {
        n: {
            "rate": flag_rate[n],
            "k": int(f.sum()),
            "n": int(f.numel()),
            "ci95": list(clopper_pearson(int(f.sum()), int(f.numel()))),
        }
        for n, f in flags.items()
        if f.numel()
    }
    return flag_rate, clean_fpr


def _describe(guarded: GuardedModel) -> dict[str, Any]:
    """The detectors, their features and the combined flag's rule, weights and threshold."""
    return {
        "detectors": guarded.describe(),
        "feature_layers": guarded.layers,
        "pool": guarded.pool,
        "left_out": guarded.left_out_,
        "combined": {
            "rule": guarded.combined.rule,
            "detectors": guarded.combined.names_,
            "weights": guarded.combined.weights_.tolist(),
            "threshold": guarded.combined.threshold_,
            "anchors_not_in_the_flag": [
                n for n in ANCHORS if n in guarded.detectors and n not in guarded.combined.names_
            ],
        },
    }


def _save(
    ctx: AuditContext,
    guarded: GuardedModel,
    ev_scores: dict[str, torch.Tensor],
    attacks: dict[str, Any],
    adv_scores: dict[str, dict[str, torch.Tensor]],
) -> None:
    """The ``detector_scores`` artifact and the fitted GuardedModel (OUT/guarded, its digest in the report)."""
    ctx.save_artifact(
        "detector_scores",
        score_tensors(ev_scores, attacks, adv_scores),
        {
            "clean": "the evaluation half of the held-out images",
            "attacks": "successful adversarial images only",
            "max_values": MAX_SAVED_SCORES,
        },
    )
    ctx.report["detectors_info"]["sha256"] = guarded.save(ctx.out / "guarded", key_env=ctx.options.key_env)
    ctx.report["detectors_info"]["signed"] = ctx.options.key_env is not None
