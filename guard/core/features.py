"""Named intermediate features: the one place every package gets layer activations from.

Forward hooks rather than ``torchvision.models.feature_extraction.create_feature_extractor``:
hooks work on any ``nn.Module`` (FX tracing fails on data-dependent control flow, which
production models have), keep autograd intact for attacks that differentiate through a
layer, and leave the caller's model untouched once the context ends. torchvision's
``get_graph_node_names`` is not needed because layer names are module paths
(``"conv2"``, ``"features.3"``), as ``model.named_modules()`` lists them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from guard.core.models import eval_mode, model_device
from guard.core.validation import call_model, check_images

__all__ = ["check_hookable", "get_layer", "layer_names", "find_head", "FeatureExtractor", "extract_features", "eval_mode"]


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
    """The sub-module at path ``name``; a clear ValueError listing the choices otherwise."""
    check_hookable(model)
    if not isinstance(name, str):
        raise TypeError(f"layer name must be a str module path such as 'conv2'; got {type(name).__name__}.")
    modules = dict(model.named_modules())
    if name not in modules or not name:
        choices = ", ".join(layer_names(model)[:40])
        raise ValueError(f"Unknown layer name {name!r} for {type(model).__name__}; expected one of: {choices}.")
    return modules[name]


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
        raise ValueError(f"Could not find a classifier head in {type(model).__name__}: it has no nn.Linear layer; pass head='module.path'.")
    return linears[-1]


class FeatureExtractor:
    """Run a model once and collect the outputs of named layers.

    Example::

        fx = FeatureExtractor(model, ["conv2", "fc1"])
        logits, feats = fx(x)          # feats["conv2"]: (N, 64, 7, 7)
        logits, feats = fx(x, flatten=True)  # (N, 3136)

    Gradients flow through the returned features unless called under ``torch.no_grad()``.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        if isinstance(layers, str):
            layers = [layers]
        if len(layers) == 0:
            raise ValueError("layers must name at least one layer; got an empty list.")
        self.model = model
        self.layers = list(layers)
        self._modules = {name: get_layer(model, name) for name in self.layers}

    def __call__(self, x: torch.Tensor, *, flatten: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        check_images(x, "x")
        store: dict[str, torch.Tensor] = {}
        handles = []

        def make_hook(name: str):
            def hook(_m: nn.Module, _inp: object, out: object) -> None:
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"layer {name!r} returned {type(out).__name__}, not a tensor; choose another layer.")
                store[name] = out

            return hook

        for name, mod in self._modules.items():
            handles.append(mod.register_forward_hook(make_hook(name)))
        try:
            logits = call_model(self.model, x)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in self.layers if n not in store]
        if missing:
            raise ValueError(f"layers {missing} were not called during the forward pass.")
        if flatten:
            store = {k: v.flatten(1) for k, v in store.items()}
        return logits, {n: store[n] for n in self.layers}


@torch.no_grad()
def extract_features(
    model: nn.Module,
    x: torch.Tensor,
    layers: Sequence[str],
    *,
    batch_size: int = 512,
    flatten: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and flattened features of ``layers`` for all of ``x``, batched, in eval mode."""
    check_images(x, "x")
    fx = FeatureExtractor(model, layers)
    device = model_device(model, x.device)
    logits, feats = [], {n: [] for n in fx.layers}
    with eval_mode(model):
        for i in range(0, x.shape[0], batch_size):
            lo, f = fx(x[i:i + batch_size].to(device), flatten=flatten)
            logits.append(lo)
            for n in fx.layers:
                feats[n].append(f[n])
    return torch.cat(logits), {n: torch.cat(v) for n, v in feats.items()}
