"""PatchGAN vs IBM ART's AdversarialPatchPyTorch: same model, same patch area, same wall-clock budget.

Usage: OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_patch.py [--demo cifar10] [--area 0.1] [--art-iters 5] [--train 1000] [--threads 2]

ART is run first (untargeted, square patch, no rotation, fixed scale = side / image side so it
covers the same area, random placement, Adam); its training time T becomes the wall-clock
budget of guard's PatchGAN (paper loss and margin loss) and UniversalPatch. Every patch is
then evaluated on the 2,000 held-out images with ``--reps`` draws of random positions
(ART's patch through ART's own ``apply_patch``). Prints the fooling rates (the model's label
on the patched image differs from its clean label) and the ratio PatchGAN / ART.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--area", type=float, default=0.1)
    ap.add_argument(
        "--art-iters", type=int, default=5, help="ART max_iter (each iteration is one pass over --train images)"
    )
    ap.add_argument("--art-lr", type=float, default=0.1)
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--demo", default="mnist", help="embedded default: mnist or cifar10 (its demo model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from art.attacks.evasion import AdversarialPatchPyTorch
    from art.estimators.classification import PyTorchClassifier

    import guard
    from guard.attacks.patch_analysis import fooling_rate_repeated, pairwise_diversity, patch_sampler
    from guard.attacks.patch_gan import PatchGAN
    from guard.attacks.patching import patch_side
    from guard.attacks.universal_patch import UniversalPatch
    from guard.audit.patches import GAN_AUDIT_KWARGS

    model = guard.demo_model(args.demo, progress=False).eval()
    train, test = guard.demo_data(args.demo)
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
    common = dict(size=args.area, steps=100000, max_seconds=budget, eval_every=25, patience=100, seed=args.seed)
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
        rows[name] = st["mean"]
        div = (
            pairwise_diversity(atk.sample(100, generator=torch.Generator().manual_seed(0)))["ssim_median"]
            if isinstance(atk, PatchGAN)
            else 1.0
        )
        print(
            f"{name:<32} fit {fit_s:5.1f} s ({atk.steps_} steps) -> fooling {st['mean']:.4f} +- {st['std']:.4f}  median SSIM {div:.3f}"
        )
    for name, v in rows.items():
        print(f"ratio {name:<32} / ART: {v / art_mean if art_mean > 0 else float('inf'):.2f}x")


if __name__ == "__main__":
    main()
