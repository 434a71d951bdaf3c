"""A uniform weight soup (Wortsman et al. 2022) of the four CIFAR-10 ResNet-20 fine-tunes: test accuracy.

    .venv/bin/python benchmarks/cifar10_weight_soup.py    # from the repository root; reads ../shared/datasets/cifar10

The recipe was fixed before any score: all four ResNet-20s (the shipped weights and the three
candidates in benchmarks/results), uniform weights, BatchNorm statistics recomputed on the
un-augmented training images as the SWA run did (``torch.optim.swa_utils.update_bn``). Prints each
network's and the soup's accuracy on the 10,000 test images; saves nothing (BENCHMARKS.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.optim.swa_utils import update_bn

from guard.core.models import CifarResNet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import train_cifar10_resnet20 as tool  # noqa: E402  (the training tool's archive reader and loaders)

FILES = [
    "guard/_data/cifar10/resnet20.safetensors",
    "benchmarks/results/cifar10-resnet20-cosine10/resnet20.safetensors",
    "benchmarks/results/cifar10-resnet20-cosine30/resnet20.safetensors",
    "benchmarks/results/cifar10-resnet20-distilled12/resnet20.safetensors",
]


def main() -> int:
    torch.set_num_threads(2)
    data = ROOT.parent / "shared" / "datasets" / "cifar10"
    x_train, _, _ = tool.read_image_archive(data / "cifar10-train.tar.gz")
    x_test, y_test, _ = tool.read_image_archive(data / "cifar10-test.tar.gz")
    states = []
    for f in FILES:
        net = CifarResNet(20)
        state, sha = tool._start_weights(ROOT / f)
        tool._load_start(net, state, f)
        print(f"{f} (sha256 {sha[:12]}...): {tool.accuracy(net, x_test, y_test):.4f}", flush=True)
        states.append(net.state_dict())
    soup = CifarResNet(20)
    soup.load_state_dict(
        {
            k: (sum(s[k].double() for s in states) / len(states)).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[0].items()
        }
    )
    print(f"soup, BatchNorm statistics averaged: {tool.accuracy(soup, x_test, y_test):.4f}", flush=True)
    update_bn([x_train[i : i + 500].float() / 255 for i in range(0, len(x_train), 500)], soup)
    print(f"soup, BatchNorm statistics recomputed (the result): {tool.accuracy(soup, x_test, y_test):.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
