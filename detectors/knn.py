"""kNN rank detector (FAISS) and multi-layer kNN label consistency (Deep k-NN).

``KNNRank``: the mean distance of an input's features to its k nearest clean training
features, turned into Sabour et al.'s rank among the training points of the predicted class
("Adversarial Manipulation of Deep Representations", ICLR 2016, Sec. 4: a feature adversary is
an inlier by this rank at the attacked layer). ``KNNConsistency``: the share of the k nearest
neighbours, over several layers, whose label disagrees with the prediction (Papernot &
McDaniel, "Deep k-Nearest Neighbors", 2018): a feature adversary imitates the guide at one
layer but not at the others.

Nearest neighbours come from FAISS at serving time (:class:`BankIndex`, in
:mod:`guard.detectors.bank_index`: exact ``faiss.knn`` inner products on L2-normalised rows for
the cosine metric, L2 for Euclidean, reading the bank in place; an ``IndexIVFFlat``
with ``nprobe=16`` of ``4 sqrt(M)`` lists when the bank has at least ``ivf_min_bank`` rows,
stated recall@10 >= 0.95 against exact search: 0.955 on a 1M x 512 bank of real-shaped
features (91x scikit-learn's brute-force queries/s), 0.935 to 0.961 on 8,000-row banks of real
CIFAR-10 features, BENCHMARKS.md "Production scale (issue 15)"; IVF-PQ on request, a tenth of
the memory but 0.66 recall there).
The bank is built batch by batch (:class:`BankBuilder`) and may be capped per class; detectors
over an equal bank share one tensor and one index; the search runs on the GPU when FAISS has
one (``device``). The exported graph searches the same bank exactly with
MatMul + TopK (:func:`torch_knn`); both then go through the same torch functions
(:func:`sabour_rank`, :func:`label_disagreement`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from guard.core.validation import check_int, check_labels
from guard.detectors.bank_index import (
    INDEX_KINDS,
    LARGE_BANK_INDEX,
    SEARCH_DEVICES,
    BankIndex,
    FaissDeviceError,
    build_index,
    cat_shared,
    exact_distances,
    ivf_nlist,
    knn_search,
    pq_subquantizers,
    shared_bank,
    shared_index,
)
from guard.detectors.base import Batch, FeatureDetector, as_feature_dict, scoring_inputs

__all__ = [
    "KNNRank",
    "KNNConsistency",
    "BankIndex",
    "BankBuilder",
    "FaissDeviceError",
    "build_index",
    "knn_search",
    "exact_distances",
    "ivf_nlist",
    "pq_subquantizers",
    "INDEX_KINDS",
    "LARGE_BANK_INDEX",
    "SEARCH_DEVICES",
    "torch_knn",
    "sabour_rank",
    "label_disagreement",
]

_METRICS = ("cosine", "l2")


def _prep(x: torch.Tensor, metric: str) -> torch.Tensor:
    x = x.detach().float().cpu()
    return F.normalize(x, dim=1) if metric == "cosine" else x


def torch_knn(
    feats: torch.Tensor, bank_t: torch.Tensor, bank_sqnorm: torch.Tensor, k: int, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact kNN in torch ops (MatMul + TopK), as FAISS's flat indexes: (N, k) distances ascending, indices.

    ``bank_t`` is the (D, M) transposed bank (rows L2-normalised for cosine).
    """
    q = feats.flatten(1).float()
    if metric == "cosine":
        sims, idx = torch.topk(F.normalize(q, dim=1) @ bank_t, k, dim=1, largest=True, sorted=True)
        return (1.0 - sims).clamp_min(0.0), idx
    d = (q * q).sum(1, keepdim=True) - 2.0 * (q @ bank_t) + bank_sqnorm
    dist, idx = torch.topk(d, k, dim=1, largest=False, sorted=True)
    return dist.clamp_min(0.0).sqrt(), idx


def sabour_rank(
    d: torch.Tensor,
    pred: torch.Tensor,
    ref: torch.Tensor,
    counts: torch.Tensor,
    top: torch.Tensor,
    spread: torch.Tensor,
) -> torch.Tensor:
    """Sabour's rank of mean kNN distances ``d`` (N,) within the predicted classes ``pred`` (N,).

    ``rank = #(ref_c <= d) / count_c + relu(d - top_c) / spread_c``: the share of class c's
    training points (leave-one-out scores ``ref`` (C, M), +inf padded) that are at least as
    close to their neighbours, extended linearly beyond the largest so that far outliers are
    not tied. A prediction outside the bank's classes (a reject class) uses the last class.
    """
    c = pred.long().clamp(0, ref.shape[0] - 1)
    below = (ref[c] <= d[:, None]).to(d.dtype).sum(1) / counts[c]
    return below + (d - top[c]).clamp_min(0.0) / spread[c]


def label_disagreement(neighbour_labels: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Share (N,) of the neighbours' labels (N, k) that differ from the prediction (N,)."""
    return (neighbour_labels != pred.long()[:, None]).to(torch.float32).mean(1)


def _check_bank(feats: torch.Tensor, labels: torch.Tensor, k: int, owner: str) -> torch.Tensor:
    if feats.shape[0] == 0:
        raise ValueError(
            f"{owner}: the feature bank is empty; fit needs at least k + 1 = {k + 1} clean examples, got 0."
        )
    if feats.shape[0] <= k:
        raise ValueError(f"{owner}: the feature bank needs more than k = {k} examples; got {feats.shape[0]}.")
    return check_labels(labels, "labels", n=int(feats.shape[0])).cpu()


def _check_width(f: torch.Tensor, d: int, layer: str, owner: str) -> None:
    if f.shape[1] != d:
        raise ValueError(
            f"{owner}: features of layer {layer!r} must have width {d} (as fitted); got {f.shape[1]} (shape {tuple(f.shape)})."
        )


def _check_device(device: str, owner: str) -> None:
    if device not in SEARCH_DEVICES:
        raise ValueError(f"The 'device' parameter of {owner} must be one of {SEARCH_DEVICES}. Got {device!r}.")


def _check_metric(metric: str, owner: str) -> None:
    if metric not in _METRICS:
        raise ValueError(f"The 'metric' parameter of {owner} must be one of {_METRICS}. Got {metric!r}.")


class BankBuilder:
    """A feature bank built batch by batch: the rows of each layer (normalised for cosine) and their labels.

    Without a cap every row is kept (the bank is what the detector must hold anyway), each
    batch's rows pooled (:func:`~guard.detectors.bank_index.shared_bank`): builders of two
    detectors fed the same features, or two layers with equal features, hold one copy, and
    their finished banks are one tensor (:func:`~guard.detectors.bank_index.cat_shared`); with
    ``max_per_class`` each class keeps at most that many rows, a seeded uniform sample of the
    class (:class:`guard.core.sampling.BottomK`: the same rows whatever the batching), so the
    memory is bounded by ``C * max_per_class`` rows plus a batch. Checked as the one-shot fit
    checks (:class:`guard.detectors.base.FeatureStream`).
    """

    def __init__(
        self, layers: list[str], metric: str, owner: str, *, max_per_class: int | None = None, seed: int = 0
    ) -> None:
        from guard.core.sampling import BottomK
        from guard.detectors.base import FeatureStream

        self.layers, self.metric, self.owner = list(layers), metric, owner
        self.check = FeatureStream(self.layers, owner)
        self.sampler = None if max_per_class is None else BottomK(max_per_class, seed=seed, per_class=True)
        self.chunks: dict[str, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        self.labels: list[torch.Tensor] = []

    def add(self, feats: Any, labels: Any) -> None:
        fd, labels = self.check.add(feats, labels)
        # pooled: an equal chunk of another layer or detector is held once (capped or not)
        prepped = {layer: shared_bank(_prep(f, self.metric).contiguous()) for layer, f in fd.items()}
        if self.sampler is not None:
            self.sampler.add(prepped, labels)
            return
        for layer, f in prepped.items():
            self.chunks[layer].append(f)
        self.labels.append(labels)

    def finish(self, k: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(banks {layer: (M, D)}, labels (M,)); raises as the one-shot fit does on a bank of <= k rows."""
        self.check.finish()
        if self.sampler is not None:
            banks, labels, _ = self.sampler.result()
            banks = {layer: shared_bank(b) for layer, b in banks.items()}  # two builders' equal samples: one tensor
        else:
            banks = {layer: cat_shared(c) for layer, c in self.chunks.items()}
            labels = torch.cat(self.labels)
            self.chunks, self.labels = {}, []
        labels = _check_bank(next(iter(banks.values())), labels, k, self.owner)
        return {layer: banks[layer].contiguous() for layer in self.layers}, labels.long().contiguous()


class _BankTensors(nn.Module):
    """A bank as the graph stores it: transposed once (D, M), with its rows' squared norms."""

    def __init__(self, bank: torch.Tensor) -> None:
        super().__init__()
        bank = bank.detach().float()
        self.register_buffer("bank_t", bank.t().contiguous())
        self.register_buffer("sqnorm", (bank * bank).sum(1))


#: id(bank) -> (weak bank, weak _BankTensors): heads built from the same bank tensor (the pooled
#: bank of two detectors, or of two layers with equal features) share one module, so the graph
#: holds one initializer instead of one per head (a 100k x 2048 bank is 0.8 GB).
_GRAPH_BANKS: dict[int, tuple[Any, Any]] = {}


def _bank_tensors(bank: torch.Tensor) -> _BankTensors:
    import weakref

    for key in [k for k, (b, m) in _GRAPH_BANKS.items() if b() is None or m() is None]:
        del _GRAPH_BANKS[key]
    hit = _GRAPH_BANKS.get(id(bank))
    if hit is not None and hit[0]() is bank and hit[1]() is not None:
        return hit[1]()
    mod = _BankTensors(bank)
    _GRAPH_BANKS[id(bank)] = (weakref.ref(bank), weakref.ref(mod))
    return mod


class _Bank(nn.Module):
    """A stored feature bank for exact search in the graph (the tensors shared between heads)."""

    def __init__(self, bank: torch.Tensor, k: int, metric: str) -> None:
        super().__init__()
        self.k, self.metric = int(k), metric
        self.tensors = _bank_tensors(bank)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch_knn(feats, self.tensors.bank_t, self.tensors.sqnorm, self.k, self.metric)


class KNNRank(FeatureDetector):
    """Mean distance to the k nearest clean training features, as a rank within the predicted class.

    Args:
        layer: the layer whose pooled features are compared (e.g. "fc1"), or a list of layers:
            then one single-layer KNNRank per layer is fitted (``parts_``, dict layer ->
            KNNRank) and the score is the max of their ranks (an input must be an inlier at
            every layer).
        k: neighbours averaged.
        metric: "cosine" (default; features L2-normalised, FAISS inner product) or "l2".
        statistic: "rank" (Sabour's rank of the kNN distance among the training points of the
            predicted class, in [0, 1], extended linearly beyond the largest) or "distance".
        ivf_min_bank: banks with at least this many rows use an approximate index instead of exact search.
        nprobe: IVF lists visited per query.
        index: "auto" (exact below ``ivf_min_bank``, then :data:`LARGE_BANK_INDEX`), "flat",
            "ivf_flat" or "ivf_pq" (:class:`BankIndex`).
        rerank: an IVF-PQ search re-ranks ``rerank * k`` candidates exactly.
        max_per_class: keep at most this many clean rows per class (a seeded uniform sample of
            each class: stratified), or None for all.
        seed: seeds that sample and the IVF training sample.
        device: where FAISS searches: "auto" (the GPU when FAISS sees one, else the CPU),
            "cpu", or "cuda" (raises :class:`FaissDeviceError` without a GPU build and device).

    Detectors over an equal bank with the same settings share one bank tensor and one index
    (:func:`~guard.detectors.bank_index.shared_index`).

    Fitted state: ``bank_`` (M, D) (unit rows for cosine), ``bank_labels_`` (M,),
    ``class_ref_scores_`` (C, Mmax) sorted leave-one-out mean kNN distances per class (+inf
    padded), ``class_counts_`` (C,), ``class_spread_`` (C,); with several layers, ``parts_``
    (saved as tensors named "<layer>/bank_", ...).
    """

    name: ClassVar[str] = "knn"
    _tensor_attrs = ("bank_", "bank_labels_", "class_ref_scores_", "class_counts_", "class_spread_")

    def __init__(
        self,
        layer: str | Sequence[str] = "fc1",
        *,
        k: int = 10,
        metric: str = "cosine",
        statistic: str = "rank",
        ivf_min_bank: int = 200_000,
        nprobe: int = 16,
        index: str = "auto",
        rerank: int = 10,
        max_per_class: int | None = None,
        seed: int = 0,
        device: str = "auto",
    ) -> None:
        self.layer = layer if isinstance(layer, str) else list(layer)
        self.k = k
        self.metric = metric
        self.statistic = statistic
        self.ivf_min_bank = ivf_min_bank
        self.nprobe = nprobe
        self.index = index
        self.rerank = rerank
        self.max_per_class = max_per_class
        self.seed = seed
        self.device = device

    @classmethod
    def default(cls, layers: list[str]) -> KNNRank:
        """The max of the ranks at the last two layers (the head's input and the stage before it)."""
        return cls(layers[-2:] if len(layers) >= 2 else layers[-1])

    @property
    def feature_layers(self) -> list[str]:
        return [self.layer] if isinstance(self.layer, str) else list(self.layer)

    @property
    def multi(self) -> bool:
        return not isinstance(self.layer, str)

    def _part(self, layer: str) -> KNNRank:
        params = self.get_params()
        params.pop("layer")
        return KNNRank(layer, **params)

    def _index_for(self, bank: torch.Tensor, serialized: torch.Tensor | None = None) -> BankIndex:
        """The pooled index over ``bank`` (:func:`~guard.detectors.bank_index.shared_index`); ``bank_`` becomes its bank."""
        index = shared_index(
            bank,
            self.metric,
            kind=self.index,
            ivf_min_bank=self.ivf_min_bank,
            nprobe=self.nprobe,
            rerank=self.rerank,
            seed=self.seed,
            device=self.device,
            serialized=serialized,
        )
        self.bank_ = index.bank
        return index

    @property
    def parts(self) -> list[KNNRank]:
        self._check_fitted()
        return list(self.parts_.values()) if self.multi else [self]

    @property
    def is_fitted(self) -> bool:
        if self.multi:
            return hasattr(self, "fitted_") and hasattr(self, "parts_")
        return super().is_fitted

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if not self.multi:
            out = super().state_tensors()
            saved = self._index.serialize()
            if saved is not None:  # a trained IVF index loads as it was, without training again
                out["faiss_index_"] = saved
            return out
        self._check_fitted()
        return {f"{layer}/{k}": v for layer, part in self.parts_.items() for k, v in part.state_tensors().items()}

    def _validate_params(self) -> None:
        owner = type(self).__name__
        if not isinstance(self.layer, str) and not (self.layer and all(isinstance(v, str) for v in self.layer)):
            raise TypeError(
                f"The 'layer' parameter of {owner} must be a str module path or a non-empty list of them. Got {self.layer!r}."
            )
        check_int(self.k, "k", owner, low=1)
        check_int(self.ivf_min_bank, "ivf_min_bank", owner, low=1)
        check_int(self.nprobe, "nprobe", owner, low=1)
        check_int(self.rerank, "rerank", owner, low=1)
        check_int(self.seed, "seed", owner, low=0)
        if self.max_per_class is not None:
            check_int(self.max_per_class, "max_per_class", owner, low=self.k + 1)
        if self.index not in INDEX_KINDS:
            raise ValueError(f"The 'index' parameter of {owner} must be one of {INDEX_KINDS}. Got {self.index!r}.")
        _check_device(self.device, owner)
        _check_metric(self.metric, owner)
        if self.statistic not in ("rank", "distance"):
            raise ValueError(
                f"The 'statistic' parameter of {owner} must be 'rank' or 'distance'. Got {self.statistic!r}."
            )

    def fit_features(self, feats: Any, labels: torch.Tensor) -> KNNRank:
        """Build the bank from clean features and the per-class leave-one-out reference scores."""
        self.__dict__.pop("_stream_fit", None)
        return self.partial_fit_features(feats, labels).finish_fit()

    def partial_fit_features(self, feats: Any, labels: torch.Tensor) -> KNNRank:
        """Add one batch of clean features to the bank (a streaming fit; :meth:`finish_fit` ends it)."""
        if "_stream_fit" not in self.__dict__:
            self._validate_params()
            self._stream_fit = BankBuilder(
                self.feature_layers, self.metric, type(self).__name__, max_per_class=self.max_per_class, seed=self.seed
            )
        self._stream_fit.add(feats, labels)
        return self

    def finish_fit(self) -> KNNRank:
        builder = self.__dict__.pop("_stream_fit", None)
        if builder is None:
            raise ValueError(
                f"{type(self).__name__}.finish_fit: no batch was given to partial_fit_features (an empty stream)."
            )
        banks, labels = builder.finish(self.k)
        if self.multi:
            self.parts_ = {layer: self._part(layer)._fit_bank(banks[layer], labels) for layer in self.layer}
        else:
            self._fit_bank(banks[self.layer], labels)
        self.fitted_ = True
        return self

    def _fit_bank(self, bank: torch.Tensor, labels: torch.Tensor) -> KNNRank:
        self.bank_labels_ = labels
        self._index = self._index_for(bank)
        # leave-one-out: search k + 1 and drop the point itself (the nearest, at distance 0)
        dist, _ = self._index.self_neighbours(self.k + 1)
        ref = dist[:, 1:].mean(1)
        n_classes = int(self.bank_labels_.max()) + 1
        counts = torch.bincount(self.bank_labels_, minlength=n_classes)
        table = torch.full((n_classes, int(counts.max())), float("inf"))
        spread = torch.ones(n_classes)
        for c in range(n_classes):
            rc, _ = torch.sort(ref[self.bank_labels_ == c])
            table[c, : rc.numel()] = rc
            if rc.numel():
                spread[c] = max(float(rc[-1] - rc[rc.numel() // 2]), 1e-6)
        self.class_ref_scores_ = table
        self.class_counts_ = counts.long()
        self.class_spread_ = spread.float()
        self.fitted_ = True
        return self

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().load_state(tensors, meta)
        if self.multi:
            self.parts_ = {}
            for layer in self.layer:
                part = self._part(layer)
                part.load_state(
                    {
                        a: tensors[f"{layer}/{a}"]
                        for a in self._tensor_attrs + ("faiss_index_",)
                        if f"{layer}/{a}" in tensors
                    },
                    {},
                )
                self.parts_[layer] = part
            return
        self._index = self._index_for(self.bank_, tensors.get("faiss_index_"))
        self.__dict__.pop("faiss_index_", None)

    def _rank_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        counts = self.class_counts_
        top = self.class_ref_scores_.gather(1, (counts - 1).clamp_min(0)[:, None]).squeeze(1)
        return self.class_ref_scores_, counts.clamp_min(1).float(), top, self.class_spread_

    def distances(self, feats: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances Tensor[N, k] and indices Tensor[N, k] of the k nearest bank rows (FAISS)."""
        self._check_fitted()
        f = as_feature_dict(feats, [self.layer], type(self).__name__)[self.layer]
        _check_width(f, int(self.bank_.shape[1]), self.layer, type(self).__name__)
        return self._index.search(_prep(f, self.metric), self.k)

    def layer_scores(self, feats: Any, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-layer scores {layer: Tensor[N]}."""
        out = {}
        pred = logits.argmax(1).cpu()
        for part in self.parts:
            d = part.distances(feats)[0].mean(1)
            out[part.layer] = d if self.statistic == "distance" else sabour_rank(d, pred, *part._rank_tables())
        return out

    def score_features(self, feats: Any, logits: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        scoring_inputs(feats, logits, self.feature_layers, type(self).__name__)
        return torch.stack(list(self.layer_scores(feats, logits).values()), 1).amax(1)

    def export_head(self) -> nn.Module:
        return _KNNRankHead(self)


class _KNNRankHead(nn.Module):
    """KNNRank in the graph: exact search of each part's bank, then the same :func:`sabour_rank`."""

    def __init__(self, det: KNNRank) -> None:
        super().__init__()
        parts = det.parts
        self.layers = [p.layer for p in parts]
        self.statistic = det.statistic
        # the rank counts reference distances <= d: a step function of ``distance``
        self.step_outputs = ("score",) if det.statistic == "rank" else ()
        self.banks = nn.ModuleList([_Bank(p.bank_, p.k, p.metric) for p in parts])
        for i, p in enumerate(parts):
            for name, t in zip(("ref", "counts", "top", "spread"), p._rank_tables()):
                self.register_buffer(f"{name}{i}", t.detach().float())

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        pred = batch.pred
        dists, scores = [], []
        for i, (layer, bank) in enumerate(zip(self.layers, self.banks)):
            d = bank(batch.features[layer])[0].mean(1)
            dists.append(d)
            if self.statistic == "distance":
                scores.append(d)
            else:
                tables = [getattr(self, f"{n}{i}") for n in ("ref", "counts", "top", "spread")]
                scores.append(sabour_rank(d, pred, *tables))
        return {"score": torch.stack(scores, 1).amax(1), "distance": torch.stack(dists, 1)}

    def surrogate(self, batch: Batch) -> torch.Tensor:
        """A differentiable stand-in for the rank (for adaptive attacks): each count ``ref <= d``
        becomes ``sigmoid((d - ref) / tau)``, tau a twentieth of the class's spread."""
        pred = batch.pred
        out = []
        for i, (layer, bank) in enumerate(zip(self.layers, self.banks)):
            d = bank(batch.features[layer])[0].mean(1)
            if self.statistic == "distance":
                out.append(d)
                continue
            ref, counts, top, spread = (getattr(self, f"{n}{i}") for n in ("ref", "counts", "top", "spread"))
            c = pred.clamp(0, ref.shape[0] - 1)
            tau = (spread[c] / 20.0)[:, None]
            r = ref[c]
            soft = torch.where(
                torch.isfinite(r), torch.sigmoid((d[:, None] - r.clamp(max=1e6)) / tau), torch.zeros_like(r)
            )
            out.append(soft.sum(1) / counts[c] + (d - top[c]).clamp_min(0.0) / spread[c])
        return torch.stack(out, 1).amax(1)


class KNNConsistency(FeatureDetector):
    """Multi-layer kNN label consistency (Deep k-NN): share of neighbours disagreeing with the prediction.

    Args:
        layers: the layers whose neighbours vote (e.g. ["conv1", "conv2", "fc1"]).
        k: neighbours per layer.
        metric: "cosine" or "l2".
        ivf_min_bank, nprobe, index, rerank, max_per_class, seed, device: as for :class:`KNNRank`.
    """

    name: ClassVar[str] = "knn_consistency"
    _tensor_attrs = ("bank_labels_",)

    def __init__(
        self,
        layers: Sequence[str] = ("conv1", "conv2", "fc1"),
        *,
        k: int = 10,
        metric: str = "cosine",
        ivf_min_bank: int = 200_000,
        nprobe: int = 16,
        index: str = "auto",
        rerank: int = 10,
        max_per_class: int | None = None,
        seed: int = 0,
        device: str = "auto",
    ) -> None:
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        self.k = k
        self.metric = metric
        self.ivf_min_bank = ivf_min_bank
        self.nprobe = nprobe
        self.index = index
        self.rerank = rerank
        self.max_per_class = max_per_class
        self.seed = seed
        self.device = device

    @classmethod
    def default(cls, layers: list[str]) -> KNNConsistency:
        """Neighbours' votes at the last two layers."""
        return cls(layers[-2:] if len(layers) >= 2 else layers)

    @property
    def feature_layers(self) -> list[str]:
        return list(self.layers)

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "fitted_") and hasattr(self, "bank_labels_")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        out = {"bank_labels_": self.bank_labels_, **{f"bank.{layer}": b for layer, b in self.banks_.items()}}
        for layer, index in self._indexes.items():
            saved = index.serialize()
            if saved is not None:
                out[f"faiss_index.{layer}"] = saved
        return out

    def fit_features(self, feats: Any, labels: torch.Tensor) -> KNNConsistency:
        self.__dict__.pop("_stream_fit", None)
        return self.partial_fit_features(feats, labels).finish_fit()

    def partial_fit_features(self, feats: Any, labels: torch.Tensor) -> KNNConsistency:
        """Add one batch of clean features to the banks (a streaming fit; :meth:`finish_fit` ends it)."""
        if "_stream_fit" not in self.__dict__:
            owner = type(self).__name__
            if not self.layers:
                raise ValueError(f"The 'layers' parameter of {owner} must name at least one layer. Got [].")
            check_int(self.k, "k", owner, low=1)
            check_int(self.rerank, "rerank", owner, low=1)
            if self.max_per_class is not None:
                check_int(self.max_per_class, "max_per_class", owner, low=self.k + 1)
            if self.index not in INDEX_KINDS:
                raise ValueError(f"The 'index' parameter of {owner} must be one of {INDEX_KINDS}. Got {self.index!r}.")
            _check_device(self.device, owner)
            _check_metric(self.metric, owner)
            self._stream_fit = BankBuilder(
                self.layers, self.metric, owner, max_per_class=self.max_per_class, seed=self.seed
            )
        self._stream_fit.add(feats, labels)
        return self

    def finish_fit(self) -> KNNConsistency:
        builder = self.__dict__.pop("_stream_fit", None)
        if builder is None:
            raise ValueError(
                f"{type(self).__name__}.finish_fit: no batch was given to partial_fit_features (an empty stream)."
            )
        self.banks_, self.bank_labels_ = builder.finish(self.k)
        self._build()
        self.fitted_ = True
        return self

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.bank_labels_ = tensors["bank_labels_"]
        self.banks_ = {layer: tensors[f"bank.{layer}"] for layer in self.layers}
        for k, v in meta.items():
            setattr(self, k, v)
        self._build(
            {layer: tensors[f"faiss_index.{layer}"] for layer in self.layers if f"faiss_index.{layer}" in tensors}
        )
        self.fitted_ = True

    def _build(self, serialized: dict[str, torch.Tensor] | None = None) -> None:
        serialized = serialized or {}
        self._indexes = {
            layer: shared_index(
                b,
                self.metric,
                kind=self.index,
                ivf_min_bank=self.ivf_min_bank,
                nprobe=self.nprobe,
                rerank=self.rerank,
                seed=self.seed,
                device=self.device,
                serialized=serialized.get(layer),
            )
            for layer, b in self.banks_.items()
        }
        self.banks_ = {layer: index.bank for layer, index in self._indexes.items()}  # the pooled tensors

    def disagreement(self, feats: Any, pred: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per layer, the share of the k neighbours whose label differs from ``pred``."""
        self._check_fitted()
        fd = as_feature_dict(feats, self.layers, type(self).__name__)
        out = {}
        for layer, f in fd.items():
            _check_width(f, int(self.banks_[layer].shape[1]), layer, type(self).__name__)
            _, idx = self._indexes[layer].search(_prep(f, self.metric), self.k)
            out[layer] = label_disagreement(self.bank_labels_[idx], pred.cpu())
        return out

    def score_features(self, feats: Any, logits: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        scoring_inputs(feats, logits, self.layers, type(self).__name__)
        return torch.stack(list(self.disagreement(feats, logits.argmax(1)).values()), 1).mean(1)

    def export_head(self) -> nn.Module:
        return _KNNConsistencyHead(self)


class _KNNConsistencyHead(nn.Module):
    """KNNConsistency in the graph: TopK indices of each layer's bank, then :func:`label_disagreement`.

    A tie in similarity may order indices differently than FAISS (a label can differ only
    between exactly equidistant rows).
    """

    def __init__(self, det: KNNConsistency) -> None:
        super().__init__()
        det._check_fitted()
        self.layers = list(det.layers)
        self.banks = nn.ModuleList([_Bank(det.banks_[layer], det.k, det.metric) for layer in self.layers])
        self.register_buffer("labels", det.bank_labels_.detach().long())

    def forward(self, batch: Batch) -> torch.Tensor:
        pred = batch.pred
        per = [
            label_disagreement(self.labels[bank(batch.features[layer])[1]], pred)
            for layer, bank in zip(self.layers, self.banks)
        ]
        return torch.stack(per, 1).mean(1)

    def surrogate(self, batch: Batch) -> torch.Tensor:
        """A differentiable stand-in (for adaptive attacks): a soft k-NN vote.

        The labels of the ``4 k`` nearest bank rows vote with softmax weights of their negative
        distances (temperature: a quarter of the spread of those distances), so moving towards
        rows of the predicted label lowers it. Over the ``k`` nearest alone, an input whose ``k``
        neighbours all agree or all disagree has a constant vote and no gradient (on a narrow
        demo LeNet: 6% of PGD images and 38% of clean ones; tests/test_surrogates.py checks that
        a step along this one lowers the real score).
        """
        pred = batch.pred
        per = []
        for layer, bank in zip(self.layers, self.banks):
            t = bank.tensors
            wide = min(4 * bank.k, int(t.bank_t.shape[1]))
            dist, idx = torch_knn(batch.features[layer], t.bank_t, t.sqnorm, wide, bank.metric)
            temp = (dist[:, -1:] - dist[:, :1]).detach().clamp_min(1e-6) / 4.0
            w = torch.softmax(-(dist - dist[:, :1].detach()) / temp, 1)
            per.append((w * (self.labels[idx] != pred[:, None]).to(w.dtype)).sum(1))
        return torch.stack(per, 1).mean(1)
