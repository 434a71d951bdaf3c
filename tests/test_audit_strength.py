"""The audit's attack-strength rows, held-out peer attacks and operating point (issue 34).

Mutants these catch: PGD rows that are all early-stopped (no strength difference), the
confident row not maximising confidence, the evaluation half equal to (or overlapping) the
calibration half, operating-point figures missing or not matching their counts.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from guard.attacks import AttackResult
from guard.audit import AttackSet, AuditContext, AuditOptions, run_audit, step
from guard.audit.detectors import split_heldout


def _ctx(model, split, tmp_path, **extra) -> AuditContext:
    train, test = split
    ctx = AuditContext(
        model=model,
        model_name="tiny",
        train=train,
        test=test,
        data_source="test",
        out=tmp_path,
        options=AuditOptions(quick=True, progress=False, export=False, extra=extra),
    )
    ctx.defaults = {"eps": 0.3}
    return ctx


@pytest.mark.parametrize("n,seed", [(2000, 0), (257, 3), (10, 1)])
def test_split_heldout_halves_are_disjoint_and_cover(n, seed):
    cal, ev = split_heldout(n, seed)
    assert not set(cal.tolist()) & set(ev.tolist())
    assert sorted(cal.tolist() + ev.tolist()) == list(range(n)) and abs(len(cal) - len(ev)) <= 1


def test_gradient_rows_differ_in_strength(tiny_model, small_split, tmp_path):
    """pgd_minimal stops early and stays near the boundary; pgd runs every step; pgd_confident is the most confident."""
    ctx = _ctx(tiny_model, small_split, tmp_path)
    res = step("attacks_gradient").run(ctx)
    att = ctx.report["attacks"]
    assert set(res.results) == {"fgsm", "pgd_minimal", "pgd", "pgd_confident"}
    assert {n: att[n]["strength"] for n in att} == {
        "fgsm": "full",
        "pgd_minimal": "minimal",
        "pgd": "full",
        "pgd_confident": "confident",
    }
    assert not any(att[n]["held_out"] for n in att)
    assert (
        att["pgd"]["params"]["early_stop"] is False
        and att["pgd"]["params"]["steps"] == 40
        and att["pgd"]["mean_steps_taken"] == 40
    )
    assert att["pgd_minimal"]["params"]["early_stop"] is True and att["pgd_minimal"]["mean_steps_taken"] < 20
    assert att["pgd_confident"]["params"]["loss"] == "confidence"
    assert att["pgd_confident"]["wrong_confidence_median"] > att["pgd_minimal"]["wrong_confidence_median"] + 0.2
    assert att["pgd"]["wrong_confidence_median"] > att["pgd_minimal"]["wrong_confidence_median"]
    for n in att:
        assert att[n]["linf_max"] <= 0.3 + 1e-6
    assert att["pgd"]["success_rate"] >= att["pgd_minimal"]["success_rate"] - 0.02


def _fake_attacks(test) -> AttackSet:
    noise = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    return AttackSet(
        {
            "noise": AttackResult(noise, torch.ones(64, dtype=torch.bool)),
            "pgd_like": AttackResult(test.x[200:232].clamp(0.1, 0.9), torch.ones(32, dtype=torch.bool)),
        }
    )


def test_detector_step_reports_the_operating_point_on_disjoint_halves(tiny_model, small_split, tmp_path):
    train, test = small_split
    ctx = _ctx(tiny_model, small_split, tmp_path)
    g = step("detectors").run(ctx, attacks=_fake_attacks(test))
    cal_idx, ev_idx = split_heldout(len(test), 0)
    # the evaluation negatives are the evaluation half, never a calibration image
    assert g.calibration_digests_ is not None and len(g.calibration_digests_) == len(cal_idx)
    from guard.core.digests import overlap

    assert overlap(test.x[ev_idx], g.calibration_digests_) == 0 and overlap(
        test.x[cal_idx], g.calibration_digests_
    ) == len(cal_idx)
    info = ctx.report["detectors_info"]
    for det, per in ctx.report["detectors"].items():
        op = per["noise"]["operating_point"]
        assert op["fpr"]["n"] == len(ev_idx) and op["tpr"]["n"] == 64 and op["clean_disjoint_from_calibration"] is True
        assert op["fpr"]["k"] == round(info["clean_flag_rate"][det] * len(ev_idx))
        assert info["operating_point"]["clean_fpr"][det]["k"] == op["fpr"]["k"]
        lo, hi = op["fpr"]["ci95"]
        assert lo <= op["fpr"]["rate"] <= hi
    assert ctx.report["detectors"]["knn"]["noise"]["operating_point"]["tpr"]["rate"] > 0.9


@pytest.mark.parametrize("how", ["same", "overlap"])
def test_detector_step_refuses_calibration_images_as_negatives(tiny_model, small_split, tmp_path, monkeypatch, how):
    """The mutant where the evaluation half equals (or shares images with) the calibration half fails here."""
    import guard.audit.detectors as mod

    def bad(n, seed):
        cal, ev = split_heldout(n, seed)
        return (cal, cal.clone()) if how == "same" else (cal, torch.cat([ev[:-5], cal[:5]]))

    monkeypatch.setattr(mod, "split_heldout", bad)
    train, test = small_split
    with pytest.raises(ValueError, match="disjoint|not used for calibration"):
        step("detectors").run(_ctx(tiny_model, small_split, tmp_path), attacks=_fake_attacks(test))


def test_evaluate_catches_overlap_even_without_the_index_check(tiny_model, small_split):
    """The content check alone (the second line of defence): scores from a calibration half passed as negatives."""
    import guard

    train, test = small_split
    g = guard.wrap(tiny_model, ["knn"]).fit(train)
    _, scores, errors = g.score(test.x[:128])
    g.calibrate_scores(scores, 0.05, errors=errors, images=test.x[:128])
    with pytest.raises(ValueError, match="got 128 of 128"):
        guard.evaluate(g, test.x[:128], {"n": test.x[200:210]}, clean_scores=scores)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torchattacks") is None, reason="needs the [bench] extra (torchattacks)")
def test_heldout_step_runs_torchattacks_marked_held_out(tiny_model, small_split, tmp_path):
    from conftest import ModelSnapshot

    ctx = _ctx(tiny_model, small_split, tmp_path, heldout_n=8)
    tiny_model.train()
    snap = ModelSnapshot(tiny_model)
    try:
        res = step("attacks_heldout").run(ctx)
        snap.assert_unchanged(tiny_model)  # torchattacks' backward passes leave no gradient on the caller's model
    finally:
        tiny_model.eval()
    att = ctx.report["attacks"]
    assert set(res.results) == {"apgd_ce", "apgd_t", "square", "cw", "deepfool"}
    assert all(att[n]["held_out"] is True for n in res.results)
    assert (
        att["cw"]["strength"] == att["deepfool"]["strength"] == "minimal-norm" and att["apgd_ce"]["strength"] == "full"
    )
    for n in ("apgd_ce", "apgd_t", "square"):
        assert att[n]["linf_max"] <= 0.3 + 1e-5 and att[n]["params"]["eps"] == 0.3
    assert att["apgd_ce"]["success_rate"] >= 0.9
    for n, r in res.results.items():
        with torch.no_grad():
            pred = tiny_model(r.x_adv).argmax(1)
        assert torch.equal(r.success, pred != r.y) and len(r) == 8 and "quick mode: 8 images" in att[n]["budget"]


def test_heldout_step_says_why_it_is_skipped(tiny_model, small_split, tmp_path, monkeypatch):
    import guard.audit.heldout as mod

    real = importlib.util.find_spec
    monkeypatch.setattr(
        mod.importlib.util, "find_spec", lambda name, *a: None if name == "torchattacks" else real(name, *a)
    )
    train, test = small_split
    rep = run_audit(
        tiny_model,
        train,
        test,
        tmp_path,
        options=AuditOptions(quick=True, progress=False, export=False),
        steps=[step("attacks_heldout")],
    )
    assert "torchattacks is not installed" in rep["skipped"]["attacks_heldout"]
