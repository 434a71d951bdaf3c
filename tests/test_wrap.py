"""guard.wrap / GuardedModel / guard.evaluate on the tiny demo-layout model."""

from __future__ import annotations

import logging

import pytest
import torch

import guard
from guard.detectors import FeatureDetector, KNNRank
from guard.core.features import default_feature_layers
from guard.core.validation import NotFittedError


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
    flags = torch.cat([fitted(x[i:i + 250]).flagged for i in range(0, 1000, 250)])
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
    rep = run_audit(tiny_model, train, test, tmp_path, options=AuditOptions(quick=True, progress=False, export=False),
                    steps=[step("attacks_fooling"), step("detectors")], resume=True)
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
