"""Named intermediate features: the one place every package gets layer activations from.

A layer is named by its module path (``"conv2"``, ``"layer3"``, ``"features.3"``, as
``model.named_modules()`` lists them) or, with the suffix ``":input"``, by the *input* of a
module (``"fc:input"``): the head's input is exactly what the classifier sees, after any
functional ops in ``forward`` (``torch.flatten``, ``F.adaptive_avg_pool2d``) that have no
module of their own. Features are read with forward (pre-)hooks rather than
``torchvision.models.feature_extraction.create_feature_extractor``: hooks work on any
``nn.Module`` (FX tracing fails on data-dependent control flow, which production models
have), keep autograd intact for attacks that differentiate through a layer, run unchanged
inside the traced ONNX export, and leave the caller's model untouched once the context ends.

:func:`default_feature_layers` reads the model's forward pass once (hooks on every module) and
picks the head's input plus the last output of each of the two deepest spatial stages, so a
user's model works as it comes. :func:`pool_features` turns a spatial map into the vector a
detector sees (``"auto"``: kept whole up to :data:`MAX_FEATURES` values, else averaged over the
finest square grid that fits), the same ops in eager scoring and in the exported graph.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from guard.core.models import eval_mode, inference_batch, model_device
from guard.core.validation import call_model, check_images

__all__ = [
    "check_hookable",
    "get_layer",
    "layer_names",
    "find_head",
    "FeatureExtractor",
    "extract_features",
    "eval_mode",
    "pool_features",
    "POOLS",
    "MAX_FEATURES",
    "INPUT_SUFFIX",
    "default_feature_layers",
    "Batch",
]

#: Suffix that names a module's input instead of its output (``"fc:input"``).
INPUT_SUFFIX = ":input"
#: ``pool="auto"`` keeps a spatial map whole up to this many values per image.
MAX_FEATURES = 1024
POOLS = ("auto", "avg", "flatten")


@dataclass
class Batch:
    """One forward pass's worth of what detectors score.

    Attributes:
        x: the images (N, C, H, W) in [0, 1], on the model's device.
        logits: the model's logits (N, K).
        features: layer -> pooled features (N, D) (:func:`guard.core.features.pool_features`).
        model: the classifier (input detectors differentiate through it).
        input_grad: the gradient of each image's predicted-class logit with respect to the
            image (N, C, H, W), taken in the same forward pass when a detector asks for it
            (``needs_input_grad``; :meth:`guard.GuardedModel.score`), else None.
    """

    x: torch.Tensor
    logits: torch.Tensor
    features: Mapping[str, torch.Tensor] = field(default_factory=dict)
    model: nn.Module | None = None
    input_grad: torch.Tensor | None = None

    @property
    def pred(self) -> torch.Tensor:
        return self.logits.argmax(1)


def layer_names(model: nn.Module) -> list[str]:
    """All named sub-module paths of ``model`` (what ``layers=`` accepts)."""
    return [n for n, _ in model.named_modules() if n]


def check_hookable(model: nn.Module) -> None:
    """Raise a clear ValueError for models whose layers cannot be hooked (TorchScript)."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError(
            "model is a TorchScript module, which does not support forward hooks, so its named layers "
            "cannot be read; load the model as an nn.Module ('package.module:callable') for layer-based steps."
        )


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The sub-module at path ``name`` (for ``"path:input"``, the module whose input it is).

    A clear ValueError listing the choices otherwise.
    """
    check_hookable(model)
    if not isinstance(name, str):
        raise TypeError(f"layer name must be a str module path such as 'conv2'; got {type(name).__name__}.")
    path = name[: -len(INPUT_SUFFIX)] if name.endswith(INPUT_SUFFIX) else name
    modules = dict(model.named_modules())
    if path not in modules or not path:
        choices = ", ".join(layer_names(model)[:40])
        raise ValueError(
            f"Unknown layer name {name!r} for {type(model).__name__}; expected a module path (or 'path{INPUT_SUFFIX}' "
            f"for its input), one of: {choices}."
        )
    return modules[path]


def find_head(model: nn.Module, name: str | None = None) -> tuple[str, nn.Linear]:
    """The classifier head: the named Linear layer, or the last ``nn.Linear`` registered."""
    if name is not None:
        mod = get_layer(model, name)
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"head {name!r} must be an nn.Linear; got {type(mod).__name__}.")
        return name, mod
    check_hookable(model)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"Could not find a classifier head in {type(model).__name__}: it has no nn.Linear layer; pass head='module.path'."
        )
    return linears[-1]


def pool_features(t: torch.Tensor, pool: str = "auto") -> torch.Tensor:
    """One vector per image (N, D) from a layer's output (N, ...).

    Args:
        t: a layer's output; 2-D outputs are returned as they are.
        pool: ``"flatten"``: every value; ``"avg"``: global average over the spatial positions;
            ``"auto"``: every value while the map has at most :data:`MAX_FEATURES` of them, else
            the average over the finest square grid (4x4, 2x2, 1x1) with at most that many
            values (adaptive average pooling), so detectors see O(channels) features.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}; got {pool!r}.")
    if t.dim() <= 2:
        return t.reshape(t.shape[0], -1)
    if pool == "flatten":
        return t.flatten(1)
    if t.dim() != 4:  # (N, C, L) sequences and others: average over everything after the channels
        return t.flatten(2).mean(2) if pool == "avg" or t[0].numel() > MAX_FEATURES else t.flatten(1)
    c, h, w = int(t.shape[1]), int(t.shape[2]), int(t.shape[3])
    if pool == "avg":
        return t.mean(dim=(2, 3))
    if c * h * w <= MAX_FEATURES:
        return t.flatten(1)
    for g in (4, 2):
        if c * g * g <= MAX_FEATURES and h >= g and w >= g:
            return F.adaptive_avg_pool2d(t, g).flatten(1)
    return t.mean(dim=(2, 3))


class FeatureExtractor:
    """Run a model once and collect the outputs (or inputs, ``"path:input"``) of named layers.

    Example::

        fx = FeatureExtractor(model, ["layer3", "fc:input"])
        logits, feats = fx(x)                # feats["layer3"]: (N, 256, 14, 14)
        logits, feats = fx(x, pool="auto")   # (N, 1024): 2x2 average grid; feats["fc:input"]: (N, 512)

    Gradients flow through the returned features unless called under ``torch.no_grad()``.
    Hooks see every forward through the model, so each call keeps only its own thread's: several
    threads may score with one model at once.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        if isinstance(layers, str):
            layers = [layers]
        if len(layers) == 0:
            raise ValueError("layers must name at least one layer; got an empty list.")
        self.model = model
        self.layers = list(dict.fromkeys(layers))
        self._modules = {name: get_layer(model, name) for name in self.layers}

    def __call__(
        self, x: torch.Tensor, *, pool: str | None = None, flatten: bool = False, check: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(logits, {layer: tensor})``; ``pool`` (or ``flatten=True``) gives (N, D) vectors."""
        if check:
            check_images(x, "x")
        store: dict[str, torch.Tensor] = {}
        handles = []

        how = "flatten" if flatten and pool is None else pool
        caller = threading.get_ident()

        def keep(name: str, value: object) -> None:
            if threading.get_ident() != caller:  # another thread's forward through the same model: not ours
                return
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"layer {name!r} gives {type(value).__name__}, not a tensor; choose another layer.")
            if name not in store:  # a module called twice: its first call counts
                # pooled or copied now: a later in-place op (ReLU(inplace=True)) must not change it
                store[name] = (value if how is None else pool_features(value, how)).clone()

        for name, mod in self._modules.items():
            if name.endswith(INPUT_SUFFIX):
                handles.append(
                    mod.register_forward_pre_hook(lambda _m, args, name=name: keep(name, args[0] if args else None))
                )
            else:
                handles.append(mod.register_forward_hook(lambda _m, _i, out, name=name: keep(name, out)))
        try:
            logits = call_model(self.model, x)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in self.layers if n not in store]
        if missing:
            raise ValueError(f"layers {missing} were not called during the forward pass.")
        return logits, {n: store[n] for n in self.layers}


@torch.no_grad()
def extract_features(
    model: nn.Module,
    x: torch.Tensor,
    layers: Sequence[str],
    *,
    batch_size: int = 512,
    pool: str = "flatten",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and (N, D) features of ``layers`` for all of ``x``, batched, in eval mode.

    ``pool`` as :func:`pool_features` (default every value; detectors use ``"auto"``). Large
    images get fewer than ``batch_size`` per batch (:func:`guard.core.models.inference_batch`).
    """
    check_images(x, "x")
    batch_size = inference_batch(x, batch_size)
    fx = FeatureExtractor(model, layers)
    device = model_device(model, x.device)
    logits, feats = [], {n: [] for n in fx.layers}
    with eval_mode(model):
        for i in range(0, x.shape[0], batch_size):
            lo, f = fx(x[i : i + batch_size].to(device), pool=pool)
            logits.append(lo)
            for n in fx.layers:
                feats[n].append(f[n])
    return torch.cat(logits), {n: torch.cat(v) for n, v in feats.items()}


@torch.no_grad()
def default_feature_layers(
    model: nn.Module, example: torch.Tensor, *, head: str | None = None, stages: int = 2
) -> list[str]:
    """The layers detectors see by default, in network order: ``stages`` spatial stages, then the head's input.

    One forward pass on ``example`` with a hook on every module records what each returns.
    The head's input is ``"<head>:input"`` (what the classifier sees, after any functional
    ``torch.flatten`` or pooling in ``forward``). The spatial stages are the last 4-D output at
    each of the ``stages`` deepest resolutions larger than 1x1, among the shallowest modules
    that show that many resolutions no more than 4x apart in side (top-level children first: ``"layer3"``, ``"layer4"`` of a ResNet, ``"conv1"``, ``"conv2"`` of
    the demo net; ``"features.8"``, ``"features"`` of a MobileNet; ``"1._blocks.10"``,
    ``"1._bn1"`` of a Normalize + EfficientNet-Lite), each named after the outermost module that
    returns it. A module called more than once in a forward (one activation module reused at
    several places, as EfficientNet's ``_swish``) is never picked: its name does not say which call.

    Raises:
        ValueError: the model has no ``nn.Linear`` head (pass ``layers=`` yourself).
    """
    check_hookable(model)
    head_name, head_mod = find_head(model, head)
    outputs: list[tuple[str, torch.Tensor]] = []  # (module path, output) in the order the modules return
    called = [False]
    handles = [head_mod.register_forward_pre_hook(lambda _m, _a: called.__setitem__(0, True))]
    for name, mod in model.named_modules():
        if name and mod is not head_mod:
            handles.append(
                mod.register_forward_hook(
                    lambda _m, _i, out, name=name: (
                        outputs.append((name, out)) if isinstance(out, torch.Tensor) and not called[0] else None
                    )
                )
            )
    try:
        with eval_mode(model):
            call_model(model, example[:2].to(model_device(model, example.device)), "example")
    finally:
        for h in handles:
            h.remove()
    if not called[0]:
        raise ValueError(
            f"the head {head_name!r} of {type(model).__name__} was not called during the forward pass; pass layers=[...]."
        )
    calls: dict[str, int] = {}
    for n, _ in outputs:
        calls[n] = calls.get(n, 0) + 1
    spatial = [
        (i, n, o)
        for i, (n, o) in enumerate(outputs)
        if calls[n] == 1 and o.dim() == 4 and o.shape[-1] * o.shape[-2] > 1
    ]
    picked: list[str] = []
    max_depth = max((n.count(".") for _, n, _ in spatial), default=0)
    for depth in range(max_depth + 1):
        last: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}
        for i, n, o in spatial:
            if n.count(".") <= depth:
                last[tuple(o.shape[-2:])] = (i, o)
        deepest = sorted(last.values(), key=lambda v: v[0])[-stages:] if stages > 0 else []
        # a depth whose stages jump more than 4x in side (a stem and the head, nothing between)
        # skips the network's stages: look one level deeper
        sides = [max(o.shape[-2:]) for _, o in deepest]
        contiguous = all(a <= 4 * b for a, b in zip(sides, sides[1:]))
        if (len(last) >= stages and contiguous) or depth == max_depth:
            for _, out in deepest:
                names = [n for n, o in outputs if o is out and calls[n] == 1]
                picked.append(min(names, key=lambda n: (n.count("."), len(n))))
            break
    return [*dict.fromkeys(picked), head_name + INPUT_SUFFIX]
