"""Fine-tune the shipped CIFAR-10 ResNet-20 with PatchCleanser's masks: the ``variant="masked"`` demo weights.

Starts from ``guard.demo_model("cifar10")``, or with ``--start-folder`` from masked weights trained
before (a warm restart; its SHA-256 is checked on load and recorded either way), and
fine-tunes on the 50,000 JPEG training images (never the test images, which only measure the
result) with :func:`guard.training.mask_training.mask_train`: each image is cropped and flipped
(:func:`guard.demo.crop_flip_augment`) and then covered by two masks drawn from the mask set of a
``--patch``-pixel patch (PatchCleanser's Cutout-style training). SGD with Nesterov momentum,
cosine learning rate. A checkpoint after each epoch in ``OUT/mask_train_state``: run the same
command again to resume after an interruption (bit-identical to an uninterrupted run).

Writes ``OUT/resnet20_masked.safetensors`` and ``OUT/resnet20_masked.json`` (SHA-256, command,
seed, data MD5s, test accuracy of the bare model and its one-mask accuracy on a seeded sample of
``--eval-images`` test images; the archive is in class order, so never its first ones). Run from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python tools/train_cifar10_masked.py --data ../shared/datasets/cifar10 \\
        --out /tmp/cifar_masked --epochs 3 --threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import guard
from guard.core.archive import file_md5, read_image_archive
from guard.core.cache import atomic_write_text, save_tensors
from guard.core.models import accuracy
from guard.demo import crop_flip_augment
from guard.detectors.masking import mask_set
from guard.training.mask_training import MaskTrainConfig, mask_train, masked_accuracy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with cifar10-train.tar.gz and cifar10-test.tar.gz")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--patch", type=int, default=5, help="patch side in pixels the masks cover")
    p.add_argument("--k", type=int, default=6, help="masks per axis")
    p.add_argument("--masks-per-image", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--train-images",
        type=int,
        default=None,
        help="fine-tune on a seeded random subset of this many training images (default: all 50,000)",
    )
    p.add_argument(
        "--start-folder",
        default=None,
        help="go on from the masked weights in this folder (resnet20_masked.safetensors/.json, hash checked) "
        "instead of the standard demo model: a warm restart with a new cosine schedule",
    )
    p.add_argument("--eval-images", type=int, default=1000, help="test images for the one-mask accuracy in the record")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    x_train, y_train, names = read_image_archive(data / "cifar10-train.tar.gz")
    x_test, y_test, _ = read_image_archive(data / "cifar10-test.tar.gz")
    print(
        f"decoded {len(x_train)} training and {len(x_test)} test images in {time.perf_counter() - t0:.0f} s", flush=True
    )
    if args.train_images is not None and args.train_images < len(x_train):
        keep = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed))[: args.train_images]
        x_train, y_train = x_train[keep], y_train[keep]
    if args.start_folder is None:
        model = guard.demo_model("cifar10")
        start = "guard.demo_model('cifar10') (guard/_data/cifar10/resnet20.safetensors)"
    else:
        from guard.demo import cifar10_model

        model = cifar10_model(args.start_folder, variant="masked")
        start = f"{args.start_folder}/resnet20_masked.safetensors"
    start_sha = model.guard_meta["sha256"]
    config = MaskTrainConfig(
        patch_size=args.patch,
        k=args.k,
        masks_per_image=args.masks_per_image,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    masks = mask_set(tuple(x_train.shape[-2:]), args.patch, args.k)
    n_eval = min(args.eval_images, len(x_test))
    # a seeded sample of the test images: the archive is in class order, so its first n are one class
    sample = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(args.seed + 1))[:n_eval]
    x_eval, y_eval = x_test[sample], y_test[sample]
    # the start's test accuracy is the shipped record's (measured when it was trained); its one-mask accuracy is measured here
    before = {
        "test_accuracy": float(model.guard_meta["test_accuracy"]),
        "one_mask_accuracy": masked_accuracy(model, x_eval, y_eval, masks, fill=config.fill),
    }
    print(f"start (sha256 {start_sha[:16]}...): {before}", flush=True)
    t_train = time.perf_counter()
    history = mask_train(
        model,
        x_train,
        y_train,
        config,
        augment=crop_flip_augment,
        checkpoint_dir=out / "mask_train_state",
        on_epoch_end=lambda e: print(f"epoch {e['epoch']}: loss {e['train_loss']} ({e['seconds']} s)", flush=True),
    )
    train_seconds = time.perf_counter() - t_train
    after = {
        "test_accuracy": accuracy(model, x_test.float() / 255, y_test),
        "one_mask_accuracy": masked_accuracy(model, x_eval, y_eval, masks, fill=config.fill),
    }
    print(f"fine-tuned: {after}", flush=True)
    path = out / "resnet20_masked.safetensors"
    architecture = "guard.core.models.CifarResNet(depth=20)"
    save_tensors(path, dict(model.state_dict()), {"architecture": architecture, "classes": names})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    record = {
        "file": path.name,
        "sha256": digest,
        "architecture": architecture,
        "classes": names,
        "start": start,
        "start_sha256": start_sha,
        "method": "PatchCleanser-style mask training (Xiang et al. 2022): two random masks of the mask set per image",
        "mask_set": {
            "patch_side": args.patch,
            "k": args.k,
            "mask_size": list(masks.mask_size),
            "stride": list(masks.stride),
            "masks": len(masks),
            "fill": config.fill,
        },
        "command": "python tools/train_cifar10_masked.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "masks_per_image": args.masks_per_image,
        "train_data": {
            "file": "cifar10-train.tar.gz",
            "md5": file_md5(data / "cifar10-train.tar.gz"),
            "images": len(x_train),
            "subset": None if args.train_images is None else f"seeded random subset (seed {args.seed}) of the 50,000",
        },
        "test_data": {
            "file": "cifar10-test.tar.gz",
            "md5": file_md5(data / "cifar10-test.tar.gz"),
            "images": len(x_test),
        },
        "before": {k: round(v, 4) for k, v in before.items()},
        "test_accuracy": round(after["test_accuracy"], 4),
        "one_mask_accuracy": round(after["one_mask_accuracy"], 4),
        "one_mask_eval_images": n_eval,
        "one_mask_eval_sample": f"a seeded random sample (seed {args.seed + 1}) of the 10,000 test images",
        "train_seconds": round(train_seconds, 1),
        "threads": args.threads,
        "device": "cpu",
        "torch": torch.__version__,
        "history": history,
    }
    atomic_write_text(out / "resnet20_masked.json", json.dumps(record, indent=2) + "\n")
    print(f"wrote {path} (sha256 {digest[:16]}...) and {out / 'resnet20_masked.json'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
