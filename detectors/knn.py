"""kNN rank detector (FAISS) and multi-layer kNN label consistency (Deep k-NN).

``KNNRank``: the mean distance of an input's features to its k nearest clean training
features, turned into Sabour et al.'s rank among the training points of the predicted class
("Adversarial Manipulation of Deep Representations", ICLR 2016, Sec. 4: a feature adversary is
an inlier by this rank at the attacked layer). ``KNNConsistency``: the share of the k nearest
neighbours, over several layers, whose label disagrees with the prediction (Papernot &
McDaniel, "Deep k-Nearest Neighbors", 2018): a feature adversary imitates the guide at one
layer but not at the others.

Nearest neighbours come from FAISS (exact ``IndexFlatIP`` on L2-normalised rows for the cosine
metric, ``IndexFlatL2`` for Euclidean; an ``IndexIVFFlat`` when the bank is larger than
``ivf_min_bank`` rows).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from guard.detectors.base import FeatureDetector, as_feature_dict
from guard.core.validation import check_int, check_labels

__all__ = ["KNNRank", "KNNConsistency", "build_index", "knn_search"]

_METRICS = ("cosine", "l2")


def _prep(x: torch.Tensor, metric: str) -> torch.Tensor:
    x = x.detach().float().cpu()
    return torch.nn.functional.normalize(x, dim=1) if metric == "cosine" else x


def build_index(bank: torch.Tensor, metric: str, *, ivf_min_bank: int = 200_000, nprobe: int = 16, seed: int = 0) -> Any:
    """A FAISS index over ``bank`` rows (already normalised for cosine).

    Exact flat search up to ``ivf_min_bank`` rows; above that an IVF index with
    ``4 * sqrt(M)`` lists (FAISS's rule of thumb; at most M / 39), trained on at most 64 points per list.
    """
    import faiss

    d = int(bank.shape[1])
    data = np.ascontiguousarray(bank.numpy(), dtype=np.float32)
    flat = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
    if bank.shape[0] < ivf_min_bank:
        flat.add(data)
        return flat
    nlist = max(1, min(int(4 * math.sqrt(bank.shape[0])), bank.shape[0] // 39))  # FAISS wants >= 39 points per list
    mt = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    index = faiss.IndexIVFFlat(flat, d, nlist, mt)
    rng = np.random.default_rng(seed)
    n_train = min(bank.shape[0], 64 * nlist)
    index.train(data[rng.choice(bank.shape[0], n_train, replace=False)])
    index.add(data)
    index.nprobe = nprobe  # (faiss's python wrapper keeps the quantizer alive with the index)
    return index


def knn_search(index: Any, queries: torch.Tensor, k: int, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances Tensor[N, k] (cosine: ``1 - cos``; l2: Euclidean) and indices Tensor[N, k]."""
    q = np.ascontiguousarray(queries.numpy(), dtype=np.float32)
    sims, idx = index.search(q, k)
    sims_t = torch.from_numpy(sims)
    if metric == "cosine":
        dist = (1.0 - sims_t).clamp_min(0.0)
    else:
        dist = sims_t.clamp_min(0.0).sqrt()
    return dist, torch.from_numpy(idx).long()


def _check_bank(feats: torch.Tensor, labels: torch.Tensor, k: int, owner: str) -> torch.Tensor:
    if feats.shape[0] == 0:
        raise ValueError(f"{owner}: the feature bank is empty; fit needs at least k + 1 = {k + 1} clean examples, got 0.")
    if feats.shape[0] <= k:
        raise ValueError(f"{owner}: the feature bank needs more than k = {k} examples; got {feats.shape[0]}.")
    return check_labels(labels, "labels", n=int(feats.shape[0])).cpu()


def _check_width(f: torch.Tensor, d: int, layer: str, owner: str) -> None:
    if f.shape[1] != d:
        raise ValueError(f"{owner}: features of layer {layer!r} must have width {d} (as fitted); got {f.shape[1]} (shape {tuple(f.shape)}).")


class KNNRank(FeatureDetector):
    """Mean distance to the k nearest clean training features, as a rank within the predicted class.

    Args:
        layer: the layer whose flattened features are compared (module path, e.g. "fc1"), or a
            list of layers: then one single-layer KNNRank per layer is fitted (``parts_``,
            dict layer -> KNNRank) and the score is the max of their ranks (an input must be
            an inlier at every layer).
        k: neighbours averaged.
        metric: "cosine" (default; features L2-normalised, FAISS inner product) or "l2".
        score: "rank" (Sabour's rank of the kNN distance among the training points of the
            predicted class, in [0, 1], extended linearly beyond the largest) or "distance".
        ivf_min_bank: banks with at least this many rows use an IVF index instead of exact search.
        nprobe: IVF lists visited per query.
    """

    name: ClassVar[str] = "knn"
    _tensor_attrs = ("bank_", "bank_labels_", "class_ref_scores_", "class_counts_", "class_spread_")

    def __init__(self, layer: str | Sequence[str] = "fc1", *, k: int = 10, metric: str = "cosine", score: str = "rank",
                 ivf_min_bank: int = 200_000, nprobe: int = 16) -> None:
        self.layer = layer if isinstance(layer, str) else list(layer)
        self.k = k
        self.metric = metric
        self.score_kind = score
        self.ivf_min_bank = ivf_min_bank
        self.nprobe = nprobe

    def get_params(self) -> dict[str, Any]:
        return {"layer": self.layer, "k": self.k, "metric": self.metric, "score": self.score_kind,
                "ivf_min_bank": self.ivf_min_bank, "nprobe": self.nprobe}

    @property
    def feature_layers(self) -> list[str]:
        return [self.layer] if isinstance(self.layer, str) else list(self.layer)

    @property
    def multi(self) -> bool:
        return not isinstance(self.layer, str)

    def _part(self, layer: str) -> "KNNRank":
        return KNNRank(layer, k=self.k, metric=self.metric, score=self.score_kind,
                       ivf_min_bank=self.ivf_min_bank, nprobe=self.nprobe)

    @property
    def is_fitted(self) -> bool:
        if self.multi:
            return hasattr(self, "fitted_") and hasattr(self, "parts_")
        return super().is_fitted

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if not self.multi:
            return super().state_tensors()
        self._check_fitted()
        return {f"{layer}/{k}": v for layer, part in self.parts_.items() for k, v in part.state_tensors().items()}

    def _validate_params(self) -> None:
        owner = type(self).__name__
        if not isinstance(self.layer, str) and not (self.layer and all(isinstance(v, str) for v in self.layer)):
            raise TypeError(f"The 'layer' parameter of {owner} must be a str module path or a non-empty list of them. Got {self.layer!r}.")
        check_int(self.k, "k", owner, low=1)
        check_int(self.ivf_min_bank, "ivf_min_bank", owner, low=1)
        check_int(self.nprobe, "nprobe", owner, low=1)
        if self.metric not in _METRICS:
            raise ValueError(f"The 'metric' parameter of {owner} must be one of {_METRICS}. Got {self.metric!r}.")
        if self.score_kind not in ("rank", "distance"):
            raise ValueError(f"The 'score' parameter of {owner} must be 'rank' or 'distance'. Got {self.score_kind!r}.")

    def fit_features(self, feats: Any, labels: torch.Tensor) -> "KNNRank":
        """Build the bank from clean features and the per-class leave-one-out reference scores."""
        self._validate_params()
        if self.multi:
            self.parts_ = {layer: self._part(layer).fit_features(feats, labels) for layer in self.layer}
            self.fitted_ = True
            return self
        f = as_feature_dict(feats, [self.layer], type(self).__name__)[self.layer]
        labels = _check_bank(f, labels, self.k, type(self).__name__)
        self.bank_ = _prep(f, self.metric).contiguous()
        self.bank_labels_ = labels.long().contiguous()
        self._index = build_index(self.bank_, self.metric, ivf_min_bank=self.ivf_min_bank, nprobe=self.nprobe)
        # leave-one-out: search k + 1 and drop the point itself (the nearest, at distance 0)
        dist, _ = knn_search(self._index, self.bank_, self.k + 1, self.metric)
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

    def _after_load(self) -> None:
        if self.multi:
            self.parts_ = {}
            for layer in self.layer:
                part = self._part(layer)
                for a in self._tensor_attrs:
                    setattr(part, a, getattr(self, f"{layer}/{a}"))
                part.fitted_ = True
                part._after_load()
                self.parts_[layer] = part
            return
        self._index = build_index(self.bank_, self.metric, ivf_min_bank=self.ivf_min_bank, nprobe=self.nprobe)

    def distances(self, feats: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances Tensor[N, k] and indices Tensor[N, k] of the k nearest bank rows."""
        self._check_fitted()
        f = as_feature_dict(feats, [self.layer], type(self).__name__)[self.layer]
        _check_width(f, int(self.bank_.shape[1]), self.layer, type(self).__name__)
        return knn_search(self._index, _prep(f, self.metric), self.k, self.metric)

    def rank(self, dist: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Sabour's rank of mean kNN distances ``dist`` [N] within classes ``pred`` [N]."""
        n_classes = self.class_ref_scores_.shape[0]
        pred = pred.long().cpu().clamp(0, n_classes - 1)
        ref = self.class_ref_scores_[pred]  # [N, Mmax], +inf padded
        counts = self.class_counts_[pred].clamp_min(1).float()
        below = (ref <= dist[:, None]).sum(1).float() / counts
        top = ref.gather(1, (self.class_counts_[pred] - 1).clamp_min(0)[:, None]).squeeze(1)
        return below + (dist - top).clamp_min(0.0) / self.class_spread_[pred]

    def layer_scores(self, feats: Any, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-layer scores {layer: Tensor[N]}."""
        self._check_fitted()
        if self.multi:
            return {layer: part.score_features(feats, logits) for layer, part in self.parts_.items()}
        return {self.layer: self.score_features(feats, logits)}

    def score_features(self, feats: Any, logits: torch.Tensor) -> torch.Tensor:
        if self.multi:
            return torch.stack(list(self.layer_scores(feats, logits).values()), 1).max(1).values
        dist, _ = self.distances(feats)
        d = dist.mean(1)
        if self.score_kind == "distance":
            return d
        return self.rank(d, logits.argmax(1))


class KNNConsistency(FeatureDetector):
    """Multi-layer kNN label consistency (Deep k-NN): share of neighbours disagreeing with the prediction.

    Args:
        layers: the layers whose neighbours vote (e.g. ["conv1", "conv2", "fc1"]).
        k: neighbours per layer.
        metric: "cosine" or "l2".
        ivf_min_bank, nprobe: as for :class:`KNNRank`.
    """

    name: ClassVar[str] = "knn_consistency"
    _tensor_attrs = ("bank_labels_",)

    def __init__(self, layers: Sequence[str] = ("conv1", "conv2", "fc1"), *, k: int = 10, metric: str = "cosine",
                 ivf_min_bank: int = 200_000, nprobe: int = 16) -> None:
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        self.k = k
        self.metric = metric
        self.ivf_min_bank = ivf_min_bank
        self.nprobe = nprobe

    @property
    def feature_layers(self) -> list[str]:
        return list(self.layers)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        out = {"bank_labels_": self.bank_labels_}
        out.update({f"bank.{layer}": b for layer, b in self.banks_.items()})
        return out

    def fit_features(self, feats: Any, labels: torch.Tensor) -> "KNNConsistency":
        owner = type(self).__name__
        if not self.layers:
            raise ValueError(f"The 'layers' parameter of {owner} must name at least one layer. Got [].")
        check_int(self.k, "k", owner, low=1)
        if self.metric not in _METRICS:
            raise ValueError(f"The 'metric' parameter of {owner} must be one of {_METRICS}. Got {self.metric!r}.")
        fd = as_feature_dict(feats, self.layers, owner)
        n = {layer: f.shape[0] for layer, f in fd.items()}
        if len(set(n.values())) != 1:
            raise ValueError(f"{owner}: every layer must have the same number of rows; got {n}.")
        labels = _check_bank(next(iter(fd.values())), labels, self.k, owner)
        self.bank_labels_ = labels.long().contiguous()
        self.banks_ = {layer: _prep(f, self.metric).contiguous() for layer, f in fd.items()}
        self._after_load()
        self.fitted_ = True
        return self

    def _after_load(self) -> None:
        if not hasattr(self, "banks_"):  # loaded from a file: tensors came as "bank.<layer>"
            self.banks_ = {layer: getattr(self, f"bank.{layer}") for layer in self.layers}
        self._indexes = {layer: build_index(b, self.metric, ivf_min_bank=self.ivf_min_bank, nprobe=self.nprobe)
                         for layer, b in self.banks_.items()}

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "fitted_") and hasattr(self, "bank_labels_")

    def disagreement(self, feats: Any, pred: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per layer, the share of the k neighbours whose label differs from ``pred``."""
        self._check_fitted()
        fd = as_feature_dict(feats, self.layers, type(self).__name__)
        out = {}
        for layer, f in fd.items():
            _check_width(f, int(self.banks_[layer].shape[1]), layer, type(self).__name__)
            _, idx = knn_search(self._indexes[layer], _prep(f, self.metric), self.k, self.metric)
            out[layer] = (self.bank_labels_[idx] != pred.long().cpu()[:, None]).float().mean(1)
        return out

    def score_features(self, feats: Any, logits: torch.Tensor) -> torch.Tensor:
        per_layer = self.disagreement(feats, logits.argmax(1))
        return torch.stack(list(per_layer.values()), 1).mean(1)
