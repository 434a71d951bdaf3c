"""Build an :class:`export.onnx_graph.ExportHead` from a model, a hardened model or a GuardedModel.

Reads the detectors' fitted state (``detectors.base`` documents it) and turns each supported
detector into a graph head; what cannot be exported is named in the returned notes (or raises,
when it would change the flag).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from guard.export.onnx_graph import CombinedHead, ExportHead, KNNConsistencyHead, KNNHead, KNNRankHead, PPCAHead, SaliencyHead, head_chain

__all__ = ["head_from", "reject_index_of"]

log = logging.getLogger(__name__)


def reject_index_of(model: nn.Module) -> int | None:
    """The reject-class index of a hardened model (``training.reject.RejectClassifier``), else None."""
    idx = getattr(model, "reject_index", None)
    return int(idx) if isinstance(idx, int) else None


def head_from(obj: nn.Module, example: torch.Tensor, *, saliency: bool | str = True,
              model: nn.Module | None = None) -> tuple[ExportHead, dict[str, Any]]:
    """(ExportHead, notes) for ``obj``.

    Args:
        obj: a classifier, a hardened ``RejectClassifier`` or a ``guard.wrap`` GuardedModel.
        example: example images (to trace the saliency chain and check it).
        model: use this classifier instead of ``obj``'s (a CPU copy of a model on a GPU).
        saliency: True: export the saliency head, raise if it cannot be; "auto": leave it out
            (with a note and without the combined score/flag that needs it) when it cannot be;
            False: leave it out.

    Raises:
        ValueError: a detector that the combined flag needs cannot be exported, or the
            GuardedModel is not calibrated.
    """
    from guard.detectors import Combined, KNNConsistency, KNNRank, PPCAManifold, SaliencyConcentration

    notes: dict[str, Any] = {"exported": [], "left_out": {}}
    if not (hasattr(obj, "detectors") and hasattr(obj, "model")):
        model = obj if model is None else model
        reject = reject_index_of(model)
        if reject is not None:
            notes["exported"].append("reject")
        return ExportHead(model, reject_index=reject), notes

    model = obj.model if model is None else model  # type: ignore[assignment]
    reject = reject_index_of(model)
    dets: dict[str, Any] = dict(obj.detectors)  # type: ignore[arg-type]
    combined: Combined | None = getattr(obj, "combined", None)
    kw: dict[str, Any] = {"reject_index": reject}
    thresholds: dict[str, float] = {}
    kinds: dict[str, str] = {}  # detector name -> kind in the graph
    banks: dict[str, tuple[str, KNNHead]] = {}
    bank_src: dict[str, tuple[torch.Tensor, str]] = {}

    def bank_key(layer: str, bank: torch.Tensor, metric: str, k: int) -> str:
        """One KNNHead per distinct bank; a second user with the same bank shares its TopK."""
        for key, (b, m) in bank_src.items():
            if m == metric and b.shape == bank.shape and torch.equal(b, bank) and banks[key][0] == layer:
                if banks[key][1].k < k:
                    banks[key] = (layer, KNNHead(bank, k, metric))
                return key
        key = f"b{len(banks)}"
        banks[key] = (layer, KNNHead(bank, k, metric))
        bank_src[key] = (bank, metric)
        return key

    for name, det in dets.items():
        if isinstance(det, KNNRank) and "knn" not in kinds.values():
            det._check_fitted()
            parts = list(det.parts_.values()) if getattr(det, "multi", False) else [det]
            heads = []
            for part in parts:
                if int(part.bank_.shape[0]) >= int(part.ivf_min_bank):
                    notes.setdefault("warnings", []).append(
                        f"{name}: the detector searches an approximate IVF index (bank {part.bank_.shape[0]} rows); the graph is exact.")
                key = bank_key(part.layer, part.bank_, part.metric, part.k)
                heads.append((key, KNNRankHead(part.k, part.class_ref_scores_, part.class_counts_, part.class_spread_, part.score_kind)))
            kw["knn"] = heads
            kinds[name] = "knn"
        elif isinstance(det, KNNConsistency) and "knn_consistency" not in kinds.values():
            det._check_fitted()
            keys = [bank_key(layer, det.banks_[layer], det.metric, det.k) for layer in det.layers]
            kw["knn_consistency"] = (keys, KNNConsistencyHead(det.k, det.bank_labels_))
            kinds[name] = "knn_consistency"
        elif isinstance(det, PPCAManifold) and "ppca" not in kinds.values():
            det._check_fitted()
            kw["ppca"] = (det.layer, PPCAHead(det.means_, det.precisions_, det.logdets_))
            kinds[name] = "ppca"
        elif isinstance(det, SaliencyConcentration) and "saliency" not in kinds.values():
            if saliency is False:
                notes["left_out"][name] = "saliency=False"
                continue
            try:
                if det.method not in ("saliency", "gradcam"):
                    raise ValueError(f"saliency head: method {det.method!r} is not exported (only 'saliency' and 'gradcam').")
                chain = head_chain(model, det.layer if det.method == "gradcam" else None, example)
                head = SaliencyHead(chain, method=det.method, window=det.window, reduce=det.reduce, topk=det.topk,
                                    input_hw=(int(example.shape[-2]), int(example.shape[-1])))
            except ValueError as err:
                if saliency is True:
                    raise
                notes["left_out"][name] = str(err)
                continue
            kw["saliency"] = (det.layer if det.method == "gradcam" else None, head)
            kinds[name] = "saliency"
        elif type(det).__name__ == "BitDepthSqueeze" and "squeeze" not in kinds.values():
            kw["squeeze_bits"] = int(det.bits)
            kinds[name] = "squeeze"
        else:
            notes["left_out"][name] = f"{type(det).__name__} has no ONNX head" if type(det).__name__ not in (
                "KNNRank", "KNNConsistency", "PPCAManifold", "SaliencyConcentration", "BitDepthSqueeze") else "a second detector of this kind"
            continue
        thr = getattr(det, "threshold_", None)
        if thr is not None:
            thresholds[kinds[name]] = float(thr)
        notes["exported"].append(name)
    kw["banks"] = banks
    notes["kinds"] = dict(kinds)
    if combined is not None and hasattr(combined, "loc_"):
        missing = [n for n in combined.names if n not in kinds]
        keep = [i for i, n in enumerate(combined.names) if n in kinds]
        if missing:
            # the combined flag needs every member; a partial max can flag less than GuardedModel
            notes["combined"] = (f"the combined score uses {missing}, which are not in the graph; the exported combined "
                                 f"score is the max over {[combined.names[i] for i in keep]} only and can differ from GuardedModel's")
            notes["combined_partial"] = True
        if keep:
            idx = torch.tensor(keep, dtype=torch.long)
            kw["combined"] = ([kinds[combined.names[i]] for i in keep],
                              CombinedHead(combined.ref_[idx], combined.counts_[idx], combined.top_[idx], combined.scale_[idx]))
            thr = getattr(combined, "threshold_", None)
            if thr is not None:
                thresholds["combined"] = float(thr)
            notes["exported"].append("combined")
    if reject is not None:
        notes["exported"].append("reject")
    head = ExportHead(model, thresholds=thresholds, **kw)
    head.combined_partial = bool(notes.get("combined_partial", False))
    return head, notes
