"""ExportHead: the classifier, its features and its detectors' heads as one traceable module.

The graph holds what ``GuardedModel`` computes at serving time, built from the detectors
themselves: each detector's ``export_head()`` scores one :class:`~guard.detectors.Batch`
with the same torch functions as its eager ``score_batch`` (kNN by MatMul + TopK against the
stored bank, then the same rank; the same low-rank PPCA log-likelihood; the same window share
of the same attribution), so this module only runs the model once with the same feature
pooling, loops over the heads, combines the scores and applies the calibrated thresholds.

Gradients in a forward graph: ONNX has no autograd. :func:`trace` records the whole head,
backward passes of the saliency head included, with ``make_fx`` (the tracer of
torch.func / AOTAutograd), so ``torch.autograd.grad`` becomes explicit ops; the backward of a
convolution is decomposed into a transposed convolution (:func:`_conv_backward`), which ONNX
has. Any model exports this way: skip connections, BatchNorm, attention; nothing about its
layers is assumed.

Outputs (``ExportHead.output_names``): ``logits``, ``pred``, ``reject_prob`` (a hardened
model's reject class; Nguyen et al. 2015), ``<detector>_score`` per detector plus its extra
outputs (``knn_distance``, ``ppca_loglik``), ``combined_score``, ``flags`` (N, F) in the order
of ``flag_names`` and ``flag`` (N,). A flag is ``not score <= threshold`` (NaN flags: fail
closed), as ``Detector.predict_scores``; the reject flag is ``pred == reject_index``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from guard.core.features import FeatureExtractor
from guard.core.models import Normalize, eval_mode
from guard.detectors import Batch

__all__ = ["ExportHead", "build_export_head", "exportable_normalize", "trace", "reject_index_of"]

aten = torch.ops.aten


def exportable_normalize(model: nn.Module) -> nn.Module:
    """``model``, or a copy whose ``torchvision.transforms.Normalize`` modules are guard's Normalize.

    Users often put torchvision's Normalize in front of a classifier. Its forward checks
    ``(std == 0).any()`` on a tensor, a data-dependent branch that ``torch.export`` cannot trace
    ("Could not guard on data-dependent expression"). Guard's :class:`~guard.core.models.Normalize`
    computes the same ``(x - mean) / std`` with constant buffers. The swap keeps every module's
    name (feature layers resolve as before) and never touches the caller's model.
    """
    from torchvision import transforms

    kinds = tuple(
        k for k in (transforms.Normalize, getattr(getattr(transforms, "v2", None), "Normalize", None)) if k is not None
    )
    names = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    if not names:
        return model
    if "" in names:
        return Normalize(model.mean, model.std)
    model = copy.deepcopy(model)
    for name in names:
        parent, _, child = name.rpartition(".")
        old = model.get_submodule(name)
        setattr(model.get_submodule(parent), child, Normalize(old.mean, old.std))
    return model


def reject_index_of(model: nn.Module) -> int | None:
    """The reject-class index of a hardened model (``guard.training.RejectClassifier``), else None."""
    idx = getattr(model, "reject_index", None)
    return int(idx) if isinstance(idx, int) else None


class _Fp16Backbone(nn.Module):
    """Runs the backbone in float16 and hands float32 logits to the heads."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


class ExportHead(nn.Module):
    """The model and its detector heads as one module returning a tuple of named outputs.

    Args:
        model: the classifier (images in [0, 1] -> logits); used in eval mode, not modified.
        layers: the feature layers the heads read; pooled with ``pool`` as GuardedModel does.
        pool: :func:`guard.core.features.pool_features` mode.
        heads: detector name -> its ``export_head()``.
        combined: the combined head (``Combined.export_head()``) and the names it combines.
        thresholds: flag name -> calibrated threshold (detector names and "combined").
        reject_index: the reject class of a hardened model (None: not hardened).
        flag_from: the flags whose OR is ``flag`` (default: "combined" and "reject" where
            present, else every flag).
        fp16_backbone: run the classifier in float16 (heads stay float32, and the saliency
            head differentiates the float32 model).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Sequence[str] = (),
        pool: str = "auto",
        heads: dict[str, nn.Module] | None = None,
        combined: nn.Module | None = None,
        thresholds: dict[str, float] | None = None,
        reject_index: int | None = None,
        flag_from: Sequence[str] | None = None,
        fp16_backbone: bool = False,
    ) -> None:
        super().__init__()
        self.float_model = model
        self.backbone = _Fp16Backbone(model) if fp16_backbone else model
        self.prefix = "model." if fp16_backbone else ""
        self.layers = list(layers)
        self.pool = pool
        self.heads = nn.ModuleDict(heads or {})
        self.combined = combined
        self.reject_index = reject_index
        self.thresholds = {k: float(v) for k, v in (thresholds or {}).items()}
        self.flag_names = [n for n in [*self.heads, "combined"] if n in self.thresholds] + (
            ["reject"] if reject_index is not None else []
        )
        if flag_from is None:
            flag_from = [n for n in ("combined", "reject") if n in self.flag_names] or list(self.flag_names)
        unknown = [n for n in flag_from if n not in self.flag_names]
        if unknown:
            raise ValueError(f"flag_from names {unknown} have no threshold; flags are {self.flag_names}.")
        self.flag_from = list(flag_from)
        self.output_names: list[str] = []
        # outputs that are step functions of others (judged through what they step on, and the flags)
        self.step_outputs = {
            f"{name}_{key}" for name, head in self.heads.items() for key in getattr(head, "step_outputs", ())
        }

    def outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every output by name (``forward`` returns them as a tuple in ``output_names`` order)."""
        with torch.no_grad():
            if self.layers:
                fx = FeatureExtractor(self.backbone, [self.prefix + n for n in self.layers])
                logits, raw = fx(x, pool=self.pool, check=False)
                feats = {n: raw[self.prefix + n].float() for n in self.layers}
            else:
                logits, feats = self.backbone(x), {}
        logits = logits.float()
        batch = Batch(x, logits, feats, self.float_model)
        out: dict[str, torch.Tensor] = {"logits": logits, "pred": batch.pred}
        scores: dict[str, torch.Tensor] = {}
        if self.reject_index is not None:
            out["reject_prob"] = torch.softmax(logits, 1)[:, self.reject_index]
        for name, head in self.heads.items():
            got = head(batch)
            parts = got if isinstance(got, dict) else {"score": got}
            scores[name] = parts["score"].float()
            for key, value in parts.items():
                out[f"{name}_{key}"] = value
        if self.combined is not None:
            out["combined_score"] = scores["combined"] = self.combined(scores)
        if self.flag_names:
            cols = [
                batch.pred == self.reject_index if n == "reject" else ~(scores[n] <= self.thresholds[n])
                for n in self.flag_names
            ]
            flags = torch.stack(cols, 1)
            out["flags"] = flags
            idx = [self.flag_names.index(n) for n in self.flag_from]
            out["flag"] = flags[:, idx].any(1)
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.outputs(x)
        if not self.output_names:  # fixed by the first call (build_export_head makes it)
            self.output_names = list(out)
        return tuple(out[n] for n in self.output_names)


def build_export_head(
    obj: nn.Module,
    example: torch.Tensor,
    *,
    leave_out: Sequence[str] = (),
    strict: bool = True,
    fp16_backbone: bool = False,
) -> tuple[ExportHead, dict[str, Any]]:
    """The ExportHead of a classifier, a hardened model or a ``guard.wrap`` GuardedModel, and notes.

    Args:
        obj: the model or GuardedModel (a model with weights off the CPU is exported from a
            CPU copy, so the caller's model never moves).
        example: example images; the head runs once on them, which fixes ``output_names``.
        leave_out: detector names whose heads stay out of the graph.
        strict: a detector without an export head raises; False leaves it out with a note
            (the combined score then says it is partial).
        fp16_backbone: as :class:`ExportHead`.

    Raises:
        ValueError: a GuardedModel that is not calibrated, or (strict) a detector that has no head.
    """
    guarded = hasattr(obj, "detectors") and hasattr(obj, "model")
    leave_out = _checked_leave_out(obj, leave_out, guarded)
    model = exportable_normalize(obj.model if guarded else obj)
    if any(t.device.type != "cpu" for t in [*model.parameters(), *model.buffers()]):
        model = copy.deepcopy(model).cpu()
    reject = reject_index_of(model)
    notes: dict[str, Any] = {"exported": [], "left_out": {}}
    heads: dict[str, nn.Module] = {}
    thresholds: dict[str, float] = {}
    combined = None
    if guarded:
        if getattr(obj, "combined", None) is None:
            raise ValueError("the GuardedModel is not calibrated: call calibrate() before exporting it.")
        heads, thresholds = _detector_heads(obj, leave_out, strict, notes)
        combined = _combined_head(obj, heads, thresholds, notes)
    if reject is not None:
        notes["exported"].append("reject")
    layers = list(
        dict.fromkeys(
            layer
            for name, det in (obj.detectors.items() if guarded else [])
            if name in heads
            for layer in det.feature_layers
        )
    )
    head = ExportHead(
        model,
        layers=layers,
        pool=getattr(obj, "pool", "auto"),
        heads=heads,
        combined=combined,
        thresholds=thresholds,
        reject_index=reject,
        fp16_backbone=fp16_backbone,
    )
    head.combined_partial = bool(notes.get("combined_partial", False))
    for m in head.modules():  # the heads have no train-time behaviour; the model's own modes are left alone
        if m not in set(model.modules()):
            m.training = False
    with eval_mode(head.float_model), eval_mode(head.backbone):
        head(example.float())
    return head, notes


def _checked_leave_out(obj: nn.Module, leave_out: Sequence[str], guarded: bool) -> set[str]:
    """``leave_out`` as a set of names, each one a detector of ``obj``."""
    if isinstance(leave_out, str):  # one name, not its letters ("knn" in "knn_consistency" would match)
        leave_out = [leave_out]
    if not isinstance(leave_out, (list, tuple, set, frozenset)) or not all(isinstance(n, str) for n in leave_out):
        raise TypeError(f"leave_out must be a list of detector names; got {leave_out!r:.80}.")
    unknown = sorted(set(leave_out) - set(obj.detectors)) if guarded else []
    if unknown:
        raise ValueError(
            f"leave_out names {unknown}, which are not detectors of this GuardedModel ({sorted(obj.detectors)})."
        )
    return set(leave_out)


def _detector_heads(
    obj: Any, leave_out: set[str], strict: bool, notes: dict[str, Any]
) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """(export head, threshold) of every detector not left out; each one left out gets its reason in ``notes``."""
    heads: dict[str, nn.Module] = {}
    thresholds: dict[str, float] = {}
    for name, det in obj.detectors.items():
        if name in leave_out:
            notes["left_out"][name] = "left out by the caller"
            continue
        try:
            heads[name] = det.export_head()
        except (NotImplementedError, ValueError) as err:
            if strict:
                raise ValueError(
                    f"detector {name!r} cannot be exported: {err} (pass leave_out=[{name!r}] or strict=False)"
                ) from err
            notes["left_out"][name] = str(err)
            continue
        if hasattr(det, "threshold_"):
            thresholds[name] = float(det.threshold_)
        notes["exported"].append(name)
    return heads, thresholds


def _combined_head(
    obj: Any, heads: dict[str, nn.Module], thresholds: dict[str, float], notes: dict[str, Any]
) -> nn.Module | None:
    """The combined score's head over the detectors in the graph (None when none is); its threshold into ``thresholds``."""
    missing = [n for n in obj.combined.names_ if n not in heads]
    if missing:
        # the combined flag needs every member; a partial max can flag less than GuardedModel
        notes["combined"] = (
            f"the combined score uses {missing}, which are not in the graph; the exported combined score "
            f"is the max over the others only and can differ from GuardedModel's"
        )
        notes["combined_partial"] = True
        from guard.detectors import Combined

        part = Combined([n for n in obj.combined.names_ if n in heads], rule=obj.combined.rule)
        idx = torch.tensor([obj.combined.names_.index(n) for n in part.names], dtype=torch.long)
        for a in ("ref_", "counts_", "top_", "loc_", "scale_", "weights_"):
            setattr(part, a, getattr(obj.combined, a)[idx])
        part.names_, part.fitted_ = list(part.names), True
        comb_src = part
    else:
        comb_src = obj.combined
    if not comb_src.names_:
        return None
    combined = comb_src.export_head()
    thresholds["combined"] = float(obj.combined.threshold_)
    notes["exported"].append("combined")
    return combined


def _conv_backward(
    grad_out: torch.Tensor,
    inp: torch.Tensor,
    weight: torch.Tensor,
    bias_sizes: Any,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
    mask: Sequence[bool],
) -> Any:
    """The input gradient of a convolution as a transposed convolution (what ONNX can run).

    Only the input gradient is ever needed (the weights are constants); anything else falls
    back to PyTorch's own handling.
    """
    if transposed or mask[1] or mask[2]:
        return NotImplemented
    pad = []
    for i in range(len(stride)):
        full = (grad_out.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (weight.shape[2 + i] - 1) + 1
        pad.append(inp.shape[2 + i] - full)
    return aten.convolution(grad_out, weight, None, stride, padding, dilation, True, pad, groups), None, None


def trace(head: ExportHead, example: torch.Tensor) -> torch.fx.GraphModule:
    """``head`` as an FX graph with explicit backward ops and a symbolic batch dimension."""
    from torch._decomp import core_aten_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    decomp = dict(core_aten_decompositions())
    decomp[aten.convolution_backward.default] = _conv_backward
    with eval_mode(head.float_model), eval_mode(head.backbone):
        return make_fx(head, tracing_mode="symbolic", _allow_non_fake_inputs=True, decomposition_table=decomp)(example)
