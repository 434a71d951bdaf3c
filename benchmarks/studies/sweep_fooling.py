"""Fooling images on the demo model: gradient ascent, direct and CPPN MAP-Elites (the "must show" run).

For each method: classes with an image at >= 99.99% confidence, the generation (or step) at
which all 10 passed, wall and CPU seconds, and the median / min confidence over the archive
(one elite per class; for gradient ascent the best of ``--samples`` images per class). Then the
transfer check: the same images scored by a second model (a narrow DemoNet trained with
another seed, 2 epochs on the 8,000 training images).

Writes benchmarks/results/sweep_fooling.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.sweep_fooling [--generations 3000]

On CIFAR-10 (the shipped ResNet-20; transfer to akamaster's independently trained ResNet-56)::

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.sweep_fooling --demo cifar10 --out benchmarks/results/sweep_fooling_cifar10.json \
        --transfer-weights ../shared/models/cifar10-resnet-akamaster/resnet56.safetensors
"""

from __future__ import annotations

import argparse
import time

import torch

import guard
from benchmarks.fixtures.timing import out_option, pin_threads
from guard.attacks.fooling_evolution import FoolingEvolution, transfer_check
from guard.attacks.fooling_gradient import FoolingGradient
from guard.core.models import DemoNet
from guard.core.provenance import write_results
from guard.training.classifier import train_classifier


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generations", type=int, default=3000)
    ap.add_argument("--population", type=int, default=100)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--runs", nargs="+", default=["gradient", "cppn:uniform", "cppn:unfooled", "direct:unfooled"])
    ap.add_argument("--demo", default="mnist")
    ap.add_argument(
        "--transfer-weights", default=None, help="CIFAR-10: a ResNet-56 state dict (akamaster) as the second model"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gradient-steps", type=int, default=1000)
    out_option(ap, "sweep_fooling")
    args = ap.parse_args()
    pin_threads(args.threads)
    model = guard.demo_model(args.demo, progress=False)
    train, _ = guard.demo_data(args.demo)
    shape = tuple(train.x.shape[1:])
    if args.demo == "mnist":
        torch.manual_seed(1)
        other = DemoNet(width=8, hidden=32)
        train_classifier(other, train.x, train.y, epochs=2, lr=3e-3, seed=1, progress=False)
    elif args.transfer_weights:
        from safetensors.torch import load_file

        from guard.core.models import CifarResNet

        other = CifarResNet(56)
        other.load_state_dict(load_file(args.transfer_weights), strict=False)
    else:
        other = None
    if other is not None:
        other.eval()
    print(
        "| method | classes >= 99.99% | all passed at | wall s | CPU s | median conf (archive) | min conf | transfer: same label / >= 99.99% / median conf |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for run in args.runs:
        w0, c0 = time.perf_counter(), time.process_time()
        if run == "gradient":
            res = FoolingGradient(steps=args.gradient_steps, lr=0.1, samples_per_class=args.samples, seed=0)(
                model, shape=shape
            )
            conf = res.extras["confidence"].view(10, args.samples).max(1).values
            steps = res.extras["steps"]
            at = (
                f"step {int(steps.view(10, -1).clamp_min(0).max()) + 1}"
                if bool((steps.view(10, -1).max(1).values >= 0).all())
                else "never"
            )
        else:
            enc, sel = run.split(":")
            res = FoolingEvolution(
                encoding=enc, population=args.population, generations=args.generations, parent_selection=sel, seed=0
            )(model, shape=shape)
            conf = res.extras["elite_confidence"]
            g = res.extras["generation_all_fooled"]
            at = f"generation {g}" if g > 0 else f"not in {args.generations}"
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        tr = (
            transfer_check(other, res.x_adv, res.extras["label"])
            if other is not None
            else {"same_label": float("nan"), "at_threshold": float("nan"), "median_confidence": float("nan")}
        )
        print(
            f"| {run} | {int((conf >= 0.9999).sum())}/10 | {at} | {wall:.1f} | {cpu:.1f} | {float(conf.double().median()):.7f} | "
            f"{float(conf.min()):.6f} | {tr['same_label']:.2f} / {tr['at_threshold']:.2f} / {tr['median_confidence']:.3f} |",
            flush=True,
        )
        nan_none = lambda v: None if v != v else float(v)  # noqa: E731  (strict JSON has no NaN)
        rows.append(
            {
                "run": run,
                "classes_at_9999": int((conf >= 0.9999).sum()),
                "all_passed_at": at,
                "wall_seconds": round(wall, 1),
                "cpu_seconds": round(cpu, 1),
                "median_confidence": float(conf.double().median()),
                "min_confidence": float(conf.min()),
                "transfer": None
                if other is None
                else {k: nan_none(tr[k]) for k in ("same_label", "at_threshold", "median_confidence")},
            }
        )
    write_results(
        args.out,
        {
            "demo": args.demo,
            "generations": args.generations,
            "population": args.population,
            "samples": args.samples,
            "gradient_steps": args.gradient_steps,
            "threads": args.threads,
            "transfer_model": None if other is None else type(other).__name__,
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
