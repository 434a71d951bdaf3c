"""Detector base: calibration quantile, Combined, safe save/load with integrity check."""

from __future__ import annotations

import pytest
import torch

from guard.core.validation import NotFittedError
from guard.detectors import Combined, Detector, KNNRank
from guard.detectors.base import quantile_threshold


def test_quantile_threshold_flags_at_most_fpr() -> None:
    s = torch.arange(100, dtype=torch.float32)
    thr = quantile_threshold(s, 0.05)
    assert float((s > thr).float().mean()) == pytest.approx(0.05)
    assert quantile_threshold(torch.tensor([1.0, float("inf"), 2.0]), 0.5) == 1.0
    with pytest.raises(ValueError, match="no finite"):
        quantile_threshold(torch.tensor([float("inf")]), 0.1)


def test_combined_is_conformal_and_fails_closed(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    clean = {"a": torch.randn(1000, generator=g), "b": 100 * torch.randn(1000, generator=g).exp()}
    comb = Combined(["a", "b"])
    comb.calibrate_scores(clean, fpr=0.05)
    flags = comb.predict_scores(comb.combine(clean))
    assert float(flags.float().mean()) <= 0.05 + 1e-9
    held = {"a": torch.randn(4000, generator=g), "b": 100 * torch.randn(4000, generator=g).exp()}
    assert abs(float(comb.predict_scores(comb.combine(held)).float().mean()) - 0.05) < 0.015
    # a far outlier on the bounded detector alone is flagged despite b's heavy tail
    out = comb.combine({"a": torch.tensor([10.0, 0.0]), "b": torch.tensor([1.0, float("nan")])})
    assert bool(comb.predict_scores(out).all())  # the NaN (a failed detector) flags too
    comb.save(tmp_path / "c.safetensors")
    back = Combined.load(tmp_path / "c.safetensors")
    assert isinstance(back, Combined) and back.names == ["a", "b"]
    with pytest.raises(ValueError, match="holds a Combined, not a Detector"):
        Detector.load(tmp_path / "c.safetensors")  # a calibrator is not a detector
    torch.testing.assert_close(back.combine(held), comb.combine(held))


def test_load_rejects_altered_and_foreign_files(tmp_path) -> None:
    x = torch.randn(50, 4)
    det = KNNRank("f", k=3).fit_features({"f": x}, torch.arange(50) % 2)
    det.save(tmp_path / "k.safetensors")
    with pytest.raises(ValueError, match="holds a KNNRank"):
        Combined.load(tmp_path / "k.safetensors")
    raw = bytearray((tmp_path / "k.safetensors").read_bytes())
    raw[-3] ^= 0x01
    (tmp_path / "k.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="altered"):
        KNNRank.load(tmp_path / "k.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="corrupt"):
        KNNRank.load(tmp_path / "junk.safetensors")


def test_not_fitted_errors() -> None:
    with pytest.raises(NotFittedError):
        KNNRank("f").calibrate(torch.rand(10), 0.1)
    with pytest.raises(NotFittedError):
        KNNRank("f").save("unused.safetensors")
    det = KNNRank("f", k=2).fit_features({"f": torch.randn(10, 3)}, torch.zeros(10, dtype=torch.long))
    with pytest.raises(NotFittedError, match="calibrate"):
        det.predict_scores(torch.rand(3))
    with pytest.raises(TypeError, match="1-D tensor of clean scores"):
        det.calibrate([1.0, 2.0], 0.1)


def test_combined_recalibrated_with_given_weights_keeps_them_and_sets_its_own_threshold():
    gen = torch.Generator().manual_seed(0)
    clean = {"a": torch.randn(400, generator=gen), "b": torch.randn(400, generator=gen)}
    proxy = {"a": torch.randn(200, generator=gen) + 3.0, "b": torch.randn(200, generator=gen)}  # only "a" separates
    learned = Combined(["a", "b"], rule="weighted")
    learned.calibrate_scores(clean, 0.05, proxy_scores=proxy)
    assert float(learned.weights_[0]) > float(learned.weights_[1])
    other = {"a": torch.randn(400, generator=gen) * 2, "b": torch.randn(400, generator=gen)}
    again = Combined(["a", "b"], rule="weighted")
    again.calibrate_scores(other, 0.05, weights=learned.weights_)  # no proxies needed: the weights are kept
    torch.testing.assert_close(again.weights_, learned.weights_)
    assert abs(float(again.predict_scores(again.combine(other)).float().mean()) - 0.05) <= 0.02
    with pytest.raises(ValueError, match="one weight per detector"):
        Combined(["a", "b"], rule="weighted").calibrate_scores(other, 0.05, weights=torch.ones(3))
