"""PatchGAN vs IBM ART's AdversarialPatchPyTorch: same model, same patch area, same wall-clock budget.

ART is run first (untargeted, square patch, no rotation, fixed scale = side / image side so it
covers the same area, random placement, Adam); its training time T becomes the wall-clock
budget of guard's PatchGAN (paper loss and margin loss) and UniversalPatch. Every patch is
then evaluated on the 2,000 held-out images with ``--reps`` draws of random positions
(ART's patch through ART's own ``apply_patch``). Prints the fooling rates (the model's label
on the patched image differs from its clean label) and the ratio guard's / ART's fooling rate.
Writes benchmarks/results/patch_gan_vs_art.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.peers.patch_gan_vs_art --threads 1 [--demo cifar10] [--area 0.1] [--art-iters 5] [--train 1000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.fixtures.timing import out_option, pin_threads
from guard.core.provenance import write_results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--area", type=float, default=0.1)
    ap.add_argument(
        "--art-iters", type=int, default=5, help="ART max_iter (each iteration is one pass over --train images)"
    )
    ap.add_argument("--art-lr", type=float, default=0.1)
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--demo", default="mnist", help="embedded default: mnist or cifar10 (its demo model)")
    ap.add_argument("--eval", type=int, default=0, help="held-out images the patches are scored on (0: all)")
    out_option(ap, "patch_gan_vs_art")
    args = ap.parse_args()
    pin_threads(args.threads)

    from art.attacks.evasion import AdversarialPatchPyTorch
    from art.estimators.classification import PyTorchClassifier

    import guard
    from guard.attacks.patch_analysis import fooling_rate_repeated, pairwise_diversity, patch_sampler
    from guard.attacks.patch_fit import PatchTraining
    from guard.attacks.patch_gan import PatchGAN
    from guard.attacks.patching import patch_side
    from guard.attacks.universal_patch import UniversalPatch
    from guard.audit.patches import GAN_AUDIT_KWARGS

    model = guard.demo_model(args.demo, progress=False).eval()
    train, test = guard.demo_data(args.demo)
    if args.eval:
        test = guard.Split(test.x[: args.eval], test.y[: args.eval])
    c, h, _ = (int(v) for v in test.x.shape[1:])
    x_tr = train.x[: args.train]
    side = patch_side(args.area, (h, h))
    with torch.no_grad():
        clean = model(test.x).argmax(1)
        y_tr = model(x_tr).argmax(1)

    clf = PyTorchClassifier(
        model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(c, h, h), nb_classes=10, clip_values=(0.0, 1.0)
    )
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    art = AdversarialPatchPyTorch(
        clf,
        rotation_max=0.0,
        scale_min=side / h,
        scale_max=side / h + 1e-6,
        learning_rate=args.art_lr,
        max_iter=args.art_iters,
        batch_size=64,
        patch_shape=(c, h, h),
        patch_type="square",
        optimizer="Adam",
        targeted=False,
        verbose=False,
    )
    t0 = time.perf_counter()
    art.generate(x=x_tr.numpy(), y=np.eye(10, dtype=np.float32)[y_tr.numpy()])
    budget = time.perf_counter() - t0
    art_rates = []
    for r in range(args.reps):
        np.random.seed(args.seed + r)
        xa = art.apply_patch(test.x.numpy(), scale=side / h)
        with torch.no_grad():
            art_rates.append(float((model(torch.from_numpy(xa).float()).argmax(1) != clean).float().mean()))
    art_mean = float(np.mean(art_rates))
    print(
        f"area {args.area} ({side}x{side} px); ART AdversarialPatchPyTorch: {args.art_iters} iterations over {args.train} images "
        f"in {budget:.1f} s -> fooling {art_mean:.4f} +- {np.std(art_rates):.4f}"
    )

    rows = {}
    training = PatchTraining(steps=100000, max_seconds=budget, eval_every=25, patience=100, seed=args.seed)
    common = dict(size=args.area, training=training)
    candidates = [
        ("PatchGAN paper loss+alpha,beta", PatchGAN(loss="paper", **common)),  # alpha=20, beta=0.1, 2-norm L_p
        ("PatchGAN paper loss, audit div.", PatchGAN(loss="paper", **GAN_AUDIT_KWARGS, **common)),
        ("PatchGAN margin loss, audit div.", PatchGAN(loss="margin", **GAN_AUDIT_KWARGS, **common)),
        ("UniversalPatch margin loss", UniversalPatch(loss="margin", **common)),
    ]
    for name, atk in candidates:
        t0 = time.perf_counter()
        atk.fit(model, x_tr)
        fit_s = time.perf_counter() - t0
        st = fooling_rate_repeated(model, test.x, patch_sampler(atk), repetitions=args.reps, seed=args.seed)
        rows[name] = {
            "fooling_rate": st["mean"],
            "std": st["std"],
            "fit_seconds": round(fit_s, 2),
            "steps": int(atk.steps_),
        }
        div = (
            pairwise_diversity(atk.sample(100, generator=torch.Generator().manual_seed(0)))["ssim_median"]
            if isinstance(atk, PatchGAN)
            else 1.0
        )
        rows[name]["ssim_median"] = div
        rows[name]["ratio_over_art"] = rows[name]["fooling_rate"] / art_mean if art_mean > 0 else None
        print(
            f"{name:<32} fit {fit_s:5.1f} s ({atk.steps_} steps) -> fooling {st['mean']:.4f} +- {st['std']:.4f}  median SSIM {div:.3f}"
        )
    for name, v in rows.items():
        print(f"ratio {name:<32} / ART: {v['fooling_rate'] / art_mean if art_mean > 0 else float('inf'):.2f}x")
    write_results(
        args.out,
        {
            "demo": args.demo,
            "area": args.area,
            "side_px": side,
            "train_images": args.train,
            "eval_images": len(test),
            "reps": args.reps,
            "threads": args.threads,
            "seed": args.seed,
            "art": {
                "iterations": args.art_iters,
                "lr": args.art_lr,
                "seconds": round(budget, 2),
                "fooling_rate": art_mean,
                "std": float(np.std(art_rates)),
            },
            "wall_clock_budget_seconds": round(budget, 2),
            "guard": rows,
            "ratio_note": "each guard attack's fooling rate over ART's, at ART's training time as guard's budget",
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
