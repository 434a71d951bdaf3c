"""The audit's held-out split: the images that calibrate the thresholds never count as evaluation negatives.

A threshold set on the same clean images it is then evaluated on reports an FPR no worse than
its target by construction, and every ROC figure's negatives would be the calibration set
(issue 34, item 5: with the evaluation half set equal to the calibration half, no test failed).
These tests watch what the audit's detector step really passes on: the scores the thresholds
are calibrated on, and the clean images and scores it gives ``guard.evaluate``.
"""

from __future__ import annotations

import pytest
import torch

import guard
import guard.audit.detectors as audit_detectors
from guard.attacks.gradient import FGSM
from guard.audit import AttackSet, AuditContext, AuditOptions, step
from guard.audit.detectors import split_heldout


@pytest.mark.parametrize("n, seed", [(2, 0), (11, 3), (256, 0), (2000, 7)])
def test_split_heldout_halves_are_disjoint_and_cover_the_set(n, seed) -> None:
    cal, ev = split_heldout(n, seed)
    assert cal.numel() == n // 2 and ev.numel() == n - n // 2
    assert set(cal.tolist()).isdisjoint(ev.tolist())
    assert sorted(cal.tolist() + ev.tolist()) == list(range(n))
    again = split_heldout(n, seed)
    assert torch.equal(again[0], cal) and torch.equal(again[1], ev)  # the split is a function of the seed


@pytest.fixture(scope="module")
def detector_step(tiny_model, small_split, tmp_path_factory):
    """The audit's detector step (kNN and PPCA, quick mode) on 512 / 256 images, with what it
    calibrated on and what it gave ``guard.evaluate`` recorded on the way."""
    train, test = small_split
    seen: dict = {}
    real_calibrate, real_evaluate = guard.GuardedModel.calibrate_scores, audit_detectors.evaluate

    def calibrate_scores(self, scores, *args, **kwargs):
        seen["calibration_scores"] = {k: v.clone() for k, v in scores.items()}
        return real_calibrate(self, scores, *args, **kwargs)

    def evaluate(guarded, clean, attacks, **kwargs):
        seen["clean"] = clean.clone()
        seen["clean_scores"] = {k: v.clone() for k, v in (kwargs.get("clean_scores") or {}).items()}
        return real_evaluate(guarded, clean, attacks, **kwargs)

    attacks = AttackSet({"fgsm": FGSM(eps=0.3)(tiny_model, test.x[:48], test.y[:48])})
    ctx = AuditContext(
        model=tiny_model,
        model_name="tiny",
        train=train,
        test=test,
        data_source="test",
        out=tmp_path_factory.mktemp("audit_split"),
        options=AuditOptions(quick=True, progress=False, export=False),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(guard.GuardedModel, "calibrate_scores", calibrate_scores)
        mp.setattr(audit_detectors, "evaluate", evaluate)
        mp.setattr(audit_detectors, "DEFAULT_DETECTORS", ("knn", "ppca"))
        mp.setattr(audit_detectors, "ANCHORS", ())
        guarded = step("detectors").run(ctx, attacks=attacks)
    return guarded, seen, ctx.report, test


def test_audit_evaluates_on_images_it_did_not_calibrate_on(detector_step) -> None:
    guarded, seen, report, test = detector_step
    cal, clean, clean_scores = seen["calibration_scores"], seen["clean"], seen["clean_scores"]
    info = report["detectors_info"]["calibration"]
    n_cal, n_ev = cal["ppca"].numel(), clean.shape[0]
    assert n_cal == info["n_calibration"] and n_ev == info["n_evaluation"] and n_cal + n_ev == test.x.shape[0]
    # the clean negatives are held-out images, and the scores evaluate was given are theirs
    rows = {tuple(r.tolist()) for r in test.x.flatten(1)}
    assert all(tuple(r.tolist()) in rows for r in clean.flatten(1))
    _, rescored, _ = guarded.score(clean)
    for name in ("knn", "ppca"):
        torch.testing.assert_close(clean_scores[name], rescored[name], rtol=1e-4, atol=1e-4)
    # a continuous score is equal for two images only when they are the same image: no calibration
    # image is among the evaluation negatives
    common = set(cal["ppca"].tolist()) & set(clean_scores["ppca"].tolist())
    assert not common, f"{len(common)} of {n_ev} evaluation images were also calibration images"
    # and together they are every held-out image, each once
    every = guarded.score(test.x)[1]["ppca"].sort().values
    torch.testing.assert_close(
        torch.cat([cal["ppca"], clean_scores["ppca"]]).sort().values, every, rtol=1e-4, atol=1e-4
    )


def test_audit_reports_its_negatives_as_the_evaluation_half(detector_step) -> None:
    _, seen, report, _ = detector_step
    n_ev = seen["clean"].shape[0]
    for det in ("knn", "ppca", "combined"):
        assert report["detectors"][det]["fgsm"]["n_neg"] == n_ev
