"""The kNN bank policy for large banks (issue 15): IVF-Flat / IVF-PQ recall, saved indexes, parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from guard.detectors import KNNConsistency, KNNRank
from guard.detectors.knn import LARGE_BANK_INDEX, BankIndex, ivf_nlist, pq_subquantizers


def _clustered(n: int, d: int, seed: int) -> torch.Tensor:
    """Unit rows around 50 fixed centres (a bank with neighbourhood structure, like class features)."""
    centres = torch.randn(50, d, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(seed)
    return F.normalize(centres[torch.randint(0, 50, (n,), generator=g)] + 0.6 * torch.randn(n, d, generator=g), dim=1)


def _recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, truth)) / truth.numel()


@pytest.fixture(scope="module")
def bank():
    b, q = _clustered(20_000, 64, 0), _clustered(300, 64, 1)
    _, truth = BankIndex(b, "cosine", kind="flat").search(q, 10)
    return b, q, truth


@pytest.mark.parametrize("kind, floor", [("ivf_flat", 0.90), ("ivf_pq", 0.90)])
def test_ivf_recall_at_10_above_its_floor(bank, kind: str, floor: float, one_thread) -> None:
    b, q, truth = bank
    index = BankIndex(b, "cosine", kind=kind, ivf_min_bank=0)  # the defaults: nprobe 16, re-rank 10 k
    assert index.approximate and index.index.nlist == ivf_nlist(20_000)
    r = _recall(index.search(q, 10)[1], truth)
    assert r >= floor, f"{kind} recall@10 {r:.3f} below its floor {floor}"
    # exact distances come back for what is found (IVF-PQ re-ranks from the bank itself)
    d, i = index.search(q[:5], 10)
    torch.testing.assert_close(d, (1 - (q[:5, None, :] * b[i]).sum(-1)).clamp_min(0), atol=1e-5, rtol=1e-4)


def test_pq_without_rerank_is_worse_and_more_probes_help(bank, one_thread) -> None:
    b, q, truth = bank
    index = BankIndex(b, "cosine", kind="ivf_pq", ivf_min_bank=0, nprobe=2, rerank=1)
    low = _recall(index.search(q, 10)[1], truth)
    index.index.nprobe, index.rerank = 32, 4
    high = _recall(index.search(q, 10)[1], truth)
    assert low < high - 0.1


def test_auto_policy_switches_at_ivf_min_bank_and_saved_index_loads_as_trained(tmp_path, one_thread) -> None:
    b = _clustered(12_000, 32, 2)
    y = torch.arange(12_000) % 50
    small = KNNRank("f", k=5, ivf_min_bank=20_000).fit_features({"f": b}, y)
    assert small._index.kind == "flat"
    assert (
        KNNRank("f", k=5, ivf_min_bank=10_000).fit_features({"f": b}, y)._index.kind == LARGE_BANK_INDEX == "ivf_flat"
    )
    big = KNNRank("f", k=5, ivf_min_bank=10_000, index="ivf_pq").fit_features({"f": b}, y)
    assert big._index.kind == "ivf_pq" and big._index.index.pq.M == pq_subquantizers(32) == 8
    assert "faiss_index_" in big.state_tensors() and big.state_tensors()["faiss_index_"].dtype == torch.uint8
    big.save(tmp_path / "knn.safetensors")
    back = KNNRank.load(tmp_path / "knn.safetensors")
    assert back._index.kind == "ivf_pq"
    q = _clustered(200, 32, 3)
    logits = F.one_hot(torch.arange(200) % 50, 50).float()
    assert torch.equal(back.score_features({"f": q}, logits), big.score_features({"f": q}, logits))
    both = KNNConsistency(["f"], k=5, ivf_min_bank=10_000, index="ivf_flat").fit_features({"f": b}, y)
    both.save(tmp_path / "kc.safetensors")
    kc = KNNConsistency.load(tmp_path / "kc.safetensors")
    assert kc._indexes["f"].kind == "ivf_flat"
    assert torch.equal(kc.score_features({"f": q}, logits), both.score_features({"f": q}, logits))


def test_saved_index_must_match_its_bank() -> None:
    b = _clustered(12_000, 32, 2)
    saved = BankIndex(b, "cosine", kind="ivf_flat", ivf_min_bank=0).serialize()
    with pytest.raises(ValueError, match="holds 12000 rows"):
        BankIndex(b[:11_000], "cosine", kind="ivf_flat", serialized=saved)


def test_bank_parameters_are_checked() -> None:
    x, y = _clustered(100, 8, 0), torch.arange(100) % 2
    with pytest.raises(ValueError, match="'index' parameter of KNNRank"):
        KNNRank("f", index="hnsw").fit_features({"f": x}, y)
    with pytest.raises(ValueError, match="max_per_class"):
        KNNRank("f", k=10, max_per_class=5).fit_features({"f": x}, y)
    with pytest.raises(ValueError, match="'index' parameter of KNNConsistency"):
        KNNConsistency(["f"], index="hnsw").fit_features({"f": x}, y)
    with pytest.raises(ValueError, match="kind must be one of"):
        BankIndex(x, "cosine", kind="lsh")
