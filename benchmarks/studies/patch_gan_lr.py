"""PatchGAN's learning rate at the audit's short budgets, tuned where nothing is reported.

The audit trains PatchGAN and UniversalPatch for the same number of steps per area (40 on the
CIFAR-10 demo model, scaled from 200 on the LeNet by the model's cost). At the paper's Adam
lr 1e-3 a freshly initialised generator barely moves in 40 steps, so its patches stay close to
its random initial output. This script measures the fooling rate of PatchGAN at several
learning rates, beside UniversalPatch and RandomPatch, with everything the audit reports kept
out of the loop:

* seed ``--seed`` (default 1; the audit uses 0) for the generator, batches and positions;
* fitted on the audit's patch-training slice (the first 2,000 of the 8,000 training images);
* scored on training images 4,000-4,999 (never the 2,000 held-out images the audit reports).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.patch_gan_lr --demo cifar10 --steps 40 --lr 1e-3 3e-3 1e-2 3e-2

A user's own model (a CIFAR ResNet-20 in the user's module, akamaster's weights as they come)::

    GUARD_USER_WEIGHTS=../shared/models/cifar10-resnet-akamaster/resnet20.safetensors \
        OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.patch_gan_lr --model benchmarks.fixtures.user_cifar_resnet20:build --lr 1e-3 5e-3

Writes ``{"args", "rows"}`` to benchmarks/results/patch_gan_lr_run.json (``--out``; the committed
benchmarks/results/patch_gan_lr.json gathers four earlier runs of this shape under ``runs``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import guard
from benchmarks.fixtures.timing import out_option, pin_threads
from guard.attacks.patch_analysis import fooling_rate_repeated, pairwise_diversity, patch_sampler
from guard.attacks.patch_fit import PatchTraining
from guard.attacks.patch_gan import PatchGAN
from guard.attacks.random_patch import RandomPatch
from guard.attacks.universal_patch import UniversalPatch
from guard.audit.patches import DEFAULT_AREAS, GAN_AUDIT_KWARGS
from guard.core.models import load_model
from guard.core.provenance import write_results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", default="cifar10", help="the embedded data (and, without --model, its demo model)")
    ap.add_argument(
        "--model", default=None, help="a user's model instead of the demo one: module:callable, as guard audit --model"
    )
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32, help="the audit's batch on the CIFAR-10 model")
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
    ap.add_argument("--areas", type=float, nargs="+", default=DEFAULT_AREAS)
    ap.add_argument(
        "--beta", type=float, nargs="+", default=[None], help="PatchGAN's diversity weight(s) (default: the audit's)"
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--score", type=int, default=1000, help="training images 4,000 on that the patches are scored on")
    out_option(ap, "patch_gan_lr_run")
    args = ap.parse_args()
    pin_threads(args.threads)
    train, _ = guard.demo_data(args.demo)
    model = (load_model(args.model) if args.model else guard.demo_model(args.demo)).eval()
    x_fit = train.x[:2000]
    x_score, y_score = train.x[4000 : 4000 + args.score], train.y[4000 : 4000 + args.score]
    shape = (int(x_fit.shape[1]), tuple(x_fit.shape[-2:]))
    rows = []
    schedule = dict(steps=args.steps, eval_every=args.eval_every, batch_size=args.batch_size, seed=args.seed)
    for area in args.areas:
        makers = {
            f"patch_gan lr={lr:g}" + (f" beta={beta:g}" if beta is not None else ""): (
                lambda lr=lr, beta=beta: PatchGAN(
                    size=area,
                    loss="margin",
                    training=PatchTraining(lr=lr, **schedule),
                    **{**GAN_AUDIT_KWARGS, **({"beta": beta} if beta is not None else {})},
                )
            )
            for lr in args.lr
            for beta in args.beta
        }
        makers["universal_patch"] = lambda: UniversalPatch(size=area, loss="margin", training=PatchTraining(**schedule))
        makers["random_patch"] = lambda: RandomPatch(size=area, seed=args.seed)
        for name, make in makers.items():
            t0 = time.perf_counter()
            attack = make().fit(model, x_fit)
            stats = fooling_rate_repeated(
                model, x_score, patch_sampler(attack, *shape), repetitions=args.reps, seed=args.seed, y=y_score
            )
            row = {
                "area": area,
                "attack": name,
                "fooling_rate": round(stats["mean"], 4),
                "std": round(stats["std"], 4),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            if name.startswith("patch_gan"):  # the audit's diversity figure: median SSIM over pairs of 100 patches
                gen = torch.Generator().manual_seed(args.seed)
                row["ssim_median"] = round(pairwise_diversity(attack.sample(100, generator=gen))["ssim_median"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_results(
        args.out,
        {
            "args": {k: v for k, v in vars(args).items() if k != "out"},
            "rows": rows,
            "fit_images": "training split 0-1999",
            "scored_images": f"training split 4000-{4000 + len(x_score) - 1}",
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
