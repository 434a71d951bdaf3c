"""Local intrinsic dimensionality of an input's features among clean ones (Ma et al. 2018, an anchor).

Ma, Li, Wang, Erfani, Wijewickrema, Schoenebeck, Song, Houle, Bailey, "Characterizing
Adversarial Subspaces Using Local Intrinsic Dimensionality", ICLR 2018: the maximum-likelihood
estimate of the LID at x from the distances r_1 <= ... <= r_k to its k nearest neighbours in a
reference set of clean examples,

    LID(x) = -( (1/k) sum_i log(r_i / r_k) )^-1,

at several layers; adversarial regions have a higher LID. The paper's reference set is the
rest of the mini-batch and its layers are combined by a logistic regression trained on the
attack it reports; here the reference is a fixed random ``reference_size`` sample of the clean
training features (searched exactly with FAISS, and with MatMul + TopK in the exported graph),
and the layers are combined by the mean of their LIDs standardised on the clean training data
(no attack is tuned on). A training point's own LID leaves itself out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from guard.core.validation import check_int
from guard.detectors.bank_index import shared_index
from guard.detectors.base import Batch, MultiLayerDetector, as_feature_dict, robust_scale, scoring_inputs
from guard.detectors.knn import torch_knn

__all__ = ["LIDDetector", "lid_mle"]


def lid_mle(dist: torch.Tensor) -> torch.Tensor:
    """Maximum-likelihood LID (N,) from ascending neighbour distances (N, k) (Levina & Bickel; Ma et al.)."""
    d = dist.clamp_min(1e-12)
    return -1.0 / (torch.log(d / d[:, -1:]).mean(1) - 1e-12)


class LIDDetector(MultiLayerDetector):
    """Mean over layers of the clean-standardised maximum-likelihood LID of the features.

    Args:
        layers: the layers (pooled features) measured.
        k: neighbours (Ma et al.: 20).
        reference_size: clean training points kept as the reference set (a seeded uniform
            sample, :class:`guard.core.sampling.BottomK`: the same rows whether the fit streams
            its data, :meth:`partial_fit_features`, or gets them at once).
        seed: seeds that sample.

    Fitted state: ``bank{i}_`` (M, d) per layer, ``loc_`` / ``scale_`` (L,).
    """

    name: ClassVar[str] = "lid"

    def __init__(
        self, layers: Sequence[str] = ("fc1",), *, k: int = 20, reference_size: int = 5000, seed: int = 0
    ) -> None:
        self._set_layers(layers)
        self.k = k
        self.reference_size = reference_size
        self.seed = seed

    @property
    def _tensor_attrs(self) -> tuple[str, ...]:  # type: ignore[override]
        return (*(f"bank{i}_" for i in range(len(self.layers))), "loc_", "scale_")

    def fit_features(self, feats: Any, labels: torch.Tensor) -> LIDDetector:
        self.__dict__.pop("_stream_fit", None)
        return self.partial_fit_features(feats, labels).finish_fit()

    def partial_fit_features(self, feats: Any, labels: torch.Tensor) -> LIDDetector:
        """Add one batch of clean features to the reference sample (a streaming fit; :meth:`finish_fit` ends it)."""
        from guard.core.sampling import BottomK
        from guard.detectors.base import FeatureStream

        owner = type(self).__name__
        st = self.__dict__.get("_stream_fit")
        if st is None:
            if not self.layers:
                raise ValueError(f"The 'layers' parameter of {owner} must name at least one layer. Got [].")
            check_int(self.k, "k", owner, low=2)
            check_int(self.reference_size, "reference_size", owner, low=2)
            check_int(self.seed, "seed", owner, low=0)
            st = self._stream_fit = {
                "check": FeatureStream(self.layers, owner),
                "sample": BottomK(self.reference_size, seed=self.seed),
            }
        fd, labels = st["check"].add(feats, labels)
        st["sample"].add({layer: f.cpu() for layer, f in fd.items()}, labels)
        return self

    def finish_fit(self) -> LIDDetector:
        owner = type(self).__name__
        st = self.__dict__.pop("_stream_fit", None)
        if st is None:
            raise ValueError(f"{owner}.finish_fit: no batch was given to partial_fit_features (an empty stream).")
        st["check"].finish()
        n = st["check"].n
        if n <= self.k + 1:
            raise ValueError(f"{owner}: needs more than k + 1 = {self.k + 1} clean examples; got {n}.")
        sample, _, _ = st["sample"].result()
        lids = []
        for i, layer in enumerate(self.layers):
            bank = sample[layer].contiguous()
            setattr(self, f"bank{i}_", bank)
            # the reference points' own LIDs, each leaving itself out (k + 1 neighbours, drop the first)
            dist, _ = shared_index(bank, "l2", kind="flat").self_neighbours(self.k + 1)
            lids.append(lid_mle(dist[:, 1:]))
        self._build()
        self.loc_, self.scale_ = robust_scale(torch.stack(lids, 1))
        self.fitted_ = True
        return self

    def _build(self) -> None:
        # exact search over each bank in place (no FAISS copy), pooled with any equal bank
        self._indexes = [shared_index(getattr(self, f"bank{i}_"), "l2", kind="flat") for i in range(len(self.layers))]
        for i, index in enumerate(self._indexes):
            setattr(self, f"bank{i}_", index.bank)

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().load_state(tensors, meta)
        self._build()

    def layer_lids(self, feats: Any) -> torch.Tensor:
        """(N, L) LID per layer."""
        self._check_fitted()
        fd = as_feature_dict(feats, self.layers, type(self).__name__)
        cols = []
        for i, layer in enumerate(self.layers):
            f = fd[layer].cpu()
            width = getattr(self, f"bank{i}_").shape[1]
            if f.shape[1] != width:
                raise ValueError(
                    f"{type(self).__name__}: features of layer {layer!r} must have width {width} (as fitted); got {f.shape[1]}."
                )
            cols.append(lid_mle(self._indexes[i].search(f, self.k)[0]))
        return torch.stack(cols, 1)

    def score_features(self, feats: Any, logits: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        scoring_inputs(feats, logits, self.layers, type(self).__name__)
        return ((self.layer_lids(feats) - self.loc_) / self.scale_).mean(1)

    def export_head(self) -> nn.Module:
        self._check_fitted()
        return _LIDHead(self)


class _LIDHead(nn.Module):
    """LIDDetector in the graph: exact kNN by MatMul + TopK, the same :func:`lid_mle`."""

    def __init__(self, det: LIDDetector) -> None:
        super().__init__()
        self.layers, self.k = list(det.layers), int(det.k)
        for i in range(len(self.layers)):
            bank = getattr(det, f"bank{i}_").detach().float()
            self.register_buffer(f"bank_t{i}", bank.t().contiguous())
            self.register_buffer(f"sqnorm{i}", (bank * bank).sum(1))
        self.register_buffer("loc", det.loc_.detach().float())
        self.register_buffer("scale", det.scale_.detach().float())

    def forward(self, batch: Batch) -> torch.Tensor:
        cols = [
            lid_mle(
                torch_knn(
                    batch.features[layer], getattr(self, f"bank_t{i}"), getattr(self, f"sqnorm{i}"), self.k, "l2"
                )[0]
            )
            for i, layer in enumerate(self.layers)
        ]
        return ((torch.stack(cols, 1) - self.loc) / self.scale).mean(1)
