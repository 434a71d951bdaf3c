"""Issue 19's scenario: a user's own CIFAR ResNet-20 module, as it comes, for ``--model user_cifar_resnet20:build``.

Written the way a user writes it (not guard's CifarResNet): a Normalize layer in front,
``nn.AdaptiveAvgPool2d`` + ``nn.Flatten`` modules and a ``linear`` head, wrapped in an
``nn.Sequential``; the weights are akamaster's pretrained ResNet-20 (BSD-2-Clause, see
../shared/models/cifar10-resnet-akamaster/LICENSE), 81.0% on the JPEG CIFAR-10 test images.
Set ``GUARD_USER_WEIGHTS`` to point elsewhere. Used by ``benchmarks/bench_user_layers.py`` and
the full audit in BENCHMARKS.md:

    cd benchmarks && ../.venv/bin/python -m guard audit --model user_cifar_resnet20:build --data cifar10 --out OUT
"""

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS = Path(
    os.environ.get(
        "GUARD_USER_WEIGHTS",
        Path(__file__).resolve().parents[1].parent
        / "shared"
        / "models"
        / "cifar10-resnet-akamaster"
        / "resnet20.safetensors",
    )
)


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if stride != 1 or cin != cout else None

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        short = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + short)


class ResNet20(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(Block(16, 16, 1), Block(16, 16, 1), Block(16, 16, 1))
        self.layer2 = nn.Sequential(Block(16, 32, 2), Block(32, 32, 1), Block(32, 32, 1))
        self.layer3 = nn.Sequential(Block(32, 64, 2), Block(64, 64, 1), Block(64, 64, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.linear(self.flatten(self.pool(self.layer3(self.layer2(self.layer1(x))))))


def build():
    """The user's model as they ship it: their module, akamaster's pretrained weights loaded."""
    from safetensors.torch import load_file

    net = ResNet20()
    net.load_state_dict(load_file(str(WEIGHTS)))
    return nn.Sequential(Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), net).eval()
