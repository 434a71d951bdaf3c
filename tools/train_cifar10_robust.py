"""Adversarially fine-tune the shipped CIFAR-10 ResNet-20 with ``guard.harden``'s online methods: the ``robust`` demo variants.

Starts from ``guard.demo_model("cifar10")`` (88.19% clean) and runs ``guard.harden(method=...)`` on
the 50,000 JPEG training images (never the 10,000 test images: the held-out accuracy printed after
each epoch is on a seeded sample of 1,000 test images and only reported; the last epoch's weights are the
result, nothing is selected on them), with the CIFAR crop-and-flip augmentation, checkpointing in
``OUT/checkpoints`` every ``--checkpoint-every`` batches. Run it again with the same arguments to
resume (an interrupted run ends with the same weights as an uninterrupted one); ``--stop-after-epoch
K`` ends this invocation after K epochs (training in stages).

Writes ``OUT/resnet20-METHOD.safetensors`` (:meth:`guard.RejectClassifier.save`, n + 1 outputs) and
``OUT/resnet20-METHOD.json`` (SHA-256, command, seed, data MD5s, history). Run from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python tools/train_cifar10_robust.py --data ../shared/datasets/cifar10 \\
        --method reject --epochs 6 --out benchmarks/results/cifar10-robust-reject
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import torch

import guard
from guard.core.archive import file_md5, read_image_archive
from guard.core.cache import atomic_write_text
from guard.core.data import Split
from guard.demo import crop_flip_augment
from guard.training import HardenConfig, harden
from guard.training.checkpoint import load_checkpoint


class _Stop(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with cifar10-train.tar.gz and cifar10-test.tar.gz")
    p.add_argument("--out", required=True)
    p.add_argument("--method", default="reject", choices=["pgd", "fgsm_rs", "trades", "reject"])
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--attack-steps", type=int, default=1)
    p.add_argument(
        "--step-size", type=float, default=None, help="default: 1.25 eps with one attack step, else 2.5 eps / steps"
    )
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--reject-weight", type=float, default=1.0)
    p.add_argument("--eps-warmup-epochs", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--start",
        default="standard",
        choices=["standard", "robust"],
        help="the demo variant to start from: 'robust' continues the shipped PGD-trained RejectClassifier",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=40, help="batches between checkpoints inside an epoch")
    p.add_argument(
        "--stop-after-epoch", type=int, default=None, help="end this invocation after this many epochs in all"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, names = read_image_archive(data / "cifar10-train.tar.gz")
    x_test, y_test, _ = read_image_archive(data / "cifar10-test.tar.gz")
    train = Split(x_train.float().div_(255), y_train)
    # the per-epoch look: a seeded sample of 1,000 test images (the archive is in class order, so its
    # first 1,000 are all airplanes; the runs of 2026-12-07 used those, which moved only the printed look)
    look = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(args.seed))[:1000]
    held = Split(x_test[look].float().div_(255), y_test[look])
    step = args.step_size if args.step_size is not None else (1.25 * args.eps if args.attack_steps == 1 else None)
    config = HardenConfig.online(
        args.method,
        eps=args.eps,
        epochs=args.epochs,
        attack_steps=args.attack_steps,
        step_size=step,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        reject_weight=args.reject_weight,
        eps_warmup_epochs=args.eps_warmup_epochs,
        monitor_images=200,
    )
    model = guard.demo_model("cifar10", variant=args.start)
    start_sha256 = model.guard_meta["sha256"]

    def stop(_round: int, epoch: int, _net: torch.nn.Module) -> None:
        if args.stop_after_epoch is not None and epoch + 1 >= args.stop_after_epoch and epoch + 1 < args.epochs:
            raise _Stop

    t0 = time.perf_counter()
    try:
        res = harden(
            model,
            train,
            test=held,
            config=config,
            augment=crop_flip_augment,
            checkpoint_dir=out / "checkpoints",
            resume=True,
            progress=True,
            on_epoch_end=stop,
            checkpoint_every=args.checkpoint_every,
        )
    except _Stop:
        meta = load_checkpoint(out / "checkpoints")[3]
        print(
            f"stopped after epoch {meta['epoch']} of {args.epochs}; run the same command again to continue", flush=True
        )
        return 0
    rc = res.model
    x_all = x_test.float().div_(255)
    with torch.no_grad():
        pred = torch.cat([rc(x_all[i : i + 500]).argmax(1) for i in range(0, len(x_all), 500)])
    path = out / f"resnet20-{args.method}.safetensors"
    rc.save(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    record = {
        "file": path.name,
        "sha256": digest,
        "format": "guard.RejectClassifier (RejectClassifier.load(path, guard.demo_model('cifar10')))",
        "architecture": "guard.core.models.CifarResNet(depth=20) with an 11-output head (index 10 = reject)",
        "classes": names,
        "start": f"guard.demo_model('cifar10', variant={args.start!r})",
        "start_sha256": start_sha256,
        "command": "python tools/train_cifar10_robust.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": config.to_dict(),
        "seed": args.seed,
        "train_data": {
            "file": "cifar10-train.tar.gz",
            "md5": file_md5(data / "cifar10-train.tar.gz"),
            "images": len(x_train),
        },
        "test_data": {
            "file": "cifar10-test.tar.gz",
            "md5": file_md5(data / "cifar10-test.tar.gz"),
            "images": len(x_test),
        },
        "test_accuracy": round(float((pred == y_test).float().mean()), 4),
        "test_rejected": round(float((pred == 10).float().mean()), 4),
        "baseline": res.baseline,
        "history": res.history,
        "timings": res.timings,
        "seconds_this_invocation": round(time.perf_counter() - t0, 1),
        "threads": args.threads,
        "torch": torch.__version__,
        "licence": "BSD-2-Clause (akamaster/pytorch_resnet_cifar10 lineage, see guard/_data/cifar10/LICENSE-resnet20.txt)",
    }
    atomic_write_text(out / f"resnet20-{args.method}.json", json.dumps(record, indent=2) + "\n")
    print(
        f"wrote {path} (sha256 {digest[:16]}...): clean {record['test_accuracy']:.4f}, rejected {record['test_rejected']:.4f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
