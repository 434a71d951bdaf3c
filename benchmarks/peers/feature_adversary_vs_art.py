"""FeatureAdversary vs IBM ART's FeatureAdversariesNumpy and FeatureAdversariesPyTorch.

Same demo model, layer, delta, sources and guides (test split, guides of another true class,
seeded). Prints seconds and the median distance ratio d(a, g) / d(s, g) for each, and ratios.

* ART NumPy: L-BFGS-B with finite-difference gradients (SciPy's 2-point rule over every pixel of
  the flattened batch), ART's defaults (``eps=1e-3, ftol=1e-3``) and ``maxiter`` as given.
  It is run on a few images only (one gradient costs ``N * 784 + 1`` forward passes).
* ART PyTorch: signed-gradient PGD on the same objective (``step_size``), iterations chosen
  so that its time matches ours ("at equal time").

The ratios are guard's seconds over ART's (below 1: guard is faster) on the same images.
Writes benchmarks/results/feature_adversary_vs_art.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.peers.feature_adversary_vs_art [--n 100] [--n-numpy 2]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from torch import nn

import guard
from benchmarks.fixtures.timing import out_option, pin_threads
from guard.attacks.feature_adversary import FeatureAdversary, sample_guides
from guard.attacks.representation import distance_ratio
from guard.core.features import extract_features
from guard.core.provenance import write_results


def dr(model: nn.Module, layer: str, adv: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    _, fa = extract_features(model, adv, [layer])
    _, fs = extract_features(model, x, [layer])
    _, fg = extract_features(model, g, [layer])
    return distance_ratio(fa[layer], fs[layer], fg[layer])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--n-numpy", type=int, default=2)
    ap.add_argument("--layer", default="fc1")
    ap.add_argument("--delta", type=float, default=0.3)
    ap.add_argument("--max-iter", type=int, default=50)
    ap.add_argument("--numpy-maxiter", type=int, default=5)
    out_option(ap, "feature_adversary_vs_art")
    args = ap.parse_args()
    pin_threads(1)
    logging.getLogger("art").setLevel(logging.WARNING)
    from art.attacks.evasion import FeatureAdversariesNumpy, FeatureAdversariesPyTorch
    from art.estimators.classification import PyTorchClassifier

    model = guard.demo_model(progress=False)
    _, test = guard.demo_data()
    x, y = test.x[: args.n], test.y[: args.n]
    gi = sample_guides(y, test.y[1000:], seed=0)
    g = test.x[1000:][gi]
    clf = PyTorchClassifier(
        model=model, loss=nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10, clip_values=(0.0, 1.0)
    )
    layer_idx = clf.layer_names.index(args.layer) if args.layer in clf.layer_names else args.layer
    print(f"demo model, layer {args.layer} (ART layer {layer_idx!r}), delta {args.delta}")

    # ours, N images
    t0 = time.perf_counter()
    ours = FeatureAdversary(layer=args.layer, delta=args.delta, max_iter=args.max_iter).generate(model, x, g)
    t_ours = time.perf_counter() - t0
    d_ours = ours.extras["distance_ratio"]
    print(
        f"guard FeatureAdversary  n={args.n:4d} max_iter={args.max_iter}: {t_ours:8.2f} s ({t_ours / args.n * 1e3:7.1f} ms/img)  "
        f"median ratio {float(d_ours.median()):.3f}  agreement {ours.success_rate:.3f}"
    )

    # ART NumPy (finite differences), few images
    k = args.n_numpy
    t0 = time.perf_counter()
    art_np = FeatureAdversariesNumpy(clf, delta=args.delta, layer=layer_idx, batch_size=64)
    a_np = torch.from_numpy(art_np.generate(x[:k].numpy(), g[:k].numpy(), maxiter=args.numpy_maxiter)).float()
    t_np = time.perf_counter() - t0
    d_np = dr(model, args.layer, a_np, x[:k], g[:k])
    t0 = time.perf_counter()
    ours_k = FeatureAdversary(layer=args.layer, delta=args.delta, max_iter=args.numpy_maxiter).generate(
        model, x[:k], g[:k]
    )
    t_ours_k = time.perf_counter() - t0
    print(
        f"ART FeatureAdversariesNumpy n={k} maxiter={args.numpy_maxiter}: {t_np:8.2f} s  median ratio {float(d_np.median()):.3f}  "
        f"linf {float((a_np - x[:k]).abs().max()):.3f}"
    )
    print(
        f"guard same n={k} max_iter={args.numpy_maxiter}:          {t_ours_k:8.2f} s  median ratio "
        f"{float(ours_k.extras['distance_ratio'].median()):.3f}  -> speed-up {t_np / t_ours_k:.0f}x"
    )
    figures: dict[str, object] = {
        "model": "guard.demo_model('mnist') (DemoNet)",
        "layer": args.layer,
        "delta": args.delta,
        "threads": 1,
        "guard": {
            "images": args.n,
            "max_iter": args.max_iter,
            "seconds": round(t_ours, 3),
            "median_distance_ratio": float(d_ours.median()),
            "guide_label_agreement": float(ours.success_rate),
        },
        "art_numpy": {
            "images": k,
            "maxiter": args.numpy_maxiter,
            "seconds": round(t_np, 3),
            "median_distance_ratio": float(d_np.median()),
            "linf": float((a_np - x[:k]).abs().max()),
            "guard_same_images_seconds": round(t_ours_k, 3),
            "guard_same_images_median_distance_ratio": float(ours_k.extras["distance_ratio"].median()),
            "ratio_guard_seconds_over_art": round(t_ours_k / t_np, 4),
        },
        "art_pytorch": [],
        "ratio_note": "guard seconds over ART seconds on the same images (< 1: guard is faster)",
    }

    # ART PyTorch (PGD), N images, at about our time
    step = args.delta / 10
    t0 = time.perf_counter()
    FeatureAdversariesPyTorch(
        clf, delta=args.delta, layer=layer_idx, max_iter=5, step_size=step, batch_size=args.n, verbose=False
    ).generate(x.numpy(), g.numpy())
    per_iter = (time.perf_counter() - t0) / 5
    iters = max(1, int(t_ours / per_iter))
    for it in sorted({iters, args.max_iter}):
        t0 = time.perf_counter()
        a_pt = FeatureAdversariesPyTorch(
            clf, delta=args.delta, layer=layer_idx, max_iter=it, step_size=step, batch_size=args.n, verbose=False
        ).generate(x.numpy(), g.numpy())
        t_pt = time.perf_counter() - t0
        d_pt = dr(model, args.layer, torch.from_numpy(a_pt).float(), x, g)
        with torch.no_grad():
            agree = float((model(torch.from_numpy(a_pt).float()).argmax(1) == model(g).argmax(1)).float().mean())
        print(
            f"ART FeatureAdversariesPyTorch n={args.n} PGD iters={it} step={step:.3f}: {t_pt:8.2f} s  median ratio {float(d_pt.median()):.3f}  "
            f"agreement {agree:.3f}  (time ratio ART/guard {t_pt / t_ours:.2f})"
        )
        figures["art_pytorch"].append(
            {
                "images": args.n,
                "pgd_iterations": it,
                "step_size": step,  # type: ignore[attr-defined]
                "equal_time": it == iters,
                "seconds": round(t_pt, 3),
                "median_distance_ratio": float(d_pt.median()),
                "guide_label_agreement": agree,
                "ratio_guard_seconds_over_art": round(t_ours / t_pt, 3),
            }
        )
    write_results(args.out, figures)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
