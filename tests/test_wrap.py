"""guard.wrap / GuardedModel / guard.evaluate on the tiny demo-layout model."""

from __future__ import annotations

import logging

import pytest
import torch

import guard
from guard.core.features import default_feature_layers
from guard.core.validation import NotFittedError
from guard.detectors import FeatureDetector, KNNRank


@pytest.fixture(scope="module")
def fitted(tiny_model, demo_split):
    train, test = demo_split
    g = guard.wrap(tiny_model).fit(guard.Split(train.x[:2000], train.y[:2000]))
    g.calibrate(test.x[:1000], fpr=0.05)
    return g


def test_default_layers_of_demo_net(tiny_model, fitted) -> None:
    assert default_feature_layers(tiny_model, torch.rand(2, 1, 28, 28)) == ["conv1", "conv2", "fc2:input"]
    assert fitted.layers == ["conv1", "conv2", "fc2:input"]
    info = fitted.describe()
    assert info["knn"]["layers"] == {"conv2": 16 * 4 * 4, "fc2:input": 32}  # conv2's 256 values kept whole
    assert info["ppca"]["layers"] == {"fc2:input": 32}


def test_forward_keeps_logits_and_flags_near_fpr(fitted, tiny_model, demo_split) -> None:
    _, test = demo_split
    x = test.x[1000:]
    out = fitted(x[:64])
    with torch.no_grad():
        torch.testing.assert_close(out.logits, tiny_model(x[:64]))
    assert set(out.scores) == {"saliency", "knn", "ppca", "knn_consistency", "squeeze", "combined"}
    assert out.flagged.dtype == torch.bool and out.flagged.shape == (64,)
    assert all(v.shape == (64,) for v in out.scores.values())
    flags = torch.cat([fitted(x[i : i + 250]).flagged for i in range(0, 1000, 250)])
    # held-out clean flag rate near the calibrated FPR; with 1,000 images per half the two halves
    # differ on their own (tiny model: 0.075 this way, 0.039 with the halves swapped)
    assert abs(float(flags.float().mean()) - 0.05) < 0.03
    pred = fitted.predict(x[:64])
    assert bool(((pred == -1) == out.flagged).all())
    assert bool((pred[~out.flagged] == out.logits.argmax(1)[~out.flagged]).all())


def test_noise_images_are_flagged(fitted) -> None:
    noise = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert float(fitted(noise).flagged.float().mean()) > 0.9


class _Broken(FeatureDetector):
    name = "broken"

    @property
    def feature_layers(self):
        return ["fc1"]

    def fit_features(self, feats, labels):
        self.fitted_ = True
        return self

    def score_features(self, feats, logits):
        raise RuntimeError("boom")


def test_fails_closed_when_a_detector_raises(tiny_model, small_split, caplog) -> None:
    train, test = small_split
    g = guard.wrap(tiny_model, detectors={"knn": KNNRank("fc1"), "broken": _Broken()}).fit(train)
    g.calibrate_scores({"knn": g.score(test.x[:128])[1]["knn"], "broken": torch.rand(128)}, 0.05)
    with caplog.at_level(logging.ERROR, logger="guard.guarded"):
        out = g(test.x[128:160])
    assert bool(out.flagged.all())
    assert "broken" in out.errors and "boom" in out.errors["broken"]
    assert any("broken" in r.getMessage() for r in caplog.records)
    assert bool((g.predict(test.x[128:160]) == -1).all())


def test_save_load_round_trip_and_tamper(fitted, tiny_model, demo_split, tmp_path) -> None:
    _, test = demo_split
    fitted.save(tmp_path / "g")
    back = guard.GuardedModel.load(tmp_path / "g", tiny_model)
    a, b = fitted(test.x[:32]), back(test.x[:32])
    for k in a.scores:
        torch.testing.assert_close(a.scores[k], b.scores[k])
    assert bool((a.flagged == b.flagged).all())
    # the calibration images are still known after the reload, so evaluate still refuses them
    assert back.calibration_digests_ == fitted.calibration_digests_ and len(back.calibration_digests_) == 1000
    with pytest.raises(ValueError, match="not used for calibration"):
        guard.evaluate(back, test.x[:100], {"x": test.x[1000:1010]})
    # alter one byte of the PPCA tensors: the SHA-256 check refuses the file
    path = tmp_path / "g" / "ppca.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="altered"):
        guard.GuardedModel.load(tmp_path / "g", tiny_model)
    with pytest.raises(ValueError, match="not a saved GuardedModel"):
        guard.GuardedModel.load(tmp_path / "nothing", tiny_model)


def test_errors_before_fit_and_bad_input(tiny_model, small_split) -> None:
    train, test = small_split
    g = guard.wrap(tiny_model, detectors=["knn", "ppca"])
    with pytest.raises(NotFittedError):
        g(test.x[:4])
    with pytest.raises(ValueError, match="Unknown layer"):
        guard.wrap(tiny_model, layers=["nope"])
    with pytest.raises(ValueError, match="unknown detector"):
        guard.wrap(tiny_model, detectors=["lof"])
    g.fit(train)
    with pytest.raises(NotFittedError, match="calibrate"):
        g(test.x[:4])
    g.calibrate(test.x[:128], fpr=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        g(test.x[:4] * 3)
    with pytest.raises(ValueError, match="fpr"):
        g.calibrate(test.x[:128], fpr=1.5)


def test_evaluate_metrics(fitted, demo_split) -> None:
    _, test = demo_split
    noise = torch.rand(100, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    success = torch.zeros(100, dtype=torch.bool)
    success[:60] = True
    rep = guard.evaluate(fitted, test.x[1000:1400], {"noise": (noise, success), "clean_copy": test.x[1400:1600]})
    assert set(rep) == {"saliency", "knn", "ppca", "knn_consistency", "squeeze", "combined"}
    e = rep["knn"]["noise"]
    assert e["n_pos"] == 60 and e["n_neg"] == 400 and e["all"]["n_pos"] == 100
    assert e["auroc"] > 0.95 and 0.0 <= e["tpr_at_1fpr"] <= e["tpr_at_5fpr"] <= 1.0
    assert 0.35 < rep["combined"]["clean_copy"]["auroc"] < 0.65  # clean vs clean: chance


def test_evaluate_matches_hand_computed_auroc() -> None:
    from guard.evaluation import detection_metrics

    m = detection_metrics(torch.tensor([2.0, 3.0, float("inf")]), torch.tensor([0.0, 1.0, 2.5, 0.5]))
    assert m["auroc"] == pytest.approx(11 / 12)
    assert m["tpr_at_5fpr"] == pytest.approx(2 / 3)


def test_audit_step_quick_reloads_attack_artifacts(tiny_model, demo_split, tmp_path) -> None:
    import json

    from guard.attacks import AttackResult
    from guard.audit import AuditContext, AuditOptions, run_audit, step

    train, test = demo_split
    # an interrupted audit whose fooling step had finished: its artifact and report entry exist
    noise = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    ctx = AuditContext(tiny_model, "tiny", train, test, "test", tmp_path, AuditOptions())
    ctx.save_attack("fooling_direct", AttackResult(noise, torch.ones(64, dtype=torch.bool)))
    ctx.report = {"version": 1, "_completed_steps": ["attacks_fooling"]}
    ctx.save_report()
    rep = run_audit(
        tiny_model,
        train,
        test,
        tmp_path,
        options=AuditOptions(quick=True, progress=False, export=False),
        steps=[step("attacks_fooling"), step("detectors")],
        resume=True,
    )
    sec = rep["detectors"]
    for det in ("saliency", "knn", "ppca", "combined"):
        e = sec[det]["fooling_direct"]
        assert {"auroc", "tpr_at_1fpr", "tpr_at_5fpr", "n_pos", "n_neg"} <= set(e)
        assert e["n_pos"] == 64 and e["n_neg"] == 256
    assert sec["knn"]["fooling_direct"]["auroc"] > 0.9
    info = rep["detectors_info"]
    assert info["predictions_identical"] and info["calibration"]["n_calibration"] == 256
    assert json.loads((tmp_path / "report.json").read_text())["detectors"] == json.loads(json.dumps(sec))
    back = guard.GuardedModel.load(tmp_path / "guarded", tiny_model)
    assert set(back.detectors) == set(sec) - {"combined"}


# -- the operating point: realised rates at the calibrated threshold, with exact intervals ---------------------


@pytest.mark.parametrize(
    "k,n", [(0, 1), (0, 10), (1, 10), (5, 10), (10, 10), (3, 250), (13, 256), (999, 1000), (1000, 1000)]
)
def test_clopper_pearson_matches_scipy_binomtest(k, n) -> None:
    from scipy.stats import binomtest

    from guard.evaluation import clopper_pearson

    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    lo, hi = clopper_pearson(k, n)
    assert lo == pytest.approx(ref.low, abs=1e-9) and hi == pytest.approx(ref.high, abs=1e-9)


def test_clopper_pearson_textbook_values() -> None:
    """0 of 10: the upper bound is 1 - 0.025^(1/10) (solved by hand); 5 of 10: [0.1871, 0.8129]."""
    from guard.evaluation import clopper_pearson

    assert clopper_pearson(0, 10) == (0.0, pytest.approx(1 - 0.025**0.1, abs=1e-12))
    assert clopper_pearson(10, 10) == (pytest.approx(0.025**0.1, abs=1e-12), 1.0)
    lo, hi = clopper_pearson(5, 10)
    assert lo == pytest.approx(0.18709, abs=1e-5) and hi == pytest.approx(0.81291, abs=1e-5)
    with pytest.raises(ValueError, match="k <= n"):
        clopper_pearson(11, 10)


def test_evaluate_operating_point_is_the_served_flag(fitted, demo_split) -> None:
    """The realised FPR / TPR are exactly the calibrated flag's rates on the images, with k, n and the interval."""
    from guard.evaluation import clopper_pearson

    _, test = demo_split
    clean, noise = test.x[1000:1400], torch.rand(80, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    rep = guard.evaluate(fitted, clean, {"noise": noise})
    op = rep["combined"]["noise"]["operating_point"]
    flags_clean, flags_noise = fitted(clean).flagged, fitted(noise).flagged
    assert (
        op["fpr"]["n"] == 400 and op["fpr"]["k"] == int(flags_clean.sum()) and op["tpr"]["k"] == int(flags_noise.sum())
    )
    assert op["fpr"]["ci95"] == list(clopper_pearson(op["fpr"]["k"], 400))
    assert op["fpr"]["ci95"][0] <= op["fpr"]["rate"] <= op["fpr"]["ci95"][1]
    assert op["threshold"] == fitted.combined.threshold_ and op["target_fpr"] == 0.05 and op["n_calibration"] == 1000
    assert op["clean_disjoint_from_calibration"] is True


def test_evaluate_refuses_calibration_images(fitted, demo_split) -> None:
    """Negatives that set the threshold: refused by content, whether sliced, copied or passed as calibration=."""
    _, test = demo_split
    noise = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="not used for calibration; got 500 of 1000"):
        guard.evaluate(fitted, test.x[500:1500], {"noise": noise})
    with pytest.raises(ValueError, match="got 1 of 401"):
        guard.evaluate(fitted, torch.cat([test.x[1000:1400], test.x[7:8].clone()]), {"noise": noise})
    with pytest.raises(ValueError, match="calibration"):
        guard.evaluate(fitted, test.x[1000:1100], {"noise": noise}, calibration=test.x[1050:1060])
    guard.evaluate(fitted, test.x[1000:1100], {"noise": noise}, calibration=test.x[1100:1200])  # disjoint: fine


def _planted(kind: str) -> torch.Tensor:
    """Planted outliers: uniform noise, or a black image with one white 5x5 square (one place per image)."""
    if kind == "noise":
        return torch.rand(100, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    dot = torch.zeros(100, 1, 28, 28)
    for i in range(100):
        r, c = (i * 7) % 22, (i * 13) % 22
        dot[i, :, r : r + 5, c : c + 5] = 1.0
    return dot


# Saliency concentration scores uniform noise *below* clean digits (AUROC 0.25 on this model: noise
# spreads the attribution), so its planted outlier is the one-square image, whose attribution is
# concentrated; PPCA separates noise (AUROC 0.83) but flags almost none of it at 5% FPR.
@pytest.mark.parametrize(
    "detector,kind,min_auroc",
    [
        ("saliency", "dot", 0.6),
        ("knn", "noise", 0.95),
        ("ppca", "dot", 0.85),
        ("knn_consistency", "noise", 0.85),
        ("squeeze", "noise", 0.85),
        ("combined", "noise", 0.95),
    ],
)
def test_each_detector_scores_planted_outliers_higher(fitted, demo_split, detector, kind, min_auroc) -> None:
    """Every detector's AUROC well above chance on a planted outlier and its calibrated flag catching more
    of them than of clean images, by more than the intervals: a score with its sign flipped fails here."""
    _, test = demo_split
    e = guard.evaluate(fitted, test.x[1000:1500], {kind: _planted(kind)})[detector][kind]
    assert e["auroc"] > min_auroc
    op = e["operating_point"]
    assert op["tpr"]["ci95"][0] > op["fpr"]["ci95"][1]
