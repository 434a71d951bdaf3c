"""Fine-tune the pretrained CIFAR-10 ResNet-20 on the JPEG training images: the weights ``guard.demo_model("cifar10")`` ships.

Starts from akamaster/pytorch_resnet_cifar10's ResNet-20 (BSD-2-Clause; 91.78% on the original
CIFAR-10 test set, 81.0% on the JPEG copy as it is) and fine-tunes it on the 50,000 JPEG
training images (never on the 10,000 test images, which only measure the result at the end):
SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 128, a cosine learning rate from
``--lr`` to 0 over ``--epochs`` epochs, random 4-pixel-padded crops and horizontal flips. No
model selection on the test set: the last epoch's weights are the result.

``--depth 56`` fine-tunes akamaster's ResNet-56 the same way (written as ``resnet56.*``), to serve
as a teacher. ``--teacher FILE [FILE ...]`` distils one network or an ensemble into the network
being trained (Hinton et al. 2015): the loss is ``(1 - w) * CE(y) + w * T^2 * KL(p_t || softmax(s / T))``
where ``p_t`` is the mean over the teachers of ``softmax(t_i / T)``, each teacher in eval mode on
the same augmented batch (``--kd-weight`` w, ``--kd-temperature`` T; the defaults 0.9 and 4 are
the usual CIFAR settings of the distillation literature, not tuned here).

Writes ``OUT/resnetDEPTH.safetensors`` and ``OUT/resnetDEPTH.json`` (SHA-256 of the weights file, the
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
from torch.optim.swa_utils import AveragedModel, update_bn

from guard.core.archive import file_md5, read_image_archive
from guard.core.cache import atomic_write_text, load_tensors, save_tensors
from guard.core.models import CifarResNet
from guard.demo import crop_flip_augment
from guard.training.checkpoint import optimizer_from_tensors, optimizer_to_tensors


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i : i + 500].float() / 255).argmax(1) for i in range(0, len(x), 500)])
    return float((pred == y).float().mean())


def _start_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The starting state dict (akamaster's file, or a guard ``resnet20.safetensors``) and its SHA-256."""
    return load_file(str(path)), hashlib.sha256(path.read_bytes()).hexdigest()


#: akamaster/pytorch_resnet_cifar10's released files, by depth (the pretrained starting points).
AKAMASTER = {20: "resnet20-12fca82f.th", 56: "resnet56-4bfd9763.th"}


def _lineage(depth: int) -> str:
    """Where a network of this depth started from (akamaster's release where there is one)."""
    if depth in AKAMASTER:
        return f"akamaster/pytorch_resnet_cifar10 {AKAMASTER[depth]} (BSD-2-Clause, see LICENSE-resnet20.txt)"
    return "the --weights file (no akamaster release at this depth)"


def _load_start(model: CifarResNet, state: dict[str, torch.Tensor], where: str) -> None:
    """Load akamaster's file (which lacks our Normalize buffers) or a guard file into ``model``;
    any other missing or unexpected key is an error (a ResNet-56 file given for a ResNet-20, say)."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("normalize.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{where!r} does not hold a CifarResNet(depth={model.depth}) state: missing {missing[:4]}, "
            f"unexpected {result.unexpected_keys[:4]}"
        )


def _distillation(
    logits: torch.Tensor, teachers: list[torch.nn.Module], x: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton et al.'s soft-target term, T^2 * KL(teacher || student) at temperature T; the
    teacher distribution of several networks is the mean of their tempered softmaxes."""
    with torch.no_grad():
        logs = torch.stack([F.log_softmax(t(x) / temperature, dim=1) for t in teachers])
        target = torch.logsumexp(logs, dim=0) - math.log(len(teachers))
    return (
        F.kl_div(F.log_softmax(logits / temperature, dim=1), target, log_target=True, reduction="batchmean")
        * temperature**2
    )


def _save_state(path: Path, model, opt, swa, gen: torch.Generator, meta: dict) -> None:
    """Everything the run needs to continue after an interruption, as tensors plus JSON (no pickle)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_t, opt_meta = optimizer_to_tensors(opt)
    tensors.update(opt_t)
    if swa is not None:
        tensors.update({f"swa.{k}": v for k, v in swa.state_dict().items()})
    tensors["gen_state"] = gen.get_state()
    save_tensors(path, tensors, {**meta, "optimizer": opt_meta})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with cifar10-train.tar.gz and cifar10-test.tar.gz")
    p.add_argument(
        "--weights",
        required=True,
        help="the starting weights: akamaster resnet20.safetensors, or a guard resnet20.safetensors",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=6, help="epochs of the cosine phase (lr from --lr to 0)")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument(
        "--swa-epochs",
        type=int,
        default=0,
        help="then this many epochs at the constant --swa-lr, averaging the weights at every epoch's end "
        "(stochastic weight averaging, Izmailov et al. 2018; torch.optim.swa_utils); the average, with "
        "its BatchNorm statistics recomputed on the training images, is the result",
    )
    p.add_argument("--swa-lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--depth", type=int, default=20, help="the CIFAR ResNet to train (20: the demo model; 56: a teacher)"
    )
    p.add_argument(
        "--teacher",
        nargs="+",
        default=None,
        help="guard resnetDEPTH.safetensors file(s) to distil from; several: their mean tempered softmax",
    )
    p.add_argument(
        "--teacher-depth", type=int, nargs="+", default=[56], help="one depth for every teacher, or one per teacher"
    )
    p.add_argument(
        "--kd-weight", type=float, default=0.9, help="weight of the distillation term (the rest: cross-entropy)"
    )
    p.add_argument("--kd-temperature", type=float, default=4.0)
    args = p.parse_args(argv)
    if args.epochs < 0 or args.swa_epochs < 0 or args.epochs + args.swa_epochs == 0:
        p.error(f"--epochs and --swa-epochs must be >= 0 and not both 0; got {args.epochs} and {args.swa_epochs}")
    if not 0.0 <= args.kd_weight <= 1.0 or args.kd_temperature <= 0:
        p.error(
            f"--kd-weight must be in [0, 1] and --kd-temperature > 0; got {args.kd_weight} and {args.kd_temperature}"
        )
    teacher_depths = list(args.teacher_depth) * (len(args.teacher or []) if len(args.teacher_depth) == 1 else 1)
    if args.teacher and len(teacher_depths) != len(args.teacher):
        p.error(
            f"--teacher-depth takes one depth or one per teacher; got {len(args.teacher_depth)} for {len(args.teacher)} teachers"
        )
    torch.set_num_threads(args.threads)
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    x_train, y_train, names = read_image_archive(data / "cifar10-train.tar.gz")
    x_test, y_test, _ = read_image_archive(data / "cifar10-test.tar.gz")
    print(
        f"decoded {len(x_train)} training and {len(x_test)} test images in {time.perf_counter() - t0:.0f} s", flush=True
    )
    torch.manual_seed(args.seed)
    model = CifarResNet(args.depth)
    start_state, start_sha = _start_weights(Path(args.weights))
    _load_start(model, start_state, args.weights)
    before = accuracy(model, x_test, y_test)
    print(f"start ({Path(args.weights).name}, sha256 {start_sha[:16]}...): {before:.4f} on the test images", flush=True)
    teachers: list[torch.nn.Module] = []
    teacher_records: list[dict] = []
    for file, depth in zip(args.teacher or [], teacher_depths):
        net = CifarResNet(depth)
        state, sha = _start_weights(Path(file))
        _load_start(net, state, file)
        net.eval().requires_grad_(False)
        acc = accuracy(net, x_test, y_test)
        teachers.append(net)
        teacher_records.append(
            {
                "file": Path(file).name,
                "sha256": sha,
                "depth": depth,
                "start": _lineage(depth),
                "test_accuracy": round(acc, 4),
            }
        )
        print(
            f"teacher ResNet-{depth} {Path(file).name} (sha256 {sha[:16]}...): {acc:.4f} on the test images "
            "(reported, not used to select)",
            flush=True,
        )
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    per_epoch = math.ceil(len(x_train) / args.batch_size)
    steps = args.epochs * per_epoch
    swa = AveragedModel(model) if args.swa_epochs else None
    gen = torch.Generator().manual_seed(args.seed)
    config = {
        "start_sha256": start_sha,
        "epochs": args.epochs,
        "lr": args.lr,
        "swa_epochs": args.swa_epochs,
        "swa_lr": args.swa_lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "depth": args.depth,
        "teacher_sha256": [t["sha256"] for t in teacher_records] or None,
        "kd_weight": args.kd_weight,
        "kd_temperature": args.kd_temperature,
    }
    state_path = out / "train_state.safetensors"
    history: list[dict] = []
    done, elapsed = 0, 0.0
    if state_path.is_file():  # resume: an interrupted run loses at most the epoch in progress
        tensors, meta = load_tensors(state_path)
        if meta.get("config") != config:
            raise ValueError(
                f"{str(state_path)!r} is from a run with other settings ({meta.get('config')}); "
                f"this run has {config}: use another --out or delete the file"
            )
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        opt.load_state_dict(optimizer_from_tensors(tensors, meta["optimizer"]))
        if swa is not None:
            swa.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("swa.")})
        gen.set_state(tensors["gen_state"])
        done, elapsed, history = meta["epochs_done"], meta["seconds"], meta["history"]
        print(f"resumed after epoch {done} ({elapsed:.0f} s of training so far)", flush=True)

    def lr_at(step: int) -> float:
        if step < steps:
            return args.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        return args.swa_lr

    t_train = time.perf_counter() - elapsed
    for epoch in range(done, args.epochs + args.swa_epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total, seen = 0.0, 0
        for j, i in enumerate(range(0, len(perm), args.batch_size)):
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * per_epoch + j)
            idx = perm[i : i + args.batch_size]
            xb = crop_flip_augment(x_train[idx].float() / 255, gen)
            logits = model(xb)
            loss = F.cross_entropy(logits, y_train[idx])
            if teachers:
                loss = (1 - args.kd_weight) * loss + args.kd_weight * _distillation(
                    logits, teachers, xb, args.kd_temperature
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        phase = "cosine" if epoch < args.epochs else "swa"
        if phase == "swa":
            swa.update_parameters(model)
        history.append(
            {
                "epoch": epoch + 1,
                "phase": phase,
                "train_loss": round(total / seen, 4),
                "seconds": round(time.perf_counter() - t_train, 1),
            }
        )
        print(
            f"epoch {epoch + 1} ({phase}): train loss {total / seen:.4f} ({time.perf_counter() - t_train:.0f} s)",
            flush=True,
        )
        _save_state(
            state_path,
            model,
            opt,
            swa,
            gen,
            {"config": config, "epochs_done": epoch + 1, "seconds": time.perf_counter() - t_train, "history": history},
        )
    result = model
    last_iterate = None
    if swa is not None:
        last_iterate = accuracy(model, x_test, y_test)  # printed for the record; the average is the result either way
        loader = [x_train[i : i + 500].float() / 255 for i in range(0, len(x_train), 500)]
        update_bn(loader, swa)
        result = swa.module
    train_seconds = time.perf_counter() - t_train
    after = accuracy(result, x_test, y_test)
    if last_iterate is not None:
        print(
            f"last iterate: {last_iterate:.4f}; weight average (the result): {after:.4f} on the 10,000 test images",
            flush=True,
        )
    print(f"fine-tuned: {after:.4f} on the 10,000 test images (never trained on)", flush=True)
    path = out / f"resnet{args.depth}.safetensors"
    state = {k: v for k, v in result.state_dict().items()}
    architecture = f"guard.core.models.CifarResNet(depth={args.depth})"
    save_tensors(path, state, {"architecture": architecture, "classes": names})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    record = {
        "file": path.name,
        "sha256": digest,
        "architecture": architecture,
        "classes": names,
        "start": _lineage(args.depth),
        "start_file": {"name": Path(args.weights).name, "sha256": start_sha},
        "teacher": None
        if not teachers
        else {"networks": teacher_records, "kd_weight": args.kd_weight, "kd_temperature": args.kd_temperature},
        "command": "python tools/train_cifar10_resnet20.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "epochs": args.epochs,
        "lr": args.lr,
        "swa_epochs": args.swa_epochs,
        "swa_lr": args.swa_lr,
        "batch_size": args.batch_size,
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
        "test_accuracy_start": round(before, 4),
        "test_accuracy_last_iterate": None if last_iterate is None else round(last_iterate, 4),
        "test_accuracy": round(after, 4),
        "train_seconds": round(train_seconds, 1),
        "threads": args.threads,
        "device": "cpu",
        "torch": torch.__version__,
        "history": history,
    }
    atomic_write_text(out / f"resnet{args.depth}.json", json.dumps(record, indent=2) + "\n")
    print(f"wrote {path} (sha256 {digest[:16]}...) and {out / f'resnet{args.depth}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
