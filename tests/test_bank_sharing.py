"""One copy of a feature bank: pooled between detectors and layers, searched in place, on the GPU when there is one."""

from __future__ import annotations

import faiss
import numpy as np
import onnx
import pytest
import torch

import guard
from guard.detectors import KNNConsistency, KNNRank, bank_index
from guard.detectors.bank_index import BankIndex, FaissDeviceError, build_index, knn_search


def _feats(n: int = 600, d: int = 16, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 5
    a = torch.randn(n, d, generator=g) + 3 * torch.nn.functional.one_hot(y, d).float()
    return {"a": a, "b": a.clone(), "c": torch.randn(n, d, generator=g)}, y


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_exact_search_in_place_equals_an_index_flat(metric) -> None:
    f, _ = _feats()
    bank = torch.nn.functional.normalize(f["a"], dim=1) if metric == "cosine" else f["a"]
    q = bank[:50] + 0.01
    d0, i0 = knn_search(build_index(bank, metric), q, 7, metric)
    index = BankIndex(bank, metric, kind="flat")
    d1, i1 = index.search(q, 7)
    assert index.index is None  # no FAISS copy of the bank
    assert torch.equal(i0, i1) and torch.allclose(d0, d1, atol=1e-6)


def test_detectors_over_equal_banks_share_one_tensor_and_one_index() -> None:
    f, y = _feats()
    rank = KNNRank(["a", "b", "c"], k=5).fit_features(f, y)
    cons = KNNConsistency(["a", "c"], k=5).fit_features(f, y)
    pa, pb, pc = (rank.parts_[layer] for layer in "abc")
    # equal features at two layers (a ResNet's pooled layer4 and its fc input): one bank, one index
    assert pa.bank_ is pb.bank_ and pa._index is pb._index
    assert pc.bank_ is not pa.bank_
    # a second detector on the same layers: the same tensors and indexes
    assert cons.banks_["a"] is pa.bank_ and cons._indexes["a"] is pa._index
    assert cons.banks_["c"] is pc.bank_ and cons._indexes["c"] is pc._index
    # different settings: the bank tensor is still shared, the index is not
    other = KNNConsistency(["a"], k=5, nprobe=3).fit_features(f, y)
    assert other.banks_["a"] is pa.bank_ and other._indexes["a"] is not pa._index
    # scores as a detector that shares nothing (one fitted on perturbed-then-restored copies is the same math)
    alone = KNNRank("c", k=5).fit_features({"c": f["c"] + 0}, y)
    assert alone._index is pc._index  # equal content pools even from a fresh tensor
    q = {k: v[:40] + 0.05 for k, v in f.items()}
    logits = torch.nn.functional.one_hot(y[:40], 5).float()
    assert torch.allclose(rank.layer_scores(q, logits)["c"], alone.score_features({"c": q["c"]}, logits))


def test_the_pool_forgets_banks_nobody_holds() -> None:
    import gc

    f, y = _feats(seed=3)
    det = KNNRank("a", k=5).fit_features(f, y)
    key_count = len(bank_index._INDEXES)
    del det
    gc.collect()
    assert len(bank_index._INDEXES) < key_count
    fresh = KNNRank("a", k=5).fit_features(f, y)
    assert fresh._index.bank is fresh.bank_


def test_saved_and_loaded_detectors_share_again(tmp_path) -> None:
    f, y = _feats(seed=1)
    rank = KNNRank(["a", "b"], k=5).fit_features(f, y)
    cons = KNNConsistency(["a", "b"], k=5).fit_features(f, y)
    rank.save(tmp_path / "r")
    cons.save(tmp_path / "c")
    del rank, cons
    r2, c2 = KNNRank.load(tmp_path / "r"), KNNConsistency.load(tmp_path / "c")
    assert r2.parts_["a"].bank_ is r2.parts_["b"].bank_ is c2.banks_["a"] is c2.banks_["b"]


def test_the_exported_graph_holds_each_bank_once(tiny_model, small_split, tmp_path) -> None:
    train, test = small_split
    g = guard.wrap(tiny_model, detectors=["knn", "knn_consistency"]).fit(train).calibrate(test.x[:128], fpr=0.05)
    knn, cons = g.detectors["knn"], g.detectors["knn_consistency"]
    layers = knn.feature_layers
    assert sorted(layers) == sorted(cons.layers)
    rep = guard.to_onnx(g, tmp_path / "m.onnx", test.x[:8], parity_inputs=test.x[128:160])
    assert rep.parity["passed"]
    model = onnx.load(str(tmp_path / "m.onnx"))
    m = int(knn.parts_[layers[0]].bank_.shape[0])
    banks = [t for t in model.graph.initializer if len(t.dims) == 2 and m in t.dims and min(t.dims) > 1]
    widths = sorted(int(knn.parts_[layer].bank_.shape[1]) for layer in layers)
    assert sorted(min(t.dims) for t in banks) == widths  # one (D, M) initializer per layer, not one per head


def test_device_cuda_without_a_gpu_build_raises_and_auto_records_the_cpu() -> None:
    f, y = _feats(seed=2)
    if bank_index.faiss_gpus() == 0:
        with pytest.raises(FaissDeviceError, match="device='cuda'.*no GPU"):
            BankIndex(f["a"], "l2", device="cuda")
        assert BankIndex(f["a"], "l2", device="auto").device_used == "cpu"
    with pytest.raises(ValueError, match="'device' parameter of KNNRank must be one of"):
        KNNRank("a", device="gpu").fit_features(f, y)
    with pytest.raises(ValueError, match="device must be one of"):
        BankIndex(f["a"], "l2", device="tpu")


class _FakeGpuFaiss:
    """The GPU entry points of FAISS, recording their calls and answering with the CPU kernels."""

    def __init__(self, fail_ivf: bool = False) -> None:
        self.calls: list[str] = []
        self.fail_ivf = fail_ivf

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
        monkeypatch.setattr(faiss, "knn_gpu", self.knn_gpu, raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_gpu", self.to_gpu, raising=False)
        monkeypatch.setattr(bank_index, "_GPU_RES", [])

    def knn_gpu(self, res, xq, xb, k, metric=faiss.METRIC_L2):
        self.calls.append("knn_gpu")
        return faiss.knn(xq, xb, k, metric=metric)

    def to_gpu(self, res, dev, index):
        self.calls.append("index_cpu_to_gpu")
        if self.fail_ivf:
            raise RuntimeError("no GPU kernel for this index")
        return faiss.clone_index(index)


def test_a_gpu_build_searches_on_the_gpu(monkeypatch) -> None:
    fake = _FakeGpuFaiss()
    fake.install(monkeypatch)
    f, _ = _feats(n=4000, seed=4)
    exact = BankIndex(f["a"], "l2", kind="flat", device="cuda")
    ivf = BankIndex(f["a"], "l2", kind="ivf_flat", device="auto")
    d0, i0 = exact.search(f["a"][:20], 5)
    d1, i1 = ivf.search(f["a"][:20], 5)
    assert exact.device_used == ivf.device_used == "cuda"
    assert fake.calls == ["index_cpu_to_gpu", "knn_gpu"]
    assert torch.equal(i0[:, 0], torch.arange(20)) and torch.equal(i1[:, 0], torch.arange(20))
    assert ivf.serialize() is not None  # the CPU index is still what is saved


def test_an_index_the_gpu_cannot_hold_raises_in_strict_mode_and_falls_back_in_auto(monkeypatch) -> None:
    _FakeGpuFaiss(fail_ivf=True).install(monkeypatch)
    f, _ = _feats(n=4000, seed=5)
    with pytest.raises(FaissDeviceError, match="could not move to the GPU.*device='auto'"):
        BankIndex(f["a"], "l2", kind="ivf_flat", device="cuda")
    auto = BankIndex(f["a"], "l2", kind="ivf_flat", device="auto")
    assert auto.device_used == "cpu" and "searching on the CPU" in auto.notes[0]
    assert np.array_equal(auto.search(f["a"][:5], 3)[1][:, 0].numpy(), np.arange(5))


def test_one_leave_one_out_search_per_shared_index_and_one_search_per_repeated_query(monkeypatch) -> None:
    calls = []
    real = BankIndex._search_all
    monkeypatch.setattr(
        BankIndex, "_search_all", lambda self, q, k: (calls.append(int(q.shape[0])), real(self, q, k))[1]
    )
    f, y = _feats(seed=6)
    rank = KNNRank(["a", "b"], k=5).fit_features(f, y)
    assert calls == [600]  # the bank against itself, once for both parts
    cons = KNNConsistency(["a", "b"], k=5).fit_features(f, y)
    calls.clear()
    q = {k: v[:30] * 1.5 for k, v in f.items()}
    logits = torch.nn.functional.one_hot(y[:30], 5).float()
    r = rank.score_features(q, logits)
    c = cons.score_features(q, logits)
    assert calls == [30]  # four searches asked for, one made
    # the remembered answer is the answer: the same scores from detectors that share nothing
    alone_r = KNNRank("a", k=5, nprobe=7).fit_features({"a": f["a"]}, y)
    assert torch.allclose(r, alone_r.score_features({"a": q["a"]}, logits))
    assert torch.allclose(
        c, KNNConsistency(["a"], k=5, nprobe=7).fit_features({"a": f["a"]}, y).score_features({"a": q["a"]}, logits)
    )


def test_builders_fed_the_same_features_hold_one_copy_while_streaming() -> None:
    from guard.detectors.knn import BankBuilder

    f, y = _feats(n=300, seed=7)
    one, two = BankBuilder(["a", "b"], "cosine", "x"), BankBuilder(["a", "c"], "cosine", "y")
    for i in range(0, 300, 100):
        batch = {k: v[i : i + 100] for k, v in f.items()}
        one.add(batch, y[i : i + 100])
        two.add({k: v.clone() for k, v in batch.items()}, y[i : i + 100])  # equal values, other tensors
    assert all(ca is cb for ca, cb in zip(one.chunks["a"], one.chunks["b"]))  # equal layers: the same chunks
    assert all(ca is cb for ca, cb in zip(one.chunks["a"], two.chunks["a"]))  # equal detectors' chunks: the same
    banks_one, _ = one.finish(5)
    banks_two, _ = two.finish(5)
    assert banks_one["a"] is banks_one["b"] is banks_two["a"]
    assert banks_two["c"] is not banks_one["a"]
    torch.testing.assert_close(banks_one["a"], torch.nn.functional.normalize(f["a"], dim=1))


def test_capped_builders_share_the_pending_rows_and_the_sample() -> None:
    """With ``max_per_class`` the rows waiting for the next compaction are pooled too, and two
    builders' equal samples finish as one tensor (equal to the one-shot capped sample)."""
    from guard.detectors.knn import BankBuilder

    f, y = _feats(n=300, seed=8)
    one = BankBuilder(["a", "b"], "cosine", "x", max_per_class=20, seed=3)
    two = BankBuilder(["a"], "cosine", "y", max_per_class=20, seed=3)
    whole = BankBuilder(["a"], "cosine", "z", max_per_class=20, seed=3)
    whole.add({"a": f["a"].clone()}, y)
    for i in range(0, 300, 100):
        batch = {k: v[i : i + 100] for k, v in f.items()}
        one.add(batch, y[i : i + 100])
        two.add({"a": batch["a"].clone()}, y[i : i + 100])
    pending_one = one.sampler._parts[-1][3]
    pending_two = two.sampler._parts[-1][3]
    assert pending_one["a"] is pending_two["a"]  # the same pooled chunk, not a copy per builder
    banks_one, lab_one = one.finish(5)
    banks_two, lab_two = two.finish(5)
    banks_whole, lab_whole = whole.finish(5)
    assert banks_one["a"] is banks_two["a"]
    assert torch.equal(lab_one, lab_two) and int(torch.bincount(lab_one).max()) <= 20
    torch.testing.assert_close(banks_one["a"], banks_whole["a"])
    assert torch.equal(lab_one, lab_whole)
