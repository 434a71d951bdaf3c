"""AdaptivePGD: an attacker who differentiates through the guarded model's own detectors."""

from __future__ import annotations

import pytest
import torch
from conftest import ModelSnapshot
from planted_detectors import TotalVariation

import guard
from guard.attacks import AdaptivePGD, LinfPGD
from guard.evaluation import evaluate_adaptive


@pytest.fixture(scope="module")
def guarded_tv(tiny_model, small_split):
    train, test = small_split
    return guard.wrap(tiny_model, {"tv": TotalVariation()}).fit(train).calibrate(test.x[:128], fpr=0.05)


def _evasion(guarded, x_adv, y):
    out = guarded(x_adv)
    return float(((out.logits.argmax(1) != y) & ~out.flagged).float().mean())


def test_adaptive_attack_lowers_the_flag_rate_of_a_differentiable_detector(guarded_tv, tiny_model, small_split):
    _, test = small_split
    x, y = test.x[128:192], test.y[128:192]
    snap = ModelSnapshot(tiny_model)
    oblivious = LinfPGD(eps=0.3, steps=30, seed=0)(tiny_model, x, y)
    adaptive = AdaptivePGD(guarded=guarded_tv, eps=0.3, steps=30, seed=0)(tiny_model, x, y)
    snap.assert_unchanged(tiny_model)
    assert float((adaptive.x_adv - x).abs().amax()) <= 0.3 + 1e-6 and float(adaptive.x_adv.min()) >= 0.0
    ev_obl, ev_ad = _evasion(guarded_tv, oblivious.x_adv, y), _evasion(guarded_tv, adaptive.x_adv, y)
    assert ev_ad > ev_obl + 0.2, (ev_obl, ev_ad)  # knowing the detector, the attacker gets through far more often
    # success means exactly "misclassified and not flagged by the real guarded model"
    out = guarded_tv(adaptive.x_adv)
    torch.testing.assert_close(adaptive.success, (out.logits.argmax(1) != y) & ~out.flagged)


def test_adaptive_attack_needs_a_calibrated_guard(tiny_model):
    with pytest.raises(ValueError, match="calibrated GuardedModel"):
        AdaptivePGD(guarded=guard.wrap(tiny_model, ["ppca"]), eps=0.1)
    with pytest.raises(ValueError, match="calibrated GuardedModel"):
        AdaptivePGD(guarded=tiny_model, eps=0.1)


def test_evaluate_adaptive_counts_images_misclassified_clean_apart(guarded_tv, small_split):
    """Every attacked image counts in "evasion"; "evasion_correct" only those classified correctly clean
    (undefined, None, when there are none)."""
    _, test = small_split
    wrong = guard.Split(test.x[:16], (guarded_tv.model(test.x[:16]).argmax(1) + 1) % 10)  # every label is wrong
    res = evaluate_adaptive(guarded_tv, wrong, eps=0.1, steps=2, n=8, weights=[1.0], restarts=1, members=["pgd"])
    e = res["per_eps"][0]
    assert (
        res["n"] == 8 and res["n_correct"] == 0 and e["evasion_correct"] is None and e["evasion_correct_ci95"] is None
    )
    assert e["misclassified"] == 1.0  # wrong from the start, and the attack keeps them wrong
    assert e["evasion"] == 1.0 - e["flagged"]
    some = evaluate_adaptive(guarded_tv, test, eps=0.1, steps=2, n=8, weights=[1.0], restarts=1, members=["pgd"])
    assert some["n"] == 8 and 0.0 <= some["evasion"] <= 1.0
