"""Models: the demo LeNet, the Normalize wrapper, and loading a user's model."""

from __future__ import annotations

import importlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "DemoNet",
    "CifarResNet",
    "Normalize",
    "Normalized",
    "load_model",
    "eval_mode",
    "model_device",
    "predict_labels",
    "inference_batch",
    "accuracy",
]


_MODE_LOCK = threading.Lock()
_MODE_USERS: dict[int, tuple[int, list[tuple[nn.Module, bool]]]] = {}  # id(model) -> (contexts open, modes to restore)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore each module's own mode afterwards.

    Safe when several threads serve the same model: the first context to open records the
    modes and the last to close restores them, so that one thread leaving never puts a model
    back in train mode (dropout, batch statistics) while another is still scoring with it.
    """
    key = id(model)
    with _MODE_LOCK:
        users, modes = _MODE_USERS.get(key, (0, None))
        if users == 0:
            modes = [(m, m.training) for m in model.modules()]
            model.eval()
        _MODE_USERS[key] = (users + 1, modes)
    try:
        yield model
    finally:
        with _MODE_LOCK:
            users, modes = _MODE_USERS.pop(key)
            if users > 1:
                _MODE_USERS[key] = (users - 1, modes)
            else:
                for m, was in modes:
                    m.train(was)


def model_device(model: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """The device of the model's first parameter or buffer (``default`` for a model with neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device(default)


MAX_BATCH_ELEMENTS = 2**23  # input values per inference batch: 8.4M = 55 images at 3x224x224, 2,730 at 3x32x32


def inference_batch(x: torch.Tensor, batch_size: int) -> int:
    """``batch_size``, capped so that one batch holds at most :data:`MAX_BATCH_ELEMENTS` input values.

    The defaults of the batched helpers (1,000 images) suit 28x28 and 32x32 inputs, where the cap
    never binds; at 224 px a batch of 1,000 through an EfficientNet holds gigabytes of activations
    at once (a 1,000-class harden run peaked at 20.5 GB: one tensor of 1,000 x 96 x 112 x 112 floats
    is 4.8 GB).
    """
    per_image = max(1, x[0].numel()) if x.shape[0] else 1
    return max(1, min(int(batch_size), MAX_BATCH_ELEMENTS // per_image))


@torch.no_grad()
def predict_labels(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1000) -> torch.Tensor:
    """The model's argmax labels of ``x`` (int64, on ``x``'s device), batched (at most
    ``batch_size`` images, fewer for large ones: :func:`inference_batch`), in eval mode
    (restored), without autograd.

    The one batched prediction helper every package uses.
    """
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    device = model_device(model, x.device)
    b = inference_batch(x, batch_size)
    with eval_mode(model):
        return torch.cat([model(x[i : i + b].to(device)).argmax(1).to(x.device) for i in range(0, x.shape[0], b)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, in eval mode (restored)."""
    from guard.core.validation import check_images, check_labels

    check_images(x, "x")
    y = check_labels(y, "y", n=int(x.shape[0]))
    return float((predict_labels(model, x, batch_size=batch_size).cpu() == y.cpu()).float().mean())


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, so that the model takes [0, 1] pixels."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        if mean_t.numel() != std_t.numel():
            raise ValueError(f"mean and std must have the same length; got {mean_t.numel()} and {std_t.numel()}.")
        if bool((std_t <= 0).any()):
            raise ValueError(f"std must be > 0 for every channel; got {list(std)}.")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Normalized(nn.Sequential):
    """A model that expects normalised inputs, wrapped to take [0, 1] pixels.

    Layer names gain the prefix ``"model."`` (``"model.layer4"``).
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(OrderedDict(normalize=Normalize(mean, std), model=model))


class DemoNet(nn.Module):
    """The demo classifier: a LeNet-style CNN with named layers.

    Layers: ``normalize`` -> ``conv1`` (conv 5x5, 32, ReLU, max-pool) -> ``conv2`` (conv 5x5,
    64, ReLU, max-pool) -> ``fc1`` (1024 -> 128, ReLU) -> ``fc2`` (the classifier head).
    Input (N, 1, 28, 28) in [0, 1].
    """

    def __init__(self, num_classes: int = 10, *, in_channels: int = 1, width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.normalize = Normalize([0.1307] * in_channels, [0.3081] * in_channels)
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, width, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.conv2 = nn.Sequential(nn.Conv2d(width, 2 * width, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.flatten = nn.Flatten()
        self.fc1 = nn.Sequential(nn.Linear(2 * width * 4 * 4, hidden), nn.ReLU())
        self.dropout = nn.Dropout(0.3)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(self.normalize(x)))
        return self.fc2(self.dropout(self.fc1(self.flatten(x))))


class _ShortcutA(nn.Module):
    """He et al.'s parameter-free "option A" shortcut: every second pixel, channels zero-padded."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU (He et al. 2016, CIFAR variant)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = _ShortcutA(planes // 4) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR-10 ResNet of He et al. 2016 (ResNet-20 for depth 20, ResNet-56 for 56), images in [0, 1].

    Layers: ``normalize`` -> ``conv1``/``bn1`` (3x3, 16) -> ``layer1`` (16, 32x32) -> ``layer2``
    (32, 16x16) -> ``layer3`` (64, 8x8) -> ``pool`` (global average) -> ``flatten`` -> ``linear``.
    Parameter names match akamaster/pytorch_resnet_cifar10, whose pretrained weights it loads.
    The Normalize layer in front uses that repository's mean and std.
    """

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n + 2 (20, 32, 44, 56, ...); got {depth}.")
        n = (depth - 2) // 6
        self.depth = depth
        self.normalize = Normalize(self.MEAN, self.STD)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes = 16
        stages = []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(planes, width, stride if b == 0 else 1))
                planes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.pool(x)))


def load_model(spec: str | os.PathLike[str]) -> nn.Module:
    """Load a user's model from a spec.

    Args:
        spec: a TorchScript file (``torch.jit.save``), an exported program (``.pt2``,
            ``torch.export.save``), or ``"package.module:callable"`` returning an nn.Module
            (the callable is imported and called with no arguments).

    The model must take float NCHW images in [0, 1] and return logits.
    """
    text = os.fspath(spec)
    path = Path(text)
    if path.suffix in {".pt", ".pth", ".ts", ".pt2", ".jit"} or path.exists():
        if not path.is_file():
            raise ValueError(f"model file {text!r} does not exist.")
        if path.suffix == ".pt2":
            try:
                return torch.export.load(str(path)).module()
            except Exception as err:  # torch raises many types for a bad archive
                raise ValueError(f"model file {text!r} is not a readable exported program (.pt2): {err}") from err
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except Exception as err:
            raise ValueError(
                f"model file {text!r} is not a TorchScript archive (torch.jit.save); plain state_dicts need 'module:callable': {err}"
            ) from err
    if ":" not in text:
        raise ValueError(f"model must be a TorchScript/.pt2 file or 'module:callable'; got {text!r}.")
    mod_name, _, attr = text.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as err:
        raise ValueError(f"model {text!r}: cannot import module {mod_name!r}: {err}") from err
    factory = getattr(module, attr, None)
    if factory is None:
        raise ValueError(f"model {text!r}: module {mod_name!r} has no attribute {attr!r}.")
    try:
        model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    except Exception as err:  # the user's factory: any failure means "this spec gives no model"
        raise ValueError(f"model {text!r}: calling {attr}() failed: {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {text!r} must give an nn.Module; got {type(model).__name__}.")
    return model
