"""KNNRank / KNNConsistency: exact against brute force, planted outliers, bad input, save/load."""

from __future__ import annotations

import pytest
import torch

from guard.core.validation import NotFittedError
from guard.detectors import KNNConsistency, KNNRank


def _blobs(n: int = 300, d: int = 16, c: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    centers = torch.randn(c, d, generator=torch.Generator().manual_seed(123)) * 4  # same blobs for every seed
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    return centers[y] + torch.randn(n, d, generator=g), y


def _onehot_logits(y: torch.Tensor, c: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(y, c).float()


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_knn_distance_equals_brute_force(metric: str) -> None:
    x, y = _blobs()
    q, qy = _blobs(50, seed=1)
    det = KNNRank("f", k=5, metric=metric, statistic="distance").fit_features({"f": x}, y)
    got = det.score_features({"f": q}, _onehot_logits(qy))
    if metric == "cosine":
        xn, qn = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(q, dim=1)
        dist = 1 - qn @ xn.T
    else:
        dist = torch.cdist(q.double(), x.double()).float()
    want = dist.topk(5, dim=1, largest=False).values.mean(1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_knn_rank_is_sabour_rank_within_predicted_class() -> None:
    x, y = _blobs()
    det = KNNRank("f", k=5, metric="l2").fit_features({"f": x}, y)
    # leave-one-out reference scores of class 1, computed by brute force
    d = torch.cdist(x.double(), x.double())
    d.fill_diagonal_(float("inf"))
    ref = d.topk(5, dim=1, largest=False).values.mean(1).float()
    ref1 = torch.sort(ref[y == 1]).values
    torch.testing.assert_close(det.class_ref_scores_[1, : ref1.numel()], ref1, atol=1e-4, rtol=1e-4)
    q, _ = _blobs(20, seed=2)
    dist, _ = det.distances({"f": q})
    rank = det.score_features({"f": q}, _onehot_logits(torch.ones(20, dtype=torch.long)))
    inside = dist.mean(1) <= ref1[-1]
    want = (ref1[None, :] <= dist.mean(1)[:, None]).float().mean(1)
    torch.testing.assert_close(rank[inside], want[inside])


def test_planted_outlier_scores_higher_and_flag_rate_near_fpr() -> None:
    x, y = _blobs(600)
    xc, yc = _blobs(2000, seed=3)
    det = KNNRank("f", k=5).fit_features({"f": x}, y)
    det.calibrate(det.score_features({"f": xc[:1000]}, _onehot_logits(yc[:1000])), fpr=0.05)
    held = det.predict_scores(det.score_features({"f": xc[1000:]}, _onehot_logits(yc[1000:])))
    assert abs(float(held.float().mean()) - 0.05) < 0.025
    outlier = torch.full((1, 16), 3.0) * torch.tensor([1.0, -1.0] * 8)
    s_out = det.score_features({"f": outlier}, _onehot_logits(torch.tensor([0])))
    s_in = det.score_features({"f": xc[:200]}, _onehot_logits(yc[:200]))
    assert float(s_out) > float(s_in.max())
    assert bool(det.predict_scores(s_out).all())


def test_multilayer_score_is_max_of_layers_and_roundtrip(tmp_path) -> None:
    x, y = _blobs()
    x2, _ = _blobs(seed=5)
    det = KNNRank(["a", "b"], k=4).fit_features({"a": x, "b": x2}, y)
    q, qy = _blobs(30, seed=6)
    feats = {"a": q, "b": q * 0.5}
    per = det.layer_scores(feats, _onehot_logits(qy))
    torch.testing.assert_close(det.score_features(feats, _onehot_logits(qy)), torch.maximum(per["a"], per["b"]))
    det.calibrate(det.score_features(feats, _onehot_logits(qy)), fpr=0.1)
    det.save(tmp_path / "knn.safetensors")
    back = KNNRank.load(tmp_path / "knn.safetensors")
    torch.testing.assert_close(
        back.score_features(feats, _onehot_logits(qy)), det.score_features(feats, _onehot_logits(qy))
    )
    assert back.threshold_ == det.threshold_


def test_bad_inputs() -> None:
    x, y = _blobs()
    with pytest.raises(NotFittedError):
        KNNRank("f").score_features({"f": x}, _onehot_logits(y))
    with pytest.raises(ValueError, match="empty"):
        KNNRank("f").fit_features({"f": x[:0]}, y[:0])
    with pytest.raises(ValueError, match="'k' parameter of KNNRank"):
        KNNRank("f", k=0).fit_features({"f": x}, y)
    with pytest.raises(ValueError, match="metric"):
        KNNRank("f", metric="manhattan").fit_features({"f": x}, y)
    det = KNNRank("f", k=3).fit_features({"f": x}, y)
    with pytest.raises(ValueError, match="width 16"):
        det.score_features({"f": x[:, :8]}, _onehot_logits(y))
    with pytest.raises(ValueError, match="layer 'f'"):
        det.score_features({"g": x}, _onehot_logits(y))


def test_knn_consistency_counts_disagreeing_neighbours(tmp_path) -> None:
    x, y = _blobs()
    det = KNNConsistency(["a", "b"], k=5).fit_features({"a": x, "b": x}, y)
    q, qy = _blobs(40, seed=7)
    right = det.score_features({"a": q, "b": q}, _onehot_logits(qy))
    wrong = det.score_features({"a": q, "b": q}, _onehot_logits((qy + 1) % 3))
    assert float(right.mean()) < 0.05 and float(wrong.mean()) > 0.95
    det.save(tmp_path / "c.safetensors")
    back = KNNConsistency.load(tmp_path / "c.safetensors")
    torch.testing.assert_close(back.score_features({"a": q, "b": q}, _onehot_logits(qy)), right)


def test_ivf_index_for_large_banks_agrees_with_exact() -> None:
    x, y = _blobs(2000, d=8)
    exact = KNNRank("f", k=5, statistic="distance").fit_features({"f": x}, y)
    ivf = KNNRank("f", k=5, statistic="distance", ivf_min_bank=1000, nprobe=64, index="ivf_flat").fit_features(
        {"f": x}, y
    )
    assert type(ivf._index.index).__name__.startswith("IndexIVF")
    q, qy = _blobs(50, d=8, seed=9)
    torch.testing.assert_close(
        ivf.score_features({"f": q}, _onehot_logits(qy)),
        exact.score_features({"f": q}, _onehot_logits(qy)),
        atol=1e-4,
        rtol=1e-3,
    )
