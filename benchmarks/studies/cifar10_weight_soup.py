"""A uniform weight soup (Wortsman et al. 2022) of the four CIFAR-10 ResNet-20 fine-tunes: test accuracy.

The recipe was fixed before any score: all four ResNet-20s (the shipped weights and the three
candidates in benchmarks/results), uniform weights, BatchNorm statistics recomputed on the
un-augmented training images as the SWA run did (``torch.optim.swa_utils.update_bn``). Prints each
network's and the soup's accuracy on the 10,000 test images. Reads ../shared/datasets/cifar10 (the
training tool's archives, ``--data``). Writes benchmarks/results/cifar10_weight_soup.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.cifar10_weight_soup --threads 1
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from torch.optim.swa_utils import update_bn

from benchmarks.fixtures.timing import out_option, pin_threads
from guard.core.models import CifarResNet
from guard.core.provenance import write_results

ROOT = Path(__file__).resolve().parents[2]

FILES = [
    "guard/_data/cifar10/resnet20.safetensors",
    "benchmarks/results/cifar10-resnet20-cosine10/resnet20.safetensors",
    "benchmarks/results/cifar10-resnet20-cosine30/resnet20.safetensors",
    "benchmarks/results/cifar10-resnet20-distilled12/resnet20.safetensors",
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10"))
    p.add_argument("--n-test", type=int, default=0, help="test images scored (0: all 10,000)")
    p.add_argument(
        "--n-bn", type=int, default=0, help="training images the BatchNorm statistics are recomputed on (0: all)"
    )
    out_option(p, "cifar10_weight_soup")
    args = p.parse_args()
    pin_threads(args.threads)
    tool = importlib.import_module("tools.train_cifar10_resnet20")  # the training tool's archive reader and loaders
    data = Path(args.data)
    x_train, _, _ = tool.read_image_archive(data / "cifar10-train.tar.gz")
    x_test, y_test, _ = tool.read_image_archive(data / "cifar10-test.tar.gz")
    if args.n_test:
        x_test, y_test = x_test[: args.n_test], y_test[: args.n_test]
    if args.n_bn:
        x_train = x_train[: args.n_bn]
    states, members = [], []
    for f in FILES:
        net = CifarResNet(20)
        state, sha = tool._start_weights(ROOT / f)
        tool._load_start(net, state, f)
        acc = tool.accuracy(net, x_test, y_test)
        print(f"{f} (sha256 {sha[:12]}...): {acc:.4f}", flush=True)
        members.append({"file": f, "sha256": sha, "test_accuracy": acc})
        states.append(net.state_dict())
    soup = CifarResNet(20)
    soup.load_state_dict(
        {
            k: (sum(s[k].double() for s in states) / len(states)).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[0].items()
        }
    )
    averaged = tool.accuracy(soup, x_test, y_test)
    print(f"soup, BatchNorm statistics averaged: {averaged:.4f}", flush=True)
    update_bn([x_train[i : i + 500].float() / 255 for i in range(0, len(x_train), 500)], soup)
    recomputed = tool.accuracy(soup, x_test, y_test)
    print(f"soup, BatchNorm statistics recomputed (the result): {recomputed:.4f}", flush=True)
    write_results(
        args.out,
        {
            "test_images": len(y_test),
            "bn_images": len(x_train),
            "threads": args.threads,
            "members": members,
            "soup_bn_averaged_test_accuracy": averaged,
            "soup_bn_recomputed_test_accuracy": recomputed,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
