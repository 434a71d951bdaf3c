"""Overhead of GuardedModel over the bare demo model per batch of 256 images.

Fitted on the demo's 8,000 training images, calibrated on 1,000 held-out; timed on batches of
256 held-out images, one thread. Configurations: the feature detectors only (knn, ppca,
knn_consistency: one shared forward pass plus FAISS searches), + squeeze (one more forward pass
of the squeezed image: the first is shared), + saliency (one backward pass), and all. Each
configuration is timed against the bare model in the same process, calls interleaved
(:func:`benchmarks.fixtures.timing.paired_median_ms`); the ratio is guarded ms / bare ms.
Writes benchmarks/results/guarded_vs_bare.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.peers.guarded_vs_bare [--reps 7] [--batch 256]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import guard  # noqa: E402
from benchmarks.fixtures.timing import out_option, paired_median_ms, pin_threads  # noqa: E402
from guard.core.provenance import write_results  # noqa: E402

CONFIGS = {
    "features (knn, ppca, knn_consistency)": ["knn", "ppca", "knn_consistency"],
    "features + squeeze": ["knn", "ppca", "knn_consistency", "squeeze"],
    "features + saliency": ["knn", "ppca", "knn_consistency", "saliency"],
    "all (default)": None,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    out_option(ap, "guarded_vs_bare")
    args = ap.parse_args()
    pin_threads(1)
    model = guard.demo_model(progress=False).eval()
    train, test = guard.demo_data()
    x = test.x[1000 : 1000 + args.batch]

    def bare() -> None:
        with torch.no_grad():
            model(x)

    print(f"batch of {len(x)} on the demo LeNet, 1 thread; medians of {args.reps} interleaved pairs")
    print(f"{'configuration':<40} {'bare ms':>8} {'ms/batch':>9} {'x bare':>8}")
    rows = {}
    for name in args.configs:
        g = guard.wrap(model, detectors=CONFIGS[name]).fit(train)
        g.calibrate(test.x[:1000], fpr=0.05)
        bare_ms, ms = paired_median_ms(bare, lambda: g(x), args.reps)
        print(f"{name:<40} {bare_ms:>8.2f} {ms:>9.2f} {ms / bare_ms:>8.1f}")
        rows[name] = {
            "detectors": sorted(g.detectors),
            "bare_ms": round(bare_ms, 3),
            "guarded_ms": round(ms, 3),
            "ratio_guarded_over_bare": round(ms / bare_ms, 3),
        }
    write_results(
        args.out,
        {
            "model": "guard.demo_model('mnist') (DemoNet)",
            "batch": len(x),
            "fit_images": len(train),
            "calibration_images": 1000,
            "fpr": 0.05,
            "threads": 1,
            "reps": args.reps,
            "timing": "median ms over interleaved calls of bare and guarded (one warm-up of each)",
            "ratio_note": "guarded ms over bare ms",
            "configurations": rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
