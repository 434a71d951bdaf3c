"""Fine-tune the pretrained CIFAR-10 ResNet-20 on the JPEG training images: the weights ``guard.demo_model("cifar10")`` ships.

Starts from akamaster/pytorch_resnet_cifar10's ResNet-20 (BSD-2-Clause; 91.78% on the original
CIFAR-10 test set, 81.0% on the JPEG copy as it is) and fine-tunes it on the 50,000 JPEG
training images (never on the 10,000 test images, which only measure the result at the end):
SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 128, a cosine learning rate from
``--lr`` to 0 over ``--epochs`` epochs, random 4-pixel-padded crops and horizontal flips. No
model selection on the test set: the last epoch's weights are the result.

Writes ``OUT/resnet20.safetensors`` and ``OUT/resnet20.json`` (SHA-256 of the weights file, the
command, seed, data MD5s, test accuracy, time); ``guard.demo_model("cifar10")`` checks the hash
when loading. Run from the repository root:

    .venv/bin/python tools/train_cifar10_resnet20.py --data ../shared/datasets/cifar10 \\
        --weights ../shared/models/cifar10-resnet-akamaster/resnet20.safetensors --out guard/_data/cifar10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from guard.core.archive import file_md5, read_image_archive
from guard.core.cache import atomic_write_text, save_tensors
from guard.core.models import CifarResNet
from guard.demo import crop_flip_augment


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i:i + 500].float() / 255).argmax(1) for i in range(0, len(x), 500)])
    return float((pred == y).float().mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with cifar10-train.tar.gz and cifar10-test.tar.gz")
    p.add_argument("--weights", required=True, help="akamaster resnet20.safetensors")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    t0 = time.perf_counter()
    x_train, y_train, names = read_image_archive(data / "cifar10-train.tar.gz")
    x_test, y_test, _ = read_image_archive(data / "cifar10-test.tar.gz")
    print(f"decoded {len(x_train)} training and {len(x_test)} test images in {time.perf_counter() - t0:.0f} s", flush=True)
    torch.manual_seed(args.seed)
    model = CifarResNet(20)
    model.load_state_dict(load_file(args.weights), strict=False)  # the Normalize buffers are ours
    before = accuracy(model, x_test, y_test)
    print(f"pretrained: {before:.4f} on the test images", flush=True)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = args.epochs * math.ceil(len(x_train) / args.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(args.seed)
    t_train = time.perf_counter()
    history = []
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total, seen = 0.0, 0
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i:i + args.batch_size]
            xb = crop_flip_augment(x_train[idx].float() / 255, gen)
            loss = F.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(idx)
            seen += len(idx)
        history.append({"epoch": epoch + 1, "train_loss": round(total / seen, 4), "seconds": round(time.perf_counter() - t_train, 1)})
        print(f"epoch {epoch + 1}: train loss {total / seen:.4f} ({time.perf_counter() - t_train:.0f} s)", flush=True)
    train_seconds = time.perf_counter() - t_train
    after = accuracy(model, x_test, y_test)
    print(f"fine-tuned: {after:.4f} on the 10,000 test images (never trained on)", flush=True)
    out = Path(args.out)
    path = out / "resnet20.safetensors"
    state = {k: v for k, v in model.state_dict().items()}
    save_tensors(path, state, {"architecture": "guard.core.models.CifarResNet(depth=20)", "classes": names})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    record = {
        "file": path.name,
        "sha256": digest,
        "architecture": "guard.core.models.CifarResNet(depth=20)",
        "classes": names,
        "start": "akamaster/pytorch_resnet_cifar10 resnet20-12fca82f.th (BSD-2-Clause, see LICENSE-resnet20.txt)",
        "command": "python tools/train_cifar10_resnet20.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "train_data": {"file": "cifar10-train.tar.gz", "md5": file_md5(data / "cifar10-train.tar.gz"), "images": len(x_train)},
        "test_data": {"file": "cifar10-test.tar.gz", "md5": file_md5(data / "cifar10-test.tar.gz"), "images": len(x_test)},
        "test_accuracy_pretrained": round(before, 4),
        "test_accuracy": round(after, 4),
        "train_seconds": round(train_seconds, 1),
        "threads": args.threads,
        "device": "cpu",
        "torch": torch.__version__,
        "history": history,
    }
    atomic_write_text(out / "resnet20.json", json.dumps(record, indent=2) + "\n")
    print(f"wrote {path} (sha256 {digest[:16]}...) and {out / 'resnet20.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
