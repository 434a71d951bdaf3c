"""Streaming fit (issue 15): a data set read batch by batch, never held whole, fits the same detectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from stream_tools import HeldBatches
from torch.utils.data import DataLoader, TensorDataset

import guard
from guard.core.data import load_data, stream_batches
from guard.core.sampling import BottomK, row_keys
from guard.detectors import KNNConsistency, KNNRank, LIDDetector, MahalanobisDetector, PPCAManifold


@pytest.fixture(scope="module")
def data(demo_split):
    train, test = demo_split
    return guard.Split(train.x[:600], train.y[:600]), test.x[:200]


def test_materialising_the_tracked_loader_raises(data) -> None:
    """The guard of the test below works: holding every batch (as load_data does) trips it."""
    train, _ = data
    held = HeldBatches(limit=3)
    with pytest.raises(RuntimeError, match="materialised"):
        load_data(DataLoader(TensorDataset(train.x, train.y), batch_size=50, collate_fn=held))


def test_streaming_fit_holds_few_batches_and_equals_the_tensor_fit(tiny_model, data) -> None:
    train, query = data
    dets = lambda: {
        "knn": KNNRank(["conv2", "fc2:input"]),
        "ppca": PPCAManifold("fc2:input"),  # noqa: E731
        "knn_consistency": KNNConsistency(["conv2", "fc2:input"]),
        "mahalanobis": MahalanobisDetector(["conv2", "fc2:input"]),
        "lid": LIDDetector(["conv2", "fc2:input"], reference_size=300),
    }
    one = guard.wrap(tiny_model, {**dets()}, batch_size=512).fit(train)
    held = HeldBatches(limit=3)
    loader = DataLoader(TensorDataset(train.x, train.y), batch_size=50, collate_fn=held)
    streamed = guard.wrap(tiny_model, {**dets()}, batch_size=512).fit(loader)
    assert held.made == 12 and held.most <= 3  # 12 batches read, never more than 3 alive
    _, a, _ = one.score(query)
    _, b, _ = streamed.score(query)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4, msg=name)
    torch.testing.assert_close(
        streamed.detectors["knn"].parts_["conv2"].bank_, one.detectors["knn"].parts_["conv2"].bank_
    )


def test_default_detectors_stream_from_a_dataset_and_calibrate_from_one(tiny_model, data) -> None:
    train, query = data
    x, y = train.x[:120], train.y[:120]
    tensor_fit = guard.wrap(tiny_model, batch_size=32).fit(guard.Split(x, y))
    stream_fit = guard.wrap(tiny_model, batch_size=32).fit(TensorDataset(x, y))
    assert set(stream_fit.detectors) == set(tensor_fit.detectors) and stream_fit.layers == tensor_fit.layers
    stream_fit.calibrate(TensorDataset(query, torch.zeros(query.shape[0], dtype=torch.long)), fpr=0.1)
    tensor_fit.calibrate(query, fpr=0.1)
    for name, det in tensor_fit.detectors.items():
        assert stream_fit.detectors[name].threshold_ == pytest.approx(det.threshold_, rel=1e-4, abs=1e-5), name
    assert stream_fit.combined.threshold_ == pytest.approx(tensor_fit.combined.threshold_, rel=1e-4, abs=1e-5)


def test_folder_of_three_channel_images_streams_through_a_model_of_the_folder(tmp_path) -> None:
    """fit(path) on RGB images: the stream reaches the detectors and fits them (no materialised tensor)."""
    g = torch.Generator().manual_seed(0)
    for c in range(2):
        (tmp_path / f"k{c}").mkdir()
        for i in range(30):
            arr = (torch.rand(8, 8, 3, generator=g) * 0.5 + 0.5 * c).mul(255).byte().numpy()
            Image.fromarray(arr).save(tmp_path / f"k{c}" / f"{i}.png")
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2)
    )
    gm = guard.wrap(model, {"knn": KNNRank("3:input", k=3)}, batch_size=16).fit(tmp_path)
    assert gm.detectors["knn"].bank_.shape == (60, 144)
    assert torch.bincount(gm.detectors["knn"].bank_labels_).tolist() == [30, 30]


def test_stream_batches_checks_each_batch() -> None:
    bad = TensorDataset(torch.rand(10, 1, 4, 4) * 2, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        list(stream_batches(bad, 4))
    with pytest.raises(ValueError, match="empty"):
        list(stream_batches(TensorDataset(torch.rand(0, 1, 4, 4), torch.zeros(0, dtype=torch.long)), 4))
    with pytest.raises(ValueError, match="batch_size"):
        list(stream_batches(TensorDataset(torch.rand(3, 1, 4, 4), torch.zeros(3, dtype=torch.long)), 0))


# ----------------------------------------------------------------------------- incremental state


def _blobs(n: int, d: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    centers = torch.randn(c, d, generator=torch.Generator().manual_seed(99)) * 3
    mix = torch.randn(d, d, generator=g) / d**0.5
    return centers[y] + torch.randn(n, d, generator=g) @ mix + 2.0, y


def _stream(det, x, y, bs):
    for i in range(0, x.shape[0], bs):
        det.partial_fit_features({"f": x[i : i + bs]}, y[i : i + bs])
    return det.finish_fit()


def test_incremental_knn_bank_equals_one_shot_bank_and_caps_per_class() -> None:
    x, y = _blobs(700, 12, 4, 0)
    one = KNNRank("f", k=5).fit_features({"f": x}, y)
    inc = _stream(KNNRank("f", k=5), x, y, 33)
    assert torch.equal(inc.bank_, one.bank_) and torch.equal(inc.bank_labels_, one.bank_labels_)
    assert torch.equal(inc.class_ref_scores_, one.class_ref_scores_)
    capped_one = KNNRank("f", k=5, max_per_class=60, seed=3).fit_features({"f": x}, y)
    capped_inc = _stream(KNNRank("f", k=5, max_per_class=60, seed=3), x, y, 17)
    assert torch.equal(capped_inc.bank_, capped_one.bank_)  # the same sample whatever the batching
    counts = torch.bincount(capped_one.bank_labels_)
    assert counts.tolist() == [60, 60, 60, 60]
    # every kept row is a real row of its class, and the sample is not the first rows of each class
    from guard.detectors.knn import _prep

    bank = _prep(x, "cosine")
    for c in range(4):
        rows = bank[y == c]
        kept = capped_one.bank_[capped_one.bank_labels_ == c]
        pos = [int(torch.nonzero((rows == r).all(1))[0]) for r in kept]
        assert pos != list(range(60)) and max(pos) > 100
    other = KNNRank("f", k=5, max_per_class=60, seed=4).fit_features({"f": x}, y)
    assert not torch.equal(other.bank_, capped_one.bank_)


def test_bottom_k_is_a_uniform_sample_independent_of_batching() -> None:
    keys = row_keys(0, 100_000, seed=0)
    assert np.unique(keys).shape[0] == 100_000  # a bijection: no ties
    picks = []
    for bs in (7, 1000, 100_000):
        s = BottomK(500, seed=1)
        v = torch.arange(100_000, dtype=torch.float32)[:, None]
        for i in range(0, 100_000, bs):
            s.add({"v": v[i : i + bs]}, torch.zeros(min(bs, 100_000 - i), dtype=torch.long))
        tensors, _, idx = s.result()
        assert torch.equal(tensors["v"][:, 0].long(), idx)
        picks.append(idx)
    assert torch.equal(picks[0], picks[1]) and torch.equal(picks[1], picks[2])
    # uniform: each tenth of the stream holds about a tenth of the sample
    per_tenth = torch.bincount(picks[0] // 10_000, minlength=10)
    assert int(per_tenth.min()) > 25 and int(per_tenth.max()) < 80


def test_streaming_ppca_equals_one_shot_and_incremental_pca_is_close() -> None:
    x, y = _blobs(900, 20, 3, 1)
    y[:5] = 3  # a class too small for its own PPCA: the pooled one
    q, _ = _blobs(100, 20, 3, 2)
    logits = torch.randn(100, 4)
    one = PPCAManifold("f", n_components=4).fit_features({"f": x}, y)
    inc = _stream(PPCAManifold("f", n_components=4), x, y, 41)
    torch.testing.assert_close(
        inc.score_features({"f": q}, logits), one.score_features({"f": q}, logits), rtol=1e-4, atol=1e-3
    )
    torch.testing.assert_close(inc.noise_, one.noise_, rtol=1e-4, atol=1e-6)
    approx = _stream(PPCAManifold("f", n_components=4, max_scatter_bytes=0), x, y, 41)
    a, b = one.score_features({"f": q}, logits), approx.score_features({"f": q}, logits)
    assert float(((a - b).abs() / a.abs()).max()) < 0.05  # IncrementalPCA: approximate, within 5% here
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.99


def test_streaming_mahalanobis_equals_sklearn_tied_covariance() -> None:
    from sklearn.covariance import EmpiricalCovariance

    from guard.detectors.mahalanobis import closest_class_distance

    x, y = _blobs(800, 10, 4, 3)
    inc = _stream(MahalanobisDetector(["f"]), x, y, 29)
    xd = x.double()
    means = torch.stack([xd[y == c].mean(0) for c in range(4)])
    ref = EmpiricalCovariance(assume_centered=True).fit((xd - means[y]).numpy())
    torch.testing.assert_close(inc.means0_, means.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inc.precision0_.double(), torch.from_numpy(ref.precision_), rtol=1e-4, atol=1e-4)
    q, _ = _blobs(50, 10, 4, 4)
    d = closest_class_distance(q, means.float(), torch.from_numpy(ref.precision_).float())
    torch.testing.assert_close(inc.layer_distances({"f": q})[:, 0], d, rtol=1e-4, atol=1e-3)


def test_streaming_lid_reference_equals_one_shot() -> None:
    x, y = _blobs(500, 8, 2, 5)
    one = LIDDetector(["f"], reference_size=200, seed=2).fit_features({"f": x}, y)
    inc = _stream(LIDDetector(["f"], reference_size=200, seed=2), x, y, 64)
    assert torch.equal(inc.bank0_, one.bank0_)
    torch.testing.assert_close(inc.loc_, one.loc_)


def test_streaming_fit_refuses_changing_widths_and_constant_features() -> None:
    det = KNNRank("f", k=2)
    det.partial_fit_features({"f": torch.randn(5, 4)}, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="width of the first batch"):
        det.partial_fit_features({"f": torch.randn(5, 3)}, torch.zeros(5, dtype=torch.long))
    const = PPCAManifold("f")
    for _ in range(3):
        const.partial_fit_features({"f": torch.ones(4, 3)}, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="do not vary"):
        const.finish_fit()
    with pytest.raises(ValueError, match="no batch"):
        KNNRank("f").finish_fit()
